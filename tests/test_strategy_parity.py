"""Each strategy's greedy output and forward count equal a plain re-implementation of its published loop
(tests/reference/loops/: full forwards, no engine code), on tiny random checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from diffulex import SamplingParams
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint
from tests.reference import loops
from tests.reference.plain_models import PlainModel

PROMPTS = [[17, 5, 42], [8, 9, 10, 11, 12, 13, 14, 15], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 50]]


class NoMaskPrediction:
    """The engine never predicts the mask token (its logit is −inf); give the reference the same rule.

    A large finite value instead of −inf keeps CFG's ``uncond + s·(cond − uncond)`` finite."""

    def __init__(self, model: PlainModel):
        self._model = model

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def _suppress(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., self._model.mask_token_id] = -1e9
        return logits

    def logits(self, *args, **kwargs) -> torch.Tensor:
        return self._suppress(self._model.logits(*args, **kwargs))

    def forward(self, *args, **kwargs):
        logits, kv = self._model.forward(*args, **kwargs)
        return self._suppress(logits), kv


@pytest.fixture(scope="module")
def plain(tiny_paths) -> dict[str, NoMaskPrediction]:
    families = ("llada", "sdar", "dream")  # the families PlainModel implements
    return {family: NoMaskPrediction(PlainModel(Path(tiny_paths[family]))) for family in families}


