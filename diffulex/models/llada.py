"""LLaDA (GSAI-ML/LLaDA-8B-Base and -Instruct): a Llama-shaped masked-diffusion LM with full attention.

The official HF code (``modeling_llada.py``, derived from OLMo) stores everything under
``model.transformer``: ``wte`` (embedding), ``blocks.{i}`` (``attn_norm``, ``q_proj``/``k_proj``/``v_proj``,
``attn_out``, ``ff_norm``, ``ff_proj`` = SwiGLU gate, ``up_proj``, ``ff_out`` = down projection),
``ln_f`` and, unless ``weight_tying``, the LM head ``ff_out``. Attention is bidirectional (no causal mask)
and position i's logits predict token i (no shift). Our modules keep the block-level names and use
``model.embed_tokens`` / ``model.layers`` / ``model.norm`` / ``lm_head`` above them; ``_to_local_name``
is the whole name map. Each block merges ``q_proj``/``k_proj``/``v_proj`` into one ``qkv_proj`` and
``ff_proj``/``up_proj`` into one ``gate_up_proj`` (``MergedLinear``: fewer, wider GEMMs); the loader sees
them under the unmerged names, so the map and the error messages stay in official names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from diffulex.layers.attention import Attention
from diffulex.layers.fused_projections import gate_up_silu, qkv_rope
from diffulex.layers.linear import MergedLinear, RowParallelLinear, UnmergedView, qkv_linear
from diffulex.layers.norm import RMSNorm
from diffulex.layers.parallel_state import split_heads
from diffulex.layers.rotary import RotaryEmbedding
from diffulex.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from diffulex.models.registry import (
    ModelSpec,
    load_mapped_weights,
    merge_token_ids,
    register_model,
    token_ids,
)

# Ids of the official LLaDA tokenizer (used when a config leaves them out).
LLADA_MASK_TOKEN_ID = 126336  # <|mdm_mask|>
LLADA_EOS_TOKEN_ID = 126081  # <|endoftext|>, also the pad id
LLADA_EOT_TOKEN_ID = 126348  # <|eot_id|>: the Instruct model ends its turn with it


def _effective_kv_heads(cfg: dict[str, Any]) -> int:
    """OLMo's rule: ``n_kv_heads`` if set, else 1 with ``multi_query_attention``, else ``n_heads``."""
    if cfg.get("n_kv_heads") is not None:
        return int(cfg["n_kv_heads"])
    return 1 if cfg.get("multi_query_attention") else int(cfg["n_heads"])


def _check_supported(cfg: dict[str, Any]) -> None:
    """Refuse OLMo options the LLaDA checkpoints do not use, rather than compute something else."""
    expected = {
        "block_type": "llama",
        "layer_norm_type": "rms",
        "activation_type": "silu",
        "rope": True,
        "alibi": False,
        "attention_layer_norm": False,
        "block_group_size": 1,
        "layer_norm_with_affine": True,
    }
    for key, value in expected.items():
        if key in cfg and cfg[key] != value:
            raise NotImplementedError(f"LLaDA config {key}={cfg[key]!r} is not supported (only {value!r})")


