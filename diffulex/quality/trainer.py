"""The training loop of the bundled tiny models: AdamW, warmup + cosine schedule, fixed step count.

Seeded: the suite, the tokenized rows, the initial weights and every batch (one ``torch.Generator`` on the
device) follow from the seeds. With ``deterministic`` (the default) the run also uses only deterministic
kernels (``torch.use_deterministic_algorithms``, cuBLAS with a fixed workspace): on the GPU the
attention backward otherwise splits keys across blocks that add into the same gradients in whatever
order they finish, and two runs of the same command drift apart. On CUDA the forward runs under bf16
autocast with float32 master weights (``compile``, ``train_tiny.py``'s default there, runs it through
torch.compile); the checkpoint is saved in bf16 (``write_checkpoint``).
"""

from __future__ import annotations

import math
import os
import platform
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffulex.quality.checkpoint import load_tokenizer, model_config, write_checkpoint, write_tokenizer_files
from diffulex.quality.tasks import Example, make_suite
from diffulex.quality.train_model import TinyDiffusionLM
from diffulex.quality.training import (
    BATCH_BUILDERS,
    TokenizedRows,
    choose_gen_length,
    diffusion_loss,
    tokenize_rows,
)

Log = Callable[[str], None]


@dataclass
class TrainOptions:
    """Everything a training run depends on (recorded in the checkpoint's ``training.json``)."""

    family: str
    out_dir: str
    steps: int = 5000
    batch_size: int = 512
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 200
    weight_decay: float = 0.1
    seed: int = 0
    suite_seed: int = 0
    train_per_task: int = 100_000  # distinct rows matter: 10^4 per task let the arithmetic be memorised
    size: str = "default"
    device: str = "auto"
    log_every: int = 100
    time_limit_s: float | None = None  # safety stop: saves what it has (the schedule is cut short)
    time_budget_s: float | None = None  # size the schedule to this time (steps = the cap), see train()
    d2f_fraction: float = 0.0  # LLaDA only: share of batches in D2F's block-causal layout
    deterministic: bool = True  # deterministic kernels only: the same command gives the same weights
    compile: bool = False  # torch.compile the model's forward (CUDA: fewer, fused kernels per step)


