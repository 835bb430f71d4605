"""LLaDA2.0 (inclusionAI/LLaDA2.0-mini, -flash): block diffusion on a Ling/Bailing-style MoE.

The checkpoints (``model_type`` "llada2_moe", architectures ``LLaDA2MoeModelLM``) name their tensors
``model.word_embeddings``, ``model.layers.{i}.attention.query_key_value`` (q, k and v fused, split by heads:
``num_heads + 2 * num_key_value_heads`` heads of ``head_dim``; bias with ``use_qkv_bias``),
``attention.query_layernorm``/``key_layernorm`` (per-head RMSNorms before RoPE, with ``use_qk_norm``),
``attention.dense`` (bias with ``use_bias``, True by the config class's default), ``input_layernorm``,
``post_attention_layernorm``, ``model.norm`` and ``lm_head``. RoPE rotates the first
``head_dim * partial_rotary_factor`` channels of each head (rotate-half). Layers before
``first_k_dense_replace`` keep a dense ``mlp.{gate,up,down}_proj`` (``intermediate_size``); later ones are
sparse: ``mlp.gate.weight``/``mlp.gate.expert_bias`` (sigmoid, group-limited routing,
``diffulex.layers.moe.GroupedSigmoidMoeBlock``), ``mlp.experts.{e}.*`` and ``mlp.shared_experts.*``.
Engine-facing facts: block-causal attention, no logit shift, mask ``<|mask|>`` 156895, eos
``<|endoftext|>`` 156892, block size 32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from diffulex.layers.attention import Attention
from diffulex.layers.linear import ColumnParallelLinear, RowParallelLinear
from diffulex.layers.moe import GroupedSigmoidMoeBlock
from diffulex.layers.norm import RMSNorm
from diffulex.layers.parallel_state import split_heads
from diffulex.layers.qwen_blocks import PreNormDecoderLayer, SwiGLUMLP, run_decoder_stack
from diffulex.layers.rotary import RotaryEmbedding
from diffulex.layers.vocab_parallel import VocabParallelEmbedding
from diffulex.models.qwen_lm import QwenStyleLM, qwen_spec
from diffulex.models.registry import ModelSpec, register_model

LLADA2_MASK_TOKEN_ID = 156895  # <|mask|>
LLADA2_EOS_TOKEN_ID = 156892  # <|endoftext|>: eos and pad
LLADA2_DEFAULT_BLOCK_SIZE = 32
# LLaDA2MoeConfig's defaults for keys a config.json may leave out (the published configs set them all).
CONFIG_DEFAULTS = {
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
}


def _setting(cfg: dict[str, Any], key: str) -> Any:
    """``cfg[key]``, or LLaDA2MoeConfig's default when the key is absent or null."""
    value = cfg.get(key)
    return CONFIG_DEFAULTS[key] if value is None else value


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]))


def _rotary_dim(cfg: dict[str, Any]) -> int:
    return int(_head_dim(cfg) * float(cfg.get("partial_rotary_factor", 0.5)))


def is_moe_layer(cfg: dict[str, Any], layer_index: int) -> bool:
    """Whether decoder layer ``layer_index`` is sparse (the official rule)."""
    return bool(cfg.get("num_experts")) and layer_index >= int(cfg.get("first_k_dense_replace") or 0)


def _check_supported(cfg: dict[str, Any]) -> None:
    if cfg.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"LLaDA2 config hidden_act={cfg['hidden_act']!r} is not supported")
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
        raise NotImplementedError(f"LLaDA2 config rope_scaling={rope_scaling!r} is not supported")
    if cfg.get("norm_head"):
        raise NotImplementedError("LLaDA2 config norm_head=true is not supported")
    if cfg.get("score_function", "sigmoid") != "sigmoid":
        raise NotImplementedError(f"LLaDA2 config score_function={cfg['score_function']!r} is not supported")


