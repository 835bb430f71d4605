"""Sparse mixture-of-experts MLPs (Qwen3-MoE softmax routing, LLaDA2 group-limited sigmoid routing).

The router scores every expert and each token keeps its ``top_k``; the block's output is the
routing-weighted sum of those experts' SwiGLU outputs. Two paths compute it, chosen per call from the
device of the hidden states:

* **CUDA (triton importable): the fused path** (``diffulex.kernels.fused_moe``). Pairs (token, slot) are
  grouped by expert on the device into a buffer of static size, and two grouped GEMMs (gate/up with the
  SiLU-mul fused, then down with the routing weight) run over the stacked expert weights; the slots are
  summed in float32 in slot order. No host synchronisation, so the block is capturable in a CUDA graph:
  ``cuda_graph_safe`` is True when the weights live on a CUDA device and triton is there (the runner reads
  it before capturing). The routers are device-only ops (softmax/sigmoid, topk, scatter, gather).
* **Elsewhere (CPU): the grouped reference path.** Each expert gathers the rows routed to it (host-side
  ``nonzero``), runs one SwiGLU over them (``batch_invariant_linear`` underneath) and scatter-adds its
  weighted outputs back in expert order. Not capturable, which does not matter on the CPU.

Both paths are batch-invariant per token: a token's output does not depend on which other tokens share
the step (the fused kernel's argument is in its module docstring).

**Expert weights are stored once** (``StackedExperts``): two stacked tensors, ``gate_up_weight
[E, 2I, H]`` (each expert's gate rows then up rows) and ``down_weight [E, H, I]``, are the only storage;
each expert ``experts.{e}`` is a ``SwiGLUMLP`` whose ``gate_up_proj.weight`` / ``down_proj.weight``
parameters are views ``gate_up_weight[e]`` / ``down_weight[e]``. The loader writes the official tensors
(``experts.{e}.gate_proj/up_proj/down_proj``) through those views, i.e. straight into the stacks, and the
grouped path reads the same memory, so the fused path costs no second copy. The stacks are non-persistent
buffers (the checkpoint names stay the per-expert ones); ``_apply`` (``.to()``, ``.cuda()``, ``.half()``)
converts the stacks once and re-points the views, instead of copying every expert on its own.

**Tensor parallelism** splits every expert's intermediate dimension (and the shared experts'): a rank
holds ``gate_up_weight [E, 2I/tp, H]`` and ``down_weight [E, H, I/tp]``, the router is replicated (every
rank routes every token alike), each rank's experts produce partial sums and the block ends with one
all-reduce. At one rank the all-reduce is a no-op and the computation is unchanged.

**Expert parallelism** (``ParallelState.ep_size`` > 1, ``diffulex.layers.expert_parallel``) holds whole
experts instead, ``num_experts / ep_size`` per rank, and sends the tokens to them with all-to-all; the
block still ends with its one all-reduce.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
from torch import nn

from diffulex.layers.expert_parallel import (
    AbsentExpert,
    dispatch_to_experts,
    expert_build_state,
    local_experts,
)
from diffulex.layers.linear import Linear, batch_invariant_linear
from diffulex.layers.parallel_state import all_reduce, divide, get_parallel_state, using_parallel_state
from diffulex.layers.qwen_blocks import SwiGLUMLP


def ExpertMLP(hidden_size: int, intermediate_size: int) -> SwiGLUMLP:  # noqa: N802 - stands for a class
    """One expert: the official gate/up/down names, gate and up merged; its output is a partial sum under
    tensor parallelism (the block all-reduces once)."""
    return SwiGLUMLP(hidden_size, intermediate_size, reduce=False)


_HAS_TRITON = importlib.util.find_spec("triton") is not None  # checked without importing it on CPU


def use_fused_moe(hidden: torch.Tensor) -> bool:
    """Whether a block's experts run the fused Triton kernels for ``hidden`` (CUDA and triton)."""
    return hidden.is_cuda and _HAS_TRITON


