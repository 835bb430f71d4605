"""Tensor-parallel layers at two ranks (two gloo processes) against the same layers at one rank.

Each rank builds every layer twice from the same seed: whole (a single rank, as without tensor
parallelism) and as its shard, loaded from the whole layer's official tensors through the weight loader
(``UnmergedView.load_slice``). The shard's output (all-reduced or gathered where the layer does so) must
equal the whole layer's, or its slice of it, to float32 tolerance.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffulex.layers.linear import (
    ColumnParallelLinear,
    RowParallelLinear,
    UnmergedView,
    qkv_linear,
    unmerged_parameters,
)
from diffulex.layers.moe import GroupedSigmoidMoeBlock, SparseMoeBlock
from diffulex.layers.parallel_state import (
    ParallelState,
    reset_parallel_state,
    set_parallel_state,
    split_heads,
)
from diffulex.layers.qwen_blocks import SwiGLUMLP
from diffulex.layers.vocab_parallel import ParallelLMHead, VocabParallelEmbedding
from diffulex.models.registry import load_mapped_weights
from tests.parallel_helpers import run_on_gloo_ranks

WORLD = 2
HIDDEN = 16
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def _whole_and_shard(build, rank: int, group) -> tuple[nn.Module, nn.Module]:
    """``build()`` at one rank with random weights, then at ``rank`` of ``WORLD`` loaded from it."""
    reset_parallel_state()
    whole = build()
    with torch.no_grad():
        for param in whole.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    set_parallel_state(ParallelState(tp_rank=rank, tp_size=WORLD, tp_group=group))
    shard = build()
    load_mapped_weights(UnmergedView(shard), unmerged_parameters(whole), lambda name: name)
    return whole, shard


def _check_all(rank: int) -> None:
    import torch.distributed as dist

    group = dist.group.WORLD
    torch.manual_seed(0)
    x = torch.randn(21, HIDDEN)  # 21 rows: more than one batch-invariant tile, not a multiple of it

    whole, shard = _whole_and_shard(lambda: ColumnParallelLinear(HIDDEN, 12, bias=True), rank, group)
    torch.testing.assert_close(shard(x), whole(x)[:, rank * 6 : rank * 6 + 6], **TOLERANCE)

    whole, shard = _whole_and_shard(lambda: RowParallelLinear(12, HIDDEN, bias=True), rank, group)
    wide = torch.randn(21, 12)
    torch.testing.assert_close(shard(wide[:, rank * 6 : rank * 6 + 6]), whole(wide), **TOLERANCE)

    for num_kv_heads in (2, 1):  # split KV heads, then one KV head replicated on both ranks
        split = split_heads(4, num_kv_heads, rank, WORLD)
        whole, shard = _whole_and_shard(
            lambda kv=num_kv_heads: qkv_linear(HIDDEN, split_heads(4, kv), 4, kv, 3, True), rank, group
        )
        q, k, v = whole(x)
        q_shard, k_shard, v_shard = shard(x)
        torch.testing.assert_close(q_shard, q[:, split.q_start * 3 : (split.q_start + 2) * 3], **TOLERANCE)
        kv_cols = slice(split.kv_start * 3, (split.kv_start + split.num_kv_heads) * 3)
        torch.testing.assert_close(k_shard, k[:, kv_cols], **TOLERANCE)
        torch.testing.assert_close(v_shard, v[:, kv_cols], **TOLERANCE)

    whole, shard = _whole_and_shard(lambda: SwiGLUMLP(HIDDEN, 10), rank, group)
    torch.testing.assert_close(shard(x), whole(x), **TOLERANCE)

    # 255 rows: the vocabulary does not split evenly, the last shard is padded.
    ids = torch.tensor([0, 5, 127, 128, 200, 254, 128, 3])
    whole, shard = _whole_and_shard(lambda: VocabParallelEmbedding(255, HIDDEN), rank, group)
    torch.testing.assert_close(shard(ids), whole(ids), **TOLERANCE)
    whole, shard = _whole_and_shard(lambda: ParallelLMHead(HIDDEN, 255, bias=True), rank, group)
    logits = shard(x)
    if rank == 0:
        torch.testing.assert_close(logits, whole(x), **TOLERANCE)
    else:
        assert logits is None  # only rank 0 samples

    whole, shard = _whole_and_shard(lambda: SparseMoeBlock(HIDDEN, 8, 6, 2), rank, group)
    torch.testing.assert_close(shard(x), whole(x), **TOLERANCE)
    whole, shard = _whole_and_shard(
        lambda: GroupedSigmoidMoeBlock(HIDDEN, 8, 8, 2, 4, 2, 2.5, num_shared_experts=1), rank, group
    )
    torch.testing.assert_close(shard(x), whole(x), **TOLERANCE)


def test_parallel_layers_at_two_ranks_equal_one_rank() -> None:
    run_on_gloo_ranks(_check_all, WORLD)


def test_head_and_size_splits_name_the_model_value() -> None:
    assert split_heads(8, 8, rank=1, size=2) == split_heads(8, 8, 1, 2)
    assert split_heads(8, 2, rank=3, size=4).kv_start == 1  # query heads 6-7 read KV head 1
    assert split_heads(8, 1, rank=1, size=4).num_kv_heads == 1  # the single KV head, replicated
    with pytest.raises(ValueError, match="num_attention_heads=6 is not divisible by tensor_parallel_size=4"):
        split_heads(6, 6, rank=0, size=4)
    with pytest.raises(ValueError, match="num_key_value_heads=3 is fewer than tensor_parallel_size=4"):
        split_heads(12, 3, rank=0, size=4)
