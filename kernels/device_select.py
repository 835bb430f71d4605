"""One device-loop iteration's bookkeeping in one Triton kernel (the GPU path of
:class:`diffulex.sampling.device_selection.DeviceUnmasker`).

After each forward of a device loop the engine must (1) pick the rows to unmask with the block-diffusion
rule, (2) write their sampled ids into the query tokens and (3) record ids, confidences, the accepted
flags and NaN flags for the host. In torch that is ~35 small kernels per forward (~70 µs of GPU time at
batch 1, more than the 1-2 µs of work); here it is one program per sequence.

The rule is the torch path's exactly: a row's rank is the number of the sequence's rows that a stable
descending sort of the confidences puts before it (rows no longer masked count as −inf), the top
``min(count, still masked)`` masked rows are taken, or, for a dynamic-threshold sequence, every masked
row strictly above the threshold when there are at least that many. Confidences are float64 (NaN rows
are not ranked meaningfully; their request fails on the host anyway).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _unmask_step_kernel(
    ids_ptr,  # [R] int64 sampled ids
    conf_ptr,  # [R] float64 confidences
    masked_ptr,  # [R] int8, 1 while the row is masked; updated in place
    row_start_ptr,  # [S + 1] int32: sequence s owns rows [row_start[s], row_start[s + 1])
    counts_ptr,  # [S] int64 unmask counts of this iteration
    thresholds_ptr,  # [S] float64
    dynamic_ptr,  # [S] int8: 1 = the threshold rule applies
    tokens_ptr,  # int64 query tokens, rewritten at token_rows
    token_rows_ptr,  # [R] int64
    record_ptr,  # [4, R] float64: ids, confidences, accepted, NaN flags
    num_rows,
    BLOCK_W: tl.constexpr,
):
    seq = tl.program_id(0)
    lo = tl.load(row_start_ptr + seq)
    hi = tl.load(row_start_ptr + seq + 1)
    offs = tl.arange(0, BLOCK_W)
    valid = offs < hi - lo
    rows = lo + offs
    conf = tl.load(conf_ptr + rows, mask=valid, other=0.0)
    masked = tl.load(masked_ptr + rows, mask=valid, other=0) != 0  # rows past the sequence: 0
    ranked = tl.where(masked, conf, float("-inf"))
    # rank_i = #{valid j : ranked_j > ranked_i, or equal with j < i} (a stable descending sort)
    before = (ranked[None, :] > ranked[:, None]) | (
        (ranked[None, :] == ranked[:, None]) & (offs[None, :] < offs[:, None])
    )
    rank = tl.sum((before & valid[None, :]).to(tl.int32), axis=1)
    still = tl.sum(masked.to(tl.int32), axis=0)
    k = tl.minimum(tl.load(counts_ptr + seq).to(tl.int32), still)
    top = masked & (rank < k)
    above = masked & (ranked > tl.load(thresholds_ptr + seq))
    use_above = (tl.load(dynamic_ptr + seq) != 0) & (tl.sum(above.to(tl.int32), axis=0) >= k)
    chosen = tl.where(use_above, above, top)
    tl.store(masked_ptr + rows, (masked & (chosen == 0)).to(tl.int8), mask=valid)
    ids = tl.load(ids_ptr + rows, mask=valid, other=0)
    token_rows = tl.load(token_rows_ptr + rows, mask=valid, other=0)
    old = tl.load(tokens_ptr + token_rows, mask=valid, other=0)
    tl.store(tokens_ptr + token_rows, tl.where(chosen, ids, old), mask=valid)
    tl.store(record_ptr + rows, ids.to(tl.float64), mask=valid)
    tl.store(record_ptr + num_rows + rows, conf, mask=valid)
    tl.store(record_ptr + 2 * num_rows + rows, chosen.to(tl.float64), mask=valid)
    tl.store(record_ptr + 3 * num_rows + rows, (conf != conf).to(tl.float64), mask=valid)


def unmask_step_triton(
    ids: torch.Tensor,
    confidences: torch.Tensor,
    masked: torch.Tensor,
    row_start: torch.Tensor,
    counts: torch.Tensor,
    thresholds: torch.Tensor,
    dynamic: torch.Tensor,
    tokens: torch.Tensor,
    token_rows: torch.Tensor,
    record: torch.Tensor,
    max_rows_per_seq: int,
) -> None:
    """Apply one iteration of the unmasking rule in place (see module docstring); shapes as the kernel's
    arguments. ``masked`` is int8, ``record`` a contiguous ``[4, R]`` float64 tensor."""
    num_seqs = row_start.numel() - 1
    num_rows = ids.numel()
    if num_seqs <= 0 or num_rows == 0:
        return
    _unmask_step_kernel[(num_seqs,)](
        ids,
        confidences,
        masked,
        row_start,
        counts,
        thresholds,
        dynamic,
        tokens,
        token_rows,
        record,
        num_rows,
        BLOCK_W=max(16, triton.next_power_of_2(max_rows_per_seq)),
        num_warps=4,
    )


__all__ = ["unmask_step_triton"]
