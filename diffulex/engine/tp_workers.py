"""Tensor parallelism, the worker side: each rank's group, shard and command loop.

Rank 0 (``diffulex.engine.tp_runner.TensorParallelRunner``, in the engine's own process) drives
``tensor_parallel_size - 1`` worker ranks over ``torch.distributed``. On one host it starts the other
ranks itself (``spawn`` processes running ``worker_main``); under ``torchrun`` they are the other
processes of the launch (``run_torchrun_worker``). Every rank builds its shard of the model
(``diffulex.layers.parallel_state`` tells the layers which one) and its share of the KV cache, then the
workers loop: receive a command, run it, take part in its collectives.

**Commands** travel on a gloo "control" group as two broadcasts from rank 0: a header ``[command,
payload bytes]`` and the pickled payload as one uint8 tensor (a StepPlan is plain numpy and Python, so the
whole plan goes in one message). The tensors of the model (all-reduces, the logits gather) use the
default group: gloo on CPU, NCCL on CUDA (rank r on ``cuda:r``). The control group has a long timeout
(idle workers wait on it); the default group has ``distributed_timeout_s``. A worker whose rank 0
vanished fails its next collective and exits.
"""

from __future__ import annotations

import datetime
import logging
import os
import pickle
import signal
from typing import Any

import numpy as np
import torch

from diffulex.config import EngineConfig
from diffulex.engine.model_runner import ModelRunner, resolve_device, resolve_dtype
from diffulex.layers.parallel_state import ParallelState, using_parallel_state

logger = logging.getLogger(__name__)

EXECUTE, FULL_LOGITS, ENABLE_CUDA_GRAPHS, SHUTDOWN = 1, 2, 3, 4
CONTROL_TIMEOUT = datetime.timedelta(days=365)  # idle workers wait on the control group for the next call


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


def init_group(config: EngineConfig, rank: int, store: Any | None) -> tuple[Any, ParallelState]:
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


def build_runner(config: EngineConfig, state: ParallelState, control: Any) -> ModelRunner:
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
def send_command(command: int, payload: Any, control: Any) -> None:
    import torch.distributed as dist

    data = b"" if payload is None else pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)
    dist.broadcast(torch.tensor([command, len(data)], dtype=torch.int64), 0, group=control)
    if data:
        dist.broadcast(torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy()), 0, group=control)


def receive_command(control: Any) -> tuple[int, Any]:
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
        command, payload = receive_command(control)
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

    control, state = init_group(config, rank, store)
    try:
        _serve(build_runner(config, state, control), control)
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
    check_world_size(config)
    _run_worker(config, int(os.environ["RANK"]), None)
    return True


def check_world_size(config: EngineConfig) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != config.tensor_parallel_size:
        raise ValueError(
            f"torchrun started {world} processes but tensor_parallel_size is {config.tensor_parallel_size}; "
            f"launch exactly tensor_parallel_size processes (--nnodes x --nproc-per-node)"
        )
