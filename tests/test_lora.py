"""PEFT LoRA adapters (D2F checkpoints) merged at load, against a plain forward that applies them unmerged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffulex import SamplingParams
from diffulex.models import load_model
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint, write_tiny_lora_adapter
from tests.model_helpers import _ids, _max_rel_error, llada_reference_logits, model_logits

PREFIX = "base_model.model."


# ---- the reference: base weights untouched, every adapted projection adds scaling * (x A^T) B^T ----


def _adapter_pairs(adapter: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Official module name -> (A, B) as PEFT stores them."""
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    return {
        key.removeprefix(PREFIX).removesuffix(".lora_A.weight"): (
            tensors[key],
            tensors[key.replace("lora_A", "lora_B")],
        )
        for key in tensors
        if key.endswith(".lora_A.weight")
    }


def lora_reference_logits(base: Path, adapter: Path, ids: torch.Tensor, scaling: float) -> torch.Tensor:
    """The LLaDA reference forward with every adapted projection adding ``scaling * (x A^T) B^T``."""
    w = load_file(str(base / "model.safetensors"))
    pairs = _adapter_pairs(adapter)
    fan_in_fan_out = json.loads((adapter / "adapter_config.json").read_text()).get("fan_in_fan_out", False)

    def proj(h: torch.Tensor, module: str) -> torch.Tensor:
        out = h @ w[module + ".weight"].T
        if module + ".bias" in w:
            out = out + w[module + ".bias"]
        if module in pairs:
            lora_a, lora_b = pairs[module]
            if fan_in_fan_out:  # stored transposed: A [r, out], B [in, r] -> (B A)^T is the [out, in] delta
                lora_a, lora_b = lora_b.T, lora_a.T
            out = out + scaling * ((h @ lora_a.T) @ lora_b.T)
        return out

    return llada_reference_logits(base, ids, proj)


def _base(tmp_path: Path, **overrides) -> Path:
    return write_tiny_checkpoint("llada", tmp_path / "base", seed=3, **overrides)


# ---- merge parity ----


@pytest.mark.parametrize(
    "targets,overrides",
    [
        (("q_proj", "v_proj"), {}),  # the D2F default, inside the fused qkv
        (("q_proj", "k_proj", "v_proj"), {"n_kv_heads": 2, "include_qkv_bias": True}),  # GQA slices
        (("ff_proj", "up_proj"), {}),  # inside the fused gate_up
        (("attn_out", "ff_out"), {}),  # plain projections; "ff_out" also matches the LM head
    ],
)
def test_merged_adapter_matches_unmerged_reference(tmp_path: Path, targets: tuple, overrides: dict) -> None:
    base = _base(tmp_path, with_tokenizer=False, **overrides)
    adapter = write_tiny_lora_adapter(base, tmp_path / "adapter", r=4, alpha=8, targets=targets, seed=7)
    model, spec = load_model(adapter, torch.float32, "cpu")
    ids = _ids(29, spec.mask_token_id)
    logits = model_logits(model, spec, ids)
    assert _max_rel_error(logits, lora_reference_logits(base, adapter, ids, scaling=8 / 4)) <= 1e-5
    # The adapter matters: the base alone is far from it.
    base_model, _ = load_model(base, torch.float32, "cpu")
    assert _max_rel_error(model_logits(base_model, spec, ids), logits) > 1e-2


def test_merge_lands_in_the_fused_slice(tmp_path: Path) -> None:
    base = _base(tmp_path, with_tokenizer=False, n_kv_heads=2)
    adapter = write_tiny_lora_adapter(base, tmp_path / "adapter", targets=("k_proj",), r=2, alpha=6)
    model, _ = load_model(adapter, torch.float32, "cpu")
    w = load_file(str(base / "model.safetensors"))
    lora_a, lora_b = _adapter_pairs(adapter)["model.transformer.blocks.1.k_proj"]
    qkv = model.model.layers[1].qkv_proj.weight
    q_rows, kv_rows = 64, 32
    expected_k = w["model.transformer.blocks.1.k_proj.weight"] + 3.0 * lora_b @ lora_a
    torch.testing.assert_close(qkv[q_rows : q_rows + kv_rows], expected_k, rtol=0, atol=1e-6)
    assert torch.equal(qkv[:q_rows], w["model.transformer.blocks.1.q_proj.weight"])
    assert torch.equal(qkv[q_rows + kv_rows :], w["model.transformer.blocks.1.v_proj.weight"])


def test_rslora_scaling(tmp_path: Path) -> None:
    base = _base(tmp_path, with_tokenizer=False)
    adapter = write_tiny_lora_adapter(base, tmp_path / "adapter", r=4, alpha=8, use_rslora=True)
    model, spec = load_model(adapter, torch.float32, "cpu")
    ids = _ids(21, spec.mask_token_id)
    logits = model_logits(model, spec, ids)
    rslora = 8 / math.sqrt(4)  # 4.0, not 8 / 4
    assert _max_rel_error(logits, lora_reference_logits(base, adapter, ids, scaling=rslora)) <= 1e-5
    assert _max_rel_error(logits, lora_reference_logits(base, adapter, ids, scaling=8 / 4)) > 1e-3


