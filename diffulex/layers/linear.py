"""Linear projections whose per-row result does not depend on the batch they are computed in.

A plain 2-D ``x @ weight.T`` on CPU picks its blocking from the number of rows, so the same token can get
different bits depending on how many other tokens share the step; greedy decoding would then differ
between a request run alone and the same request in a batch. Splitting the rows into fixed tiles of
``ROW_TILE`` and issuing one 3-D matmul makes every tile go through the same kernel path, whatever the
number of tiles: each row's result is then a function of that row alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

ROW_TILE = 16  # rows per tile of the 3-D matmul; the padding overhead is at most ROW_TILE - 1 rows


def batch_invariant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for ``x [..., in]``, ``weight [out, in]``, batch-invariant per row.

    The rows are padded with zeros up to a multiple of ``ROW_TILE`` and multiplied as one
    ``[num_tiles, ROW_TILE, in] @ [in, out]`` matmul; the padding rows are dropped from the result.
    """
    if x.is_cuda:
        # On the GPU one plain GEMM reads each weight once (the step is bound by weight reads); cuBLAS
        # batch invariance is not claimed yet.
        return torch.nn.functional.linear(x, weight, bias)
    in_features = x.shape[-1]
    leading_shape = x.shape[:-1]
    rows = x.reshape(-1, in_features)
    num_rows = rows.shape[0]
    padding = (-num_rows) % ROW_TILE
    if padding:
        rows = torch.cat([rows, rows.new_zeros(padding, in_features)])
    tiles = rows.view(-1, ROW_TILE, in_features)
    out = torch.matmul(tiles, weight.t()).reshape(-1, weight.shape[0])[:num_rows]
    if bias is not None:
        out = out + bias
    return out.reshape(*leading_shape, weight.shape[0])


class Linear(nn.Module):
    """A linear layer (``weight [out, in]``, optional ``bias [out]``) computed by ``batch_invariant_linear``.

    Tensor parallelism will come here: a column-parallel variant keeps ``out_features / tp_size`` rows of
    ``weight`` (and of ``bias``) per rank and its output stays sharded; a row-parallel variant keeps
    ``in_features / tp_size`` columns and all-reduces its output (bias added once, after the reduction).
    Those variants only change which slice of the official tensor ``load_weights`` copies in and what
    ``forward`` does after the matmul, so models can switch per projection without changing their code.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # Uninitialised on purpose: every parameter is overwritten by the checkpoint (the loader checks).
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_invariant_linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


class MergedLinear(Linear):
    """Several projections of one input held as one ``[sum(out), in]`` weight: one GEMM instead of several.

    ``shards`` lists ``(name, out_features)`` in row order (e.g. q, k, v or gate, up); ``forward`` returns
    one output per shard, as views of the single result (no copies). The shard names are the projections'
    own names, siblings of this module: ``unmerged_parameters`` shows the weights under them so checkpoints
    that store the projections separately load into their slices (vLLM's QKV / merged column linears).
    """

    def __init__(
        self,
        in_features: int,
        shards: Sequence[tuple[str, int]],
        bias: bool = False,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.shard_names = tuple(name for name, _ in shards)
        self.shard_sizes = tuple(int(size) for _, size in shards)
        super().__init__(in_features, sum(self.shard_sizes), bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return batch_invariant_linear(x, self.weight, self.bias).split(self.shard_sizes, dim=-1)

    def extra_repr(self) -> str:
        shards = ", ".join(f"{name}={size}" for name, size in zip(self.shard_names, self.shard_sizes))
        return f"in_features={self.in_features}, shards=({shards}), bias={self.bias is not None}"


def unmerged_parameters(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``module.named_parameters()`` with each ``MergedLinear`` parameter replaced by its shards' row views.

    ``layers.0.qkv_proj.weight`` of shards q_proj/k_proj/v_proj appears as ``layers.0.q_proj.weight`` etc.:
    writing into a view writes that shard's rows of the merged parameter.
    """
    merged = {name: layer for name, layer in module.named_modules() if isinstance(layer, MergedLinear)}
    for name, param in module.named_parameters():
        owner, _, leaf = name.rpartition(".")
        layer = merged.get(owner)
        if layer is None:
            yield name, param
            continue
        parent = owner.rpartition(".")[0]
        prefix = f"{parent}." if parent else ""
        for shard, view in zip(layer.shard_names, param.split(layer.shard_sizes), strict=True):
            yield f"{prefix}{shard}.{leaf}", view


class UnmergedView:
    """What the weight loader sees of a model with merged projections: its parameters under the unmerged
    names (``unmerged_parameters``) and the model's ``official_name`` map for error messages."""

    def __init__(self, module: nn.Module, official_name: Callable[[str], str] | None = None):
        self._params = list(unmerged_parameters(module))
        if official_name is not None:
            self.official_name = official_name

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._params)
