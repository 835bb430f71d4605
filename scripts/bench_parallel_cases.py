"""bench_parallel's cases: what one engine process runs (``--child``: a TP case or a DP replica), how
the parent starts and waits for one, and the TP/EP correctness sweep that compares them with TP=1."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# First: sets NCCL_NVLS_ENABLE=0 & co. (bench_parallel_checkpoints, at import) before torch starts.
from bench_parallel_checkpoints import BLOCK  # noqa: E402

# isort: split
import torch  # noqa: E402

SCRIPT = Path(__file__).resolve().parent / "bench_parallel.py"  # what a case process runs (--child)


# ----- one case, in its own process ---------------------------------------------------------------------------
def correctness_prompts(quick: bool) -> list[list[int]]:
    lengths = [16, 45] if quick else [16, 45, 96, 200]
    return [[1000 + (i * 7919 + j * 104729) % 20000 for j in range(n)] for i, n in enumerate(lengths)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _drain(engine) -> None:
    for request_id in list(engine.requests):
        engine.abort(request_id)


def _steady_step_ms(engine, device: str, steps: int) -> float:
    for _ in range(2):
        engine.step()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        _sync(device)
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def _b1_forward_ms(engine, device: str, context: int, forwards: int) -> float:
    """Wall ms per forward of one request denoising 32-token blocks over >= ``context`` cached tokens."""
    from diffulex import SamplingParams

    engine.add_request([11] * context, SamplingParams(max_tokens=512, ignore_eos=True))
    for _ in range(3):  # prefill, then denoise steps over the cached context
        engine.step()
    request = next(iter(engine.requests.values()))
    assert request.num_cached >= context, (request.num_cached, context)
    engine.step()
    _sync(device)
    start_forwards, start = request.num_forwards, time.perf_counter()
    while request.num_forwards - start_forwards < forwards:
        engine.step()
    _sync(device)
    ms = 1000 * (time.perf_counter() - start) / (request.num_forwards - start_forwards)
    _drain(engine)
    return ms


def _batched(engine, device: str, counts: list[int], steps: int, prompt_len: int = 128) -> list[dict]:
    from diffulex import SamplingParams

    rows = []
    for count in counts:
        for index in range(count):
            engine.add_request([100 + index] * prompt_len, SamplingParams(max_tokens=512, ignore_eos=True))
        for _ in range(6):  # admission + prefill + the steady block
            engine.step()
        running = sum(1 for r in engine.requests.values() if not r.is_finished)
        step_ms = _steady_step_ms(engine, device, steps)
        tokens = count * BLOCK
        rows.append(
            {
                "requests": count,
                "running": running,
                "step_ms": step_ms,
                "tokens_per_s": tokens / (step_ms / 1000),
            }
        )
        _drain(engine)
    return rows


def run_case(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one engine (``LLM`` over the checkpoint folder: every rank loads it) and run ``spec``'s parts."""
    from diffulex import SamplingParams
    from diffulex.llm import LLM

    device = spec["device"]
    if device.startswith("cuda") and spec["dtype"] == "float32":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    options = {
        "device": device,
        "dtype": spec["dtype"],
        "tensor_parallel_size": spec["tp"],
        "expert_parallel_size": spec["ep"],
        "strategy": "block_diffusion",
        "block_size": BLOCK,
        "page_size": 32,
        "enable_prefix_caching": False,
        "max_model_len": 2048,
        "max_num_reqs": max(64, max(spec.get("counts") or [1])),
        "cuda_graph_max_reqs": max(64, max(spec.get("counts") or [1])),
        "kv_cache_memory_gb": spec["kv_gb"],
        "denoise_iterations_per_sync": 1,  # one forward per engine step: a step's time is a forward's
        "block_add_threshold": 0.1,
        "distributed_timeout_s": 600,
    }
    result: dict[str, Any] = {"tp": spec["tp"], "ep": spec["ep"], "dtype": spec["dtype"]}
    start = time.perf_counter()
    llm = LLM(spec["path"], **options)
    result["load_s"] = time.perf_counter() - start
    try:
        engine = llm.engine
        if spec.get("correctness"):
            prompts = spec["prompts"]
            params = SamplingParams(
                max_tokens=spec["max_tokens"], steps=spec["max_tokens"] // 4, ignore_eos=True
            )
            start = time.perf_counter()
            outputs = llm.generate(prompts, params)
            result["generate_s"] = time.perf_counter() - start
            result["tokens"] = [list(o.token_ids) for o in outputs]
            result["forwards"] = [o.num_forwards for o in outputs]
            logits = llm.forward_logits(prompts[-1]).float().cpu()
            if spec["tp"] == 1 and spec.get("save_logits"):
                torch.save(logits, spec["save_logits"])
            reference = spec.get("reference_logits")
            if reference and Path(reference).is_file():
                expected = torch.load(reference)
                scale = expected.abs().max().item()
                diff = (logits - expected).abs().max().item()
                result["logits"] = {
                    "max_abs_diff": diff,
                    "max_abs_reference": scale,
                    "relative": diff / max(scale, 1e-30),
                    "top1_agree": (logits.argmax(-1) == expected.argmax(-1)).float().mean().item(),
                    "positions": logits.shape[0],
                }
        if spec.get("speed"):
            result["b1_forward_ms"] = _b1_forward_ms(engine, device, spec["b1_context"], spec["b1_forwards"])
            result["batched"] = _batched(engine, device, spec["counts"], spec["steady_steps"])
        if device.startswith("cuda"):
            result["max_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
    finally:
        llm.close()
    return result


def run_replica(spec: dict[str, Any]) -> dict[str, Any]:
    """One data-parallel replica: its share of the running requests, stepped while the others step too
    (a file barrier in ``spec["barrier"]`` starts the timed steps together)."""
    from diffulex import SamplingParams
    from diffulex.llm import LLM

    device = spec["device"]
    llm = LLM(
        spec["path"],
        device=device,
        dtype=spec["dtype"],
        strategy="block_diffusion",
        block_size=BLOCK,
        page_size=32,
        enable_prefix_caching=False,
        max_model_len=2048,
        max_num_reqs=64,
        cuda_graph_max_reqs=64,
        kv_cache_memory_gb=spec["kv_gb"],
        denoise_iterations_per_sync=1,
        block_add_threshold=0.1,
    )
    engine = llm.engine
    count = spec["requests"]
    for index in range(count):
        engine.add_request(
            [100 + spec["replica"] * count + index] * 128,
            SamplingParams(max_tokens=512, ignore_eos=True),
        )
    for _ in range(8):
        engine.step()
    _sync(device)
    barrier = Path(spec["barrier"])
    (barrier / f"ready-{spec['replica']}").write_text("1")
    deadline = time.monotonic() + 600
    while len(list(barrier.glob("ready-*"))) < spec["replicas"]:
        if time.monotonic() > deadline:
            raise RuntimeError("the other replicas did not get ready")
        engine.step()  # keep stepping (the same load) while waiting
        _sync(device)
        time.sleep(0.001)
    start = time.perf_counter()
    steps = spec["steps"]
    for _ in range(steps):
        engine.step()
    _sync(device)
    seconds = time.perf_counter() - start
    llm.close()
    step_ms = 1000 * seconds / steps
    return {
        "replica": spec["replica"],
        "requests": count,
        "step_ms": step_ms,
        "tokens_per_s": count * BLOCK / (step_ms / 1000),
    }


def child_main(spec_path: Path) -> None:
    spec = json.loads(spec_path.read_text())
    try:
        result = run_replica(spec) if spec.get("kind") == "replica" else run_case(spec)
    except BaseException as error:  # reported to the parent, which records it and goes on
        import traceback

        result = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-4000:]}
    Path(spec["result"]).write_text(json.dumps(result))


