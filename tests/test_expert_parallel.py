"""Expert parallelism at two ranks on CPU (gloo): the MoE blocks and whole MoE models equal one rank.

Layer level: each rank builds both MoE block kinds whole (one rank) with random weights and as its
expert-parallel shard (two ranks, tensor- and expert-parallel over the same group; half the experts each,
whole), loaded from the whole block's official tensors; the shard's output must equal the whole block's
on token counts that do not split evenly (21), that leave a rank without tokens (1), and with a router
that sends every token to rank 0's experts (rank 1's experts receive nothing). Engine level: a TP=2/EP=2
runner gives the same greedy tokens as one rank on the tiny LLaDA2-MoE and SDAR-MoE checkpoints,
and logits within float32 tolerance.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from diffulex.config import ConfigError, load_engine_config
from diffulex.engine.engine import Engine
from diffulex.engine.tp_runner import TensorParallelRunner
from diffulex.layers.expert_parallel import AbsentExpert, token_slice
from diffulex.layers.linear import UnmergedView, unmerged_parameters
from diffulex.layers.moe import GroupedSigmoidMoeBlock, SparseMoeBlock
from diffulex.layers.parallel_state import ParallelState, reset_parallel_state, using_parallel_state
from diffulex.llm import LLM
from diffulex.models.registry import load_mapped_weights
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint
from tests.parallel_helpers import CPU_OPTIONS, PARAMS, prompts, run_engine, run_on_gloo_ranks

WORLD = 2
HIDDEN = 16
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


def _sparse() -> SparseMoeBlock:
    return SparseMoeBlock(HIDDEN, 8, 6, 2)  # 6 experts: 3 per rank


def _grouped() -> GroupedSigmoidMoeBlock:
    return GroupedSigmoidMoeBlock(HIDDEN, 8, 8, 2, 4, 2, 2.5, num_shared_experts=1)


def _whole_and_shard(build, state: ParallelState):
    reset_parallel_state()
    whole = build()
    with torch.no_grad():
        for param in whole.parameters():
            param.copy_(torch.randn_like(param) * 0.3)
    with using_parallel_state(state):
        shard = build()
    load_mapped_weights(UnmergedView(shard), unmerged_parameters(whole), lambda name: name)
    return whole, shard


def _favour_rank_0(block: torch.nn.Module) -> None:
    """Route every token (of positive inputs) to experts of rank 0 only."""
    with torch.no_grad():
        if isinstance(block, SparseMoeBlock):
            weight = block.gate.weight.abs()
            weight[3:] *= -1  # experts 3-5 (rank 1) score below every expert of rank 0
            block.gate.weight.copy_(weight)
        else:
            block.gate.expert_bias[4:] = -100.0  # groups 2-3 (experts 4-7, rank 1) are never picked


def _check_all(rank: int) -> None:
    import torch.distributed as dist

    group = dist.group.WORLD
    state = ParallelState(
        tp_rank=rank, tp_size=WORLD, tp_group=group, ep_rank=rank, ep_size=WORLD, ep_group=group
    )
    for build in (_sparse, _grouped):
        torch.manual_seed(0)
        whole, shard = _whole_and_shard(build, state)
        experts = shard.experts
        num_experts = len(experts)
        assert list(experts.local_experts) == list(
            range(rank * num_experts // 2, (rank + 1) * num_experts // 2)
        )
        assert experts.gate_up_weight.shape == (num_experts // 2, 16, HIDDEN)  # whole experts, half of them
        assert sum(isinstance(expert, AbsentExpert) for expert in experts) == num_experts // 2
        assert not experts.fused_ready
        for num_tokens in (21, 1, 2):  # uneven split; rank 1 without tokens; one token each
            x = torch.randn(num_tokens, HIDDEN)
            torch.testing.assert_close(shard(x), whole(x), **TOLERANCE)
        _favour_rank_0(whole)
        _favour_rank_0(shard)
        x = torch.rand(9, HIDDEN) + 0.1
        assert int(whole.route(x)[1].max()) < num_experts // 2
        torch.testing.assert_close(shard(x), whole(x), **TOLERANCE)
        if build is _sparse:  # no shared experts: the same sums in the same order, bit for bit
            assert torch.equal(shard(x), whole(x))
    reset_parallel_state()


def test_expert_parallel_blocks_at_two_ranks_equal_one_rank() -> None:
    run_on_gloo_ranks(_check_all, WORLD)


def test_sizes_are_checked() -> None:
    assert [token_slice(5, 2, rank) for rank in range(2)] == [(0, 3), (3, 5)]
    assert [token_slice(1, 2, rank) for rank in range(2)] == [(0, 1), (1, 1)]
    state = ParallelState(tp_rank=0, tp_size=4, ep_rank=0, ep_size=4)
    with pytest.raises(ValueError, match="num_experts=6 is not divisible by expert_parallel_size=4"):
        with using_parallel_state(state):
            SparseMoeBlock(HIDDEN, 8, 6, 2)
    with pytest.raises(ValueError, match="ep_size 1 or tp_size=4"):
        with using_parallel_state(ParallelState(tp_rank=0, tp_size=4, ep_rank=0, ep_size=2)):
            pass
    assert (
        load_engine_config(model="m", tensor_parallel_size=2, expert_parallel_size=2).expert_parallel_size
        == 2
    )
    with pytest.raises(ConfigError, match="expert_parallel_size=2 must be 1 or equal tensor_parallel_size=1"):
        load_engine_config(model="m", expert_parallel_size=2)


# ----- engine level --------------------------------------------------------------------------------------
CASES = {"llada2_moe": ("block_diffusion", "d2f"), "sdar_moe": ("block_diffusion",)}


@pytest.mark.parametrize("family", list(CASES))
def test_expert_parallel_greedy_outputs_equal_one_rank(
    family: str, tmp_path_factory: pytest.TempPathFactory, make_llm: Callable[..., LLM]
) -> None:
    path = write_tiny_checkpoint(family, tmp_path_factory.mktemp("ep") / family, seed=7)
    parallel = {"tensor_parallel_size": 2, "expert_parallel_size": 2}
    runner = TensorParallelRunner(load_engine_config(model=str(path), **parallel, **CPU_OPTIONS))
    try:
        experts = next(m for m in runner.runner.model.modules() if hasattr(m, "local_experts"))
        assert len(experts.local_experts) == len(experts) // 2  # rank 0 holds half the experts
        for strategy in CASES[family]:
            reference = make_llm(path, strategy=strategy, **CPU_OPTIONS)
            config = load_engine_config(model=str(path), strategy=strategy, **parallel, **CPU_OPTIONS)
            engine = Engine(config, runner=runner)  # type: ignore[arg-type]
            for batch in (prompts(), prompts()[-1:]):
                expected = [output.token_ids for output in reference.generate(batch, PARAMS)]
                assert run_engine(engine, batch) == expected, strategy
            assert engine.kv_cache.is_whole()
            assert engine.unhealthy_reason() is None
        tokens = prompts()[4]
        block_ids = [position // 4 for position in range(len(tokens))]
        expected_logits = reference.engine.runner.full_logits(tokens, block_ids)
        torch.testing.assert_close(
            runner.full_logits(tokens, block_ids), expected_logits, atol=1e-4, rtol=1e-4
        )
    finally:
        runner.close()
    assert not any(process.is_alive() for process in runner.processes)


def test_flag_and_experts_that_do_not_split(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from diffulex.cli import app as cli_app

    odd = write_tiny_checkpoint("sdar_moe", tmp_path / "odd-experts", seed=7, num_experts=3)
    launched = []
    monkeypatch.setattr("diffulex.server.app.build_and_run", lambda e, s: launched.append(e))
    flags = ["--tensor-parallel-size", "2", "--expert-parallel-size", "2"]
    result = CliRunner().invoke(cli_app, ["serve", "--model", str(odd), *flags])
    assert result.exit_code == 0, result.output
    assert (launched[0].tensor_parallel_size, launched[0].expert_parallel_size) == (2, 2)
    # Every rank fails to build its experts and rank 0 says which and why.
    with pytest.raises(
        RuntimeError,
        match=r"rank 0 failed to start: .*num_experts=3 is not divisible by expert_parallel_size=2",
    ):
        TensorParallelRunner(
            load_engine_config(model=str(odd), tensor_parallel_size=2, expert_parallel_size=2, **CPU_OPTIONS)
        )
