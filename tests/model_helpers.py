"""Helpers of the model tests: an independent plain-torch forward of each family straight from the
official tensor names (and its building blocks, shared with the MoE, LoRA, LLaDA2 and Fast-dLLM v2
tests), the engine model's logits on one sequence, test inputs, the relative error, and random weights
for a layer (the MoE kernel tests)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from diffulex.layers.context import set_context, single_sequence_context

# ---- an independent reference: plain torch straight from the official tensor names ----


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [heads, T, D], rotate-half layout."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def _attend(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """q [H, T, D], k/v [KVH, T, D], allowed [T, T] -> [T, H*D]."""
    heads, tokens, dim = q.shape
    k = k.repeat_interleave(heads // k.shape[0], dim=0)
    v = v.repeat_interleave(heads // v.shape[0], dim=0)
    scores = (q @ k.transpose(1, 2)) / dim**0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(tokens, heads * dim)


def _proj(h: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``h @ W.T (+ b)`` from the official tensors ``name.weight`` (and ``name.bias`` when stored)."""
    out = h @ w[name + ".weight"].T
    return out + w[name + ".bias"] if name + ".bias" in w else out


Projection = Callable[[torch.Tensor, str], torch.Tensor]


def llada_reference_logits(path: Path, ids: torch.Tensor, proj: Projection | None = None) -> torch.Tensor:
    """Plain bidirectional forward of the LLaDA layout from the official names. ``proj(h, name)`` computes
    the projection ``name`` (default: ``h @ W.T (+ b)`` from the checkpoint; the LoRA test adds the
    adapters' deltas)."""
    cfg = json.loads((path / "config.json").read_text())
    w = load_file(str(path / "model.safetensors"))
    if proj is None:

        def proj(h: torch.Tensor, name: str) -> torch.Tensor:
            return _proj(h, w, name)

    heads = cfg["n_heads"]
    kv_heads = cfg["n_kv_heads"] or heads
    head_dim = cfg["d_model"] // heads
    eps, theta, tokens = cfg["rms_norm_eps"], cfg["rope_theta"], ids.shape[0]
    positions = torch.arange(tokens)
    allowed = torch.ones(tokens, tokens, dtype=torch.bool)  # LLaDA: fully bidirectional
    x = w["model.transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = _rms(x, w[p + "attn_norm.weight"], eps)
        q = proj(h, p + "q_proj").view(tokens, heads, head_dim).transpose(0, 1)
        k = proj(h, p + "k_proj").view(tokens, kv_heads, head_dim).transpose(0, 1)
        v = proj(h, p + "v_proj").view(tokens, kv_heads, head_dim).transpose(0, 1)
        att = _attend(_rope(q, positions, theta), _rope(k, positions, theta), v, allowed)
        x = x + proj(att, p + "attn_out")
        h = _rms(x, w[p + "ff_norm.weight"], eps)
        x = x + proj(F.silu(proj(h, p + "ff_proj")) * proj(h, p + "up_proj"), p + "ff_out")
    x = _rms(x, w["model.transformer.ln_f.weight"], eps)
    if cfg.get("weight_tying"):
        return x @ w["model.transformer.wte.weight"].T
    return proj(x, "model.transformer.ff_out")


def swiglu_reference(h: torch.Tensor, w: dict[str, torch.Tensor], prefix: str, cfg: dict) -> torch.Tensor:
    """The dense Qwen MLP at ``prefix`` (``...mlp.``): ``down(silu(gate(h)) * up(h))``."""
    return (F.silu(h @ w[prefix + "gate_proj.weight"].T) * (h @ w[prefix + "up_proj.weight"].T)) @ w[
        prefix + "down_proj.weight"
    ].T


QwenMLP = Callable[[torch.Tensor, dict[str, torch.Tensor], str, dict], torch.Tensor]


def qwen_reference_logits(
    path: Path, ids: torch.Tensor, allowed: torch.Tensor, mlp: QwenMLP = swiglu_reference
) -> torch.Tensor:
    """Plain forward of the Qwen layouts from the official names, attention pattern ``allowed [query,
    key]``: SDAR (Qwen3: per-head q/k RMSNorm, ``head_dim`` in the config), Dream and Fast-dLLM v2
    (Qwen2.5: biased q/k/v, ``head_dim = hidden // heads``). Unshifted: row i is the head applied to
    hidden i (the shifted families read position i from row i - 1). ``mlp(h, w, "model.layers.i.mlp.",
    cfg)`` computes each layer's MLP (the MoE families pass their own)."""
    cfg = json.loads((path / "config.json").read_text())
    w = load_file(str(path / "model.safetensors"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    eps, theta, tokens = cfg["rms_norm_eps"], cfg["rope_theta"], ids.shape[0]
    positions = torch.arange(tokens)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = _proj(h, w, p + "self_attn.q_proj").view(tokens, heads, head_dim)
        k = _proj(h, w, p + "self_attn.k_proj").view(tokens, kv_heads, head_dim)
        v = _proj(h, w, p + "self_attn.v_proj").view(tokens, kv_heads, head_dim).transpose(0, 1)
        if p + "self_attn.q_norm.weight" in w:  # Qwen3 / SDAR: per-head norms before RoPE
            q, k = (
                _rms(q, w[p + "self_attn.q_norm.weight"], eps),
                _rms(k, w[p + "self_attn.k_norm.weight"], eps),
            )
        q, k = q.transpose(0, 1), k.transpose(0, 1)
        att = _attend(_rope(q, positions, theta), _rope(k, positions, theta), v, allowed)
        x = x + _proj(att, w, p + "self_attn.o_proj")
        x = x + mlp(_rms(x, w[p + "post_attention_layernorm.weight"], eps), w, p + "mlp.", cfg)
    x = _rms(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


def block_causal(tokens: int, block_size: int) -> torch.Tensor:
    """``[query, key]``: a query sees its own block and every earlier one (SDAR, Fast-dLLM v2)."""
    block = torch.arange(tokens) // block_size
    return block.unsqueeze(1) >= block.unsqueeze(0)


def sdar_reference_logits(path: Path, ids: torch.Tensor, block_size: int) -> torch.Tensor:
    return qwen_reference_logits(path, ids, block_causal(ids.shape[0], block_size))


def dream_reference_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Dream: bidirectional."""
    return qwen_reference_logits(path, ids, torch.ones(ids.shape[0], ids.shape[0], dtype=torch.bool))


# ---- helpers ----


def _block_ids(spec, num_tokens: int) -> torch.Tensor | None:
    if spec.native_attention == "block_causal":
        return torch.arange(num_tokens) // spec.default_block_size
    return None


def model_logits(model, spec, ids: torch.Tensor) -> torch.Tensor:
    set_context(single_sequence_context(ids.shape[0], "cpu", _block_ids(spec, ids.shape[0])))
    try:
        return model.compute_logits(model(ids, torch.arange(ids.shape[0])))
    finally:
        set_context(None)


def _ids(num_tokens: int, mask_id: int, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 97, (num_tokens,), generator=torch.Generator().manual_seed(seed))
    ids[1::3] = mask_id  # masked positions, as in a diffusion step
    return ids


def _max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def _randomised(block: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
    return block
