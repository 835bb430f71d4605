"""Model layer: each family against an independent plain-torch forward (tests/model_helpers.py), attention
patterns, sharding, bf16, packing invariance, and the layers (batch-invariant linear, partial RoPE)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffulex.layers.context import AttentionContext, set_context
from diffulex.layers.linear import Linear, batch_invariant_linear
from diffulex.layers.rotary import RotaryEmbedding
from diffulex.models import load_model
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint
from tests.model_helpers import (
    _block_ids,
    _ids,
    _max_rel_error,
    dream_reference_logits,
    llada_reference_logits,
    model_logits,
    sdar_reference_logits,
)

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


def test_dream_attention_is_bidirectional(tmp_path: Path) -> None:
    """Changing the last token changes the logits of every earlier position (no causal mask)."""
    path = write_tiny_checkpoint("dream", tmp_path / "dream", with_tokenizer=False)
    model, spec = load_model(path, torch.float32, "cpu")
    ids = _ids(12, spec.mask_token_id)
    changed = ids.clone()
    changed[-1] = (ids[-1] + 1) % 97
    before, after = model_logits(model, spec, ids), model_logits(model, spec, changed)
    assert all(not torch.allclose(before[i], after[i]) for i in range(11))


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
