"""The quality suite's training: the training models against the engine's models (logits, and the
training layouts against the engine's view at inference), the batches and the loss, and the trainer
(overfitting through the engine, time budget, determinism, torch.compile; on CUDA with ``-m gpu``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffulex.llm import LLM
from diffulex.models.tiny_layouts import llada_tensor_shapes, sdar_tensor_shapes
from diffulex.quality.checkpoint import (
    SDAR_BLOCK_SIZE,
    encode_prompts,
    load_tokenizer,
    model_config,
    response_ids,
    write_checkpoint,
    write_tokenizer_files,
)
from diffulex.quality.tasks import README_DEMO_PROMPT, Example, make_suite
from diffulex.quality.train_model import TinyDiffusionLM
from diffulex.quality.training import BATCH_BUILDERS, diffusion_loss, tokenize_rows

TENSOR_SHAPES = {"llada": llada_tensor_shapes, "sdar": sdar_tensor_shapes}


# ----- training model == engine model ---------------------------------------------------------------------
def _random_model(family: str, seed: int) -> TinyDiffusionLM:
    torch.manual_seed(seed)
    model = TinyDiffusionLM(model_config(family, "toy"))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))  # norms away from 1, larger weights: peaky logits
    return model


@pytest.fixture(scope="module", params=["llada", "sdar"])
def saved_pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(family, training model, engine LLM of its float32 checkpoint)."""
    family = request.param
    model = _random_model(family, seed=7)
    path = write_checkpoint(
        model_config(family, "toy"), model.state_dict(), tmp_path_factory.mktemp(family), dtype=torch.float32
    )
    return family, model, LLM(str(path), device="cpu", dtype="float32", max_model_len=512)


def test_training_model_saves_the_official_tensor_names(saved_pair) -> None:
    family, model, _ = saved_pair
    expected = TENSOR_SHAPES[family](model_config(family, "toy"))
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == expected


