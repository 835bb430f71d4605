"""Sanity tests of the reference loops themselves (CPU, tiny random checkpoints): the shared helpers and
the loops over bidirectional models (LLaDA, Dream, Fast-dLLM)."""

from __future__ import annotations

import pytest
import torch

from tests.reference import loops as L
from tests.reference.recorder import PROMPT, Recorder
from tests.reference.tiny_plain_ckpt import MASK_ID

# -------------------------------------------------------------------------------------- helpers


def test_sched_and_topk_tie_rule():
    assert L.sched(10, 4) == [3, 3, 2, 2]
    assert L.sched(3, 5) == [1, 1, 1, 0, 0]
    assert sum(L.sched(37, 6)) == 37
    conf = torch.tensor([0.5, 0.9, 0.5, float("-inf"), 0.9, float("-inf")])
    assert L.topk_positions(conf, 6) == [1, 4, 0, 2, 3, 5]


def _simulate_dream_schedule(n: int, steps: int) -> list[int]:
    out = []
    for i in range(steps):
        k = L.dream_num_transfer(n, i, steps)
        out.append(k)
        n -= k
    return out


def test_dream_schedule_examples():
    # ALGORITHMS.md §3 _sample rule 3
    assert _simulate_dream_schedule(16, 16) == [0] + [1] * 14 + [2]
    assert _simulate_dream_schedule(16, 8) == [1, 2, 2, 2, 2, 2, 2, 3]


def _commits_per_call(rec: Recorder, mask_id: int) -> list[int]:
    """Tokens unmasked between successive full-sequence calls (same window)."""
    masks = [int((c["ids"] == mask_id).sum()) for c in rec.calls]
    return [a - b for a, b in zip(masks, masks[1:])]


# ----------------------------------------------------------------------------------------- LLaDA


