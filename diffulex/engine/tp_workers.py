"""Tensor parallelism: rank 0 drives ``tensor_parallel_size - 1`` worker ranks over ``torch.distributed``.

Rank 0 is the engine's own process: it runs the scheduler and a ``TensorParallelRunner``, which has the
ModelRunner interface. On one host it starts the other ranks itself (``spawn`` processes); under
``torchrun`` they are the other processes of the launch (``run_torchrun_worker``). Every rank builds its
shard of the model (``diffulex.layers.parallel_state`` tells the layers which one) and its share of the
KV cache, then the workers loop: receive a command, run it, take part in its collectives.

**Commands** travel on a gloo "control" group as two broadcasts from rank 0: a header ``[command,
payload bytes]`` and the pickled payload as one uint8 tensor (a StepPlan is plain numpy and Python, so the
whole plan goes in one message). The tensors of the model (all-reduces, the logits gather) use the
default group: gloo on CPU, NCCL on CUDA (rank r on ``cuda:r``). The control group has a long timeout
(idle workers wait on it); the default group has ``distributed_timeout_s``.

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
import pickle
import signal
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from diffulex.config import EngineConfig
from diffulex.engine.denoise_loop import loop_iterations
from diffulex.engine.model_runner import ModelRunner, resolve_device, resolve_dtype
from diffulex.layers.parallel_state import ParallelState, split_heads, using_parallel_state
from diffulex.step import StepOutput, StepPlan

logger = logging.getLogger(__name__)

EXECUTE, FULL_LOGITS, ENABLE_CUDA_GRAPHS, SHUTDOWN = 1, 2, 3, 4
CONTROL_TIMEOUT = datetime.timedelta(days=365)  # idle workers wait on the control group for the next call
DEATH_GRACE_S = 2.0  # after a failed collective: how long a peer has to be reaped before we call it alive


class TensorParallelError(RuntimeError):
    """The tensor-parallel group is broken (a rank died or a collective failed); it does not recover."""


class TensorParallelStartError(RuntimeError):
    """A rank could not build its shard (every rank learns which one and why)."""


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a multi-process ``torchrun`` launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def rank_device(device: str, rank: int) -> str:
    """Rank ``rank``'s device: with ``auto``/``cuda`` (or ``cuda:k``) and GPUs present, the GPU ``rank``
    after the first (under torchrun: ``LOCAL_RANK``); ``cpu`` for every rank otherwise."""
    resolved = resolve_device(device)
    if resolved.type != "cuda":
        return str(resolved)
    if launched_by_torchrun():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return f"cuda:{((resolved.index or 0) + rank) % torch.cuda.device_count()}"


def _init_group(config: EngineConfig, rank: int, store: Any | None) -> tuple[Any, ParallelState]:
    """Join the default (tensor) group and create the control group; returns the control group and this
    rank's parallel state (handed to the layers as they are built, never left as the process default)."""
    import torch.distributed as dist

    size = config.tensor_parallel_size
    device = torch.device(rank_device(config.device, rank))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL, graphs and kernels use the current device
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=config.distributed_timeout_s)
    if store is None:  # torchrun: MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE from the environment
        dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size, timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    expert = config.expert_parallel_size  # 1, or size: the MoE experts split over the same ranks
    return control, ParallelState(
        tp_rank=rank,
        tp_size=size,
        tp_group=dist.group.WORLD,
        ep_rank=rank if expert > 1 else 0,
        ep_size=expert,
        ep_group=dist.group.WORLD if expert > 1 else None,
    )


def _build_runner(config: EngineConfig, state: ParallelState, control: Any) -> ModelRunner:
    """Load this rank's shard; every rank learns whether every other one loaded before going on (so a
    rank that cannot load stops the launch with its own error instead of a hang in a collective)."""
    import torch.distributed as dist

    from diffulex.models.loader import load_model

    rank = state.tp_rank
    device_name = rank_device(config.device, rank)
    local = config.model_copy(update={"device": device_name})
    model_and_spec, status = None, None
    try:
        device = torch.device(device_name)
        with using_parallel_state(state):  # the layers read it to pick their shards
            model_and_spec = load_model(
                local.model, resolve_dtype(local.dtype, device), device, base_model=local.base_model
            )
    except Exception as error:  # reported to every rank below
        logger.exception("tensor-parallel rank %d failed to load its shard", rank)
        status = f"{type(error).__name__}: {error}"
    statuses: list[str | None] = [None] * config.tensor_parallel_size
    dist.all_gather_object(statuses, status, group=control)
    for index, failed in enumerate(statuses):
        if failed is not None:
            raise TensorParallelStartError(f"tensor-parallel rank {index} failed to start: {failed}")
    return ModelRunner(local, model_and_spec, state)


