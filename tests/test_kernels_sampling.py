"""Fused greedy sampling kernel (kernels/sampling.py) against its torch reference and ``sample_tokens``.

The CPU tests run the Triton kernel under the interpreter. ``TRITON_INTERPRET`` must be set before
triton is imported, so all kernel launches happen in one child process (spawned once per module with
the variable in its environment); the comparisons run here. GPU tests are marked ``gpu``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl
from diffulex.kernels.sampling import (
    POLICIES,
    SAMPLE_POLICIES,
    _noise_uniforms,
    greedy_confidence_reference,
    greedy_confidence_triton,
    sample_confidence_reference,
    sample_confidence_triton,
    sampling_noise,
)

from diffulex.sampling.confidence import sample_tokens
from diffulex.step import SampleSpec
from tests.interpreter import run_interpreted

REPO_ROOT = Path(__file__).resolve().parents[1]
INF = float("inf")

_CHILD = """
import sys
import torch
from diffulex.kernels.sampling import greedy_confidence_triton

cases = torch.load(sys.argv[1])
out = {}
for name, case in cases.items():
    out[name] = greedy_confidence_triton(
        case["logits"], case["mask"], case["policy"], block_v=case["block_v"]
    )
torch.save(out, sys.argv[2])
"""


def _mask_id(vocab: int) -> int:
    return vocab - 3


def _logits(n: int, vocab: int, seed: int) -> torch.Tensor:
    """Random rows plus the awkward ones: ties, the mask holding the max, −inf entries."""
    assert n >= 5
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, vocab, generator=g) * 3
    mask = _mask_id(vocab)
    # Row 1: the max is tied inside a tile and across tiles: the first index must win.
    x[1, [vocab // 3, vocab // 3 + 1, vocab - 1]] = x[1].max() + 1
    # Row 2: the mask token holds by far the largest logit: it must not be chosen nor counted.
    x[2, mask] = x[2].max() + 10
    # Row 3: −inf entries, the whole first half included (so the first tiles are all −inf).
    x[3, : vocab // 2] = -INF
    x[3, ::3] = -INF
    # Row 4: only two finite logits, equal: p = 1/2 each, margin 0, Σ p log p = −log 2.
    x[4] = -INF
    x[4, [vocab - 5, vocab - 2]] = 1.0
    return x


def _build_cases() -> dict[str, dict]:
    cases: dict[str, dict] = {}
    seed = 0
    for vocab, blocks in ((37, (16, None)), (300, (64, 128)), (1000, (256, None))):
        for block_v in blocks:
            seed += 1
            x = _logits(5, vocab, seed)
            for policy in POLICIES:
                cases[f"fp32-V{vocab}-B{block_v}-{policy}"] = dict(
                    logits=x, mask=_mask_id(vocab), policy=policy, block_v=block_v, kind="fp32"
                )
    for dtype in (torch.float16, torch.bfloat16):
        x = _logits(5, 300, 100).to(dtype)
        for policy in POLICIES:
            cases[f"{str(dtype)[6:]}-V300-B64-{policy}"] = dict(
                logits=x, mask=_mask_id(300), policy=policy, block_v=64, kind="half"
            )
    # Row stride larger than V (a slice of a wider buffer), and a transposed (column-strided) view.
    wide = torch.cat([_logits(5, 300, 200), torch.randn(5, 100)], dim=1)
    cases["fp32-strided-rows"] = dict(
        logits=wide[:, :300], mask=_mask_id(300), policy="entropy", block_v=64, kind="fp32"
    )
    cases["fp32-transposed"] = dict(
        logits=_logits(5, 300, 201).t().contiguous().t(),
        mask=_mask_id(300),
        policy="margin",
        block_v=64,
        kind="fp32",
    )
    # No mask token (out of range) and mask id 0.
    for mask in (-1, 0):
        cases[f"fp32-mask{mask}"] = dict(
            logits=_logits(5, 300, 300 + mask), mask=mask, policy="probability", block_v=64, kind="fp32"
        )
    # Margins from ~0.5 down to ~1e-5 (the top two logits 10 above the rest, ever closer).
    g = torch.Generator().manual_seed(500)
    x = torch.randn(8, 1000, generator=g) * 3
    top = x.max(dim=-1).values
    for i in range(8):
        x[i, 500 + i] = top[i] + 10
        x[i, 900 - i] = top[i] + 10 - 10 ** (-0.7 * i)
    cases["fp32-small-margins"] = dict(logits=x, mask=3, policy="margin", block_v=256, kind="fp32")
    # A row that is entirely −inf: id 0 as torch.argmax (its confidence is not finite).
    x = _logits(5, 100, 400)
    x[0] = -INF
    cases["all-inf-row"] = dict(logits=x, mask=_mask_id(100), policy="probability", block_v=32, kind="ids")
    # A NaN logit (a broken forward) in row 2, in the second tile: that row's confidence is NaN.
    for policy in POLICIES:
        x = _logits(5, 100, 401)
        x[2, 40] = float("nan")
        cases[f"nan-row-{policy}"] = dict(logits=x, mask=_mask_id(100), policy=policy, block_v=32, kind="nan")
    return cases


CASES = _build_cases()


@pytest.fixture(scope="module")
def kernel_out(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return run_interpreted(_CHILD, CASES, tmp_path_factory.mktemp("sampling_kernel"))


def _truth(logits: torch.Tensor, mask: int, policy: str) -> torch.Tensor:
    """The confidence in float64."""
    x = logits.double().clone()
    if 0 <= mask < x.shape[-1]:
        x[:, mask] = -INF
    p = torch.softmax(x, dim=-1)
    if policy == "probability":
        return p.max(dim=-1).values
    if policy == "margin":
        top2 = torch.topk(p, 2, dim=-1).values
        return top2[:, 0] - top2[:, 1]
    return torch.special.xlogy(p, p).sum(dim=-1)


def _assert_close(
    conf: torch.Tensor, ref: torch.Tensor, rtol: float, scale: torch.Tensor | None = None
) -> None:
    """|conf − ref| <= rtol·max(|ref|, scale) (+1e-12): relative, or relative to ``scale`` when larger."""
    bound = ref.abs() if scale is None else torch.maximum(ref.abs(), scale)
    bad = ~((conf - ref).abs() <= rtol * bound + 1e-12)
    assert not bool(bad.any()), f"conf {conf[bad].tolist()} vs ref {ref[bad].tolist()}"


def _check_fp32(case: dict, ids: torch.Tensor, conf: torch.Tensor) -> None:
    logits, mask, policy = case["logits"], case["mask"], case["policy"]
    # The kernel against the float64 truth: 1e-6 relative, small margins included.
    _assert_close(conf, _truth(logits, mask, policy), 1e-6)
    # The fp32 references lose ~1 ulp of the top-1 probability in p1 − p2: margins are compared relative
    # to the top-1 probability (the operands of that subtraction) rather than to their small difference.
    scale = None
    if policy == "margin":
        scale = greedy_confidence_reference(logits, mask, "probability")[1]
    ref_ids, ref_conf = greedy_confidence_reference(logits, mask, policy)
    assert torch.equal(ids, ref_ids)
    _assert_close(conf, ref_conf, 1e-6, scale)
    spec = SampleSpec(temperature=0.0, policy=policy, softmax_dtype="logits")
    st_ids, st_conf = sample_tokens(logits, spec, mask)
    assert torch.equal(ids, st_ids)
    _assert_close(conf, st_conf, 1e-6, scale)


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_references(name: str, kernel_out: dict) -> None:
    case = CASES[name]
    ids, conf = kernel_out[name]
    n = case["logits"].shape[0]
    assert ids.dtype == torch.int64 and conf.dtype == torch.float64
    assert ids.shape == (n,) and conf.shape == (n,)
    if case["kind"] == "fp32":
        _check_fp32(case, ids, conf)
    elif case["kind"] == "half":
        ref_ids, ref_conf = greedy_confidence_reference(case["logits"], case["mask"], case["policy"])
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(conf, ref_conf, rtol=1e-5, atol=1e-8)
    elif case["kind"] == "nan":  # the NaN row is checked by test_nan_logit_gives_nan_confidence
        rows = [0, 1, 3, 4]
        _check_fp32(dict(case, logits=case["logits"][rows]), ids[rows], conf[rows])
    else:
        x = case["logits"].clone()
        x[:, case["mask"]] = -INF
        assert torch.equal(ids, x.argmax(dim=-1))
        assert ids[0].item() == 0
        _check_fp32(dict(case, logits=case["logits"][1:]), ids[1:], conf[1:])


@pytest.mark.parametrize("vocab", [37, 300, 1000])
def test_special_rows(vocab: int, kernel_out: dict) -> None:
    """Ties pick the first index, the mask is never chosen, the two-equal-logit row is exact."""
    mask = _mask_id(vocab)
    for policy, expected in (
        ("probability", 0.5),
        ("margin", 0.0),
        ("entropy", -torch.log(torch.tensor(2.0))),
    ):
        for name, case in CASES.items():
            if not name.startswith(f"fp32-V{vocab}-") or case["policy"] != policy:
                continue
            ids, conf = kernel_out[name]
            assert ids[1].item() == vocab // 3
            assert ids[2].item() != mask
            assert ids[4].item() == vocab - 5
            torch.testing.assert_close(conf[4].item(), float(expected), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("policy", POLICIES)
def test_nan_logit_gives_nan_confidence(policy: str, kernel_out: dict) -> None:
    """The device loop flags a broken forward from the confidences alone: kernel and torch agree."""
    case = CASES[f"nan-row-{policy}"]
    ids, conf = kernel_out[f"nan-row-{policy}"]
    assert torch.isnan(conf[2]) and torch.isfinite(conf[[0, 1, 3, 4]]).all()
    _, torch_conf = sample_tokens(case["logits"], SampleSpec(policy=policy), case["mask"])
    assert torch.isnan(torch_conf[2]) and torch.isfinite(torch_conf[[0, 1, 3, 4]]).all()


def test_reference_matches_sample_tokens() -> None:
    x = _logits(6, 500, 7)
    for policy in POLICIES:
        ids, conf = greedy_confidence_reference(x, _mask_id(500), policy)
        st_ids, st_conf = sample_tokens(x, SampleSpec(policy=policy), _mask_id(500))
        assert torch.equal(ids, st_ids)
        torch.testing.assert_close(conf, st_conf, rtol=1e-6, atol=1e-9)


def test_bad_arguments() -> None:
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="policy"):
        greedy_confidence_triton(x, 0, "random")
    with pytest.raises(ValueError, match="float32"):
        greedy_confidence_triton(x.double(), 0, "probability")
    with pytest.raises(ValueError, match=r"\[N, V\]"):
        greedy_confidence_reference(x[0], 0, "probability")
    with pytest.raises(ValueError, match="power of two"):
        greedy_confidence_triton(x, 0, "probability", block_v=6)
    ids, conf = greedy_confidence_triton(x[:0], 0, "entropy")  # no launch for N = 0
    assert ids.shape == (0,) and ids.dtype == torch.int64 and conf.dtype == torch.float64


# --- GPU (H200) -----------------------------------------------------------------------------------------


def _gpu_logits(n: int, vocab: int, mask: int, dtype: torch.dtype, pad: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.randn(n, vocab + pad, device="cuda", generator=g) * 4
    buf[::7, mask] = 100.0  # the mask token holds the max in some rows
    buf[1::11, : vocab // 2] = -INF
    return buf.to(dtype)[:, :vocab]


def _check_gpu(logits: torch.Tensor, mask: int, policy: str) -> None:
    ids, conf = greedy_confidence_triton(logits, mask, policy)
    x = logits.float()
    x[:, mask] = -INF
    assert torch.equal(ids, x.argmax(dim=-1))
    _, ref_conf = greedy_confidence_reference(logits, mask, policy)
    torch.testing.assert_close(conf, ref_conf, rtol=1e-3, atol=1e-3)
    spec = SampleSpec(policy=policy, softmax_dtype="float64")
    st_ids, st_conf = sample_tokens(logits, spec, mask)
    assert torch.equal(ids, st_ids)
    torch.testing.assert_close(conf, st_conf, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
def test_gpu_llada_bf16(policy: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _check_gpu(_gpu_logits(64 * 32, 126464, 126336, torch.bfloat16), 126336, policy)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", POLICIES)
def test_gpu_qwen_fp16_strided(policy: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    _check_gpu(_gpu_logits(512, 151936, 151666, torch.float16, pad=64), 151666, policy)


# --- GPU (H200): temperature sampling -------------------------------------------------------------------

LLADA_VOCAB, LLADA_MASK = 126464, 126336


@triton.jit
def _noise_kernel(out_ptr, seeds_ptr, streams_ptr, V, BLOCK: tl.constexpr):
    """Writes the uniforms the sampling kernel draws for each (seed, stream) row."""
    row = tl.program_id(0)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        u = _noise_uniforms(tl.load(seeds_ptr + row), tl.load(streams_ptr + row), offs)
        tl.store(out_ptr + row.to(tl.int64) * V + offs, u, mask=offs < V)


def _gpu_sampling_rows(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row temperatures, seeds and streams (32 rows per sequence, as a Block Buffer step)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    temps = torch.tensor([0.7, 1.0, 1.5, 0.2], device="cuda").repeat((n + 3) // 4)[:n]
    seeds = torch.randint(0, 1 << 47, ((n + 31) // 32,), device="cuda", generator=g)
    seeds = seeds.repeat_interleave(32)[:n]
    streams = torch.arange(n, device="cuda") % 32
    return temps, seeds, streams


def _check_near_ties(x: torch.Tensor, temps: torch.Tensor, u: torch.Tensor, ids, ref_ids) -> None:
    """fp32 kernel vs float64 reference: a different draw is allowed only at an fp32 near-tie."""
    differ = (ids != ref_ids).nonzero().squeeze(-1)
    assert differ.numel() <= max(1, ids.numel() // 100), f"{differ.numel()} rows differ"
    if differ.numel() == 0:
        return
    rows = x[differ].double()
    scores = rows - temps[differ, None].double() * torch.log(-torch.log(u[differ].double()))
    ref_score = scores.gather(-1, ref_ids[differ, None]).squeeze(-1)
    got_score = scores.gather(-1, ids[differ, None]).squeeze(-1)
    assert bool(((ref_score - got_score).abs() <= 1e-5 * ref_score.abs().clamp_min(1.0)).all())


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [32, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_temperature_llada(rows: int, dtype: torch.dtype) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    logits = _gpu_logits(rows, LLADA_VOCAB, LLADA_MASK, dtype)
    temps, seeds, streams = _gpu_sampling_rows(rows)
    uniforms, random_conf = sampling_noise(seeds, streams, LLADA_VOCAB)
    device_u = torch.empty(rows, LLADA_VOCAB, device="cuda")
    _noise_kernel[(rows,)](device_u, seeds, streams, LLADA_VOCAB, BLOCK=4096)
    assert torch.equal(device_u, uniforms), "tl.rand on the device differs from kernels/philox.py"
    x = logits.float().clone()  # fp32 logits: .float() alone would alias them
    x[:, LLADA_MASK] = -INF
    for policy in SAMPLE_POLICIES:
        ids, conf = sample_confidence_triton(logits, LLADA_MASK, policy, temps, seeds, streams)
        assert not bool((ids == LLADA_MASK).any())
        ref_ids, ref_conf = sample_confidence_reference(
            logits, LLADA_MASK, policy, temps, uniforms, random_conf
        )
        _check_near_ties(x, temps, uniforms, ids, ref_ids)
        same = ids == ref_ids
        torch.testing.assert_close(conf[same], ref_conf[same], rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("policy", SAMPLE_POLICIES)
def test_gpu_temperature_allocates_no_vocab_sized_tensor(policy: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rows = 1024
    logits = _gpu_logits(rows, LLADA_VOCAB, LLADA_MASK, torch.bfloat16)
    temps, seeds, streams = _gpu_sampling_rows(rows)
    sample_confidence_triton(logits, LLADA_MASK, policy, temps, seeds, streams)  # compile outside
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    sample_confidence_triton(logits, LLADA_MASK, policy, temps, seeds, streams)
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - before
    # Not even one byte per logit: no [rows, vocab] tensor of any dtype (float64 would be 8 bytes each).
    assert growth < rows * LLADA_VOCAB, f"peak grew by {growth} bytes"


@pytest.mark.gpu
def test_gpu_temperature_frequencies() -> None:
    """The kernel itself samples softmax(x / T) (200 000 draws, so 0.01 is over 9 standard deviations)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    draws, mask = 200_000, 4
    x = torch.tensor([1.0, -0.5, 0.3, 2.0, 9.0, 0.0, 1.2, -3.0], device="cuda")
    seeds = torch.full((draws,), 7, device="cuda")
    streams = torch.arange(draws, device="cuda")
    for temperature in (0.5, 1.0, 2.0):
        temps = torch.full((draws,), temperature, device="cuda")
        ids, _ = sample_confidence_triton(x.expand(draws, -1), mask, "probability", temps, seeds, streams)
        freq = torch.bincount(ids, minlength=x.numel()).double() / draws
        masked = x.double().clone()
        masked[mask] = -INF
        expected = torch.softmax(masked / temperature, dim=-1)
        assert freq[mask].item() == 0.0
        assert float((freq - expected).abs().max()) < 0.01, (temperature, freq, expected)