class StackedExperts(nn.ModuleList):
    """``num_experts`` SwiGLU experts (``experts.{e}.gate_up_proj`` / ``down_proj``, the official
    ``gate_proj``/``up_proj`` shards) whose weights are views into two stacked buffers, ``gate_up_weight
    [E, 2I, H]`` and ``down_weight [E, H, I]`` (see the module docstring): one copy serves both paths."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        state = get_parallel_state()
        local = local_experts(num_experts, state)  # all of them, unless expert-parallel
        # The experts' own parameters are replaced by views at once: build them without memory.
        with torch.device("meta"), using_parallel_state(expert_build_state(state)):
            experts = [ExpertMLP(hidden_size, intermediate_size) for _ in local]
        absent = [AbsentExpert() for _ in range(num_experts - len(local))]  # other ranks' experts
        super().__init__(absent[: local.start] + experts + absent[local.start :])
        self.local_experts, self.expert_parallel = local, state if state.ep_size > 1 else None
        # This tensor-parallel rank's slice of each expert's intermediate dimension (whole under EP).
        if self.expert_parallel is None:
            intermediate_size = divide(intermediate_size, state.tp_size, "moe_intermediate_size")
        # Uninitialised on purpose, like every parameter: the checkpoint overwrites them (through the views).
        self.register_buffer(
            "gate_up_weight", torch.empty(len(local), 2 * intermediate_size, hidden_size), persistent=False
        )
        self.register_buffer(
            "down_weight", torch.empty(len(local), hidden_size, intermediate_size), persistent=False
        )
        self._point_experts_at_stacks()

    def _point_experts_at_stacks(self) -> None:
        """Make each expert's weight parameters views of its slice of the stacked buffers."""
        for index, expert_id in enumerate(self.local_experts):
            gate_up, down = self[expert_id].gate_up_proj, self[expert_id].down_proj
            gate_up.weight = nn.Parameter(
                self.gate_up_weight[index], requires_grad=gate_up.weight.requires_grad
            )
            down.weight = nn.Parameter(self.down_weight[index], requires_grad=down.weight.requires_grad)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> StackedExperts:
        # Convert the stacks once, then re-point the views: converting each expert's view on its own would
        # allocate a second, per-expert copy of every weight.
        super()._apply(fn, recurse=False)
        self._point_experts_at_stacks()
        for expert in self:  # other ranks' placeholders (expert parallelism): their empty parameters
            if isinstance(expert, AbsentExpert):
                expert._apply(fn, recurse)
        return self

    def grouped_forward(
        self, hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, sum_dtype: torch.dtype
    ) -> torch.Tensor:
        """The reference path: each expert runs over the rows routed to it (host-side grouping); its output,
        cast to ``sum_dtype``, times the routing weights is index-added in expert order into a ``sum_dtype``
        accumulator (SDAR: the model dtype; LLaDA2: float32)."""
        out = torch.zeros(hidden.shape, dtype=sum_dtype, device=hidden.device)
        for expert_id, expert in enumerate(self):
            # A token picks distinct experts, so each row appears at most once per expert.
            rows, slots = (expert_ids == expert_id).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            expert_out = expert(hidden[rows]).to(sum_dtype) * weights[rows, slots].unsqueeze(-1)
            out.index_add_(0, rows, expert_out)
        return out

    def fused_forward(
        self, hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor
    ) -> torch.Tensor:
        """The fused Triton path over the stacked weights (slots summed in float32, cast to the input's dtype)."""
        from diffulex.kernels.fused_moe import fused_moe_triton

        return fused_moe_triton(hidden, weights, expert_ids, self.gate_up_weight, self.down_weight)

    def routed(
        self,
        hidden: torch.Tensor,
        route: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        sum_dtype: torch.dtype,
    ) -> torch.Tensor:
        """This rank's routed-expert sum in ``hidden``'s dtype, by the path that applies: the all-to-all
        dispatch under expert parallelism, the fused kernels on CUDA, else the grouped reference (slots
        summed in ``sum_dtype``, then cast). The caller adds any shared expert and all-reduces."""
        if self.expert_parallel is not None:  # routed inside, for this rank's slice of the tokens
            return self.dispatch(hidden, route, sum_dtype).to(hidden.dtype)
        weights, expert_ids = route(hidden)
        if use_fused_moe(hidden):
            return self.fused_forward(hidden, weights, expert_ids)
        return self.grouped_forward(hidden, weights, expert_ids, sum_dtype).to(hidden.dtype)

    def dispatch(
        self,
        hidden: torch.Tensor,
        route: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        sum_dtype: torch.dtype,
    ) -> torch.Tensor:
        """Expert parallelism: this rank's slice of the tokens through every rank's experts (all-to-all),
        zeros for the other rows; ``sum_dtype`` as ``grouped_forward``. The caller all-reduces."""
        local = self.local_experts
        return dispatch_to_experts(
            hidden, route, self, local.start, len(local), sum_dtype, self.expert_parallel
        )

    @property
    def fused_ready(self) -> bool:
        """Whether the stacked weights sit where the fused kernels run (a CUDA device, triton present);
        never under expert parallelism (its dispatch needs host-side sizes and runs the grouped path)."""
        return self.gate_up_weight.is_cuda and _HAS_TRITON and self.expert_parallel is None