def test_training_model_logits_equal_the_engine(saved_pair) -> None:
    family, model, llm = saved_pair
    ids = torch.randint(0, 100, (23,), generator=torch.Generator().manual_seed(1))
    expected = llm.forward_logits(ids.tolist())
    positions = torch.arange(23)
    if family == "llada":
        visible = torch.ones(23, 23, dtype=torch.bool)
    else:
        blocks = positions // SDAR_BLOCK_SIZE
        visible = blocks[None, :] <= blocks[:, None]
    with torch.no_grad():
        logits = model(ids[None], positions[None], visible[None])[0]
    assert expected.abs().max() > 1.0  # not a degenerate model
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_training_batches_match_the_engine_view(saved_pair) -> None:
    """Every row of a training batch, padding included, computes what the engine computes at inference:
    LLaDA the bidirectional forward of prompt + region; SDAR, for each block, the forward of the clean
    earlier blocks plus the noisy block (the view of ``block_diffusion`` over its cache)."""
    family, model, llm = saved_pair
    tokenizer = llm.tokenizer
    examples = [Example("copy", "Repeat: ab", ("ab",)), Example("copy", "Repeat: abcdefgh", ("abcdefgh",))]
    rows = tokenize_rows(examples, tokenizer, family, llm.engine.mask_token_id, seed=0)
    batch = BATCH_BUILDERS[family](rows, 2, torch.Generator().manual_seed(3), gen_len=32)
    with torch.no_grad():
        logits = model(batch.input_ids, batch.positions, batch.visible, batch.logits_rows)
    assert torch.isfinite(diffusion_loss(logits, batch))
    noisy = batch.input_ids[:, : batch.logits_rows]
    assert (noisy == llm.engine.mask_token_id).any()
    for row in range(2):
        length = int(batch.valid[row].sum())
        if family == "llada":
            expected = llm.forward_logits(noisy[row, :length].tolist())
            torch.testing.assert_close(logits[row, :length], expected, atol=1e-4, rtol=0)
            continue
        assert length % SDAR_BLOCK_SIZE == 0
        # The first block (prompt only), the first six blocks holding masks and the last block.
        masked_blocks = (batch.masked[row].nonzero().flatten() // SDAR_BLOCK_SIZE).unique().tolist()
        starts = {0, length - SDAR_BLOCK_SIZE, *(b * SDAR_BLOCK_SIZE for b in masked_blocks[:6])}
        for start in sorted(starts):
            end = start + SDAR_BLOCK_SIZE
            view = batch.targets[row, :start].tolist() + noisy[row, start:end].tolist()
            expected = llm.forward_logits(view)[start:end]
            torch.testing.assert_close(logits[row, start:end], expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_tokenize_rows_equals_tokenizing_each_row(family: str, tmp_path: Path) -> None:
    """Rows are tokenized once per distinct string: the result equals the row-by-row tokenization of
    ``[chat prompt | answer, end-of-turn, <|endoftext|> ...]``, repeats and multi-answer rows included."""
    tokenizer = load_tokenizer(write_tokenizer_files(family, tmp_path / family))
    examples, _ = make_suite(0, train_per_task=20)
    examples += examples[:30]
    rows = tokenize_rows(examples, tokenizer, family, 103, seed=5)
    again = tokenize_rows(examples, tokenizer, family, 103, seed=5)
    assert torch.equal(rows.sequences, again.sequences)
    chosen = 0
    for row, example in enumerate(examples):
        prompt = encode_prompts(tokenizer, [example.prompt])[0]
        length = int(rows.prompt_lens[row])
        assert rows.sequences[row, :length].tolist() == prompt
        answer_ids = rows.sequences[row, length:]
        candidates = [
            response_ids(family, tokenizer, answer, answer_ids.numel()) for answer in example.answers
        ]
        assert answer_ids.tolist() in candidates
        chosen += len(example.answers) > 1
    assert chosen and rows.max_prompt_len == int(rows.prompt_lens.max())


def test_d2f_batches_follow_the_pipelined_block_layout(tmp_path: Path) -> None:
    """The optional LLaDA D2F layout: prompt = block 0 (sees itself), region blocks of 4 after it, a query
    sees its own and earlier blocks, padding nothing; mask ratios do not decrease along the blocks."""
    tokenizer = load_tokenizer(write_tokenizer_files("llada", tmp_path))
    examples = [Example("copy", "Repeat: ab", ("ab",)), Example("copy", "Repeat: abcdefgh", ("abcdefgh",))]
    rows = tokenize_rows(examples, tokenizer, "llada", 103, seed=0)
    batch = BATCH_BUILDERS["llada_d2f"](rows, 4, torch.Generator().manual_seed(0), gen_len=16)
    assert torch.isfinite(diffusion_loss(torch.randn(*batch.targets.shape, 104), batch))
    for row in range(4):
        length = int(batch.valid[row].sum())
        prompt = length - 16
        positions = torch.arange(batch.targets.shape[1])
        blocks = torch.where(positions < prompt, 0, (positions - prompt) // 4 + 1)
        expected = (blocks[None, :] <= blocks[:, None]) & (positions[None, :] < length)
        expected |= torch.eye(len(positions), dtype=torch.bool)
        assert torch.equal(batch.visible[row], expected)
        assert not batch.masked[row, :prompt].any() and not batch.masked[row, length:].any()


@pytest.fixture
def one_thread():
    """Run torch on one thread: toy models gain nothing from two, and threads spin on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_overfit_examples_are_answered_through_the_engine(family: str, tmp_path: Path, one_thread) -> None:
    """Training layout, checkpoint and inference agree end to end: a toy model trained to memorise three
    examples gives exactly their answers through the engine's default decoding of the chat prompt (a
    shifted position, a wrong template or a misplaced EOS would break it even with a perfect fit)."""
    from diffulex.quality.evaluate import default_setting, evaluate
    from diffulex.quality.trainer import TrainOptions, train

    _, test = make_suite(0, train_per_task=1)
    examples = [
        next(e for e in test if e.task == task) for task in ("multiplication", "reverse", "capital_of")
    ]
    options = TrainOptions(
        family, str(tmp_path), steps=400, batch_size=8, lr=1e-2, warmup_steps=20, size="toy", device="cpu"
    )
    train(options, log=lambda line: None, examples=examples)
    [result] = evaluate(str(tmp_path), [default_setting(family)], examples, {"device": "cpu"})
    assert [sample["output"] for sample in result.samples] == [e.answers[0] for e in examples]
    assert result.accuracy == 1.0


def test_time_budget_sets_the_schedule_during_the_warmup(tmp_path: Path, one_thread) -> None:
    from diffulex.quality.trainer import TrainOptions, WarmupCosine, steps_for_budget, train

    schedule = WarmupCosine(warmup_steps=200, total_steps=4000, min_ratio=0.1)
    assert schedule(0) == 1 / 200 and schedule(199) == 1.0 and abs(schedule(3999) - 0.1) < 1e-5
    assert WarmupCosine(200, 20, 0.1).warmup_steps == 2  # toy runs still reach the peak
    assert steps_for_budget(100.0, 10.0, 0.1, 60, 10_000) == 60 + int(0.95 * 90 / 0.1)
    assert (
        steps_for_budget(100.0, 10.0, 0.1, 60, 500) == 500 and steps_for_budget(1.0, 5.0, 0.1, 60, 500) == 61
    )
    options = TrainOptions(
        "llada", str(tmp_path), steps=100, batch_size=4, size="toy", device="cpu", time_budget_s=0.01
    )
    result = train(options, log=lambda line: None, examples=[Example("copy", "Repeat: ab", ("ab",))])
    record = json.loads((tmp_path / "training.json").read_text())
    # The budget is spent by the calibration: one more step, and the schedule ends there.
    assert result.steps_done == 61 and record["schedule_steps"] == 61
    assert not result.stopped_early


def test_deterministic_training_gives_the_same_weights_and_restores_the_mode(
    tmp_path: Path, one_thread
) -> None:
    """The same options twice give byte-identical checkpoints; deterministic mode is on only during the run
    (the engine evaluation after it runs in the caller's mode); a different seed changes the weights."""
    from diffulex.quality.trainer import TrainOptions, train

    examples = [Example("copy", "Repeat: ab", ("ab",)), Example("reverse", "Reverse: abc", ("cba",))]
    seen: list[bool] = []

    def log(line: str) -> None:
        seen.append(torch.are_deterministic_algorithms_enabled())

    checkpoints = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        options = TrainOptions(
            "llada",
            str(tmp_path / name),
            steps=12,
            batch_size=4,
            seed=seed,
            size="toy",
            device="cpu",
            log_every=6,
        )
        train(options, log=log, examples=examples)
        checkpoints.append((tmp_path / name / "model.safetensors").read_bytes())
        assert not torch.are_deterministic_algorithms_enabled()
    assert seen and all(seen)
    assert checkpoints[0] == checkpoints[1] != checkpoints[2]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_training_runs_on_cuda_with_bf16_autocast(family: str, tmp_path: Path) -> None:
    """The CUDA path (device generator, bf16 autocast, fused AdamW) trains, saves and loads in the engine."""
    from diffulex.quality.trainer import TrainOptions, train

    options = TrainOptions(
        family, str(tmp_path), steps=30, batch_size=32, size="toy", train_per_task=50, log_every=10
    )
    result = train(options, log=lambda line: None)
    assert result.steps_done == 30 and result.losses[-1][1] < result.losses[0][1]  # it learns
    llm = LLM(str(tmp_path), device="cuda", max_model_len=256)
    [output] = llm.generate(encode_prompts(llm.tokenizer, [README_DEMO_PROMPT]))
    assert output.finish_reason in ("stop", "length") and output.num_forwards > 0


def test_embedding_by_matmul_equals_the_gather_and_its_gradient() -> None:
    """The training model's one-hot embedding gives the gathered rows exactly (in the weight's dtype,
    also under bf16 autocast) and the same weight gradient."""
    from diffulex.quality.train_model import embed_by_matmul

    embed = torch.nn.Embedding(104, 32)
    ids = torch.randint(0, 104, (3, 9), generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(3, 9, 32, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows = embed_by_matmul(embed, ids)
    assert rows.dtype == torch.float32 and torch.equal(rows, embed(ids))
    (rows * upstream).sum().backward()
    by_matmul, embed.weight.grad = embed.weight.grad, None
    (embed(ids) * upstream).sum().backward()
    torch.testing.assert_close(by_matmul, embed.weight.grad)


def test_compiled_training_computes_the_eager_losses(tmp_path: Path, one_thread) -> None:
    """``compile=True`` runs the same model through torch.compile: the same batches, losses equal to
    rounding, and the checkpoint still carries the official parameter names (not the compiled wrapper's);
    the inductor determinism switch is on only during the run."""
    import torch._inductor.config as inductor

    from diffulex.quality.trainer import TrainOptions, train

    examples = [Example("copy", "Repeat: ab", ("ab",)), Example("reverse", "Reverse: abc", ("cba",))]
    results, weights = [], []
    for compiled in (False, True):
        folder = tmp_path / str(compiled)
        options = TrainOptions(
            "llada",
            str(folder),
            steps=4,
            batch_size=4,
            size="toy",
            device="cpu",
            log_every=1,
            compile=compiled,
        )
        results.append(train(options, log=lambda line: None, examples=examples))
        weights.append(load_file(folder / "model.safetensors"))
        assert not inductor.deterministic
    eager, compiled_run = results
    torch.testing.assert_close(
        torch.tensor([loss for _, loss in compiled_run.losses]),
        torch.tensor([loss for _, loss in eager.losses]),
    )
    assert weights[0].keys() == weights[1].keys() and "model.transformer.wte.weight" in weights[1]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name].float(), tensor.float(), atol=1e-3, rtol=1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["llada", "sdar"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile"])
def test_training_on_cuda_is_deterministic(family: str, compiled: bool, tmp_path: Path) -> None:
    """The default size on the GPU, twice with the same options: byte-identical checkpoints (also with
    torch.compile, whose kernel choice must not depend on timing)."""
    from diffulex.quality.trainer import TrainOptions, train

    checkpoints = []
    for name in ("a", "b"):
        options = TrainOptions(
            family, str(tmp_path / name), steps=20, batch_size=64, train_per_task=200, compile=compiled
        )
        train(options, log=lambda line: None)
        checkpoints.append((tmp_path / name / "model.safetensors").read_bytes())
    assert checkpoints[0] == checkpoints[1]


def test_diffusion_loss_equals_the_mean_over_masked_positions(tmp_path: Path) -> None:
    """The sync-free loss (CE everywhere, zero weight where unmasked) is the selected-rows formula."""
    tokenizer = load_tokenizer(write_tokenizer_files("llada", tmp_path))
    examples = [Example("copy", "Repeat: ab", ("ab",)), Example("copy", "Repeat: abcdefgh", ("abcdefgh",))]
    rows = tokenize_rows(examples, tokenizer, "llada", 103, seed=0)
    batch = BATCH_BUILDERS["llada"](rows, 4, torch.Generator().manual_seed(1), gen_len=16)
    logits = torch.randn(*batch.targets.shape, 104, generator=torch.Generator().manual_seed(2))
    masked = batch.masked
    assert masked.any() and not masked.all()
    selected = torch.nn.functional.cross_entropy(logits[masked], batch.targets[masked], reduction="none")
    expected = (selected * batch.weights[masked]).sum() / batch.num_response_tokens
    torch.testing.assert_close(diffusion_loss(logits, batch), expected)
