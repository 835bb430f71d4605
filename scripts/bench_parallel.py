"""Multi-GPU benchmark: tensor / expert / data parallelism on random bf16 checkpoints (NCCL).

For a machine of 2, 4 or 8 H200s (nvidia-h200-x2/x4/x8); every number comes from the same run:
  0. writes two random bf16 checkpoints once, in the official Hugging Face layout (config.json, sharded
     safetensors + model.safetensors.index.json), generated on the GPU tensor by tensor so host memory
     stays small: the LLaDA-8B shape (``bench_gpu_models.LLADA_8B``) and a LLaDA2-mini-shaped MoE (below);
  1. correctness: for every TP size of ``--tp`` that fits the visible GPUs, the greedy token ids of four
     fixed prompts (block_diffusion, block 32, 4 tokens per forward, ignore_eos) against TP=1's, for both
     models (the MoE also with expert_parallel_size = tp); equal or not, the first differing position, and
     the full logits of one prompt (max difference, top-1 agreement). Random weights in bf16 leave small
     top-1 margins, so rounding alone (all-reduce order) can flip a token: when bf16 tokens differ the case
     is rerun with float32 compute of the same bf16 weights (``--fp32-recheck``), where they should not;
  2. speed (dense model), per TP size: batch-1 wall ms per forward (32-token block over a 1,024-token
     context, CUDA graphs, one forward per host sync: bench_gpu's "syncing every forward" case) and
     batched denoising steps at 1, 8, 32, 64 running requests (block 32): step ms, tokens/s and scaling
     efficiency = (TP=1 time / TP=N time) / N;
  3. data parallelism (``--dp 2``): two replicas, one process each on its own GPU (the offline ``LLM``
     runs one engine; ``data_parallel_size`` is the server's), stepping 64 running requests between them
     at the same time: aggregate tokens/s against one GPU's tokens/s at 64 requests (section 2, TP=1).
Writes <out>/bench_parallel.json (rewritten after every case, so a run cut short keeps what it measured)
and prints a table last.

    python scripts/bench_parallel.py --out $OUT [--tp 1 2 4 8] [--dp 2] [--quick]
    python scripts/bench_parallel.py --out $OUT --models moe          # one part per call (10-minute limit)
    python scripts/bench_parallel.py --out $OUT --cpu-smoke           # tiny shapes, CPU, gloo, TP 1 and 2

NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 are set at import (before torch.distributed or NCCL start); a caller that set one of
them to another value is refused.

LLaDA2-mini shape (inclusionAI/LLaDA2.0-mini, as in docs/models.md): hidden 2048, 20 layers (the first
dense, ``first_k_dense_replace`` 1), 16 query / 4 KV heads of head_dim 128, 256 experts of intermediate
512, top-8 from 4 of 8 groups, 1 shared expert, vocab 157184, qk-norm, partial rotary 0.5, rope_theta
600000. The dense first layer's ``intermediate_size`` 5120: the value (with all of the above) in the
``llada2_moe`` configs that two independent public loaders test against; the published config.json itself
could not be read here. Each rank of a TP launch loads the checkpoint from the folder (as
``LLM(path, tensor_parallel_size=N)`` does), so the folder must hold ~16 GB (dense) + ~33 GB (MoE):
``--workdir`` picks where (default: the system temp folder); a folder already holding a checkpoint of the
same shape is reused (``--keep`` leaves them for the next call).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# First: these import bench_parallel_checkpoints before torch, which sets NCCL_NVLS_ENABLE=0 & co. at import,
# before torch.distributed / NCCL start, in this process and in every one it starts (a case process runs
# this file with --child; its spawned TP ranks re-import it as __mp_main__ and inherit the environment).
from bench_parallel_cases import (  # noqa: E402
    child_main,
    correctness,
    correctness_prompts,
    spawn_case,
    wait_case,
)
from bench_parallel_checkpoints import (  # noqa: E402
    BLOCK,
    MULTICAST_OFF,
    TINY_DENSE,
    TINY_MOE,
    model_configs,
    write_checkpoint,
)

# isort: split
import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402


# ----- report -----------------------------------------------------------------------------------------------
class Report:
    def __init__(self, out: Path, data: dict[str, Any]):
        self.out = out
        self.data = data

    def save(self) -> None:
        (self.out / "bench_parallel.json").write_text(json.dumps(self.data, indent=2) + "\n")


def gpu_count_and_name(smoke: bool) -> tuple[int, str]:
    if smoke:
        return 2, "cpu (smoke test, gloo)"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the multi-GPU machine, or pass --cpu-smoke")
    return torch.cuda.device_count(), torch.cuda.get_device_name(0)


def add_efficiency(speed: dict[str, Any]) -> None:
    one = speed["tp"].get("1")
    if not one or "b1_forward_ms" not in one:
        return
    for key, row in speed["tp"].items():
        tp = int(key)
        if "b1_forward_ms" in row:
            row["b1_efficiency"] = one["b1_forward_ms"] / row["b1_forward_ms"] / tp
        base_rows = {r["requests"]: r for r in one.get("batched", [])}
        for r in row.get("batched", []):
            if r["requests"] in base_rows:
                r["efficiency"] = base_rows[r["requests"]]["step_ms"] / r["step_ms"] / tp


def data_parallel(report, folder, args, gpus, workdir, base) -> None:
    dp = args.dp
    section = report.data["speed"]["dp"] = {"replicas": dp, "requests_total": 64}
    if dp < 2:
        section["skipped"] = "--dp below 2"
        return
    if args.cpu_smoke:
        section["skipped"] = "not run in --cpu-smoke"
        return
    if dp > gpus:
        section["skipped"] = f"needs {dp} GPUs, {gpus} visible"
        print(f"DP={dp} skipped: {section['skipped']}", flush=True)
        return
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(gpus)]

    def replicas(count: int, requests: int) -> list[dict]:
        barrier = workdir / f"barrier-{count}"
        shutil.rmtree(barrier, ignore_errors=True)
        barrier.mkdir()
        handles = []
        for replica in range(count):
            spec = base | {
                "kind": "replica",
                "name": f"dp{count}-replica{replica}",
                "path": str(folder),
                "device": "cuda",
                "dtype": args.dtype,
                "replica": replica,
                "replicas": count,
                "requests": requests,
                "steps": 10 if args.quick else 20,
                "barrier": str(barrier),
            }
            env = {"CUDA_VISIBLE_DEVICES": devices[replica]}  # each replica sees one GPU: its cuda:0
            handles.append(spawn_case(spec, workdir, args.case_timeout, env=env))
        return [wait_case(handle) for handle in handles]

    print(f"DP={dp}: {dp} replicas x {64 // dp} requests, stepped at the same time", flush=True)
    rows = replicas(dp, 64 // dp)
    section["replica_rows"] = rows
    errors = [r["error"] for r in rows if "error" in r]
    if errors:
        section["error"] = "; ".join(errors)
        print(f"  DP error: {section['error']}", flush=True)
        report.save()
        return
    section["aggregate_tokens_per_s"] = sum(r["tokens_per_s"] for r in rows)
    one = {r["requests"]: r for r in report.data["speed"]["tp"].get("1", {}).get("batched", [])}
    if 64 in one:
        section["one_gpu"] = {"source": "speed, TP=1, 64 requests"} | one[64]
    else:  # the speed section did not run here: one replica alone with all 64 requests
        print("DP: one GPU with 64 requests (the baseline)", flush=True)
        alone = replicas(1, 64)[0]
        section["one_gpu"] = {"source": "one replica, 64 requests"} | alone
    if "tokens_per_s" in section["one_gpu"]:
        section["one_gpu_tokens_per_s_at_64"] = section["one_gpu"]["tokens_per_s"]
        section["speedup_vs_one_gpu"] = section["aggregate_tokens_per_s"] / section["one_gpu"]["tokens_per_s"]
        section["efficiency"] = section["speedup_vs_one_gpu"] / dp
    report.save()


def print_table(data: dict[str, Any]) -> None:
    print()
    print(f"{data['device']} x{data['gpu_count']}  {data['date']}  torch {data['torch']}")
    for name, section in data["correctness"].items():
        for case in section.get("cases", []):
            label = f"{name:5} TP={case['tp']}" + (f" EP={case['ep']}" if case["ep"] > 1 else "")
            if "skipped" in case:
                print(f"{label:22} skipped: {case['skipped']}")
                continue
            parts = []
            for dtype in ("bfloat16", "float32"):
                r = case.get(dtype)
                if r is None:
                    continue
                if "error" in r:
                    parts.append(f"{dtype}: ERROR")
                    continue
                where = (
                    ""
                    if r["equal"]
                    else f" (first diff {r['first_diff']['prompt']}:{r['first_diff']['position']})"
                )
                top1 = (r.get("logits") or {}).get("top1_agree")
                parts.append(
                    f"{dtype}: {'equal' if r['equal'] else 'DIFFER'}{where}"
                    + (f", logits top-1 {100 * top1:.1f}%" if top1 is not None else "")
                )
            print(f"{label:22} " + "; ".join(parts))
    speed = data["speed"]["tp"]
    if speed:
        counts = sorted({r["requests"] for row in speed.values() for r in row.get("batched", [])})
        header = f"{'TP':>3} {'b1 ms/fwd':>10} {'eff':>5}" + "".join(
            f" {f'{c} req ms':>10} {'tok/s':>8} {'eff':>5}" for c in counts
        )
        print(header)
        for key in sorted(speed, key=int):
            row = speed[key]
            line = f"{key:>3} {row.get('b1_forward_ms', float('nan')):>10.2f} {row.get('b1_efficiency', float('nan')):>5.2f}"
            by = {r["requests"]: r for r in row.get("batched", [])}
            for c in counts:
                r = by.get(c, {})
                line += (
                    f" {r.get('step_ms', float('nan')):>10.2f} {r.get('tokens_per_s', float('nan')):>8.0f}"
                    f" {r.get('efficiency', float('nan')):>5.2f}"
                )
            print(line)
    dp = data["speed"].get("dp") or {}
    if "aggregate_tokens_per_s" in dp:
        print(
            f"DP={dp['replicas']} (64 requests): {dp['aggregate_tokens_per_s']:.0f} tok/s aggregate"
            + (
                f", one GPU {dp['one_gpu_tokens_per_s_at_64']:.0f}: x{dp['speedup_vs_one_gpu']:.2f}"
                f" (efficiency {dp['efficiency']:.2f})"
                if "speedup_vs_one_gpu" in dp
                else ""
            )
        )
    elif dp:
        print(f"DP: {dp.get('skipped') or dp.get('error')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4, 8], help="tensor-parallel sizes")
    parser.add_argument("--dp", type=int, default=2, help="data-parallel replicas (0 or 1: skip)")
    parser.add_argument("--models", nargs="+", choices=["dense", "moe"], default=["dense", "moe"])
    parser.add_argument(
        "--sections",
        nargs="+",
        choices=["correctness", "speed", "dp"],
        default=["correctness", "speed", "dp"],
    )
    parser.add_argument("--quick", action="store_true", help="fewer prompts, batch sizes and steps")
    parser.add_argument(
        "--fp32-recheck",
        choices=["auto", "always", "never"],
        default="auto",
        help="rerun a case with float32 compute: auto = when its bf16 tokens differ from TP=1's",
    )
    parser.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (~50 GB)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the checkpoints in --workdir for the next call"
    )
    parser.add_argument("--case-timeout", type=float, default=900.0, help="seconds per engine process")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="tiny shapes on the CPU (gloo): the plumbing"
    )
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child_main(args.child)
        return
    if args.cpu_smoke:
        args.tp = [tp for tp in args.tp if tp <= 2]
    args.dtype = "float32" if args.cpu_smoke else "bfloat16"
    if args.cpu_smoke:
        args.fp32_recheck = "never"  # already float32
    do_speed = "speed" in args.sections
    args.speed_on = lambda name: do_speed and name == "dense"
    args.out.mkdir(parents=True, exist_ok=True)
    gpus, device_name = gpu_count_and_name(args.cpu_smoke)
    device = "cpu" if args.cpu_smoke else "cuda"
    configs = model_configs(args.cpu_smoke)
    report = Report(
        args.out,
        {
            "device": device_name,
            "gpu_count": gpus,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "nccl": str(torch.cuda.nccl.version()) if device == "cuda" else None,
            "environment": {k: os.environ[k] for k in MULTICAST_OFF},
            "command": " ".join(sys.argv),
            "shapes": {
                "dense": "LLaDA-8B (d_model 4096, 32 layers, 32 heads, MLP 12288, vocab 126464), random bf16",
                "moe": "LLaDA2-mini (hidden 2048, 20 layers, 16/4 heads, head_dim 128, 256 experts x 512, "
                "top-8, 1 shared, dense first layer 5120, vocab 157184), random bf16",
            }
            if not args.cpu_smoke
            else {"dense": f"tiny {TINY_DENSE}", "moe": f"tiny {TINY_MOE}"},
            "configs": configs,
            "schedule": {
                "strategy": "block_diffusion",
                "block_size": BLOCK,
                "tokens_per_forward": 4,
                "ignore_eos": True,
                "greedy": True,
            },
            "checkpoints": {},
            "correctness": {},
            "speed": {"tp": {}, "dp": None},
        },
    )
    report.save()
    print(
        json.dumps({k: report.data[k] for k in ("device", "gpu_count", "date", "torch", "nccl")}), flush=True
    )
    keep = args.keep and args.workdir is not None
    workroot = args.workdir or Path(tempfile.gettempdir())
    workroot.mkdir(parents=True, exist_ok=True)
    workdir = (
        workroot / "bench_parallel_work"
        if keep
        else Path(tempfile.mkdtemp(prefix="bench_parallel_", dir=workroot))
    )
    workdir.mkdir(parents=True, exist_ok=True)
    smoke = args.cpu_smoke
    base = {
        "device": device,
        "kv_gb": 0.05 if smoke else 8.0,
        "prompts": correctness_prompts(args.quick or smoke),
        "max_tokens": 64 if (args.quick or smoke) else 128,
        "b1_context": 1024,
        "b1_forwards": 8 if smoke else (48 if args.quick else 96),
        "counts": [1, 4] if smoke else ([1, 8, 64] if args.quick else [1, 8, 32, 64]),
        "steady_steps": 3 if smoke else 10,
    }
    try:
        folders = {}
        engine_sections = {"correctness", "speed"} & set(args.sections)
        wanted = (set(args.models) if engine_sections else set()) | (
            {"dense"} if "dp" in args.sections else set()
        )
        for name in ("dense", "moe"):
            if name not in wanted:
                continue
            family = "llada" if name == "dense" else "llada2_moe"
            folder = workdir / f"{name}-checkpoint"
            print(f"writing the {name} checkpoint into {folder}", flush=True)
            info = write_checkpoint(family, configs[name], folder, device, seed=0 if name == "dense" else 1)
            report.data["checkpoints"][name] = info
            print(f"  {info}", flush=True)
            folders[name] = (family, folder)
            report.save()
        if device == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        for name in args.models:
            if "correctness" in args.sections or args.speed_on(name):
                family, folder = folders[name]
                case_base = base | {"kv_gb": base["kv_gb"] if smoke else (40.0 if name == "dense" else 8.0)}
                if "correctness" not in args.sections:  # speed only: a short token check rides along
                    case_base |= {"prompts": base["prompts"][:1], "max_tokens": 32}
                correctness(report, name, family, folder, args, gpus, workdir, case_base)
        add_efficiency(report.data["speed"])
        report.save()
        if "dp" in args.sections:
            data_parallel(report, folders["dense"][1], args, gpus, workdir, base | {"kv_gb": 40.0})
        else:
            report.data["speed"]["dp"] = {"skipped": "section not asked for"}
        report.save()
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(report.data)


if __name__ == "__main__":
    main()
