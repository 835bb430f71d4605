"""Dream (Dream-org/Dream-v0-Instruct-7B and -Base-7B; DiffuCoder shares it): masked diffusion on Qwen2.5.

The official checkpoints (``model_type`` "Dream", architectures ``DreamModel``; ``modeling_dream.py`` /
``configuration_dream.py`` shipped with them, also in NVlabs/Fast-dLLM ``dream/model/``) use Qwen2.5's
layout and names: ``model.embed_tokens``, ``model.layers.{i}.self_attn.{q,k,v,o}_proj`` where q/k/v
always carry a bias and o does not (no q/k norm), ``mlp.{gate,up,down}_proj`` (SwiGLU, no bias),
``input_layernorm``, ``post_attention_layernorm``, ``model.norm`` and ``lm_head`` (tied to the embedding
with ``tie_word_embeddings``). head_dim is ``hidden_size // num_attention_heads``. Our modules carry those
names, except that q/k/v are merged into one ``self_attn.qkv_proj`` and gate/up into one
``mlp.gate_up_proj`` (``MergedLinear``); the loader sees them under the unmerged official names.
Attention is fully bidirectional, and the logits are SHIFTED: the prediction for position i is read from
the hidden state at i-1 (the engine applies that through ``ModelSpec.shift_logits``; this module's
``compute_logits`` is the plain head).
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

# Defaults of the official DreamConfig, used when a config.json leaves the field out.
DREAM_MASK_TOKEN_ID = 151666  # <|mask|>
DREAM_ENDOFTEXT_ID = 151643  # <|endoftext|>: eos and pad
DREAM_IM_END_ID = 151645  # <|im_end|>: Instruct chat turns end with it (Qwen2.5 tokenizer)
DREAM_DEFAULT_BLOCK_SIZE = 32
_DEFAULT_ROPE_THETA = 10000.0  # DreamConfig's default; the released 7B configs set 1e6
_DEFAULT_RMS_EPS = 1e-6


def _head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])


def _check_supported(cfg: dict[str, Any]) -> None:
    """Refuse options that would change the computation in ways this module does not implement."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(
            f"Dream config hidden_act={cfg['hidden_act']!r} is not supported (only 'silu')"
        )
    rope_scaling = cfg.get("rope_scaling")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
        raise NotImplementedError(f"Dream config rope_scaling={rope_scaling!r} is not supported")
    if cfg.get("use_sliding_window"):
        raise NotImplementedError("Dream config use_sliding_window=true is not supported")
    if int(cfg["hidden_size"]) % int(cfg["num_attention_heads"]):
        raise ValueError("Dream needs hidden_size divisible by num_attention_heads")


class DreamBaseModel(nn.Module):
    """Embedding, decoder layers and final norm (the official ``DreamBaseModel``, stored as ``model``)."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        hidden_size, vocab_size = int(cfg["hidden_size"]), int(cfg["vocab_size"])
        self.embed_tokens = VocabParallelEmbedding(vocab_size, hidden_size)
        head_dim = _head_dim(cfg)
        rotary = RotaryEmbedding(head_dim, head_dim, float(cfg.get("rope_theta", _DEFAULT_ROPE_THETA)))
        eps = float(cfg.get("rms_norm_eps", _DEFAULT_RMS_EPS))
        num_heads = int(cfg["num_attention_heads"])
        num_kv_heads = int(cfg.get("num_key_value_heads") or num_heads)
        # Qwen2 attention: the official module builds q/k/v with bias=True whatever the config says, o without.
        self.layers = nn.ModuleList(
            PreNormDecoderLayer(
                QwenAttention(hidden_size, num_heads, num_kv_heads, head_dim, rotary, qkv_bias=True),
                SwiGLUMLP(hidden_size, int(cfg["intermediate_size"])),
                hidden_size,
                eps,
            )
            for _ in range(int(cfg["num_hidden_layers"]))
        )
        self.norm = RMSNorm(hidden_size, eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return run_decoder_stack(self.layers, self.norm, self.embed_tokens(input_ids), positions)


@register_model("Dream", "DreamModel")
class DreamModel(QwenStyleLM):
    """The Dream LM: ``forward`` gives hidden states of the packed step, ``compute_logits`` the (unshifted)
    logits of the rows it is given; the engine picks row j-1 for position j (``spec.shift_logits``)."""

    family = "dream"

    def check_config(self, hf_config: dict[str, Any]) -> None:
        _check_supported(hf_config)

    def build_model(self, hf_config: dict[str, Any]) -> nn.Module:
        return DreamBaseModel(hf_config)

    @classmethod
    def spec_from_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        """Dream's engine-facing facts from its HF config (DreamConfig's defaults where it has none)."""
        return qwen_spec(
            cls.family,
            cfg,
            head_dim=_head_dim(cfg),
            vocab_size=int(cfg.get("vocab_size", 151936)),
            mask_token_id=DREAM_MASK_TOKEN_ID,
            eos_token_id=DREAM_ENDOFTEXT_ID,
            pad_token_id=DREAM_ENDOFTEXT_ID,
            shift_logits=True,
            native_attention="bidirectional",
            default_strategy="vanilla",
            default_block_size=int(cfg.get("block_size") or DREAM_DEFAULT_BLOCK_SIZE),
            vanilla_schedule="dream",
            im_end=(DREAM_ENDOFTEXT_ID, DREAM_IM_END_ID),
        )