# ----- the command channel -------------------------------------------------------------------------------
def _send(command: int, payload: Any, control: Any) -> None:
    import torch.distributed as dist

    data = b"" if payload is None else pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    dist.broadcast(torch.tensor([command, len(data)], dtype=torch.int64), 0, group=control)
    if data:
        dist.broadcast(torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()), 0, group=control)


def _receive(control: Any) -> tuple[int, Any]:
    import torch.distributed as dist

    header = torch.zeros(2, dtype=torch.int64)
    dist.broadcast(header, 0, group=control)
    command, length = (int(v) for v in header.tolist())
    if not length:
        return command, None
    buffer = torch.empty(length, dtype=torch.uint8)
    dist.broadcast(buffer, 0, group=control)
    return command, pickle.loads(buffer.numpy().tobytes())


# ----- workers ---------------------------------------------------------------------------------------------
def _serve(runner: ModelRunner, control: Any) -> None:
    """A worker's loop: run what rank 0 broadcasts until it says shutdown."""
    while True:
        command, payload = _receive(control)
        if command == EXECUTE:
            plan, iterations = payload
            if iterations > 1:
                runner.follow_loop(plan, iterations)
            else:
                runner.step_logits(plan)
        elif command == FULL_LOGITS:
            runner.full_logits(*payload)
        elif command == ENABLE_CUDA_GRAPHS:
            runner.enable_cuda_graphs(*payload)
        elif command == SHUTDOWN:
            return
        else:
            raise RuntimeError(f"unknown tensor-parallel command {command}")


def _run_worker(config: EngineConfig, rank: int, store: Any | None) -> None:
    import torch.distributed as dist

    control, state = _init_group(config, rank, store)
    try:
        _serve(_build_runner(config, state, control), control)
    finally:
        dist.destroy_process_group()


def worker_main(config: EngineConfig, rank: int, port: int, cpu_threads: int | None) -> None:
    """Entry point of a worker process started by rank 0 on this host (rendezvous on rank 0's store)."""
    import torch.distributed as dist

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the process group: rank 0 stops us
    if cpu_threads is not None:
        torch.set_num_threads(cpu_threads)  # the ranks share the host's cores
    timeout = datetime.timedelta(seconds=config.distributed_timeout_s)
    store = dist.TCPStore("127.0.0.1", port, config.tensor_parallel_size, is_master=False, timeout=timeout)
    store.set(f"diffulex/worker-up/{rank}", "1")  # rank 0 waits for this while watching our process
    try:
        _run_worker(config, rank, store)
    except Exception:
        logger.exception("tensor-parallel rank %d stopped", rank)
        raise SystemExit(1) from None


def run_torchrun_worker(config: EngineConfig) -> bool:
    """Under ``torchrun``, on a rank other than 0: serve rank 0 until it shuts down, then return True.
    Returns False at once on rank 0 or outside torchrun (the caller then runs the engine itself)."""
    if not launched_by_torchrun() or int(os.environ["RANK"]) == 0:
        return False
    _check_world_size(config)
    _run_worker(config, int(os.environ["RANK"]), None)
    return True


def _check_world_size(config: EngineConfig) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != config.tensor_parallel_size:
        raise ValueError(
            f"torchrun started {world} processes but tensor_parallel_size is {config.tensor_parallel_size}; "
            f"launch exactly tensor_parallel_size processes (--nnodes x --nproc-per-node)"
        )


# ----- rank 0 ------------------------------------------------------------------------------------------------
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
            _check_world_size(config)
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
            self.control, state = _init_group(config, 0, store)
            self.runner = _build_runner(config, state, self.control)
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
            _send(command, payload, self.control)
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
                _send(SHUTDOWN, None, self.control)
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
