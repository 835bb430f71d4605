"""Linear projections whose per-row result does not depend on the batch they are computed in.

A plain 2-D ``x @ weight.T`` on CPU picks its blocking from the number of rows, so the same token can get
different bits depending on how many other tokens share the step; greedy decoding would then differ
between a request run alone and the same request in a batch. Splitting the rows into fixed tiles of
``ROW_TILE`` and issuing one 3-D matmul makes every tile go through the same kernel path, whatever the
number of tiles: each row's result is then a function of that row alone.

Tensor parallelism (``diffulex.layers.parallel_state``): ``ColumnParallelLinear`` and ``MergedLinear`` keep
a slice of the output rows per rank (their output stays sharded), ``RowParallelLinear`` a slice of the input
columns (its partial outputs are all-reduced). Each layer decides which slice of an official tensor it
loads (``load_slice``, called by the weight loader through ``UnmergedView``), so a model keeps one name map
whatever the number of ranks. At one rank every slice is the whole tensor and the math is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from diffulex.layers.parallel_state import HeadSplit, all_reduce, divide, get_parallel_state

ROW_TILE = 16  # rows per tile of the 3-D matmul; the padding overhead is at most ROW_TILE - 1 rows
# At most this many rows (one 32-token denoise block) take the Triton skinny GEMMs on the GPU
# (diffulex.kernels.skinny_gemm*): they stream the weight faster than cuBLAS at these sizes
# (docs/perf-notes.md, 2026-11-24); more rows go to cuBLAS.
SKINNY_ROWS = 32
# Larger weights (an LM head: 126,464 x 4,096) stream as fast through cuBLAS (252 vs 255 us, H200).
SKINNY_MAX_WEIGHT_ROWS = 32768
_skinny_enabled = True


def set_skinny_gemms(enabled: bool) -> None:
    """Switch the GPU's skinny-GEMM path on (the default) or off (cuBLAS and separate elementwise
    kernels everywhere: the A/B switch of the benchmarks). Takes effect for GEMMs issued afterwards
    (a captured CUDA graph keeps the kernels it was captured with)."""
    global _skinny_enabled
    _skinny_enabled = bool(enabled)


def skinny_gemms_enabled() -> bool:
    """Whether the skinny-GEMM path is switched on (``set_skinny_gemms``)."""
    return _skinny_enabled


def skinny_eligible(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether ``x @ weight.T`` takes the Triton skinny GEMMs: a CUDA bf16/fp16 ``[rows, in]`` input of at
    most ``SKINNY_ROWS`` rows, a contiguous weight of the same dtype, at most ``SKINNY_MAX_WEIGHT_ROWS``
    rows and 16-byte aligned rows (the kernels load it through a tensor descriptor), no bias, the path
    switched on."""
    if not (
        _skinny_enabled
        and bias is None
        and x.is_cuda
        and x.dim() == 2
        and 0 < x.shape[0] <= SKINNY_ROWS
        and x.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == x.dtype
        and x.stride(-1) == 1
        and weight.is_contiguous()
        and weight.shape[0] <= SKINNY_MAX_WEIGHT_ROWS
    ):
        return False
    from diffulex.kernels.skinny_gemm import descriptor_compatible  # only reached on the GPU

    return descriptor_compatible(weight)


def batch_invariant_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T (+ bias)`` for ``x [..., in]``, ``weight [out, in]``, batch-invariant per row.

    The rows are padded with zeros up to a multiple of ``ROW_TILE`` and multiplied as one
    ``[num_tiles, ROW_TILE, in] @ [in, out]`` matmul; the padding rows are dropped from the result.
    """
    if x.is_cuda:
        # On the GPU one plain GEMM reads each weight once (the step is bound by weight reads); batch
        # invariance is not claimed there yet.
        if skinny_eligible(x, weight, bias):
            from diffulex.kernels.skinny_gemm import skinny_gemm_triton

            return skinny_gemm_triton(x, weight)
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
    """A replicated linear layer (``weight [out, in]``, optional ``bias [out]``) computed by
    ``batch_invariant_linear``; every rank holds all of it.

    The tensor-parallel variants below only change which slice of the official tensor the loader copies
    in (``load_slice``) and what ``forward`` does after the matmul, so models switch per projection
    without changing their code.
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

    def load_slice(self, leaf: str, tensor: torch.Tensor, shard: int | None = None) -> torch.Tensor:
        """This rank's part of the official tensor for parameter ``leaf`` (``weight``/``bias``): all of it."""
        return tensor

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )


