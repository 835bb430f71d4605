"""Fused MoE kernels (kernels/fused_moe.py) against their torch reference, and the MoE layers' use of them.

CPU: the kernels run under the Triton interpreter in one child process (``TRITON_INTERPRET=1`` must be set
before triton is imported); the comparisons run here. GPU tests: tests/test_kernels_moe_gpu.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffulex.kernels.fused_moe import MoeTileConfig, fused_moe_reference
from diffulex.kernels.moe_align import padded_rows
from safetensors.torch import load_file

from diffulex.layers.moe import GroupedSigmoidMoeBlock, SparseMoeBlock
from diffulex.models import load_model
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint
from tests.interpreter import run_interpreted
from tests.model_helpers import _randomised

pytest.importorskip("triton")

SMALL_TILES = MoeTileConfig(
    block_m=16, gate_up_block_n=16, gate_up_block_k=16, down_block_n=16, down_block_k=16
)

_CHILD = """
import sys
import torch
import diffulex.layers.moe as moe
from diffulex.kernels.fused_moe import fused_moe_triton
from diffulex.kernels.moe_align import align_pairs_to_experts
from diffulex.models import load_model
from tests.model_helpers import model_logits

moe.use_fused_moe = lambda hidden: True  # the layers' CUDA dispatch, forced on CPU tensors (interpreted)
cases = torch.load(sys.argv[1], weights_only=False)
out = {}
for name, case in cases.items():
    if case["op"] == "align":
        out[name] = align_pairs_to_experts(*case["args"])
    elif case["op"] == "model":
        model, spec = load_model(case["path"], torch.float32, "cpu")
        out[name] = model_logits(model, spec, case["ids"])
    else:
        out[name] = fused_moe_triton(*case["args"], config=case.get("config"))
