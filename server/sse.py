"""Server-sent events: the ``data: {json}`` framing, the ``[DONE]`` terminator, and the two ways of turning
engine updates into text (``block_append`` deltas, ``denoise`` snapshots)."""

from __future__ import annotations

import json
from typing import Any

from .protocol import MASK_GLYPH

DONE = "data: [DONE]\n\n"


def sse_event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class TextDeltas:
    """Incremental detokenizer for ``block_append`` streaming.

    Decodes all final tokens so far and returns the new suffix of the text. Held back until the end:
    a trailing replacement character (an incomplete UTF-8 sequence) and, when the request has stop
    strings, the last ``len(longest stop) - 1`` characters (they may be the start of a stop string that
    the engine will cut). ``finish`` returns whatever of the final text was not sent yet.
    """

    def __init__(self, tokenizer: Any, stop: list[str]):
        self.tokenizer = tokenizer
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.token_ids: list[int] = []
        self.sent = ""

    def push(self, new_token_ids: list[int]) -> str:
        self.token_ids.extend(new_token_ids)
        if self.tokenizer is None or not new_token_ids:
            return ""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        text = text.rstrip("\ufffd")
        if self.holdback:
            text = text[: max(0, len(text) - self.holdback)]
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta

    def finish(self, final_text: str | None) -> str:
        if not final_text or not final_text.startswith(self.sent):
            return ""
        delta, self.sent = final_text[len(self.sent) :], final_text
        return delta


def render_snapshot(tokenizer: Any, snapshot: list[int], mask_token_id: int) -> str:
    """The whole answer region as text, each still-masked position shown as ``▒`` (denoise streaming)."""
    if tokenizer is None:
        return ""
    pieces: list[str] = []
    run: list[int] = []
    for token in snapshot:
        if token == mask_token_id:
            if run:
                pieces.append(tokenizer.decode(run, skip_special_tokens=True))
                run = []
            pieces.append(MASK_GLYPH)
        else:
            run.append(token)
    if run:
        pieces.append(tokenizer.decode(run, skip_special_tokens=True))
    return "".join(pieces)
