"""Which model class serves a checkpoint, what the engine needs to know about it, and the weight contract.

Every family module registers its LM class under the HF config's ``model_type`` and ``architectures``
names. ``resolve_model_class`` picks the class from a checkpoint's ``config.json``; the class builds a
``ModelSpec`` (the engine-facing facts: sizes, special ids, attention kind, default decoding) from that
same dict, so nothing outside ``diffulex/models`` reads HF config fields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

NativeAttention = Literal["bidirectional", "block_causal"]
VanillaSchedule = Literal["llada", "dream"]


@dataclass(frozen=True)
class ModelSpec:
    """What the engine, strategies and samplers need to know about a loaded model (no tensors).

    ``vocab_size`` is the width of the logits (LLaDA's ``embedding_size``), which may exceed the
    tokenizer's size. ``eos_token_ids`` starts with the config's ``eos_token_id``; the rest are the other
    end-of-turn ids the family stops on (generation config, chat end-of-turn token). ``shift_logits``:
    position i is predicted from hidden state i-1 (Dream family). ``native_attention`` is the mask the
    model was trained with; ``default_strategy``/``default_block_size``/``vanilla_schedule`` are what a
    request gets when it names none.
    """

    family: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    mask_token_id: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    shift_logits: bool
    native_attention: NativeAttention
    default_strategy: str
    default_block_size: int
    vanilla_schedule: VanillaSchedule

    @property
    def eos_token_id(self) -> int:
        """The config's primary end-of-sequence id."""
        return self.eos_token_ids[0]


# Lower-cased HF name (model_type or architecture) -> LM class; family name -> the names it answers to.
_MODEL_CLASSES: dict[str, type[nn.Module]] = {}
_FAMILY_NAMES: dict[str, list[str]] = {}


def register_model(*names: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: serve checkpoints whose ``model_type`` or ``architectures`` is one of ``names``.

    The class must define ``family: str`` and the classmethod ``spec_from_config(cfg) -> ModelSpec``.
    """
    if not names:
        raise ValueError("register_model needs at least one model_type or architecture name")

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        family = getattr(cls, "family", None)
        if not isinstance(family, str) or not hasattr(cls, "spec_from_config"):
            raise TypeError(f"{cls.__name__} must define `family: str` and `spec_from_config(cfg)`")
        for name in names:
            key = name.lower()  # Dream writes model_type "Dream": match names case-insensitively
            registered = _MODEL_CLASSES.get(key)
            if registered is not None and registered is not cls:
                raise ValueError(f"model name {name!r} is already registered to {registered.__name__}")
            _MODEL_CLASSES[key] = cls
            family_names = _FAMILY_NAMES.setdefault(family, [])
            if name not in family_names:
                family_names.append(name)
        return cls

    return decorate


def supported_families() -> dict[str, list[str]]:
    """Family name -> the ``model_type``/``architectures`` names registered for it."""
    return {family: list(names) for family, names in sorted(_FAMILY_NAMES.items())}


def resolve_model_class(hf_config: dict[str, Any]) -> type[nn.Module]:
    """The LM class for a checkpoint's ``config.json`` dict: by ``model_type`` first, then ``architectures``."""
    model_type = hf_config.get("model_type")
    architectures = list(hf_config.get("architectures") or [])
    for name in [model_type, *architectures]:
        if isinstance(name, str) and name.lower() in _MODEL_CLASSES:
            return _MODEL_CLASSES[name.lower()]
    families = "; ".join(f"{family} ({', '.join(names)})" for family, names in supported_families().items())
    raise ValueError(
        f"unknown model_type {model_type!r} (architectures {architectures}): no Diffulex model serves it. "
        f"Supported families (model_type / architectures): {families or 'none registered'}"
    )


# ---- helpers the family modules share ----


def token_ids(value: Any) -> tuple[int, ...]:
    """An HF token-id field (int, list of ints or None) as a tuple."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def merge_token_ids(*groups: Iterable[int]) -> tuple[int, ...]:
    """Concatenate id groups, keeping the first occurrence of each id (order matters: primary first)."""
    merged: list[int] = []
    for group in groups:
        for token_id in group:
            if token_id not in merged:
                merged.append(token_id)
    return tuple(merged)


class WeightLoadError(ValueError):
    """A checkpoint does not fit the model: names every missing, unexpected and wrongly shaped tensor."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        wrong_shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        source: str | None = None,
    ):
        self.missing = missing
        self.unexpected = unexpected
        self.wrong_shapes = wrong_shapes
        where = f" of {source}" if source else ""
        lines = [f"checkpoint tensors{where} do not match the model:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
        for name, found, expected in wrong_shapes:
            lines.append(
                f"  wrong shape: {name} is {list(found)} in the checkpoint, the model expects {list(expected)}"
            )
        super().__init__("\n".join(lines))


def load_mapped_weights(
    module: nn.Module,
    named_tensors: Iterable[tuple[str, torch.Tensor]],
    to_local_name: Callable[[str], str | None],
    ignored: Callable[[str], bool] = lambda name: False,
) -> None:
    """Copy official tensors into ``module``'s parameters; raise ``WeightLoadError`` on any mismatch.

    ``to_local_name`` maps an official name to a parameter name of ``module`` (None = not a name of this
    architecture). ``ignored`` names are skipped silently (e.g. an LM head saved beside tied embeddings).
    Each tensor is cast to its parameter's dtype and device as it is copied, so shards can be streamed.
    A module with ``load_slice(local_name, tensor)`` (``UnmergedView``) narrows each tensor to the part this
    tensor-parallel rank holds before the shape check.
    Every problem is collected before raising, so one error lists them all; errors report official names.
    """
    params = dict(module.named_parameters())  # tied parameters appear once, under their first name
    load_slice = getattr(module, "load_slice", None)
    seen: set[str] = set()  # local names the checkpoint provided (loaded or wrongly shaped)
    unexpected: list[str] = []
    wrong_shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for name, tensor in named_tensors:
        if ignored(name):
            continue
        local = to_local_name(name)
        param = params.get(local) if local is not None else None
        if param is None:
            unexpected.append(name)
            continue
        seen.add(local)
        if load_slice is not None:
            tensor = load_slice(local, tensor)
        if tuple(tensor.shape) != tuple(param.shape):
            wrong_shapes.append((name, tuple(tensor.shape), tuple(param.shape)))
            continue
        with torch.no_grad():
            param.copy_(tensor.to(dtype=param.dtype))
    missing = [local for local in params if local not in seen]
    if missing or unexpected or wrong_shapes:
        raise WeightLoadError(sorted(_official_names(module, missing)), sorted(unexpected), wrong_shapes)


def _official_names(module: nn.Module, local_names: list[str]) -> list[str]:
    """Official names of missing parameters, when the model can say them (else its own names)."""
    to_official = getattr(module, "official_name", None)
    return [to_official(name) if to_official is not None else name for name in local_names]