class LLaDABlock(nn.Module):
    """One pre-norm transformer block: attention then SwiGLU MLP, each added to the residual stream."""

    def __init__(self, cfg: dict[str, Any], rotary: RotaryEmbedding):
        super().__init__()
        d_model, num_heads = int(cfg["d_model"]), int(cfg["n_heads"])
        num_kv_heads = _effective_kv_heads(cfg)
        split = split_heads(num_heads, num_kv_heads)  # this tensor-parallel rank's heads (all at one rank)
        self.num_heads, self.num_kv_heads = split.num_heads, split.num_kv_heads
        self.head_dim = d_model // num_heads
        mlp_hidden = int(cfg.get("mlp_hidden_size") or cfg.get("mlp_ratio", 4) * d_model)
        bias = bool(cfg.get("include_bias", False))
        qkv_bias = bias or bool(cfg.get("include_qkv_bias", False))
        norm_bias = cfg.get("bias_for_layer_norm")
        norm_bias = bias if norm_bias is None else bool(norm_bias)
        eps = float(cfg.get("rms_norm_eps", 1e-5))

        self.attn_norm = RMSNorm(d_model, eps, bias=norm_bias)
        self.qkv_proj = qkv_linear(d_model, split, num_heads, num_kv_heads, self.head_dim, qkv_bias)
        self.attn_out = RowParallelLinear(num_heads * self.head_dim, d_model, bias)
        self.ff_norm = RMSNorm(d_model, eps, bias=norm_bias)
        # ff_proj is the SwiGLU gate (SiLU applies to it), up_proj the other factor.
        self.gate_up_proj = MergedLinear(d_model, [("ff_proj", mlp_hidden), ("up_proj", mlp_hidden)], bias)
        self.ff_out = RowParallelLinear(mlp_hidden, d_model, bias)
        self.rotary_emb = rotary  # shared by all blocks: it only holds the frequencies
        self.attn = Attention(num_heads, self.num_kv_heads, self.head_dim)

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp_out, residual)``: the block's output is ``residual + mlp_out``, whose addition is left to the
        next norm (fused with it on the GPU). ``residual`` None: ``hidden`` is the residual stream itself."""
        num_tokens = hidden.shape[0]
        if residual is None:
            residual, normed = hidden, self.attn_norm(hidden)
        else:
            normed, residual = self.attn_norm(hidden, residual)
        query, key, value = qkv_rope(
            self.qkv_proj,
            self.rotary_emb,
            positions,
            normed,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        attended = self.attn(query, key, value).reshape(num_tokens, self.num_heads * self.head_dim)
        normed, residual = self.ff_norm(self.attn_out(attended), residual)
        return self.ff_out(gate_up_silu(self.gate_up_proj, normed)), residual


class LLaDAModel(nn.Module):
    """Embedding, the blocks and the final norm: token ids and positions in, final hidden states out."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        d_model = int(cfg["d_model"])
        num_embeddings = int(cfg.get("embedding_size") or cfg["vocab_size"])
        self.embed_tokens = VocabParallelEmbedding(num_embeddings, d_model)
        head_dim = d_model // int(cfg["n_heads"])
        rotary = RotaryEmbedding(head_dim, head_dim, float(cfg.get("rope_theta", 10000.0)))
        self.layers = nn.ModuleList(LLaDABlock(cfg, rotary) for _ in range(int(cfg["n_layers"])))
        norm_bias = cfg.get("bias_for_layer_norm")
        norm_bias = bool(cfg.get("include_bias", False)) if norm_bias is None else bool(norm_bias)
        self.norm = RMSNorm(d_model, float(cfg.get("rms_norm_eps", 1e-5)), bias=norm_bias)
        # OLMo's optional input scaling (off in LLaDA's config, kept so such a config still computes right).
        self.embedding_scale = math.sqrt(d_model) if cfg.get("input_emb_norm") else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        if self.embedding_scale is not None:
            hidden = hidden * self.embedding_scale
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        if residual is None:
            return self.norm(hidden)
        return self.norm(hidden, residual)[0]


