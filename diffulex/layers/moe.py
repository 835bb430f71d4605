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

from diffulex.layers.activation import silu_and_mul
from diffulex.layers.linear import Linear, MergedLinear, batch_invariant_linear


class ExpertMLP(nn.Module):
    """One expert: ``down(silu(gate(x)) * up(x))``, gate and up merged (official names kept as shards)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = MergedLinear(
            hidden_size, [("gate_proj", intermediate_size), ("up_proj", intermediate_size)]
        )
        self.down_proj = Linear(intermediate_size, hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(*self.gate_up_proj(hidden)))


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
