"""The shipped trained tiny models: they answer, through the CLI and the server, and keep their accuracy.

The minimums below were recorded from the shipped checkpoints on this fixed subset (CPU, float32) with
a margin of a few examples; a regression in the engine, the loader, the tokenizer or a strategy that
changes what these models decode shows up as a drop below them.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffulex.cli import app
from diffulex.llm import BUNDLED_MODELS_DIR, default_model_path
from diffulex.quality.evaluate import Setting, evaluate
from diffulex.quality.tasks import README_DEMO_PROMPT, make_suite
from tests.server_fixtures import serve

PER_TASK = 4  # the first 4 test examples of each of the 13 tasks: 52 answers per setting


def _subset() -> list:
    _, test = make_suite(0)
    counts: dict[str, int] = {}
    subset = []
    for example in test:
        if counts.get(example.task, 0) < PER_TASK:
            counts[example.task] = counts.get(example.task, 0) + 1
            subset.append(example)
    return subset


# (model, setting, minimum exact-match accuracy on the subset)
# Measured 2026-11-24 on the shipped checkpoints (deterministic, compiled training: 16,000 / 8,000
# steps): 96.2% / 96.2% (16.0 / 2.4 forwards per answer) for tiny-llada, 94.2% / 94.2% (8.9 / 4.9
# forwards) for tiny-sdar; minimums two examples below.
CASES = [
    ("tiny-llada", Setting("vanilla", "vanilla", steps=16), 0.92),
    ("tiny-llada", Setting("vanilla threshold 0.9", "vanilla", threshold=0.9), 0.92),
    ("tiny-sdar", Setting("block_diffusion static", "block_diffusion", (("remasking", "static"),)), 0.90),
    (
        "tiny-sdar",
        Setting("block_diffusion dynamic 0.9", "block_diffusion", (("remasking", "dynamic"),), threshold=0.9),
        0.90,
    ),
]


@pytest.mark.parametrize("model, setting, minimum", CASES, ids=[c[1].line + f" {c[0]}" for c in CASES])
def test_shipped_models_keep_their_accuracy(model: str, setting: Setting, minimum: float) -> None:
    examples = _subset()
    [result] = evaluate(str(BUNDLED_MODELS_DIR / model), [setting], examples, {"device": "cpu"})
    assert not result.errors
    assert result.accuracy >= minimum, f"{model} {setting.line}: {result.accuracy:.2%} < {minimum:.0%}"
    if setting.threshold is not None:  # threshold decoding must actually save forwards
        assert result.forwards_per_answer < 16


def test_cli_default_model_answers_the_quick_start_question() -> None:
    result = CliRunner().invoke(app, ["generate", "--prompt", README_DEMO_PROMPT, "--max-tokens", "16"])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "345"


def test_server_default_model_answers_through_http() -> None:
    server = serve(Path(default_model_path()), {"device": "cpu"})
    served = next(server)
    try:
        body = {
            "model": served.model,
            "messages": [{"role": "user", "content": README_DEMO_PROMPT}],
            "max_tokens": 16,
        }
        request = urllib.request.Request(
            f"{served.url}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        assert served.model == "tiny-llada"
        assert answer["choices"][0]["message"]["content"].strip() == "345"
    finally:
        next(server, None)
