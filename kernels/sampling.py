"""Fused sampling: logits → (token id, confidence) in one pass over the vocabulary, greedy or tempered.

The ``temperature``/``policy`` cases of ``diffulex.sampling.confidence.sample_tokens`` without
materialising probabilities (no top-k/top-p, no CFG). One program per row walks the vocabulary in tiles
of ``BLOCK_V`` and keeps, in fp32, an online softmax state of the logits x:
  * ``m``   — running max, with its index (the FIRST index on ties, as ``torch.argmax``),
  * ``m2``  — running second-largest value (equal to ``m`` when the max is tied),
  * ``s``   — Σ exp(x − m),
  * ``t``   — Σ exp(x − m)·(x − m),
both sums rescaled when ``m`` grows. Then, with p = softmax(x):
  * probability of token k = exp(x_k − m) / s  (1 / s for the top-1)
  * margin (top-1 − top-2 probability) = (1 − exp(m2 − m)) / s
  * negative entropy Σ p·log p = t / s − log s
The mask token's logit counts as −inf: it is never chosen and contributes nothing (dInfer's rule).

Temperature T > 0 (``sample_confidence_triton``) is the Gumbel-max trick of ``sample_tokens``: the token
is argmax_k exp(x_k) / (−log u_k)^T, computed as argmax_k x_k − T·log(−log u_k) (the same order), which
samples from softmax(x / T); the confidence is that of the chosen token under the UN-tempered softmax
(margin and entropy do not depend on the token), exactly as ``sample_tokens`` defines it.

RNG contract. u_k = ``tl.rand(seed, stream·2³² + k)``: Philox-4x32-10 with the row's ``seed`` (the
request's ``step_seed``) as key and (vocabulary index k, the row's ``stream``) as counter, where
``stream`` is the row's index among its sequence's sampled rows. The noise is therefore a function of
(seed, stream, k) only: it does not depend on the batch, the row's place in the launch, ``BLOCK_V`` or
the number of warps, so GPU temperature sampling is seeded, reproducible and batch-invariant. It is
NOT the torch path's stream (``torch.rand`` in float64): for the same seed the CPU and the GPU draw
different tokens (same distribution). The ``random`` policy's confidence is
``tl.rand(seed ^ 0x5EED, stream·2³²)``. ``kernels/philox.py`` reproduces ``tl.rand`` bit for bit in
torch, and ``sampling_noise`` gives the exact uniforms a row draws, so ``sample_confidence_reference``
can be fed the kernel's own noise. u lies in [0, 1 − 2⁻²⁴] (never 1, so no +inf score); u = 0 gives a
−inf score (that token is not drawn).

Edge cases: a row whose logits are all −inf (or all masked) yields id 0 and a non-finite confidence
(the torch softmax would give NaN there too). A row with a NaN logit gets a NaN confidence whatever the
policy (its id is unspecified), as the torch softmax gives for every non-``random`` policy: a caller
detects a broken forward from the ``[N]`` confidences instead of scanning ``[N, V]`` logits again.
+inf logits are not supported.
"""

from __future__ import annotations

import torch
from diffulex.kernels.philox import philox_uniform

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some CPU-only platforms
    triton = None
    tl = None

POLICIES = ("probability", "margin", "entropy")
SAMPLE_POLICIES = (*POLICIES, "random")
_POLICY_IDS = {name: i for i, name in enumerate(SAMPLE_POLICIES)}
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Key of the ``random`` confidence draw: the row's seed XOR this (``sample_tokens`` uses the same mix).
RANDOM_CONFIDENCE_KEY = 0x5EED


