"""Load a checkpoint folder as published on the Hub: ``config.json`` + safetensors (+ tokenizer files).

No remote code runs: the config picks one of our model classes through the registry, the weights stream
from ``model.safetensors`` or the shards named by ``model.safetensors.index.json`` into that class's
parameters by their official names, and the tokenizer loads from the folder only.

A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, as the D2F checkpoints
are published) loads too: its base checkpoint loads as above, and each adapted official tensor ``W`` is
streamed as ``W + scaling * B @ A`` (PEFT's ``get_delta_weight``: ``scaling = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with ``use_rslora``; ``fan_in_fan_out`` transposes ``B @ A``). The merge happens
on official names, before the model's own name map, so a delta of ``q_proj`` lands in the q rows of a
merged ``qkv_proj`` exactly as the base ``q_proj`` tensor does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from diffulex.models.registry import ModelSpec, WeightLoadError, resolve_model_class

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the base model's own module tree


def load_hf_config(path: str | Path) -> dict[str, Any]:
    """The folder's ``config.json`` as a dict; ``generation_config.json``, when present, rides along under
    the key ``"generation_config"`` (its ``eos_token_id`` list is where chat models keep their stop ids)."""
    folder = Path(path)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"no config.json in {folder} (expected a Hugging Face checkpoint folder)")
    config = json.loads(config_file.read_text())
    generation_file = folder / "generation_config.json"
    if generation_file.is_file() and "generation_config" not in config:
        config["generation_config"] = json.loads(generation_file.read_text())
    return config


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the shards of the index, else ``model.safetensors``."""
    folder = Path(path)
    index_file = folder / SHARD_INDEX
    if index_file.is_file():
        weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [str(file.name) for file in files if not file.is_file()]
        if absent:
            raise FileNotFoundError(
                f"{index_file} names shards that are not in {folder}: {', '.join(absent)}"
            )
        return files
    single = folder / SINGLE_FILE
    if single.is_file():
        return [single]
    raise FileNotFoundError(f"no {SINGLE_FILE} or {SHARD_INDEX} in {folder}")


