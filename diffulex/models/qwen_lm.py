"""The LM wrapper shared by the Qwen-layout families (SDAR, SDAR-MoE, LLaDA2-MoE, Dream, Fast-dLLM-v2).

Each family keeps its own spec (``spec_from_config``), config checks and decoder stack; this class owns
what they have in common: the LM head, tying, logits and loading by the official names (identical to
ours, merged projections filled slice by slice).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from diffulex.layers.linear import Linear, UnmergedView, batch_invariant_linear
from diffulex.models.registry import ModelSpec, load_mapped_weights


class QwenStyleLM(nn.Module):
    """``model`` (embeddings, layers, final norm) plus ``lm_head``; ``forward`` gives hidden states of the
    packed step and ``compute_logits`` the logits of the rows it is given (unshifted)."""

    family: str

    def __init__(self, hf_config: dict[str, Any]):
        super().__init__()
        self.check_config(hf_config)
        self.spec: ModelSpec = self.spec_from_config(hf_config)
        self.model = self.build_model(hf_config)
        self.lm_head = Linear(self.spec.hidden_size, self.spec.vocab_size)
        self.tie_word_embeddings = bool(hf_config.get("tie_word_embeddings", False))

    # ----- what each family provides ------------------------------------------------------------------
    @classmethod
    def spec_from_config(cls, cfg: dict[str, Any]) -> ModelSpec:
        raise NotImplementedError

    def check_config(self, hf_config: dict[str, Any]) -> None:
        """Refuse configs this implementation would compute differently from the official code."""

    def build_model(self, hf_config: dict[str, Any]) -> nn.Module:
        raise NotImplementedError

    # ----- shared -------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``input_ids [T]``, ``positions [T]`` (packed tokens of the step) -> final hidden ``[T, hidden]``."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [N, hidden]`` -> logits ``[N, vocab_size]`` in the model dtype (no shift here)."""
        return batch_invariant_linear(hidden, self.lm_head.weight)

    def tie_weights(self) -> None:
        """Share the embedding matrix with the LM head (``tie_word_embeddings``)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy the official tensors in (same names, merged projections by slice); raises ``WeightLoadError``."""
        tied = self.tie_word_embeddings
        load_mapped_weights(
            UnmergedView(self, self.official_name),  # merged projections under their official names
            named_tensors,
            lambda name: name,
            # A tied checkpoint may still carry the head: the embedding is authoritative, as in HF.
            ignored=lambda name: tied and name == "lm_head.weight",
        )

    @staticmethod
    def official_name(local_name: str) -> str:
        """Our parameter name -> the official checkpoint name (identical for these families)."""
        return local_name
