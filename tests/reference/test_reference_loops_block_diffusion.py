"""Sanity tests of the reference loops themselves (CPU, tiny random checkpoints): block diffusion (SDAR,
Fast-dLLM v2)."""

from __future__ import annotations

import pytest
import torch

from tests.reference import loops as L
from tests.reference.recorder import PROMPT, Recorder
from tests.reference.tiny_plain_ckpt import MASK_ID

# ------------------------------------------------------------------------------------------ SDAR


@pytest.mark.parametrize("prompt", [PROMPT, [5, 6, 7, 8]])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_sdar_forward_count_static(sdar, prompt, steps):
    B, gen = 4, 8
    out, nfe = L.sdar_generate(sdar, prompt, gen, B, steps, "low_confidence_static")
    P = len(prompt)
    num_blocks = -(-(P + gen) // B)
    prefill = 1 if P // B > 0 else 0
    expected = prefill
    for b in range(P // B, num_blocks):
        masks = min(B, (b + 1) * B - P)
        cum, n_steps = 0, 0
        for k in L.sched(B, steps):  # clipped schedule: finishes once the block's masks are used up
            if cum >= masks:
                break
            cum += k
            n_steps += 1
        expected += n_steps + 1  # + the store forward
    assert nfe == expected
    assert len(out) == gen and MASK_ID not in out


def test_sdar_forward_count_full_prompt_blocks(sdar):
    # P multiple of B: prefill + blocks x (steps + 1)
    out, nfe = L.sdar_generate(sdar, [5, 6, 7, 8, 9, 10, 11, 12], 12, 4, 4, "low_confidence_static")
    assert nfe == 1 + 3 * (4 + 1)


def test_sdar_dynamic_with_unreachable_threshold_equals_static(sdar):
    a = L.sdar_generate(sdar, PROMPT, 12, 4, 4, "low_confidence_static")
    b = L.sdar_generate(sdar, PROMPT, 12, 4, 4, "low_confidence_dynamic", threshold=1.01)
    assert a == b


def test_sdar_dynamic_with_zero_threshold_commits_block_at_once(sdar):
    out, nfe = L.sdar_generate(sdar, PROMPT, 12, 4, 4, "low_confidence_dynamic", threshold=-1.0)
    num_blocks = -(-(len(PROMPT) + 12) // 4)
    assert nfe == 1 + (num_blocks - 1) * 2 and MASK_ID not in out


def test_sdar_sequential_left_to_right(sdar):
    rec = Recorder(sdar)
    L.sdar_generate(rec, [5, 6, 7, 8], 8, 4, 2, "sequential")
    # calls: prefill, block1: 2 denoise + store, block2: 2 denoise + store
    assert len(rec.calls) == 7
    block1 = [c["ids"].tolist() for c in rec.calls[1:4]]
    assert block1[0] == [MASK_ID] * 4
    assert block1[1][:2] != [MASK_ID] * 2 and block1[1][2:] == [MASK_ID] * 2
    assert MASK_ID not in block1[2]
    assert rec.calls[1]["past_len"] == 4 and rec.calls[4]["past_len"] == 8


def test_sdar_clip_to_masks(sdar):
    # P = 5, B = 4, steps 1: block 1 holds 1 prompt token + 3 masks, sched = [4]
    P = len(PROMPT)
    rec = Recorder(sdar)
    L.sdar_generate(rec, PROMPT, 3, 4, 1, "low_confidence_static", clip_to_masks=True)
    # calls: prefill, denoise, store
    assert len(rec.calls) == 3
    assert rec.calls[2]["ids"][0].item() == PROMPT[4]  # prompt token kept
    rec = Recorder(sdar)
    L.sdar_generate(rec, PROMPT, 3, 4, 1, "low_confidence_static", clip_to_masks=False)
    x0 = torch.argmax(rec.calls[1]["logits"], dim=-1)
    # §4.7: topk(4) also picks the -inf prompt position and overwrites it with x0
    assert rec.calls[2]["ids"][0].item() == x0[0].item()
    assert rec.calls[2]["positions"][0].item() == P - 1


def test_sdar_stop_token_ids(sdar):
    out, _ = L.sdar_generate(sdar, [5, 6, 7, 8], 12, 4, 4, "low_confidence_static")
    stop = out[0]
    out2, nfe2 = L.sdar_generate(sdar, [5, 6, 7, 8], 12, 4, 4, "low_confidence_static", stop_token_ids=[stop])
    assert out2[:4] == out[:4] and out2[4:] == [MASK_ID] * 8
    assert nfe2 == 1 + 5


# ------------------------------------------------------------------------------------ Fast-dLLM v2
# The loop is model-agnostic (it applies the token shift and passes the masks itself): the tiny SDAR
# model serves. B = 4, S = 2, 8 new tokens asked = 2 blocks.


def _v2_counts(prompt_len: int, gen: int, block: int) -> tuple[int, int, int]:
    """(prefill calls, masks the blocks diffuse, output length) of the official loop without a stop."""
    num_blocks = gen // block
    prefill = 1 if prompt_len >= block else 0
    next_from_prefill = 1 if prefill and prompt_len % block == 0 else 0
    # positions P .. end of the last block; every block but the first starts with a store-forward token
    positions = num_blocks * block - prompt_len % block
    masks = positions - (num_blocks - 1) - next_from_prefill
    return prefill, masks, positions + 1  # + the final store forward's next token


@pytest.mark.parametrize("prompt", [PROMPT, [5, 6, 7, 8], [5, 6, 7]])
def test_fast_dllm_v2_threshold_one_commits_one_token_per_forward(sdar, prompt):
    # Nothing is strictly above 1: each denoise call commits only the most probable mask.
    out, nfe = L.fast_dllm_v2_generate(sdar, prompt, 8, 4, 2, threshold=1.0)
    prefill, masks, length = _v2_counts(len(prompt), 8, 4)
    assert nfe == prefill + masks + 2  # + one store forward per block
    assert len(out) == length and MASK_ID not in out


def test_fast_dllm_v2_negative_threshold_commits_a_sub_block_per_forward(sdar):
    # P = 5: prefill [0, 4); block [4, 8): sub-blocks [4,6) (5 masked) and [6,8); block [8, 12): 8 comes
    # from the store forward, sub-blocks [8,10) and [10,12): one call each, + 2 store forwards.
    out, nfe = L.fast_dllm_v2_generate(sdar, PROMPT, 8, 4, 2, threshold=-1.0)
    assert nfe == 1 + 2 + 1 + 2 + 1 and len(out) == 8 and MASK_ID not in out


def test_fast_dllm_v2_calls_shift_and_next_token(sdar):
    rec = Recorder(sdar)
    out, _ = L.fast_dllm_v2_generate(rec, [5, 6, 7, 8], 8, 4, 2, threshold=1.0)
    prefill, first, *_ = rec.calls
    # P = B: the prompt is prefilled and its last row gives position 4 (the official `P > B` would not)
    assert prefill["ids"].tolist() == [5, 6, 7, 8] and prefill["past_len"] == 0
    assert out[0] == int(torch.argmax(prefill["logits"][-1]))
    # the first denoise call queries the whole block at its absolute positions over the stored prompt
    assert first["ids"].tolist() == [out[0], MASK_ID, MASK_ID, MASK_ID]
    assert first["positions"].tolist() == [4, 5, 6, 7] and first["past_len"] == 4
    # sub-block [4, 6) first: position 5 is read from row 0 (token shift), position 6/7 untouched
    assert out[1] == int(torch.argmax(first["logits"][0]))
    assert rec.calls[2]["ids"].tolist()[2:] == [MASK_ID, MASK_ID]
    # the store forward (block decoded, past = prompt) gives position 8 from its last row
    store = next(c for c in rec.calls if c["past_len"] == 4 and MASK_ID not in c["ids"].tolist())
    assert store["ids"].tolist() == out[:4] and out[4] == int(torch.argmax(store["logits"][-1]))
    assert rec.calls[-1]["past_len"] == 8 and rec.calls[-1]["ids"].tolist() == out[4:8]


def test_fast_dllm_v2_block_cache_queries_the_sub_block_against_the_block(sdar):
    rec = Recorder(sdar)
    out, nfe = L.fast_dllm_v2_generate(rec, PROMPT, 16, 4, 2, threshold=1.0, use_block_cache=True)
    assert MASK_ID not in out and nfe == len(rec.calls)
    sub_calls = [c for c in rec.calls if c["ids"].shape[0] == 2]
    assert sub_calls, "some sub-block calls should use the block cache"
    for call in sub_calls:
        start = int(call["positions"][0])
        block_start = start // 4 * 4
        # keys: the stored blocks + the block outside the sub-block; its first token is decoded
        assert start % 2 == 0 and call["past_len"] == block_start + 4 - 2
        assert int(call["ids"][0]) != MASK_ID
    # every other call is a whole block (prefill, full block calls, store forwards)
    assert all(c["ids"].shape[0] == 4 for c in rec.calls if c["ids"].shape[0] != 2)


def test_fast_dllm_v2_block_cache_of_one_sub_block_is_exact(sdar):
    # S = B: a sub-block call recomputes the whole block over the stored blocks only = the plain call.
    for prompt in (PROMPT, [5, 6, 7]):
        plain = L.fast_dllm_v2_generate(sdar, prompt, 8, 4, 4, threshold=0.2)
        cached = L.fast_dllm_v2_generate(sdar, prompt, 8, 4, 4, threshold=0.2, use_block_cache=True)
        assert cached == plain


def test_fast_dllm_v2_stop_token_ends_like_generate(sdar):
    free, nfe = L.fast_dllm_v2_generate(sdar, PROMPT, 16, 4, 2, threshold=1.0)
    stop = free[3]
    first = free.index(stop)
    out, nfe_stop = L.fast_dllm_v2_generate(sdar, PROMPT, 16, 4, 2, threshold=1.0, stop_token=stop)
    assert out[:first] == free[:first] and out[first] == stop and MASK_ID not in out[:first]
    assert nfe_stop < nfe


def test_fast_dllm_v2_sub_block_must_divide_block(sdar):
    with pytest.raises(ValueError, match="divide"):
        L.fast_dllm_v2_generate(sdar, PROMPT, 8, 4, 3)