if triton is not None:

    @triton.jit
    def _noise_uniforms(seed, stream, offs):
        """The uniforms of vocabulary entries ``offs`` of one row: Philox counter (k, stream), key seed."""
        return tl.rand(seed, (stream << 32) + offs.to(tl.int64))

    @triton.jit
    def _exponential(u):
        """−log u with a small relative error for every u in [0, 1) (+inf at u = 0).

        The Gumbel score needs log(−log u) to an absolute ~1e-6, i.e. −log u to a RELATIVE ~1e-6. Near
        u = 1 (the tokens most likely to win) −log u is tiny and a fast log, accurate only to an absolute
        ~1e-7, would lose it; there w = 1 − u is exact (Sterbenz) and −log(1 − w) = Σ wᵏ/k, 7 terms.
        """
        w = 1.0 - u
        series = w * (1.0 + w * (0.5 + w * (1.0 / 3.0 + w * (0.25 + w * (0.2 + w * (1.0 / 6.0 + w / 7.0))))))
        return tl.where(w < 0.0625, series, -tl.log(u))

    @triton.jit
    def _sample_confidence_kernel(
        logits_ptr,
        ids_ptr,
        conf_ptr,
        seeds_ptr,
        streams_ptr,
        temps_ptr,
        stride_row,
        V,
        mask_token_id,
        POLICY: tl.constexpr,  # 0 probability, 1 margin, 2 entropy, 3 random (SAMPLE only)
        SAMPLE: tl.constexpr,  # False: greedy top-1; True: Gumbel-max with the row's temperature
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
        nans = tl.full((), 0, tl.int32)  # NaN logits seen
        if SAMPLE:
            seed = tl.load(seeds_ptr + row)
            stream = tl.load(streams_ptr + row)
            temp = tl.load(temps_ptr + row)
            best = tl.full((), neg_inf, tl.float32)  # running max of the noisy scores
            pick = tl.full((), 0, tl.int32)  # its index: the sampled token
            pick_x = tl.full((), neg_inf, tl.float32)  # the sampled token's logit

        for start in range(0, V, BLOCK_V):
            offs = start + lanes
            valid = (offs < V) & (offs != mask_token_id)
            x = tl.load(row_ptr + offs, mask=valid, other=neg_inf).to(tl.float32)
            nans += tl.sum((x != x).to(tl.int32), 0)

            if SAMPLE:
                u = _noise_uniforms(seed, stream, offs)
                # log(exp(x) / (−log u)^T); T = 0 keeps x (0·inf would be NaN when u = 0).
                score = tl.where(temp > 0.0, x - temp * tl.log(_exponential(u)), x)
                tile_best, tile_pick = tl.max(
                    score, 0, return_indices=True, return_indices_tie_break_left=True
                )
                tile_x = tl.max(tl.where(lanes == tile_pick, x, neg_inf), 0)
                take = tile_best > best  # an earlier tile keeps the pick on ties
                pick = tl.where(take, start + tile_pick, pick)
                pick_x = tl.where(take, tile_x, pick_x)
                best = tl.maximum(best, tile_best)

            if POLICY != 3:
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
            if SAMPLE:
                conf = tl.exp(pick_x - m) / s
            else:
                conf = 1.0 / s
        elif POLICY == 1:
            # 1 − exp(d) for d = m2 − m <= 0, without the cancellation near d = 0 (−expm1 by its series).
            d = m2 - m
            c = 1.0 / 720.0 + d * (1.0 / 5040.0)
            series = -d * (1.0 + d * (0.5 + d * (1.0 / 6.0 + d * (1.0 / 24.0 + d * (1.0 / 120.0 + d * c)))))
            conf = tl.where(d > -0.25, series, 1.0 - tl.exp(d)) / s
        elif POLICY == 2:
            conf = t / s - tl.log(s)
        else:
            conf = tl.rand(seed ^ 0x5EED, stream << 32)
        conf = tl.where(nans > 0, float("nan"), conf)
        if SAMPLE:
            tl.store(ids_ptr + row, pick.to(tl.int64))
        else:
            tl.store(ids_ptr + row, idx.to(tl.int64))
        tl.store(conf_ptr + row, conf.to(tl.float64))


def _check(logits: torch.Tensor, policy: str, policies: tuple[str, ...]) -> None:
    if logits.dim() != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    if logits.dtype not in _SUPPORTED_DTYPES:
        raise ValueError(f"logits must be float32/float16/bfloat16, got {logits.dtype}")
    if policy not in policies:
        raise ValueError(f"policy must be one of {policies}, got {policy!r}")


def _check_row_vector(name: str, value: torch.Tensor, rows: int, dtype: torch.dtype, device) -> None:
    if value.shape != (rows,) or value.dtype != dtype or value.device != device:
        raise ValueError(
            f"{name} must be a [{rows}] {dtype} tensor on {device}, "
            f"got {tuple(value.shape)} {value.dtype} on {value.device}"
        )


def _launch_config(vocab: int, block_v: int | None, num_warps: int | None) -> tuple[int, int]:
    if block_v is None:
        block_v = min(8192, triton.next_power_of_2(vocab))
    elif block_v <= 0 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two, got {block_v}")
    if num_warps is None:
        num_warps = 8 if block_v >= 4096 else 4
    return block_v, num_warps


def _launch(
    logits: torch.Tensor,
    mask_token_id: int,
    policy: str,
    row_args: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    block_v: int | None,
    num_warps: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Allocate the outputs and run ``_sample_confidence_kernel`` (greedy when ``row_args`` is None)."""
    if triton is None:
        raise RuntimeError("the fused sampling kernels need triton")
    n, vocab = logits.shape
    ids = torch.empty(n, dtype=torch.int64, device=logits.device)
    conf = torch.empty(n, dtype=torch.float64, device=logits.device)
    if n == 0:
        return ids, conf
    if vocab == 0:
        raise ValueError("logits must have a non-empty vocabulary")
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block_v, num_warps = _launch_config(vocab, block_v, num_warps)
    seeds, streams, temps = row_args if row_args is not None else (ids, ids, conf)  # unused when greedy
    _sample_confidence_kernel[(n,)](
        logits,
        ids,
        conf,
        seeds,
        streams,
        temps,
        logits.stride(0),
        vocab,
        int(mask_token_id),
        POLICY=_POLICY_IDS[policy],
        SAMPLE=row_args is not None,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return ids, conf


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
    _check(logits, policy, POLICIES)
    return _launch(logits, mask_token_id, policy, None, block_v, num_warps)


def sample_confidence_triton(
    logits: torch.Tensor,
    mask_token_id: int,
    policy: str,
    temperatures: torch.Tensor,
    seeds: torch.Tensor,
    streams: torch.Tensor,
    block_v: int | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled ids ``[N]`` (int64) and confidences ``[N]`` (float64, computed in fp32) of ``logits [N, V]``.

    Row i draws with temperature ``temperatures[i]`` (float32; 0 = greedy) from the noise stream
    (``seeds[i]``, ``streams[i]``) (int64, non-negative; see the module docstring for the contract).
    ``policy``: probability | margin | entropy | random. Other arguments as ``greedy_confidence_triton``.
    """
    _check(logits, policy, SAMPLE_POLICIES)
    n = logits.shape[0]
    _check_row_vector("temperatures", temperatures, n, torch.float32, logits.device)
    _check_row_vector("seeds", seeds, n, torch.int64, logits.device)
    _check_row_vector("streams", streams, n, torch.int64, logits.device)
    return _launch(logits, mask_token_id, policy, (seeds, streams, temperatures), block_v, num_warps)


# --- torch references -------------------------------------------------------------------------------------


def _masked_fp32(logits: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    x = logits.float().clone()
    if 0 <= mask_token_id < x.shape[-1]:
        x[:, mask_token_id] = float("-inf")
    return x


def _reference_confidence(x: torch.Tensor, ids: torch.Tensor, policy: str) -> torch.Tensor:
    """fp32 softmax of the (masked) logits ``x``, then the policy's confidence of the tokens ``ids``."""
    probs = torch.softmax(x, dim=-1)
    if policy == "probability":
        conf = probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    elif policy == "margin":
        top2 = torch.topk(probs, min(2, probs.shape[-1]), dim=-1).values
        conf = top2[:, 0] - (top2[:, 1] if top2.shape[-1] > 1 else 0.0)
    else:
        conf = torch.special.xlogy(probs, probs).sum(dim=-1)
    return conf.double()


def greedy_confidence_reference(
    logits: torch.Tensor, mask_token_id: int, policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of ``greedy_confidence_triton``: fp32 softmax, then the confidence of the argmax."""
    _check(logits, policy, POLICIES)
    x = _masked_fp32(logits, mask_token_id)
    ids = x.argmax(dim=-1)
    return ids, _reference_confidence(x, ids, policy)


def sampling_noise(
    seeds: torch.Tensor, streams: torch.Tensor, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact noise ``sample_confidence_triton`` draws: uniforms ``[N, vocab]`` and ``random`` ones ``[N]``.

    Both float32, computed in torch (``kernels/philox.py``) from int64 ``seeds``/``streams`` ``[N]``.
    """
    streams = streams.to(torch.int64).unsqueeze(-1)
    seeds = seeds.to(torch.int64).unsqueeze(-1)
    offsets = (streams << 32) + torch.arange(vocab, dtype=torch.int64, device=streams.device)
    uniforms = philox_uniform(seeds, offsets)
    random_conf = philox_uniform(seeds ^ RANDOM_CONFIDENCE_KEY, streams << 32).squeeze(-1)
    return uniforms, random_conf


def sample_confidence_reference(
    logits: torch.Tensor,
    mask_token_id: int,
    policy: str,
    temperatures: torch.Tensor,
    uniforms: torch.Tensor,
    random_conf: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch twin of ``sample_confidence_triton`` with explicit noise.

    The token is ``sample_tokens``' Gumbel-max in float64, argmax exp(x) / (−log u)^T, with the given
    ``uniforms [N, V]`` as u (``sampling_noise`` gives the kernel's); the confidence is the fp32 softmax
    one of that token (``random``: ``random_conf [N]``).
    """
    _check(logits, policy, SAMPLE_POLICIES)
    if uniforms.shape != logits.shape:
        raise ValueError(f"uniforms must be {tuple(logits.shape)}, got {tuple(uniforms.shape)}")
    x = _masked_fp32(logits, mask_token_id)
    temps = temperatures.to(torch.float64).unsqueeze(-1)
    noisy = x.double().exp() / (-torch.log(uniforms.double())) ** temps
    ids = noisy.argmax(dim=-1)
    if policy == "random":
        if random_conf is None:
            raise ValueError("policy 'random' needs random_conf")
        return ids, random_conf.double()
    return ids, _reference_confidence(x, ids, policy)