def iter_checkpoint_tensors(path: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(official name, tensor)`` of every tensor of the checkpoint, one at a time (CPU, stored dtype)."""
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as shard:
            for name in shard.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, shard.get_tensor(name)


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(
    path: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    *,
    base_model: str | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Build the model a checkpoint folder describes, in ``dtype`` on ``device``, with its weights loaded.

    ``path`` may also be a PEFT LoRA adapter folder: the base checkpoint is ``base_model`` when given, else
    the adapter config's ``base_model_name_or_path`` when that is a local folder; the adapter is merged
    into the base weights as they load (see the module docstring).

    Raises ``ValueError`` for an unknown ``model_type`` (naming the supported families), for an adapter
    without a reachable base or with targets the base does not have (naming them), and
    ``WeightLoadError`` naming every missing, unexpected or wrongly shaped tensor.
    """
    adapter: LoraAdapter | None = None
    if is_adapter_folder(path):
        adapter = LoraAdapter.load(path)
        base_path = resolve_base_model(path, adapter.config, base_model)
    elif base_model is not None:
        raise ValueError(
            f"base_model={base_model!r} was given but {path} is not a LoRA adapter folder "
            f"(no {ADAPTER_CONFIG}); pass the adapter folder as the model, or drop base_model"
        )
    else:
        base_path = Path(path)
    config = load_hf_config(base_path)
    model_class = resolve_model_class(config)
    if adapter is not None:
        # Checked before anything is built or read: the shard headers alone name the base tensors.
        adapter.check_targets(checkpoint_tensor_names(base_path), str(path))
    # Parameters are created directly in the target dtype and device: no float32 copy of an 8B model.
    with _default_dtype(dtype), torch.device(device):
        model = model_class(config)
    if model.tie_word_embeddings:
        model.tie_weights()
    tensors = iter_checkpoint_tensors(base_path)
    if adapter is not None:
        tensors = adapter.merged(tensors)
    try:
        model.load_weights(tensors)
    except WeightLoadError as error:
        source = str(base_path) if adapter is None else f"{base_path} + adapter {path}"
        raise WeightLoadError(error.missing, error.unexpected, error.wrong_shapes, source) from None
    model.eval()
    model.requires_grad_(False)
    return model, model.spec


# ---- PEFT LoRA adapters ----


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder (it has ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def checkpoint_tensor_names(path: str | Path) -> set[str]:
    """Official names of every tensor of a checkpoint, read from the safetensors headers only."""
    names: set[str] = set()
    for file in checkpoint_files(path):
        with safe_open(str(file), framework="pt", device="cpu") as shard:
            names.update(shard.keys())
    return names


def resolve_base_model(
    adapter_path: str | Path, adapter_config: dict[str, Any], base_model: str | None
) -> Path:
    """The base checkpoint folder of an adapter: ``base_model`` when given, else the adapter config's
    ``base_model_name_or_path`` when it is a local folder; a ``ValueError`` saying what to pass otherwise."""
    if base_model is not None:
        base = Path(base_model)
        if not base.is_dir():
            raise FileNotFoundError(
                f"base_model {base_model!r} (for the adapter at {adapter_path}) is not a folder"
            )
        return base
    named = adapter_config.get("base_model_name_or_path")
    if isinstance(named, str) and named and Path(named).is_dir():
        return Path(named)
    raise ValueError(
        f"adapter at {adapter_path} needs its base checkpoint: pass base_model=... "
        f"(the config names {named!r}, which is not a local folder)"
    )


class LoraAdapter:
    """A PEFT LoRA adapter: per adapted official tensor name, its ``(A [r, in], B [out, r])`` pair, plus
    the tensors the adapter replaces whole (biases trained with ``bias="all"``/``"lora_only"``)."""

    def __init__(
        self,
        config: dict[str, Any],
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor]],
        replaced: dict[str, torch.Tensor],
    ):
        self.config = config
        self.pairs = pairs
        self.replaced = replaced
        r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
        if r <= 0:
            raise ValueError(f"adapter config has r={r}; it must be positive")
        # PEFT's LoraLayer.update_layer: rank-stabilised LoRA divides by sqrt(r) instead of r.
        self.scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        self.fan_in_fan_out = bool(config.get("fan_in_fan_out", False))

    @classmethod
    def load(cls, path: str | Path) -> LoraAdapter:
        """Read ``adapter_config.json`` and ``adapter_model.safetensors``; refuse what would not merge right."""
        folder = Path(path)
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        peft_type = str(config.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise NotImplementedError(f"adapter at {folder} is a {peft_type} adapter; only LoRA merges")
        unsupported = [
            key for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if config.get(key)
        ]
        if unsupported:
            raise NotImplementedError(
                f"adapter at {folder} uses {', '.join(unsupported)}, which this loader does not merge"
            )
        weights = folder / ADAPTER_WEIGHTS
        if not weights.is_file():
            raise FileNotFoundError(
                f"no {ADAPTER_WEIGHTS} in {folder} (pickled adapter_model.bin files are not loaded)"
            )
        halves: dict[str, dict[str, torch.Tensor]] = {}
        replaced: dict[str, torch.Tensor] = {}
        unknown: list[str] = []
        with safe_open(str(weights), framework="pt", device="cpu") as tensors:
            for key in tensors.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = key.removeprefix(PEFT_PREFIX)
                for half in ("lora_A", "lora_B"):
                    suffix = f".{half}.weight"
                    if name.endswith(suffix):
                        module = name.removesuffix(suffix)
                        halves.setdefault(module, {})[half] = tensors.get_tensor(key)
                        break
                else:
                    if name.endswith(".bias") and "lora_" not in name:
                        replaced[name] = tensors.get_tensor(key)
                    else:
                        unknown.append(key)
        if unknown:
            raise ValueError(
                f"adapter at {folder} has tensors that are not LoRA A/B weights: {', '.join(sorted(unknown))}"
            )
        incomplete = sorted(module for module, pair in halves.items() if len(pair) != 2)
        if incomplete:
            raise ValueError(f"adapter at {folder} lacks lora_A or lora_B for: {', '.join(incomplete)}")
        pairs = {f"{module}.weight": (pair["lora_A"], pair["lora_B"]) for module, pair in halves.items()}
        adapter = cls(config, pairs, replaced)
        adapter._check_ranks(str(folder))
        return adapter

    def _check_ranks(self, source: str) -> None:
        r = int(self.config.get("r", 8))
        bad = [
            f"{name} (A {list(a.shape)}, B {list(b.shape)})"
            for name, (a, b) in self.pairs.items()
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r
        ]
        if bad:
            raise ValueError(f"adapter at {source}: LoRA pairs that are not of rank r={r}: {', '.join(bad)}")

    def check_targets(self, base_names: set[str], source: str) -> None:
        """Every adapted or replaced tensor must be a tensor of the base checkpoint."""
        unknown = sorted(name for name in [*self.pairs, *self.replaced] if name not in base_names)
        if unknown:
            raise ValueError(
                f"adapter at {source} targets tensors the base checkpoint does not have: {', '.join(unknown)}"
            )

    def delta(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` (transposed with ``fan_in_fan_out``) for official tensor ``name``, float32."""
        lora_a, lora_b = self.pairs[name]
        product = lora_b.float() @ lora_a.float()
        if self.fan_in_fan_out:
            product = product.T
        return product * self.scaling

    def merged(self, tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The base tensors with the adapter applied: adapted ones as ``W + delta`` in float32 (the loader
        casts to the parameter dtype: one rounding), replaced ones as the adapter's tensor."""
        for name, tensor in tensors:
            if name in self.pairs:
                delta = self.delta(name)
                if delta.shape != tensor.shape:
                    raise ValueError(
                        f"LoRA delta for {name} is {list(delta.shape)}, the base tensor is {list(tensor.shape)}"
                        + (" (check fan_in_fan_out)" if delta.T.shape == tensor.shape else "")
                    )
                tensor = tensor.float() + delta
            elif name in self.replaced:
                tensor = self.replaced[name]
            yield name, tensor


def load_tokenizer(path: str | Path, *, base_model: str | None = None):
    """A ``transformers`` tokenizer from the folder alone (never the network, never remote code), or None
    when the folder has no tokenizer files. An adapter folder without tokenizer files uses its base's
    (``base_model``, else the adapter config's ``base_model_name_or_path`` when that is a local folder)."""
    folder = Path(path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        if not is_adapter_folder(folder):
            return None
        base = base_model or json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
        if not isinstance(base, str) or not base or not Path(base).is_dir():
            return None
        return load_tokenizer(base)
    from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerFast

    try:
        # An empty config stops transformers from interpreting our config.json (model types it does not
        # know): the class comes from tokenizer_config.json's `tokenizer_class`.
        return AutoTokenizer.from_pretrained(
            str(folder), config=PretrainedConfig(), local_files_only=True, trust_remote_code=False
        )
    except (ValueError, OSError, KeyError):
        # A tokenizer_config naming a class that only exists as remote code: tokenizer.json is enough.
        if (folder / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(str(folder), local_files_only=True)
        raise
