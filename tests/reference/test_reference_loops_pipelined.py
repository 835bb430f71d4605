"""Sanity tests of the reference loops themselves (CPU, tiny random checkpoints): several blocks at once
(D2F, MultiBD)."""

from __future__ import annotations

import pytest

from tests.reference import loops as L
from tests.reference.recorder import PROMPT, Recorder
from tests.reference.tiny_plain_ckpt import EOS_ID, MASK_ID

# ------------------------------------------------------------------------------------------- D2F


def test_d2f_one_token_per_forward(llada):
    out, nfe = L.d2f_generate(llada, PROMPT, 12, 4, 0.0, 1.0, 1.01, True, EOS_ID)
    assert len(out) == 12 and MASK_ID not in out
    assert nfe == 12


def test_d2f_everything_passes(llada):
    out, nfe = L.d2f_generate(llada, PROMPT, 12, 4, 0.0, 0.9, -1.0, False, None)
    assert len(out) == 12 and MASK_ID not in out and nfe == 3


def test_d2f_block_add_threshold_zero_adds_a_block_every_step(llada):
    rec = Recorder(llada)
    L.d2f_generate(rec, PROMPT, 16, 4, 0.0, 0.95, 0.9, False, None)
    lengths = [c["ids"].shape[0] for c in rec.calls]
    P = len(PROMPT)
    assert lengths[:4] == [P + 4, P + 8, P + 12, P + 16]
    assert all(n == P + 16 for n in lengths[4:])


def test_d2f_stop_adding_after_eos(llada):
    out, _ = L.d2f_generate(llada, PROMPT, 12, 4, 0.0, 0.9, -1.0, False, None)
    eos = out[0]
    out2, nfe2 = L.d2f_generate(llada, PROMPT, 12, 4, 0.0, 0.9, -1.0, True, eos)
    assert out2 == out[:4] and nfe2 == 1


def test_d2f_attention_mask_layout(llada):
    rec = Recorder(llada)
    masks = []
    orig = rec.forward

    def spy(ids, positions, attn_mask, past=None):
        masks.append(attn_mask.clone())
        return orig(ids, positions, attn_mask, past)

    rec.forward = spy
    L.d2f_generate(rec, [1, 2, 3], 8, 4, 0.0, 0.9, 0.9, False, None)
    m = masks[1]  # prompt (3) + 2 blocks of 4
    assert m.shape == (11, 11)
    assert m[:3, :3].all() and not m[:3, 3:].any()  # prompt sees only itself
    assert m[3:7, :7].all() and not m[3:7, 7:].any()  # block 1: prompt + itself
    assert m[7:, :].all()  # block 2: everything before + itself


@pytest.mark.parametrize(
    "add,dec,skip", [(0.1, 0.95, 0.2), (0.5, 0.5, 0.15), (1.0, 1.0, 0.3), (0.0, 0.0, 0.1)]
)
def test_d2f_equals_multi_bd_when_prompt_is_one_block(llada, add, dec, skip):
    prompt = [5, 6, 7, 8]  # P == B: both layouts coincide
    a = L.d2f_generate(llada, prompt, 16, 4, add, dec, skip, True, EOS_ID)
    b = L.multi_bd_generate(llada, prompt, 16, 4, 100, add, dec, skip, EOS_ID, True)
    assert a == b


# ---------------------------------------------------------------------------------------- MultiBD


@pytest.mark.parametrize("prompt", [PROMPT, [5, 6, 7, 8], [5, 6, 7]])
def test_multi_bd_one_token_per_forward(sdar, prompt):
    P, B, max_new = len(prompt), 4, 10
    out, nfe = L.multi_bd_generate(sdar, prompt, max_new, B, 2, 0.0, 1.0, 1.01, None, False)
    end_len = -(-(P + max_new) // B) * B
    assert nfe == end_len - P
    assert len(out) == max_new and MASK_ID not in out


@pytest.mark.parametrize("prompt", [PROMPT, [5, 6, 7, 8], [5, 6, 7]])
@pytest.mark.parametrize("thr", [0.1, 0.2, 1.01])
def test_multi_bd_buffer_one_equals_sdar_dynamic(sdar, prompt, thr):
    B, max_new = 4, 10
    a_out, a_nfe = L.sdar_generate(sdar, prompt, max_new, B, B, "low_confidence_dynamic", threshold=thr)
    b_out, b_nfe = L.multi_bd_generate(sdar, prompt, max_new, B, 1, 0.5, 0.9, thr, None, False)
    assert a_out == b_out
    prefill = 1 if len(prompt) >= B else 0
    # With one buffer slot, MultiBD also spends one store-only forward per finished block, except after
    # the last block (nothing left to add); its prompt is stored by its first forward, not a prefill.
    assert a_nfe == b_nfe + prefill + 1


@pytest.mark.parametrize("buffer_size", [1, 2, 3])
def test_multi_bd_respects_buffer(sdar, buffer_size):
    rec = Recorder(sdar)
    B = 4
    out, nfe = L.multi_bd_generate(rec, PROMPT, 16, B, buffer_size, 0.0, 0.5, 0.15, None, False)
    assert MASK_ID not in out and len(out) == 16
    for call in rec.calls:
        ids = call["ids"].tolist()
        n_blocks = len(ids) // B
        # a store-only forward (every buffered block decoded) has no open block
        first_open = next((b for b in range(n_blocks) if MASK_ID in ids[b * B : (b + 1) * B]), n_blocks)
        assert n_blocks - first_open <= buffer_size
    assert max(c["ids"].shape[0] for c in rec.calls) == -(-(len(PROMPT) + 16) // B) * B


def test_multi_bd_stop_adding_after_eos(sdar):
    out, _ = L.multi_bd_generate(sdar, [5, 6, 7, 8], 12, 4, 3, 0.0, 0.9, -1.0, None, False)
    eos = out[0]
    out2, nfe2 = L.multi_bd_generate(sdar, [5, 6, 7, 8], 12, 4, 3, 0.0, 0.9, -1.0, eos, True)
    assert out2 == out[:4] and nfe2 == 1
