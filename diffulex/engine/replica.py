"""Data parallelism: one Engine in a child process (a replica), driven by plain picklable messages.

The parent (the server's client) starts each replica with the ``spawn`` start method (a forked child
cannot use CUDA), sends it ``AddCommand`` / ``AbortCommand`` / ``ShutdownCommand`` on its own command
queue and reads ``Report``s from its own pipe: streaming progress (final tokens, denoise snapshots),
finished outputs, refused requests and a stats snapshot. Every replica has its own channels, so a
replica killed in the middle of a write can break only its own pipe, never another replica's.

Liveness: a replica reports at least every ``heartbeat_s`` between steps, idle or busy. The parent's
reader thread declares it dead when its process exits (the pipe reads EOF) or when no report arrives
within ``heartbeat_timeout_s`` (then the process is killed).

Tensor parallelism: a replica stays one process that talks to the parent; it is rank 0 of its own TP
group and starts its TP workers (``diffulex.engine.tp_workers``). That is why replica processes are not
daemonic (a daemonic process cannot have children): the parent stops them itself
(``ReplicaProcess.stop``) and a replica whose parent is gone exits on its own. A replica whose TP group
broke fails its pending requests and exits, so the parent reports it dead.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from diffulex.config import EngineConfig
from diffulex.engine.replica_messages import (
    AbortCommand,
    AddCommand,
    Progress,
    Rejection,
    ReplicaInfo,
    ReplicaOptions,
    Report,
    ShutdownCommand,
    StartFailed,
    stream_progress,
)

logger = logging.getLogger(__name__)

POLL_S = 0.05  # how often the parent's reader thread checks a silent replica


def replica_device(device: str, index: int, tensor_parallel_size: int = 1) -> str:
    """Replica ``index``'s device: with ``auto``/``cuda`` and GPUs present, GPU ``index`` (times
    ``tensor_parallel_size``: its ranks take the GPUs after it; modulo the GPU count, so replicas share GPUs
    when there are fewer); anything else (``cpu``, ``cuda:i``) is kept."""
    if device not in ("auto", "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{(index * tensor_parallel_size) % torch.cuda.device_count()}"


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "the process is still running but stopped answering"
    if exitcode < 0:
        try:
            return f"the process was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"the process was killed by signal {-exitcode}"
    return f"the process exited with code {exitcode}"


# ----- the child's side ---------------------------------------------------------------------------------
@dataclass
class _Stream:
    mode: str
    sent: int = 0  # final tokens already reported


class ReplicaLoop:
    """The child's side of a replica: owns one Engine, its streaming requests and its two channels."""

    def __init__(self, engine: Any, commands: Any, reports: Any, heartbeat_s: float):
        self.engine = engine
        self.commands = commands
        self.reports = reports
        self.heartbeat_s = heartbeat_s
        self.streams: dict[str, _Stream] = {}
        self.stopping = False
        self.report = Report()
        self.last_sent = 0.0

    def run(self) -> None:
        parent = multiprocessing.parent_process()
        while not self.stopping:
            self._take_commands(wait=not self.engine.has_unfinished())
            if self.engine.has_unfinished() and not self.stopping:
                self._step()
            if parent is not None and not parent.is_alive():
                return  # orphaned: nobody is left to serve
            broken = self.engine.unhealthy_reason()
            if broken is not None:  # a tensor-parallel rank died: fail what is pending, then exit
                self.report.finished.extend(self.engine.step())
                self._send()
                raise RuntimeError(broken)
            if self.report.has_news() or time.monotonic() - self.last_sent >= self.heartbeat_s:
                self._send()
        for request_id in list(self.engine.requests):
            output = self.engine.abort(request_id)
            if output is not None:
                self.report.finished.append(output)
        self.report.stopped = True
        self._send()

    def _take_commands(self, wait: bool) -> None:
        try:
            command = self.commands.get(timeout=self.heartbeat_s) if wait else self.commands.get_nowait()
            while True:
                self._apply(command)
                command = self.commands.get_nowait()
        except queue.Empty:
            return

    def _apply(self, command: Any) -> None:
        from diffulex.engine.engine import QueueFullError

        if isinstance(command, AddCommand):
            try:
                self.engine.add_request(command.prompt_ids, command.params, command.request_id)
            except QueueFullError as error:
                self.report.rejected.append(Rejection(command.request_id, "queue_full", str(error)))
                return
            except ValueError as error:
                self.report.rejected.append(Rejection(command.request_id, "invalid", str(error)))
                return
            except Exception as error:  # a bug: refuse this request, keep serving the others
                logger.exception("add_request failed for %s", command.request_id)
                self.report.rejected.append(Rejection(command.request_id, "error", str(error)))
                return
            if command.stream is not None:
                self.streams[command.request_id] = _Stream(command.stream)
        elif isinstance(command, AbortCommand):
            self.streams.pop(command.request_id, None)
            output = self.engine.abort(command.request_id)
            if output is not None:
                self.report.finished.append(output)
        elif isinstance(command, ShutdownCommand):
            self.stopping = True
        else:
            logger.error("replica got an unknown command %r", command)

    def _step(self) -> None:
        start = time.perf_counter()
        try:
            finished = self.engine.step()
        except Exception:  # the engine isolates request faults; this is a bug: keep serving
            logger.exception("engine step failed")
            finished = []
        self.report.step_latencies.append(time.perf_counter() - start)
        for request_id, stream in self.streams.items():
            request = self.engine.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            final, snapshot = stream_progress(request, stream.sent, stream.mode)
            if final or snapshot is not None:
                stream.sent += len(final)
                self.report.progress.append(Progress(request_id, final, snapshot))
        for output in finished:
            self.streams.pop(output.request_id, None)
            self.report.finished.append(output)

    def _send(self) -> None:
        self.report.stats = {**self.engine.stats(), "num_unfinished": len(self.engine.requests)}
        try:
            self.reports.send(self.report)
        except OSError:  # the parent is gone (broken pipe): stop
            self.stopping = True
        self.report = Report()
        self.last_sent = time.monotonic()


