"""Several denoise iterations per host sync give exactly the outputs of one iteration per step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffulex.sampling.device_selection import DeviceUnmasker
from diffulex.sampling.selection import select_above, select_top_k
from diffulex.sampling_params import SamplingParams


def _host_choice(confidences: np.ndarray, masked: list[int], count: int, threshold: float | None) -> set[int]:
    """The strategies' rule on the host, over the still-masked rows (as block_diffusion applies it)."""
    candidate_conf = confidences[masked]
    k = min(count, len(masked))
    picked = select_top_k(candidate_conf, k)
    if threshold is not None:
        above = select_above(candidate_conf, threshold)
        if above.shape[0] >= k:
            picked = above
    return {masked[i] for i in picked}


def test_device_unmasker_equals_host_rules_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        num_seqs = int(rng.integers(1, 5))
        rows = [int(rng.integers(1, 9)) for _ in range(num_seqs)]
        iterations = 4
        counts = [[int(rng.integers(0, 4)) for _ in range(num_seqs)] for _ in range(iterations)]
        thresholds = [None if rng.random() < 0.5 else float(rng.choice([0.3, 0.5, 0.7])) for _ in rows]
        unmasker = DeviceUnmasker(rows, counts, thresholds, torch.device("cpu"))
        masked = [list(range(n)) for n in rows]
        for iteration in range(iterations):
            confidences = np.round(rng.random(sum(rows)), 1)  # one decimal: many ties
            chosen = unmasker.select(torch.from_numpy(confidences), iteration).numpy()
            start = 0
            for seq, n in enumerate(rows):
                expected = _host_choice(
                    confidences[start : start + n], masked[seq], counts[iteration][seq], thresholds[seq]
                )
                assert set(np.flatnonzero(chosen[start : start + n]).tolist()) == expected
                masked[seq] = [j for j in masked[seq] if j not in expected]
                start += n


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_unmasker_never_waits_for_the_gpu() -> None:
    """The loop's point is that the host enqueues every iteration without waiting: a synchronising op in
    ``select`` (a host scalar copied in, a data-dependent shape) made the GPU idle ~0.4 ms per forward."""
    rows, iterations = [32, 32], 8
    unmasker, stepper = (
        DeviceUnmasker(rows, [[4, 4]] * iterations, [None, 0.5], torch.device("cuda")) for _ in range(2)
    )
    confidences = [torch.rand(sum(rows), device="cuda", dtype=torch.float64) for _ in range(iterations)]
    ids = torch.arange(64, device="cuda")
    tokens = torch.full((64,), -1, dtype=torch.long, device="cuda")
    records = torch.empty(iterations, 4, 64, dtype=torch.float64, device="cuda")
    stepper.step(ids, confidences[0], 0, tokens.clone(), ids, records[0].clone())  # compile (not measured)
    stepper = DeviceUnmasker(rows, [[4, 4]] * iterations, [None, 0.5], torch.device("cuda"))
    torch.cuda.synchronize()
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        chosen = [unmasker.select(confidences[k], k) for k in range(iterations)]
        for k in range(iterations):  # the one-kernel step
            stepper.step(ids, confidences[k], k, tokens, ids, records[k])
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert int(torch.stack(chosen).sum()) == 64  # every row accepted once over the 8 iterations
    assert int(records[:, 2].sum()) == 64 and torch.equal(tokens, ids)


_STEP_CHILD = """
import sys
import torch
from diffulex.sampling.device_selection import DeviceUnmasker

cases = torch.load(sys.argv[1])
out = []
for case in cases:
    unmasker = DeviceUnmasker(case["rows"], case["counts"], case["thresholds"], torch.device("cpu"))
    tokens = case["tokens"].clone()
    records = torch.empty(len(case["counts"]), 4, unmasker.num_rows, dtype=torch.float64)
    for k in range(len(case["counts"])):
        unmasker.step_triton(case["ids"][k], case["conf"][k], k, tokens, case["token_rows"], records[k])
    out.append((records, tokens, unmasker.masked.clone()))
torch.save(out, sys.argv[2])
"""


def _step_cases(num_cases: int = 40) -> list[dict]:
    rng = np.random.default_rng(1)
    cases = []
    for _ in range(num_cases):
        rows = [int(rng.integers(1, 20)) for _ in range(int(rng.integers(1, 5)))]
        iterations = 5
        num_rows = sum(rows)
        cases.append(
            {
                "rows": rows,
                "counts": [[int(rng.integers(0, 5)) for _ in rows] for _ in range(iterations)],
                "thresholds": [
                    None if rng.random() < 0.5 else float(rng.choice([0.3, 0.5, 0.7])) for _ in rows
                ],
                "conf": [torch.from_numpy(np.round(rng.random(num_rows), 1)) for _ in range(iterations)],
                "ids": [torch.from_numpy(rng.integers(0, 1000, num_rows)) for _ in range(iterations)],
                "tokens": torch.full((num_rows + 7,), 999, dtype=torch.long),
                "token_rows": torch.from_numpy(rng.permutation(num_rows + 7)[:num_rows]),
            }
        )
    return cases


def test_unmask_step_kernel_interpreter_equals_torch_step(tmp_path) -> None:
    """The one-kernel GPU step (Triton interpreter) gives the torch step's records, tokens and state."""
    pytest.importorskip("triton")
    from tests.interpreter import run_interpreted

    cases = _step_cases()
    got = run_interpreted(_STEP_CHILD, cases, tmp_path)
    for case, (records, tokens, masked) in zip(cases, got, strict=True):
        unmasker = DeviceUnmasker(case["rows"], case["counts"], case["thresholds"], torch.device("cpu"))
        expected_tokens = case["tokens"].clone()
        expected = torch.empty_like(records)
        for k in range(len(case["counts"])):
            unmasker.step(
                case["ids"][k], case["conf"][k], k, expected_tokens, case["token_rows"], expected[k]
            )
        assert torch.equal(records, expected)
        assert torch.equal(tokens, expected_tokens)
        assert torch.equal(masked, unmasker.masked)


