"""The quality report: a markdown table per model, per-task accuracy, a JSON record and a plot of
exact-match accuracy against tokens per forward (one line per decoding strategy, one panel per model)."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffulex.quality.evaluate import EVAL_MAX_TOKENS, SettingResult


@dataclass
class ModelReport:
    """The results of every setting on one checkpoint."""

    name: str
    path: str
    family: str
    results: list[SettingResult]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.path,
            "family": self.family,
            "results": [result.as_dict() for result in self.results],
        }


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def summary_table(results: list[SettingResult]) -> list[str]:
    lines = [
        "| strategy | setting | exact match | forwards / answer | tokens / forward |",
        "|---|---|---:|---:|---:|",
    ]
    for result in results:
        setting = result.setting
        lines.append(
            f"| {setting.strategy} | {setting.label} | {_percent(result.accuracy)} | "
            f"{result.forwards_per_answer:.2f} | {result.tokens_per_forward:.2f} |"
        )
    return lines


def per_task_table(results: list[SettingResult]) -> list[str]:
    tasks = list(dict.fromkeys(task for result in results for task in result.per_task))
    lines = ["| setting | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for result in results:
        cells = [f"{100 * result.per_task[t]:.0f}" if t in result.per_task else "" for t in tasks]
        lines.append(f"| {result.setting.label} | " + " | ".join(cells) + " |")
    return lines


def markdown(reports: list[ModelReport], meta: dict[str, Any], plot_name: str | None) -> str:
    out = [
        "# Decoding quality of the bundled tiny models",
        "",
        f"Exact match on {meta['num_examples']} prompts of the synthetic test split (suite seed "
        f"{meta['suite_seed']}; `diffulex/quality/tasks.py`), greedy, `max_tokens={EVAL_MAX_TOKENS}`, "
        f"chat template applied, on {meta['device']}. Forwards per answer = model calls per request "
        "(`RequestOutput.num_forwards`); tokens per forward = generated tokens (EOS excluded) / forwards. "
        "Multi-answer tasks (any_capital, any_country, even_below, number_between) accept any valid "
        "answer: decoding several tokens at once can mix two answers into an invalid one.",
        "",
        "Written by `scripts/eval_quality.py`; the raw numbers are in the JSON file beside this one.",
        "",
    ]
    if plot_name:
        out += [f"![accuracy vs tokens per forward]({plot_name})", ""]
    for report in reports:
        out += [f"## {report.name} ({report.family})", "", *summary_table(report.results), ""]
        out += ["Per-task exact match (%):", "", *per_task_table(report.results), ""]
        errors = [error for result in report.results for error in result.errors]
        if errors:
            out += [f"**{len(errors)} requests failed**, e.g. `{errors[0]}`", ""]
    return "\n".join(out)


def plot(reports: list[ModelReport], path: Path) -> bool:
    """Accuracy vs tokens per forward, one panel per model; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(1, len(reports), figsize=(6.5 * len(reports), 4.5), squeeze=False)
    for axis, report in zip(axes[0], reports):
        lines: dict[str, list[SettingResult]] = defaultdict(list)
        for result in report.results:
            lines[result.setting.line].append(result)
        for name, points in lines.items():
            points = sorted(points, key=lambda r: r.tokens_per_forward)
            xs = [r.tokens_per_forward for r in points]
            ys = [100 * r.accuracy for r in points]
            axis.plot(xs, ys, marker="o", label=name)
        axis.set_title(f"{report.name} ({report.family})")
        axis.set_xlabel("tokens per forward")
        axis.set_ylabel("exact match (%)")
        axis.set_ylim(-2, 102)  # the same scale on every panel
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def write_report(reports: list[ModelReport], out: Path, meta: dict[str, Any]) -> list[Path]:
    """Write ``out`` (markdown), ``out.json`` and ``out.png`` (same stem); return the paths written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, plot_path = out.with_suffix(".json"), out.with_suffix(".png")
    record = {**meta, "max_tokens": EVAL_MAX_TOKENS, "models": [report.as_dict() for report in reports]}
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    written = [json_path]
    plotted = plot(reports, plot_path)
    if plotted:
        written.append(plot_path)
    out.write_text(markdown(reports, meta, plot_path.name if plotted else None) + "\n")
    return [out, *written]


__all__ = ["ModelReport", "markdown", "per_task_table", "plot", "summary_table", "write_report"]
