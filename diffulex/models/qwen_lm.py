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

from diffulex.layers.linear import UnmergedView
from diffulex.layers.vocab_parallel import ParallelLMHead
from diffulex.models.registry import ModelSpec, load_mapped_weights, merge_token_ids, token_ids


class QwenStyleLM(nn.Module):
    """``model`` (embeddings, layers, final norm) plus ``lm_head``; ``forward`` gives hidden states of the
    packed step and ``compute_logits`` the logits of the rows it is given (unshifted)."""

    family: str

    def __init__(self, hf_config: dict[str, Any]):
        super().__init__()
        self.check_config(hf_config)
        self.spec: ModelSpec = self.spec_from_config(hf_config)
        self.model = self.build_model(hf_config)
        self.lm_head = ParallelLMHead(self.spec.hidden_size, self.spec.vocab_size)
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

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """``hidden [N, hidden]`` -> logits ``[N, vocab_size]`` in the model dtype (no shift here); tensor
        parallel: on rank 0, None on the other ranks."""
        return self.lm_head(hidden)

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


def qwen_spec(
    family: str,
    cfg: dict[str, Any],
    *,
    head_dim: int,
    vocab_size: int,
    mask_token_id: int,
    eos_token_id: int,
    pad_token_id: int | None,
    shift_logits: bool,
    native_attention: str,
    default_strategy: str,
    default_block_size: int,
    vanilla_schedule: str,
    im_end: tuple[int, int] | None = None,
) -> ModelSpec:
    """The ModelSpec of a Qwen-layout checkpoint; keyword arguments are the family's official defaults.

    Config ids win over them: ``mask_token_id``, ``eos_token_id`` (plus ``generation_config``'s), and
    ``pad_token_id`` (``pad_token_id=None`` falls back to the first eos). ``im_end = (endoftext, im_end)``
    also stops at ``<|im_end|>`` when the eos is ``<|endoftext|>`` and the vocabulary holds it (chat
    turns end there; the official generation configs list it).
    """
    generation = cfg.get("generation_config", {})
    eos_ids = token_ids(cfg.get("eos_token_id")) or (eos_token_id,)
    extra = ()
    if im_end is not None and im_end[0] in eos_ids and vocab_size > im_end[1]:
        extra = (im_end[1],)
    mask_id = cfg.get("mask_token_id")
    pad_id = cfg.get("pad_token_id", generation.get("pad_token_id"))
    if pad_id is None:
        pad_id = pad_token_id if pad_token_id is not None else eos_ids[0]
    return ModelSpec(
        family=family,
        hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=int(cfg["num_attention_heads"]),
        num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        head_dim=head_dim,
        vocab_size=vocab_size,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        mask_token_id=int(mask_id) if mask_id is not None else mask_token_id,
        eos_token_ids=merge_token_ids(eos_ids, token_ids(generation.get("eos_token_id")), extra),
        pad_token_id=int(pad_id),
        shift_logits=shift_logits,
        native_attention=native_attention,
        default_strategy=default_strategy,
        default_block_size=default_block_size,
        vanilla_schedule=vanilla_schedule,
    )
