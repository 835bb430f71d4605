"""Tensor parallelism, rank 0: ``TensorParallelRunner`` drives the worker ranks of ``tp_workers``.

Rank 0 is the engine's own process: it runs the scheduler and a ``TensorParallelRunner``, which has the
ModelRunner interface (``create_runner`` picks it when ``tensor_parallel_size`` > 1). It starts the other
ranks on one host, or joins a ``torchrun`` launch; its own shard is an ordinary ModelRunner, and each
call broadcasts one command to the workers (``diffulex.engine.tp_workers``) before running rank 0's part.

**Failures.** A step that raises inside the collectives leaves the ranks out of step, so the group is
declared broken: rank 0 names the dead rank when one died ("tensor-parallel rank 1 died: exit code -9"),
stops the others and raises ``TensorParallelError``; every later call raises it at once, and
``failure`` (read by ``Engine.unhealthy_reason``) says why. A worker that dies while idle is noticed the
same way (its process is polled). A dead peer closes its sockets, so gloo fails fast; a frozen one is
bounded by ``distributed_timeout_s``. A worker whose rank 0 vanished fails its next collective and exits.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from typing import Any

import torch

from diffulex.config import EngineConfig
from diffulex.engine.denoise_loop import loop_iterations
from diffulex.engine.model_runner import ModelRunner, resolve_device
from diffulex.engine.tp_workers import (
    ENABLE_CUDA_GRAPHS,
    EXECUTE,
    FULL_LOGITS,
    SHUTDOWN,
    TensorParallelStartError,
    build_runner,
    check_world_size,
    init_group,
    launched_by_torchrun,
    send_command,
    worker_main,
)
from diffulex.layers.parallel_state import split_heads
from diffulex.step import StepOutput, StepPlan

logger = logging.getLogger(__name__)

DEATH_GRACE_S = 2.0  # after a failed collective: how long a peer has to be reaped before we call it alive


class TensorParallelError(RuntimeError):
    """The tensor-parallel group is broken (a rank died or a collective failed); it does not recover."""


def check_heads_split(config: EngineConfig) -> None:
    """Raise ValueError, naming the model value and the size, when the checkpoint's attention heads do not
    split over ``tensor_parallel_size`` ranks (other sizes are checked as each rank builds its shard)."""
    from diffulex.models.loader import is_adapter_folder, load_hf_config
    from diffulex.models.registry import resolve_model_class

    if is_adapter_folder(config.model):
        return  # its base checkpoint is found while loading; the ranks check it then
    hf_config = load_hf_config(config.model)
    spec = resolve_model_class(hf_config).spec_from_config(hf_config)
    split_heads(spec.num_heads, spec.num_kv_heads, 0, config.tensor_parallel_size)


class TensorParallelRunner:
    """Rank 0 of a tensor-parallel group, with the ModelRunner interface the engine uses.

    Owns the worker processes (when it started them), the control group and rank 0's own ModelRunner
    (``runner``: its shard, its KV cache, the sampling). Attributes it does not define (``spec``,
    ``num_pages``, ``device``, ...) are the local runner's.
    """

    def __init__(self, config: EngineConfig):
        import torch.distributed as dist

        if dist.is_initialized():
            raise RuntimeError(
                "a torch.distributed group already exists in this process: one TP engine at a time"
            )
        self.size = config.tensor_parallel_size
        check_heads_split(config)  # before any process starts: the commonest misfit, named at once
        self.processes: list[multiprocessing.process.BaseProcess] = []
        self._failure: str | None = None
        self._closed = False
        store = None
        if launched_by_torchrun():
            check_world_size(config)
        else:
            timeout = datetime.timedelta(seconds=config.distributed_timeout_s)
            # Port 0: the store picks a free port and the workers are told which (no race for it).
            store = dist.TCPStore(
                "127.0.0.1", 0, self.size, is_master=True, timeout=timeout, wait_for_workers=False
            )
            self._start_workers(config, store.port)
        try:
            if store is not None:
                self._wait_for_workers(store, config.distributed_timeout_s)
            self.control, state = init_group(config, 0, store)
            self.runner = build_runner(config, state, self.control)
        except Exception as error:
            # A rank that could not load says why; otherwise a worker that died is the likely cause.
            reason = str(error)
            if not isinstance(error, TensorParallelStartError):
                reason = self._dead_rank(DEATH_GRACE_S) or reason
            self._stop_workers(timeout_s=5.0)  # after a start error they exit on their own
            if dist.is_initialized():
                dist.destroy_process_group()
            raise RuntimeError(reason) from error

    def _start_workers(self, config: EngineConfig, port: int) -> None:
        context = multiprocessing.get_context("spawn")  # a forked child cannot use CUDA
        threads = None
        if resolve_device(config.device).type == "cpu":
            threads = max(1, (os.cpu_count() or 1) // self.size)
        for rank in range(1, self.size):
            process = context.Process(
                target=worker_main,
                args=(config, rank, port, threads),
                name=f"diffulex-tp-rank-{rank}",
                daemon=True,  # never outlives rank 0 (workers start no children of their own)
            )
            process.start()
            self.processes.append(process)

    def _wait_for_workers(self, store: Any, timeout_s: float) -> None:
        """Wait until every worker reached the store, failing fast when one exits first (an import error)."""
        keys = [f"diffulex/worker-up/{rank}" for rank in range(1, self.size)]
        deadline = time.monotonic() + timeout_s
        while not store.check(keys):
            dead = self._dead_rank()
            if dead is not None:
                raise RuntimeError(dead)
            if time.monotonic() > deadline:
                raise RuntimeError(f"tensor-parallel workers did not start within {timeout_s:.0f} s")
            time.sleep(0.05)

    # ----- health --------------------------------------------------------------------------------------
    def _dead_rank(self, grace_s: float = 0.0) -> str | None:
        """Which worker exited first, as ``tensor-parallel rank N died: exit code C`` (waiting up to
        ``grace_s`` for one to be reaped), or None while all live."""
        deadline = time.monotonic() + grace_s
        while True:
            for rank, process in enumerate(self.processes, start=1):
                if not process.is_alive():
                    return f"tensor-parallel rank {rank} died: exit code {process.exitcode}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    @property
    def failure(self) -> str | None:
        """Why the group cannot serve (a rank died, a collective failed), or None while it can."""
        if self._failure is None and not self._closed:
            dead = self._dead_rank()
            if dead is not None:
                self._break(dead)
        return self._failure

    def _break(self, reason: str) -> None:
        logger.error("tensor-parallel group broken: %s", reason)
        self._failure = reason
        self._stop_workers()

    def _collective(self, command: int, payload: Any, local: Callable[[], Any]) -> Any:
        """Broadcast one command, run rank 0's part (``local()``); any failure breaks the group."""
        if self._closed:
            raise TensorParallelError("the tensor-parallel group is shut down")
        failure = self.failure
        if failure is not None:
            raise TensorParallelError(failure)
        try:
            send_command(command, payload, self.control)
            return local()
        except Exception as error:
            reason = self._dead_rank(DEATH_GRACE_S) or f"tensor-parallel step failed: {error}"
            self._break(reason)
            raise TensorParallelError(reason) from error

    # ----- the ModelRunner interface -------------------------------------------------------------------
    def execute(self, plan: StepPlan, mask_token_id: int, iterations: int = 1) -> StepOutput:
        """Every rank runs the plan; rank 0 samples the gathered logits. A device loop (``iterations``
        > 1 and a plan that allows it) samples inside the collectives and broadcasts each iteration's
        tokens to the workers."""
        iterations = loop_iterations(plan, iterations)
        if iterations > 1:
            return self._collective(
                EXECUTE, (plan, iterations), lambda: self.runner.execute(plan, mask_token_id, iterations)
            )
        logits = self._collective(EXECUTE, (plan, 1), lambda: self.runner.step_logits(plan))
        with torch.inference_mode():
            return self.runner._sample(plan, logits, mask_token_id)  # local: no collective left

    def full_logits(self, token_ids: list[int], block_ids: list[int]) -> torch.Tensor:
        return self._collective(
            FULL_LOGITS, (token_ids, block_ids), lambda: self.runner.full_logits(token_ids, block_ids)
        )

    def enable_cuda_graphs(self, sizes: list[int], pad_token_id: int) -> None:
        self._collective(
            ENABLE_CUDA_GRAPHS,
            (sizes, pad_token_id),
            lambda: self.runner.enable_cuda_graphs(sizes, pad_token_id),
        )

    def __getattr__(self, name: str) -> Any:
        if name == "runner":  # not built (a failed start): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.runner, name)

    # ----- shutdown ------------------------------------------------------------------------------------
    def close(self, timeout_s: float = 10.0) -> None:
        """Tell the workers to exit, wait for them (killing stragglers) and leave the group."""
        import torch.distributed as dist

        if self._closed:
            return
        if self._failure is None and self._dead_rank() is None:
            try:
                send_command(SHUTDOWN, None, self.control)
            except Exception:  # a worker died meanwhile: it is stopped below either way
                logger.warning("could not tell the tensor-parallel workers to stop", exc_info=True)
        self._closed = True
        self._stop_workers(timeout_s)
        if dist.is_initialized():
            dist.destroy_process_group()

    def _stop_workers(self, timeout_s: float = 0.0) -> None:
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)


def create_runner(config: EngineConfig) -> ModelRunner | TensorParallelRunner:
    """The engine's runner: a ModelRunner at ``tensor_parallel_size`` 1, else rank 0 of a TP group."""
    if config.tensor_parallel_size == 1:
        return ModelRunner(config)
    return TensorParallelRunner(config)
