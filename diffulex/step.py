"""The hand-off between strategies, engine and runner: StepPlan in, StepOutput out.

A strategy describes one request's share of a step as a ``SequencePlan``; the engine packs the
sequences of all scheduled requests into one ``StepPlan`` (flat arrays, what the runner copies into its
static buffers); the runner returns a ``StepOutput`` holding, for each sequence, the top-1 id and the
confidence of every position the strategy asked about. Plain data: lists and numpy arrays, no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Block id of padding tokens: larger than any real id, so no real query token ever attends to them.
DUMMY_BLOCK_ID = 1 << 40


@dataclass(frozen=True)
class SampleSpec:
    """How to turn one sequence's logits into (token, confidence) at each sampled position.

    ``policy``: probability | margin | entropy | random. ``softmax_dtype``: "logits" computes the softmax
    in the logits' own dtype (ML-GSAI LLaDA), "float64" in double precision (Fast-dLLM).
    ``seed`` is the request's seed; with the sequence's ``step_index`` it drives the Gumbel noise and
    random confidences of one forward (``step_seed``), so a request's samples do not depend on its batch
    and a restarted request draws the same noise. ``cfg_scale`` > 0 combines the logits with the
    unconditional twin sequence that follows this one in the plan.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    policy: str = "probability"
    softmax_dtype: str = "logits"
    seed: int = 0
    cfg_scale: float = 0.0


def step_seed(seed: int, step_index: int) -> int:
    """The seed of one forward of one request."""
    return (seed * 1_000_003 + step_index) & 0x7FFF_FFFF_FFFF


@dataclass
class SequencePlan:
    """One sequence's query in a step (one request; two with classifier-free guidance).

    ``token_ids``/``positions``/``block_ids`` describe the query tokens (see layers.context for the mask
    rule). Cached context: positions ``[0, context_len)`` minus ``context_hole``. Query tokens in
    ``store_range`` (indices into the query) have their K/V stored at their positions' cache slots.
    ``sample_indices`` are the query indices whose prediction the strategy needs.

    ``loop_counts`` lets the runner run several greedy denoise iterations of this query on the device
    before the host sees them (one host sync for many forwards): entry ``k`` is the unmask count of the
    ``k``-th iteration, applied exactly as the strategy's ``update`` applies it (top-``k`` confidences
    among the still-masked sampled positions, ties to the lower index; with ``loop_threshold``, every
    position strictly above it when there are at least ``k`` of them). Empty: one iteration per step.
    Only a pure denoise query (nothing stored, every sampled position masked) may carry a loop.
    """

    request_id: str
    token_ids: list[int]
    positions: list[int]
    block_ids: list[int]
    context_len: int = 0
    context_hole: tuple[int, int] = (0, 0)
    store_range: tuple[int, int] = (0, 0)
    sample_indices: list[int] = field(default_factory=list)
    sample: SampleSpec = field(default_factory=SampleSpec)
    uncond: SequencePlan | None = None
    step_index: int = 0
    loop_counts: tuple[int, ...] = ()
    loop_threshold: float | None = None

    def __post_init__(self) -> None:
        if not (len(self.token_ids) == len(self.positions) == len(self.block_ids)):
            raise ValueError("token_ids, positions and block_ids must have the same length")

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class StepPlan:
    """All sequences of one step, packed back to back.

    ``cu_seqlens`` offsets each sequence's tokens; ``slot_mapping`` is −1 for tokens not stored;
    ``sample_rows`` are flat token indices whose logits are needed (sequence by sequence) and
    ``cu_samples`` offsets them; ``cfg_pairs`` maps a conditional sequence to its unconditional twin.
    """

    sequences: list[SequencePlan]
    input_ids: np.ndarray
    positions: np.ndarray
    block_ids: np.ndarray
    slot_mapping: np.ndarray
    cu_seqlens: list[int]
    context_lens: list[int]
    context_holes: list[tuple[int, int]]
    page_tables: list[list[int]]
    sample_rows: np.ndarray
    cu_samples: list[int]
    cfg_pairs: dict[int, int]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)

    @staticmethod
    def pack(
        sequences: list[SequencePlan],
        page_tables: list[list[int]],
        page_size: int,
        shift_logits: bool = False,
    ) -> StepPlan:
        """Flatten the sequences (uncond twins placed right after their conditional sequence).

        With ``shift_logits`` (Dream-family models) the prediction for query index j is read from the
        hidden state at j − 1; the first query token of a sequence keeps its own (Dream's rule).
        """
        flat: list[SequencePlan] = []
        flat_tables: list[list[int]] = []
        cfg_pairs: dict[int, int] = {}
        for seq, table in zip(sequences, page_tables):
            flat.append(seq)
            flat_tables.append(table)
            if seq.uncond is not None:
                cfg_pairs[len(flat) - 1] = len(flat)
                flat.append(seq.uncond)
                flat_tables.append(table)
        # Flatten into Python lists and convert once: far cheaper than one numpy array per sequence.
        cu_seqlens = [0]
        cu_samples = [0]
        input_ids: list[int] = []
        positions: list[int] = []
        block_ids: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        for seq, table in zip(flat, flat_tables):
            offset = cu_seqlens[-1]
            input_ids += seq.token_ids
            positions += seq.positions
            block_ids += seq.block_ids
            lo, hi = seq.store_range
            slots += [-1] * lo
            slots += [table[p // page_size] * page_size + p % page_size for p in seq.positions[lo:hi]]
            slots += [-1] * (seq.num_tokens - max(hi, lo))
            if shift_logits:
                sample_rows += [offset + (j - 1 if j > 0 else 0) for j in seq.sample_indices]
            else:
                sample_rows += [offset + j for j in seq.sample_indices]
            cu_seqlens.append(offset + seq.num_tokens)
            cu_samples.append(cu_samples[-1] + len(seq.sample_indices))
        return StepPlan(
            sequences=flat,
            input_ids=np.array(input_ids, dtype=np.int64),
            positions=np.array(positions, dtype=np.int64),
            block_ids=np.array(block_ids, dtype=np.int64),
            slot_mapping=np.array(slots, dtype=np.int64),
            cu_seqlens=cu_seqlens,
            context_lens=[s.context_len for s in flat],
            context_holes=[s.context_hole for s in flat],
            page_tables=flat_tables,
            sample_rows=np.array(sample_rows, dtype=np.int64),
            cu_samples=cu_samples,
            cfg_pairs=cfg_pairs,
        )


@dataclass
class SequenceOutput:
    """The runner's answer for one sequence: aligned with its ``sample_indices``."""

    token_ids: np.ndarray
    confidences: np.ndarray
    failed: bool = False
    # Device-loop iterations only: which sampled positions the device accepted in this iteration (the
    # engine checks that the strategy's own update accepts the same ones).
    accepted: np.ndarray | None = None


@dataclass
class StepOutput:
    """Outputs of one step, one entry per sequence of the StepPlan (entries of uncond twins are unused).

    ``iterations`` holds the outputs of the device-loop iterations after the first (see
    ``SequencePlan.loop_counts``), each aligned like ``sequences`` with the plan's ``sample_indices``.
    """

    sequences: list[SequenceOutput]
    iterations: list[list[SequenceOutput]] = field(default_factory=list)
