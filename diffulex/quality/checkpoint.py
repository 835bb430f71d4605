"""The format of the bundled trained tiny models: config, tokenizer, chat template and response layout.

The checkpoints are the families' official layouts, only small: LLaDA (``LLaDAModelLM``, bidirectional)
and SDAR (``SDARForCausalLM``, Qwen3 layout, block-causal, block size 4). Config fields, special tokens,
``generation_config.json`` and the character-level tokenizer with its chat template come from
``diffulex.models.tiny_layouts`` (config fields, ``generation_config.json``) and
``diffulex.models.tiny_checkpoint`` (the same builders as the random test checkpoints); this module only
sets the sizes and says how a question and its answer become token ids, for training and evaluation
alike:

* prompt = the checkpoint's chat template applied to one user turn, with the assistant header appended
  (``add_generation_prompt``), encoded without adding special tokens (what ``LLM.generate`` does with a
  string);
* response = the answer's characters, the family's end-of-turn token (LLaDA ``<|eot_id|>``, SDAR
  ``<|im_end|>``), then ``<|endoftext|>`` up to the generation length, as LLaDA's SFT pads responses with
  EOS so that the model learns to fill the rest of the region with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from diffulex.models.tiny_checkpoint import CHARACTERS, special_token_ids, write_tokenizer
from diffulex.models.tiny_layouts import generation_config, llada_config, sdar_config

FAMILIES = ("llada", "sdar")
END_OF_TURN = {"llada": "<|eot_id|>", "sdar": "<|im_end|>"}
END_OF_TEXT = "<|endoftext|>"  # eos and pad of both families
SDAR_BLOCK_SIZE = 4
MAX_CONTEXT = 512  # positions the models are declared for (they are trained on fewer than 160)
_QUESTION_SENTINEL = "\x00QUESTION\x00"


@dataclass(frozen=True)
class ModelSize:
    """Transformer sizes of a trained tiny model (heads x head_dim = hidden for both families)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int


SIZES: dict[str, ModelSize] = {
    # ~4.3M (LLaDA) / ~4.0M (SDAR, GQA) parameters: 8-9 MB in bf16 each.
    "default": ModelSize(hidden=256, layers=5, heads=4, kv_heads=4, mlp=768),
    "toy": ModelSize(hidden=32, layers=2, heads=2, kv_heads=2, mlp=64),  # CPU tests
}
_SDAR_KV_HEADS = {"default": 2, "toy": 1}  # SDAR keeps Qwen3's grouped-query attention


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"no trained tiny model for family {family!r}; families: {', '.join(FAMILIES)}")
    return family


def vocab_size(family: str) -> int:
    """Characters plus the family's special tokens: every id decodes to something meaningful."""
    return len(CHARACTERS) + len(special_token_ids(check_family(family)))


def model_config(family: str, size: str = "default") -> dict[str, Any]:
    """The ``config.json`` of a trained tiny ``family`` model of the named ``size``."""
    if size not in SIZES:
        raise ValueError(f"unknown model size {size!r}; sizes: {', '.join(SIZES)}")
    dims, ids, vocab = SIZES[size], special_token_ids(check_family(family)), vocab_size(family)
    if family == "llada":
        return llada_config(ids) | {
            "d_model": dims.hidden,
            "n_layers": dims.layers,
            "n_heads": dims.heads,
            "n_kv_heads": dims.kv_heads,
            "mlp_hidden_size": dims.mlp,
            "mlp_ratio": dims.mlp // dims.hidden,
            "embedding_size": vocab,
            "vocab_size": vocab,
            "max_sequence_length": MAX_CONTEXT,
            "torch_dtype": "bfloat16",
        }
    return sdar_config(ids) | {
        "hidden_size": dims.hidden,
        "num_hidden_layers": dims.layers,
        "num_attention_heads": dims.heads,
        "num_key_value_heads": _SDAR_KV_HEADS[size],
        "head_dim": dims.hidden // dims.heads,
        "intermediate_size": dims.mlp,
        "vocab_size": vocab,
        "block_size": SDAR_BLOCK_SIZE,
        "max_position_embeddings": MAX_CONTEXT,
        "torch_dtype": "bfloat16",
    }