torch.save(out, sys.argv[2])
"""


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _experts(num_experts: int, hidden: int, inter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gate_up = _randn(num_experts, 2 * inter, hidden, seed=seed, scale=hidden**-0.5)
    down = _randn(num_experts, hidden, inter, seed=seed + 1, scale=inter**-0.5)
    return gate_up, down


def _softmax_routing(tokens: int, experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    probs = _randn(tokens, experts, seed=seed, scale=2.0).softmax(-1)
    weights, ids = probs.topk(top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), ids


def _moe_case(
    tokens: int, hidden: int, inter: int, experts: int, top_k: int, seed: int, config=None, ids=None
) -> dict:
    weights, routed = _softmax_routing(tokens, experts, top_k, seed)
    gate_up, down = _experts(experts, hidden, inter, seed + 10)
    case = dict(
        op="moe",
        args=(
            _randn(tokens, hidden, seed=seed + 20),
            weights,
            ids if ids is not None else routed,
            gate_up,
            down,
        ),
    )
    if config is not None:
        case["config"] = config
    return case


def _build_cases() -> dict[str, dict]:
    cases = {
        "T5-K2": _moe_case(5, 32, 24, 6, 2, seed=1),
        "T1-K1": _moe_case(1, 32, 24, 6, 1, seed=2),
        "T1-K3": _moe_case(1, 32, 24, 6, 3, seed=3),
        # Several tiles per expert (~20 pairs each), ragged H and I against 16-wide blocks.
        "T40-K2-ragged": _moe_case(40, 40, 20, 4, 2, seed=4, config=SMALL_TILES),
        "T0": _moe_case(0, 32, 24, 6, 2, seed=5),
    }
    # Experts 0, 2, 5, 6 and 7 get no token at all (ids given explicitly).
    zero_ids = torch.tensor([[1, 3], [4, 1], [3, 4]])
    cases["zero-token-experts"] = _moe_case(3, 32, 24, 8, 2, seed=6, ids=zero_ids)
    # LLaDA2-style routing weights: fp32, not normalised to one, scaled (the block's own router).
    base = _moe_case(9, 32, 24, 8, 2, seed=7)
    scaled = base["args"][1] * 2.5
    cases["llada2-weights"] = dict(op="moe", args=(base["args"][0], scaled, *base["args"][2:]))
    # Batch invariance: every token of a 40-token batch alone, and a 7-token slice, equal the batch.
    batch = cases["T40-K2-ragged"]
    x, w, ids, gate_up, down = batch["args"]
    for t in (0, 17, 39):
        cases[f"alone-{t}"] = dict(
            op="moe", args=(x[t : t + 1], w[t : t + 1], ids[t : t + 1], gate_up, down), config=SMALL_TILES
        )
    cases["slice-10-17"] = dict(
        op="moe", args=(x[10:17], w[10:17], ids[10:17], gate_up, down), config=SMALL_TILES
    )
    # The alignment alone: 40 x 2 pairs over 4 experts, and 3 x 2 pairs with unused experts.
    cases["align-T40"] = dict(op="align", args=(ids, 4, 16))
    cases["align-zero"] = dict(op="align", args=(zero_ids, 8, 16))
    return cases


CASES = _build_cases()
MOE_CASES = [name for name, case in CASES.items() if case["op"] == "moe"]


MOE_FAMILIES = ("sdar_moe", "llada2_moe")


# The layers' own stacks and routing, fed to the kernel (ground truth: the layers' grouped CPU path).
LAYER_TOKENS = _randn(13, 32, seed=9)
LAYER_BLOCKS = {
    "sdar": _randomised(SparseMoeBlock(32, 24, num_experts=6, top_k=2), seed=1),
    "llada2": _randomised(GroupedSigmoidMoeBlock(32, 24, 8, 3, 4, 2, 2.5), seed=2),
}


@torch.no_grad()
def _layer_case(block: torch.nn.Module) -> dict:
    weights, ids = block.route(LAYER_TOKENS)
    stacks = (block.experts.gate_up_weight, block.experts.down_weight)
    return dict(op="moe", args=(LAYER_TOKENS, weights, ids, *stacks))


CASES.update({f"layer-{name}": _layer_case(block) for name, block in LAYER_BLOCKS.items()})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("moe_ckpt")
    return {f: write_tiny_checkpoint(f, folder / f, seed=3, with_tokenizer=False) for f in MOE_FAMILIES}


@pytest.fixture(scope="module")
def kernel_out(tmp_path_factory: pytest.TempPathFactory, checkpoints: dict[str, Path]) -> dict:
    """Every interpreted launch of this module in one child process (each child imports torch + triton)."""
    from tests.model_helpers import _ids

    cases = dict(CASES)
    for family, path in checkpoints.items():
        cases[f"model-{family}"] = dict(op="model", path=str(path), ids=_ids(37, 0))
    return run_interpreted(_CHILD, cases, tmp_path_factory.mktemp("fused_moe"))


# ---------------------------------------------------------------------------------------------- CPU


def _per_token_moe(x, weights, ids, gate_up, down) -> torch.Tensor:
    """An independent statement of the math: token by token, slot by slot, in float32 (fp32 inputs)."""
    inter = down.shape[-1]
    out = torch.zeros(x.shape, dtype=torch.float32)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            expert = int(ids[t, k])
            gate = gate_up[expert, :inter] @ x[t]
            up = gate_up[expert, inter:] @ x[t]
            out[t] += float(weights[t, k]) * (down[expert] @ (F.silu(gate) * up))
    return out


@pytest.mark.parametrize("name", ["T5-K2", "T1-K3", "zero-token-experts", "llada2-weights"])
def test_reference_is_the_per_token_math(name: str) -> None:
    args = CASES[name]["args"]
    torch.testing.assert_close(fused_moe_reference(*args), _per_token_moe(*args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", MOE_CASES)
def test_fused_matches_reference(name: str, kernel_out: dict) -> None:
    # fp32 only: the interpreter's bf16 tl.dot returns garbage (triton 3.9); the GPU tests cover bf16.
    got, ref = kernel_out[name], fused_moe_reference(*CASES[name]["args"])
    assert got.dtype == ref.dtype and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_token_alone_equals_token_in_batch(kernel_out: dict) -> None:
    """Batch invariance: a token's bits do not depend on the tokens (and tile rows) it shares a step with."""
    batch = kernel_out["T40-K2-ragged"]
    for t in (0, 17, 39):
        assert torch.equal(kernel_out[f"alone-{t}"][0], batch[t])
    assert torch.equal(kernel_out["slice-10-17"], batch[10:17])


