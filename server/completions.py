"""POST /v1/completions: text or token-id prompts, one choice per prompt, optional SSE streaming."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from diffulex.request import RequestOutput

from .protocol import APIError, Completion, CompletionChoice, CompletionRequest, new_id
from .serving import Serving, unless_disconnected

router = APIRouter()
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def prompt_list(serving: Serving, prompt: str | list) -> list[list[int]]:
    """Normalise every accepted prompt shape to a list of token-id prompts."""
    if isinstance(prompt, str):
        return [serving.encode(prompt)]
    if not prompt:
        raise APIError(400, "the prompt is empty", param="prompt")
    if all(isinstance(item, int) for item in prompt):
        return [list(prompt)]
    if all(isinstance(item, str) for item in prompt):
        return [serving.encode(item) for item in prompt]
    return [list(item) for item in prompt]


@router.post("/v1/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> dict | StreamingResponse:
    serving: Serving = request.app.state.serving
    serving.check_model(body.model)
    body.check_supported()
    params = body.sampling_params(DEFAULT_MAX_TOKENS)
    prompts = prompt_list(serving, body.prompt)
    completion_id = new_id("cmpl")
    if body.stream:
        if len(prompts) != 1:
            raise APIError(400, "streaming supports one prompt per request", param="prompt")
        updates, first, deadline = await serving.start(prompts[0], params, body.stream_mode)
        events = serving.stream(updates, first, deadline, params, body.stream_mode)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(serving, completion_id, events, include_usage), media_type="text/event-stream"
        )
    results = await unless_disconnected(
        request,
        asyncio.gather(*(serving.generate(ids, params) for ids in prompts), return_exceptions=True),
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result
    outputs: list[RequestOutput] = list(results)  # type: ignore[arg-type]
    choices = [
        CompletionChoice(
            index=index,
            text=serving.text_of(output),
            finish_reason=output.finish_reason,
            token_ids=list(output.token_ids),
        )
        for index, output in enumerate(outputs)
    ]
    return Completion(
        id=completion_id,
        model=serving.model_name,
        choices=choices,
        usage=serving.usage(outputs),
        diffusion=serving.diffusion(outputs),
    ).model_dump()


async def _sse(
    serving: Serving, completion_id: str, events: AsyncIterator, include_usage: bool
) -> AsyncIterator[str]:
    created = int(time.time())
    base = {"id": completion_id, "object": "text_completion", "created": created, "model": serving.model_name}

    def choice(event) -> dict:
        return {
            "index": 0,
            "text": event.text,
            "logprobs": None,
            "finish_reason": event.finish_reason,
            "token_ids": event.token_ids,
        }

    async for line in serving.sse_stream(events, base, choice, include_usage):
        yield line
