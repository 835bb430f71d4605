"""The official layout of each family's tiny checkpoint: ``config.json`` fields and tensor names/shapes.

For every family this holds the Hugging Face config dict with the published checkpoint's field names
(only the sizes are tiny), the ``generation_config.json`` ids, and the official tensor name -> shape table
that a config implies. It is separate from ``diffulex.models.tiny_checkpoint`` because it is pure data
about the published formats (no tensors, files or tokenizer), which the writer, the bundled trained tiny
models (``diffulex.quality.checkpoint``) and the benchmark scripts read at any size. The configs take the
special token ids as an argument (``tiny_checkpoint.special_token_ids``), so this module imports nothing
from the writer.
"""

from __future__ import annotations

from typing import Any


def llada_config(ids: dict[str, int]) -> dict[str, Any]:
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


def sdar_config(ids: dict[str, int]) -> dict[str, Any]:
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
    return sdar_config(ids) | {
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


def generation_config(family: str, ids: dict[str, int]) -> dict[str, Any]:
    if family == "llada":
        eos, bos = [ids["<|endoftext|>"], ids["<|eot_id|>"]], ids["<|startoftext|>"]
    elif family == "dream":
        eos, bos = [ids["<|endoftext|>"], ids["<|im_end|>"]], ids["<|endoftext|>"]
    elif family == "llada2_moe":
        eos, bos = [ids["<|endoftext|>"]], ids["<|endoftext|>"]
    else:
        eos, bos = [ids["<|im_end|>"], ids["<|endoftext|>"]], ids["<|endoftext|>"]
    return {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": ids["<|endoftext|>"]}


def llada_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
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


def sdar_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
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
    for name, shape in sdar_tensor_shapes(cfg).items():
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


CONFIGS = {
    "llada": llada_config,
    "sdar": sdar_config,
    "dream": _dream_config,
    "sdar_moe": _sdar_moe_config,
    "llada2_moe": _llada2_moe_config,
    "fast_dllm_v2": _fast_dllm_v2_config,
}
TENSOR_SHAPES = {
    "llada": llada_tensor_shapes,
    "sdar": sdar_tensor_shapes,
    "dream": _dream_tensor_shapes,
    "sdar_moe": _sdar_moe_tensor_shapes,
    "llada2_moe": _llada2_moe_tensor_shapes,
    "fast_dllm_v2": _dream_tensor_shapes,  # the same Qwen2.5 tensors
}