@pytest.mark.parametrize("name", ["align-T40", "align-zero"])
def test_alignment_groups_every_pair_once_by_expert(name: str, kernel_out: dict) -> None:
    ids, num_experts, block_m = CASES[name]["args"]
    sorted_pairs, tile_experts = kernel_out[name]
    flat = ids.reshape(-1)
    num_pairs = flat.numel()
    assert sorted_pairs.shape == (padded_rows(num_pairs, num_experts, block_m),)
    assert tile_experts.shape == (sorted_pairs.numel() // block_m,)
    real = sorted_pairs[sorted_pairs != num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs)), "each pair exactly once"
    counts = torch.bincount(flat, minlength=num_experts)
    used_tiles = 0
    for expert in range(num_experts):
        tiles = (tile_experts == expert).nonzero().flatten()
        assert tiles.numel() == -(-int(counts[expert]) // block_m)  # padded to whole tiles, none if unused
        if tiles.numel():
            assert torch.equal(tiles, torch.arange(int(tiles[0]), int(tiles[0]) + tiles.numel()))
        for tile in tiles.tolist():
            rows = sorted_pairs[tile * block_m : (tile + 1) * block_m]
            rows = rows[rows != num_pairs]
            assert (flat[rows.long()] == expert).all()
            assert torch.equal(rows, rows.sort().values), "pairs keep their order inside a segment"
        used_tiles += tiles.numel()
    assert (tile_experts[used_tiles:] == num_experts).all() and (
        tile_experts[:used_tiles] < num_experts
    ).all()


def test_expert_weights_are_views_of_the_stacks() -> None:
    """One copy of the expert weights: the official per-expert parameters live inside the stacks, also
    after a dtype conversion, and the stacks hold gate rows then up rows."""
    block = _randomised(SparseMoeBlock(32, 24, num_experts=6, top_k=2), seed=0)
    for converted in (block, block.to(torch.float64)):
        experts = converted.experts
        for index, expert in enumerate(experts):
            assert expert.gate_up_proj.weight.data_ptr() == experts.gate_up_weight[index].data_ptr()
            assert expert.down_proj.weight.data_ptr() == experts.down_weight[index].data_ptr()
        assert (
            converted.gate.weight.dtype == experts.gate_up_weight.dtype == experts[5].down_proj.weight.dtype
        )
    assert block.experts.gate_up_weight.dtype == torch.float64
    # Names seen by the loader and state_dict stay the per-expert ones (the stacks are not persistent).
    assert not any("gate_up_weight" in name or "down_weight" in name for name in block.state_dict())
    assert not block.cuda_graph_safe  # CPU: the grouped path, not capturable


def test_loaded_checkpoint_lands_in_the_stacks(tmp_path: Path) -> None:
    path = write_tiny_checkpoint("sdar_moe", tmp_path / "m", seed=3, with_tokenizer=False)
    model, _ = load_model(path, torch.float32, "cpu")
    tensors = load_file(str(path / "model.safetensors"))
    experts = model.model.layers[0].mlp.experts
    inter = experts.down_weight.shape[-1]
    for e in range(experts.gate_up_weight.shape[0]):
        prefix = f"model.layers.0.mlp.experts.{e}."
        assert torch.equal(experts.gate_up_weight[e, :inter], tensors[prefix + "gate_proj.weight"])
        assert torch.equal(experts.gate_up_weight[e, inter:], tensors[prefix + "up_proj.weight"])
        assert torch.equal(experts.down_weight[e], tensors[prefix + "down_proj.weight"])


@pytest.mark.parametrize("name", list(LAYER_BLOCKS))
def test_fused_kernel_on_the_layers_stacks_equals_the_grouped_path(name: str, kernel_out: dict) -> None:
    """The layers' stacked weights, fed to the kernel with the layers' own routing, give what the grouped
    (CPU) path gives: the stack layout is the experts' layout, and LLaDA2 keeps its fp32 sum."""
    with torch.no_grad():
        grouped = LAYER_BLOCKS[name](LAYER_TOKENS)
    torch.testing.assert_close(kernel_out[f"layer-{name}"], grouped, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_models_on_the_fused_path_equal_the_grouped_path(
    family: str, kernel_out: dict, checkpoints: dict[str, Path]
) -> None:
    """Whole SDAR-MoE and LLaDA2 models with the fused experts (as on CUDA) give the grouped path's logits."""
    from tests.model_helpers import _ids, _max_rel_error, model_logits

    model, spec = load_model(checkpoints[family], torch.float32, "cpu")
    grouped = model_logits(model, spec, _ids(37, 0))
    assert _max_rel_error(kernel_out[f"model-{family}"], grouped) <= 1e-5
