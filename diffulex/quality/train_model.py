"""Differentiable, batched twins of the engine's LLaDA and SDAR models, for training the tiny checkpoints.

The engine's models run packed steps over a paged cache; training needs a plain ``[batch, length]``
forward with an arbitrary boolean attention mask and autograd. ``TinyDiffusionLM`` computes the same
function as the engine's model for its family (``tests/test_quality.py`` checks the logits against
``LLM.forward_logits``): pre-norm RMSNorm with float32 statistics cast back before the weight,
rotate-half RoPE with float32 angles, softmax attention scaled by ``1/sqrt(head_dim)`` with GQA by
repeated kv heads, SwiGLU MLP, final norm and an untied head. SDAR adds Qwen3's per-head q/k RMSNorm
before RoPE. Parameters carry the official checkpoint names (``state_dict()`` saves as is).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class TrainRMSNorm(nn.Module):
    """RMSNorm with float32 statistics, cast back to the input dtype before the weight (both families)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin) of the angles, [B, 1, L, head_dim] float32


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float) -> Rope:
    """Float32 ``(cos, sin)`` of ``positions [B, L]`` for rotate-half RoPE (computed once per forward)."""
    exponents = torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim
    angles = positions.float().unsqueeze(-1) * (1.0 / theta**exponents)  # [B, L, D/2]
    angles = torch.cat((angles, angles), dim=-1).unsqueeze(1)  # [B, 1, L, D]
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate ``x [B, H, L, D]`` (in float32, cast back): channel j pairs with channel j + D/2."""
    cos, sin = rope
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat((-second, first), dim=-1) * sin).to(x.dtype)


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """``query [B, H, L, D]`` over ``key``/``value [B, KVH, L, D]``; ``visible [B, L, L]`` (True = attend).

    Every query must see at least one key (a fully masked row would give NaN): callers let padding
    queries see themselves.
    """
    group = query.shape[1] // key.shape[1]
    if group > 1:  # GQA: kv head j serves query heads j*group ... (j+1)*group - 1
        key, value = key.repeat_interleave(group, dim=1), value.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=visible.unsqueeze(1))


def self_attention(
    x: torch.Tensor,
    projections: tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear],
    shape: tuple[int, int, int],
    rope: Rope,
    visible: torch.Tensor,
    qk_norms: tuple[TrainRMSNorm, TrainRMSNorm] | None = None,
) -> torch.Tensor:
    """Projections (q, k, v, out), optional per-head q/k norms, RoPE, attention; ``shape`` = (heads,
    kv_heads, head_dim). Shared by both families, whose modules keep their own official names."""
    q_proj, k_proj, v_proj, out_proj = projections
    heads, kv_heads, head_dim = shape
    batch, length, _ = x.shape

    def split(projected: torch.Tensor, count: int) -> torch.Tensor:
        return projected.view(batch, length, count, head_dim).transpose(1, 2)  # [B, count, L, D]

    query, key, value = split(q_proj(x), heads), split(k_proj(x), kv_heads), split(v_proj(x), kv_heads)
    if qk_norms is not None:
        query, key = qk_norms[0](query), qk_norms[1](key)
    query, key = apply_rope(query, rope), apply_rope(key, rope)
    return out_proj(attend(query, key, value, visible).transpose(1, 2).flatten(2))


class LLaDATrainBlock(nn.Module):
    """OLMo/LLaDA block, official names: ``attn_norm``, ``q/k/v_proj``, ``attn_out``, ``ff_norm``,
    ``ff_proj`` (SwiGLU gate), ``up_proj``, ``ff_out``."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        hidden, heads, eps = int(cfg["d_model"]), int(cfg["n_heads"]), float(cfg["rms_norm_eps"])
        kv_heads, mlp = int(cfg.get("n_kv_heads") or heads), int(cfg["mlp_hidden_size"])
        self.shape = (heads, kv_heads, hidden // heads)
        self.attn_norm = TrainRMSNorm(hidden, eps)
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * self.shape[2], bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * self.shape[2], bias=False)
        self.attn_out = nn.Linear(hidden, hidden, bias=False)
        self.ff_norm = TrainRMSNorm(hidden, eps)
        self.ff_proj = nn.Linear(hidden, mlp, bias=False)
        self.up_proj = nn.Linear(hidden, mlp, bias=False)
        self.ff_out = nn.Linear(mlp, hidden, bias=False)

    def forward(self, x: torch.Tensor, rope: Rope, visible: torch.Tensor) -> torch.Tensor:
        projections = (self.q_proj, self.k_proj, self.v_proj, self.attn_out)
        x = x + self_attention(self.attn_norm(x), projections, self.shape, rope, visible)
        normed = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(normed)) * self.up_proj(normed))


