"""CUDA-graph replay of fixed-shape denoising steps.

A fixed-shape strategy gives every running request the same query size ``tokens_per_seq`` (its Block
Buffer: ``block_size × buffer_size``). A step of ``S`` such requests is therefore padded to the smallest
captured bucket ``≥ S`` and replayed: sequences shorter than ``tokens_per_seq`` are padded with dummy
tokens (block id ``DUMMY_BLOCK_ID``: no real token sees them; K/V never stored) and missing sequences
are empty (no context). Graphs are captured largest bucket first into one memory pool. The graph covers
the transformer trunk; the LM head runs eagerly on the sampled rows only.

The same runner with ``max_num_seqs`` 1 serves one-request steps of varying query length (a prefill, a
full-recompute ``vanilla`` step, a ``fast_dllm`` prefix-cache step): the query is padded with dummy
tokens up to ``tokens_per_seq``, so one replay replaces a host-bound eager forward (≈ 20 ms of kernel
launches for an 8B model at batch 1).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from diffulex.layers.context import AttentionContext, set_context
from diffulex.step import DUMMY_BLOCK_ID, StepPlan

logger = logging.getLogger(__name__)


def default_buckets(max_num_reqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to ``max_num_reqs`` (what vLLM and nano-vllm capture)."""
    buckets = [b for b in (1, 2, 4) if b < max_num_reqs] + list(range(8, max_num_reqs + 1, 8))
    if not buckets or buckets[-1] != max_num_reqs:
        buckets.append(max_num_reqs)
    return sorted(set(buckets))


@dataclass
class PreparedStep:
    """A plan loaded into the static buffers: its bucket, its sampled rows (device) and the padded row
    of every packed token (host), so a device loop can rewrite query tokens in ``input_ids`` in place."""

    bucket: int
    sample_rows: torch.Tensor
    padded_rows: np.ndarray


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden: torch.Tensor


