"""Load a checkpoint folder as published on the Hub: ``config.json`` + safetensors (+ tokenizer files).

No remote code runs: the config picks one of our model classes through the registry, the weights stream
from ``model.safetensors`` or the shards named by ``model.safetensors.index.json`` into that class's
parameters by their official names, and the tokenizer loads from the folder only.
"""

from __future__ import annotations

import json
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
    path: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
) -> tuple[nn.Module, ModelSpec]:
    """Build the model a checkpoint folder describes, in ``dtype`` on ``device``, with its weights loaded.

    Raises ``ValueError`` for an unknown ``model_type`` (naming the supported families) and
    ``WeightLoadError`` naming every missing, unexpected or wrongly shaped tensor.
    """
    config = load_hf_config(path)
    model_class = resolve_model_class(config)
    # Parameters are created directly in the target dtype and device: no float32 copy of an 8B model.
    with _default_dtype(dtype), torch.device(device):
        model = model_class(config)
    if model.tie_word_embeddings:
        model.tie_weights()
    try:
        model.load_weights(iter_checkpoint_tensors(path))
    except WeightLoadError as error:
        raise WeightLoadError(error.missing, error.unexpected, error.wrong_shapes, str(path)) from None
    model.eval()
    model.requires_grad_(False)
    return model, model.spec


def load_tokenizer(path: str | Path):
    """A ``transformers`` tokenizer from the folder alone (never the network, never remote code), or None
    when the folder has no tokenizer files."""
    folder = Path(path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
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
