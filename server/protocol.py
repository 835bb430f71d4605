"""The OpenAI API as pydantic models: requests (unknown fields rejected), responses, errors.

Requests carry the OpenAI fields plus the diffusion knobs that clients send through ``extra_body``
(``steps``, ``threshold``, ``unmask_policy``, ``cfg_scale``, ``ignore_eos``, ``stream_mode``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from diffulex.sampling_params import SamplingParams

StreamMode = Literal["block_append", "denoise"]
MASK_GLYPH = "▒"  # how a still-masked position is rendered in ``denoise`` streaming snapshots


class APIError(Exception):
    """An error the client caused (or may retry); rendered as an OpenAI error body with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ----- requests ---------------------------------------------------------------------------------------
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _GenerationKnobs(BaseModel):
    """Fields shared by completions and chat completions (OpenAI's plus the diffusion extras)."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, description="Tokens to generate (completions default 16).")
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Diffusion knobs (OpenAI clients send them with extra_body=...).
    steps: int | None = None
    threshold: float | None = None
    unmask_policy: str | None = None
    cfg_scale: float | None = None
    ignore_eos: bool = False
    stream_mode: StreamMode = "block_append"

    def check_supported(self) -> None:
        if self.n != 1:
            raise APIError(400, f"n={self.n} is not supported: only n=1 (one choice per prompt)", param="n")

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        """The engine's SamplingParams; a bad value is a 400 naming the field."""
        values: dict[str, Any] = {
            "max_tokens": self.max_tokens if self.max_tokens is not None else default_max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "steps": self.steps,
            "threshold": self.threshold,
            "unmask_policy": self.unmask_policy,
            "cfg_scale": self.cfg_scale,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
        }
        values = {key: value for key, value in values.items() if value is not None}
        values["seed"] = self.seed
        try:
            return SamplingParams(**values)
        except ValueError as error:
            param = str(error).split(" ", 1)[0]
            raise APIError(400, str(error), param=param if param in values else None) from None


class CompletionRequest(_GenerationKnobs):
    """POST /v1/completions. ``prompt``: text, texts, token ids, or lists of token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError(400, "echo=true is not supported", param="echo")
        if self.suffix:
            raise APIError(400, "suffix (insertion) is not supported", param="suffix")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls, ... are passed to the chat template

    role: str
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise APIError(
                    400, f"content part type {part.get('type')!r} is not supported", param="messages"
                )
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_GenerationKnobs):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)


# ----- responses --------------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class DiffusionInfo(BaseModel):
    """How the answer was decoded (an extension): model forwards, tokens per forward, strategy."""

    forwards: int
    tokens_per_forward: float
    strategy: str


class CompletionChoice(BaseModel):
    index: int
    text: str | None
    finish_reason: str | None
    logprobs: None = None
    token_ids: list[int] | None = None  # extension: the generated token ids


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    diffusion: DiffusionInfo


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None
    token_ids: list[int] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    diffusion: DiffusionInfo


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
