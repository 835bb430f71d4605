"""Expert parallelism: each rank holds whole experts, ``num_experts / ep_size`` of them, and the tokens go
to the experts' ranks with all-to-all (``torch.distributed.all_to_all_single``; gloo and NCCL both have it).

It runs over the tensor-parallel ranks (``ep_size`` is 1 or ``tp_size``, see ``ParallelState``): attention,
dense MLPs, the vocabulary and the MoE blocks' shared experts stay tensor-parallel as before; only the
routed experts switch from "every rank a slice of every expert" to "every rank all of some experts". Rank
r holds experts ``[r * n, (r + 1) * n)`` (``n = num_experts / ep_size``, a contiguous range); the other
experts are ``AbsentExpert`` placeholders that keep the official names (``experts.{e}.gate_proj`` ...) so
the model keeps one name map: the loader hands them their tensors and they keep nothing of them.

**One MoE block** (``dispatch_to_experts``). The hidden states entering the block are the same on every
rank (the attention output is all-reduced), and so is the router (replicated, batch-invariant):

1. every rank routes all tokens and keeps its contiguous slice of them (``token_slice``: sizes differ by at
   most one; a rank may have none);
2. the slice's (token, slot) copies are ordered by the rank owning their expert; one ``all_to_all_single``
   exchanges the per-rank counts, two more send the expert ids and the hidden rows;
3. each rank runs its local experts over the rows it received (grouped by expert, the same SwiGLU the
   one-rank grouped path runs, so each row's output is the same: ``batch_invariant_linear``);
4. one ``all_to_all_single`` sends the outputs back to the token's rank, which sums each token's slots
   weighted by the routing weights in ascending expert order, as the one-rank grouped path does;
5. the result has this rank's token rows filled and zeros elsewhere; the block then adds its shared experts'
   tensor-parallel partial sums and ends with its **one all-reduce** as before, which both completes the
   shared experts and hands every rank every token's routed output (adding zeros is exact).

So a block costs four all-to-alls (counts, ids, rows, outputs) and the all-reduce it already had. The
counts come to the host (split sizes), so an expert-parallel block is never captured in a CUDA graph
(``StackedExperts.fused_ready`` is False under EP) and its local experts run the grouped torch path, on
CUDA too (not the fused Triton kernel).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from diffulex.layers.parallel_state import ParallelState


def local_experts(num_experts: int, state: ParallelState) -> range:
    """The experts this rank holds: all at ``ep_size`` 1, else its contiguous ``num_experts / ep_size``."""
    if state.ep_size == 1:
        return range(num_experts)
    if num_experts % state.ep_size:
        raise ValueError(
            f"num_experts={num_experts} is not divisible by expert_parallel_size={state.ep_size}"
        )
    per_rank = num_experts // state.ep_size
    return range(state.ep_rank * per_rank, (state.ep_rank + 1) * per_rank)


def expert_build_state(state: ParallelState) -> ParallelState:
    """The parallel state experts are built under: a single rank under EP (whole experts), else ``state``
    (each expert's intermediate dimension split over the tensor-parallel ranks)."""
    return ParallelState() if state.ep_size > 1 else state


class _AbsentWeight(nn.Module):
    """An official ``weight`` another rank holds: an empty parameter that loads nothing of its tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)

    def load_slice(self, leaf: str, tensor: torch.Tensor, shard: int | None = None) -> torch.Tensor:
        return tensor.new_empty(0)


class AbsentExpert(nn.Module):
    """An expert held by another expert-parallel rank: the official names, no weights, never run."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = _AbsentWeight(), _AbsentWeight(), _AbsentWeight()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this expert is held by another expert-parallel rank")


def token_slice(num_tokens: int, size: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous share ``[start, stop)`` of ``num_tokens`` (sizes differ by at most one)."""
    base, extra = divmod(num_tokens, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _all_to_all(output: torch.Tensor, data: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group):
    import torch.distributed as dist

    dist.all_to_all_single(output, data.contiguous(), out_sizes, in_sizes, group=group)
    return output


def dispatch_to_experts(
    hidden: torch.Tensor,
    route: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    experts: nn.ModuleList,
    first_expert: int,
    num_local: int,
    sum_dtype: torch.dtype,
    state: ParallelState,
) -> torch.Tensor:
    """``hidden [T, H]`` (the same on every rank) -> ``[T, H]`` in ``sum_dtype``: the routed experts' weighted
    sum for this rank's slice of the tokens, zeros for the other rows (the caller all-reduces).

    ``route`` gives ``(weights [T, k], expert ids [T, k])``; ``experts[e]`` is expert ``e`` (this rank
    holds ``first_expert .. first_expert + num_local - 1``; every rank holds ``num_local``).
    """
    num_tokens, width = hidden.shape
    group, size = state.ep_group, state.ep_size
    start, stop = token_slice(num_tokens, size, state.ep_rank)
    weights, expert_ids = route(hidden)  # every token: the router is cheap and batch-invariant
    weights, expert_ids = weights[start:stop], expert_ids[start:stop]
    top_k = expert_ids.shape[1]
    flat_ids = expert_ids.reshape(-1)  # (token, slot) copies, token-major
    owner = torch.div(flat_ids, num_local, rounding_mode="floor")
    order = torch.argsort(owner, stable=True)  # grouped by destination rank, token-major within one
    send_counts = torch.bincount(owner, minlength=size)
    recv_counts = torch.empty_like(send_counts)
    _all_to_all(recv_counts, send_counts, [1] * size, [1] * size, group)
    send_sizes, recv_sizes = send_counts.tolist(), recv_counts.tolist()
    received = sum(recv_sizes)
    recv_ids = _all_to_all(flat_ids.new_empty(received), flat_ids[order], recv_sizes, send_sizes, group)
    rows = hidden[start:stop].index_select(0, torch.div(order, top_k, rounding_mode="floor"))
    recv_rows = _all_to_all(hidden.new_empty((received, width)), rows, recv_sizes, send_sizes, group)
    # This rank's experts over the rows sent to them, each expert once over all of its rows.
    results = torch.empty_like(recv_rows)
    for expert_id in range(first_expert, first_expert + num_local):
        (picked,) = (recv_ids == expert_id).nonzero(as_tuple=True)
        if picked.numel():
            results[picked] = experts[expert_id](recv_rows[picked])
    returned = _all_to_all(torch.empty_like(rows), results, send_sizes, recv_sizes, group)
    outputs = torch.empty_like(returned)
    outputs[order] = returned  # back to (token, slot) order
    outputs = outputs.view(stop - start, top_k, width)
    out = torch.zeros((num_tokens, width), dtype=sum_dtype, device=hidden.device)
    mine = out[start:stop]
    by_expert = expert_ids.argsort(dim=1)  # each token's slots in ascending expert order
    for rank_in_token in range(top_k):
        slot = by_expert[:, rank_in_token]
        expert_out = outputs.gather(1, slot.view(-1, 1, 1).expand(-1, 1, width)).squeeze(1)
        mine += expert_out.to(sum_dtype) * weights.gather(1, slot.view(-1, 1))
    return out
