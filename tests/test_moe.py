"""SDAR-MoE: the MoE layer and the model against a plain per-token forward from the official tensor names."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffulex import SamplingParams
from diffulex.layers.moe import SparseMoeBlock
from diffulex.llm import LLM
from diffulex.models import load_model, resolve_model_class
from diffulex.models.sdar_moe import SDARMoeForCausalLM, is_moe_layer
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint
from tests.model_helpers import (
    _ids,
    _max_rel_error,
    block_causal,
    model_logits,
    qwen_reference_logits,
    swiglu_reference,
)

# ---- an independent reference: one token at a time through its top-k experts ----


def _moe_reference(h: torch.Tensor, w: dict[str, torch.Tensor], prefix: str, cfg: dict) -> torch.Tensor:
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        probs = (w[prefix + "gate.weight"] @ h[t]).float().softmax(-1)
        top_p, top_i = probs.topk(cfg["num_experts_per_tok"])
        if cfg["norm_topk_prob"]:
            top_p = top_p / top_p.sum()
        for p, e in zip(top_p.tolist(), top_i.tolist()):
            out[t] += p * swiglu_reference(h[t], w, f"{prefix}experts.{e}.", cfg)
    return out


def _sdar_moe_mlp(h: torch.Tensor, w: dict[str, torch.Tensor], prefix: str, cfg: dict) -> torch.Tensor:
    """A sparse layer where the checkpoint has a router (``mlp.gate``), else the dense SwiGLU."""
    return (
        _moe_reference(h, w, prefix, cfg)
        if prefix + "gate.weight" in w
        else swiglu_reference(h, w, prefix, cfg)
    )


def sdar_moe_reference_logits(path: Path, ids: torch.Tensor, block_size: int) -> torch.Tensor:
    return qwen_reference_logits(path, ids, block_causal(ids.shape[0], block_size), mlp=_sdar_moe_mlp)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"norm_topk_prob": False, "num_experts_per_tok": 1},
        {"num_hidden_layers": 3, "mlp_only_layers": [0]},
        {"decoder_sparse_step": 2, "tie_word_embeddings": True},
    ],
)
def test_forward_matches_plain_reference(tmp_path: Path, overrides: dict) -> None:
    path = write_tiny_checkpoint("sdar_moe", tmp_path / "m", seed=3, with_tokenizer=False, **overrides)
    model, spec = load_model(path, torch.float32, "cpu")
    assert isinstance(model, SDARMoeForCausalLM)
    ids = _ids(37, spec.mask_token_id)
    logits = model_logits(model, spec, ids)
    expected = sdar_moe_reference_logits(path, ids, spec.default_block_size)
    assert logits.shape == (37, spec.vocab_size)
    assert _max_rel_error(logits, expected) <= 1e-5


def test_sparse_layers_follow_the_config(tmp_path: Path) -> None:
    cfg = {"num_experts": 4, "decoder_sparse_step": 2, "mlp_only_layers": [3]}
    assert [is_moe_layer(cfg, i) for i in range(6)] == [False, True, False, False, False, True]
    assert not is_moe_layer({"num_experts": 0}, 0)
    path = write_tiny_checkpoint("sdar_moe", tmp_path / "m", with_tokenizer=False, mlp_only_layers=[1])
    names = load_file(str(path / "model.safetensors"))
    assert (
        "model.layers.0.mlp.gate.weight" in names and "model.layers.0.mlp.experts.3.down_proj.weight" in names
    )
    assert "model.layers.1.mlp.gate_proj.weight" in names and "model.layers.1.mlp.gate.weight" not in names


def test_official_names_resolve() -> None:
    assert resolve_model_class({"model_type": "sdar_moe"}) is SDARMoeForCausalLM
    assert resolve_model_class({"architectures": ["SDARMoeForCausalLM"]}) is SDARMoeForCausalLM
    spec = SDARMoeForCausalLM.spec_from_config(
        {"hidden_size": 2048, "head_dim": 128, "num_attention_heads": 32, "num_key_value_heads": 4,
         "num_hidden_layers": 48, "vocab_size": 151936, "eos_token_id": 151643}
    )  # fmt: skip
    assert (spec.family, spec.mask_token_id, spec.default_block_size) == ("sdar_moe", 151669, 4)
    assert (spec.native_attention, spec.default_strategy) == ("block_causal", "block_diffusion")


# ---- the MoE layer ----


def _random_block(seed: int = 0, **kwargs) -> SparseMoeBlock:
    torch.manual_seed(seed)
    block = SparseMoeBlock(32, 24, num_experts=6, top_k=kwargs.pop("top_k", 2), **kwargs)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape) / param.shape[-1] ** 0.5)
    return block


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_layer_is_batch_invariant(dtype: torch.dtype) -> None:
    """A token's output is bit-identical alone and inside a packed batch of any size."""
    block = _random_block().to(dtype)
    tokens = torch.randn(45, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    packed = block(tokens)
    for t in (0, 7, 44):
        assert torch.equal(block(tokens[t : t + 1])[0], packed[t])
    assert torch.equal(block(tokens[10:30]), packed[10:30])


def test_moe_layer_routing() -> None:
    block = _random_block(top_k=3, norm_topk_prob=True)
    tokens = torch.randn(9, 32)
    weights, experts = block.route(tokens)
    assert torch.allclose(weights.sum(-1), torch.ones(9))
    assert all(len(set(row)) == 3 for row in experts.tolist())
    raw, _ = _random_block(top_k=3, norm_topk_prob=False).route(tokens)
    assert (raw.sum(-1) < 1).all()
    with pytest.raises(ValueError, match="top_k"):
        SparseMoeBlock(8, 8, num_experts=2, top_k=3)


# ---- end to end ----


def test_generate_with_family_default_strategy(tmp_path: Path) -> None:
    path = write_tiny_checkpoint("sdar_moe", tmp_path / "m", seed=2)
    llm = LLM(str(path), device="cpu", dtype="float32")
    assert llm.engine.kv_cache is not None
    outputs = llm.generate(["Hi", [5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert [len(out.token_ids) for out in outputs] == [8, 8]
    assert all(out.finish_reason == "length" for out in outputs)
    assert isinstance(outputs[0].text, str)
    again = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert again.token_ids == outputs[1].token_ids  # greedy and batch-invariant: same tokens alone
    assert not llm.engine.has_unfinished() and llm.engine.kv_cache.is_whole()