def test_device_loop_flags_a_nan_forward_for_that_sequence_and_iteration() -> None:
    """A NaN logit shows up as a NaN confidence, which marks exactly that sequence of that iteration."""
    from diffulex.engine.denoise_loop import run_denoise_loop, write_rows
    from diffulex.sampling.confidence import sample_tokens
    from diffulex.step import SampleSpec, SequencePlan, StepPlan

    mask, vocab, iterations = 99, 100, 4
    sequences = [
        SequencePlan(
            request_id=name,
            token_ids=[mask] * 4,
            positions=list(range(4)),
            block_ids=[0] * 4,
            sample_indices=[0, 1, 2, 3],
            loop_counts=(1, 1, 1, 1),
        )
        for name in ("a", "b")
    ]
    plan = StepPlan.pack(sequences, [[0], [1]], page_size=4)
    calls = []

    def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.randn(8, vocab, generator=torch.Generator().manual_seed(len(calls)))
        if len(calls) == 2:
            logits[5, 17] = float("nan")  # a row of sequence "b", third iteration
        calls.append(None)
        return logits

    out = run_denoise_loop(
        plan,
        iterations,
        forward=lambda: torch.zeros(8, 4),
        compute_logits=compute_logits,
        sample=lambda logits: sample_tokens(logits, SampleSpec(), mask),
        tokens=torch.from_numpy(plan.input_ids.copy()),
        token_rows=torch.from_numpy(write_rows(plan)),
    )
    per_iteration = [out.sequences, *out.iterations]
    failed = [[seq.failed for seq in outputs] for outputs in per_iteration]
    assert failed == [[False, False], [False, False], [False, True], [False, False]]


PROMPTS = [[5, 9, 13], [7] * 11, [3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize(
    "options",
    [
        {"remasking": "static"},
        {"remasking": "dynamic"},
        {"remasking": "static", "fuse_block_store": True},
    ],
    ids=["static", "dynamic", "fused-store"],
)
def test_device_loop_equals_one_iteration_per_step(make_llm, tiny_sdar, options) -> None:
    params = SamplingParams(max_tokens=24, steps=24, threshold=0.3, ignore_eos=True)
    per_step = make_llm(tiny_sdar, strategy="block_diffusion", denoise_iterations_per_sync=1, **options)
    looped = make_llm(tiny_sdar, strategy="block_diffusion", denoise_iterations_per_sync=8, **options)
    for prompts in (PROMPTS[:1], PROMPTS):  # alone and in a batch (phases differ: loops engage less)
        expected = per_step.generate(prompts, params)
        got = looped.generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in expected]
        assert [o.num_forwards for o in got] == [o.num_forwards for o in expected]
    # Alone, the loop really runs: fewer engine steps (host syncs) than without it.
    syncs = []
    for llm in (per_step, looped):
        before = llm.engine.num_steps
        llm.generate(PROMPTS[:1], params)
        syncs.append(llm.engine.num_steps - before)
    assert syncs[1] <= 0.8 * syncs[0]


def test_device_loop_stops_at_eos_like_per_step(make_llm, tiny_sdar) -> None:
    """A stop inside a loop ends the request at the same forward as without the loop."""
    per_step = make_llm(tiny_sdar, strategy="block_diffusion", denoise_iterations_per_sync=1)
    looped = make_llm(tiny_sdar, strategy="block_diffusion", denoise_iterations_per_sync=8)
    probe = per_step.generate([PROMPTS[1]], SamplingParams(max_tokens=16, steps=16, ignore_eos=True))[0]
    stop_id = probe.token_ids[5]  # a token the model does produce: stop on it
    params = SamplingParams(max_tokens=16, steps=16, stop_token_ids=[stop_id])
    expected = per_step.generate([PROMPTS[1]], params)[0]
    got = looped.generate([PROMPTS[1]], params)[0]
    assert expected.finish_reason == "stop"
    assert (got.token_ids, got.num_forwards, got.finish_reason) == (
        expected.token_ids,
        expected.num_forwards,
        expected.finish_reason,
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fuse_block_store", [False, True])
def test_device_loop_on_gpu_graphs_equals_cpu(make_llm, tiny_sdar, fuse_block_store) -> None:
    """The loop over replayed CUDA graphs (fp32: no TF32) gives the CPU's per-step tokens and forwards."""
    params = SamplingParams(max_tokens=24, steps=24, ignore_eos=True)
    options = {"strategy": "block_diffusion", "remasking": "static", "fuse_block_store": fuse_block_store}
    cpu = make_llm(tiny_sdar, denoise_iterations_per_sync=1, **options)
    gpu = make_llm(tiny_sdar, device="cuda", dtype="float32", denoise_iterations_per_sync=8, **options)
    assert gpu.engine.runner.graph_sets
    for prompts in (PROMPTS[:1], PROMPTS):
        expected = cpu.generate(prompts, params)
        before = gpu.engine.num_steps
        got = gpu.generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in expected]
        assert [o.num_forwards for o in got] == [o.num_forwards for o in expected]
    assert gpu.engine.num_steps - before < sum(o.num_forwards for o in got)
