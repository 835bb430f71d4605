"""The quality suite: tasks and grading, the tiny tokenizer and its chat template, and the training and
evaluation scripts end to end at toy size on the CPU. The training code itself:
tests/test_quality_training.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffulex.llm import LLM
from diffulex.quality.checkpoint import (
    chat_prompt_renderer,
    encode_prompts,
    load_tokenizer,
    response_ids,
    write_tokenizer_files,
)
from diffulex.quality.tasks import (
    CAPITAL_OF_TEMPLATES,
    CAPITAL_OF_TRAIN_TEMPLATES,
    CAPITALS,
    COUNTRY_OF_TEMPLATES,
    COUNTRY_OF_TRAIN_TEMPLATES,
    MULTI_ANSWER_TASKS,
    README_DEMO_PROMPT,
    TASKS,
    Example,
    grade,
    make_suite,
)

REPO = Path(__file__).resolve().parents[1]


# ----- tasks ----------------------------------------------------------------------------------------------
def test_suite_is_deterministic_and_split_disjoint() -> None:
    train, test = make_suite(3, train_per_task=300)
    again_train, again_test = make_suite(3, train_per_task=300)
    assert train == again_train and test == again_test
    assert make_suite(4, train_per_task=300)[1] != test  # the seed matters
    assert {example.task for example in test} == set(TASKS)
    train_prompts = {example.prompt for example in train}
    single = [example for example in test if example.task not in MULTI_ANSWER_TASKS]
    assert single and not any(example.prompt in train_prompts for example in single)
    assert README_DEMO_PROMPT not in {example.prompt for example in test}  # a trained demo, not a test
    assert README_DEMO_PROMPT in train_prompts
    assert len({example.prompt for example in test}) == len(test)


def test_suite_answers_are_right_and_fit_the_generation() -> None:
    train, test = make_suite(0, train_per_task=200)
    for example in train + test:
        assert all(0 < len(answer) <= 14 for answer in example.answers), example
        multi = example.task in MULTI_ANSWER_TASKS
        assert (len(example.answers) > 1) == multi, example
        words = example.prompt.rstrip("?.").split()
        if example.task in ("addition", "subtraction", "multiplication"):
            a, b = int(words[2]), int(words[4])
            expected = {"addition": a + b, "subtraction": a - b, "multiplication": a * b}[example.task]
            assert example.answers == (str(expected),)
        elif example.task == "reverse":
            assert example.answers == (words[-1][::-1],)
        elif example.task == "sort":
            assert example.answers == ("".join(sorted(words[-1])),)
        elif example.task == "count":
            assert example.answers == (str(words[-1].count(words[2])),)
        elif example.task == "even_below":
            assert set(example.answers) == {str(n) for n in range(int(words[-1])) if n % 2 == 0}


def _phrasings(templates: tuple[str, ...], key: str) -> dict[str, str]:
    """Prompt -> template, over every fact."""
    index = 0 if key == "country" else 1
    return {template.format(**{key: fact[index]}): template for template in templates for fact in CAPITALS}


def test_training_only_rows_extend_the_training_split_and_leave_the_test_split_alone() -> None:
    """Extra phrasings of the capital facts and one-digit multiplications appear in training only: the test
    still asks each fact under one of the four test phrasings (never trained with that fact) and only
    two-digit by two-digit products."""
    train, test = make_suite(0, train_per_task=3000)
    for task, templates, extra, key in (
        ("capital_of", CAPITAL_OF_TEMPLATES, CAPITAL_OF_TRAIN_TEMPLATES, "country"),
        ("country_of", COUNTRY_OF_TEMPLATES, COUNTRY_OF_TRAIN_TEMPLATES, "capital"),
    ):
        tested = [e.prompt for e in test if e.task == task]
        trained = {e.prompt for e in train if e.task == task}
        assert len(tested) == len(CAPITALS) and set(tested) <= set(_phrasings(templates, key))
        assert not trained & set(tested)
        extra_prompts = _phrasings(extra, key)
        assert {extra_prompts[p] for p in trained if p in extra_prompts} == set(extra)

    def factor_digits(examples: list[Example]) -> list[tuple[int, int]]:
        products = [e.prompt.rstrip("?").split() for e in examples if e.task == "multiplication"]
        return [(len(words[2]), len(words[4])) for words in products]

    assert set(factor_digits(test)) == {(2, 2)}
    trained = factor_digits(train)
    one_digit = [digits for digits in trained if 1 in digits]
    assert len(one_digit) > 0.1 * len(trained)


def test_grade_strips_whitespace_and_checks_membership() -> None:
    single = Example("multiplication", README_DEMO_PROMPT, ("345",))
    assert grade(single, " 345\n") and not grade(single, "3450") and not grade(single, "")
    several = Example("any_capital", "Name a capital city.", ("Paris", "Rome"))
    assert grade(several, "Rome") and grade(several, "Paris ")
    assert not grade(several, "Parome") and not grade(several, "Paris Rome")


# ----- tokenizer and chat template ------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llada", "sdar"])
def test_tokenizer_round_trips_and_renders_the_chat_template(family: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, PretrainedConfig

    write_tokenizer_files(family, tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), config=PretrainedConfig())
    text = "Reverse: abc {x}\n~ 15 times 23?"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text  # one token per character
    messages = [{"role": "user", "content": README_DEMO_PROMPT}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert README_DEMO_PROMPT in rendered and rendered.endswith("\n")
    assert rendered.rstrip("\n").endswith("assistant" if family == "sdar" else "<|end_header_id|>")
    assert chat_prompt_renderer(tokenizer)(README_DEMO_PROMPT) == rendered
    [prompt_ids] = encode_prompts(tokenizer, [README_DEMO_PROMPT])
    assert tokenizer.decode(prompt_ids) == rendered
    assert len(prompt_ids) < len(rendered)  # the special tokens are single ids
    response = response_ids(family, tokenizer, "345", 8)
    tokens = tokenizer.convert_ids_to_tokens(response)
    end_of_turn = "<|eot_id|>" if family == "llada" else "<|im_end|>"
    assert tokens == ["3", "4", "5", end_of_turn] + ["<|endoftext|>"] * 4


# ----- scripts end to end ---------------------------------------------------------------------------------
def _run(script: str, *args: str) -> str:
    # One thread: the toy model gains nothing from two, and OpenMP threads spin badly on a busy machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "scripts" / script), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "tiny-llada"
    stdout = _run(
        "train_tiny.py",
        *("--family", "llada", "--out", str(out), "--size", "toy", "--steps", "20", "--batch-size", "8"),
        *("--train-per-task", "20", "--log-every", "10", "--device", "cpu", "--eval-limit", "4"),
        *("--d2f-fraction", "0.5"),
    )
    assert "step 20/20" in stdout and "engine check" in stdout
    return out


def test_train_tiny_writes_a_checkpoint_the_engine_generates_from(toy_checkpoint: Path) -> None:
    record = json.loads((toy_checkpoint / "training.json").read_text())
    assert record["steps_done"] == 20 and len(record["losses"]) == 2
    assert record["options"]["d2f_fraction"] == 0.5
    config = json.loads((toy_checkpoint / "config.json").read_text())
    assert config["model_type"] == "llada" and config["torch_dtype"] == "bfloat16"
    llm = LLM(str(toy_checkpoint), device="cpu", dtype="float32", max_model_len=256)
    [output] = llm.generate(encode_prompts(load_tokenizer(toy_checkpoint), [README_DEMO_PROMPT]))
    assert output.finish_reason in ("stop", "length") and output.num_forwards > 0
    assert output.text is not None


def test_eval_quality_writes_its_report(toy_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "quality.md"
    _run(
        "eval_quality.py",
        *("--model", str(toy_checkpoint), "--limit", "4", "--device", "cpu", "--out", str(out)),
        *("--strategies", "vanilla,d2f", "--thresholds", "0.9"),
    )
    report = json.loads(out.with_suffix(".json").read_text())
    [model] = report["models"]
    labels = [result["label"] for result in model["results"]]
    assert labels == ["vanilla (steps=16)", "vanilla (steps=8)", "vanilla (steps=4)"] + [
        "vanilla threshold (threshold=0.9)",
        "d2f (threshold=0.9)",
    ]
    for result in model["results"]:
        assert result["num_examples"] == 4 and not result["errors"]
        assert 0 < result["forwards_per_answer"]
        if result["steps"] is not None:  # the fixed schedule never exceeds its steps (EOS can stop it early)
            assert result["forwards_per_answer"] <= result["steps"]
    text = out.read_text()
    assert "vanilla (steps=16)" in text and "quality.png" in text
    assert out.with_suffix(".png").stat().st_size > 1000
