"""POST /v1/chat/completions: messages rendered with the tokenizer's chat template, optional streaming."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .protocol import (
    APIError,
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    new_id,
)
from .serving import Serving, unless_disconnected
from .sse import sse_event

router = APIRouter()
DEFAULT_MAX_TOKENS = 64  # chat answers are longer than OpenAI's 16-token completion default


def render_messages(serving: Serving, body: ChatCompletionRequest) -> list[int]:
    tokenizer = serving.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(
            400,
            "this model has no tokenizer with a chat template: use /v1/completions with token ids",
            param="messages",
        )
    messages = [
        {**message.model_dump(exclude_none=True), "content": message.text()} for message in body.messages
    ]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as error:  # a template that rejects the conversation (roles, order) is a client error
        raise APIError(400, f"the chat template rejected the messages: {error}", param="messages") from None
    # The template already holds the special tokens (BOS, headers): encode it as is.
    return list(tokenizer.encode(text, add_special_tokens=False))


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> dict | StreamingResponse:
    serving: Serving = request.app.state.serving
    serving.check_model(body.model)
    body.check_supported()
    params = body.sampling_params(DEFAULT_MAX_TOKENS)
    prompt_ids = render_messages(serving, body)
    completion_id = new_id("chatcmpl")
    if body.stream:
        updates, first, deadline = await serving.start(prompt_ids, params, body.stream_mode)
        events = serving.stream(updates, first, deadline, params, body.stream_mode)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _sse(serving, completion_id, events, include_usage), media_type="text/event-stream"
        )
    output = await unless_disconnected(request, serving.generate(prompt_ids, params))
    choice = ChatChoice(
        index=0,
        message=AssistantMessage(content=output.text),
        finish_reason=output.finish_reason,
        token_ids=list(output.token_ids),
    )
    return ChatCompletion(
        id=completion_id,
        model=serving.model_name,
        choices=[choice],
        usage=serving.usage([output]),
        diffusion=serving.diffusion([output]),
    ).model_dump()


async def _sse(
    serving: Serving, completion_id: str, events: AsyncIterator, include_usage: bool
) -> AsyncIterator[str]:
    base = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": serving.model_name,
    }
    first_delta = {"role": "assistant", "content": ""}
    yield sse_event({**base, "choices": [{"index": 0, "delta": first_delta, "finish_reason": None}]})

    def choice(event) -> dict:
        delta = {"content": event.text} if event.text or event.output is None else {}
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": event.finish_reason}

    async for line in serving.sse_stream(events, base, choice, include_usage):
        yield line
