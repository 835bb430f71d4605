"""Tiny random checkpoints in the official layout of each family, for tests and CPU demos.

A checkpoint folder written here looks like the published one (``config.json`` with the official field
names, safetensors with the official tensor names, optionally sharded with an index, a
``generation_config.json`` and a tokenizer), only small: the real loading path is what runs on it. The
tokenizer is character-level (printable ASCII, tab, newline) plus the family's special tokens, padded with
ordinary two-letter pieces up to the model's vocabulary so that every id the model can emit decodes.
Weights are random but not flat: embeddings, norms and head are scaled so that logits are peaky and
confidences differ between positions, which is what decoding strategies need to be exercised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

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


def _llada_config(ids: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "activation_type": "silu",
        "alibi": False,
        "attention_layer_norm": False,
        "bias_for_layer_norm": False,
        "block_group_size": 1,
        "block_type": "llama",
        "d_model": 64,
        "embedding_size": 256,
        "vocab_size": 256,
        "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "mask_token_id": ids["<|mdm_mask|>"],
        "include_bias": False,
        "include_qkv_bias": False,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "layer_norm_with_affine": True,
        "max_sequence_length": 4096,
        "mlp_hidden_size": 128,
        "mlp_ratio": 4,
        "multi_query_attention": None,
        "n_heads": 4,
        "n_kv_heads": 4,
        "n_layers": 2,
        "rms_norm_eps": 1e-05,
        "rope": True,
        "rope_full_precision": True,
        "rope_theta": 500000.0,
        "scale_logits": False,
        "weight_tying": False,
        "torch_dtype": "float32",
    }


def _sdar_config(ids: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["SDARForCausalLM"],
        "model_type": "sdar",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|endoftext|>"],
        "mask_token_id": ids["<|MASK|>"],  # the released configs lack it; the tiny vocab needs its own id
        "block_size": 4,
        "head_dim": 32,  # 4 x 32 = 128 != hidden 64, as in SDAR-4B (heads x head_dim != hidden)
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 32768,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": 256,
        "torch_dtype": "float32",
    }


def _sdar_moe_config(ids: dict[str, int]) -> dict[str, Any]:
    # Field names of JetAstra/SDAR-30B-A3B-Chat's config.json (Qwen3-MoE's): 4 experts, top-2, tiny sizes.
    return _sdar_config(ids) | {
        "architectures": ["SDARMoeForCausalLM"],
        "model_type": "sdar_moe",
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "moe_intermediate_size": 32,
        "norm_topk_prob": True,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    }


def _llada2_moe_config(ids: dict[str, int]) -> dict[str, Any]:
    # Field names of inclusionAI/LLaDA2.0-mini's config.json: 8 experts in 2 groups, top-2 from the best
    # group, 1 shared expert, first layer dense, qk-norm, partial rotary 0.5; tiny sizes.
    return {
        "architectures": ["LLaDA2MoeModelLM"],
        "model_type": "llada2_moe",
        "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "mask_token_id": ids["<|mask|>"],  # the tiny vocab needs its own id (official: 156895)
        "first_k_dense_replace": 1,
        "head_dim": 16,
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 32768,
        "moe_intermediate_size": 32,
        "n_group": 2,
        "norm_head": False,
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "num_shared_experts": 1,
        "output_router_logits": False,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 600000,
        "routed_scaling_factor": 2.5,
        "score_function": "sigmoid",
        "tie_word_embeddings": False,
        "topk_group": 1,
        "use_bias": False,
        "use_qk_norm": True,
        "use_qkv_bias": False,
        "vocab_size": 256,
        "torch_dtype": "float32",
    }


def _dream_config(ids: dict[str, int]) -> dict[str, Any]:
    # Field names of Dream-org/Dream-v0-Instruct-7B's config.json; q/k/v always carry a bias there.
    return {
        "architectures": ["DreamModel"],
        "model_type": "Dream",
        "attention_dropout": 0.0,
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|endoftext|>"],
        "pad_token_id": ids["<|endoftext|>"],
        "mask_token_id": ids["<|mask|>"],
        "hidden_act": "silu",
        "hidden_size": 64,
        "intermediate_size": 128,
        "max_position_embeddings": 32768,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
        "vocab_size": 256,
        "torch_dtype": "float32",
    }


def _fast_dllm_v2_config(ids: dict[str, int]) -> dict[str, Any]:
    # Field names of Fast_dLLM_QwenConfig (a Qwen2 config plus bd_size); Qwen2.5-Instruct's eos/pad roles.
    return _dream_config(ids) | {
        "architectures": ["Fast_dLLM_QwenForCausalLM"],
        "model_type": "Fast_dLLM_Qwen",
        "eos_token_id": ids["<|im_end|>"],
        "bd_size": 8,
        "max_window_layers": 2,
    }


def _generation_config(family: str, ids: dict[str, int]) -> dict[str, Any]:
    if family == "llada":
        eos, bos = [ids["<|endoftext|>"], ids["<|eot_id|>"]], ids["<|startoftext|>"]
    elif family == "dream":
        eos, bos = [ids["<|endoftext|>"], ids["<|im_end|>"]], ids["<|endoftext|>"]
    elif family == "llada2_moe":
        eos, bos = [ids["<|endoftext|>"]], ids["<|endoftext|>"]
    else:
        eos, bos = [ids["<|im_end|>"], ids["<|endoftext|>"]], ids["<|endoftext|>"]
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"]}


def _llada_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d_model, heads = cfg["d_model"], cfg["n_heads"]
    kv_dim = (cfg["n_kv_heads"] or heads) * (d_model // heads)
    mlp, vocab = cfg["mlp_hidden_size"], cfg["embedding_size"] or cfg["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.transformer.wte.weight": (vocab, d_model)}
    for layer in range(cfg["n_layers"]):
        prefix = f"model.transformer.blocks.{layer}"
        shapes |= {
            f"{prefix}.attn_norm.weight": (d_model,),
            f"{prefix}.q_proj.weight": (d_model, d_model),
            f"{prefix}.k_proj.weight": (kv_dim, d_model),
            f"{prefix}.v_proj.weight": (kv_dim, d_model),
            f"{prefix}.attn_out.weight": (d_model, d_model),
            f"{prefix}.ff_norm.weight": (d_model,),
            f"{prefix}.ff_proj.weight": (mlp, d_model),
            f"{prefix}.up_proj.weight": (mlp, d_model),
            f"{prefix}.ff_out.weight": (d_model, mlp),
        }
        biased = ["q_proj", "k_proj", "v_proj"] if cfg["include_bias"] or cfg["include_qkv_bias"] else []
        if cfg["include_bias"]:
            biased += ["attn_out", "ff_proj", "up_proj", "ff_out"]
        shapes |= {f"{prefix}.{name}.bias": (shapes[f"{prefix}.{name}.weight"][0],) for name in biased}
    shapes["model.transformer.ln_f.weight"] = (d_model,)
    if not cfg["weight_tying"]:
        shapes["model.transformer.ff_out.weight"] = (vocab, d_model)
        if cfg["include_bias"]:
            shapes["model.transformer.ff_out.bias"] = (vocab,)
    return shapes


def _sdar_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, head_dim, vocab = cfg["hidden_size"], cfg["head_dim"], cfg["vocab_size"]
    q_dim, kv_dim = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    mlp = cfg["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        shapes |= {
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.self_attn.q_proj.weight": (q_dim, hidden),
            f"{prefix}.self_attn.k_proj.weight": (kv_dim, hidden),
            f"{prefix}.self_attn.v_proj.weight": (kv_dim, hidden),
            f"{prefix}.self_attn.o_proj.weight": (hidden, q_dim),
            f"{prefix}.self_attn.q_norm.weight": (head_dim,),
            f"{prefix}.self_attn.k_norm.weight": (head_dim,),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
            f"{prefix}.mlp.gate_proj.weight": (mlp, hidden),
            f"{prefix}.mlp.up_proj.weight": (mlp, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, mlp),
        }
        if cfg["attention_bias"]:
            shapes |= {
                f"{prefix}.self_attn.{n}_proj.bias": (shapes[f"{prefix}.self_attn.{n}_proj.weight"][0],)
                for n in "qkvo"
            }
    shapes["model.norm.weight"] = (hidden,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _sdar_moe_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from diffulex.models.sdar_moe import is_moe_layer

    hidden, experts, moe = cfg["hidden_size"], cfg["num_experts"], cfg["moe_intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in _sdar_tensor_shapes(cfg).items():
        parts = name.split(".")
        if len(parts) > 3 and parts[3] == "mlp" and is_moe_layer(cfg, int(parts[2])):
            if parts[4] != "gate_proj":
                continue  # the sparse layer's tensors are written once, in place of the dense gate_proj
            prefix = ".".join(parts[:4])
            shapes[f"{prefix}.gate.weight"] = (experts, hidden)
            for expert in range(experts):
                shapes |= {
                    f"{prefix}.experts.{expert}.gate_proj.weight": (moe, hidden),
                    f"{prefix}.experts.{expert}.up_proj.weight": (moe, hidden),
                    f"{prefix}.experts.{expert}.down_proj.weight": (hidden, moe),
                }
            continue
        shapes[name] = shape
    return shapes


def _llada2_moe_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from diffulex.models.llada2_moe import is_moe_layer

    hidden, head_dim, vocab = cfg["hidden_size"], cfg["head_dim"], cfg["vocab_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    experts, moe = cfg["num_experts"], cfg["moe_intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.word_embeddings.weight": (vocab, hidden)}

    def swiglu(prefix: str, width: int) -> dict[str, tuple[int, ...]]:
        return {
            f"{prefix}.gate_proj.weight": (width, hidden),
            f"{prefix}.up_proj.weight": (width, hidden),
            f"{prefix}.down_proj.weight": (hidden, width),
        }

    for layer in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        qkv = (heads + 2 * kv_heads) * head_dim
        shapes |= {
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.attention.query_key_value.weight": (qkv, hidden),
            f"{prefix}.attention.dense.weight": (hidden, heads * head_dim),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
        }
        if cfg["use_qkv_bias"]:
            shapes[f"{prefix}.attention.query_key_value.bias"] = (qkv,)
        if cfg["use_bias"]:
            shapes[f"{prefix}.attention.dense.bias"] = (hidden,)
        if cfg["use_qk_norm"]:
            shapes[f"{prefix}.attention.query_layernorm.weight"] = (head_dim,)
            shapes[f"{prefix}.attention.key_layernorm.weight"] = (head_dim,)
        if not is_moe_layer(cfg, layer):
            shapes |= swiglu(f"{prefix}.mlp", cfg["intermediate_size"])
            continue
        shapes[f"{prefix}.mlp.gate.weight"] = (experts, hidden)
        shapes[f"{prefix}.mlp.gate.expert_bias"] = (experts,)
        for expert in range(experts):
            shapes |= swiglu(f"{prefix}.mlp.experts.{expert}", moe)
        if cfg["num_shared_experts"]:
            shapes |= swiglu(f"{prefix}.mlp.shared_experts", moe * cfg["num_shared_experts"])
    shapes["model.norm.weight"] = (hidden,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _dream_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    hidden, vocab, mlp = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    head_dim = hidden // cfg["num_attention_heads"]
    kv_dim = cfg["num_key_value_heads"] * head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for layer in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        shapes |= {
            f"{prefix}.input_layernorm.weight": (hidden,),
            f"{prefix}.self_attn.q_proj.weight": (hidden, hidden),
            f"{prefix}.self_attn.q_proj.bias": (hidden,),
            f"{prefix}.self_attn.k_proj.weight": (kv_dim, hidden),
            f"{prefix}.self_attn.k_proj.bias": (kv_dim,),
            f"{prefix}.self_attn.v_proj.weight": (kv_dim, hidden),
            f"{prefix}.self_attn.v_proj.bias": (kv_dim,),
            f"{prefix}.self_attn.o_proj.weight": (hidden, hidden),
            f"{prefix}.post_attention_layernorm.weight": (hidden,),
            f"{prefix}.mlp.gate_proj.weight": (mlp, hidden),
            f"{prefix}.mlp.up_proj.weight": (mlp, hidden),
            f"{prefix}.mlp.down_proj.weight": (hidden, mlp),
        }
    shapes["model.norm.weight"] = (hidden,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


_CONFIGS = {
    "llada": _llada_config,
    "sdar": _sdar_config,
    "dream": _dream_config,
    "sdar_moe": _sdar_moe_config,
    "llada2_moe": _llada2_moe_config,
    "fast_dllm_v2": _fast_dllm_v2_config,
}
_TENSOR_SHAPES = {
    "llada": _llada_tensor_shapes,
    "sdar": _sdar_tensor_shapes,
    "dream": _dream_tensor_shapes,
    "sdar_moe": _sdar_moe_tensor_shapes,
    "llada2_moe": _llada2_moe_tensor_shapes,
    "fast_dllm_v2": _dream_tensor_shapes,  # the same Qwen2.5 tensors
}


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


def _write_tokenizer(family: str, vocab_size: int, ids: dict[str, int], out_dir: Path) -> None:
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
    config = _CONFIGS[family](ids) | config_overrides
    vocab_key = "embedding_size" if family == "llada" and config.get("embedding_size") else "vocab_size"
    needed = len(CHARACTERS) + len(ids)
    if config[vocab_key] < needed:
        raise ValueError(f"{vocab_key}={config[vocab_key]} is below the tiny tokenizer's {needed} tokens")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(_generation_config(family, ids), indent=2) + "\n")

    shapes = _TENSOR_SHAPES[family](config)
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: _random_tensor(name, shape, generator) for name, shape in shapes.items()}
    _write_safetensors(tensors, out, shards)
    if with_tokenizer:
        _write_tokenizer(family, config[vocab_key], ids, out)
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
