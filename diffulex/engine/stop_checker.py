"""Stop conditions, checked on the decoded prefix only (tokens there never change again)."""

from __future__ import annotations

from typing import Any

from diffulex.request import Request


def find_stop(request: Request, limit: int, tokenizer: Any | None) -> int | None:
    """Scan newly final tokens ``[request.stop_scanned, limit)``; return the cut position or None.

    The cut excludes the stop token: EOS (unless ``ignore_eos``) and ``stop_token_ids``. For a stop
    string the cut keeps the tokens up to the one completing it and records where the text ends
    (``request.stop_text_cut``), as OpenAI-style servers return the text before the stop string.
    """
    params = request.params
    stop_ids = set(params.stop_token_ids)
    if not params.ignore_eos:
        stop_ids.update(request.eos_token_ids)
    start = request.stop_scanned
    tokens = request.tokens
    for position in range(start, limit):
        if tokens[position] in stop_ids:
            return position
    if params.stop and tokenizer is not None and limit > start:
        prompt = request.num_prompt
        # Only text that ends in the new tokens can hold a new match: search from a little before them.
        text_before = (
            tokenizer.decode(tokens[prompt:start], skip_special_tokens=True) if start > prompt else ""
        )
        longest = max(len(s) for s in params.stop)
        for position in range(start, limit):
            text = tokenizer.decode(tokens[prompt : position + 1], skip_special_tokens=True)
            window_start = max(0, len(text_before) - longest)
            hits = [text.find(s, window_start) for s in params.stop if s]
            hits = [h for h in hits if h >= 0]
            if hits:
                request.stop_text_cut = min(hits)
                return position + 1
    request.stop_scanned = limit
    return None
