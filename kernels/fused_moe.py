"""Fused mixture-of-experts MLP: top-k routed SwiGLU experts as Triton grouped GEMMs, graph-capturable.

Given ``hidden [T, H]``, each token's ``top_k`` expert ids and routing weights ``[T, K]``, and the experts'
stacked weights ``gate_up [E, 2I, H]`` (gate rows first, then up rows: one merged projection per expert)
and ``down [E, H, I]``, compute ``sum_k weight[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t))`` with
``e = ids[t, k]``. Five launches, all with shapes fixed by ``(T, K, E)``, none reading anything back to
the host, so the whole path can be captured in a CUDA graph:

1. + 2. ``align_pairs_to_experts`` (``kernels/moe_align.py``): the ``T*K`` (token, slot) pairs grouped by
   expert on the device, each expert's segment padded to ``block_m`` rows inside a buffer of static
   upper-bound size ``T*K + min(E, T*K) * (block_m - 1)`` (rounded to whole tiles), plus each tile's
   expert (a sentinel past the used tiles, which the GEMMs skip).
3. ``_gate_up_kernel`` (tiles x ``I`` blocks): gathers its tile's token rows, multiplies them by the
   expert's gate and up rows, and stores ``silu(gate) * up`` per pair into ``intermediate [T*K, I]``.
4. ``_down_kernel`` (tiles x ``H`` blocks): ``intermediate @ down_e.T`` times the pair's routing weight,
   stored in float32 per pair into ``slot_out [T*K, H]`` (= ``[T, K, H]``).
5. ``_sum_slots_kernel`` (tokens x ``H`` blocks): ``out[t] = sum_k slot_out[t, k]`` in float32, in slot
   order 0..K-1, cast once to the hidden dtype (LLaDA2's ``moe_infer`` also sums the routed experts in
   float32 before the cast).

Roundings follow the experts' torch code (``SwiGLUMLP`` in the model dtype): the gate and up products are
rounded to the model dtype, ``silu`` runs in float32 and is rounded, the product with ``up`` is rounded;
the down product is rounded to the model dtype before the float32 multiply by the routing weight.

**Batch invariance.** A token's output depends on that token alone: every pair is one row of its tile,
and a row of ``tl.dot`` is computed from that row and the weights only; each GEMM reduces over ``H`` (or
``I``) in fixed ``block_k`` chunks in ascending order, the tile configuration (:func:`default_moe_config`)
depends on ``(H, I)`` and never on ``T``, and the slot sum runs in fixed slot order with no atomics. So
which other tokens share the batch (and so which tile row a pair lands in) cannot change its bits.

``fused_moe_reference`` computes the same math in plain torch (one expert at a time, host-side grouping):
it is the ground truth of the tests, not a fast path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffulex.kernels.moe_align import align_pairs_to_experts

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is absent on some CPU-only platforms
    triton = None
    tl = None


def fused_moe_available() -> bool:
    """Whether the Triton kernels can run (triton importable)."""
    return triton is not None


# --------------------------------------------------------------------------------------------------------
# Torch reference
# --------------------------------------------------------------------------------------------------------


def fused_moe_reference(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
) -> torch.Tensor:
    """The fused kernel's math in plain torch: per-pair SwiGLU outputs, weighted in float32, summed over
    the slots in slot order, cast to ``hidden``'s dtype. Shapes as :func:`fused_moe_triton`."""
    num_tokens, top_k = topk_ids.shape
    intermediate = down_weight.shape[-1]
    slot_out = torch.zeros(num_tokens, top_k, hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    for expert in range(gate_up_weight.shape[0]):
        rows, slots = (topk_ids == expert).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        gate, up = (hidden[rows] @ gate_up_weight[expert].T).split(intermediate, dim=-1)
        activated = F.silu(gate.float()).to(hidden.dtype) * up
        expert_out = activated @ down_weight[expert].T
        slot_out[rows, slots] = expert_out.float() * topk_weights[rows, slots].float().unsqueeze(-1)
    out = slot_out[:, 0]
    for slot in range(1, top_k):
        out = out + slot_out[:, slot]
    return out.to(hidden.dtype)


# --------------------------------------------------------------------------------------------------------
# Tile configuration
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoeTileConfig:
    """Tile sizes of the two GEMMs. ``block_m`` (pairs per tile) is shared: the alignment pads each
    expert's segment to it. Chosen from the layer's shape only, never from the token count (batch
    invariance, see the module docstring)."""

    block_m: int = 16
    gate_up_block_n: int = 32
    gate_up_block_k: int = 128
    gate_up_warps: int = 4
    gate_up_stages: int = 4
    down_block_n: int = 64
    down_block_k: int = 64
    down_warps: int = 4
    down_stages: int = 4


def default_moe_config(hidden_size: int, intermediate_size: int) -> MoeTileConfig:
    """The tile configuration for an ``(H, I)`` layer. The step is bound by reading expert weights, so
    tiles are narrow in N (more programs stream weights at T = 1) and ``block_m`` is 16 (the fewest padding
    rows per expert). Small layers get blocks no larger than their dimensions (at least 16, ``tl.dot``'s
    minimum)."""

    def fit(block: int, size: int) -> int:
        return max(16, min(block, triton.next_power_of_2(size) if triton is not None else block))

    base = MoeTileConfig()
    return MoeTileConfig(
        block_m=base.block_m,
        gate_up_block_n=fit(base.gate_up_block_n, intermediate_size),
        gate_up_block_k=fit(base.gate_up_block_k, hidden_size),
        gate_up_warps=base.gate_up_warps,
        gate_up_stages=base.gate_up_stages,
        down_block_n=fit(base.down_block_n, hidden_size),
        down_block_k=fit(base.down_block_k, intermediate_size),
        down_warps=base.down_warps,
        down_stages=base.down_stages,
    )


# --------------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _gate_up_kernel(
        hidden_ptr,
        weight_ptr,
        out_ptr,
        sorted_pairs_ptr,
        tile_experts_ptr,
        num_pairs,
        num_experts,
        num_tiles,
        H,
        INTER,
        stride_hidden,
        stride_we,
        stride_wn,
        TOP_K: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        tile, block_n = pid % num_tiles, pid // num_tiles  # tiles fastest: one expert's tiles run together
        expert = tl.load(tile_experts_ptr + tile)
        if expert >= num_experts:
            return
        pairs = tl.load(sorted_pairs_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs < num_pairs
        tokens = (pairs // TOP_K).to(tl.int64)
        cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < INTER
        weight = weight_ptr + expert.to(tl.int64) * stride_we
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):  # fixed-order reduction over H (batch invariance)
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            x = tl.load(
                hidden_ptr + tokens[:, None] * stride_hidden + ks[None, :],
                mask=valid[:, None] & k_ok[None, :],
                other=0.0,
            )
            w_mask = k_ok[:, None] & col_ok[None, :]
            w_gate = tl.load(weight + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)
            w_up = tl.load(weight + (cols[None, :] + INTER) * stride_wn + ks[:, None], mask=w_mask, other=0.0)
            acc_gate += tl.dot(x, w_gate, input_precision=DOT_PRECISION)
            acc_up += tl.dot(x, w_up, input_precision=DOT_PRECISION)
        dtype = out_ptr.dtype.element_ty
        gate = acc_gate.to(dtype).to(tl.float32)
        activated = (gate / (1.0 + tl.exp(-gate))).to(dtype)  # F.silu: float32 math, rounded
        product = (activated.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
        out = out_ptr + pairs.to(tl.int64)[:, None] * INTER + cols[None, :]
        tl.store(out, product, mask=valid[:, None] & col_ok[None, :])

    @triton.jit
    def _down_kernel(
        inter_ptr,
        weight_ptr,
        routing_ptr,
        slot_out_ptr,
        sorted_pairs_ptr,
        tile_experts_ptr,
        num_pairs,
        num_experts,
        num_tiles,
        H,
        INTER,
        stride_we,
        stride_wn,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        pid = tl.program_id(0)
        tile, block_n = pid % num_tiles, pid // num_tiles
        expert = tl.load(tile_experts_ptr + tile)
        if expert >= num_experts:
            return
        pairs = tl.load(sorted_pairs_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs < num_pairs
        rows = pairs.to(tl.int64)
        cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < H
        weight = weight_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, INTER, BLOCK_K):  # fixed-order reduction over I (batch invariance)
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < INTER
            a = tl.load(
                inter_ptr + rows[:, None] * INTER + ks[None, :],
                mask=valid[:, None] & k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                weight + cols[None, :] * stride_wn + ks[:, None],
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc += tl.dot(a, w, input_precision=DOT_PRECISION)
        routing = tl.load(routing_ptr + rows, mask=valid, other=0.0).to(tl.float32)
        expert_out = acc.to(inter_ptr.dtype.element_ty).to(tl.float32)  # the expert's output, model dtype
        tl.store(
            slot_out_ptr + rows[:, None] * H + cols[None, :],
            expert_out * routing[:, None],
            mask=valid[:, None] & col_ok[None, :],
        )

    @triton.jit
    def _sum_slots_kernel(slot_out_ptr, out_ptr, H, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        col_ok = cols < H
        acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for slot in tl.static_range(TOP_K):  # slot order, fixed
            acc += tl.load(slot_out_ptr + (token * TOP_K + slot) * H + cols, mask=col_ok, other=0.0)
        tl.store(out_ptr + token * H + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


# --------------------------------------------------------------------------------------------------------
# Wrappers
# --------------------------------------------------------------------------------------------------------


def _need_triton() -> None:
    if triton is None:
        raise RuntimeError("the fused MoE kernels need triton")


def _check_shapes(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
) -> None:
    if hidden.dim() != 2 or topk_ids.dim() != 2 or topk_weights.shape != topk_ids.shape:
        raise ValueError(
            f"hidden [T, H] and topk_weights/topk_ids [T, K] expected, got {tuple(hidden.shape)}, "
            f"{tuple(topk_weights.shape)}, {tuple(topk_ids.shape)}"
        )
    if topk_ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"topk_ids has {topk_ids.shape[0]} rows for {hidden.shape[0]} tokens")
    num_experts, two_inter, hidden_size = gate_up_weight.shape
    if hidden_size != hidden.shape[1] or two_inter % 2 != 0:
        raise ValueError(f"gate_up_weight {tuple(gate_up_weight.shape)} is not [E, 2I, H={hidden.shape[1]}]")
    if down_weight.shape != (num_experts, hidden_size, two_inter // 2):
        raise ValueError(
            f"down_weight {tuple(down_weight.shape)} is not [E, H, I] = "
            f"[{num_experts}, {hidden_size}, {two_inter // 2}]"
        )
    if gate_up_weight.stride(-1) != 1 or down_weight.stride(-1) != 1:
        raise ValueError("expert weights must be contiguous in their last dimension")


def fused_moe_triton(
    hidden: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up_weight: torch.Tensor,
    down_weight: torch.Tensor,
    config: MoeTileConfig | None = None,
) -> torch.Tensor:
    """Routing-weighted sum of each token's SwiGLU experts (module docstring), in ``hidden``'s dtype.

    ``hidden [T, H]``; ``topk_weights [T, K]`` (any float dtype, used in float32); ``topk_ids [T, K]``
    (distinct experts per token, values in ``[0, E)``); ``gate_up_weight [E, 2I, H]`` (gate rows then up
    rows) and ``down_weight [E, H, I]`` in ``hidden``'s dtype. No host synchronisation: capturable.
    """
    _need_triton()
    _check_shapes(hidden, topk_weights, topk_ids, gate_up_weight, down_weight)
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden_size = gate_up_weight.shape
    inter = two_inter // 2
    out = torch.empty((num_tokens, hidden_size), dtype=hidden.dtype, device=hidden.device)
    if num_tokens == 0:
        return out
    config = config or default_moe_config(hidden_size, inter)
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    num_pairs = num_tokens * top_k
    sorted_pairs, tile_experts = align_pairs_to_experts(topk_ids, num_experts, config.block_m)
    num_tiles = tile_experts.numel()
    # fp32 inputs get true fp32 products (no TF32), so the fp32 path matches the reference closely.
    precision = "ieee" if hidden.dtype == torch.float32 else "tf32"

    intermediate = torch.empty((num_pairs, inter), dtype=hidden.dtype, device=hidden.device)
    _gate_up_kernel[(num_tiles * triton.cdiv(inter, config.gate_up_block_n),)](
        hidden,
        gate_up_weight,
        intermediate,
        sorted_pairs,
        tile_experts,
        num_pairs,
        num_experts,
        num_tiles,
        hidden_size,
        inter,
        hidden.stride(0),
        gate_up_weight.stride(0),
        gate_up_weight.stride(1),
        TOP_K=top_k,
        BLOCK_M=config.block_m,
        BLOCK_N=config.gate_up_block_n,
        BLOCK_K=config.gate_up_block_k,
        DOT_PRECISION=precision,
        num_warps=config.gate_up_warps,
        num_stages=config.gate_up_stages,
    )
    slot_out = torch.empty((num_pairs, hidden_size), dtype=torch.float32, device=hidden.device)
    routing = topk_weights.reshape(-1)
    routing = routing if routing.is_contiguous() else routing.contiguous()
    _down_kernel[(num_tiles * triton.cdiv(hidden_size, config.down_block_n),)](
        intermediate,
        down_weight,
        routing,
        slot_out,
        sorted_pairs,
        tile_experts,
        num_pairs,
        num_experts,
        num_tiles,
        hidden_size,
        inter,
        down_weight.stride(0),
        down_weight.stride(1),
        BLOCK_M=config.block_m,
        BLOCK_N=config.down_block_n,
        BLOCK_K=config.down_block_k,
        DOT_PRECISION=precision,
        num_warps=config.down_warps,
        num_stages=config.down_stages,
    )
    block_h = min(1024, triton.next_power_of_2(hidden_size))
    _sum_slots_kernel[(num_tokens, triton.cdiv(hidden_size, block_h))](
        slot_out, out, hidden_size, TOP_K=top_k, BLOCK_H=block_h, num_warps=4
    )
    return out
