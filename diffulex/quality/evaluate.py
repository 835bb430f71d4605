"""Accuracy versus speed of the decoding strategies on the task suite's test split, through the engine.

A ``Setting`` is one decoding configuration (strategy, engine options, ``steps``/``threshold``); its
``line`` groups a sweep into one curve of the plot. ``settings_for(family)`` lists the ones that apply to
a model family (the registry ``LINES``). ``evaluate`` runs each setting with ``diffulex.LLM`` on the chat
prompts of the test examples, greedy, ``max_tokens = EVAL_MAX_TOKENS``, and reports exact-match accuracy
(overall and per task), forwards per answer and tokens per forward (generated tokens, EOS excluded, over
forwards, as ``RequestOutput.tokens_per_forward``). ``report`` writes markdown, JSON and a plot.
"""

from __future__ import annotations

import gc
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from diffulex.llm import LLM
from diffulex.quality.checkpoint import encode_prompts
from diffulex.quality.tasks import Example, grade
from diffulex.request import RequestOutput
from diffulex.sampling_params import SamplingParams

EVAL_MAX_TOKENS = 16  # every answer plus its end-of-turn token fits
THRESHOLDS = (0.5, 0.7, 0.8, 0.9, 0.95)
STEP_SWEEP = (16, 8, 4)  # one, two and four tokens per step over a 16-token region
CHUNK = 64  # prompts handed to the engine at once (one progress update each)


@dataclass(frozen=True)
class Setting:
    """One decoding configuration; ``engine`` holds EngineConfig options as sorted (key, value) pairs."""

    line: str
    strategy: str
    engine: tuple[tuple[str, Any], ...] = ()
    steps: int | None = None
    threshold: float | None = None

    @property
    def label(self) -> str:
        knobs = [f"steps={self.steps}"] if self.steps is not None else []
        knobs += [f"threshold={self.threshold}"] if self.threshold is not None else []
        return f"{self.line} ({', '.join(knobs)})" if knobs else self.line

    def engine_options(self) -> dict[str, Any]:
        return {"strategy": self.strategy, **dict(self.engine)}


@dataclass(frozen=True)
class Line:
    """A family of settings drawn as one curve: ``build(thresholds)`` gives its points."""

    name: str
    strategy: str
    families: tuple[str, ...]
    build: Callable[[str, tuple[float, ...]], list[Setting]]


def _threshold_line(strategy: str, **engine: Any) -> Callable[[str, tuple[float, ...]], list[Setting]]:
    options = tuple(sorted(engine.items()))
    return lambda line, thresholds: [Setting(line, strategy, options, threshold=t) for t in thresholds]


def _steps_line(strategy: str, steps: Iterable[int | None], **engine: Any) -> Callable:
    options, sweep = tuple(sorted(engine.items())), tuple(steps)
    return lambda line, thresholds: [Setting(line, strategy, options, steps=s) for s in sweep]


LINES: dict[str, Line] = {
    line.name: line
    for line in (
        # LLaDA (bidirectional): the reference schedule, then threshold decoding with and without caches.
        Line("vanilla", "vanilla", ("llada",), _steps_line("vanilla", STEP_SWEEP)),
        Line("vanilla threshold", "vanilla", ("llada",), _threshold_line("vanilla")),
        Line("fast_dllm prefix", "fast_dllm", ("llada",), _threshold_line("fast_dllm", block_size=8)),
        Line(
            "fast_dllm dual",
            "fast_dllm",
            ("llada",),
            _threshold_line("fast_dllm", block_size=8, cache_mode="dual"),
        ),
        Line("d2f", "d2f", ("llada",), _threshold_line("d2f", block_size=4)),
        # SDAR (block-causal, block 4): one token per step, dynamic remasking, and pipelined blocks.
        Line(
            "block_diffusion static",
            "block_diffusion",
            ("sdar",),
            _steps_line("block_diffusion", (None,), remasking="static"),
        ),
        Line(
            "block_diffusion dynamic",
            "block_diffusion",
            ("sdar",),
            _threshold_line("block_diffusion", remasking="dynamic"),
        ),
        Line("multi_bd", "multi_bd", ("llada", "sdar"), _threshold_line("multi_bd", block_size=4)),
    )
}


def default_setting(family: str) -> Setting:
    """The family's own decoding at one token per step (the quick check after training)."""
    if family == "llada":
        return Setting("vanilla", "vanilla", steps=EVAL_MAX_TOKENS)
    return Setting("block_diffusion static", "block_diffusion", (("remasking", "static"),))


