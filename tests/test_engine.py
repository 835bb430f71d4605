"""Engine behaviour end to end on CPU: bad input, failures isolated to one request, stop conditions,
text prompts, forward_logits and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from diffulex import SamplingParams
from diffulex.cli import app
from diffulex.config import ConfigError
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint


def greedy(**kwargs) -> SamplingParams:
    kwargs.setdefault("max_tokens", 8)
    return SamplingParams(**kwargs)


# ----- bad input ----------------------------------------------------------------------------------------
def test_bad_requests_fail_clearly_and_leave_the_engine_working(tiny_llada, make_llm) -> None:
    llm = make_llm(tiny_llada, strategy="vanilla", block_size=4, max_model_len=64)
    with pytest.raises(ValueError, match="prompt is empty"):
        llm.generate([[]], greedy())
    with pytest.raises(ValueError, match="exceeds max_model_len"):
        llm.generate([[5] * 60], greedy())
    with pytest.raises(ValueError, match="block_size \\(4\\) must divide max_tokens \\(10\\)"):
        llm.generate([[5, 6]], greedy(max_tokens=10))
    with pytest.raises(ValueError, match="steps \\(3\\) must be a multiple"):
        llm.generate([[5, 6]], greedy(steps=3))
    with pytest.raises(ValueError, match="token ids must be integers in \\[0, 256\\)"):
        llm.generate([[5, 999]], greedy())
    # A bad request in a list enqueues nothing: the good ones before it are withdrawn.
    with pytest.raises(ValueError):
        llm.generate([[5, 6], []], greedy())
    assert not llm.engine.has_unfinished()
    out = llm.generate([[5, 6, 7]], greedy(ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.finish_reason == "length"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": 0}, "max_tokens must be a positive integer"),
        ({"max_tokens": -3}, "max_tokens must be a positive integer"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"threshold": 1.5}, "threshold must be in"),
        ({"unmask_policy": "loudest"}, "unmask_policy must be one of probability, margin, entropy, random"),
        ({"steps": 0}, "steps must be a positive integer"),
    ],
)
def test_sampling_params_validation(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_unknown_strategy_and_config_errors_name_the_problem(tiny_llada, make_llm) -> None:
    with pytest.raises(ValueError, match="unknown strategy 'telepathy'; available: block_diffusion, d2f"):
        make_llm(tiny_llada, strategy="telepathy")
    with pytest.raises(ConfigError, match="unknown key 'blocksize'"):
        make_llm(tiny_llada, blocksize=4)
    with pytest.raises(ConfigError, match="'cache_mode'"):
        make_llm(tiny_llada, cache_mode="triple")
    with pytest.raises(ConfigError, match="'block_size'"):
        make_llm(tiny_llada, block_size=0)


def test_nan_logits_fail_only_that_request(tiny_llada, make_llm) -> None:
    llm = make_llm(tiny_llada, strategy="vanilla", block_size=4)
    poison = 77
    embedding = next(m for m in llm.engine.runner.model.modules() if isinstance(m, torch.nn.Embedding))

    def inject_nan(module, inputs, output):
        return output.masked_fill((inputs[0] == poison).unsqueeze(-1), float("nan"))

    handle = embedding.register_forward_hook(inject_nan)
    try:
        good, bad = llm.generate([[5, 6, 7], [5, poison, 7]], greedy(ignore_eos=True))
    finally:
        handle.remove()
    assert good.finish_reason == "length" and len(good.token_ids) == 8
    assert bad.finish_reason == "error" and "NaN" in bad.error and bad.token_ids == []
    again = llm.generate([[5, 6, 7]], greedy(ignore_eos=True))[0]
    assert again.token_ids == good.token_ids


# ----- stop conditions ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("family", "options"),
    [
        ("llada", {"strategy": "vanilla", "block_size": 4}),
        ("sdar", {"strategy": "block_diffusion", "block_size": 4}),
        ("llada", {"strategy": "d2f", "block_size": 4}),
        ("sdar", {"strategy": "multi_bd", "block_size": 4}),
    ],
)
def test_stop_token_cuts_output_at_its_first_occurrence(family, options, tiny_paths, make_llm) -> None:
    llm = make_llm(tiny_paths[family], **options)
    prompt = [40, 41, 42, 43, 44]
    full = llm.generate([prompt], greedy(max_tokens=16, ignore_eos=True, threshold=0.5))[0].token_ids
    stop_id = full[5]
    cut = full.index(stop_id)
    out = llm.generate(
        [prompt], greedy(max_tokens=16, ignore_eos=True, threshold=0.5, stop_token_ids=[stop_id])
    )[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == full[:cut]


def test_eos_stops_unless_ignored(tiny_llada, tmp_path, make_llm) -> None:
    base = make_llm(tiny_llada, strategy="vanilla", block_size=4)
    prompt = [40, 41, 42]
    full = base.generate([prompt], greedy(max_tokens=16, ignore_eos=True))[0].token_ids
    # Rebuild the same weights with the EOS id set to a token the model produces at position 6.
    eos = full[6]
    ckpt = write_tiny_checkpoint("llada", tmp_path / "eos", seed=1, eos_token_id=eos, pad_token_id=eos)
    llm = make_llm(ckpt, strategy="vanilla", block_size=4)
    stopped = llm.generate([prompt], greedy(max_tokens=16))[0]
    assert stopped.finish_reason == "stop" and stopped.token_ids == full[: full.index(eos)]
    kept = llm.generate([prompt], greedy(max_tokens=16, ignore_eos=True))[0]
    assert kept.finish_reason == "length" and kept.token_ids == full


def test_stop_string_truncates_text(tiny_llada, make_llm) -> None:
    llm = make_llm(tiny_llada, strategy="vanilla", block_size=4)
    # Random weights emit many reserved special tokens (no text): use a prompt whose output has text.
    candidates = ["Hi", "abc", "What is 15 times 23?", "xyz", "Hello world", "0123", "qq", "Tell me"]
    outputs = llm.generate(candidates, greedy(max_tokens=16, ignore_eos=True))
    prompt, full = next((p, o) for p, o in zip(candidates, outputs) if o.text and len(o.text) >= 6)
    stop = full.text[4:6]
    out = llm.generate([prompt], greedy(max_tokens=16, ignore_eos=True, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[: full.text.index(stop)]
    assert stop not in out.text


# ----- prompts, tokenizer, logits -----------------------------------------------------------------------
def test_text_and_token_prompts_mix(tiny_llada, make_llm) -> None:
    llm = make_llm(tiny_llada, strategy="vanilla", block_size=4)
    ids = llm.tokenizer.encode("hello", add_special_tokens=False)
    by_text, by_ids = llm.generate(["hello", ids], greedy(ignore_eos=True))
    assert by_text.token_ids == by_ids.token_ids
    assert by_text.text == llm.tokenizer.decode(by_text.token_ids, skip_special_tokens=True)


def test_checkpoint_without_tokenizer_takes_ids_and_rejects_text(tmp_path, make_llm) -> None:
    ckpt = write_tiny_checkpoint("llada", tmp_path / "notok", seed=3, with_tokenizer=False)
    llm = make_llm(ckpt, strategy="vanilla", block_size=4)
    out = llm.generate([[1, 2, 3]], greedy(ignore_eos=True))[0]
    assert len(out.token_ids) == 8 and out.text is None
    with pytest.raises(ValueError, match="no tokenizer files"):
        llm.generate(["hello"], greedy())


def test_forward_logits_modes(tiny_sdar, make_llm) -> None:
    llm = make_llm(tiny_sdar, block_size=4)
    ids = [3, 4, 5, 6, 7, 8, 9, 10]
    native = llm.forward_logits(ids)
    causal = llm.forward_logits(ids, attention="block_causal", block_size=4)
    bidirectional = llm.forward_logits(ids, attention="bidirectional")
    assert native.shape == (8, llm.engine.spec.vocab_size) and native.dtype == torch.float32
    assert torch.equal(native, causal)
    # The first block cannot see the second under block-causal attention, but can bidirectionally.
    assert not torch.allclose(causal[:4], bidirectional[:4])
    assert torch.equal(llm.forward_logits(ids[:4], attention="block_causal", block_size=4), causal[:4])
    with pytest.raises(ValueError, match="attention must be"):
        llm.forward_logits(ids, attention="sideways")  # type: ignore[arg-type]


def test_family_defaults_apply_without_options(tiny_sdar, make_llm) -> None:
    llm = make_llm(tiny_sdar)
    assert llm.engine.strategy_name == "block_diffusion" and llm.engine.block_size == 4
    out = llm.generate([[5, 6, 7]], greedy(ignore_eos=True))[0]
    assert len(out.token_ids) == 8


def test_temperature_sampling_is_seeded_and_batch_invariant(tiny_llada, make_llm) -> None:
    llm = make_llm(tiny_llada, strategy="vanilla", block_size=4)
    params = greedy(max_tokens=16, temperature=1.0, seed=123, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], params)[0].token_ids
    batched = llm.generate([[9, 9], [5, 6, 7]], params)[1].token_ids
    other_seed = llm.generate([[5, 6, 7]], greedy(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True))[0]
    assert alone == batched
    assert other_seed.token_ids != alone


# ----- CLI ----------------------------------------------------------------------------------------------
def test_cli_generate_json(tiny_llada) -> None:
    result = CliRunner().invoke(
        app,
        [
            "generate",
            "--model",
            str(tiny_llada),
            "--prompt",
            "hi",
            "--max-tokens",
            "8",
            "--ignore-eos",
            "--json",
            "--set",
            "device=cpu",
            "--set",
            "strategy=vanilla",
            "--set",
            "block_size=4",
        ],
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.output.strip().splitlines()[-1])
    assert record["finish_reason"] == "length" and len(record["token_ids"]) == 8


def test_cli_reports_bad_option(tiny_llada) -> None:
    result = CliRunner().invoke(
        app, ["generate", "--model", str(tiny_llada), "--prompt", "x", "--set", "nope=1"]
    )
    assert result.exit_code == 2
    assert "unknown key 'nope'" in result.output
