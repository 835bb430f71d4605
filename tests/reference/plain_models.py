"""Plain, obviously-correct torch forwards of the LLaDA, SDAR and Dream architectures (test reference only).

Weights are read straight from a checkpoint folder by the OFFICIAL Hugging Face parameter names:

* LLaDA (``model_type`` "llada", ``LLaDAModelLM``; OLMo-derived ``modeling_llada.py``, verified in
  NVlabs/Fast-dLLM ``llada/model/modeling_llada.py`` + ``configuration_llada.py`` at 24cc59e):
  ``LLaDAModelLM.model`` is a ``LLaDAModel`` whose ``transformer`` ModuleDict holds ``wte``, ``blocks.{i}``
  (``LLaDALlamaBlock``: ``attn_norm``, ``q_proj``, ``k_proj``, ``v_proj``, ``attn_out``, ``ff_norm``,
  ``ff_proj``, ``up_proj``, ``ff_out``), ``ln_f`` and, when ``weight_tying`` is false, ``ff_out`` (the head).
  Block math: x += attn_out(Attn(attn_norm(x))); x += ff_out(act(ff_proj(h)) * up_proj(h)), h = ff_norm(x);
  head_dim = d_model // n_heads, kv heads = ``effective_n_kv_heads``; RoPE on q and k (rotate-half,
  ``rope_theta``); logits = ff_out(ln_f(x)) (or wte tied), times 1/sqrt(d_model) if ``scale_logits``.
* SDAR (``model_type`` "sdar", Qwen3 layout; verified in JetAstra/SDAR
  ``training/model/SDAR-4B-Chat/{config.json,modeling_sdar.py,model.safetensors.index.json}`` at c2041a8):
  ``model.embed_tokens``, ``model.layers.{i}.{input_layernorm,post_attention_layernorm}``,
  ``model.layers.{i}.self_attn.{q_proj,k_proj,v_proj,o_proj,q_norm,k_norm}``,
  ``model.layers.{i}.mlp.{gate_proj,up_proj,down_proj}``, ``model.norm``, ``lm_head`` (absent/ignored when
  ``tie_word_embeddings``). q_norm/k_norm are per-head RMSNorms over ``head_dim`` applied BEFORE RoPE;
  scaling head_dim**-0.5; GQA via ``num_key_value_heads``.
* Dream (``model_type`` "Dream", ``DreamModel``; Qwen2.5 layout, verified in NVlabs/Fast-dLLM
  ``dream/model/modeling_dream.py`` at 6a3fe32): the SDAR names without ``q_norm``/``k_norm``;
  ``q_proj``/``k_proj``/``v_proj`` always have a bias, ``o_proj`` none; head_dim = hidden // heads;
  bidirectional attention. The logit shift (position i from hidden i-1) is the loop's business
  (``loops.dream_generate(shift_logits=True)``); ``logits`` here are unshifted.

Everything is computed with full tensors, batch size 1, no fused kernels. RMSNorm is always computed in
float32; logits are returned as float32.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

# Family defaults for the mask id when config.json has no ``mask_token_id`` (REFERENCE.md table).
DEFAULT_MASK_TOKEN_ID = {"llada": 126336, "sdar": 151669, "dream": 151666}

# Defaults of LLaDA's ``ModelConfig`` dataclass (configuration_llada.py) for fields a config.json may omit.
_LLADA_DEFAULTS = {
    "n_kv_heads": None,
    "multi_query_attention": None,
    "mlp_ratio": 4,
    "mlp_hidden_size": None,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
    "include_bias": False,
    "include_qkv_bias": False,
    "scale_logits": False,
    "input_emb_norm": False,
    "weight_tying": True,
    "embedding_size": 50304,
    "vocab_size": 50257,
    "eos_token_id": 50256,
    "activation_type": "swiglu",
    "block_type": "sequential",
    "layer_norm_type": "default",
    "attention_layer_norm": False,
    "rope": False,
}


def block_causal_mask(block_ids: torch.Tensor) -> torch.Tensor:
    """Bool[L, L]: query i may attend key j iff block_ids[j] <= block_ids[i] (bidirectional inside a block)."""
    block_ids = block_ids.long()
    return block_ids[None, :] <= block_ids[:, None]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32 (both families normalise in float32)."""
    dtype = x.dtype
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (both families' rotate_half)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """RoPE on x [L, heads, head_dim] at absolute positions [L]; angles in float32."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # [L, head_dim/2]
    emb = torch.cat((angles, angles), dim=-1)  # [L, head_dim]
    cos = emb.cos()[:, None, :]
    sin = emb.sin()[:, None, :]
    x32 = x.float()
    return (x32 * cos + rotate_half(x32) * sin).to(x.dtype)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [L, H, D], k/v [K, KVH, D] (GQA: query head h uses kv head h // (H // KVH)), mask Bool[L, K]."""
    num_heads, num_kv_heads = q.shape[1], k.shape[1]
    assert num_heads % num_kv_heads == 0
    rep = num_heads // num_kv_heads
    k = k.repeat_interleave(rep, dim=1)
    v = v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale  # [H, L, K]
    scores = scores.masked_fill(~mask[None, :, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("hqk,khd->qhd", probs, v.float())  # [L, H, D]
    return out.to(q.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


class _Loader:
    """Reads model.safetensors or the shards named by model.safetensors.index.json; tracks consumed keys."""

    def __init__(self, path: Path, dtype: torch.dtype):
        index = path / "model.safetensors.index.json"
        tensors: dict[str, torch.Tensor] = {}
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            for shard in sorted(set(weight_map.values())):
                tensors.update(load_file(str(path / shard)))
        else:
            tensors.update(load_file(str(path / "model.safetensors")))
        self.tensors = {name: t.to(dtype) for name, t in tensors.items()}
        self.used: set[str] = set()

    def get(self, name: str) -> torch.Tensor:
        self.used.add(name)
        return self.tensors[name]

    def maybe(self, name: str) -> torch.Tensor | None:
        if name in self.tensors:
            return self.get(name)
        return None

    def ignore(self, name: str) -> None:
        if name in self.tensors:
            self.used.add(name)

    def check_all_used(self) -> None:
        left = sorted(n for n in self.tensors if n not in self.used and not n.endswith("rotary_emb.inv_freq"))
        if left:
            raise ValueError(f"checkpoint tensors not understood by the reference model: {left[:10]}")


class PlainModel:
    """Plain forward of a LLaDA, SDAR or Dream checkpoint; see the module docstring for the exact names."""

    def __init__(self, path, dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        self.dtype = dtype
        self.config: dict = json.loads((self.path / "config.json").read_text())
        cfg = self.config
        model_type = str(cfg.get("model_type", "")).lower()
        archs = [str(a) for a in cfg.get("architectures", []) or []]
        if model_type == "llada" or "LLaDAModelLM" in archs:
            self.family = "llada"
        elif model_type in ("sdar", "qwen3") or any(
            a in ("SDARForCausalLM", "Qwen3ForCausalLM") for a in archs
        ):
            self.family = "sdar"
        elif model_type == "dream" or "DreamModel" in archs:
            self.family = "dream"
        else:
            raise ValueError(f"unsupported model_type {model_type!r} / architectures {archs}")

        mask = cfg.get("mask_token_id")
        self.mask_token_id: int = int(mask) if mask is not None else DEFAULT_MASK_TOKEN_ID[self.family]
        loader = _Loader(self.path, dtype)
        if self.family == "llada":
            self._init_llada(loader)
        else:
            self._init_sdar(loader)
        loader.check_all_used()
        eos = cfg.get("eos_token_id", _LLADA_DEFAULTS["eos_token_id"] if self.family == "llada" else None)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        self.eos_token_id: int | None = None if eos is None else int(eos)

    # ------------------------------------------------------------------ LLaDA
    def _init_llada(self, ld: _Loader) -> None:
        c = dict(_LLADA_DEFAULTS)
        c.update(self.config)
        if c["block_type"] != "llama":
            raise ValueError("only LLaDA block_type 'llama' (LLaDALlamaBlock) is supported")
        if c["layer_norm_type"] != "rms":
            raise ValueError("only LLaDA layer_norm_type 'rms' is supported")
        if c["activation_type"] != "silu":
            raise ValueError("only LLaDA activation_type 'silu' (silu(ff_proj) * up_proj) is supported")
        if c["attention_layer_norm"]:
            raise ValueError("LLaDA attention_layer_norm (q/k norm) is not supported")
        if not c["rope"]:
            raise ValueError("LLaDA without rope is not supported (the official model asserts rope)")
        d_model, n_heads = int(c["d_model"]), int(c["n_heads"])
        # ModelConfig.effective_n_kv_heads
        if c["n_kv_heads"] is None:
            n_kv = 1 if c["multi_query_attention"] is True else n_heads
        else:
            n_kv = int(c["n_kv_heads"])
        self.num_layers = int(c["n_layers"])
        self.num_heads, self.num_kv_heads = n_heads, n_kv
        self.head_dim = d_model // n_heads
        self.rope_theta = float(c["rope_theta"])
        self.eps = float(c["rms_norm_eps"])
        self.scale_logits = bool(c["scale_logits"])
        self.input_emb_norm = bool(c["input_emb_norm"])
        self.hidden_size = d_model
        p = "model.transformer."
        self.embed = ld.get(p + "wte.weight")
        self.layers = []
        for i in range(self.num_layers):
            b = f"{p}blocks.{i}."
            self.layers.append(
                {
                    "attn_norm": ld.maybe(b + "attn_norm.weight"),
                    "q": ld.get(b + "q_proj.weight"),
                    "q_b": ld.maybe(b + "q_proj.bias"),
                    "k": ld.get(b + "k_proj.weight"),
                    "k_b": ld.maybe(b + "k_proj.bias"),
                    "v": ld.get(b + "v_proj.weight"),
                    "v_b": ld.maybe(b + "v_proj.bias"),
                    "o": ld.get(b + "attn_out.weight"),
                    "o_b": ld.maybe(b + "attn_out.bias"),
                    "ff_norm": ld.maybe(b + "ff_norm.weight"),
                    "gate": ld.get(b + "ff_proj.weight"),
                    "gate_b": ld.maybe(b + "ff_proj.bias"),
                    "up": ld.get(b + "up_proj.weight"),
                    "up_b": ld.maybe(b + "up_proj.bias"),
                    "down": ld.get(b + "ff_out.weight"),
                    "down_b": ld.maybe(b + "ff_out.bias"),
                }
            )
        self.final_norm = ld.maybe(p + "ln_f.weight")
        if c["weight_tying"]:
            self.head, self.head_b = self.embed, None
        else:
            self.head = ld.get(p + "ff_out.weight")
            self.head_b = ld.maybe(p + "ff_out.bias")
        self.vocab_size = int(self.head.shape[0])  # = embedding_size or vocab_size

    # ------------------------------------------------------------------ SDAR / Qwen3, Dream / Qwen2.5
    def _init_sdar(self, ld: _Loader) -> None:
        c = self.config
        hidden, n_heads = int(c["hidden_size"]), int(c["num_attention_heads"])
        self.num_layers = int(c["num_hidden_layers"])
        self.num_heads = n_heads
        self.num_kv_heads = int(c.get("num_key_value_heads") or n_heads)
        self.head_dim = int(c.get("head_dim") or hidden // n_heads)
        self.rope_theta = float(c.get("rope_theta", 10000.0))
        if c.get("rope_scaling"):
            raise ValueError("rope_scaling is not supported by the reference model")
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError("only hidden_act 'silu' is supported")
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        self.scale_logits = False
        self.input_emb_norm = False
        self.hidden_size = hidden
        self.embed = ld.get("model.embed_tokens.weight")
        qk_norm = self.family == "sdar"
        self.layers = []
        for i in range(self.num_layers):
            b = f"model.layers.{i}."
            self.layers.append(
                {
                    "attn_norm": ld.get(b + "input_layernorm.weight"),
                    "q": ld.get(b + "self_attn.q_proj.weight"),
                    "q_b": ld.maybe(b + "self_attn.q_proj.bias"),
                    "k": ld.get(b + "self_attn.k_proj.weight"),
                    "k_b": ld.maybe(b + "self_attn.k_proj.bias"),
                    "v": ld.get(b + "self_attn.v_proj.weight"),
                    "v_b": ld.maybe(b + "self_attn.v_proj.bias"),
                    "o": ld.get(b + "self_attn.o_proj.weight"),
                    "o_b": ld.maybe(b + "self_attn.o_proj.bias"),
                    # Qwen3 (SDAR) only; Dream (Qwen2.5) has no q/k norm.
                    "q_norm": ld.get(b + "self_attn.q_norm.weight") if qk_norm else None,
                    "k_norm": ld.get(b + "self_attn.k_norm.weight") if qk_norm else None,
                    "ff_norm": ld.get(b + "post_attention_layernorm.weight"),
                    "gate": ld.get(b + "mlp.gate_proj.weight"),
                    "gate_b": None,
                    "up": ld.get(b + "mlp.up_proj.weight"),
                    "up_b": None,
                    "down": ld.get(b + "mlp.down_proj.weight"),
                    "down_b": None,
                }
            )
        self.final_norm = ld.get("model.norm.weight")
        if c.get("tie_word_embeddings", False):
            ld.ignore("lm_head.weight")  # HF ties it to embed_tokens anyway
            self.head = self.embed
        else:
            self.head = ld.get("lm_head.weight")
        self.head_b = None
        self.vocab_size = int(self.head.shape[0])

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn_mask: torch.Tensor | None,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One forward of L new tokens.

        input_ids, positions: [L]; attn_mask: Bool[L, K] with K = len(past) + L (True = may attend; the
        first len(past) columns are the past keys, the last L the keys of this call; None = all True).
        past / returned kv: per layer (k, v) post-RoPE, [K, num_kv_heads, head_dim]; the returned kv is the
        past concatenated with this call's keys/values (past first). Returns (logits float32 [L, V], kv).
        """
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        positions = torch.as_tensor(positions, dtype=torch.long)
        n = input_ids.shape[0]
        past_len = 0 if past is None else past[0][0].shape[0]
        if attn_mask is None:
            attn_mask = torch.ones(n, past_len + n, dtype=torch.bool)
        attn_mask = torch.as_tensor(attn_mask, dtype=torch.bool)
        assert attn_mask.shape == (n, past_len + n), (attn_mask.shape, n, past_len)
        assert bool(attn_mask.any(dim=-1).all()), "every query must see at least one key"
        scale = 1.0 / math.sqrt(self.head_dim)

        x = self.embed[input_ids]  # [L, hidden]
        if self.input_emb_norm:  # LLaDA input_emb_norm
            x = x * (self.hidden_size**0.5)
        new_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, w in enumerate(self.layers):
            h = rms_norm(x, w["attn_norm"], self.eps)
            q = linear(h, w["q"], w["q_b"]).view(n, self.num_heads, self.head_dim)
            k = linear(h, w["k"], w["k_b"]).view(n, self.num_kv_heads, self.head_dim)
            v = linear(h, w["v"], w["v_b"]).view(n, self.num_kv_heads, self.head_dim)
            if self.family == "sdar":  # Qwen3: per-head RMSNorm of q and k before RoPE
                q = rms_norm(q, w["q_norm"], self.eps)
                k = rms_norm(k, w["k_norm"], self.eps)
            q = apply_rope(q, positions, self.rope_theta)
            k = apply_rope(k, positions, self.rope_theta)
            if past is not None:
                k_all = torch.cat((past[i][0], k), dim=0)
                v_all = torch.cat((past[i][1], v), dim=0)
            else:
                k_all, v_all = k, v
            new_kv.append((k_all, v_all))
            att = attention(q, k_all, v_all, attn_mask, scale).reshape(n, self.num_heads * self.head_dim)
            x = x + linear(att, w["o"], w["o_b"])
            h = rms_norm(x, w["ff_norm"], self.eps)
            gate = linear(h, w["gate"], w["gate_b"])
            up = linear(h, w["up"], w["up_b"])
            x = x + linear(F.silu(gate) * up, w["down"], w["down_b"])
        x = rms_norm(x, self.final_norm, self.eps)
        logits = linear(x, self.head, self.head_b).float()
        if self.scale_logits:  # LLaDA scale_logits
            logits = logits * (1.0 / math.sqrt(self.hidden_size))
        return logits, new_kv

    @torch.no_grad()
    def logits(self, input_ids, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full forward without cache at positions 0..L-1; attn_mask Bool[L, L] or None (fully bidirectional)."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.long)
        out, _ = self.forward(input_ids, torch.arange(input_ids.shape[0]), attn_mask)
        return out
