"""The messages between the server and a data-parallel replica (plain picklable data), and the streaming
progress rule both engine clients share (``stream_progress``). See ``diffulex/engine/replica.py``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffulex.request import Request, RequestOutput
from diffulex.sampling_params import SamplingParams


@dataclass
class AddCommand:
    """Enqueue a request; ``stream`` is None (final output only), "block_append" or "denoise"."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: str | None = None


@dataclass
class AbortCommand:
    """Stop a request and free its pages (its abort output comes back in the next report)."""

    request_id: str


@dataclass
class ShutdownCommand:
    """Abort whatever is left, send a last report (``stopped=True``) and exit."""


@dataclass
class ReplicaInfo:
    """Sent once when the replica's engine is built: what the server needs to know about the model."""

    index: int
    pid: int
    device: str
    strategy_name: str
    mask_token_id: int
    max_model_len: int


@dataclass
class StartFailed:
    """Sent instead of ``ReplicaInfo`` when building the engine raised."""

    index: int
    message: str


@dataclass
class Progress:
    """A streaming request's tokens that became final since its last progress, and its denoise snapshot."""

    request_id: str
    new_token_ids: list[int]
    snapshot: list[int] | None = None


@dataclass
class Rejection:
    """``add_request`` refused a request: ``kind`` is "invalid" (bad input), "queue_full" or "error"."""

    request_id: str
    kind: str
    message: str


@dataclass
class Report:
    """Everything a replica has to say since its last report, plus its current stats."""

    progress: list[Progress] = field(default_factory=list)
    finished: list[RequestOutput] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    step_latencies: list[float] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    stopped: bool = False  # the last report before a requested exit

    def has_news(self) -> bool:
        return bool(self.progress or self.finished or self.rejected)


@dataclass
class ReplicaOptions:
    """How a replica runs: its report interval and, on CPU, its share of the host's threads."""

    heartbeat_s: float = 0.2
    cpu_threads: int | None = None


def stream_progress(request: Request, sent: int, mode: str | None) -> tuple[list[int], list[int] | None]:
    """What a streaming subscriber gets after a step: the tokens final since the first ``sent`` ones, held
    back from the first stop token (the finish cuts there, so it is not final text), and in ``denoise``
    mode the whole answer region (mask id where undecoded)."""
    start = request.num_prompt
    end = min(request.decoded_prefix_end(), start + request.params.max_tokens)
    final = request.tokens[start + sent : end]
    stops = set(request.params.stop_token_ids)
    if not request.params.ignore_eos:
        stops.update(request.eos_token_ids)
    cut = next((i for i, token in enumerate(final) if token in stops), len(final))
    snapshot = request.tokens[start : start + request.params.max_tokens] if mode == "denoise" else None
    return list(final[:cut]), snapshot
