"""The per-step attention context: the one object every attention layer reads.

The runner fills it before a forward and clears it after, so a model's ``forward(input_ids, positions)``
stays free of cache plumbing (nano-vllm's design).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionContext:
    """Where each packed query token belongs, what it may see, and where its K/V go.

    ``cu_seqlens_q``: ``num_seqs + 1`` offsets of each sequence's query tokens.
    ``block_ids``: ``[num_tokens]`` int64; a query token sees the step's own tokens of its sequence whose id
    is <= its own (equal = bidirectional, increasing = block-causal, huge = padding nobody sees).
    ``context_lens``: cached positions ``[0, context_len)`` each sequence sees in full, minus
    ``context_holes[seq] = (start, end)`` (empty when start == end).
    ``page_tables``: ``[num_seqs, max_pages]`` int32 page ids (−1 padded) or None when nothing is cached.
    ``slot_mapping``: ``[num_tokens]`` int64 flat cache slot to store each token's K/V into, −1 = don't.
    """

    cu_seqlens_q: list[int]
    block_ids: torch.Tensor
    context_lens: list[int]
    context_holes: list[tuple[int, int]]
    page_tables: torch.Tensor | None
    slot_mapping: torch.Tensor
    extras: dict = field(default_factory=dict)
    # The GPU fast path: the same facts as device tensors (read by the Triton kernels without any host
    # synchronisation, so the step can be captured in a CUDA graph).
    use_triton: bool = False
    cu_seqlens_q_t: torch.Tensor | None = None
    context_lens_t: torch.Tensor | None = None
    context_holes_t: torch.Tensor | None = None
    max_seqlen_q: int = 0


_CONTEXT: AttentionContext | None = None


def set_context(context: AttentionContext | None) -> None:
    """Install the context of the step about to run (None clears it)."""
    global _CONTEXT
    _CONTEXT = context


def get_context() -> AttentionContext:
    """The context of the running step; attention outside a step is a programming error."""
    if _CONTEXT is None:
        raise RuntimeError("attention called outside a step: ModelRunner must set_context() first")
    return _CONTEXT


def single_sequence_context(
    num_tokens: int, device: torch.device | str, block_ids: torch.Tensor | None = None
) -> AttentionContext:
    """A context for one uncached sequence (full forward): used for logits of whole sequences."""
    if block_ids is None:
        block_ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    return AttentionContext(
        cu_seqlens_q=[0, num_tokens],
        block_ids=block_ids.to(device),
        context_lens=[0],
        context_holes=[(0, 0)],
        page_tables=None,
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.long, device=device),
    )
