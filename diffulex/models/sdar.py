"""SDAR (JetLM/SDAR-1.7B/4B/8B-Chat): block diffusion on the Qwen3 architecture.

The official checkpoints (``model_type`` "sdar", architectures ``SDARForCausalLM``) use Qwen3's layout and
names: ``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` with per-head RMSNorms
``q_norm``/``k_norm`` applied to q and k before RoPE, ``mlp.{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm``, ``model.norm`` and ``lm_head`` (tied to the embedding with
``tie_word_embeddings``). Our modules carry exactly those names, so the name map is the identity, except
that q/k/v are merged into one ``self_attn.qkv_proj`` and gate/up into one ``mlp.gate_up_proj``
(``MergedLinear``: fewer, wider GEMMs); the loader sees those under the unmerged official names.
Attention is block-causal (a token sees its own block and every earlier one); logits are not shifted.
The released configs carry no mask id (some fine-tuning configs add ``mask_token_id`` and ``block_size``,
which override the family defaults below).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffulex.layers.norm import RMSNorm
from diffulex.layers.qwen_blocks import PreNormDecoderLayer, QwenAttention, SwiGLUMLP, run_decoder_stack
from diffulex.layers.rotary import RotaryEmbedding
from diffulex.models.qwen_lm import QwenStyleLM
from diffulex.models.registry import (
    ModelSpec,
    merge_token_ids,
    register_model,
    token_ids,
)

# Ids of the official (Qwen3-derived) SDAR tokenizer, used when the config leaves them out.
SDAR_MASK_TOKEN_ID = 151669  # <|MASK|>
SDAR_ENDOFTEXT_ID = 151643  # <|endoftext|>: eos and pad of the config
SDAR_IM_END_ID = 151645  # <|im_end|>: chat turns end with it (generation_config lists it first)
SDAR_DEFAULT_BLOCK_SIZE = 4


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))


def _check_supported(cfg: dict[str, Any]) -> None:
    """Refuse options that would change the computation in ways this module does not implement."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(
            f"SDAR config hidden_act={cfg['hidden_act']!r} is not supported (only 'silu')"
        )
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
        raise NotImplementedError(f"SDAR config rope_scaling={rope_scaling!r} is not supported")
    if cfg.get("use_sliding_window"):
        raise NotImplementedError("SDAR config use_sliding_window=true is not supported")


def sdar_attention(cfg: dict[str, Any], rotary: RotaryEmbedding) -> QwenAttention:
    """Qwen3 attention: per-head q/k RMSNorm before RoPE, q/k/v/o biased with ``attention_bias``."""
    num_heads = int(cfg["num_attention_heads"])
    bias = bool(cfg.get("attention_bias", False))
    return QwenAttention(
        int(cfg["hidden_size"]),
        num_heads,
        int(cfg.get("num_key_value_heads") or num_heads),
        _head_dim(cfg),
        rotary,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm=True,
        eps=float(cfg.get("rms_norm_eps", 1e-6)),
    )


class SDARModel(nn.Module):
    """Embedding, decoder layers and final norm: token ids and positions in, final hidden states out."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        hidden_size, vocab_size = int(cfg["hidden_size"]), int(cfg["vocab_size"])
        # `_weight` skips nn.Embedding's random init: the checkpoint overwrites it anyway.
        self.embed_tokens = nn.Embedding(
            vocab_size, hidden_size, _weight=torch.empty(vocab_size, hidden_size)
        )
        head_dim = _head_dim(cfg)
        rotary = RotaryEmbedding(head_dim, head_dim, float(cfg.get("rope_theta", 1_000_000.0)))
        eps = float(cfg.get("rms_norm_eps", 1e-6))
        self.layers = nn.ModuleList(
            PreNormDecoderLayer(sdar_attention(cfg, rotary), self.build_mlp(cfg, index), hidden_size, eps)
            for index in range(int(cfg["num_hidden_layers"]))
        )
        self.norm = RMSNorm(hidden_size, eps)

    @staticmethod
    def build_mlp(cfg: dict[str, Any], layer_index: int) -> nn.Module:
        """The MLP of decoder layer ``layer_index``: SDAR's dense SwiGLU (SDAR-MoE overrides it)."""
        return SwiGLUMLP(int(cfg["hidden_size"]), int(cfg["intermediate_size"]))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return run_decoder_stack(self.layers, self.norm, self.embed_tokens(input_ids), positions)


@register_model("sdar", "SDARForCausalLM")
class SDARForCausalLM(QwenStyleLM):
    """The SDAR language model: ``forward`` gives hidden states of the packed step, ``compute_logits`` logits.

    Owns the model and its LM head (tied to the embedding when ``tie_word_embeddings``; the loader calls
    ``tie_weights`` before loading). ``spec`` holds the engine-facing facts.
    """

    family = "sdar"

    def check_config(self, hf_config: dict[str, Any]) -> None:
        _check_supported(hf_config)

    def build_model(self, hf_config: dict[str, Any]) -> nn.Module:
        return SDARModel(hf_config)

    @classmethod
    def spec_from_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        """SDAR's engine-facing facts from its HF config (official ids where the config has none)."""
        generation = cfg.get("generation_config", {})
        eos_ids = token_ids(cfg.get("eos_token_id")) or (SDAR_ENDOFTEXT_ID,)
        vocab_size = int(cfg["vocab_size"])
        # Chat turns end with <|im_end|>: the official generation_config lists it, add it when that is absent.
        official_im_end = (
            (SDAR_IM_END_ID,) if SDAR_ENDOFTEXT_ID in eos_ids and vocab_size > SDAR_IM_END_ID else ()
        )
        mask_id = cfg.get("mask_token_id")
        pad_id = cfg.get("pad_token_id", generation.get("pad_token_id"))
        return ModelSpec(
            family=cls.family,
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            head_dim=_head_dim(cfg),
            vocab_size=vocab_size,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            mask_token_id=int(mask_id) if mask_id is not None else SDAR_MASK_TOKEN_ID,
            eos_token_ids=merge_token_ids(
                eos_ids, token_ids(generation.get("eos_token_id")), official_im_end
            ),
            pad_token_id=int(pad_id) if pad_id is not None else eos_ids[0],
            shift_logits=False,
            native_attention="block_causal",
            default_strategy="block_diffusion",
            default_block_size=int(cfg.get("block_size") or SDAR_DEFAULT_BLOCK_SIZE),
            vanilla_schedule="llada",  # unshifted, one-block-at-a-time schedule if run with `vanilla`
        )