class LLaDA2Attention(nn.Module):
    """Fused ``query_key_value``, optional per-head q/k RMSNorm, partial RoPE, paged attention, ``dense``."""

    def __init__(self, cfg: dict[str, Any], rotary: RotaryEmbedding):
        super().__init__()
        hidden_size = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        self.head_dim = head_dim = _head_dim(cfg)
        split = split_heads(num_heads, num_kv_heads)  # this tensor-parallel rank's heads (all at one rank)
        self.num_heads, self.num_kv_heads = split.num_heads, split.num_kv_heads
        eps = float(_setting(cfg, "rms_norm_eps"))
        # The fused tensor's rows are all q heads, then all k heads, then all v heads: a rank keeps its
        # range of each.
        k_base, v_base = num_heads * head_dim, (num_heads + num_kv_heads) * head_dim
        kv_rows = split.num_kv_heads * head_dim
        self.query_key_value = ColumnParallelLinear(
            hidden_size,
            (num_heads + 2 * num_kv_heads) * head_dim,
            bool(cfg.get("use_qkv_bias", False)),
            segments=[
                (split.q_start * head_dim, split.num_heads * head_dim),
                (k_base + split.kv_start * head_dim, kv_rows),
                (v_base + split.kv_start * head_dim, kv_rows),
            ],
        )
        self.dense = RowParallelLinear(num_heads * head_dim, hidden_size, bool(cfg.get("use_bias", True)))
        self.use_qk_norm = bool(cfg.get("use_qk_norm", True))
        if self.use_qk_norm:
            self.query_layernorm = RMSNorm(self.head_dim, eps)
            self.key_layernorm = RMSNorm(self.head_dim, eps)
        self.rotary_emb = rotary
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.query_key_value(hidden).view(
            num_tokens, self.num_heads + 2 * self.num_kv_heads, self.head_dim
        )
        query, key, value = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.use_qk_norm:
            query, key = self.query_layernorm(query), self.key_layernorm(key)
        query, key = self.rotary_emb(positions, query, key)
        attended = self.attn(query, key, value.contiguous())
        return self.dense(attended.reshape(num_tokens, self.num_heads * self.head_dim))


def llada2_mlp(cfg: dict[str, Any], layer_index: int) -> nn.Module:
    """A dense SwiGLU (first layers) or the grouped sigmoid MoE (the official gate/up/down names either way)."""
    hidden_size = int(cfg["hidden_size"])
    if is_moe_layer(cfg, layer_index):
        return GroupedSigmoidMoeBlock(
            hidden_size,
            int(cfg["moe_intermediate_size"]),
            int(cfg["num_experts"]),
            int(cfg["num_experts_per_tok"]),
            int(_setting(cfg, "n_group")),
            int(_setting(cfg, "topk_group")),
            float(_setting(cfg, "routed_scaling_factor")),
            int(cfg.get("num_shared_experts") or 0),
        )
    return SwiGLUMLP(hidden_size, int(cfg["intermediate_size"]))


class LLaDA2Model(nn.Module):
    """``word_embeddings``, decoder layers and final ``norm``."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        hidden_size, vocab_size = int(cfg["hidden_size"]), int(cfg["vocab_size"])
        self.word_embeddings = VocabParallelEmbedding(vocab_size, hidden_size)
        theta = float(_setting(cfg, "rope_theta"))
        rotary = RotaryEmbedding(_head_dim(cfg), _rotary_dim(cfg), theta)
        eps = float(_setting(cfg, "rms_norm_eps"))
        self.layers = nn.ModuleList(
            PreNormDecoderLayer(
                LLaDA2Attention(cfg, rotary), llada2_mlp(cfg, index), hidden_size, eps, attn_name="attention"
            )
            for index in range(int(cfg["num_hidden_layers"]))
        )
        self.norm = RMSNorm(hidden_size, eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return run_decoder_stack(self.layers, self.norm, self.word_embeddings(input_ids), positions)


@register_model("llada2_moe", "LLaDA2MoeModelLM")
class LLaDA2MoeForCausalLM(QwenStyleLM):
    """The LLaDA2.0 MoE language model; official names kept module for module (identity name map)."""

    family = "llada2_moe"

    def check_config(self, hf_config: dict[str, Any]) -> None:
        _check_supported(hf_config)
        if hf_config.get("num_experts"):
            for field in ("moe_intermediate_size", "num_experts_per_tok"):
                if field not in hf_config:
                    raise ValueError(f"LLaDA2 config has num_experts but no {field}")

    def build_model(self, hf_config: dict[str, Any]) -> nn.Module:
        return LLaDA2Model(hf_config)

    @classmethod
    def spec_from_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        return qwen_spec(
            cls.family,
            cfg,
            head_dim=_head_dim(cfg),
            vocab_size=int(cfg["vocab_size"]),
            mask_token_id=LLADA2_MASK_TOKEN_ID,
            eos_token_id=LLADA2_EOS_TOKEN_ID,
            pad_token_id=None,
            shift_logits=False,
            native_attention="block_causal",
            default_strategy="block_diffusion",
            default_block_size=int(cfg.get("block_size") or LLADA2_DEFAULT_BLOCK_SIZE),
            vanilla_schedule="llada",
        )

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.word_embeddings.weight