def test_fan_in_fan_out_transposes(tmp_path: Path) -> None:
    base = _base(tmp_path, with_tokenizer=False)
    plain = write_tiny_lora_adapter(base, tmp_path / "plain", targets=("q_proj", "ff_proj"), seed=4)
    flipped = tmp_path / "flipped"
    flipped.mkdir()
    config = json.loads((plain / "adapter_config.json").read_text()) | {"fan_in_fan_out": True}
    (flipped / "adapter_config.json").write_text(json.dumps(config))
    tensors = load_file(str(plain / "adapter_model.safetensors"))
    swapped = {}
    for key in tensors:  # A' = B^T, B' = A^T: (B' A')^T = B A
        other = key.replace("lora_A", "lora_B") if "lora_A" in key else key.replace("lora_B", "lora_A")
        swapped[key] = tensors[other].T.contiguous()
    save_file(swapped, str(flipped / "adapter_model.safetensors"))
    model_a, spec = load_model(plain, torch.float32, "cpu")
    model_b, _ = load_model(flipped, torch.float32, "cpu")
    ids = _ids(17, spec.mask_token_id)
    torch.testing.assert_close(model_logits(model_b, spec, ids), model_logits(model_a, spec, ids))
    assert (
        _max_rel_error(model_logits(model_b, spec, ids), lora_reference_logits(base, flipped, ids, 2.0))
        <= 1e-5
    )


def test_bf16_merge_close_to_fp32(tmp_path: Path) -> None:
    base = _base(tmp_path, with_tokenizer=False)
    adapter = write_tiny_lora_adapter(base, tmp_path / "adapter", targets=("q_proj", "v_proj", "ff_out"))
    model32, spec = load_model(adapter, torch.float32, "cpu")
    model16, _ = load_model(adapter, torch.bfloat16, "cpu")
    ids = _ids(19, spec.mask_token_id)
    assert _max_rel_error(model_logits(model16, spec, ids), model_logits(model32, spec, ids)) < 0.1


# ---- the engine ----


def test_llm_generates_with_adapter(tmp_path: Path, make_llm) -> None:
    base = _base(tmp_path)
    adapter = write_tiny_lora_adapter(
        base, tmp_path / "adapter", targets=("q_proj", "v_proj"), base_model_name_or_path="Org/Not-Local"
    )
    llm = make_llm(adapter, base_model=str(base))
    params = SamplingParams(max_tokens=8)
    prompt = [5, 6, 7, 8]
    out = llm.generate([prompt], params)[0]
    assert len(out.token_ids) > 0 and out.finish_reason in ("stop", "length")
    logits = llm.forward_logits(prompt)
    assert _max_rel_error(logits, lora_reference_logits(base, adapter, torch.tensor(prompt), 2.0)) <= 1e-5
    # Base named by the adapter config (a local folder): no base_model needed, the base's tokenizer is used.
    local = write_tiny_lora_adapter(base, tmp_path / "local", targets=("q_proj", "v_proj"))
    llm_local = make_llm(local)
    assert llm_local.tokenizer is not None
    text_out = llm_local.generate("2+2=", params)[0]
    assert text_out.text is not None
    assert llm_local.generate([prompt], params)[0].token_ids == out.token_ids


# ---- errors ----


def test_missing_base_is_a_clear_error(tmp_path: Path) -> None:
    base = _base(tmp_path, with_tokenizer=False)
    adapter = write_tiny_lora_adapter(
        base, tmp_path / "adapter", base_model_name_or_path="GSAI-ML/LLaDA-8B-Instruct"
    )
    with pytest.raises(ValueError, match="needs its base checkpoint: pass base_model=") as error:
        load_model(adapter, torch.float32, "cpu")
    assert "'GSAI-ML/LLaDA-8B-Instruct', which is not a local folder" in str(error.value)
    assert str(adapter) in str(error.value)
    # The engine option fixes it.
    assert load_model(adapter, torch.float32, "cpu", base_model=str(base))[1].family == "llada"


def test_base_model_without_adapter_is_refused(tmp_path: Path) -> None:
    base = _base(tmp_path, with_tokenizer=False)
    with pytest.raises(ValueError, match="not a LoRA adapter folder"):
        load_model(base, torch.float32, "cpu", base_model=str(base))


def test_unknown_target_is_named(tmp_path: Path) -> None:
    base = _base(tmp_path, with_tokenizer=False)
    adapter = write_tiny_lora_adapter(base, tmp_path / "adapter")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors[f"{PREFIX}model.transformer.blocks.0.foo_proj.lora_A.weight"] = torch.zeros(4, 64)
    tensors[f"{PREFIX}model.transformer.blocks.0.foo_proj.lora_B.weight"] = torch.zeros(64, 4)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="does not have: model.transformer.blocks.0.foo_proj.weight"):
        load_model(adapter, torch.float32, "cpu")


def test_wrong_rank_is_named(tmp_path: Path) -> None:
    base = _base(tmp_path, with_tokenizer=False)
    adapter = write_tiny_lora_adapter(base, tmp_path / "adapter", r=4)
    config = json.loads((adapter / "adapter_config.json").read_text()) | {"r": 8}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="not of rank r=8: model.transformer.blocks.0.q_proj.weight"):
        load_model(adapter, torch.float32, "cpu")
