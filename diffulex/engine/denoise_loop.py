"""Several greedy denoise iterations of one StepPlan on the device, one host sync for all of them.

At batch size 1 the GPU finishes a denoise forward of an 8B model in about 5 ms, and the host work
around it (building the plan, launching, copying ids back, applying them) is a large part of that
again. When every sequence of a step is a pure denoise query whose strategy can state its next unmask
counts in advance (``SequencePlan.loop_counts``), the runner instead runs ``N`` iterations back to back:
forward, greedy sampling, the strategy's unmasking rule on the device (``DeviceUnmasker``), the accepted
tokens written into the query, next forward. The host enqueues all of it without waiting and copies the
results once.

The host then replays the ``N`` iterations through the strategy's own ``update`` (the engine does this),
so what a request commits is decided by exactly the same code as without the loop; the device's choice
only has to agree with it for the later iterations to be usable, and the engine checks that it does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from diffulex.sampling.device_selection import DeviceUnmasker
from diffulex.step import SequenceOutput, StepOutput, StepPlan


def _sampling_key(plan_sequence) -> tuple:
    spec = plan_sequence.sample
    return (spec.temperature, spec.policy, spec.softmax_dtype, spec.top_k, spec.top_p)


def loop_iterations(plan: StepPlan, requested: int) -> int:
    """Iterations the plan allows, at most ``requested`` (1: no loop).

    A loop needs every sequence to carry ``loop_counts``, greedy sampling shared by all of them (one
    sampling call per iteration), no classifier-free guidance and no K/V stored by the query (a
    repeated store would be wasted work).
    """
    if requested <= 1 or plan.cfg_pairs or not plan.sequences:
        return 1
    first = plan.sequences[0]
    if first.sample.temperature != 0 or first.sample.policy == "random":
        return 1
    if any(not seq.loop_counts or _sampling_key(seq) != _sampling_key(first) for seq in plan.sequences):
        return 1
    if bool((plan.slot_mapping >= 0).any()):
        return 1
    return max(1, min(requested, min(len(seq.loop_counts) for seq in plan.sequences)))


def write_rows(plan: StepPlan) -> np.ndarray:
    """The packed query row of each sampled position: where its accepted token is written.

    The logits row of a shifted-logit model is the one before it; the token still lands on the
    sampled position itself.
    """
    rows = [
        start + index
        for seq, start in zip(plan.sequences, plan.cu_seqlens[:-1])
        for index in seq.sample_indices
    ]
    return np.asarray(rows, dtype=np.int64)


def run_denoise_loop(
    plan: StepPlan,
    iterations: int,
    forward: Callable[[], torch.Tensor],
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    sample: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    tokens: torch.Tensor,
    token_rows: torch.Tensor,
    share_tokens: Callable[[torch.Tensor], None] | None = None,
) -> StepOutput:
    """Run ``iterations`` denoise iterations; return the first as ``sequences``, the rest as ``iterations``.

    ``forward()`` runs the trunk over the current query tokens and returns the hidden states of the
    sampled rows; ``sample(logits)`` gives greedy ids and confidences (NaN for a row with a NaN logit, as
    the fused kernel and the torch softmax give); ``tokens[token_rows]`` are the
    query tokens of the sampled positions, rewritten in place with the accepted ids between forwards.
    ``share_tokens(tokens)`` runs after each rewrite: tensor parallel, it broadcasts them to the worker
    ranks (on the device, no host sync), whose next forward needs them (``ModelRunner.follow_loop``).
    """
    device = tokens.device
    rows_per_seq = np.diff(np.asarray(plan.cu_samples)).tolist()
    counts = [[seq.loop_counts[k] for seq in plan.sequences] for k in range(iterations)]
    thresholds = [seq.loop_threshold for seq in plan.sequences]
    unmasker = DeviceUnmasker(rows_per_seq, counts, thresholds, device)
    # One float64 row per field and iteration: ids (< 2**53, exact), confidence, accepted, NaN flag (a NaN
    # logit gives a NaN confidence: greedy, non-random policy).
    records = torch.empty((iterations, 4, unmasker.num_rows), dtype=torch.float64, device=device)
    for iteration in range(iterations):
        logits = compute_logits(forward())
        ids, confidences = sample(logits)
        unmasker.step(ids, confidences, iteration, tokens, token_rows, records[iteration])
        if share_tokens is not None:
            share_tokens(tokens)
    host = records.cpu().numpy()  # the only sync: [iterations, 4, rows]
    per_iteration: list[list[SequenceOutput]] = []
    bounds = plan.cu_samples
    for record in host:
        ids_host = record[0].astype(np.int64)
        outputs = [
            SequenceOutput(
                ids_host[low:high],
                record[1][low:high],
                failed=bool((record[3][low:high] > 0).any()),
                accepted=record[2][low:high] > 0,
            )
            for low, high in zip(bounds[:-1], bounds[1:])
        ]
        per_iteration.append(outputs)
    return StepOutput(per_iteration[0], iterations=per_iteration[1:])