class CudaGraphRunner:
    """Owns the static input buffers and the captured graph of each bucket."""

    def __init__(
        self,
        model: nn.Module,
        tokens_per_seq: int,
        max_num_seqs: int,
        max_pages_per_seq: int,
        pad_token_id: int,
        device: torch.device,
        pool: tuple | None = None,
    ):
        self.model = model
        self.tokens_per_seq = tokens_per_seq
        self.buckets = default_buckets(max_num_seqs)
        self.max_pages = max_pages_per_seq
        self.pad_token_id = pad_token_id
        self.device = device
        max_tokens = self.buckets[-1] * tokens_per_seq
        max_seqs = self.buckets[-1]
        long = dict(dtype=torch.long, device=device)
        i32 = dict(dtype=torch.int32, device=device)
        self.input_ids = torch.full((max_tokens,), pad_token_id, **long)
        self.positions = torch.zeros(max_tokens, **long)
        self.block_ids = torch.full((max_tokens,), DUMMY_BLOCK_ID, **long)
        self.slot_mapping = torch.full((max_tokens,), -1, **long)
        self.cu_seqlens = torch.arange(0, (max_seqs + 1) * tokens_per_seq, tokens_per_seq, **i32)
        self.context_lens = torch.zeros(max_seqs, **i32)
        self.context_holes = torch.zeros(max_seqs, 2, **i32)
        self.page_tables = torch.full((max_seqs, max_pages_per_seq), -1, **i32)
        self.graphs: dict[int, _Captured] = {}
        self.pool = pool

    # ----- capture ------------------------------------------------------------------------------------
    def _context(self, bucket: int) -> AttentionContext:
        tokens = bucket * self.tokens_per_seq
        return AttentionContext(
            cu_seqlens_q=[],  # unused by the Triton path
            block_ids=self.block_ids[:tokens],
            context_lens=[],
            context_holes=[],
            page_tables=self.page_tables[:bucket],
            slot_mapping=self.slot_mapping[:tokens],
            use_triton=True,
            cu_seqlens_q_t=self.cu_seqlens[: bucket + 1],
            context_lens_t=self.context_lens[:bucket],
            context_holes_t=self.context_holes[:bucket],
            max_seqlen_q=self.tokens_per_seq,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool."""
        for bucket in sorted(self.buckets, reverse=True):
            tokens = bucket * self.tokens_per_seq
            context = self._context(bucket)
            set_context(context)
            try:
                self.model(self.input_ids[:tokens], self.positions[:tokens])  # warm-up (Triton JIT)
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    hidden = self.model(self.input_ids[:tokens], self.positions[:tokens])
            finally:
                set_context(None)
            if self.pool is None:
                self.pool = graph.pool()
            self.graphs[bucket] = _Captured(graph, hidden)
        torch.cuda.synchronize(self.device)
        logger.info("captured CUDA graphs for %d buckets (%s)", len(self.buckets), self.buckets)

    # ----- replay -------------------------------------------------------------------------------------
    def can_run(self, plan: StepPlan) -> bool:
        if plan.cfg_pairs or plan.num_sequences > self.buckets[-1]:
            return False
        cu = plan.cu_seqlens
        longest = max((b - a for a, b in zip(cu[:-1], cu[1:])), default=0)
        widest = max((len(t) for t in plan.page_tables), default=0)
        return 0 < longest <= self.tokens_per_seq and widest <= self.max_pages

    def load(self, plan: StepPlan) -> PreparedStep:
        """Copy the plan into the static buffers of its bucket (padding each sequence to the query size)."""
        num_seqs = plan.num_sequences
        bucket = next(b for b in self.buckets if b >= num_seqs)
        q = self.tokens_per_seq
        tokens = bucket * q
        lengths = np.diff(np.asarray(plan.cu_seqlens))
        # Padded row of every packed token: sequence i occupies rows [i*q, i*q + length_i).
        padded = np.concatenate([i * q + np.arange(n) for i, n in enumerate(lengths)]).astype(np.int64)
        ids = np.full(tokens, self.pad_token_id, dtype=np.int64)
        positions = np.zeros(tokens, dtype=np.int64)
        block_ids = np.full(tokens, DUMMY_BLOCK_ID, dtype=np.int64)
        slots = np.full(tokens, -1, dtype=np.int64)
        ids[padded] = plan.input_ids
        positions[padded] = plan.positions
        block_ids[padded] = plan.block_ids
        slots[padded] = plan.slot_mapping
        context_lens = np.zeros(bucket, dtype=np.int32)
        context_lens[:num_seqs] = plan.context_lens
        holes = np.zeros((bucket, 2), dtype=np.int32)
        holes[:num_seqs] = np.asarray(plan.context_holes, dtype=np.int32).reshape(-1, 2)
        tables = np.full((bucket, self.max_pages), -1, dtype=np.int32)
        for row, table in enumerate(plan.page_tables):
            tables[row, : len(table)] = table
        copies = [
            (self.input_ids, ids),
            (self.positions, positions),
            (self.block_ids, block_ids),
            (self.slot_mapping, slots),
            (self.context_lens, context_lens),
            (self.context_holes, holes),
            (self.page_tables, tables),
        ]
        for target, source in copies:
            target[: source.shape[0]].copy_(torch.from_numpy(source), non_blocking=True)
        # Copied before the replay: a pageable copy queued after it would block the host until it ends.
        rows = torch.from_numpy(padded[plan.sample_rows]).to(self.device, non_blocking=True)
        return PreparedStep(bucket, rows, padded)

    def replay(self, step: PreparedStep) -> torch.Tensor:
        """Replay the loaded bucket's graph; return the hidden states of the sampled rows."""
        captured = self.graphs[step.bucket]
        captured.graph.replay()
        return captured.hidden[step.sample_rows]

    def run(self, plan: StepPlan) -> torch.Tensor:
        """Load the plan and replay once: the hidden states of the plan's sampled rows."""
        return self.replay(self.load(plan))
