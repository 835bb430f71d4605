"""What the completion and chat endpoints share: the served model, prompt encoding, submitting a request
(engine errors become OpenAI errors), collecting a final output, and streaming text events."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from starlette.requests import Request

from diffulex.config import ServerConfig
from diffulex.engine.engine import QueueFullError
from diffulex.request import RequestOutput
from diffulex.sampling_params import SamplingParams

from .engine_client import EngineClient, RequestUpdate
from .protocol import APIError, DiffusionInfo, StreamMode, Usage, error_body
from .sse import DONE, TextDeltas, render_snapshot, sse_event

T = TypeVar("T")
DISCONNECT_POLL_S = 0.05


class ClientDisconnected(Exception):
    """The client hung up before a non-streaming answer was ready (its requests were aborted)."""


async def _until_disconnected(request: Request, poll_s: float) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(poll_s)


async def unless_disconnected(request: Request, work: Awaitable[T], poll_s: float = DISCONNECT_POLL_S) -> T:
    """Await ``work`` but cancel it as soon as the client disconnects (polled every ``poll_s``).

    Cancelling closes the ``EngineClient.generate`` iterators inside, which aborts their requests and
    frees their pages; then ``ClientDisconnected`` is raised. Uvicorn does not cancel a handler when its
    client hangs up, so a non-streaming request would otherwise run to the end for nobody.
    """
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_until_disconnected(request, poll_s))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # the handler itself was cancelled: take the work down with it
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):
        pass
    raise ClientDisconnected("the client disconnected")


@dataclass
class StreamEvent:
    """One piece of a streamed answer: text (a delta, or the whole snapshot in denoise mode), the new token
    ids (or the snapshot's), and on the last event the finish reason and the output."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    output: RequestOutput | None = None


class Serving:
    """The served model as the endpoints see it: the engine client, its name, tokenizer and limits."""

    def __init__(self, client: EngineClient, config: ServerConfig, model_name: str):
        self.client = client
        self.config = config
        self.model_name = model_name
        engine = client.engine
        self.tokenizer = engine.tokenizer
        self.strategy = engine.strategy_name
        self.mask_token_id = engine.mask_token_id
        self.max_model_len = engine.max_model_len

    # ----- input --------------------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(
                404,
                f"the model '{model}' does not exist; this server serves '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def encode(self, text: str, param: str = "prompt") -> list[int]:
        if self.tokenizer is None:
            raise APIError(
                400,
                "this model has no tokenizer: send the prompt as a list of token ids",
                param=param,
            )
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    # ----- running ------------------------------------------------------------------------------------
    async def start(
        self, prompt_ids: list[int], params: SamplingParams, stream: StreamMode | None
    ) -> tuple[AsyncIterator[RequestUpdate], RequestUpdate, float]:
        """Submit one request and wait for its first update (the final one when not streaming).

        Engine refusals (and ``steps`` past ``max_model_len``) become APIErrors; past ``request_timeout_s`` the request is aborted (504).
        Returns the update iterator, the first update and the deadline.
        """
        if params.steps is not None and params.steps > self.max_model_len:
            # Steps past the tokens to decode are forwards that commit nothing: a huge value would only
            # hold the engine for nothing until the request timeout.
            raise APIError(
                400,
                f"steps must be <= max_model_len ({self.max_model_len}), got {params.steps}",
                param="steps",
            )
        deadline = time.monotonic() + self.config.request_timeout_s
        updates = self.client.generate(prompt_ids, params, stream=stream)
        try:
            first = await asyncio.wait_for(updates.__anext__(), self.config.request_timeout_s)
        except QueueFullError as error:
            raise APIError(
                429, str(error), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}
            ) from None
        except ValueError as error:
            raise APIError(400, str(error), param="prompt") from None
        except RuntimeError as error:  # not accepting work: shutting down, or nothing left that can serve
            code = "shutting_down" if not self.client.accepting else "unavailable"
            raise APIError(503, str(error), type="service_unavailable", code=code) from None
        except asyncio.TimeoutError:
            await updates.aclose()
            raise self._timeout() from None
        return updates, first, deadline

    def _timeout(self) -> APIError:
        return APIError(504, f"the request ran past {self.config.request_timeout_s} s", type="timeout")

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> RequestOutput:
        """Run one request to its final output (non-streaming)."""
        updates, update, _ = await self.start(prompt_ids, params, None)
        await updates.aclose()
        assert update.finished and update.output is not None  # non-streaming: one update, the last
        self.check_output(update.output)
        return update.output

    async def stream(
        self,
        updates: AsyncIterator[RequestUpdate],
        first: RequestUpdate,
        deadline: float,
        params: SamplingParams,
        mode: StreamMode,
    ) -> AsyncIterator[StreamEvent]:
        """Text events of one request; closing this iterator (a client disconnect) aborts the request."""
        deltas = TextDeltas(self.tokenizer, params.stop)
        update = first
        try:
            while True:
                if update.finished:
                    output = update.output
                    assert output is not None
                    if mode == "denoise":
                        yield StreamEvent(
                            output.text or "", list(output.token_ids), output.finish_reason, output
                        )
                    else:
                        tail = output.token_ids[len(deltas.token_ids) :]
                        yield StreamEvent(deltas.finish(output.text), tail, output.finish_reason, output)
                    return
                if mode == "denoise" and update.snapshot is not None:
                    text = render_snapshot(self.tokenizer, update.snapshot, self.mask_token_id)
                    yield StreamEvent(text, list(update.snapshot))
                elif update.new_token_ids:
                    text = deltas.push(update.new_token_ids)
                    yield StreamEvent(text, list(update.new_token_ids))
                try:
                    update = await asyncio.wait_for(updates.__anext__(), max(deadline - time.monotonic(), 0))
                except asyncio.TimeoutError:
                    raise self._timeout() from None
        finally:
            await updates.aclose()

    @staticmethod
    def check_output(output: RequestOutput) -> None:
        if output.finish_reason == "error":
            raise APIError(500, f"generation failed: {output.error}", type="server_error")
        if output.finish_reason == "abort":
            raise APIError(503, "the request was aborted (server shutting down)", type="service_unavailable")

    # ----- output -------------------------------------------------------------------------------------
    @staticmethod
    def usage(outputs: list[RequestOutput]) -> Usage:
        prompt = sum(len(o.prompt_token_ids) for o in outputs)
        completion = sum(len(o.token_ids) for o in outputs)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def diffusion(self, outputs: list[RequestOutput]) -> DiffusionInfo:
        forwards = sum(o.num_forwards for o in outputs)
        tokens = sum(len(o.token_ids) for o in outputs)
        return DiffusionInfo(
            forwards=forwards,
            tokens_per_forward=round(tokens / forwards, 4) if forwards else 0.0,
            strategy=self.strategy,
        )

    def text_of(self, output: RequestOutput) -> str | None:
        return output.text if self.tokenizer is not None else None

    def final_chunk_extras(self, output: RequestOutput) -> dict[str, Any]:
        return {"diffusion": self.diffusion([output]).model_dump()}

    async def sse_stream(
        self,
        events: AsyncIterator,
        base: dict[str, Any],
        make_choice: Callable[[Any], dict[str, Any]],
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """The SSE lines of one streamed choice: a chunk per event (the last with the ``diffusion``
        object, then a usage chunk when asked), errors in-band once headers are sent, then [DONE]."""
        try:
            async for event in events:
                chunk = {**base, "choices": [make_choice(event)]}
                if event.output is not None:
                    chunk |= self.final_chunk_extras(event.output)
                    if include_usage:
                        yield sse_event(chunk)
                        chunk = {**base, "choices": [], "usage": self.usage([event.output]).model_dump()}
                yield sse_event(chunk)
        except APIError as error:
            yield sse_event(error.body())
        except Exception as error:  # headers are sent: report in-band, then end the stream
            yield sse_event(error_body(f"stream failed: {error}", "server_error"))
        finally:
            await events.aclose()
        yield DONE