def replica_main(
    index: int, config: EngineConfig, commands: Any, reports: Any, options: ReplicaOptions
) -> None:
    """Entry point of a replica process: build the engine, say so, then serve commands until told to stop."""
    # Ctrl-C reaches the whole process group: the server drains, then stops its replicas itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        from diffulex.engine.engine import Engine

        device = replica_device(config.device, index, config.tensor_parallel_size)
        if device.startswith("cuda:"):
            torch.cuda.set_device(torch.device(device))  # graphs and kernels use the current device
        elif options.cpu_threads is not None:
            torch.set_num_threads(options.cpu_threads)  # replicas share the host's cores
        engine = Engine(config.model_copy(update={"device": device, "data_parallel_size": 1}))
    except Exception as error:
        logger.exception("replica %d failed to start", index)
        reports.send(StartFailed(index, f"{type(error).__name__}: {error}"))
        return
    info = ReplicaInfo(
        index=index,
        pid=os.getpid(),
        device=str(engine.runner.device),
        strategy_name=engine.strategy_name,
        mask_token_id=engine.mask_token_id,
        max_model_len=engine.max_model_len,
    )
    reports.send(info)
    try:
        ReplicaLoop(engine, commands, reports, options.heartbeat_s).run()
    finally:
        engine.close()  # its tensor-parallel workers, if any


