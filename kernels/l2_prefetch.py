"""Warm the GPU's L2 cache with a tensor that a later kernel will read (a hint: no result, no effect on values).

A batch-1 denoise step reads every weight once from HBM. Between two weight-streaming GEMMs sit kernels
that read little (attention over one request's cache, norms, RoPE): the memory system idles while they
run, and each GEMM then pays its own ramp-up from cold. Prefetching (part of) the next GEMM's weight
into L2 on a side stream overlaps those reads with the small kernels; the GEMM then finds that part in
L2.

Three ways to issue the reads (``mode``), measured against each other in ``scripts/bench_prefetch.py``:

* ``"bulk"``: one Hopper ``cp.async.bulk.prefetch.L2`` per ``chunk_bytes`` chunk (the copy engine does
  the reads; the issuing thread does not wait). sm_90 and newer only.
* ``"line"``: one ``prefetch.global.L2::evict_last`` per 128-byte line (sm_80 and newer).
* ``"load"``: ordinary loads with the ``evict_last`` policy into registers, summed into a value nobody
  reads (any GPU; occupies the SMs it runs on while the data arrives).

On the CPU (and without Triton) there is no cache to warm: :func:`l2_prefetch` returns at once. The
reference is therefore the identity on every value: nothing observable may change.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some CPU-only platforms
    triton = None
    tl = None

PREFETCH_MODES = ("bulk", "line", "load")
LINE_BYTES = 128
_LOAD_BLOCK = 2048  # int32 elements per load iteration of the "load" mode


def l2_prefetch_reference(tensor: torch.Tensor, max_bytes: int | None = None) -> None:
    """The CPU path: nothing to warm, nothing changes."""
    del tensor, max_bytes


if triton is not None:

    @triton.jit
    def _bulk_prefetch_kernel(base, num_bytes, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr):
        # One element = one chunk; every element's thread issues its own bulk prefetch.
        chunk = tl.program_id(0).to(tl.int64) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)
        start = chunk * CHUNK
        active = start < num_bytes
        size = tl.minimum(num_bytes - start, CHUNK).to(tl.int32)
        pointers = base.to(tl.pointer_type(tl.uint8)) + start
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; "
            "@p cp.async.bulk.prefetch.L2.global [$1], $3; mov.b32 $0, 0; }",
            "=r,l,r,r",
            [pointers, active.to(tl.int32), size],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _line_prefetch_kernel(base, num_bytes, PER_PROGRAM: tl.constexpr):
        line = tl.program_id(0).to(tl.int64) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)
        start = line * 128
        active = start < num_bytes
        pointers = base.to(tl.pointer_type(tl.uint8)) + start
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2::evict_last [$1]; mov.b32 $0, 0; }",
            "=r,l,r",
            [pointers, active.to(tl.int32)],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )

    @triton.jit
    def _load_prefetch_kernel(base, sink, num_words, WORDS_PER_PROGRAM: tl.constexpr, BLOCK: tl.constexpr):
        words = base.to(tl.pointer_type(tl.int32))
        first = tl.program_id(0).to(tl.int64) * WORDS_PER_PROGRAM
        total = tl.zeros([BLOCK], dtype=tl.int32)
        for offset in range(0, WORDS_PER_PROGRAM, BLOCK):
            index = first + offset + tl.arange(0, BLOCK)
            total ^= tl.load(words + index, mask=index < num_words, other=0, eviction_policy="evict_last")
        # A store that (practically) never happens keeps the loads alive.
        folded = tl.xor_sum(total, axis=0)
        if folded == 0x5EED5EED:
            tl.store(sink, folded)


def l2_prefetch(
    tensor: torch.Tensor,
    max_bytes: int | None = None,
    mode: str = "bulk",
    programs: int = 16,
    chunk_bytes: int = 64 * 1024,
) -> None:
    """Ask the GPU to bring the first ``max_bytes`` (default: all) of ``tensor``'s storage into L2.

    Returns at once on the CPU. ``tensor`` must be contiguous. Launched on the current stream: the caller
    puts it on a side stream to overlap it with other work (``diffulex.layers.prefetch``).
    """
    if mode not in PREFETCH_MODES:
        raise ValueError(f"unknown prefetch mode {mode!r}; modes: {', '.join(PREFETCH_MODES)}")
    if not tensor.is_cuda or triton is None:
        l2_prefetch_reference(tensor, max_bytes)
        return
    if not tensor.is_contiguous():
        raise ValueError("l2_prefetch needs a contiguous tensor")
    num_bytes = tensor.numel() * tensor.element_size()
    if max_bytes is not None:
        num_bytes = min(num_bytes, max_bytes)
    num_bytes -= num_bytes % 16  # bulk sizes are multiples of 16 bytes
    if num_bytes <= 0:
        return
    if mode == "bulk":
        chunks = triton.cdiv(num_bytes, chunk_bytes)
        per_program = triton.next_power_of_2(triton.cdiv(chunks, programs))
        grid = (triton.cdiv(chunks, per_program),)
        _bulk_prefetch_kernel[grid](
            tensor, num_bytes, CHUNK=chunk_bytes, PER_PROGRAM=per_program, num_warps=1
        )
    elif mode == "line":
        lines = triton.cdiv(num_bytes, LINE_BYTES)
        per_program = triton.next_power_of_2(triton.cdiv(lines, programs))
        per_program = max(32, min(per_program, 16384))
        grid = (triton.cdiv(lines, per_program),)
        _line_prefetch_kernel[grid](tensor, num_bytes, PER_PROGRAM=per_program, num_warps=4)
    else:
        num_words = num_bytes // 4
        words_per_program = triton.cdiv(triton.cdiv(num_words, programs), _LOAD_BLOCK) * _LOAD_BLOCK
        grid = (triton.cdiv(num_words, words_per_program),)
        sink = torch.empty(1, dtype=torch.int32, device=tensor.device)
        _load_prefetch_kernel[grid](
            tensor, sink, num_words, WORDS_PER_PROGRAM=words_per_program, BLOCK=_LOAD_BLOCK, num_warps=8
        )


__all__ = ["PREFETCH_MODES", "l2_prefetch", "l2_prefetch_reference"]