def _rows(tensor: torch.Tensor, full_rows: int, segments: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Rows ``[start, start + size)`` of each segment, concatenated; a tensor that does not have
    ``full_rows`` rows comes back whole, so the loader reports its shape against the parameter's."""
    if tensor.shape[0] != full_rows or (len(segments) == 1 and segments[0] == (0, full_rows)):
        return tensor
    return torch.cat([tensor.narrow(0, start, size) for start, size in segments])


class ColumnParallelLinear(Linear):
    """Output rows split over the tensor-parallel ranks; the output stays sharded (no communication).

    ``segments`` lists the ``(start, size)`` row ranges of the official ``[out_features, in]`` tensor this
    rank keeps, in order (a fused q/k/v tensor keeps one range of each of q, k and v); by default the
    rows are split evenly. ``bias`` rows follow the weight's.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        segments: Sequence[tuple[int, int]] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        if segments is None:
            state = get_parallel_state()
            local = divide(out_features, state.tp_size, "output features")
            segments = [(state.tp_rank * local, local)]
        self.full_out_features = out_features
        self.segments = tuple((int(start), int(size)) for start, size in segments)
        super().__init__(
            in_features, sum(size for _, size in self.segments), bias, device=device, dtype=dtype
        )

    def load_slice(self, leaf: str, tensor: torch.Tensor, shard: int | None = None) -> torch.Tensor:
        return _rows(tensor, self.full_out_features, self.segments)


class RowParallelLinear(Linear):
    """Input columns split over the tensor-parallel ranks: each rank multiplies its slice of the input
    (the sharded output of a column-parallel layer) and the partial outputs are summed by one all-reduce,
    after which the bias is added once. ``reduce=False`` leaves the sum to the caller (MoE experts: one
    all-reduce for the whole block)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        *,
        reduce: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        state = self.parallel = get_parallel_state()
        self.tp_size = state.tp_size
        local = divide(in_features, state.tp_size, "input features")
        self.full_in_features = in_features
        self.in_start = state.tp_rank * local
        self.reduce = reduce
        if bias and not reduce and state.tp_size > 1:
            raise ValueError("a row-parallel layer whose output is not reduced cannot add its bias")
        super().__init__(local, out_features, bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return batch_invariant_linear(x, self.weight, self.bias)
        out = batch_invariant_linear(x, self.weight)
        if self.reduce:
            all_reduce(out, self.parallel)
        return out + self.bias if self.bias is not None else out

    def load_slice(self, leaf: str, tensor: torch.Tensor, shard: int | None = None) -> torch.Tensor:
        if leaf != "weight" or tensor.dim() != 2 or tensor.shape[1] != self.full_in_features:
            return tensor  # the bias is whole on every rank
        if self.in_features == self.full_in_features:
            return tensor
        return tensor.narrow(1, self.in_start, self.in_features)


class MergedLinear(Linear):
    """Several projections of one input held as one ``[sum(out), in]`` weight: one GEMM instead of several.

    ``shards`` lists ``(name, out_features)`` in row order (e.g. q, k, v or gate, up); ``forward`` returns
    one output per shard, as views of the single result (no copies). The shard names are the projections'
    own names, siblings of this module: ``unmerged_parameters`` shows the weights under them so checkpoints
    that store the projections separately load into their slices (vLLM's QKV / merged column linears).

    Column-parallel: each rank keeps ``partitions[i] = (start, size)`` rows of shard ``i`` (default: an even
    split of every shard), so the merged weight holds this rank's part of each projection.
    """

    def __init__(
        self,
        in_features: int,
        shards: Sequence[tuple[str, int]],
        bias: bool = False,
        *,
        partitions: Sequence[tuple[int, int]] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.shard_names = tuple(name for name, _ in shards)
        self.full_shard_sizes = tuple(int(size) for _, size in shards)
        if partitions is None:
            state = get_parallel_state()
            partitions = []
            for name, size in zip(self.shard_names, self.full_shard_sizes):
                local = divide(size, state.tp_size, f"{name} output features")
                partitions.append((state.tp_rank * local, local))
        self.partitions = tuple((int(start), int(size)) for start, size in partitions)
        self.shard_sizes = tuple(size for _, size in self.partitions)
        super().__init__(in_features, sum(self.shard_sizes), bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        return batch_invariant_linear(x, self.weight, self.bias).split(self.shard_sizes, dim=-1)

    def load_slice(self, leaf: str, tensor: torch.Tensor, shard: int | None = None) -> torch.Tensor:
        if shard is None:
            return tensor
        return _rows(tensor, self.full_shard_sizes[shard], [self.partitions[shard]])

    def extra_repr(self) -> str:
        shards = ", ".join(f"{name}={size}" for name, size in zip(self.shard_names, self.shard_sizes))
        return f"in_features={self.in_features}, shards=({shards}), bias={self.bias is not None}"


def qkv_linear(
    hidden_size: int,
    split: HeadSplit,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    bias: bool,
    names: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj"),
) -> MergedLinear:
    """The merged q/k/v projection of the heads ``split`` gives this rank (official shards ``names``)."""
    kv_rows = (split.kv_start * head_dim, split.num_kv_heads * head_dim)
    return MergedLinear(
        hidden_size,
        [
            (names[0], num_heads * head_dim),
            (names[1], num_kv_heads * head_dim),
            (names[2], num_kv_heads * head_dim),
        ],
        bias,
        partitions=[(split.q_start * head_dim, split.num_heads * head_dim), kv_rows, kv_rows],
    )


def unmerged_parameters(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """``module.named_parameters()`` with each ``MergedLinear`` parameter replaced by its shards' row views.

    ``layers.0.qkv_proj.weight`` of shards q_proj/k_proj/v_proj appears as ``layers.0.q_proj.weight`` etc.:
    writing into a view writes that shard's rows of the merged parameter.
    """
    for name, tensor, _ in _loadable_parameters(module):
        yield name, tensor


def _loadable_parameters(
    module: nn.Module,
) -> Iterator[tuple[str, torch.Tensor, Callable[[torch.Tensor], torch.Tensor] | None]]:
    """``(name, tensor, slicer)``: the unmerged parameters and, for parallel layers, what slice of the
    official tensor each one loads (``load_slice`` of the layer that owns it)."""
    owners = dict(module.named_modules())
    for name, param in module.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        layer = owners.get(owner_name)
        if not isinstance(layer, MergedLinear):
            slicer = getattr(layer, "load_slice", None)
            yield name, param, (lambda t, f=slicer, leaf=leaf: f(leaf, t)) if slicer is not None else None
            continue
        parent = owner_name.rpartition(".")[0]
        prefix = f"{parent}." if parent else ""
        for index, (shard, view) in enumerate(
            zip(layer.shard_names, param.split(layer.shard_sizes), strict=True)
        ):
            yield (
                f"{prefix}{shard}.{leaf}",
                view,
                lambda t, f=layer.load_slice, leaf=leaf, index=index: f(leaf, t, index),
            )


class UnmergedView:
    """What the weight loader sees of a model with merged projections: its parameters under the unmerged
    names (``unmerged_parameters``), ``load_slice`` (this rank's part of an official tensor) and the
    model's ``official_name`` map for error messages."""

    def __init__(self, module: nn.Module, official_name: Callable[[str], str] | None = None):
        self._params: list[tuple[str, torch.Tensor]] = []
        self._slicers: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
        for name, tensor, slicer in _loadable_parameters(module):
            self._params.append((name, tensor))
            if slicer is not None:
                self._slicers[name] = slicer
        if official_name is not None:
            self.official_name = official_name

    def named_parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._params)

    def load_slice(self, local_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The part of official ``tensor`` that parameter ``local_name`` holds on this rank."""
        slicer = self._slicers.get(local_name)
        return tensor if slicer is None else slicer(tensor)
