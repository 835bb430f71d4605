"""Greedy output is a property of the request alone: the same alone, in a batch of 16 mixed lengths,
after preemption under a tiny KV budget, and when its prompt hits the prefix cache."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from diffulex import SamplingParams
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint
from tests.strategy_cases import CASES, Case

PAGE = {"page_size": 8}


@pytest.fixture(scope="module")
def case_paths(tiny_paths, tmp_path_factory) -> dict[str, Path]:
    """The shared tiny checkpoints plus a Fast-dLLM v2 one (its block is 8 tokens)."""
    v2 = write_tiny_checkpoint("fast_dllm_v2", tmp_path_factory.mktemp("ckpt") / "fast_dllm_v2", seed=5)
    return {**tiny_paths, "fast_dllm_v2": v2}


def prompts_for(llm, count: int, seed: int) -> list[list[int]]:
    spec = llm.engine.spec
    banned = {llm.engine.mask_token_id, *spec.eos_token_ids}
    vocab = [t for t in range(spec.vocab_size) if t not in banned]
    rng = random.Random(seed)
    return [[rng.choice(vocab) for _ in range(rng.randint(3, 21))] for _ in range(count)]


def params_for(case: Case, **extra) -> SamplingParams:
    return SamplingParams(max_tokens=16, ignore_eos=True, **{**case.params, **extra})


# Strategies whose K/V needs grow step by step: a tight page budget must preempt them.
GROWING_KV = {
    "fast_dllm_prefix",
    "block_diffusion",
    "block_diffusion_fused",
    "block_diffusion_dynamic",
    "d2f",
    "multi_bd",
    "fast_dllm_v2",
    "fast_dllm_v2_block_cache",
}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_alone_batched_and_preempted_agree(case: Case, case_paths, make_llm) -> None:
    path = case_paths[case.family]
    solo = make_llm(path, **case.options, **PAGE, enable_prefix_caching=False)
    prompts = prompts_for(solo, 16, seed=sum(map(ord, case.name)))
    params = params_for(case)
    alone = [solo.generate([p], params)[0] for p in prompts]
    batched = make_llm(path, **case.options, **PAGE, enable_prefix_caching=False).generate(prompts, params)
    assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
    assert [o.num_forwards for o in batched] == [o.num_forwards for o in alone]
    assert all(len(o.token_ids) == 16 and o.finish_reason == "length" for o in batched)

    # A KV budget that holds about two requests forces preemption of the cache-using strategies.
    tight = make_llm(path, **case.options, **PAGE, num_kv_pages=8, enable_prefix_caching=False)
    squeezed = tight.generate(prompts, params)
    assert [o.token_ids for o in squeezed] == [o.token_ids for o in alone]
    if case.name in GROWING_KV:
        assert sum(o.num_preemptions for o in squeezed) > 0, "the tight budget should preempt"


@pytest.mark.parametrize(
    "case",
    [c for c in CASES if c.name in ("block_diffusion", "block_diffusion_fused", "multi_bd", "fast_dllm_v2")],
    ids=lambda c: c.name,
)
def test_prefix_cache_hit_gives_identical_output(case: Case, case_paths, make_llm) -> None:
    path = case_paths[case.family]
    shared = list(range(10, 34))  # 24 tokens = three full 8-token pages
    first, second = shared + [40, 41, 42], shared + [50, 51]
    fresh = make_llm(path, **case.options, **PAGE)
    expected = fresh.generate([second], params_for(case))[0]
    assert expected.num_prefix_hit_tokens == 0
    warm = make_llm(path, **case.options, **PAGE)
    warm.generate([first], params_for(case))
    hit = warm.generate([second], params_for(case))[0]
    assert hit.num_prefix_hit_tokens >= 16
    assert hit.token_ids == expected.token_ids


def test_prefix_hit_inside_a_block_is_not_shared(tiny_sdar, make_llm) -> None:
    """Pages of 4 under blocks of 8: prompts sharing 12 tokens share the first block only (the K/V of
    positions 8-11 depend on positions 12-15 of their block), and the output equals a fresh run."""
    options = {"strategy": "block_diffusion", "block_size": 8, "page_size": 4}
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    shared = list(range(10, 22))  # 12 tokens: block 0 and half of block 1
    first, second = shared + [40, 41, 42, 43, 44], shared + [50, 51, 52, 53, 54]
    expected = make_llm(tiny_sdar, **options).generate([second], params)[0]
    warm = make_llm(tiny_sdar, **options)
    warm.generate([first], params)
    hit = warm.generate([second], params)[0]
    assert hit.num_prefix_hit_tokens == 8
    assert hit.token_ids == expected.token_ids