def spawn_case(spec: dict[str, Any], workdir: Path, timeout_s: float, env: dict | None = None):
    """Start this script on ``spec`` in a fresh process (its own CUDA context and distributed group)."""
    name = spec["name"]
    spec = spec | {"result": str(workdir / f"{name}.result.json")}
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--child", str(spec_path)], env={**os.environ, **(env or {})}
    )
    return process, Path(spec["result"]), timeout_s


def wait_case(handle) -> dict[str, Any]:
    process, result_path, timeout_s = handle
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return {"error": f"timed out after {timeout_s:.0f} s"}
    if not result_path.is_file():
        return {"error": f"the case process exited with code {process.returncode} and no result"}
    return json.loads(result_path.read_text())


def run_child(spec: dict[str, Any], workdir: Path, timeout_s: float) -> dict[str, Any]:
    started = time.perf_counter()
    result = wait_case(spawn_case(spec, workdir, timeout_s))
    result["wall_s"] = time.perf_counter() - started
    if "error" in result:
        print(f"  {spec['name']}: ERROR {result['error']}", flush=True)
        if "traceback" in result:
            print(result["traceback"], flush=True)
    return result


# ----- comparison ---------------------------------------------------------------------------------------------
def compare_tokens(reference: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    first = None
    same = total = 0
    for prompt, (a, b) in enumerate(zip(reference, got)):
        for position in range(max(len(a), len(b))):
            x = a[position] if position < len(a) else None
            y = b[position] if position < len(b) else None
            total += 1
            same += x == y
            if x != y and first is None:
                first = {"prompt": prompt, "position": position, "reference": x, "got": y}
    return {
        "equal": first is None and len(reference) == len(got),
        "first_diff": first,
        "equal_fraction": same / max(total, 1),
    }


def fits(tp: int, gpus: int, config: dict[str, Any], family: str) -> str | None:
    """Why ``tp`` cannot run here (None when it can)."""
    if tp > gpus:
        return f"needs {tp} GPUs, {gpus} visible"
    heads = config["n_heads"] if family == "llada" else config["num_attention_heads"]
    kv = (config.get("n_kv_heads") or heads) if family == "llada" else config["num_key_value_heads"]
    if heads % tp or (kv % tp and tp % kv):
        return f"{heads} heads / {kv} KV heads do not split over {tp}"
    return None


def correctness(report, name, family, folder, args, gpus, workdir, base) -> None:
    """TP=1 reference, then each TP size (and EP for the MoE); a bf16 mismatch reruns in float32."""
    config = json.loads((Path(folder) / "config.json").read_text())
    section = report.data["correctness"].setdefault(name, {"cases": []})
    references: dict[str, dict] = {}

    def reference(dtype: str) -> dict | None:
        if dtype not in references:
            spec = base | {
                "name": f"{name}-tp1-{dtype}",
                "path": str(folder),
                "tp": 1,
                "ep": 1,
                "dtype": dtype,
                "correctness": True,
                "speed": args.speed_on(name) and dtype == args.dtype,
                "save_logits": str(workdir / f"{name}-{dtype}-logits.pt"),
            }
            print(f"{name}: TP=1 reference ({dtype})", flush=True)
            references[dtype] = run_child(spec, workdir, args.case_timeout)
            section["reference_" + dtype] = {k: v for k, v in references[dtype].items() if k != "tokens"}
            section["reference_" + dtype]["tokens_head"] = [
                t[:16] for t in references[dtype].get("tokens", [])
            ]
            report.save()
        result = references[dtype]
        return None if "error" in result else result

    ref = reference(args.dtype)
    if ref is not None and args.speed_on(name):
        report.data["speed"]["tp"]["1"] = {
            k: ref[k] for k in ("b1_forward_ms", "batched", "load_s") if k in ref
        }
    for tp in args.tp:
        if tp == 1:
            continue
        reason = fits(tp, gpus, config, family)
        eps = [1, tp] if family == "llada2_moe" else [1]
        for ep in eps:
            label = f"TP={tp}" + (f" EP={ep}" if ep > 1 else "")
            if reason is not None:
                print(f"{name}: {label} skipped: {reason}", flush=True)
                section["cases"].append({"tp": tp, "ep": ep, "skipped": reason})
                report.save()
                continue
            case: dict[str, Any] = {"tp": tp, "ep": ep}
            section["cases"].append(case)
            for dtype in dict.fromkeys([args.dtype, "float32"]):  # float32: the recheck
                first = case.get(args.dtype, {})
                differed = "equal" in first and not first["equal"]  # not when it failed to run
                if dtype != args.dtype and (
                    args.fp32_recheck == "never" or (args.fp32_recheck == "auto" and not differed)
                ):
                    break
                ref = reference(dtype)
                if ref is None:
                    case[dtype] = {"error": "the TP=1 reference failed"}
                    break
                speed = args.speed_on(name) and dtype == args.dtype and ep == 1
                print(f"{name}: {label} ({dtype}{', + speed' if speed else ''})", flush=True)
                spec = base | {
                    "name": f"{name}-tp{tp}-ep{ep}-{dtype}",
                    "path": str(folder),
                    "tp": tp,
                    "ep": ep,
                    "dtype": dtype,
                    "correctness": True,
                    "speed": speed,
                    "reference_logits": str(workdir / f"{name}-{dtype}-logits.pt"),
                }
                result = run_child(spec, workdir, args.case_timeout)
                if "error" in result:
                    case[dtype] = {"error": result["error"]}
                else:
                    case[dtype] = compare_tokens(ref["tokens"], result["tokens"]) | {
                        "logits": result.get("logits"),
                        "load_s": result.get("load_s"),
                        "generate_s": result.get("generate_s"),
                    }
                    if speed:
                        report.data["speed"]["tp"][str(tp)] = {
                            k: result[k] for k in ("b1_forward_ms", "batched", "load_s") if k in result
                        }
                    verdict = "equal" if case[dtype]["equal"] else f"DIFFER at {case[dtype]['first_diff']}"
                    print(f"  tokens {verdict}; logits {case[dtype]['logits']}", flush=True)
                report.save()
    if args.fp32_recheck == "always" and args.dtype != "float32":
        reference("float32")
