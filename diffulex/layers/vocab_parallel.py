"""The vocabulary split over tensor-parallel ranks: the token embedding and the LM head.

Rank ``r`` owns rows ``[r * per_rank, (r + 1) * per_rank)`` of the ``[vocab, hidden]`` matrix, with
``per_rank = ceil(vocab / tp_size)``; the last rank's shard is padded with zero rows so that every shard
has the same shape (which the gather of the logits needs). Embedding and head use the same layout, so a
tied head shares the embedding's shard. At one rank the shard is the whole matrix and both layers compute
exactly what ``nn.Embedding`` and ``batch_invariant_linear`` computed before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffulex.layers.linear import Linear, batch_invariant_linear
from diffulex.layers.parallel_state import all_reduce, gather_last_dim, get_parallel_state


def vocab_shard(vocab_size: int) -> tuple[int, int, int]:
    """``(start, real rows, padded rows)`` of this rank's vocabulary shard."""
    state = get_parallel_state()
    per_rank = -(-vocab_size // state.tp_size)
    start = state.tp_rank * per_rank
    real = max(0, min(per_rank, vocab_size - start))
    return start, real, per_rank


def _vocab_rows(tensor: torch.Tensor, vocab_size: int, start: int, real: int, padded: int) -> torch.Tensor:
    """This rank's rows of an official ``[vocab, ...]`` tensor, zero-padded to ``padded`` rows."""
    if tensor.shape[0] != vocab_size or (start == 0 and real == padded == vocab_size):
        return tensor  # whole (one rank), or a wrong shape the loader will report
    rows = tensor.narrow(0, start, real)
    if real < padded:
        rows = torch.cat([rows, rows.new_zeros(padded - real, *rows.shape[1:])])
    return rows


class VocabParallelEmbedding(nn.Embedding):
    """Token embedding whose rows are split over the ranks: a rank looks up the ids it owns, zeros the
    others, and one all-reduce sums the ranks' rows (each id is owned by exactly one rank)."""

    def __init__(self, vocab_size: int, hidden_size: int):
        self.vocab_size = vocab_size
        self.vocab_start, self.vocab_rows, padded = vocab_shard(vocab_size)
        self.parallel = get_parallel_state()
        self.tp_size = self.parallel.tp_size
        # `_weight` skips nn.Embedding's random init: the checkpoint overwrites it anyway.
        super().__init__(padded, hidden_size, _weight=torch.empty(padded, hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(input_ids)
        local = input_ids - self.vocab_start
        owned = (local >= 0) & (local < self.vocab_rows)
        hidden = F.embedding(torch.where(owned, local, torch.zeros_like(local)), self.weight)
        hidden = hidden.masked_fill(~owned.unsqueeze(-1), 0)
        return all_reduce(hidden, self.parallel)

    def load_slice(self, leaf: str, tensor: torch.Tensor, shard: int | None = None) -> torch.Tensor:
        return _vocab_rows(tensor, self.vocab_size, self.vocab_start, self.vocab_rows, self.num_embeddings)


class ParallelLMHead(Linear):
    """LM head whose vocabulary rows are split over the ranks (the embedding's layout, so it can be tied).

    ``forward`` computes this rank's slice of the logits and gathers the slices on rank 0, on the device:
    rank 0 gets ``[N, vocab_size]`` (padding columns dropped), the other ranks None (only rank 0 samples).
    """

    def __init__(self, hidden_size: int, vocab_size: int, bias: bool = False):
        self.vocab_size = vocab_size
        self.vocab_start, self.vocab_rows, padded = vocab_shard(vocab_size)
        self.parallel = get_parallel_state()
        self.tp_size = self.parallel.tp_size
        super().__init__(hidden_size, padded, bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        logits = batch_invariant_linear(hidden, self.weight, self.bias)
        if self.tp_size == 1:
            return logits
        gathered = gather_last_dim(logits, self.parallel)
        if gathered is None or gathered.shape[-1] == self.vocab_size:
            return gathered
        return gathered[..., : self.vocab_size].contiguous()  # the samplers expect dense rows

    def load_slice(self, leaf: str, tensor: torch.Tensor, shard: int | None = None) -> torch.Tensor:
        return _vocab_rows(tensor, self.vocab_size, self.vocab_start, self.vocab_rows, self.out_features)
