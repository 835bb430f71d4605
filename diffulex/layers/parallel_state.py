"""Who this process is in the model-parallel layout, and the collectives the parallel layers call.

A process-wide ``ParallelState`` says the tensor-parallel rank and size and the ``torch.distributed``
process group the layers reduce over. It defaults to a single rank: then every helper here is a no-op,
``torch.distributed`` is never touched, and the layers compute exactly what they computed before tensor
parallelism existed. The engine (``diffulex.engine.tp_workers``) sets it before the model is built,
because the parallel layers read it in their constructors to decide which slice of each weight they own.

Expert parallelism sits beside it: ``ep_rank``/``ep_size``/``ep_group`` (``diffulex.layers.expert_parallel``);
it runs over the tensor-parallel ranks, so ``ep_size`` is 1 or ``tp_size``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ParallelState:
    """This process's place in the tensor-parallel group: ``tp_rank`` of ``tp_size`` ranks, reducing over
    ``tp_group`` (a ``torch.distributed`` process group; None at size 1)."""

    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Any = None
    # Expert parallelism (size 1 or tp_size, over the same ranks): the MoE blocks hold whole experts,
    # ``num_experts / ep_size`` each, and exchange tokens over ``ep_group`` (None at size 1).
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: Any = None

    @property
    def is_driver(self) -> bool:
        """Rank 0 samples and talks to the scheduler; the others only take part in the collectives."""
        return self.tp_rank == 0


_STATE = ParallelState()


def get_parallel_state() -> ParallelState:
    """The current process's parallel state (a single rank unless the engine set one up)."""
    return _STATE


def set_parallel_state(state: ParallelState) -> None:
    """Install ``state`` (before building the model: the layers read it when constructed)."""
    global _STATE
    if not 0 <= state.tp_rank < state.tp_size:
        raise ValueError(f"tp_rank {state.tp_rank} is outside [0, tp_size={state.tp_size})")
    if state.ep_size not in (1, state.tp_size) or not 0 <= state.ep_rank < state.ep_size:
        raise ValueError(
            f"ep_rank {state.ep_rank} of ep_size {state.ep_size}: expert parallelism runs over the "
            f"tensor-parallel ranks (ep_size 1 or tp_size={state.tp_size})"
        )
    _STATE = state


@contextmanager
def using_parallel_state(state: ParallelState) -> Iterator[ParallelState]:
    """Build layers under ``state`` (e.g. a one-rank model in a process that is also a TP rank 0)."""
    previous = _STATE
    set_parallel_state(state)
    try:
        yield state
    finally:
        set_parallel_state(previous)


def reset_parallel_state() -> None:
    """Back to a single rank (after the group is destroyed)."""
    set_parallel_state(ParallelState())


def tp_size() -> int:
    return _STATE.tp_size


def tp_rank() -> int:
    return _STATE.tp_rank


def all_reduce(tensor: torch.Tensor, state: ParallelState | None = None) -> torch.Tensor:
    """Sum ``tensor`` over the tensor-parallel ranks of ``state`` (default: the current one), in place;
    returns it (no-op at size 1). Layers pass the state they were built with."""
    state = state or _STATE
    if state.tp_size == 1:
        return tensor
    import torch.distributed as dist

    dist.all_reduce(tensor, group=state.tp_group)
    return tensor


def gather_last_dim(tensor: torch.Tensor, state: ParallelState | None = None) -> torch.Tensor | None:
    """Concatenate every rank's ``tensor`` along the last dimension on rank 0 (None on the others).

    A gather, not an all-gather: only rank 0 samples, so only it needs the whole vocabulary.
    """
    state = state or _STATE
    if state.tp_size == 1:
        return tensor
    import torch.distributed as dist

    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(state.tp_size)] if state.is_driver else None
    dist.gather(tensor, parts, dst=dist.get_global_rank(state.tp_group, 0), group=state.tp_group)
    return torch.cat(parts, dim=-1) if parts is not None else None


def broadcast_from_driver(tensor: torch.Tensor, state: ParallelState | None = None) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank 0's, in place (no-op at size 1)."""
    state = state or _STATE
    if state.tp_size == 1:
        return tensor
    import torch.distributed as dist

    dist.broadcast(tensor, src=dist.get_global_rank(state.tp_group, 0), group=state.tp_group)
    return tensor


def min_over_ranks(value: int, device: torch.device, state: ParallelState | None = None) -> int:
    """The smallest ``value`` over the tensor-parallel ranks (``value`` itself at size 1)."""
    state = state or _STATE
    if state.tp_size == 1:
        return value
    import torch.distributed as dist

    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN, group=state.tp_group)
    return int(tensor.item())


def divide(total: int, parts: int, what: str) -> int:
    """``total / parts``, or a ValueError naming the model value that tensor parallelism cannot split."""
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by tensor_parallel_size={parts}")
    return total // parts


@dataclass(frozen=True)
class HeadSplit:
    """The attention heads one rank owns: query heads ``[q_start, q_start + num_heads)`` and key/value heads
    ``[kv_start, kv_start + num_kv_heads)`` of the model's (official head order)."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def split_heads(
    num_heads: int, num_kv_heads: int, rank: int | None = None, size: int | None = None
) -> HeadSplit:
    """Query heads split evenly; key/value heads split evenly when there are at least as many as ranks,
    else replicated: each rank keeps the one KV head its query heads read (grouped-query attention)."""
    rank = _STATE.tp_rank if rank is None else rank
    size = _STATE.tp_size if size is None else size
    local_heads = divide(num_heads, size, "num_attention_heads")
    if num_kv_heads >= size:
        local_kv = divide(num_kv_heads, size, "num_key_value_heads")
        return HeadSplit(rank * local_heads, local_heads, rank * local_kv, local_kv)
    if size % num_kv_heads:
        raise ValueError(
            f"num_key_value_heads={num_kv_heads} is fewer than tensor_parallel_size={size} and does not "
            f"divide it: the KV heads cannot be replicated evenly"
        )
    heads_per_kv = num_heads // num_kv_heads
    return HeadSplit(rank * local_heads, local_heads, rank * local_heads // heads_per_kv, 1)
