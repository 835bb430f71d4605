"""The prompt and the call recorder shared by the reference-loop sanity tests."""

from __future__ import annotations

import torch

from tests.reference.plain_models import PlainModel

PROMPT = [5, 6, 7, 8, 9]  # P = 5: ends mid-block for block sizes 2 and 4


class Recorder:
    """Wraps a PlainModel and records every model call (inputs, positions, past length, logits)."""

    def __init__(self, model: PlainModel):
        self.model = model
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def forward(self, input_ids, positions, attn_mask, past=None):
        logits, kv = self.model.forward(input_ids, positions, attn_mask, past)
        self.calls.append(
            {
                "ids": torch.as_tensor(input_ids).clone(),
                "positions": torch.as_tensor(positions).clone(),
                "past_len": 0 if past is None else past[0][0].shape[0],
                "logits": logits,
            }
        )
        return logits, kv

    def logits(self, input_ids, attn_mask=None):
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        return self.forward(ids, torch.arange(ids.shape[0]), attn_mask)[0]