def settings_for(
    family: str, strategies: Iterable[str] | None = None, thresholds: Iterable[float] = THRESHOLDS
) -> list[Setting]:
    """Every setting of the lines that apply to ``family``, optionally only those of some strategies."""
    wanted = None if strategies is None else set(strategies)
    thresholds = tuple(thresholds)
    settings = []
    for line in LINES.values():
        if family in line.families and (wanted is None or line.strategy in wanted):
            settings += line.build(line.name, thresholds)
    if not settings:
        raise ValueError(f"no evaluation setting for family {family!r} and strategies {sorted(wanted or [])}")
    return settings


@dataclass
class SettingResult:
    """Measured quality and speed of one setting on a list of examples."""

    setting: Setting
    num_examples: int
    accuracy: float
    per_task: dict[str, float]
    forwards_per_answer: float
    tokens_per_forward: float
    wall_s: float
    errors: list[str] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)  # the first few outputs, for reading

    def as_dict(self) -> dict[str, Any]:
        return {
            "line": self.setting.line,
            "label": self.setting.label,
            "strategy": self.setting.strategy,
            "engine": dict(self.setting.engine),
            "steps": self.setting.steps,
            "threshold": self.setting.threshold,
            "num_examples": self.num_examples,
            "accuracy": self.accuracy,
            "per_task": self.per_task,
            "forwards_per_answer": self.forwards_per_answer,
            "tokens_per_forward": self.tokens_per_forward,
            "wall_s": self.wall_s,
            "errors": self.errors,
            "samples": self.samples,
        }


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def score(
    setting: Setting, examples: list[Example], outputs: list[RequestOutput], wall_s: float
) -> SettingResult:
    """Accuracy (overall, per task), forwards per answer and tokens per forward of finished outputs."""
    by_task: dict[str, list[bool]] = defaultdict(list)
    errors = [f"{o.request_id}: {o.error}" for o in outputs if o.finish_reason == "error"]
    for example, output in zip(examples, outputs):
        by_task[example.task].append(grade(example, output.text or ""))
    correct = sum(sum(flags) for flags in by_task.values())
    forwards = sum(o.num_forwards for o in outputs)
    tokens = sum(len(o.token_ids) for o in outputs)
    samples = [
        {"prompt": e.prompt, "output": o.text, "correct": grade(e, o.text or "")}
        for e, o in zip(examples[:8], outputs[:8])
    ]
    return SettingResult(
        setting=setting,
        num_examples=len(examples),
        accuracy=correct / max(1, len(examples)),
        per_task={task: sum(flags) / len(flags) for task, flags in by_task.items()},
        forwards_per_answer=forwards / max(1, len(outputs)),
        tokens_per_forward=tokens / forwards if forwards else 0.0,
        wall_s=wall_s,
        errors=errors,
        samples=samples,
    )


def run_setting(
    llm: LLM, setting: Setting, examples: list[Example], on_chunk: Callable[[int], None] | None = None
) -> SettingResult:
    """Generate every example's answer with ``setting`` on an engine built for it (greedy)."""
    params = SamplingParams(max_tokens=EVAL_MAX_TOKENS, steps=setting.steps, threshold=setting.threshold)
    prompts = encode_prompts(llm.tokenizer, [example.prompt for example in examples])
    outputs: list[RequestOutput] = []
    start = time.monotonic()
    for chunk in _chunks(prompts, CHUNK):
        outputs += llm.generate(chunk, params)
        if on_chunk is not None:
            on_chunk(len(chunk))
    return score(setting, examples, outputs, time.monotonic() - start)


def evaluate(
    model: str,
    settings: list[Setting],
    examples: list[Example],
    engine_options: dict[str, Any] | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> list[SettingResult]:
    """Run ``settings`` on ``examples`` with the checkpoint at ``model``; one engine per distinct set of
    engine options (settings that differ only by steps/threshold share it)."""
    groups: dict[tuple, list[Setting]] = defaultdict(list)
    for setting in settings:
        groups[(setting.strategy, setting.engine)].append(setting)
    results: dict[Setting, SettingResult] = {}
    for group in groups.values():
        llm = LLM(model, **{"max_model_len": 256, **(engine_options or {}), **group[0].engine_options()})
        for setting in group:
            results[setting] = run_setting(llm, setting, examples, on_chunk)
        del llm
        gc.collect()  # free the engine's KV pages before the next one is allocated
    return [results[setting] for setting in settings]


__all__ = [
    "EVAL_MAX_TOKENS",
    "LINES",
    "THRESHOLDS",
    "Setting",
    "SettingResult",
    "default_setting",
    "evaluate",
    "run_setting",
    "score",
    "settings_for",
]
