"""Fast-dLLM v2: Qwen2.5 tensors, block-causal attention over bd_size blocks, shifted logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from diffulex import SamplingParams
from diffulex.llm import LLM
from diffulex.models import load_model, resolve_model_class
from diffulex.models.fast_dllm_v2 import FastDLLMV2Model
from diffulex.models.tiny_checkpoint import special_token_ids, write_tiny_checkpoint
from tests.model_helpers import _max_rel_error, block_causal, qwen_reference_logits


def reference_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Plain forward from the official names with ``eval_block_diff_mask`` (query block >= key block).
    Unshifted: row i is the head applied to hidden i (position i is predicted from row i - 1)."""
    cfg = json.loads((path / "config.json").read_text())
    return qwen_reference_logits(path, ids, block_causal(ids.shape[0], cfg["bd_size"]))


def _ids(num_tokens: int, mask_id: int) -> list[int]:
    ids = torch.randint(0, 97, (num_tokens,), generator=torch.Generator().manual_seed(1))
    ids[1::3] = mask_id
    return ids.tolist()


def test_engine_logits_match_plain_block_causal_reference(tmp_path: Path) -> None:
    path = write_tiny_checkpoint("fast_dllm_v2", tmp_path / "m", seed=3, num_key_value_heads=1)
    llm = LLM(str(path), device="cpu", dtype="float32")
    assert llm.engine.spec.native_attention == "block_causal"
    ids = _ids(37, llm.engine.spec.mask_token_id)
    logits = llm.forward_logits(ids)
    assert logits.shape == (37, llm.engine.spec.vocab_size)
    assert _max_rel_error(logits, reference_logits(path, torch.tensor(ids))) <= 1e-5
    # Block-causal, not bidirectional: a later block leaves earlier blocks' logits alone.
    changed = list(ids)
    changed[-1] = (changed[-1] + 1) % 97
    after = llm.forward_logits(changed)
    assert torch.equal(logits[:32], after[:32]) and not torch.allclose(logits[32:], after[32:])


def test_tied_embeddings_load(tmp_path: Path) -> None:
    path = write_tiny_checkpoint(
        "fast_dllm_v2", tmp_path / "m", with_tokenizer=False, tie_word_embeddings=True
    )
    model, _ = load_model(path, torch.float32, "cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_spec_of_official_config() -> None:
    # Fields of Efficient-Large-Model/Fast_dLLM_v2_7B's config (Qwen2.5-7B-Instruct's plus bd_size).
    config = {
        "architectures": ["Fast_dLLM_QwenForCausalLM"], "model_type": "Fast_dLLM_Qwen", "hidden_size": 3584,
        "intermediate_size": 18944, "num_attention_heads": 28, "num_key_value_heads": 4,
        "num_hidden_layers": 28, "vocab_size": 152064, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-06, "bos_token_id": 151643, "eos_token_id": 151645,
        "tie_word_embeddings": False, "bd_size": 32,
    }  # fmt: skip
    cls = resolve_model_class(config)
    assert cls is FastDLLMV2Model is resolve_model_class({"architectures": ["Fast_dLLM_QwenForCausalLM"]})
    assert cls is resolve_model_class({"model_type": "fast_dllm_qwen"})
    spec = cls.spec_from_config(config)
    assert (spec.family, spec.head_dim, spec.num_kv_heads, spec.vocab_size) == (
        "fast_dllm_v2",
        128,
        4,
        152064,
    )
    assert (spec.mask_token_id, spec.pad_token_id, spec.eos_token_ids) == (151665, 151643, (151645,))
    assert (spec.shift_logits, spec.native_attention, spec.default_strategy) == (
        True,
        "block_causal",
        "fast_dllm_v2",
    )
    assert spec.default_block_size == 32
    other = cls.spec_from_config(config | {"bd_size": 16, "mask_token_id": 7})
    assert (other.default_block_size, other.mask_token_id) == (16, 7)
    bare = {k: v for k, v in config.items() if k not in ("bd_size", "eos_token_id")}
    assert (cls.spec_from_config(bare).default_block_size, cls.spec_from_config(bare).eos_token_id) == (
        32,
        151645,
    )


def test_generate_with_family_default_strategy(tmp_path: Path) -> None:
    path = write_tiny_checkpoint("fast_dllm_v2", tmp_path / "m", seed=2)
    llm = LLM(str(path), device="cpu", dtype="float32")
    ids = special_token_ids("fast_dllm_v2")
    assert llm.engine.spec.mask_token_id == ids["<|mask|>"]
    assert llm.engine.spec.eos_token_ids[0] == ids["<|im_end|>"]
    assert (llm.engine.spec.default_strategy, llm.engine.spec.default_block_size) == ("fast_dllm_v2", 8)
    assert llm.engine.strategy_name == "fast_dllm_v2"
    outputs = llm.generate(["Hi", [5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert [len(out.token_ids) for out in outputs] == [8, 8]
    assert all(out.finish_reason == "length" for out in outputs)
    assert isinstance(outputs[0].text, str)
    again = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert again.token_ids == outputs[1].token_ids
    assert not llm.engine.has_unfinished() and llm.engine.kv_cache.is_whole()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("block_cache", [False, True])
def test_gpu_fast_dllm_v2_loop_matches_cpu(block_cache: bool, tmp_path: Path) -> None:
    """The fast_dllm_v2 loop on CUDA (Triton attention with the sub-block's context hole, CUDA graphs of
    the block and sub-block query sizes) gives the CPU's tokens and forwards."""
    path = write_tiny_checkpoint("fast_dllm_v2", tmp_path / "m", seed=5)
    options = {"small_block_size": 4, "use_block_cache": block_cache, "page_size": 8}
    prompts = [[17, 5, 42], [8, 9, 10, 11, 12, 13, 14, 15], [30 + i for i in range(21)]]
    params = SamplingParams(max_tokens=17, threshold=0.3, ignore_eos=True)
    cpu = LLM(str(path), device="cpu", dtype="float32", **options).generate(prompts, params)
    gpu_llm = LLM(str(path), device="cuda", dtype="float32", **options)
    gpu = gpu_llm.generate(prompts, params)
    assert [(o.token_ids, o.num_forwards) for o in gpu] == [(o.token_ids, o.num_forwards) for o in cpu]
    sizes = [4, 8] if block_cache else [8]  # sub-block queries, block queries
    assert gpu_llm.engine.strategy.static_query_sizes() == sizes
    denoise_sets = [g for g in gpu_llm.engine.runner.graph_sets if g.buckets[-1] > 1]  # not one-request
    assert sorted(g.tokens_per_seq for g in denoise_sets if g.graphs) == sizes
