"""Tiny random checkpoints in the official layout of each family, for tests and CPU demos.

A checkpoint folder written here looks like the published one (``config.json`` with the official field
names, safetensors with the official tensor names, optionally sharded with an index, a
``generation_config.json`` and a tokenizer), only small: the real loading path is what runs on it. The
tokenizer is character-level (printable ASCII, tab, newline) plus the family's special tokens, padded with
ordinary two-letter pieces up to the model's vocabulary so that every id the model can emit decodes.
Weights are random but not flat: embeddings, norms and head are scaled so that logits are peaky and
confidences differ between positions, which is what decoding strategies need to be exercised.
The per-family config fields and tensor names/shapes are in ``diffulex.models.tiny_layouts``; this module
writes them (and the tokenizer, whose special tokens and chat templates live here).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from diffulex.models.tiny_layouts import CONFIGS, TENSOR_SHAPES, generation_config

FAMILIES = ("llada", "sdar", "dream", "sdar_moe", "llada2_moe", "fast_dllm_v2")
CHARACTERS = ["\t", "\n", *[chr(code) for code in range(32, 127)]]  # ids 0..96

# Special tokens after the characters, as in the official tokenizers (names as there); the first is unk.
_SPECIAL_TOKENS = {
    "llada": [
        "<|unk|>",
        "<|startoftext|>",
        "<|endoftext|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|mdm_mask|>",
    ],
    "sdar": ["<|unk|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|MASK|>"],
    "dream": ["<|unk|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|mask|>"],
}
_CHAT_TEMPLATES = {
    "llada": (
        "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>"
        "\n\n{{ message['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    ),
    "sdar": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
}
_CHAT_TEMPLATES["dream"] = _CHAT_TEMPLATES["sdar"]  # both use Qwen's <|im_start|>/<|im_end|> turns
# SDAR-MoE ships SDAR's (Qwen3) tokenizer.
_SPECIAL_TOKENS["sdar_moe"] = _SPECIAL_TOKENS["sdar"]
_CHAT_TEMPLATES["sdar_moe"] = _CHAT_TEMPLATES["sdar"]
# Fast-dLLM v2 ships Qwen2.5-Instruct's tokenizer with a mask token added (id 151665 there).
_SPECIAL_TOKENS["fast_dllm_v2"] = _SPECIAL_TOKENS["dream"]
_CHAT_TEMPLATES["fast_dllm_v2"] = _CHAT_TEMPLATES["sdar"]
# LLaDA2.0 ships Ling's tokenizer: <|endoftext|> ends text, turns are <role>NAME</role>...<|role_end|>.
_SPECIAL_TOKENS["llada2_moe"] = ["<|unk|>", "<|endoftext|>", "<role>", "</role>", "<|role_end|>", "<|mask|>"]
_CHAT_TEMPLATES["llada2_moe"] = (
    "{% for message in messages %}<role>{{ message['role'] | upper }}</role>{{ message['content'] }}"
    "<|role_end|>{% endfor %}{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
)


def special_token_ids(family: str) -> dict[str, int]:
    """Special token -> id in the tiny tokenizer of ``family`` (same ids whether or not it is written)."""
    return {
        token: len(CHARACTERS) + index for index, token in enumerate(_SPECIAL_TOKENS[_check_family(family)])
    }


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"no tiny checkpoint for family {family!r}; families: {', '.join(FAMILIES)}")
    return family


def _random_tensor(name: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    if "norm" in name or name.endswith("ln_f.weight"):
        return 1.0 + 0.1 * noise  # near 1, yet different per channel so a skipped norm weight shows
    if name.endswith(".bias"):
        return 0.05 * noise
    if name in ("model.transformer.wte.weight", "model.embed_tokens.weight", "model.word_embeddings.weight"):
        return noise  # unit-scale embeddings: the input tokens matter against the layers' updates
    if name in ("model.transformer.ff_out.weight", "lm_head.weight"):
        return 0.5 * noise  # logits of std ~0.5 sqrt(hidden): peaky, top-1 probabilities spread over (0, 1)
    return noise / shape[-1] ** 0.5  # projections: unit-variance outputs for unit-variance inputs


def _write_safetensors(tensors: dict[str, torch.Tensor], out_dir: Path, shards: int) -> None:
    if shards <= 1:
        save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    names = list(tensors)
    per_shard = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for shard in range(shards):
        file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        chunk = {name: tensors[name] for name in names[shard * per_shard : (shard + 1) * per_shard]}
        save_file(chunk, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(chunk, file_name)
    total_size = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_tokenizer(family: str, vocab_size: int, ids: dict[str, int], out_dir: Path) -> None:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    specials = list(ids)
    # The rest of the vocabulary: ordinary two-letter pieces (never produced by encoding, which splits
    # per character, but decodable), so random or tiny models emit visible text rather than specials.
    letters = "abcdefghijklmnopqrstuvwxyz"
    pairs = [a + b for a in letters for b in letters]
    reserved = pairs[: vocab_size - len(CHARACTERS) - len(specials)]
    vocab = {token: index for index, token in enumerate([*CHARACTERS, *specials, *reserved])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one char each
    tokenizer.decoder = decoders.Fuse()  # join characters back without separators
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    tokenizer.save(str(out_dir / "tokenizer.json"))
    # Written by hand rather than by save_pretrained, whose output depends on the transformers version
    # (v5 names its own backend class and moves the template out): this one loads with 4.45 and later.
    named = {
        "llada": {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        "sdar": {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        "dream": {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        "sdar_moe": {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        "llada2_moe": {"bos_token": None, "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
        "fast_dllm_v2": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    }[family]
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "unk_token": "<|unk|>",
        "mask_token": {
            "llada": "<|mdm_mask|>",
            "sdar": "<|MASK|>",
            "dream": "<|mask|>",
            "sdar_moe": "<|MASK|>",
            "llada2_moe": "<|mask|>",
            "fast_dllm_v2": "<|mask|>",
        }[family],
        "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False,
        "chat_template": _CHAT_TEMPLATES[family],
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def write_tiny_checkpoint(
    family: str,
    out_dir: str | Path,
    *,
    seed: int = 0,
    with_tokenizer: bool = True,
    shards: int = 1,
    **config_overrides: Any,
) -> Path:
    """Write a tiny random ``family`` checkpoint into ``out_dir`` (created) and return its path.

    ``config_overrides`` replace fields of the config by their official names (e.g. ``n_kv_heads=2``,
    ``weight_tying=True``, ``num_hidden_layers=3``); ``shards > 1`` writes
    ``model-0000k-of-0000N.safetensors`` files and ``model.safetensors.index.json``.
    """
    ids = special_token_ids(family)
    config = CONFIGS[family](ids) | config_overrides
    vocab_key = "embedding_size" if family == "llada" and config.get("embedding_size") else "vocab_size"
    needed = len(CHARACTERS) + len(ids)
    if config[vocab_key] < needed:
        raise ValueError(f"{vocab_key}={config[vocab_key]} is below the tiny tokenizer's {needed} tokens")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(generation_config(family, ids), indent=2) + "\n")

    shapes = TENSOR_SHAPES[family](config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: _random_tensor(name, shape, generator) for name, shape in shapes.items()}
    _write_safetensors(tensors, out, shards)
    if with_tokenizer:
        write_tokenizer(family, config[vocab_key], ids, out)
    return out


def write_tiny_lora_adapter(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    r: int = 4,
    alpha: float = 8,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    use_rslora: bool = False,
    base_model_name_or_path: str | None = None,
) -> Path:
    """Write a PEFT LoRA adapter for the checkpoint at ``base_dir`` into ``out_dir`` (created); return it.

    The layout is PEFT's ``save_pretrained``: ``adapter_config.json`` and ``adapter_model.safetensors`` with
    ``base_model.model.<module>.lora_A.weight [r, in]`` / ``.lora_B.weight [out, r]`` for every 2-D weight
    of a module whose name is a target or ends with ``.<target>`` (PEFT's suffix match). A and B are both
    random (PEFT initialises B to zero; a trained adapter's is not, and a zero B would hide a wrong merge).
    ``base_model_name_or_path`` defaults to ``base_dir``.
    """
    from diffulex.models.loader import iter_checkpoint_tensors

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, weight in iter_checkpoint_tensors(base_dir):
        module = name.removesuffix(".weight")
        if module == name or weight.dim() != 2:
            continue
        if not any(module == target or module.endswith(f".{target}") for target in targets):
            continue
        out_features, in_features = weight.shape
        lora_a = torch.randn(r, in_features, generator=generator) / in_features**0.5
        lora_b = torch.randn(out_features, r, generator=generator) * (0.5 / r**0.5)
        tensors[f"base_model.model.{module}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{module}.lora_B.weight"] = lora_b
    if not tensors:
        raise ValueError(f"no module of {base_dir} matches the targets {list(targets)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": str(base_dir)
        if base_model_name_or_path is None
        else base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": 0.05,
        "target_modules": list(targets),
        "fan_in_fan_out": False,
        "bias": "none",
        "use_rslora": use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


__all__ = ["CHARACTERS", "FAMILIES", "special_token_ids", "write_tiny_checkpoint", "write_tiny_lora_adapter"]
