"""LLaDA2.0-MoE: the grouped sigmoid router and the model against a plain per-token forward from the
official tensor names (``modeling_llada2_moe.py`` of inclusionAI/LLaDA2.0-mini)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffulex import SamplingParams
from diffulex.layers.moe import GroupedSigmoidMoeBlock, GroupLimitedSigmoidRouter
from diffulex.llm import LLM
from diffulex.models import load_model, resolve_model_class
from diffulex.models.llada2_moe import LLaDA2Model, LLaDA2MoeForCausalLM, is_moe_layer
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint
from tests.model_helpers import _attend, _ids, _max_rel_error, _proj, _rms, _rope, model_logits

# ---- an independent reference: one token at a time ----


def _swiglu(h: torch.Tensor, w: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    gate = h @ w[prefix + "gate_proj.weight"].T
    return (F.silu(gate) * (h @ w[prefix + "up_proj.weight"].T)) @ w[prefix + "down_proj.weight"].T


def _route_one(
    h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, cfg: dict
) -> list[tuple[float, int]]:
    scores = torch.sigmoid(weight.float() @ h.float())
    biased = scores + bias.float()
    per_group = cfg["num_experts"] // cfg["n_group"]
    group_scores = [
        sorted(biased[g * per_group : (g + 1) * per_group].tolist())[-2:] for g in range(cfg["n_group"])
    ]
    best = sorted(range(cfg["n_group"]), key=lambda g: -sum(group_scores[g]))[: cfg["topk_group"]]
    allowed = [e for e in range(cfg["num_experts"]) if e // per_group in best]
    chosen = sorted(allowed, key=lambda e: -biased[e].item())[: cfg["num_experts_per_tok"]]
    weights = [scores[e].item() for e in chosen]
    total = sum(weights) if len(chosen) > 1 else 1.0
    return [(wt / total * cfg["routed_scaling_factor"], e) for wt, e in zip(weights, chosen)]


def _moe_reference(h: torch.Tensor, w: dict[str, torch.Tensor], prefix: str, cfg: dict) -> torch.Tensor:
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for weight, e in _route_one(h[t], w[prefix + "gate.weight"], w[prefix + "gate.expert_bias"], cfg):
            out[t] += weight * _swiglu(h[t], w, f"{prefix}experts.{e}.")
        if prefix + "shared_experts.gate_proj.weight" in w:
            out[t] += _swiglu(h[t], w, prefix + "shared_experts.")
    return out


def _partial_rope(x: torch.Tensor, positions: torch.Tensor, theta: float, rotary_dim: int) -> torch.Tensor:
    return torch.cat([_rope(x[..., :rotary_dim], positions, theta), x[..., rotary_dim:]], dim=-1)


def llada2_reference_logits(path: Path, ids: torch.Tensor, block_size: int) -> torch.Tensor:
    cfg = json.loads((path / "config.json").read_text())
    w = load_file(str(path / "model.safetensors"))
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta, tokens = cfg["rms_norm_eps"], cfg["rope_theta"], ids.shape[0]
    rotary_dim = int(head_dim * cfg["partial_rotary_factor"])
    positions = torch.arange(tokens)
    block = positions // block_size
    allowed = block.unsqueeze(0) <= block.unsqueeze(1)
    x = w["model.word_embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        qkv = _proj(h, w, p + "attention.query_key_value").view(tokens, heads + 2 * kv_heads, head_dim)
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
        if cfg["use_qk_norm"]:
            q = _rms(q, w[p + "attention.query_layernorm.weight"], eps)
            k = _rms(k, w[p + "attention.key_layernorm.weight"], eps)
        q = _partial_rope(q.transpose(0, 1), positions, theta, rotary_dim)
        k = _partial_rope(k.transpose(0, 1), positions, theta, rotary_dim)
        x = x + _proj(_attend(q, k, v.transpose(0, 1), allowed), w, p + "attention.dense")
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        if p + "mlp.gate.weight" in w:
            x = x + _moe_reference(h, w, p + "mlp.", cfg)
        else:
            x = x + _swiglu(h, w, p + "mlp.")
    x = _rms(x, w["model.norm.weight"], eps)
    head = w["model.word_embeddings.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"topk_group": 2, "num_experts_per_tok": 3, "num_hidden_layers": 3},
        {"num_experts_per_tok": 1, "num_shared_experts": 0, "use_bias": True, "use_qkv_bias": True},
        {"n_group": 4, "topk_group": 2, "first_k_dense_replace": 0, "tie_word_embeddings": True},
        {"use_qk_norm": False, "partial_rotary_factor": 1.0},
    ],
)
def test_forward_matches_plain_reference(tmp_path: Path, overrides: dict) -> None:
    path = write_tiny_checkpoint("llada2_moe", tmp_path / "m", seed=3, with_tokenizer=False, **overrides)
    model, spec = load_model(path, torch.float32, "cpu")
    assert isinstance(model, LLaDA2MoeForCausalLM)
    ids = _ids(37, spec.mask_token_id)
    logits = model_logits(model, spec, ids)
    expected = llada2_reference_logits(path, ids, spec.default_block_size)  # 37 tokens: two blocks of 32
    assert logits.shape == (37, spec.vocab_size)
    assert _max_rel_error(logits, expected) <= 1e-5


def test_layers_follow_first_k_dense_replace(tmp_path: Path) -> None:
    assert [is_moe_layer({"num_experts": 4, "first_k_dense_replace": 2}, i) for i in range(4)] == [
        False,
        False,
        True,
        True,
    ]
    names = load_file(
        str(write_tiny_checkpoint("llada2_moe", tmp_path / "m", with_tokenizer=False) / "model.safetensors")
    )
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.0.mlp.gate.weight" not in names
    assert {"model.layers.1.mlp.gate.expert_bias", "model.layers.1.mlp.shared_experts.down_proj.weight",
            "model.layers.1.mlp.experts.7.up_proj.weight", "model.layers.1.attention.query_key_value.weight",
            "model.layers.1.attention.query_layernorm.weight"} <= set(names)  # fmt: skip


def test_official_names_and_spec() -> None:
    assert resolve_model_class({"model_type": "llada2_moe"}) is LLaDA2MoeForCausalLM
    assert resolve_model_class({"architectures": ["LLaDA2MoeModelLM"]}) is LLaDA2MoeForCausalLM
    spec = LLaDA2MoeForCausalLM.spec_from_config(
        {"hidden_size": 2048, "head_dim": 128, "num_attention_heads": 16, "num_key_value_heads": 4,
         "num_hidden_layers": 20, "vocab_size": 157184, "pad_token_id": 156892}
    )  # fmt: skip
    assert (spec.family, spec.mask_token_id, spec.eos_token_ids) == ("llada2_moe", 156895, (156892,))
    assert (spec.native_attention, spec.default_strategy, spec.default_block_size) == (
        "block_causal",
        "block_diffusion",
        32,
    )
    assert not spec.shift_logits


def test_missing_config_keys_take_the_config_class_defaults() -> None:
    """A config.json without them gets LLaDA2MoeConfig's defaults (the published configs set all of
    them: rms_norm_eps 1e-6, rope_theta 600000, n_group 8, topk_group 4, routed_scaling_factor 2.5)."""
    cfg = {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
           "num_hidden_layers": 2, "vocab_size": 64, "intermediate_size": 64, "moe_intermediate_size": 16,
           "num_experts": 16, "num_experts_per_tok": 2, "first_k_dense_replace": 1}  # fmt: skip
    layer = LLaDA2Model(cfg).layers[1]
    router = layer.mlp.gate
    assert (router.n_group, router.topk_group, router.routed_scaling_factor) == (8, 4, 2.5)
    assert layer.attention.rotary_emb.base == 10000.0
    assert layer.input_layernorm.eps == layer.attention.query_layernorm.eps == 1e-5
    assert layer.attention.dense.bias is not None  # use_bias defaults to True
    published = LLaDA2Model(cfg | {"rms_norm_eps": 1e-6, "rope_theta": 600000, "n_group": 4, "topk_group": 2})
    assert published.layers[1].mlp.gate.n_group == 4 and published.layers[1].input_layernorm.eps == 1e-6


# ---- the router ----


def _random_router(n_group: int, topk_group: int, top_k: int, seed: int = 0) -> GroupLimitedSigmoidRouter:
    torch.manual_seed(seed)
    router = GroupLimitedSigmoidRouter(32, 16, top_k, n_group, topk_group, 2.5)
    with torch.no_grad():
        router.weight.copy_(torch.randn(16, 32) / 32**0.5)
        router.expert_bias.copy_(0.3 * torch.randn(16))
    return router


@pytest.mark.parametrize("n_group,topk_group,top_k", [(4, 1, 2), (4, 2, 4), (8, 3, 5), (2, 2, 3)])
def test_routing_stays_inside_the_top_groups(n_group: int, topk_group: int, top_k: int) -> None:
    router = _random_router(n_group, topk_group, top_k)
    tokens = torch.randn(64, 32, generator=torch.Generator().manual_seed(1))
    weights, experts = router(tokens)
    scores = torch.sigmoid(tokens @ router.weight.T)
    biased = scores + router.expert_bias
    group_scores = biased.view(64, n_group, -1).topk(2, dim=-1)[0].sum(-1)
    top_groups = group_scores.topk(topk_group, dim=-1)[1]
    per_group = 16 // n_group
    for t in range(64):
        allowed = set(top_groups[t].tolist())
        assert {e // per_group for e in experts[t].tolist()} <= allowed
        assert len(set(experts[t].tolist())) == top_k
        # Within the allowed groups, the chosen experts are the best by biased score.
        candidates = [e for e in range(16) if e // per_group in allowed]
        best = sorted(candidates, key=lambda e: -biased[t, e].item())[:top_k]
        assert set(best) == set(experts[t].tolist())
    # Weights: un-biased scores, normalised, times routed_scaling_factor.
    assert torch.allclose(weights.sum(-1), torch.full((64,), 2.5))
    picked = scores.gather(1, experts)
    assert torch.allclose(weights, picked / picked.sum(-1, keepdim=True) * 2.5)


def test_router_rejects_bad_groups() -> None:
    with pytest.raises(ValueError, match="n_group"):
        GroupLimitedSigmoidRouter(8, 6, 2, 4, 1, 1.0)
    with pytest.raises(ValueError, match="top_k"):
        GroupLimitedSigmoidRouter(8, 8, 5, 2, 1, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_block_is_batch_invariant(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    block = GroupedSigmoidMoeBlock(32, 24, 8, 2, 2, 1, 2.5, num_shared_experts=1)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape) / param.shape[-1] ** 0.5)
    block = block.to(dtype)
    tokens = torch.randn(45, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    packed = block(tokens)
    for t in (0, 7, 44):
        assert torch.equal(block(tokens[t : t + 1])[0], packed[t])
    assert torch.equal(block(tokens[10:30]), packed[10:30])


# ---- end to end ----


def test_generate_with_family_default_strategy(tmp_path: Path) -> None:
    path = write_tiny_checkpoint("llada2_moe", tmp_path / "m", seed=2)
    llm = LLM(str(path), device="cpu", dtype="float32")
    outputs = llm.generate(["Hi", [5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))
    assert [len(out.token_ids) for out in outputs] == [8, 8]
    assert all(out.finish_reason == "length" for out in outputs)
    assert isinstance(outputs[0].text, str)
    again = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    assert again.token_ids == outputs[1].token_ids
    assert not llm.engine.has_unfinished() and llm.engine.kv_cache.is_whole()
