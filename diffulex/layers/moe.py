"""Sparse mixture-of-experts MLP (Qwen3-MoE routing) in plain torch, batch-invariant per token.

The router (``gate``, ``[num_experts, hidden]``, no bias) scores every expert; the scores go through a
softmax in fp32, each token keeps its ``top_k`` experts and, with ``norm_topk_prob``, their weights are
renormalised to sum to one. Tokens are then grouped by expert: each expert gathers the rows routed to it,
runs one SwiGLU over all of them (``batch_invariant_linear`` underneath, so a row's result does not depend
on which other rows share the expert) and its weighted outputs are scatter-added back in expert order.
A token's output is therefore a function of that token alone, whatever the batch.

This is the reference path, correct on CPU and GPU alike; the fused Triton MoE kernel (one grouped GEMM
over all experts, sorted token ids) belongs to the GPU issue and will replace ``forward`` on CUDA there.
"""

from __future__ import annotations

import torch
from torch import nn

from diffulex.layers.linear import Linear, batch_invariant_linear
from diffulex.layers.qwen_blocks import SwiGLUMLP

ExpertMLP = SwiGLUMLP  # one expert: the official gate/up/down names, gate and up merged


class SparseMoeBlock(nn.Module):
    """Top-k routed experts: ``gate`` (the router) and ``experts.{e}``, as in the official checkpoints."""

    # Grouping tokens by expert reads each expert's token count on the host: not capturable in a CUDA
    # graph (the fused MoE kernel of the GPU issue will be). The runner checks this flag.
    cuda_graph_safe = False

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
        self.experts = nn.ModuleList(ExpertMLP(hidden_size, intermediate_size) for _ in range(num_experts))

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
        weights, expert_ids = self.route(hidden)
        out = torch.zeros_like(hidden)
        for expert_id, expert in enumerate(self.experts):
            # A token picks distinct experts, so each row appears at most once per expert.
            rows, slots = (expert_ids == expert_id).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            expert_out = expert(hidden[rows]) * weights[rows, slots].unsqueeze(-1)
            out.index_add_(0, rows, expert_out)
        return out


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
    wide, applied to every token and added). Grouped by expert and batch-invariant like ``SparseMoeBlock``;
    the routed sum is accumulated in fp32 (as the official ``moe_infer``) before the cast back."""

    # Grouping tokens by expert reads each expert's token count on the host: not capturable in a CUDA
    # graph (the fused MoE kernel of the GPU issue will be). The runner checks this flag.
    cuda_graph_safe = False

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
        self.experts = nn.ModuleList(ExpertMLP(hidden_size, intermediate_size) for _ in range(num_experts))
        self.shared_experts = (
            ExpertMLP(hidden_size, intermediate_size * num_shared_experts) if num_shared_experts else None
        )

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(hidden)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.gate(hidden)
        out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
        for expert_id, expert in enumerate(self.experts):
            rows, slots = (expert_ids == expert_id).nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            out.index_add_(0, rows, expert(hidden[rows]).float() * weights[rows, slots].unsqueeze(-1))
        out = out.to(hidden.dtype)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return out
