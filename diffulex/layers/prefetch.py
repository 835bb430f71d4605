"""Overlap weight reads with the small kernels of a layer: L2 prefetch on a side stream.

A process-wide ``WeightPrefetch`` setting (off unless the runner turns it on) tells the decoder blocks
whether to warm L2 with the next projection's weight while attention runs: the block calls
:func:`prefetch_weight` just before its attention and :func:`join_prefetches` once the forward is done.
The prefetch is forked from the current stream at that point, runs on a side stream next to attention,
and is joined back into the current stream at the end of the forward (there is no data dependency: the
join only keeps CUDA-graph capture well formed, and a stream's work ordered). Values never change;
on the CPU nothing happens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffulex.kernels.l2_prefetch import PREFETCH_MODES, l2_prefetch


@dataclass(frozen=True)
class WeightPrefetch:
    """How the blocks prefetch: ``mode`` (``diffulex.kernels.l2_prefetch``), at most ``max_bytes`` of each
    weight, issued by ``programs`` programs. ``enabled`` False: nothing is launched."""

    enabled: bool = False
    mode: str = "bulk"
    max_bytes: int | None = None
    programs: int = 16

    def __post_init__(self) -> None:
        if self.mode not in PREFETCH_MODES:
            raise ValueError(f"unknown prefetch mode {self.mode!r}; modes: {', '.join(PREFETCH_MODES)}")


_SETTING = WeightPrefetch()
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_PENDING: set[torch.device] = set()


def set_weight_prefetch(setting: WeightPrefetch) -> None:
    """Install the process-wide prefetch setting (the runner does, from its config)."""
    global _SETTING
    _SETTING = setting


def get_weight_prefetch() -> WeightPrefetch:
    return _SETTING


def prefetch_weight(weight: torch.Tensor) -> None:
    """Warm L2 with ``weight`` on a side stream, overlapping whatever the current stream runs next."""
    if not _SETTING.enabled or not weight.is_cuda:
        return
    device = weight.device
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        l2_prefetch(weight, _SETTING.max_bytes, _SETTING.mode, _SETTING.programs)
    _PENDING.add(device)


def join_prefetches(device: torch.device) -> None:
    """Order the side stream's prefetches before anything the current stream runs after this call."""
    if device in _PENDING:
        torch.cuda.current_stream(device).wait_stream(_SIDE_STREAMS[device])
        _PENDING.discard(device)


__all__ = [
    "WeightPrefetch",
    "get_weight_prefetch",
    "join_prefetches",
    "prefetch_weight",
    "set_weight_prefetch",
]
