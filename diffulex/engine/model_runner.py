"""The ModelRunner: owns the device, the model, the K/V tensors; turns a StepPlan into a StepOutput.

It copies the plan into tensors, installs the per-step attention context, runs the model, computes
logits only at the sampled rows (one row earlier for shifted-logit families), and samples on the device,
so only token ids and confidences come back to the host. The CUDA-graph and Triton paths slot in here
without changing what goes in or out.

Under tensor parallelism every rank has a ModelRunner over its shard of the model and of the KV cache
(its KV heads only); ``step_logits`` is the part all ranks run together (its collectives must match), and
only rank 0 gets logits back and samples (``diffulex.engine.tp_runner`` drives the other ranks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from diffulex.config import EngineConfig
from diffulex.engine.cuda_graphs import CudaGraphRunner
from diffulex.engine.denoise_loop import loop_iterations, run_denoise_loop, write_rows
from diffulex.engine.runner_sampling import StepSampling
from diffulex.layers.attention import Attention
from diffulex.layers.context import AttentionContext, set_context, single_sequence_context
from diffulex.layers.parallel_state import (
    ParallelState,
    broadcast_from_driver,
    get_parallel_state,
    min_over_ranks,
    split_heads,
    using_parallel_state,
)
from diffulex.models.loader import load_model
from diffulex.models.registry import ModelSpec
from diffulex.step import SampleSpec, SequencePlan, StepOutput, StepPlan

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


class ModelRunner(StepSampling):
    """Runs steps of the model over the paged KV cache (see module docstring)."""

    def __init__(
        self,
        config: EngineConfig,
        model_and_spec: tuple[torch.nn.Module, ModelSpec] | None = None,
        parallel: ParallelState | None = None,
    ):
        self.config = config
        self.device = resolve_device(config.device)
        if self.device.type == "cpu":
            # oneDNN compiles a kernel for every new matmul shape (seconds over a run of varied prompt
            # lengths) and its results are not batch-invariant; MKL's BLAS path is both fast and stable.
            torch.backends.mkldnn.enabled = False
        self.dtype = resolve_dtype(config.dtype, self.device)
        # ``parallel``: this rank of a TP group (diffulex.engine.tp_workers); default one rank, whatever else
        # this process is part of.
        if parallel is None:
            parallel = ParallelState() if config.tensor_parallel_size == 1 else get_parallel_state()
        self.parallel = parallel
        if self.parallel.tp_size != config.tensor_parallel_size:
            raise RuntimeError(
                f"tensor_parallel_size={config.tensor_parallel_size} but this process is not a rank of such a "
                "group: build the runner with diffulex.engine.tp_runner.create_runner"
            )
        if model_and_spec is None:
            with using_parallel_state(self.parallel):  # the layers read it to pick their shards
                model_and_spec = load_model(
                    config.model, self.dtype, self.device, base_model=config.base_model
                )
        self.model, self.spec = model_and_spec
        self.model.eval()
        # This rank's KV heads (all of them at one rank): the cache holds only those.
        self.num_kv_heads = split_heads(
            self.spec.num_heads, self.spec.num_kv_heads, self.parallel.tp_rank, self.parallel.tp_size
        ).num_kv_heads
        self.page_size = config.page_size
        self.max_model_len = config.max_model_len or self.spec.max_position_embeddings
        backend = config.attention_backend
        if backend == "triton" and self.device.type != "cuda":
            raise ValueError("attention_backend 'triton' needs a CUDA device; use 'torch' or 'auto' on CPU")
        self.use_triton = backend == "triton" or (backend == "auto" and self.device.type == "cuda")
        # Every rank must have the same pages (rank 0's scheduler hands out page ids for all of them).
        self.num_pages = min_over_ranks(self._num_pages(self.max_model_len), self.device, self.parallel)
        self._allocate_kv_cache()
        self.max_pages_per_seq = -(-self.max_model_len // self.page_size)
        self.graphs: CudaGraphRunner | None = None  # the smallest denoise query size's graphs
        # One per captured query size, smallest first: the strategy's fixed denoise sizes (every bucket of
        # running requests) and the one-request sizes of config.cuda_graph_single_tokens.
        self.graph_sets: list[CudaGraphRunner] = []

    def enable_cuda_graphs(self, sizes: list[int], pad_token_id: int) -> None:
        """Capture the denoise step for every fixed query size (``sizes``, from the strategy) and bucket of
        running-request counts, and the one-request steps of ``config.cuda_graph_single_tokens``."""
        if self.device.type != "cuda" or self.config.enforce_eager or not self.use_triton:
            return
        if any(getattr(module, "cuda_graph_safe", True) is False for module in self.model.modules()):
            logger.info("the model has layers that cannot be captured (host-side MoE routing): eager steps")
            return
        max_seqs = min(self.config.max_num_reqs, self.config.cuda_graph_max_reqs)
        shapes = {(size, max_seqs) for size in sizes}
        shapes |= {(size, 1) for size in self.config.cuda_graph_single_tokens if size not in sizes}
        pool = None
        captured = []
        # Largest total first: the later captures reuse its memory pool.
        for tokens_per_seq, num_seqs in sorted(shapes, key=lambda s: (s[0] * s[1], s[0]), reverse=True):
            graphs = CudaGraphRunner(
                self.model, tokens_per_seq, num_seqs, self.max_pages_per_seq, pad_token_id, self.device, pool
            )
            graphs.capture()
            pool = graphs.pool
            captured.append(graphs)
        # A plan takes the first set that can run it: the smallest query size that holds its requests.
        self.graph_sets = sorted(captured, key=lambda g: (g.tokens_per_seq, -g.buckets[-1]))
        self.graphs = next((g for g in self.graph_sets if g.tokens_per_seq in sizes), None)

    # ----- set-up -------------------------------------------------------------------------------------
    def _bytes_per_page(self) -> int:
        spec: ModelSpec = self.spec
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * spec.num_layers * self.page_size * self.num_kv_heads * spec.head_dim * element

    def _num_pages(self, max_model_len: int) -> int:
        if self.config.num_kv_pages is not None:
            return self.config.num_kv_pages
        budget_bytes = int(self.config.kv_cache_memory_gb * (1 << 30))
        if self.device.type == "cuda" and self.config.gpu_memory_utilization is not None:
            budget_bytes = self._gpu_budget_bytes(self.config.gpu_memory_utilization)
        budget = budget_bytes // self._bytes_per_page()
        # Never more than every request at full length needs: keeps tiny models from reserving gigabytes.
        useful = self.config.max_num_reqs * (-(-max_model_len // self.page_size)) + 1
        return max(1, min(budget, useful))

    @torch.inference_mode()
    def _gpu_budget_bytes(self, utilization: float) -> int:
        """K/V bytes that fit in ``utilization`` of the GPU after the weights and a warm-up's peak.

        The warm-up is one uncached forward of ``min(max_num_batched_tokens, 8192)`` tokens plus the LM
        head on 1,024 rows, so activations of real steps of that size fit beside the cache.
        """
        tokens = min(self.config.max_num_batched_tokens, 8192)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        plan = StepPlan.pack(
            [SequencePlan("warm-up", [0] * tokens, list(range(tokens)), [0] * tokens)], [[]], self.page_size
        )
        set_context(self._context(plan))
        try:
            hidden = self.model(
                torch.zeros(tokens, dtype=torch.long, device=self.device),
                torch.arange(tokens, device=self.device),
            )
            self.model.compute_logits(hidden[: min(tokens, 1024)])
        finally:
            set_context(None)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        budget = int(total * utilization) - peak
        if budget <= 0:
            raise ValueError(
                f"gpu_memory_utilization {utilization} leaves no room for the KV cache: the weights and a "
                f"warm-up step already take {peak / (1 << 30):.1f} GiB of {total / (1 << 30):.1f} GiB"
            )
        torch.cuda.empty_cache()
        return budget

    def _allocate_kv_cache(self) -> None:
        spec = self.spec
        shape = (2, spec.num_layers, self.num_pages, self.page_size, self.num_kv_heads, spec.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        if len(layers) != spec.num_layers:
            raise RuntimeError(f"model has {len(layers)} attention layers, config says {spec.num_layers}")
        for index, layer in enumerate(layers):
            layer.k_cache = self.kv_cache[0, index]
            layer.v_cache = self.kv_cache[1, index]

    # ----- one step -----------------------------------------------------------------------------------
    def _context(self, plan: StepPlan) -> AttentionContext:
        width = max((len(t) for t in plan.page_tables), default=0)
        tables = None
        if width:
            padded = np.full((len(plan.page_tables), width), -1, dtype=np.int32)
            for row, table in enumerate(plan.page_tables):
                padded[row, : len(table)] = table
            tables = torch.from_numpy(padded).to(self.device)
        context = AttentionContext(
            cu_seqlens_q=plan.cu_seqlens,
            block_ids=torch.from_numpy(plan.block_ids).to(self.device),
            context_lens=plan.context_lens,
            context_holes=plan.context_holes,
            page_tables=tables,
            slot_mapping=torch.from_numpy(plan.slot_mapping).to(self.device),
        )
        if self.use_triton:
            lengths = np.diff(np.asarray(plan.cu_seqlens))
            context.use_triton = True
            context.cu_seqlens_q_t = torch.tensor(plan.cu_seqlens, dtype=torch.int32, device=self.device)
            context.context_lens_t = torch.tensor(plan.context_lens, dtype=torch.int32, device=self.device)
            holes = np.asarray(plan.context_holes, dtype=np.int32).reshape(-1, 2)
            context.context_holes_t = torch.from_numpy(holes).to(self.device)
            context.max_seqlen_q = int(lengths.max()) if lengths.size else 0
            if context.page_tables is None:
                context.page_tables = torch.full(
                    (plan.num_sequences, 1), -1, dtype=torch.int32, device=self.device
                )
        return context

    @torch.inference_mode()
    def execute(self, plan: StepPlan, mask_token_id: int, iterations: int = 1) -> StepOutput:
        """Run the plan; with ``iterations`` > 1 and a plan that allows it, a device loop of that many
        greedy denoise iterations (``diffulex.engine.denoise_loop``): its outputs carry ``iterations``.
        Tensor parallel: rank 0 runs this, the workers ``step_logits`` or ``follow_loop``."""
        iterations = loop_iterations(plan, iterations)
        if iterations > 1:
            graphs = next((g for g in self.graph_sets if g.can_run(plan)), None)
            return self._execute_loop(plan, mask_token_id, iterations, graphs)
        logits = self.step_logits(plan)
        if logits is None:
            return StepOutput([])  # a tensor-parallel worker: rank 0 samples
        return self._sample(plan, logits, mask_token_id)

    @torch.inference_mode()
    def step_logits(self, plan: StepPlan) -> torch.Tensor | None:
        """The model over the plan and the logits of its sampled rows (replayed from a CUDA graph when one
        fits). Tensor parallel: every rank runs this with the same plan; rank 0 gets the logits, the
        others None."""
        graphs = next((g for g in self.graph_sets if g.can_run(plan)), None)
        if graphs is not None:
            hidden_rows = graphs.run(plan)
            if not hidden_rows.shape[0]:
                return hidden_rows.new_zeros(0, 1)
            return self.model.compute_logits(hidden_rows)
        input_ids = torch.from_numpy(plan.input_ids).to(self.device)
        positions = torch.from_numpy(plan.positions).to(self.device)
        set_context(self._context(plan))
        try:
            hidden = self.model(input_ids, positions)
        finally:
            set_context(None)
        rows = torch.from_numpy(plan.sample_rows).to(self.device)
        return self.model.compute_logits(hidden[rows]) if rows.numel() else hidden.new_zeros(0, 1)

    def _loop_inputs(
        self, plan: StepPlan, graphs: CudaGraphRunner | None
    ) -> tuple[torch.Tensor, Callable[[], torch.Tensor], np.ndarray]:
        """What a device loop works on: the query tokens it rewrites, the forward over them (hidden states
        of the sampled rows) and the rows of ``tokens`` the sampled positions are written to."""
        token_rows = write_rows(plan)
        if graphs is not None:
            prepared = graphs.load(plan)
            return graphs.input_ids, lambda: graphs.replay(prepared), prepared.padded_rows[token_rows]
        tokens = torch.from_numpy(plan.input_ids).to(self.device)
        positions = torch.from_numpy(plan.positions).to(self.device)
        context = self._context(plan)
        rows = torch.from_numpy(plan.sample_rows).to(self.device)

        def forward() -> torch.Tensor:
            set_context(context)
            try:
                return self.model(tokens, positions)[rows]
            finally:
                set_context(None)

        return tokens, forward, token_rows

    def _execute_loop(
        self, plan: StepPlan, mask_token_id: int, iterations: int, graphs: CudaGraphRunner | None
    ) -> StepOutput:
        spec = plan.sequences[0].sample
        tokens, forward, token_rows = self._loop_inputs(plan, graphs)
        share = None
        if self.parallel.tp_size > 1:  # the workers' next forward needs rank 0's accepted tokens

            def share(tokens: torch.Tensor) -> None:
                broadcast_from_driver(tokens, self.parallel)

        return run_denoise_loop(
            plan,
            iterations,
            forward,
            self.model.compute_logits,
            lambda logits: self._greedy(logits, spec, mask_token_id),
            tokens,
            torch.from_numpy(token_rows).to(self.device),
            share_tokens=share,
        )

    @torch.inference_mode()
    def follow_loop(self, plan: StepPlan, iterations: int) -> None:
        """A tensor-parallel worker's part of rank 0's device loop (``execute`` with ``iterations`` > 1):
        the same forwards and logits gathers, the query tokens received from rank 0 after each one."""
        graphs = next((g for g in self.graph_sets if g.can_run(plan)), None)
        tokens, forward, _ = self._loop_inputs(plan, graphs)
        for _ in range(iterations):
            self.model.compute_logits(forward())
            broadcast_from_driver(tokens, self.parallel)

    # ----- research API -------------------------------------------------------------------------------
    @torch.inference_mode()
    def full_logits(self, token_ids: list[int], block_ids: list[int]) -> torch.Tensor | None:
        """Raw float32 logits ``[len, vocab]`` of one full forward without any cache (None on a
        tensor-parallel worker)."""
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.arange(len(token_ids), device=self.device)
        set_context(single_sequence_context(len(token_ids), self.device, torch.tensor(block_ids)))
        try:
            hidden = self.model(input_ids, positions)
        finally:
            set_context(None)
        logits = self.model.compute_logits(hidden)
        return logits.float().cpu() if logits is not None else None


__all__ = ["ModelRunner", "SampleSpec", "resolve_device", "resolve_dtype"]