class EngineBlockCausalLogits:
    """``logits(ids, attn_mask)`` from the engine's cache-free ``LLM.forward_logits`` (block-causal over
    absolute blocks of ``block_size``); the mask a loop passes must be exactly that mask. The model itself
    is tested in tests/test_llada2.py; this adapter serves the parity of the decoding loop only."""

    def __init__(self, llm, block_size: int):
        self._llm = llm
        self._block_size = block_size
        self.mask_token_id = llm.engine.mask_token_id

    def logits(self, ids: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        assert torch.equal(attn_mask, loops.block_causal_mask_abs(ids.shape[0], self._block_size))
        logits = self._llm.forward_logits(ids.tolist(), attention="block_causal", block_size=self._block_size)
        logits = logits.clone()
        logits[..., self.mask_token_id] = -1e9  # the engine never predicts the mask (NoMaskPrediction)
        return logits


def run_engine(make_llm, path, options: dict, params: SamplingParams) -> list[tuple[list[int], int]]:
    llm = make_llm(path, page_size=8, enable_prefix_caching=False, **options)
    return [(o.token_ids, o.num_forwards) for o in llm.generate(PROMPTS, params)]


@pytest.mark.parametrize(("steps", "block", "cfg"), [(16, 16, 0.0), (8, 8, 0.0), (16, 4, 0.0), (8, 8, 1.5)])
def test_vanilla_llada_equals_ml_gsai_generate(steps, block, cfg, tiny_paths, plain, make_llm) -> None:
    got = run_engine(
        make_llm,
        tiny_paths["llada"],
        {"strategy": "vanilla", "block_size": block},
        SamplingParams(max_tokens=16, steps=steps, cfg_scale=cfg, ignore_eos=True),
    )
    expected = [loops.llada_generate(plain["llada"], p, steps, 16, block, cfg_scale=cfg) for p in PROMPTS]
    assert got == [(list(t), n) for t, n in expected]


@pytest.mark.parametrize("threshold", [0.2, 0.6, 0.95])
def test_vanilla_threshold_equals_fast_dllm_no_cache(threshold, tiny_paths, plain, make_llm) -> None:
    got = run_engine(
        make_llm,
        tiny_paths["llada"],
        {"strategy": "vanilla", "block_size": 8},
        SamplingParams(max_tokens=16, threshold=threshold, ignore_eos=True),
    )
    expected = [
        loops.fast_dllm_generate(plain["llada"], p, 16, 16, 8, threshold=threshold, cache="none")
        for p in PROMPTS
    ]
    assert got == [(list(t), n) for t, n in expected]


@pytest.mark.parametrize(
    ("policy", "alg"), [("probability", "maskgit_plus"), ("margin", "topk_margin"), ("entropy", "entropy")]
)
@pytest.mark.parametrize("steps", [16, 8])
def test_vanilla_dream_schedule_equals_diffusion_generate(
    policy, alg, steps, tiny_paths, plain, make_llm
) -> None:
    got = run_engine(
        make_llm,
        tiny_paths["llada"],
        {"strategy": "vanilla", "block_size": 8, "vanilla_schedule": "dream"},
        SamplingParams(max_tokens=16, steps=steps, unmask_policy=policy, ignore_eos=True),
    )
    expected = [loops.dream_generate(plain["llada"], p, steps, 16, alg=alg) for p in PROMPTS]
    assert got == [(list(t), n) for t, n in expected]


@pytest.mark.parametrize(
    ("policy", "alg"), [("probability", "maskgit_plus"), ("margin", "topk_margin"), ("entropy", "entropy")]
)
@pytest.mark.parametrize("steps", [16, 8])
def test_vanilla_on_dream_equals_shifted_diffusion_generate(
    policy, alg, steps, tiny_paths, plain, make_llm
) -> None:
    """The family default on a Dream checkpoint (vanilla, Dream schedule, shifted logits: position j read
    from hidden j-1) equals Dream's ``diffusion_generate`` with the shift, token for token and in forwards."""
    got = run_engine(
        make_llm,
        tiny_paths["dream"],
        {},  # nothing named: the spec's defaults (vanilla, block 32, schedule "dream", shift_logits)
        SamplingParams(max_tokens=16, steps=steps, unmask_policy=policy, ignore_eos=True),
    )
    expected = [
        loops.dream_generate(plain["dream"], p, steps, 16, alg=alg, shift_logits=True) for p in PROMPTS
    ]
    assert got == [(list(t), n) for t, n in expected]
    # The shift matters on this checkpoint: the unshifted loop decodes something else.
    unshifted = [loops.dream_generate(plain["dream"], p, steps, 16, alg=alg) for p in PROMPTS]
    assert [list(t) for t, _ in unshifted] != [t for t, _ in got]


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize(("threshold", "steps"), [(None, 8), (None, 16), (0.3, None), (0.8, None)])
def test_fast_dllm_equals_reference_cache_loop(cache, threshold, steps, tiny_paths, plain, make_llm) -> None:
    got = run_engine(
        make_llm,
        tiny_paths["llada"],
        {"strategy": "fast_dllm", "block_size": 8, "cache_mode": cache},
        SamplingParams(max_tokens=16, steps=steps, threshold=threshold, ignore_eos=True),
    )
    expected = [
        loops.fast_dllm_generate(plain["llada"], p, steps or 16, 16, 8, threshold=threshold, cache=cache)
        for p in PROMPTS
    ]
    assert got == [(list(t), n) for t, n in expected]


@pytest.mark.parametrize(
    ("remasking", "threshold"), [("static", None), ("dynamic", 0.3), ("dynamic", 0.7), ("sequential", None)]
)
@pytest.mark.parametrize("block", [4, 8])
def test_block_diffusion_equals_sdar_generate(
    remasking, threshold, block, tiny_paths, plain, make_llm
) -> None:
    got = run_engine(
        make_llm,
        tiny_paths["sdar"],
        {"strategy": "block_diffusion", "block_size": block, "remasking": remasking},
        SamplingParams(max_tokens=16, threshold=threshold, ignore_eos=True),
    )
    names = {
        "static": "low_confidence_static",
        "dynamic": "low_confidence_dynamic",
        "sequential": "sequential",
    }
    expected = [
        loops.sdar_generate(plain["sdar"], p, 16, block, block, names[remasking], threshold=threshold or 0.9)
        for p in PROMPTS
    ]
    assert got == [(list(t), n) for t, n in expected]


@pytest.mark.parametrize(
    ("add", "complete", "accept"), [(0.5, 0.75, 0.3), (0.0, 0.95, 0.9), (0.25, 0.5, 0.6)]
)
def test_d2f_equals_reference_pipeline(add, complete, accept, tiny_paths, plain, make_llm) -> None:
    got = run_engine(
        make_llm,
        tiny_paths["llada"],
        {"strategy": "d2f", "block_size": 4, "block_add_threshold": add, "decoded_token_threshold": complete},
        SamplingParams(max_tokens=16, threshold=accept, ignore_eos=True),
    )
    expected = [
        loops.d2f_generate(plain["llada"], p, 16, 4, add, complete, accept, stop_adding_after_eos=False)
        for p in PROMPTS
    ]
    assert got == [(list(t), n) for t, n in expected]


@pytest.mark.parametrize("buffer", [1, 2, 3])
@pytest.mark.parametrize(("add", "complete", "accept"), [(0.25, 0.75, 0.3), (0.0, 0.95, 0.9)])
def test_multi_bd_equals_reference_pipeline(
    buffer, add, complete, accept, tiny_paths, plain, make_llm
) -> None:
    got = run_engine(
        make_llm,
        tiny_paths["sdar"],
        {
            "strategy": "multi_bd",
            "block_size": 4,
            "buffer_size": buffer,
            "block_add_threshold": add,
            "decoded_token_threshold": complete,
        },
        SamplingParams(max_tokens=16, threshold=accept, ignore_eos=True),
    )
    expected = [
        loops.multi_bd_generate(plain["sdar"], p, 16, 4, buffer, add, complete, accept, None, False)
        for p in PROMPTS
    ]
    assert got == [(list(t), n) for t, n in expected]


@pytest.mark.parametrize(("remasking", "threshold"), [("static", None), ("dynamic", 0.5)])
@pytest.mark.parametrize("block", [4, 8])
def test_block_diffusion_fused_store_same_tokens_fewer_forwards(
    remasking, threshold, block, tiny_paths, plain, make_llm
) -> None:
    got = run_engine(
        make_llm,
        tiny_paths["sdar"],
        {
            "strategy": "block_diffusion",
            "block_size": block,
            "remasking": remasking,
            "fuse_block_store": True,
        },
        SamplingParams(max_tokens=16, threshold=threshold, ignore_eos=True),
    )
    names = {"static": "low_confidence_static", "dynamic": "low_confidence_dynamic"}
    for prompt, (tokens, forwards) in zip(PROMPTS, got):
        expected, nfe = loops.sdar_generate(
            plain["sdar"], prompt, 16, block, block, names[remasking], threshold=threshold or 0.9
        )
        num_blocks = -(-(len(prompt) + 16) // block) - len(prompt) // block
        prefill = 1 if len(prompt) >= block else 0
        assert tokens == list(expected)
        # No store forward per block, and the prefill rides on the first block's first forward.
        assert forwards == nfe - num_blocks - prefill


@pytest.mark.parametrize("per_block_steps", [None, 2])
@pytest.mark.parametrize("threshold", [0.3, 0.8])
@pytest.mark.parametrize("block", [4, 8])
def test_block_diffusion_fused_dynamic_equals_llada2_generate(
    per_block_steps, threshold, block, tiny_paths, make_llm
) -> None:
    """block_diffusion + fuse_block_store + dynamic == LLaDA2-MoE ``generate`` (§5, greedy, no eos exits):
    no store or prefill forwards. Diffulex's per-block steps (``steps // num_blocks``; B when steps is
    None) are set equal to LLaDA2's per-block ``steps``; minimal_topk=1 and gen = 16 >= steps, so
    LLaDA2's ``min(steps, gen // minimal_topk)`` does not bite."""
    llm = make_llm(
        tiny_paths["llada2_moe"],
        page_size=8,
        enable_prefix_caching=False,
        strategy="block_diffusion",
        block_size=block,
        remasking="dynamic",
        fuse_block_store=True,
    )
    steps = per_block_steps or block

    def engine_steps(prompt: list[int]) -> int | None:
        num_blocks = -(-(len(prompt) + 16) // block) - len(prompt) // block
        return None if per_block_steps is None else per_block_steps * num_blocks

    params = [
        SamplingParams(max_tokens=16, threshold=threshold, steps=engine_steps(p), ignore_eos=True)
        for p in PROMPTS
    ]
    got = [(o.token_ids, o.num_forwards) for o in llm.generate(PROMPTS, params)]
    model = EngineBlockCausalLogits(llm, block)
    expected = [loops.llada2_generate(model, p, 16, block, steps, threshold) for p in PROMPTS]
    assert got == [(list(t), n) for t, n in expected]


# ------------------------------------------------------------------------------------ Fast-dLLM v2


@pytest.fixture(scope="module")
def fast_dllm_v2(tmp_path_factory) -> tuple[Path, NoMaskPrediction]:
    """A tiny Fast-dLLM v2 checkpoint (bd_size 8) and its plain reference model.

    Fast-dLLM v2's tensors are Qwen2.5's, exactly Dream's, and its loop passes the attention mask and
    applies the token shift itself; so the plain Dream forward is its forward. The reference reads the
    same weights through a copy of config.json that names Dream."""
    root = tmp_path_factory.mktemp("fast_dllm_v2")
    path = write_tiny_checkpoint("fast_dllm_v2", root / "ckpt", seed=5)
    view = root / "as_dream"
    view.mkdir()
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="Dream", architectures=["DreamModel"])
    (view / "config.json").write_text(json.dumps(config))
    shutil.copy(path / "model.safetensors", view / "model.safetensors")
    return path, NoMaskPrediction(PlainModel(view))


def v2_reference(plain, small_block: int, threshold: float, block_cache: bool) -> list[tuple[list[int], int]]:
    """The official loop for every prompt: 16 new tokens asked (2 blocks of 8), greedy, no stop token."""
    return [
        loops.fast_dllm_v2_generate(plain, p, 16, 8, small_block, threshold, block_cache) for p in PROMPTS
    ]


def v2_params(expected: list[tuple[list[int], int]], **extra) -> list[SamplingParams]:
    """max_tokens = what the official loop returned (its blocks plus the final store forward's token)."""
    return [SamplingParams(max_tokens=len(tokens), ignore_eos=True, **extra) for tokens, _ in expected]


@pytest.mark.parametrize(
    ("small_block", "block_cache", "threshold"),
    [(2, False, 0.3), (4, False, 0.05), (4, False, 1.0), (2, True, 0.3), (4, True, 0.3), (2, True, 1.0)],
)
def test_fast_dllm_v2_equals_official_loop(
    small_block, block_cache, threshold, fast_dllm_v2, make_llm
) -> None:
    """Prompts of 3, 8 (= one block: prefill + next token) and 13 tokens, decoded in one batch."""
    path, plain = fast_dllm_v2
    expected = v2_reference(plain, small_block, threshold, block_cache)
    llm = make_llm(
        path,
        page_size=8,
        enable_prefix_caching=False,
        strategy="fast_dllm_v2",
        small_block_size=small_block,
        use_block_cache=block_cache,
    )
    got = [
        (o.token_ids, o.num_forwards) for o in llm.generate(PROMPTS, v2_params(expected, threshold=threshold))
    ]
    assert got == [(list(t), n) for t, n in expected]
    if block_cache and threshold == 0.3:  # the block cache is approximate: here it changes the output
        assert expected != v2_reference(plain, small_block, threshold, False)


def test_fast_dllm_v2_is_the_family_default(fast_dllm_v2, make_llm) -> None:
    """Nothing named: strategy fast_dllm_v2, block = bd_size (8), sub-block 8, threshold 0.9."""
    path, plain = fast_dllm_v2
    llm = make_llm(path)
    assert llm.engine.strategy_name == "fast_dllm_v2" and llm.engine.block_size == 8
    expected = v2_reference(plain, 8, 0.9, False)
    got = [(o.token_ids, o.num_forwards) for o in llm.generate(PROMPTS, v2_params(expected))]
    assert got == [(list(t), n) for t, n in expected]


@pytest.mark.parametrize("block_cache", [False, True])
def test_fast_dllm_v2_stops_like_generate(block_cache, fast_dllm_v2, make_llm) -> None:
    """A stop id ends the request where the checkpoint's ``generate`` stops: same tokens before it, same
    forwards (the stop id is a token the loop decodes mid-block, taken from an unstopped run)."""
    path, plain = fast_dllm_v2
    prompt = PROMPTS[2]
    free, _ = loops.fast_dllm_v2_generate(plain, prompt, 16, 8, 2, 0.3, block_cache)
    stop = free[5]
    stopped, nfe = loops.fast_dllm_v2_generate(plain, prompt, 16, 8, 2, 0.3, block_cache, stop_token=stop)
    assert nfe < len(free)  # it did stop early
    llm = make_llm(
        path, page_size=8, strategy="fast_dllm_v2", small_block_size=2, use_block_cache=block_cache
    )
    params = SamplingParams(max_tokens=len(free), threshold=0.3, stop_token_ids=[stop], ignore_eos=True)
    out = llm.generate([prompt], params)[0]
    assert out.finish_reason == "stop"
    assert (out.token_ids, out.num_forwards) == (stopped[: stopped.index(stop)], nfe)