@register_model("llada", "LLaDAModelLM")
class LLaDAModelLM(nn.Module):
    """The LLaDA language model: ``forward`` gives hidden states of the packed step, ``compute_logits`` logits.

    Owns the model and its LM head (tied to the embedding when the config's ``weight_tying`` says so; the
    loader calls ``tie_weights`` before loading). ``spec`` holds the engine-facing facts.
    """

    family = "llada"

    def __init__(self, hf_config: dict[str, Any]):
        super().__init__()
        _check_supported(hf_config)
        self.spec = self.spec_from_config(hf_config)
        self.model = LLaDAModel(hf_config)
        self.lm_head = ParallelLMHead(
            self.spec.hidden_size, self.spec.vocab_size, bool(hf_config.get("include_bias", False))
        )
        self.tie_word_embeddings = bool(hf_config.get("weight_tying", False))
        self.logit_scale = 1.0 / math.sqrt(self.spec.hidden_size) if hf_config.get("scale_logits") else None

    @classmethod
    def spec_from_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        """LLaDA's engine-facing facts from its HF config (official ids where the config has none)."""
        eos_ids = token_ids(cfg.get("eos_token_id")) or (LLADA_EOS_TOKEN_ID,)
        generation_eos = token_ids(cfg.get("generation_config", {}).get("eos_token_id"))
        vocab_size = int(cfg.get("embedding_size") or cfg["vocab_size"])
        # The official tokenizer's Instruct turns end with <|eot_id|>, which its config does not list.
        official_eot = (
            (LLADA_EOT_TOKEN_ID,) if LLADA_EOS_TOKEN_ID in eos_ids and vocab_size > LLADA_EOT_TOKEN_ID else ()
        )
        mask_id = cfg.get("mask_token_id")
        pad_id = cfg.get("pad_token_id")
        return ModelSpec(
            family=cls.family,
            hidden_size=int(cfg["d_model"]),
            num_layers=int(cfg["n_layers"]),
            num_heads=int(cfg["n_heads"]),
            num_kv_heads=_effective_kv_heads(cfg),
            head_dim=int(cfg["d_model"]) // int(cfg["n_heads"]),
            vocab_size=vocab_size,
            max_position_embeddings=int(cfg.get("max_sequence_length", 4096)),
            mask_token_id=int(mask_id) if mask_id is not None else LLADA_MASK_TOKEN_ID,
            eos_token_ids=merge_token_ids(eos_ids, generation_eos, official_eot),
            pad_token_id=int(pad_id) if pad_id is not None else eos_ids[0],
            shift_logits=False,
            native_attention="bidirectional",
            default_strategy="vanilla",
            default_block_size=32,
            vanilla_schedule="llada",
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``input_ids [T]``, ``positions [T]`` (packed tokens of the step) -> final hidden ``[T, d_model]``."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``hidden [N, d_model]`` -> logits ``[N, vocab_size]`` in the model dtype (tensor parallel: on
        rank 0; the other ranks get None)."""
        logits = self.lm_head(hidden)
        if logits is not None and self.logit_scale is not None:
            logits = logits * self.logit_scale
        return logits

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head (``weight_tying``)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy official ``model.transformer.*`` tensors in; raises ``WeightLoadError`` listing any mismatch."""
        tied = self.tie_word_embeddings
        load_mapped_weights(
            UnmergedView(self, self.official_name),  # merged projections under their official names
            named_tensors,
            _to_local_name,
            # A tied checkpoint may still carry the head: the embedding is authoritative, as in HF.
            ignored=lambda name: tied and name == "model.transformer.ff_out.weight",
        )

    @staticmethod
    def official_name(local_name: str) -> str:
        """Our parameter name -> the official checkpoint name (for error messages)."""
        for pattern, replacement in _TO_OFFICIAL:
            if re.fullmatch(pattern, local_name):
                return re.sub(pattern, replacement, local_name)
        return local_name


_BLOCK_PARAMS = r"(attn_norm|ff_norm|q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)\.(weight|bias)"
_TO_LOCAL = [
    (r"model\.transformer\.wte\.weight", "model.embed_tokens.weight"),
    (rf"model\.transformer\.blocks\.(\d+)\.{_BLOCK_PARAMS}", r"model.layers.\1.\2.\3"),
    (r"model\.transformer\.ln_f\.(weight|bias)", r"model.norm.\1"),
    (r"model\.transformer\.ff_out\.(weight|bias)", r"lm_head.\1"),
]
_TO_OFFICIAL = [
    (r"model\.embed_tokens\.weight", "model.transformer.wte.weight"),
    (rf"model\.layers\.(\d+)\.{_BLOCK_PARAMS}", r"model.transformer.blocks.\1.\2.\3"),
    (r"model\.norm\.(weight|bias)", r"model.transformer.ln_f.\1"),
    (r"lm_head\.(weight|bias)", r"model.transformer.ff_out.\1"),
]


def _to_local_name(official_name: str) -> str | None:
    """Official checkpoint name -> our parameter name, None for names LLaDA does not have."""
    for pattern, replacement in _TO_LOCAL:
        if re.fullmatch(pattern, official_name):
            return re.sub(pattern, replacement, official_name)
    return None