@dataclass
class TrainResult:
    """What a run produced: the checkpoint folder, steps done and the last logged loss."""

    out_dir: Path
    steps_done: int
    final_loss: float
    elapsed_s: float
    stopped_early: bool
    losses: list[tuple[int, float]] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class WarmupCosine:
    """LR multiplier: linear warmup to 1, then cosine down to ``min_ratio`` at ``total_steps``.

    The warmup is capped at a tenth of the steps it is built with (toy runs); ``total_steps`` may be
    lowered during the warmup (time budget) without changing any multiplier already used.
    """

    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __post_init__(self) -> None:
        self.warmup_steps = max(1, min(self.warmup_steps, self.total_steps // 10 or 1))

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


CALIBRATION = (10, 60)  # steps timed to size a time budget (after the first kernels are compiled/cached)


def steps_for_budget(budget_s: float, elapsed_s: float, step_s: float, done: int, cap: int) -> int:
    """Total steps that fit ``budget_s`` at ``step_s`` per step (5% margin), at most ``cap``."""
    return max(done + 1, min(cap, done + int(0.95 * (budget_s - elapsed_s) / step_s)))


def build_optimizer(model: TinyDiffusionLM, options: TrainOptions, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (norm weights are not decayed)."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": matrices, "weight_decay": options.weight_decay},
        {"params": vectors, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=options.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# cuBLAS reproducibility needs a fixed workspace configuration (read when its handle is created).
CUBLAS_WORKSPACE = ":4096:8"


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Use only deterministic kernels inside the block (an op without one raises), then restore the
    previous setting, so that the engine run after training is unaffected."""
    if not enabled:
        yield
        return
    # Imported here: loading torch._inductor costs ~1.4 s, which every importer of this module (scripts'
    # --help, the engine-side tests) would otherwise pay up front.
    import torch._inductor.config as inductor

    previous = torch.are_deterministic_algorithms_enabled()
    previous_inductor = inductor.deterministic
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    # torch.compile (``TrainOptions.compile``) would otherwise pick reduction kernels by timing them,
    # and a different pick sums in a different order.
    inductor.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
        inductor.deterministic = previous_inductor


def train(options: TrainOptions, log: Log = print, examples: list[Example] | None = None) -> TrainResult:
    """Train ``options.family`` on the task suite (or on ``examples``, e.g. to overfit a handful in a
    test) and write the checkpoint to ``options.out_dir``.

    With ``time_budget_s``, steps ``CALIBRATION`` are timed and the schedule's total is set, during the
    warmup, to the steps that fit the budget (``options.steps`` is then the cap). The run is recorded with
    that total: the same options with ``steps`` = it and no budget give the same schedule and batches.
    """
    with deterministic_algorithms(options.deterministic):
        return _train(options, log, examples)


@dataclass
class TrainingSession:
    """A prepared run: tokenized rows on the device, the model, optimizer, schedule and the batch streams.

    ``step(index)`` performs one optimizer step and returns the loss (still on the device: reading it
    would make the host wait). ``train()`` drives it; ``scripts/bench_training.py`` times it."""

    options: TrainOptions
    device: torch.device
    config: dict[str, Any]
    out_dir: Path
    rows: TokenizedRows
    model: TinyDiffusionLM
    forward: Callable[..., torch.Tensor]  # the model, or its torch.compile'd wrapper (same parameters)
    optimizer: torch.optim.AdamW
    schedule: WarmupCosine
    generator: torch.Generator
    lengths: random.Random

    @property
    def num_rows(self) -> int:
        return self.rows.sequences.shape[0]

    def step(self, index: int) -> torch.Tensor:
        options = self.options
        for group in self.optimizer.param_groups:
            group["lr"] = options.lr * self.schedule(index)
        layout = "llada_d2f" if self.lengths.random() < options.d2f_fraction else options.family
        batch = BATCH_BUILDERS[layout](
            self.rows, options.batch_size, self.generator, choose_gen_length(self.lengths)
        )
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.forward(batch.input_ids, batch.positions, batch.visible, batch.logits_rows)
        loss = diffusion_loss(logits, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        return loss.detach()


def tokenized_suite(
    options: TrainOptions, tokenizer_dir: str | Path, examples: list[Example] | None = None
) -> TokenizedRows:
    """The training rows of ``options`` (its suite, or ``examples``), tokenized with the tokenizer files
    in ``tokenizer_dir`` (``write_tokenizer_files``)."""
    if examples is None:
        examples, _ = make_suite(options.suite_seed, train_per_task=options.train_per_task)
    mask_token_id = int(model_config(options.family, options.size)["mask_token_id"])
    return tokenize_rows(examples, load_tokenizer(tokenizer_dir), options.family, mask_token_id, options.seed)


def prepare(
    options: TrainOptions, examples: list[Example] | None = None, rows: TokenizedRows | None = None
) -> TrainingSession:
    """Seed, write the tokenizer files, tokenize the suite (or ``examples``; or take ready ``rows``), and
    build the model, optimizer, schedule and batch streams of ``options``."""
    if options.d2f_fraction and options.family != "llada":
        raise ValueError("d2f_fraction applies to the llada family only")
    device = resolve_device(options.device)
    torch.manual_seed(options.seed)
    config = model_config(options.family, options.size)
    out_dir = write_tokenizer_files(options.family, options.out_dir)
    if rows is None:
        rows = tokenized_suite(options, out_dir, examples)
    rows = rows.to(device)
    model = TinyDiffusionLM(config).to(device)
    # Inductor fuses the norms, RoPE, SwiGLU and the loss's elementwise work: the tiny model's step is
    # otherwise bound by hundreds of small kernels, not by its arithmetic (docs/perf-notes.md).
    forward = torch.compile(model, dynamic=False) if options.compile else model  # three static lengths
    return TrainingSession(
        options=options,
        device=device,
        config=config,
        out_dir=out_dir,
        rows=rows,
        model=model,
        forward=forward,
        optimizer=build_optimizer(model, options, device),
        schedule=WarmupCosine(options.warmup_steps, options.steps, options.min_lr_ratio),
        generator=torch.Generator(device=device).manual_seed(options.seed),
        lengths=random.Random(f"{options.seed}:gen_lengths"),  # host-side: no device sync per batch
    )


def _train(options: TrainOptions, log: Log, examples: list[Example] | None) -> TrainResult:
    session = prepare(options, examples)
    device, model, schedule, optimizer = session.device, session.model, session.schedule, session.optimizer
    num_params = sum(p.numel() for p in model.parameters())
    log(
        f"[{options.family}] {num_params / 1e6:.2f}M parameters, {session.num_rows} training rows of "
        f"{session.rows.sequences.shape[1]} tokens, {options.steps} steps x {options.batch_size} on {device}"
    )
    start = time.monotonic()
    running = torch.zeros((), device=device)
    losses: list[tuple[int, float]] = []
    steps_done, stopped_early = 0, False
    calibration_start = 0.0
    model.train()
    for step in range(options.steps):
        if step >= schedule.total_steps:
            break
        running += session.step(step)
        steps_done = step + 1
        if options.time_budget_s is not None and steps_done in CALIBRATION:
            _synchronize(device)
            if steps_done == CALIBRATION[0]:
                calibration_start = time.monotonic()
            else:
                step_s = (time.monotonic() - calibration_start) / (CALIBRATION[1] - CALIBRATION[0])
                schedule.total_steps = steps_for_budget(
                    options.time_budget_s, time.monotonic() - start, step_s, steps_done, options.steps
                )
                log(
                    f"[{options.family}] {1000 * step_s:.1f} ms/step: {schedule.total_steps} steps fit the "
                    f"time budget of {options.time_budget_s:.0f}s (rerun: --steps {schedule.total_steps})"
                )
        last = steps_done == schedule.total_steps
        if steps_done % options.log_every == 0 or last:
            interval = (steps_done - 1) % options.log_every + 1
            mean_loss = running.item() / interval  # the only host sync of the loop
            running.zero_()
            losses.append((steps_done, mean_loss))
            elapsed = time.monotonic() - start
            eta = elapsed / steps_done * (schedule.total_steps - steps_done)
            log(
                f"[{options.family}] step {steps_done}/{schedule.total_steps} loss {mean_loss:.4f} "
                f"lr {optimizer.param_groups[0]['lr']:.2e} {elapsed:.0f}s elapsed, eta {eta:.0f}s"
            )
            if options.time_limit_s is not None and elapsed > options.time_limit_s and not last:
                log(f"[{options.family}] time limit {options.time_limit_s}s reached: stopping early")
                stopped_early = True
                break
    elapsed = time.monotonic() - start
    record = {
        "options": asdict(options),
        "steps_done": steps_done,
        "schedule_steps": schedule.total_steps,
        "warmup_steps": schedule.warmup_steps,
        "stopped_early": stopped_early,
        "num_parameters": num_params,
        "losses": losses,
        "elapsed_s": round(elapsed, 1),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "torch": torch.__version__,
    }
    write_checkpoint(
        session.config, model.state_dict(), session.out_dir, extra_files={"training.json": record}
    )
    final = losses[-1][1] if losses else float("nan")
    return TrainResult(session.out_dir, steps_done, final, elapsed, stopped_early, losses)


__all__ = [
    "TrainOptions",
    "TrainResult",
    "TrainingSession",
    "WarmupCosine",
    "build_optimizer",
    "deterministic_algorithms",
    "prepare",
    "resolve_device",
    "tokenized_suite",
    "steps_for_budget",
    "train",
]