class SparseMoeBlock(nn.Module):
    """Top-k routed experts: ``gate`` (the router) and ``experts.{e}``, as in the official checkpoints."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool = True,
    ):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = Linear(hidden_size, num_experts)
        self.experts = StackedExperts(num_experts, hidden_size, intermediate_size)
        self.parallel = get_parallel_state()  # the experts' partial sums are reduced over its group

    @property
    def cuda_graph_safe(self) -> bool:
        """Capturable exactly when the fused path runs (the runner checks this before capturing)."""
        return self.experts.fused_ready

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden [T, hidden]`` -> ``(weights [T, top_k] in hidden's dtype, expert ids [T, top_k])``."""
        router_logits = batch_invariant_linear(hidden, self.gate.weight)
        probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(hidden.dtype), expert_ids

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [T, hidden]`` -> ``[T, hidden]``: the routing-weighted sum of each token's experts."""
        return all_reduce(self.experts.routed(hidden, self.route, hidden.dtype), self.parallel)


class GroupLimitedSigmoidRouter(nn.Module):
    """LLaDA2-MoE's router (``LLaDA2MoeGate``): ``weight [num_experts, hidden]`` and ``expert_bias [num_experts]``.

    Scores are ``sigmoid(x @ weight.T)`` in fp32. Selection uses the biased scores ``scores + expert_bias``:
    experts are split into ``n_group`` equal groups, a group's score is the sum of its two best biased
    scores, the ``topk_group`` best groups are kept and the ``top_k`` best experts among them chosen.
    The weights are the un-biased scores of the chosen experts, normalised to sum to one when ``top_k > 1``,
    times ``routed_scaling_factor``.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        n_group: int,
        topk_group: int,
        routed_scaling_factor: float,
    ):
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if n_group <= 0 or num_experts % n_group != 0 or not 0 < topk_group <= n_group:
            raise ValueError(
                f"n_group={n_group} must divide num_experts={num_experts} and topk_group={topk_group} "
                f"must be in [1, n_group]"
            )
        if top_k > topk_group * (num_experts // n_group):
            raise ValueError(f"top_k={top_k} exceeds the experts of {topk_group} groups")
        self.num_experts, self.top_k = num_experts, top_k
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        # A parameter (not a buffer) so the loader requires it from the checkpoint.
        self.expert_bias = nn.Parameter(torch.empty(num_experts))

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden [T, hidden]`` -> ``(weights [T, top_k] fp32, expert ids [T, top_k])``."""
        logits = batch_invariant_linear(hidden.float(), self.weight.float())
        scores = torch.sigmoid(logits)
        biased = scores + self.expert_bias.float()
        num_tokens = hidden.shape[0]
        grouped = biased.view(num_tokens, self.n_group, -1)
        group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)
        groups = torch.topk(group_scores, self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, groups, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, -1)
        _, expert_ids = torch.topk(biased.masked_fill(~expert_mask, float("-inf")), self.top_k, dim=-1)
        weights = scores.gather(1, expert_ids)
        if self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.routed_scaling_factor, expert_ids


class GroupedSigmoidMoeBlock(nn.Module):
    """LLaDA2-MoE's sparse MLP: ``gate`` (the group-limited sigmoid router), ``experts.{e}`` and, with
    ``num_shared_experts``, ``shared_experts`` (one SwiGLU ``moe_intermediate_size * num_shared_experts``
    wide, applied to every token and added). Fused on CUDA, grouped by expert elsewhere, batch-invariant
    like ``SparseMoeBlock``; the routed sum is accumulated in fp32 (as the official ``moe_infer``) before
    the cast back, on both paths."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        n_group: int,
        topk_group: int,
        routed_scaling_factor: float,
        num_shared_experts: int = 0,
    ):
        super().__init__()
        self.gate = GroupLimitedSigmoidRouter(
            hidden_size, num_experts, top_k, n_group, topk_group, routed_scaling_factor
        )
        self.experts = StackedExperts(num_experts, hidden_size, intermediate_size)
        self.shared_experts = (
            ExpertMLP(hidden_size, intermediate_size * num_shared_experts) if num_shared_experts else None
        )
        self.parallel = get_parallel_state()  # the experts' partial sums are reduced over its group

    @property
    def cuda_graph_safe(self) -> bool:
        """Capturable exactly when the fused path runs (the runner checks this before capturing)."""
        return self.experts.fused_ready

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``hidden [T, hidden]`` -> ``(weights [T, top_k] fp32, expert ids [T, top_k])``."""
        return self.gate(hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [T, hidden]`` -> routed experts (fp32 sum, cast) plus the shared expert."""
        out = self.experts.routed(hidden, self.gate, torch.float32)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return all_reduce(out, self.parallel)  # partial sums of this rank's intermediate slices