class SDARTrainAttention(nn.Module):
    """Qwen3/SDAR attention, official names ``{q,k,v,o}_proj`` and per-head ``q_norm``/``k_norm``."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        hidden, heads, eps = (
            int(cfg["hidden_size"]),
            int(cfg["num_attention_heads"]),
            float(cfg["rms_norm_eps"]),
        )
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        self.shape = (heads, kv_heads, head_dim)
        self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)
        self.q_norm = TrainRMSNorm(head_dim, eps)
        self.k_norm = TrainRMSNorm(head_dim, eps)

    def forward(self, x: torch.Tensor, rope: Rope, visible: torch.Tensor) -> torch.Tensor:
        projections = (self.q_proj, self.k_proj, self.v_proj, self.o_proj)
        norms = (self.q_norm, self.k_norm)
        return self_attention(x, projections, self.shape, rope, visible, norms)


class SDARTrainLayer(nn.Module):
    """Qwen3/SDAR decoder layer, official names: ``input_layernorm``, ``self_attn.*``,
    ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``."""

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        hidden, eps, mlp = int(cfg["hidden_size"]), float(cfg["rms_norm_eps"]), int(cfg["intermediate_size"])
        self.input_layernorm = TrainRMSNorm(hidden, eps)
        self.self_attn = SDARTrainAttention(cfg)
        self.post_attention_layernorm = TrainRMSNorm(hidden, eps)
        self.mlp = nn.ModuleDict(
            {
                "gate_proj": nn.Linear(hidden, mlp, bias=False),
                "up_proj": nn.Linear(hidden, mlp, bias=False),
                "down_proj": nn.Linear(mlp, hidden, bias=False),
            }
        )

    def forward(self, x: torch.Tensor, rope: Rope, visible: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, visible)
        normed = self.post_attention_layernorm(x)
        return x + self.mlp["down_proj"](F.silu(self.mlp["gate_proj"](normed)) * self.mlp["up_proj"](normed))


def embed_by_matmul(embed: nn.Embedding, input_ids: torch.Tensor) -> torch.Tensor:
    """``embed(input_ids)`` as a one-hot product: the same rows (exact: one non-zero term per output),
    but the backward is a matmul. The gather's backward adds every token's gradient into one of only
    ~100 vocabulary rows; with deterministic kernels (and under torch.compile) that scatter runs
    serialised per row and took 60-66% of a training step on the H200 (docs/perf-notes.md)."""
    one_hot = F.one_hot(input_ids, embed.num_embeddings).to(embed.weight.dtype)
    with torch.autocast(input_ids.device.type, enabled=False):  # rows in the weight's dtype, as a gather
        return one_hot @ embed.weight


class TinyDiffusionLM(nn.Module):
    """A LLaDA or SDAR model (by the config's ``model_type``) for training, in the official module tree.

    ``forward(input_ids [B, L], positions [B, L], visible [B, L, L], logits_rows=None)`` returns logits
    ``[B, L', vocab]`` (``L'`` = the first ``logits_rows`` positions when given: the two-stream SDAR
    objective needs the noisy half only). LLaDA: ``model.transformer.{wte, blocks.i, ln_f, ff_out}``;
    SDAR: ``model.{embed_tokens, layers.i, norm}`` and ``lm_head``.
    """

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        self.family = str(cfg["model_type"])
        self.model = nn.Module()
        if self.family == "llada":
            if cfg.get("weight_tying") or cfg.get("include_bias") or cfg.get("include_qkv_bias"):
                raise ValueError("the training model supports untied, bias-free LLaDA configs only")
            hidden, vocab = int(cfg["d_model"]), int(cfg.get("embedding_size") or cfg["vocab_size"])
            self.model.transformer = nn.ModuleDict(
                {
                    "wte": nn.Embedding(vocab, hidden),
                    "blocks": nn.ModuleList(LLaDATrainBlock(cfg) for _ in range(int(cfg["n_layers"]))),
                    "ln_f": TrainRMSNorm(hidden, float(cfg["rms_norm_eps"])),
                    "ff_out": nn.Linear(hidden, vocab, bias=False),
                }
            )
        elif self.family == "sdar":
            if cfg.get("tie_word_embeddings") or cfg.get("attention_bias"):
                raise ValueError("the training model supports untied, bias-free SDAR configs only")
            hidden, vocab = int(cfg["hidden_size"]), int(cfg["vocab_size"])
            self.model.embed_tokens = nn.Embedding(vocab, hidden)
            self.model.layers = nn.ModuleList(
                SDARTrainLayer(cfg) for _ in range(int(cfg["num_hidden_layers"]))
            )
            self.model.norm = TrainRMSNorm(hidden, float(cfg["rms_norm_eps"]))
            self.lm_head = nn.Linear(hidden, vocab, bias=False)
        else:
            raise ValueError(f"no training model for model_type {self.family!r} (llada, sdar)")
        self.num_layers = len(self._layers())
        attention = self._layers()[0] if self.family == "llada" else self._layers()[0].self_attn
        self.head_dim = attention.shape[2]  # (heads, kv_heads, head_dim) of every layer
        self.rope_theta = float(cfg["rope_theta"])
        self.reset_parameters()

    def _layers(self) -> nn.ModuleList:
        return self.model.transformer["blocks"] if self.family == "llada" else self.model.layers

    def _parts(self) -> tuple[nn.Embedding, TrainRMSNorm, nn.Linear]:
        if self.family == "llada":
            t = self.model.transformer
            return t["wte"], t["ln_f"], t["ff_out"]
        return self.model.embed_tokens, self.model.norm, self.lm_head

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2-style init: N(0, 0.02), residual output projections scaled by 1/sqrt(2 * layers)."""
        residual_out = re.compile(r".*\.(blocks|layers)\.\d+\..*(attn_out|ff_out|o_proj|down_proj)\.weight")
        for name, param in self.named_parameters():
            if param.dim() == 1:
                param.fill_(1.0)  # norm weights
                continue
            std = 0.02
            if residual_out.fullmatch(name):
                std /= (2 * self.num_layers) ** 0.5  # keep the residual stream's variance flat with depth
            param.normal_(0.0, std)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        visible: torch.Tensor,
        logits_rows: int | None = None,
    ) -> torch.Tensor:
        embed, norm, head = self._parts()
        hidden = embed_by_matmul(embed, input_ids)
        rope = rope_tables(positions, self.head_dim, self.rope_theta)
        for layer in self._layers():
            hidden = layer(hidden, rope, visible)
        if logits_rows is not None:
            hidden = hidden[:, :logits_rows]
        return head(norm(hidden))


__all__ = ["TinyDiffusionLM", "apply_rope", "attend", "embed_by_matmul", "rope_tables", "self_attention"]
