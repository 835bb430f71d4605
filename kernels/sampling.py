"""Fused greedy sampling: logits → (top-1 token id, confidence) in one pass over the vocabulary.

The greedy (temperature 0, no top-k/top-p) case of ``diffulex.sampling.confidence.sample_tokens`` without
materialising probabilities. One program per row walks the vocabulary in tiles of ``BLOCK_V`` and keeps,
in fp32, an online softmax state:
  * ``m``   — running max, with its index (the FIRST index on ties, as ``torch.argmax``),
  * ``m2``  — running second-largest value (equal to ``m`` when the max is tied),
  * ``s``   — Σ exp(x − m),
  * ``t``   — Σ exp(x − m)·(x − m),
both sums rescaled when ``m`` grows. Then, with p = softmax(x):
  * probability of the top-1 = 1 / s
  * margin (top-1 − top-2 probability) = (1 − exp(m2 − m)) / s
  * negative entropy Σ p·log p = t / s − log s
The mask token's logit counts as −inf: it is never chosen and contributes nothing (dInfer's rule).

Edge cases: a row whose logits are all −inf (or all masked) yields id 0 and a non-finite confidence
(the torch softmax would give NaN there too); NaN / +inf logits are not supported.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some CPU-only platforms
    triton = None
    tl = None

POLICIES = ("probability", "margin", "entropy")
_POLICY_IDS = {name: i for i, name in enumerate(POLICIES)}
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


if triton is not None:

    @triton.jit
    def _greedy_confidence_kernel(
        logits_ptr,
        ids_ptr,
        conf_ptr,
        stride_row,
        V,
        mask_token_id,
        POLICY: tl.constexpr,  # 0 probability, 1 margin, 2 entropy
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * stride_row
        lanes = tl.arange(0, BLOCK_V)
        neg_inf = float("-inf")

        m = tl.full((), neg_inf, tl.float32)  # running max
        m2 = tl.full((), neg_inf, tl.float32)  # running second-largest value
        idx = tl.full((), 0, tl.int32)  # index of the running max (first on ties)
        s = tl.full((), 0.0, tl.float32)  # Σ exp(x − m)
        t = tl.full((), 0.0, tl.float32)  # Σ exp(x − m)·(x − m)

        for start in range(0, V, BLOCK_V):
            offs = start + lanes
            valid = (offs < V) & (offs != mask_token_id)
            x = tl.load(row_ptr + offs, mask=valid, other=neg_inf).to(tl.float32)

            # Tile max with its first index; an earlier tile keeps the argmax on ties (strict >).
            tile_max, tile_arg = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
            if POLICY == 1:
                # Second-largest of the tile: the tile with its argmax lane removed (a tie keeps tile_max).
                tile_m2 = tl.max(tl.where(lanes == tile_arg, neg_inf, x), 0)
                m2 = tl.maximum(tl.minimum(m, tile_max), tl.maximum(m2, tile_m2))
            idx = tl.where(tile_max > m, start + tile_arg, idx)

            new_m = tl.maximum(m, tile_max)
            # While everything seen is −inf, use 0 as the reference so no (−inf) − (−inf) appears.
            ref = tl.where(new_m == neg_inf, 0.0, new_m)
            alpha = tl.exp(m - ref)  # 0 while m is −inf (then s = t = 0 as well)
            e = tl.exp(x - ref)
            s_tile = tl.sum(e, 0)
            if POLICY == 2:
                shift = tl.where(m == neg_inf, 0.0, m - ref)  # old reference − new reference, <= 0
                z = tl.where(e > 0.0, x - ref, 0.0)  # −inf logits contribute 0, not 0·(−inf)
                t = (t + s * shift) * alpha + tl.sum(e * z, 0)
            s = s * alpha + s_tile
            m = new_m

        if POLICY == 0:
            conf = 1.0 / s
        elif POLICY == 1:
            # 1 − exp(d) for d = m2 − m <= 0, without the cancellation near d = 0 (−expm1 by its series).
            d = m2 - m
            c = 1.0 / 720.0 + d * (1.0 / 5040.0)
            series = -d * (1.0 + d * (0.5 + d * (1.0 / 6.0 + d * (1.0 / 24.0 + d * (1.0 / 120.0 + d * c)))))
            conf = tl.where(d > -0.25, series, 1.0 - tl.exp(d)) / s
        else:
            conf = t / s - tl.log(s)
        tl.store(ids_ptr + row, idx.to(tl.int64))
        tl.store(conf_ptr + row, conf.to(tl.float64))


def _check(logits: torch.Tensor, policy: str) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"logits must be float32/float16/bfloat16, got {logits.dtype}")
    if policy not in _POLICY_IDS:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")


def greedy_confidence_triton(
    logits: torch.Tensor,
    mask_token_id: int,
    policy: str,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 ids ``[N]`` (int64) and confidences ``[N]`` (float64, computed in fp32) of ``logits [N, V]``.

    ``logits``: bf16/fp16/fp32, any row stride (a non-unit column stride is copied to contiguous).
    ``mask_token_id`` outside ``[0, V)`` masks nothing. ``policy``: probability | margin | entropy.
    ``block_v`` (a power of two; default min(8192, next_pow2(V))) and ``num_warps`` are tuning knobs.
    """
    if triton is None:
        raise RuntimeError("greedy_confidence_triton needs triton")
    _check(logits, policy)
    n, vocab = logits.shape
    ids = torch.empty(n, dtype=torch.int64, device=logits.device)
    conf = torch.empty(n, dtype=torch.float64, device=logits.device)
    if n == 0:
        return ids, conf
    if vocab == 0:
        raise ValueError("logits must have a non-empty vocabulary")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if block_v is None:
        block_v = min(8192, triton.next_power_of_2(vocab))
    elif block_v <= 0 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if num_warps is None:
        num_warps = 8 if block_v >= 4096 else 4
    _greedy_confidence_kernel[(n,)](
        logits,
        ids,
        conf,
        logits.stride(0),
        vocab,
        int(mask_token_id),
        POLICY=_POLICY_IDS[policy],
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return ids, conf


def greedy_confidence_reference(
    logits: torch.Tensor, mask_token_id: int, policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of ``greedy_confidence_triton``: fp32 softmax, then the confidence of the argmax."""
    _check(logits, policy)
    x = logits.float().clone()
    if 0 <= mask_token_id < x.shape[-1]:
        x[:, mask_token_id] = float("-inf")
    ids = x.argmax(dim=-1)
    probs = torch.softmax(x, dim=-1)
    if policy == "probability":
        conf = probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    elif policy == "margin":
        top2 = torch.topk(probs, min(2, probs.shape[-1]), dim=-1).values
        conf = top2[:, 0] - (top2[:, 1] if top2.shape[-1] > 1 else 0.0)
    else:
        conf = torch.special.xlogy(probs, probs).sum(dim=-1)
    return ids, conf.double()