def family_of(config: dict[str, Any]) -> str:
    """``llada`` or ``sdar`` from a config's ``model_type``."""
    return check_family(str(config.get("model_type")))


def write_tokenizer_files(family: str, out_dir: str | Path) -> Path:
    """``tokenizer.json`` + ``tokenizer_config.json`` (with the chat template) into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_tokenizer(family, vocab_size(family), special_token_ids(family), out)
    return out


def write_checkpoint(
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    out_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
    extra_files: dict[str, Any] | None = None,
) -> Path:
    """Write a loadable checkpoint folder: config, generation config, tokenizer, ``model.safetensors``.

    ``state_dict`` holds the official tensor names; tensors are saved contiguous on the CPU in ``dtype``.
    ``extra_files`` maps file names to JSON-serialisable data written beside them (training record).
    """
    family = family_of(config)
    out = write_tokenizer_files(family, out_dir)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = generation_config(family, special_token_ids(family))
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tensors = {name: t.detach().to("cpu", dtype).contiguous() for name, t in state_dict.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    for name, data in (extra_files or {}).items():
        (out / name).write_text(json.dumps(data, indent=2) + "\n")
    return out


def load_tokenizer(path: str | Path) -> Any:
    """The checkpoint's tokenizer, loaded exactly as the engine loads it (``AutoTokenizer``, local only)."""
    from diffulex.models.loader import load_tokenizer as load_engine_tokenizer

    tokenizer = load_engine_tokenizer(path)
    if tokenizer is None:
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json, tokenizer_config.json) in {path}")
    return tokenizer


def chat_prompt_renderer(tokenizer: Any) -> Callable[[str], str]:
    """``question -> prompt text``: the chat template around one user turn, assistant header appended.

    The template is rendered once around a sentinel and reused by string substitution (rendering it for
    every one of ~10^5 training prompts would take minutes); the result is checked against a direct
    rendering so that a template that transforms the content is refused rather than silently mismatched.
    """

    def direct(question: str) -> str:
        messages = [{"role": "user", "content": question}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    before, sentinel, after = direct(_QUESTION_SENTINEL).partition(_QUESTION_SENTINEL)
    if not sentinel:
        raise ValueError("the chat template does not place the user message verbatim in the prompt")
    probe = "What is 15 times 23?"
    if before + probe + after != direct(probe):
        raise ValueError("the chat template's output is not a fixed prefix + message + suffix")
    return lambda question: before + question + after


def encode_prompts(tokenizer: Any, questions: list[str]) -> list[list[int]]:
    """Token ids of each question's chat prompt (no special tokens added beyond the template's)."""
    render = chat_prompt_renderer(tokenizer)
    texts = [render(question) for question in questions]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def response_ids(family: str, tokenizer: Any, answer: str, length: int) -> list[int]:
    """The training target of the generation region: answer, end-of-turn, then ``<|endoftext|>`` pads."""
    ids = tokenizer.convert_tokens_to_ids([END_OF_TURN[check_family(family)], END_OF_TEXT])
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if len(answer_ids) + 1 > length:
        raise ValueError(f"answer {answer!r} ({len(answer_ids)} tokens) does not fit {length} tokens")
    return answer_ids + [ids[0]] + [ids[1]] * (length - len(answer_ids) - 1)


__all__ = [
    "END_OF_TEXT",
    "END_OF_TURN",
    "FAMILIES",
    "SDAR_BLOCK_SIZE",
    "SIZES",
    "ModelSize",
    "chat_prompt_renderer",
    "encode_prompts",
    "family_of",
    "load_tokenizer",
    "model_config",
    "response_ids",
    "vocab_size",
    "write_checkpoint",
    "write_tokenizer_files",
]
