"""Model loading: weight-loading errors naming the official tensors, specs from the official configs,
the tiny tokenizers and the tiny-checkpoint script."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffulex.models import WeightLoadError, load_hf_config, load_model, load_tokenizer, resolve_model_class
from diffulex.models.tiny_checkpoint import special_token_ids, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


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
