"""Token -> expert alignment for the fused MoE GEMMs, on the device with static shapes (no host sync).

The ``T*K`` (token, slot) pairs, numbered ``t * K + k``, are grouped by expert: each expert's segment
starts at the sum of the earlier experts' pair counts, each rounded up to ``block_m`` rows, so every tile
of ``block_m`` rows belongs to one expert. Two launches of one program per expert:

1. ``_count_kernel``: how many pairs picked the expert.
2. ``_align_kernel``: the expert's segment start (a masked sum over the padded counts of the experts
   before it), then its pair ids written in pair order (a running ``cumsum`` over chunks of the ids), and
   its id written for each of its tiles.

The output buffers have static upper-bound sizes (:func:`padded_rows`); padding rows hold the sentinel
``T*K`` and tiles past the last used one the sentinel ``E``, which the GEMMs skip. No sort: CUB's sorts are
not reliably capturable in CUDA graphs, and a count plus a prefix sum per expert is tiny (``E`` programs
reading ``T*K`` ids). ``align_pairs_reference`` states the same grouping in plain torch.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some CPU-only platforms
    triton = None
    tl = None

_ALIGN_BLOCK = 1024  # pairs per step of the alignment loops


def padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Static upper bound of the aligned rows: every used expert (at most ``min(E, pairs)``) pads its
    segment by at most ``block_m - 1`` rows; rounded up to whole tiles."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return -(-bound // block_m) * block_m


def align_pairs_reference(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The alignment in plain torch (host-side loops): the same outputs as :func:`align_pairs_to_experts`."""
    flat = topk_ids.reshape(-1).cpu()
    num_pairs = flat.numel()
    rows = padded_rows(num_pairs, num_experts, block_m)
    sorted_pairs = torch.full((rows,), num_pairs, dtype=torch.int32)
    tile_experts = torch.full((rows // block_m,), num_experts, dtype=torch.int32)
    start = 0
    for expert in range(num_experts):
        pairs = (flat == expert).nonzero().flatten()
        sorted_pairs[start : start + pairs.numel()] = pairs.to(torch.int32)
        num_tiles = -(-pairs.numel() // block_m)
        tile_experts[start // block_m : start // block_m + num_tiles] = expert
        start += num_tiles * block_m
    return sorted_pairs.to(topk_ids.device), tile_experts.to(topk_ids.device)


if triton is not None:

    @triton.jit
    def _count_kernel(ids_ptr, counts_ptr, num_pairs, BLOCK: tl.constexpr):
        expert = tl.program_id(0)
        total = tl.zeros((BLOCK,), dtype=tl.int32)
        for start in range(0, num_pairs, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
            total += (ids == expert).to(tl.int32)
        tl.store(counts_ptr + expert, tl.sum(total, axis=0))

    @triton.jit
    def _align_kernel(
        ids_ptr,
        counts_ptr,
        sorted_pairs_ptr,
        tile_experts_ptr,
        num_pairs,
        num_experts,
        BLOCK_M: tl.constexpr,
        BLOCK: tl.constexpr,
        BLOCK_E: tl.constexpr,
    ):
        expert = tl.program_id(0)
        experts = tl.arange(0, BLOCK_E)
        counts = tl.load(counts_ptr + experts, mask=experts < num_experts, other=0)
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        start = tl.sum(tl.where(experts < expert, padded, 0), axis=0)
        num_tiles = tl.sum(tl.where(experts == expert, padded, 0), axis=0) // BLOCK_M
        first_tile = start // BLOCK_M
        for tile in range(0, num_tiles, BLOCK):
            tiles = tile + tl.arange(0, BLOCK)
            tl.store(
                tile_experts_ptr + first_tile + tiles,
                tl.zeros((BLOCK,), dtype=tl.int32) + expert,
                mask=tiles < num_tiles,
            )
        written = start
        for chunk in range(0, num_pairs, BLOCK):
            offs = chunk + tl.arange(0, BLOCK)
            ids = tl.load(ids_ptr + offs, mask=offs < num_pairs, other=-1)
            match = (ids == expert).to(tl.int32)
            rank = tl.cumsum(match, axis=0)  # 1-based position among this chunk's matches
            tl.store(sorted_pairs_ptr + written + rank - 1, offs, mask=match == 1)
            written += tl.sum(match, axis=0)


def align_pairs_to_experts(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group the ``T*K`` (token, slot) pairs by expert on the device, each expert's segment padded to
    ``block_m`` rows. Returns ``sorted_pairs`` int32 ``[padded_rows(T*K, E, block_m)]`` (pair ids
    ``t * K + k``, sentinel ``T*K`` on padding rows) and ``tile_experts`` int32 ``[rows / block_m]`` (the
    expert of each tile, sentinel ``E`` past the last used tile)."""
    if triton is None:
        raise RuntimeError("the MoE alignment kernels need triton")
    flat_ids = topk_ids.reshape(-1).to(torch.int32)
    num_pairs = flat_ids.numel()
    rows = padded_rows(num_pairs, num_experts, block_m)
    device = topk_ids.device
    sorted_pairs = torch.full((rows,), num_pairs, dtype=torch.int32, device=device)
    tile_experts = torch.full((rows // block_m,), num_experts, dtype=torch.int32, device=device)
    if num_pairs == 0:
        return sorted_pairs, tile_experts
    counts = torch.empty(num_experts, dtype=torch.int32, device=device)
    _count_kernel[(num_experts,)](flat_ids, counts, num_pairs, BLOCK=_ALIGN_BLOCK)
    _align_kernel[(num_experts,)](
        flat_ids,
        counts,
        sorted_pairs,
        tile_experts,
        num_pairs,
        num_experts,
        BLOCK_M=block_m,
        BLOCK=_ALIGN_BLOCK,
        BLOCK_E=triton.next_power_of_2(num_experts),
    )
    return sorted_pairs, tile_experts
