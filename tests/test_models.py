"""Model layer: each family against an independent plain-torch forward, loading, errors, invariances."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from diffulex.layers.context import AttentionContext, set_context, single_sequence_context
from diffulex.layers.linear import Linear, batch_invariant_linear
from diffulex.layers.rotary import RotaryEmbedding
from diffulex.models import WeightLoadError, load_hf_config, load_model, load_tokenizer, resolve_model_class
from diffulex.models.tiny_checkpoint import special_token_ids, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


# ---- an independent reference: plain torch straight from the official tensor names ----


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [heads, T, D], rotate-half layout."""
    dim = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : dim // 2], x[..., dim // 2 :]
    return x * emb.cos() + torch.cat([-x2, x1], dim=-1) * emb.sin()


def _attend(q, k, v, allowed: torch.Tensor) -> torch.Tensor:
    """q [H, T, D], k/v [KVH, T, D], allowed [T, T] -> [T, H*D]."""
    heads, tokens, dim = q.shape
    k = k.repeat_interleave(heads // k.shape[0], dim=0)
    v = v.repeat_interleave(heads // v.shape[0], dim=0)
    scores = (q @ k.transpose(1, 2)) / dim**0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(tokens, heads * dim)


def _proj(h: torch.Tensor, w: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """``h @ W.T (+ b)`` from the official tensors ``name.weight`` (and ``name.bias`` when stored)."""
    out = h @ w[name + ".weight"].T
    return out + w[name + ".bias"] if name + ".bias" in w else out


def llada_reference_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    cfg = json.loads((path / "config.json").read_text())
    w = load_file(str(path / "model.safetensors"))
    heads = cfg["n_heads"]
    kv_heads = cfg["n_kv_heads"] or heads
    head_dim = cfg["d_model"] // heads
    eps, theta, tokens = cfg["rms_norm_eps"], cfg["rope_theta"], ids.shape[0]
    positions = torch.arange(tokens)
    allowed = torch.ones(tokens, tokens, dtype=torch.bool)  # LLaDA: fully bidirectional
    x = w["model.transformer.wte.weight"][ids]
    for i in range(cfg["n_layers"]):
        p = f"model.transformer.blocks.{i}."
        h = _rms(x, w[p + "attn_norm.weight"], eps)
        q = _proj(h, w, p + "q_proj").view(tokens, heads, head_dim).transpose(0, 1)
        k = _proj(h, w, p + "k_proj").view(tokens, kv_heads, head_dim).transpose(0, 1)
        v = _proj(h, w, p + "v_proj").view(tokens, kv_heads, head_dim).transpose(0, 1)
        att = _attend(_rope(q, positions, theta), _rope(k, positions, theta), v, allowed)
        x = x + att @ w[p + "attn_out.weight"].T
        h = _rms(x, w[p + "ff_norm.weight"], eps)
        x = (
            x
            + (F.silu(h @ w[p + "ff_proj.weight"].T) * (h @ w[p + "up_proj.weight"].T))
            @ w[p + "ff_out.weight"].T
        )
    x = _rms(x, w["model.transformer.ln_f.weight"], eps)
    head = w["model.transformer.wte.weight"] if cfg["weight_tying"] else w["model.transformer.ff_out.weight"]
    return x @ head.T


def sdar_reference_logits(path: Path, ids: torch.Tensor, block_size: int) -> torch.Tensor:
    cfg = json.loads((path / "config.json").read_text())
    w = load_file(str(path / "model.safetensors"))
    heads, kv_heads, head_dim = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    eps, theta, tokens = cfg["rms_norm_eps"], cfg["rope_theta"], ids.shape[0]
    positions = torch.arange(tokens)
    block = positions // block_size
    allowed = block.unsqueeze(0) <= block.unsqueeze(1)  # [query, key]: own block and earlier ones
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = _proj(h, w, p + "self_attn.q_proj").view(tokens, heads, head_dim)
        k = _proj(h, w, p + "self_attn.k_proj").view(tokens, kv_heads, head_dim)
        v = _proj(h, w, p + "self_attn.v_proj").view(tokens, kv_heads, head_dim).transpose(0, 1)
        q = _rms(q, w[p + "self_attn.q_norm.weight"], eps).transpose(0, 1)
        k = _rms(k, w[p + "self_attn.k_norm.weight"], eps).transpose(0, 1)
        att = _attend(_rope(q, positions, theta), _rope(k, positions, theta), v, allowed)
        x = x + _proj(att, w, p + "self_attn.o_proj")
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        mlp = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


def dream_reference_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """Dream (Qwen2.5 layout): biased q/k/v, no q/k norm, head_dim = hidden // heads, bidirectional.
    Unshifted: row i is the head applied to hidden i (the engine reads position i from row i - 1)."""
    cfg = json.loads((path / "config.json").read_text())
    w = load_file(str(path / "model.safetensors"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // heads
    eps, theta, tokens = cfg["rms_norm_eps"], cfg["rope_theta"], ids.shape[0]
    positions = torch.arange(tokens)
    allowed = torch.ones(tokens, tokens, dtype=torch.bool)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        h = _rms(x, w[p + "input_layernorm.weight"], eps)
        q = _proj(h, w, p + "self_attn.q_proj").view(tokens, heads, head_dim).transpose(0, 1)
        k = _proj(h, w, p + "self_attn.k_proj").view(tokens, kv_heads, head_dim).transpose(0, 1)
        v = _proj(h, w, p + "self_attn.v_proj").view(tokens, kv_heads, head_dim).transpose(0, 1)
        att = _attend(_rope(q, positions, theta), _rope(k, positions, theta), v, allowed)
        x = x + att @ w[p + "self_attn.o_proj.weight"].T
        h = _rms(x, w[p + "post_attention_layernorm.weight"], eps)
        mlp = F.silu(h @ w[p + "mlp.gate_proj.weight"].T) * (h @ w[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ w[p + "mlp.down_proj.weight"].T
    x = _rms(x, w["model.norm.weight"], eps)
    head = w["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else w["lm_head.weight"]
    return x @ head.T


# ---- helpers ----


def _block_ids(spec, num_tokens: int) -> torch.Tensor | None:
    if spec.native_attention == "block_causal":
        return torch.arange(num_tokens) // spec.default_block_size
    return None


def model_logits(model, spec, ids: torch.Tensor) -> torch.Tensor:
    set_context(single_sequence_context(ids.shape[0], "cpu", _block_ids(spec, ids.shape[0])))
    try:
        return model.compute_logits(model(ids, torch.arange(ids.shape[0])))
    finally:
        set_context(None)


def _ids(num_tokens: int, mask_id: int, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, 97, (num_tokens,), generator=torch.Generator().manual_seed(seed))
    ids[1::3] = mask_id  # masked positions, as in a diffusion step
    return ids


def _max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


# ---- forward parity ----


@pytest.mark.parametrize(
    "family,overrides",
    [
        ("llada", {}),
        ("llada", {"n_kv_heads": 2}),
        ("llada", {"weight_tying": True}),
        ("llada", {"include_qkv_bias": True, "n_kv_heads": 2}),
        ("sdar", {}),
        ("sdar", {"attention_bias": True}),
        ("sdar", {"tie_word_embeddings": True, "block_size": 8}),
        ("dream", {}),
        ("dream", {"num_key_value_heads": 4}),
        ("dream", {"tie_word_embeddings": True, "num_attention_heads": 2}),
    ],
)
def test_forward_matches_plain_reference(tmp_path: Path, family: str, overrides: dict) -> None:
    path = write_tiny_checkpoint(family, tmp_path / family, seed=3, with_tokenizer=False, **overrides)
    model, spec = load_model(path, torch.float32, "cpu")
    ids = _ids(37, spec.mask_token_id)
    logits = model_logits(model, spec, ids)
    if family == "llada":
        expected = llada_reference_logits(path, ids)
    elif family == "dream":
        assert "model.layers.0.self_attn.q_proj.bias" in load_file(str(path / "model.safetensors"))
        expected = dream_reference_logits(path, ids)
    else:
        expected = sdar_reference_logits(path, ids, spec.default_block_size)
    assert logits.shape == (37, spec.vocab_size)
    assert _max_rel_error(logits, expected) <= 1e-5
    if overrides.get("weight_tying") or overrides.get("tie_word_embeddings"):
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_sdar_attention_is_block_causal(tmp_path: Path) -> None:
    """Changing a token of a later block leaves earlier blocks' logits untouched (and changes its own)."""
    path = write_tiny_checkpoint("sdar", tmp_path / "sdar", with_tokenizer=False)
    model, spec = load_model(path, torch.float32, "cpu")
    ids = _ids(16, spec.mask_token_id)
    changed = ids.clone()
    changed[13] = (ids[13] + 1) % 97
    before, after = model_logits(model, spec, ids), model_logits(model, spec, changed)
    assert torch.equal(before[:12], after[:12])
    assert not torch.allclose(before[12:], after[12:])


@pytest.mark.parametrize("family", ["llada", "sdar", "dream"])
def test_sharded_checkpoint_gives_identical_logits(tmp_path: Path, family: str) -> None:
    single = write_tiny_checkpoint(family, tmp_path / "single", seed=5, with_tokenizer=False)
    sharded = write_tiny_checkpoint(family, tmp_path / "sharded", seed=5, with_tokenizer=False, shards=3)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [
        f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)
    ]
    assert not (sharded / "model.safetensors").exists()
    model_a, spec = load_model(single, torch.float32, "cpu")
    model_b, _ = load_model(sharded, torch.float32, "cpu")
    ids = _ids(20, spec.mask_token_id)
    assert torch.equal(model_logits(model_a, spec, ids), model_logits(model_b, spec, ids))


@pytest.mark.parametrize("family", ["llada", "sdar", "dream"])
def test_bf16_close_to_fp32(tmp_path: Path, family: str) -> None:
    path = write_tiny_checkpoint(family, tmp_path / family, with_tokenizer=False)
    model32, spec = load_model(path, torch.float32, "cpu")
    model16, _ = load_model(path, torch.bfloat16, "cpu")
    assert all(p.dtype == torch.bfloat16 for p in model16.parameters())
    ids = _ids(32, spec.mask_token_id)
    logits32, logits16 = model_logits(model32, spec, ids), model_logits(model16, spec, ids)
    assert logits16.dtype == torch.bfloat16
    assert _max_rel_error(logits16, logits32) < 0.05  # bf16 has 8 mantissa bits; 2 layers stay within a few %
    assert (logits16.float().argmax(-1) == logits32.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("family", ["llada", "sdar", "dream"])
def test_model_is_batch_invariant_across_packed_sequences(tmp_path: Path, family: str) -> None:
    """A sequence's logits are bit-identical alone and packed after another sequence in the same step."""
    path = write_tiny_checkpoint(family, tmp_path / family, with_tokenizer=False)
    model, spec = load_model(path, torch.float32, "cpu")
    first, second = _ids(11, spec.mask_token_id, seed=7), _ids(21, spec.mask_token_id, seed=8)
    alone = model_logits(model, spec, second)
    block_ids = [_block_ids(spec, n) for n in (11, 21)]
    packed_ids = torch.cat([first, second])
    positions = torch.cat([torch.arange(11), torch.arange(21)])
    context = AttentionContext(
        cu_seqlens_q=[0, 11, 32],
        block_ids=torch.zeros(32, dtype=torch.long) if block_ids[0] is None else torch.cat(block_ids),
        context_lens=[0, 0],
        context_holes=[(0, 0), (0, 0)],
        page_tables=None,
        slot_mapping=torch.full((32,), -1, dtype=torch.long),
    )
    set_context(context)
    try:
        packed = model.compute_logits(model(packed_ids, positions))
    finally:
        set_context(None)
    assert torch.equal(packed[11:], alone)


# ---- errors ----


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"))


def test_missing_tensor_is_named(tmp_path: Path) -> None:
    path = write_tiny_checkpoint("llada", tmp_path / "m", with_tokenizer=False)
    _rewrite(path, lambda t: t.pop("model.transformer.blocks.1.up_proj.weight"))
    with pytest.raises(
        WeightLoadError, match=r"missing \(1\): model\.transformer\.blocks\.1\.up_proj\.weight"
    ):
        load_model(path, torch.float32, "cpu")


@pytest.mark.parametrize(
    "family,name",
    [
        ("llada", "model.transformer.blocks.0.k_proj.weight"),
        ("llada", "model.transformer.blocks.1.ff_proj.weight"),
        ("sdar", "model.layers.1.self_attn.k_proj.weight"),
        ("sdar", "model.layers.0.mlp.up_proj.weight"),
    ],
)
def test_missing_shard_of_merged_projection_is_named(tmp_path: Path, family: str, name: str) -> None:
    """q/k/v and gate/up are merged in the model; a checkpoint lacking one still names the official tensor."""
    path = write_tiny_checkpoint(family, tmp_path / "m", with_tokenizer=False)
    _rewrite(path, lambda t: t.pop(name))
    with pytest.raises(WeightLoadError) as error:
        load_model(path, torch.float32, "cpu")
    assert error.value.missing == [name] and not error.value.unexpected and not error.value.wrong_shapes


def test_wrong_shape_of_merged_shard_is_named(tmp_path: Path) -> None:
    path = write_tiny_checkpoint("sdar", tmp_path / "m", with_tokenizer=False)
    name = "model.layers.0.self_attn.v_proj.weight"
    _rewrite(path, lambda t: t.__setitem__(name, t[name][:-1].clone()))
    with pytest.raises(WeightLoadError) as error:
        load_model(path, torch.float32, "cpu")
    assert [entry[0] for entry in error.value.wrong_shapes] == [name] and not error.value.missing


def test_merged_projections_hold_the_official_tensors(tmp_path: Path) -> None:
    """Each official q/k/v (weight and bias) and gate/up tensor lands in its row slice of the merged
    parameter, and the merged layer's outputs are views of one result, not copies."""
    path = write_tiny_checkpoint("sdar", tmp_path / "m", seed=4, with_tokenizer=False, attention_bias=True)
    model, _ = load_model(path, torch.float32, "cpu")
    w = load_file(str(path / "model.safetensors"))
    layer, p = model.model.layers[1], "model.layers.1."
    qkv, gate_up = layer.self_attn.qkv_proj, layer.mlp.gate_up_proj
    for part in ("weight", "bias"):
        expected = torch.cat([w[f"{p}self_attn.{x}_proj.{part}"] for x in "qkv"])
        assert torch.equal(getattr(qkv, part), expected)
    assert torch.equal(
        gate_up.weight, torch.cat([w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"]])
    )
    query, key, value = qkv(torch.randn(5, qkv.in_features))
    assert query._base is not None and query._base is key._base is value._base


def test_unexpected_and_wrong_shape_are_named(tmp_path: Path) -> None:
    path = write_tiny_checkpoint("sdar", tmp_path / "m", with_tokenizer=False)

    def edit(tensors: dict) -> None:
        tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(7)
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(16)

    _rewrite(path, edit)
    with pytest.raises(WeightLoadError) as error:
        load_model(path, torch.float32, "cpu")
    message = str(error.value)
    assert (
        "model.layers.0.self_attn.q_norm.weight is [7] in the checkpoint, the model expects [32]" in message
    )
    assert "unexpected (1): model.layers.0.self_attn.rotary_emb.inv_freq" in message
    assert "missing" not in message  # a wrongly shaped tensor is reported once, not also as missing
    assert str(path) in message


def test_unknown_model_type_lists_families(tmp_path: Path) -> None:
    path = write_tiny_checkpoint("sdar", tmp_path / "m", with_tokenizer=False)
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="gpt2") as error:
        load_model(path, torch.float32, "cpu")
    assert "llada (llada, LLaDAModelLM)" in str(error.value) and "sdar (sdar, SDARForCausalLM)" in str(
        error.value
    )


def test_missing_weights_file_is_clear(tmp_path: Path) -> None:
    path = write_tiny_checkpoint("llada", tmp_path / "m", with_tokenizer=False)
    (path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_model(path, torch.float32, "cpu")


# ---- specs from the official configs ----


def test_spec_of_official_llada_config() -> None:
    # Fields of GSAI-ML/LLaDA-8B-Instruct's config.json (the ones the spec reads).
    config = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": 4096, "n_layers": 32,
        "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288, "vocab_size": 126464,
        "embedding_size": 126464, "max_sequence_length": 4096, "mask_token_id": 126336,
        "eos_token_id": 126081, "pad_token_id": 126081, "rope_theta": 500000.0, "weight_tying": False,
    }  # fmt: skip
    spec = resolve_model_class(config).spec_from_config(config)
    assert (spec.family, spec.head_dim, spec.vocab_size, spec.mask_token_id) == ("llada", 128, 126464, 126336)
    assert spec.eos_token_ids == (126081, 126348) and spec.pad_token_id == 126081
    assert (spec.native_attention, spec.shift_logits, spec.default_strategy) == (
        "bidirectional",
        False,
        "vanilla",
    )
    assert (spec.default_block_size, spec.vanilla_schedule) == (32, "llada")


def test_spec_of_official_sdar_config() -> None:
    # Fields of JetLM/SDAR-8B-Chat's released config.json (no mask_token_id / block_size in it).
    config = {
        "architectures": ["SDARForCausalLM"], "model_type": "sdar", "hidden_size": 4096, "head_dim": 128,
        "num_attention_heads": 32, "num_key_value_heads": 8, "num_hidden_layers": 36, "vocab_size": 151936,
        "max_position_embeddings": 32768, "eos_token_id": 151643, "bos_token_id": 151643,
        "tie_word_embeddings": False,
    }  # fmt: skip
    spec = resolve_model_class({"architectures": ["SDARForCausalLM"]}).spec_from_config(config)
    assert (spec.family, spec.mask_token_id, spec.default_block_size) == ("sdar", 151669, 4)
    assert spec.eos_token_ids == (151643, 151645) and spec.pad_token_id == 151643
    assert (spec.native_attention, spec.default_strategy, spec.shift_logits) == (
        "block_causal",
        "block_diffusion",
        False,
    )
    overridden = resolve_model_class(config).spec_from_config(config | {"mask_token_id": 7, "block_size": 16})
    assert (overridden.mask_token_id, overridden.default_block_size) == (7, 16)


def test_spec_of_official_dream_config() -> None:
    # Fields of Dream-org/Dream-v0-Instruct-7B's config.json (the ones the spec reads).
    config = {
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": 3584, "intermediate_size": 18944,
        "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28, "vocab_size": 152064,
        "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
        "mask_token_id": 151666, "pad_token_id": 151643, "bos_token_id": 151643, "eos_token_id": 151643,
        "tie_word_embeddings": False,
    }  # fmt: skip
    cls = resolve_model_class(config)
    assert (
        cls
        is resolve_model_class({"model_type": "dream"})
        is resolve_model_class({"architectures": ["DreamModel"]})
    )
    spec = cls.spec_from_config(config)
    assert (spec.family, spec.head_dim, spec.num_kv_heads, spec.vocab_size) == ("dream", 128, 4, 152064)
    assert (spec.mask_token_id, spec.pad_token_id, spec.eos_token_ids) == (151666, 151643, (151643, 151645))
    assert (spec.shift_logits, spec.native_attention, spec.default_strategy) == (
        True,
        "bidirectional",
        "vanilla",
    )
    assert (spec.default_block_size, spec.vanilla_schedule) == (32, "dream")
    # DreamConfig's defaults when the config leaves the ids out.
    bare = {k: v for k, v in config.items() if not k.endswith("token_id")}
    spec = cls.spec_from_config(bare)
    assert (spec.mask_token_id, spec.pad_token_id, spec.eos_token_id) == (151666, 151643, 151643)


def test_dream_attention_is_bidirectional(tmp_path: Path) -> None:
    """Changing the last token changes the logits of every earlier position (no causal mask)."""
    path = write_tiny_checkpoint("dream", tmp_path / "dream", with_tokenizer=False)
    model, spec = load_model(path, torch.float32, "cpu")
    ids = _ids(12, spec.mask_token_id)
    changed = ids.clone()
    changed[-1] = (ids[-1] + 1) % 97
    before, after = model_logits(model, spec, ids), model_logits(model, spec, changed)
    assert all(not torch.allclose(before[i], after[i]) for i in range(11))


# ---- tokenizer ----


@pytest.mark.parametrize("family", ["llada", "sdar", "dream"])
def test_tiny_tokenizer_matches_config_ids(tmp_path: Path, family: str) -> None:
    path = write_tiny_checkpoint(family, tmp_path / family)
    tokenizer = load_tokenizer(path)
    _, spec = load_model(path, torch.float32, "cpu")
    ids = special_token_ids(family)
    assert len(tokenizer) == spec.vocab_size
    assert tokenizer.mask_token_id == spec.mask_token_id
    assert tokenizer.eos_token_id == spec.eos_token_id == tokenizer.pad_token_id == spec.pad_token_id
    turn_end = "<|eot_id|>" if family == "llada" else "<|im_end|>"
    assert ids[turn_end] in spec.eos_token_ids
    assert load_hf_config(path)["generation_config"]["eos_token_id"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "2+2=?"}], add_generation_prompt=True, tokenize=False
    )
    encoded = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[turn_end] in encoded and tokenizer.decode(encoded) == prompt
    assert tokenizer.decode(encoded, skip_special_tokens=True).startswith("user")
    assert load_tokenizer(write_tiny_checkpoint(family, tmp_path / "bare", with_tokenizer=False)) is None


def test_make_tiny_checkpoint_script(tmp_path: Path) -> None:
    out = tmp_path / "script"
    args = ["--family", "sdar", "--out", str(out), "--seed", "2", "--shards", "2"]
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_tiny_checkpoint.py"), *args], check=True)
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    assert load_model(out, torch.float32, "cpu")[1].family == "sdar"


# ---- layers ----


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_invariant_linear(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(384, 256, generator=generator).to(dtype)
    bias = torch.randn(384, generator=generator).to(dtype)
    x = torch.randn(203, 256, generator=generator).to(dtype)
    full = batch_invariant_linear(x, weight, bias)
    torch.testing.assert_close(
        full.float(), (x.float() @ weight.float().T + bias.float()), rtol=2e-2, atol=2e-1
    )
    for start, stop in [(0, 1), (0, 5), (3, 20), (17, 200), (100, 203), (0, 203)]:
        assert torch.equal(batch_invariant_linear(x[start:stop], weight, bias), full[start:stop])
    layer = Linear(256, 384, bias=True, dtype=dtype)
    layer.weight.data.copy_(weight)
    layer.bias.data.copy_(bias)
    assert torch.equal(layer(x[5:9]), full[5:9])
    assert batch_invariant_linear(x.view(7, 29, 256), weight).shape == (7, 29, 384)


def test_rope_partial_rotary() -> None:
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(9, 4, 64, generator=generator)
    k = torch.randn(9, 2, 64, generator=generator)
    positions = torch.arange(100, 109)
    partial = RotaryEmbedding(head_dim=64, rotary_dim=32, base=10000.0)
    q_rot, k_rot = partial(positions, q, k)
    # The channels past rotary_dim pass through; the rotated ones equal a full rope of size rotary_dim.
    assert torch.equal(q_rot[..., 32:], q[..., 32:]) and torch.equal(k_rot[..., 32:], k[..., 32:])
    small_q, small_k = RotaryEmbedding(32, 32, 10000.0)(
        positions, q[..., :32].contiguous(), k[..., :32].contiguous()
    )
    assert torch.equal(q_rot[..., :32], small_q) and torch.equal(k_rot[..., :32], small_k)
    # A rotation: norms kept, position 0 is the identity, and scores depend only on the position offset.
    torch.testing.assert_close(q_rot.norm(dim=-1), q.norm(dim=-1))
    full = RotaryEmbedding(64, 64, 10000.0)
    q0, _ = full(torch.zeros(9, dtype=torch.long), q, k)
    torch.testing.assert_close(q0, q)

    def score(query_position: int, key_position: int) -> torch.Tensor:
        rotated_q, _ = full(torch.tensor([query_position]), q[:1], k[:1])
        _, rotated_k = full(torch.tensor([key_position]), q[:1], k[:1])
        return (rotated_q[0, 0] * rotated_k[0, 0]).sum()

    torch.testing.assert_close(score(5, 12), score(35, 42), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(5, 12), score(5, 13))
    # The frequencies stay float32 when the model is cast.
    assert full.to(torch.bfloat16).inv_freq.dtype == torch.float32
    with pytest.raises(ValueError):
        RotaryEmbedding(64, 31)
