"""The Block Buffer: the window of consecutive blocks a request is denoising.

A request contributes the blocks in its buffer to every step. A block moves
dummy → active → complete → cached: *active* while it still has masks, *complete* once every token is
decoded (its K/V not stored yet), *cached* once its K/V are in the paged cache (it then leaves the buffer). A buffer slot with no block is
a *dummy*: on the CUDA-graph path the runner pads each request's query to ``capacity × block_size``
tokens with dummy tokens (``step.DUMMY_BLOCK_ID``), so every request's query has the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class BlockState(str, Enum):
    """Life cycle of one block."""

    DUMMY = "dummy"
    ACTIVE = "active"
    COMPLETE = "complete"
    CACHED = "cached"


@dataclass
class Block:
    """One block of ``size`` consecutive positions starting at absolute position ``start``.

    ``fully_active`` is D2F's "complete" flag: a fully active block may commit its single most confident
    token when none passes the threshold; a semi-active one commits only above the threshold.
    """

    start: int
    size: int
    state: BlockState = BlockState.ACTIVE
    fully_active: bool = False

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass
class BlockBuffer:
    """Up to ``capacity`` uncached blocks of one request, oldest first."""

    capacity: int
    blocks: list[Block] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def has_room(self) -> bool:
        return len(self.blocks) < self.capacity

    @property
    def newest(self) -> Block | None:
        return self.blocks[-1] if self.blocks else None

    def add(self, start: int, size: int, fully_active: bool = False) -> Block:
        if not self.has_room:
            raise RuntimeError(f"block buffer is full ({self.capacity} blocks)")
        block = Block(start=start, size=size, fully_active=fully_active)
        self.blocks.append(block)
        return block

    def pop_cached(self) -> list[Block]:
        """Remove and return the leading blocks whose K/V are now stored."""
        cached = []
        while self.blocks and self.blocks[0].state is BlockState.CACHED:
            cached.append(self.blocks.pop(0))
        return cached

    def clear(self) -> None:
        self.blocks.clear()
