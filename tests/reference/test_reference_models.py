"""Sanity tests of the reference models themselves (CPU, tiny random checkpoints): masks, loading,
KV-cache forwards."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.reference.plain_models import DEFAULT_MASK_TOKEN_ID, PlainModel, block_causal_mask
from tests.reference.tiny_plain_ckpt import EOS_ID, MASK_ID, VOCAB, write_tiny_llada, write_tiny_sdar


@pytest.fixture(scope="module", params=["llada", "sdar"])
def model(request, llada, sdar):
    return {"llada": llada, "sdar": sdar}[request.param]


# ----------------------------------------------------------------------------------- models


def test_block_causal_mask():
    m = block_causal_mask(torch.tensor([0, 0, 1, 1, 2]))
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, expected)


def test_attributes(llada, sdar):
    for m in (llada, sdar):
        assert m.mask_token_id == MASK_ID
        assert m.eos_token_id == EOS_ID
        assert m.vocab_size == VOCAB
        assert m.num_layers == 2
    assert llada.family == "llada" and sdar.family == "sdar"
    assert sdar.head_dim == 16 and sdar.num_kv_heads == 2


def test_default_mask_id_when_config_has_none(tmp_path):
    for family, writer in (("llada", write_tiny_llada), ("sdar", write_tiny_sdar)):
        path = writer(tmp_path / family)
        cfg = json.loads((path / "config.json").read_text())
        del cfg["mask_token_id"]
        (path / "config.json").write_text(json.dumps(cfg))
        assert PlainModel(path).mask_token_id == DEFAULT_MASK_TOKEN_ID[family]


@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_sharded_equals_single_file(tmp_path, family):
    writer = write_tiny_llada if family == "llada" else write_tiny_sdar
    one = PlainModel(writer(tmp_path / "one", seed=3))
    sharded_path = writer(tmp_path / "sharded", seed=3, shards=3)
    assert (sharded_path / "model.safetensors.index.json").exists()
    sharded = PlainModel(sharded_path)
    ids = torch.tensor([1, 2, 3, MASK_ID, MASK_ID, 4])
    assert torch.equal(one.logits(ids), sharded.logits(ids))


def test_tied_sdar_loads(tmp_path):
    m = PlainModel(write_tiny_sdar(tmp_path / "tied", tie=True))
    assert m.head is m.embed
    assert m.logits(torch.tensor([1, 2, 3])).shape == (3, VOCAB)


def test_unknown_tensor_names_are_rejected(tmp_path):
    path = write_tiny_llada(tmp_path / "bad")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.transformer.blocks.0.att_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="not understood"):
        PlainModel(path)


def _split_forward(model, ids, mask, cut):
    """forward(ids[:cut]) then forward(ids[cut:], past) with the matching rows of ``mask``."""
    first, kv = model.forward(ids[:cut], torch.arange(cut), mask[:cut, :cut])
    second, kv2 = model.forward(ids[cut:], torch.arange(cut, ids.shape[0]), mask[cut:, :], past=kv)
    return torch.cat([first, second]), kv2


@pytest.mark.parametrize("kind", ["causal", "block_causal"])
def test_kv_cache_forward_equals_full_forward(model, kind):
    ids = torch.tensor([3, 14, 15, 9, 26, 5, MASK_ID, MASK_ID, 35, 8, MASK_ID, 7])
    n = ids.shape[0]
    if kind == "causal":
        mask = torch.tril(torch.ones(n, n, dtype=torch.bool))
        cuts = [1, 5, 11]
    else:
        mask = block_causal_mask(torch.arange(n) // 4)
        cuts = [4, 8]
    full, full_kv = model.forward(ids, torch.arange(n), mask)
    assert torch.equal(full, model.logits(ids, mask))
    for cut in cuts:
        split, kv = _split_forward(model, ids, mask, cut)
        torch.testing.assert_close(split, full, atol=1e-5, rtol=1e-5)
        assert len(kv) == model.num_layers
        for (k, v), (fk, fv) in zip(kv, full_kv):
            assert k.shape == (n, model.num_kv_heads, model.head_dim)
            torch.testing.assert_close(k, fk, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v, fv, atol=1e-5, rtol=1e-5)


def test_dual_cache_style_forward_equals_full_forward(model):
    """Recomputing a block against [prefix | suffix] K/V of the same sequence reproduces the full forward."""
    ids = torch.tensor([3, 14, 15, 9, 26, 5, MASK_ID, MASK_ID, 35, 8, MASK_ID, 7])
    n, bs, be = ids.shape[0], 4, 8
    full, kv = model.forward(ids, torch.arange(n), None)
    past = [(torch.cat((k[:bs], k[be:])), torch.cat((v[:bs], v[be:]))) for k, v in kv]
    block, _ = model.forward(ids[bs:be], torch.arange(bs, be), torch.ones(be - bs, n, dtype=torch.bool), past)
    torch.testing.assert_close(block, full[bs:be], atol=1e-5, rtol=1e-5)


def test_bidirectional_attention_sees_the_future(model):
    ids = torch.tensor([3, 14, 15, 9])
    a = model.logits(ids)
    b = model.logits(torch.tensor([3, 14, 15, 10]))
    assert not torch.allclose(a[0], b[0])  # position 0 depends on position 3 without a mask
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    torch.testing.assert_close(
        model.logits(ids, causal)[:3], model.logits(torch.tensor([3, 14, 15, 10]), causal)[:3]
    )
