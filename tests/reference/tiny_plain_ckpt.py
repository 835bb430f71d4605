"""Minimal writer of tiny random LLaDA-layout and SDAR-layout checkpoints (official HF names and config
fields), for the reference-loop sanity tests. Not a general checkpoint builder.

Tiny shape: hidden 32, 2 layers, 4 heads, vocab 64, ``mask_token_id`` 63 in config.json. Embedding and
head use std ``head_std`` (0.2 by default) so logits are peaky enough; the head row of the mask id is zeroed
so that a random model (practically) never predicts the mask token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB = 64
MASK_ID = 63
EOS_ID = 62
HIDDEN = 32
LAYERS = 2
HEADS = 4
MLP = 64


def _normal(gen: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _norm_weight(gen: torch.Generator, n: int) -> torch.Tensor:
    return 1.0 + _normal(gen, n, std=0.1)


def _save(path: Path, tensors: dict[str, torch.Tensor], config: dict, shards: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if shards <= 1:
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return path


def write_tiny_llada(
    path, seed: int = 0, n_kv_heads: int = HEADS, head_std: float = 0.2, std: float = 0.2, shards: int = 1
) -> Path:
    """LLaDA layout (config fields of LLaDA-8B's config.json; names of modeling_llada.py)."""
    gen = torch.Generator().manual_seed(seed)
    head_dim = HIDDEN // HEADS
    config = {
        "activation_type": "silu",
        "alibi": False,
        "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0,
        "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": HIDDEN,
        "embedding_dropout": 0.0,
        "embedding_size": VOCAB,
        "eos_token_id": EOS_ID,
        "flash_attention": False,
        "include_bias": False,
        "include_qkv_bias": False,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "mask_token_id": MASK_ID,
        "max_sequence_length": 4096,
        "mlp_hidden_size": MLP,
        "mlp_ratio": 4,
        "model_type": "llada",
        "multi_query_attention": None,
        "n_heads": HEADS,
        "n_kv_heads": n_kv_heads,
        "n_layers": LAYERS,
        "pad_token_id": EOS_ID,
        "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "use_cache": False,
        "vocab_size": VOCAB,
        "weight_tying": False,
    }
    t: dict[str, torch.Tensor] = {}
    p = "model.transformer."
    t[p + "wte.weight"] = _normal(gen, VOCAB, HIDDEN, std=head_std)
    for i in range(LAYERS):
        b = f"{p}blocks.{i}."
        t[b + "attn_norm.weight"] = _norm_weight(gen, HIDDEN)
        t[b + "q_proj.weight"] = _normal(gen, HIDDEN, HIDDEN, std=std)
        t[b + "k_proj.weight"] = _normal(gen, n_kv_heads * head_dim, HIDDEN, std=std)
        t[b + "v_proj.weight"] = _normal(gen, n_kv_heads * head_dim, HIDDEN, std=std)
        t[b + "attn_out.weight"] = _normal(gen, HIDDEN, HIDDEN, std=std)
        t[b + "ff_norm.weight"] = _norm_weight(gen, HIDDEN)
        t[b + "ff_proj.weight"] = _normal(gen, MLP, HIDDEN, std=std)
        t[b + "up_proj.weight"] = _normal(gen, MLP, HIDDEN, std=std)
        t[b + "ff_out.weight"] = _normal(gen, HIDDEN, MLP, std=std)
    t[p + "ln_f.weight"] = _norm_weight(gen, HIDDEN)
    head = _normal(gen, VOCAB, HIDDEN, std=head_std)
    head[MASK_ID] = 0.0
    t[p + "ff_out.weight"] = head
    return _save(Path(path), t, config, shards)


def write_tiny_sdar(
    path,
    seed: int = 0,
    n_kv_heads: int = 2,
    head_dim: int = 16,
    head_std: float = 0.2,
    std: float = 0.2,
    tie: bool = False,
    shards: int = 1,
) -> Path:
    """SDAR layout (config fields of SDAR-4B-Chat's config.json; Qwen3 names). head_dim 16 != 32/4 on purpose."""
    gen = torch.Generator().manual_seed(seed)
    config = {
        "architectures": ["SDARForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": EOS_ID,
        "eos_token_id": EOS_ID,
        "block_size": 4,
        "mask_token_id": MASK_ID,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": MLP,
        "max_position_embeddings": 4096,
        "model_type": "sdar",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": n_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "tie_word_embeddings": tie,
        "torch_dtype": "float32",
        "use_cache": False,
        "vocab_size": VOCAB,
    }
    t: dict[str, torch.Tensor] = {}
    embed = _normal(gen, VOCAB, HIDDEN, std=head_std)
    for i in range(LAYERS):
        b = f"model.layers.{i}."
        t[b + "input_layernorm.weight"] = _norm_weight(gen, HIDDEN)
        t[b + "self_attn.q_proj.weight"] = _normal(gen, HEADS * head_dim, HIDDEN, std=std)
        t[b + "self_attn.k_proj.weight"] = _normal(gen, n_kv_heads * head_dim, HIDDEN, std=std)
        t[b + "self_attn.v_proj.weight"] = _normal(gen, n_kv_heads * head_dim, HIDDEN, std=std)
        t[b + "self_attn.o_proj.weight"] = _normal(gen, HIDDEN, HEADS * head_dim, std=std)
        t[b + "self_attn.q_norm.weight"] = _norm_weight(gen, head_dim)
        t[b + "self_attn.k_norm.weight"] = _norm_weight(gen, head_dim)
        t[b + "post_attention_layernorm.weight"] = _norm_weight(gen, HIDDEN)
        t[b + "mlp.gate_proj.weight"] = _normal(gen, MLP, HIDDEN, std=std)
        t[b + "mlp.up_proj.weight"] = _normal(gen, MLP, HIDDEN, std=std)
        t[b + "mlp.down_proj.weight"] = _normal(gen, HIDDEN, MLP, std=std)
    t["model.norm.weight"] = _norm_weight(gen, HIDDEN)
    if tie:
        embed[MASK_ID] = 0.0  # the tied head row of the mask id is the embedding row
    else:
        head = _normal(gen, VOCAB, HIDDEN, std=head_std)
        head[MASK_ID] = 0.0
        t["lm_head.weight"] = head
    t["model.embed_tokens.weight"] = embed
    return _save(Path(path), t, config, shards)
