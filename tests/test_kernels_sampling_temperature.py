"""Fused temperature sampling (kernels/sampling.py) against its torch reference fed with the same noise.

The kernel draws its Gumbel noise with ``tl.rand`` (Philox); ``kernels/philox.py`` reproduces that
stream bit for bit in torch, so ``sample_confidence_reference`` can be given the kernel's own uniforms
and the kernel's ids must then equal the reference's exactly. Kernel launches run interpreted in one
child process per module (``tests/interpreter.py``); GPU tests live in ``test_kernels_sampling.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffulex.kernels.philox import philox_uniform, philox_words
from diffulex.kernels.sampling import (
    SAMPLE_POLICIES,
    greedy_confidence_reference,
    sample_confidence_reference,
    sample_confidence_triton,
    sampling_noise,
)

from diffulex.engine.model_runner import ModelRunner
from diffulex.sampling.confidence import sample_tokens
from diffulex.step import SampleSpec, step_seed
from tests.interpreter import run_interpreted

INF = float("inf")

_CHILD = """
import sys
import torch
import triton
import triton.language as tl
from diffulex.kernels.sampling import _noise_uniforms, sample_confidence_triton

@triton.jit
def noise_kernel(out_ptr, seeds_ptr, streams_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    u = _noise_uniforms(tl.load(seeds_ptr + row), tl.load(streams_ptr + row), offs)
    tl.store(out_ptr + row * V + offs, u, mask=offs < V)

def runner_sample(case):
    # ModelRunner._sample on CPU logits, its fused gate shown CUDA logits (the kernels run interpreted).
    from types import SimpleNamespace
    from diffulex.engine.model_runner import ModelRunner
    from diffulex.step import SampleSpec, SequencePlan, StepPlan

    runner = ModelRunner.__new__(ModelRunner)
    runner.config = SimpleNamespace(fused_sampling=True)
    gate = ModelRunner._fused
    runner._fused = lambda logits, spec, sampling: gate(runner, SimpleNamespace(is_cuda=True), spec, sampling)
    seqs = [
        SequencePlan(
            request_id=str(k), token_ids=[0] * s["rows"], positions=list(range(s["rows"])),
            block_ids=[0] * s["rows"], sample_indices=list(range(s["rows"])),
            sample=SampleSpec(**s["spec"]), step_index=s["step"],
        )
        for k, s in enumerate(case["seqs"])
    ]
    plan = StepPlan.pack(seqs, [[0]] * len(seqs), page_size=16)
    out = runner._sample(plan, case["logits"], case["mask"])
    return [(torch.from_numpy(o.token_ids), torch.from_numpy(o.confidences)) for o in out.sequences]

cases = torch.load(sys.argv[1])
out = {}
for name, case in cases.items():
    if name.startswith("runner"):
        out[name] = runner_sample(case)
        continue
    if name == "noise":
        u = torch.full((case["seeds"].shape[0], case["vocab"]), -1.0)
        noise_kernel[(u.shape[0],)](u, case["seeds"], case["streams"], case["vocab"], BLOCK=512)
        out[name] = u
        continue
    out[name] = sample_confidence_triton(
        case["logits"], case["mask"], case["policy"], case["temps"], case["seeds"], case["streams"],
        block_v=case["block_v"],
    )
torch.save(out, sys.argv[2])
"""

TEMPS = [1.0, 0.5, 2.0, 0.0, 1.0, 0.1, 5.0, 1.0]  # row 3 is greedy (temperature 0)


def _mask_id(vocab: int) -> int:
    return vocab - 3


def _logits(vocab: int, seed: int) -> torch.Tensor:
    """8 rows: random ones plus the awkward ones (the mask as the max, −inf runs, two finite logits)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(TEMPS), vocab, generator=g) * 3
    x[1, _mask_id(vocab)] = 60.0  # the mask dwarfs everything at temperature 0.5: never drawn
    x[2, : vocab // 2] = -INF  # −inf entries, whole first tiles included, at temperature 2
    x[2, ::3] = -INF
    x[4] = -INF  # only two finite (equal) logits: the draw must be one of them
    x[4, [vocab - 5, vocab - 2]] = 1.0
    x[6, _mask_id(vocab)] = 1e4  # the mask at temperature 5
    return x


def _row_streams(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    seeds = torch.randint(0, 1 << 47, (len(TEMPS),), generator=g)
    seeds[0] = 0
    seeds[5] = (1 << 47) - 1
    streams = torch.tensor([0, 1, 2, 3, 4, 5, 6, (1 << 31) + 5])
    return seeds, streams


def _case(logits: torch.Tensor, policy: str, block_v: int | None, seed: int, **extra) -> dict:
    seeds, streams = _row_streams(seed)
    case = dict(
        logits=logits,
        mask=_mask_id(logits.shape[1]),
        policy=policy,
        temps=torch.tensor(TEMPS, dtype=torch.float32),
        seeds=seeds,
        streams=streams,
        block_v=block_v,
    )
    case.update(extra)
    return case


def _build_cases() -> dict[str, dict]:
    cases: dict[str, dict] = {}
    for vocab, block_v in ((37, 16), (300, 64), (300, None), (1000, 256)):
        x = _logits(vocab, vocab)
        for policy in SAMPLE_POLICIES:
            cases[f"V{vocab}-B{block_v}-{policy}"] = _case(x, policy, block_v, vocab + 1)
    cases["bf16-V300-probability"] = _case(_logits(300, 5).bfloat16(), "probability", 64, 6)
    # The same rows in another order, with another tile size, and one row alone: the same draws.
    base = cases["V300-B64-probability"]
    order = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    cases["permuted-B128"] = dict(
        base,
        logits=base["logits"][order],
        temps=base["temps"][order],
        seeds=base["seeds"][order],
        streams=base["streams"][order],
        block_v=128,
    )
    cases["row7-alone"] = dict(
        base,
        logits=base["logits"][7:],
        temps=base["temps"][7:],
        seeds=base["seeds"][7:],
        streams=base["streams"][7:],
        block_v=None,
    )
    # A flat distribution: the ids are decided by the noise alone.
    flat = torch.zeros(len(TEMPS), 1000)
    for label, seed in (("a", 11), ("a-again", 11), ("b", 12)):
        cases[f"flat-{label}"] = dict(
            _case(flat, "probability", 256, 0),
            temps=torch.ones(len(TEMPS)),
            seeds=torch.full((len(TEMPS),), seed),
            streams=torch.arange(len(TEMPS)),
        )
    seeds, streams = _row_streams(99)
    seeds[3] = -5  # read as a 64-bit pattern by both
    cases["noise"] = dict(seeds=seeds, streams=streams, vocab=300)
    cases.update(_runner_cases())
    return cases


# The runner's sequences: name → (spec, step index, sampled rows). "d" has top-k, so it keeps the torch path.
RUNNER_SEQS = {
    "a": (dict(temperature=0.8, seed=1), 3, 4),
    "b": (dict(temperature=0.0), 0, 3),
    "c": (dict(temperature=1.5, policy="random", seed=2), 0, 2),
    "d": (dict(temperature=0.5, top_k=5, seed=3), 1, 3),
    "e": (dict(temperature=1.2, seed=4), 7, 2),
}
RUNNER_BATCHES = {"runner-all": "abcde", "runner-a": "a", "runner-ea": "ea"}
RUNNER_VOCAB = 200


def _runner_logits(name: str) -> torch.Tensor:
    """The logits of one sequence, the same in every batch it joins."""
    g = torch.Generator().manual_seed(ord(name))
    return torch.randn(RUNNER_SEQS[name][2], RUNNER_VOCAB, generator=g) * 3


def _runner_cases() -> dict[str, dict]:
    cases = {}
    for case_name, names in RUNNER_BATCHES.items():
        seqs = [dict(spec=RUNNER_SEQS[n][0], step=RUNNER_SEQS[n][1], rows=RUNNER_SEQS[n][2]) for n in names]
        logits = torch.cat([_runner_logits(n) for n in names])
        cases[case_name] = dict(seqs=seqs, logits=logits, mask=_mask_id(RUNNER_VOCAB))
    return cases


CASES = _build_cases()


@pytest.fixture(scope="module")
def kernel_out(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return run_interpreted(_CHILD, CASES, tmp_path_factory.mktemp("sampling_temperature"))


def _reference(case: dict) -> tuple[torch.Tensor, torch.Tensor]:
    uniforms, random_conf = sampling_noise(case["seeds"], case["streams"], case["logits"].shape[1])
    return sample_confidence_reference(
        case["logits"], case["mask"], case["policy"], case["temps"], uniforms, random_conf
    )


def test_philox_known_answer() -> None:
    """Random123's Philox-4x32-10 test vector (counter 0, key 0) for the first output word."""
    assert philox_words(0, torch.zeros(1, dtype=torch.int64)).item() == 0x6627E8D5


def test_noise_twin_equals_tl_rand(kernel_out: dict) -> None:
    case = CASES["noise"]
    uniforms, _ = sampling_noise(case["seeds"], case["streams"], case["vocab"])
    assert torch.equal(kernel_out["noise"], uniforms)  # bit for bit
    assert float(uniforms.min()) >= 0.0 and float(uniforms.max()) < 1.0


@pytest.mark.parametrize("name", [n for n in CASES if n != "noise" and not n.startswith(("flat", "runner"))])
def test_kernel_matches_reference_with_same_noise(name: str, kernel_out: dict) -> None:
    case = CASES[name]
    ids, conf = kernel_out[name]
    assert ids.dtype == torch.int64 and conf.dtype == torch.float64
    ref_ids, ref_conf = _reference(case)
    assert torch.equal(ids, ref_ids)
    assert not bool((ids == case["mask"]).any())
    scale = None
    if case["policy"] == "margin":  # p1 − p2 compared relative to p1, the operands' size
        scale = greedy_confidence_reference(case["logits"], case["mask"], "probability")[1]
    bound = ref_conf.abs() if scale is None else torch.maximum(ref_conf.abs(), scale)
    tolerance = 1e-6 if case["logits"].dtype == torch.float32 else 1e-5
    assert bool(((conf - ref_conf).abs() <= tolerance * bound + 1e-12).all()), (conf, ref_conf)


@pytest.mark.parametrize("vocab", [37, 300, 1000])
def test_special_rows(vocab: int, kernel_out: dict) -> None:
    """Temperature 0 is greedy; a row with two finite logits draws one of them; −inf is never drawn."""
    for policy in ("probability", "margin", "entropy"):
        for name, case in CASES.items():
            if not name.startswith(f"V{vocab}-") or case["policy"] != policy:
                continue
            ids, _ = kernel_out[name]
            greedy_ids, _ = greedy_confidence_reference(case["logits"], case["mask"], policy)
            assert ids[3].item() == greedy_ids[3].item()
            assert ids[4].item() in (vocab - 5, vocab - 2)
            assert torch.isfinite(case["logits"][torch.arange(len(TEMPS)), ids]).all()


def test_draws_do_not_depend_on_batch_or_tiles(kernel_out: dict) -> None:
    ids, _ = kernel_out["V300-B64-probability"]
    permuted, _ = kernel_out["permuted-B128"]
    alone, _ = kernel_out["row7-alone"]
    order = torch.tensor([5, 2, 7, 0, 3, 6, 1, 4])
    assert torch.equal(permuted, ids[order])
    assert alone.item() == ids[7].item()


def test_seeds_reproduce_and_differ(kernel_out: dict) -> None:
    a, _ = kernel_out["flat-a"]
    again, _ = kernel_out["flat-a-again"]
    b, _ = kernel_out["flat-b"]
    assert torch.equal(a, again)
    assert int((a != b).sum()) >= 6  # 1000 equally likely tokens: a shared draw is rare
    assert len(set(a.tolist())) >= 6  # streams of one seed differ too


def test_reference_equals_sample_tokens_given_its_noise() -> None:
    """With ``sample_tokens``' own float64 uniforms, the reference draws its tokens and confidences."""
    x = _logits(500, 3)[:, :500]
    mask = _mask_id(500)
    rows = x.shape[0]
    for temperature in (0.3, 1.0, 2.5):
        for policy in ("probability", "margin", "entropy"):
            seed = 1234
            generator = torch.Generator().manual_seed(seed)
            uniforms = torch.rand(x.shape, dtype=torch.float64, generator=generator)
            temps = torch.full((rows,), temperature)
            ids, conf = sample_confidence_reference(x, mask, policy, temps, uniforms)
            spec = SampleSpec(temperature=temperature, policy=policy)
            st_ids, st_conf = sample_tokens(x, spec, mask, seed)
            assert torch.equal(ids, st_ids)
            torch.testing.assert_close(conf, st_conf, rtol=1e-5, atol=1e-9)


_DRAWS = 20_000


@pytest.fixture(scope="module")
def many_draws_noise() -> torch.Tensor:
    """The uniforms of 20 000 rows (one seed, streams 0…19 999) over a 6-token vocabulary."""
    return sampling_noise(torch.full((_DRAWS,), 20240611), torch.arange(_DRAWS), 6)[0]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draw_frequencies_follow_tempered_softmax(temperature: float, many_draws_noise: torch.Tensor) -> None:
    """The kernel's noise (its bit-exact twin) through the Gumbel-max rule samples softmax(x / T)."""
    x = torch.tensor([[1.0, -0.5, 0.3, 2.0, 8.0, 0.0]])  # index 4 is the mask: never drawn
    mask, draws = 4, _DRAWS
    logits = x.expand(draws, -1)
    uniforms = many_draws_noise
    temps = torch.full((draws,), temperature)
    ids, _ = sample_confidence_reference(logits, mask, "probability", temps, uniforms)
    freq = torch.bincount(ids, minlength=x.shape[1]).double() / draws
    masked = x.double().clone()
    masked[0, mask] = -INF
    expected = torch.softmax(masked[0] / temperature, dim=-1)
    assert freq[mask].item() == 0.0
    # 20 000 draws: one standard deviation is at most 0.0036, so 0.02 is over 5 of them.
    assert float((freq - expected).abs().max()) < 0.02, (freq, expected)


def test_philox_argument_checks() -> None:
    with pytest.raises(ValueError, match="int64"):
        philox_uniform(0, torch.zeros(3, dtype=torch.int32))


def test_bad_arguments() -> None:
    x = torch.zeros(2, 8)
    temps, seeds, streams = torch.ones(2), torch.zeros(2, dtype=torch.int64), torch.arange(2)
    with pytest.raises(ValueError, match="policy"):
        sample_confidence_triton(x, 0, "credit", temps, seeds, streams)
    with pytest.raises(ValueError, match="temperatures"):
        sample_confidence_triton(x, 0, "probability", temps.double(), seeds, streams)
    with pytest.raises(ValueError, match="seeds"):
        sample_confidence_triton(x, 0, "probability", temps, seeds[:1], streams)
    with pytest.raises(ValueError, match="streams"):
        sample_confidence_triton(x, 0, "probability", temps, seeds, streams.int())
    with pytest.raises(ValueError, match="random_conf"):
        sample_confidence_reference(x, 0, "random", temps, torch.rand(2, 8))
    with pytest.raises(ValueError, match="uniforms"):
        sample_confidence_reference(x, 0, "probability", temps, torch.rand(2, 7))
    ids, conf = sample_confidence_triton(x[:0], 0, "random", temps[:0], seeds[:0], streams[:0])
    assert ids.shape == (0,) and conf.dtype == torch.float64


def _runner_expected(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What one sequence of the runner must get, from the references alone."""
    spec_args, step, rows = RUNNER_SEQS[name]
    spec = SampleSpec(**spec_args)
    logits, mask = _runner_logits(name), _mask_id(RUNNER_VOCAB)
    if spec.temperature == 0:
        return greedy_confidence_reference(logits, mask, spec.policy)
    seed = step_seed(spec.seed, step)
    if spec.top_k:
        return sample_tokens(logits, spec, mask, seed)
    uniforms, random_conf = sampling_noise(torch.full((rows,), seed), torch.arange(rows), RUNNER_VOCAB)
    temps = torch.full((rows,), spec.temperature)
    return sample_confidence_reference(logits, mask, spec.policy, temps, uniforms, random_conf)


@pytest.mark.parametrize("case_name", list(RUNNER_BATCHES))
def test_runner_fused_temperature_path(case_name: str, kernel_out: dict) -> None:
    """Each sequence's draws follow its own (step seed, row) streams, in any batch; top-k stays on torch."""
    for name, (ids, conf) in zip(RUNNER_BATCHES[case_name], kernel_out[case_name]):
        ref_ids, ref_conf = _runner_expected(name)
        assert torch.equal(ids, ref_ids), name
        torch.testing.assert_close(conf, ref_conf.double(), rtol=1e-6, atol=1e-9)


def test_runner_fused_gate() -> None:
    runner = ModelRunner.__new__(ModelRunner)
    runner.config = SimpleNamespace(fused_sampling=True)
    cuda = SimpleNamespace(is_cuda=True)
    tempered = SampleSpec(temperature=0.7)
    assert runner._fused(cuda, tempered, sampling=True)
    assert runner._fused(cuda, SampleSpec(temperature=0.7, policy="random"), sampling=True)
    assert not runner._fused(cuda, SampleSpec(policy="random"), sampling=False)
    assert runner._fused(cuda, SampleSpec(policy="margin"), sampling=False)
    for other in (dict(top_k=4), dict(top_p=0.9), dict(softmax_dtype="float64")):
        assert not runner._fused(cuda, SampleSpec(temperature=0.7, **other), sampling=True), other
    assert not runner._fused(torch.zeros(2, 3), tempered, sampling=True)  # CPU logits: torch path
    runner.config = SimpleNamespace(fused_sampling=False)
    assert not runner._fused(cuda, tempered, sampling=True)