@pytest.mark.parametrize("steps,gen,block", [(8, 8, 4), (4, 8, 8), (12, 12, 4), (6, 8, 4)])
def test_llada_forwards_schedule_and_no_mask_left(llada, steps, gen, block):
    rec = Recorder(llada)
    out, nfe = L.llada_generate(rec, PROMPT, steps, gen, block)
    assert nfe == steps == len(rec.calls)
    assert len(out) == gen and MASK_ID not in out
    s = steps // (gen // block)
    expected = []
    for _ in range(gen // block):
        expected += L.sched(block, s)
    # commits of step i are visible in the input of call i+1 (the last step's commits in the output)
    commits = _commits_per_call(rec, MASK_ID) + [int((rec.calls[-1]["ids"] == MASK_ID).sum())]
    assert commits == expected
    # blocks are done left to right: at the start of block b, earlier blocks have no masks
    for b in range(gen // block):
        ids = rec.calls[b * s]["ids"]
        assert MASK_ID not in ids[: len(PROMPT) + b * block].tolist()


def test_llada_cfg_counts_two_calls_per_step(llada):
    out0, nfe0 = L.llada_generate(llada, PROMPT, 8, 8, 4)
    out1, nfe1 = L.llada_generate(llada, PROMPT, 8, 8, 4, cfg_scale=0.0)
    assert (out0, nfe0) == (out1, nfe1)
    rec = Recorder(llada)
    out, nfe = L.llada_generate(rec, PROMPT, 8, 8, 4, cfg_scale=1.5)
    assert nfe == 16 == len(rec.calls) and MASK_ID not in out
    # every second call is the unconditional copy: prompt positions masked
    assert rec.calls[1]["ids"][: len(PROMPT)].tolist() == [MASK_ID] * len(PROMPT)


def test_llada_random_remasking_runs(llada):
    out, nfe = L.llada_generate(
        llada, PROMPT, 8, 8, 4, remasking="random", generator=torch.Generator().manual_seed(0)
    )
    assert nfe == 8 and MASK_ID not in out


# ----------------------------------------------------------------------------------------- Dream


@pytest.mark.parametrize("alg", ["maskgit_plus", "topk_margin", "entropy"])
@pytest.mark.parametrize("shift", [False, True])
def test_dream_forwards_and_schedule(llada, alg, shift):
    rec = Recorder(llada)
    out, nfe = L.dream_generate(rec, PROMPT, 8, 16, alg=alg, shift_logits=shift)
    assert nfe == 8 == len(rec.calls)
    assert len(out) == 16 and MASK_ID not in out
    commits = _commits_per_call(rec, MASK_ID) + [int((rec.calls[-1]["ids"] == MASK_ID).sum())]
    assert commits == [1, 2, 2, 2, 2, 2, 2, 3]


# -------------------------------------------------------------------------------------- Fast-dLLM


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_fast_dllm_threshold_above_one_commits_one_token_per_forward(llada, cache):
    rec = Recorder(llada)
    out, nfe = L.fast_dllm_generate(rec, PROMPT, 12, 12, 4, threshold=1.01, cache=cache)
    assert nfe == 12 == len(rec.calls)
    assert MASK_ID not in out
    if cache == "none":
        assert _commits_per_call(rec, MASK_ID) == [1] * 11


@pytest.mark.parametrize("cache,per_block", [("none", 1), ("prefix", 2), ("dual", 2)])
def test_fast_dllm_threshold_zero_commits_the_block_at_once(llada, cache, per_block):
    # threshold 0: every masked rank is kept; prefix/dual still pay the (empty) loop forward
    out, nfe = L.fast_dllm_generate(llada, PROMPT, 6, 12, 4, threshold=0.0, cache=cache)
    assert nfe == 3 * per_block and MASK_ID not in out


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("steps", [6, 12, 24])
def test_fast_dllm_schedule_nfe(llada, cache, steps):
    out, nfe = L.fast_dllm_generate(llada, PROMPT, steps, 12, 4, cache=cache)
    s = steps // 3
    assert nfe == 3 * min(s, 4) and MASK_ID not in out


def test_fast_dllm_prefix_cache_needs_two_steps(llada):
    with pytest.raises(IndexError):
        L.fast_dllm_generate(llada, PROMPT, 3, 12, 4, cache="prefix")


def test_fast_dllm_single_block_caches(llada):
    """block_length == gen_length: prefix == dual, and their first step equals the no-cache first step."""
    results = {}
    recs = {}
    for cache in ("none", "prefix", "dual"):
        recs[cache] = Recorder(llada)
        results[cache] = L.fast_dllm_generate(recs[cache], PROMPT, 8, 8, 8, cache=cache)
    assert results["prefix"] == results["dual"]
    P = len(PROMPT)
    after_first = recs["none"].calls[1]["ids"][P:]
    assert torch.equal(recs["prefix"].calls[1]["ids"], after_first)  # prefix input = x[block_start:]
    assert torch.equal(recs["dual"].calls[1]["ids"], after_first)
    # first forward identical in all modes
    for cache in ("prefix", "dual"):
        torch.testing.assert_close(recs[cache].calls[0]["logits"], recs["none"].calls[0]["logits"])
    # cached calls: prefix queries start at the block, past = prompt K/V
    assert recs["prefix"].calls[1]["past_len"] == P and recs["prefix"].calls[1]["positions"][0] == P


def test_fast_dllm_prefix_queries_future_blocks(llada):
    rec = Recorder(llada)
    L.fast_dllm_generate(rec, PROMPT, 6, 12, 4, cache="prefix")
    P = len(PROMPT)
    # second call of block 0: x[P:] (12 tokens) over the P-token prefix; dual would send only 4
    assert rec.calls[1]["ids"].shape[0] == 12 and rec.calls[1]["past_len"] == P
    rec = Recorder(llada)
    L.fast_dllm_generate(rec, PROMPT, 6, 12, 4, cache="dual")
    assert rec.calls[1]["ids"].shape[0] == 4 and rec.calls[1]["past_len"] == P + 12 - 4