# ----- the parent's side --------------------------------------------------------------------------------
class ReplicaProcess:
    """The parent's handle on one replica: its child process, command queue, report pipe, reader thread.

    ``on_report(index, report)`` and ``on_death(index, reason)`` run on the reader thread; ``on_death``
    runs at most once and never for a replica stopped on purpose.
    """

    def __init__(self, index: int, config: EngineConfig, options: ReplicaOptions, heartbeat_timeout_s: float):
        context = multiprocessing.get_context("spawn")
        self.index = index
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.commands = context.Queue()
        self._reports, child_end = context.Pipe(duplex=False)
        self.process = context.Process(
            target=replica_main,
            args=(index, config, self.commands, child_end, options),
            name=f"diffulex-replica-{index}",
        )
        self.process.start()
        child_end.close()  # only the child writes: once it exits, this end reads EOF
        self.info: ReplicaInfo | None = None
        self.death: str | None = None  # why it died; None while alive or stopped on purpose
        self._stopping = False
        self._thread: threading.Thread | None = None

    @property
    def alive(self) -> bool:
        return self.death is None and not self._stopping and self.process.is_alive()

    def wait_ready(self, timeout_s: float) -> ReplicaInfo:
        """Block until the replica's engine is built; raise RuntimeError naming the replica if it fails."""
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"replica {self.index} did not start within {timeout_s:g} s")
            try:
                ready = self._reports.poll(min(remaining, POLL_S))
                message = self._reports.recv() if ready else None
            except (EOFError, OSError):
                self.process.join(timeout=1.0)
                raise RuntimeError(
                    f"replica {self.index} failed to start: {describe_exit(self.process.exitcode)}"
                ) from None
            if isinstance(message, StartFailed):
                raise RuntimeError(f"replica {self.index} failed to start: {message.message}")
            if isinstance(message, ReplicaInfo):
                self.info = message
                return message

    def start_reader(
        self, on_report: Callable[[int, Report], None], on_death: Callable[[int, str], None]
    ) -> None:
        self._thread = threading.Thread(
            target=self._read, args=(on_report, on_death), name=f"diffulex-replica-{self.index}-reader"
        )
        self._thread.daemon = True  # never keeps the server process alive on its own
        self._thread.start()

    def send(self, command: AddCommand | AbortCommand | ShutdownCommand) -> None:
        if self.death is not None:
            raise RuntimeError(f"replica {self.index} died: {self.death}")
        self.commands.put(command)

    def _read(self, on_report: Callable[[int, Report], None], on_death: Callable[[int, str], None]) -> None:
        last_seen = time.monotonic()
        while True:
            try:
                message = self._reports.recv() if self._reports.poll(POLL_S) else None
            except (EOFError, OSError):  # the child's end closed: it exited
                if not self._stopping:
                    self.process.join(timeout=1.0)
                    self._die(describe_exit(self.process.exitcode), on_death)
                return
            now = time.monotonic()
            if isinstance(message, Report):
                last_seen = now
                on_report(self.index, message)
                if message.stopped:
                    return
            elif self._stopping:
                continue  # stop() joins or kills the process
            elif not self.process.is_alive():
                self._die(describe_exit(self.process.exitcode), on_death)
                return
            elif now - last_seen > self.heartbeat_timeout_s:
                self.process.kill()
                self._die(f"no report for {now - last_seen:.1f} s (heartbeat timeout); killed", on_death)
                return

    def _die(self, reason: str, on_death: Callable[[int, str], None]) -> None:
        self.death = reason
        logger.error("replica %d died: %s", self.index, reason)
        on_death(self.index, reason)

    def request_stop(self) -> None:
        """Ask the replica to exit (it aborts what it still runs and reports that first); no wait."""
        if self._stopping:
            return
        self._stopping = True
        if self.death is None and self.process.is_alive():
            self.commands.put(ShutdownCommand())

    def stop(self, timeout_s: float = 10.0) -> None:
        """Ask the replica to exit, wait up to ``timeout_s``, then make sure it is gone."""
        self.request_stop()
        self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)
        if self._thread is not None:
            self._thread.join(timeout=2.0)
        self.commands.cancel_join_thread()  # a dead child may leave commands unread: never block on them
        self.commands.close()
