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
from diffulex.layers.vocab_parallel import VocabParallelEmbedding
from diffulex.models.qwen_lm import QwenStyleLM, qwen_spec
from diffulex.models.registry import (
    ModelSpec,
    register_model,
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
        self.embed_tokens = VocabParallelEmbedding(vocab_size, hidden_size)
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
        return qwen_spec(
            cls.family,
            cfg,
            head_dim=_head_dim(cfg),
            vocab_size=int(cfg["vocab_size"]),
            mask_token_id=SDAR_MASK_TOKEN_ID,
            eos_token_id=SDAR_ENDOFTEXT_ID,
            pad_token_id=None,
            shift_logits=False,
            native_attention="block_causal",
            default_strategy="block_diffusion",
            default_block_size=int(cfg.get("block_size") or SDAR_DEFAULT_BLOCK_SIZE),
            vanilla_schedule="llada",  # unshifted, one-block-at-a-time schedule if run with `vanilla`
            im_end=(SDAR_ENDOFTEXT_ID, SDAR_IM_END_ID),
        )
