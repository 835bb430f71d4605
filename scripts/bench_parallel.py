"""Multi-GPU benchmark: tensor / expert / data parallelism on random bf16 checkpoints (NCCL).

For a machine of 2, 4 or 8 H200s (nvidia-h200-x2/x4/x8); every number comes from the same run:
  0. writes two random bf16 checkpoints once, in the official Hugging Face layout (config.json, sharded
     safetensors + model.safetensors.index.json), generated on the GPU tensor by tensor so host memory
     stays small: the LLaDA-8B shape (``bench_gpu.LLADA_8B``) and a LLaDA2-mini-shaped MoE (values below);
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

import os

# Before torch.distributed / NCCL start (they read these at communicator creation).
MULTICAST_OFF = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
_conflicts = {k: os.environ[k] for k, v in MULTICAST_OFF.items() if k in os.environ and os.environ[k] != v}
if _conflicts:
    raise SystemExit(
        "bench_parallel keeps NVLink multicast off; unset or fix: "
        + ", ".join(f"{k}={v!r} (needs {MULTICAST_OFF[k]!r})" for k, v in _conflicts.items())
    )
os.environ.update(MULTICAST_OFF)

import argparse  # noqa: E402
import datetime  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import LLADA_8B  # noqa: E402

from diffulex.models.tiny_checkpoint import special_token_ids  # noqa: E402
from diffulex.models.tiny_layouts import _CONFIGS, _TENSOR_SHAPES  # noqa: E402

SCRIPT = Path(__file__).resolve()
LLADA2_MINI = {
    "hidden_size": 2048,
    "num_hidden_layers": 20,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "intermediate_size": 5120,
    "moe_intermediate_size": 512,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "num_shared_experts": 1,
    "first_k_dense_replace": 1,
    "vocab_size": 157184,
    "mask_token_id": 156895,
    "eos_token_id": 156892,
    "pad_token_id": 156892,
    "rms_norm_eps": 1e-6,
    "rope_theta": 600000,
    "routed_scaling_factor": 2.5,
    "partial_rotary_factor": 0.5,
    "max_position_embeddings": 32768,
    "torch_dtype": "bfloat16",
}
# --cpu-smoke shapes: the official ids stay (mask 126336 / 156895), so the vocabularies stay large.
TINY_DENSE = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "mlp_hidden_size": 128}
TINY_MOE = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 2,
    "topk_group": 1,
}
SHARD_BYTES = 2 << 30
BLOCK = 32


# ----- checkpoints -------------------------------------------------------------------------------------------
def model_configs(smoke: bool) -> dict[str, dict[str, Any]]:
    """``{"dense": config.json, "moe": config.json}``: tiny_layouts' official field sets, full sizes."""
    dense = _CONFIGS["llada"](special_token_ids("llada")) | LLADA_8B | {"torch_dtype": "bfloat16"}
    moe = _CONFIGS["llada2_moe"](special_token_ids("llada2_moe")) | LLADA2_MINI
    if smoke:
        dense |= TINY_DENSE
        moe |= TINY_MOE
    return {"dense": dense, "moe": moe}


def _random(name: str, shape: tuple[int, ...], generator: torch.Generator, device: str) -> torch.Tensor:
    """tiny_checkpoint's scales (peaky logits, unit-variance projections), drawn on ``device``, bf16."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
    if "norm" in name or name.endswith("ln_f.weight"):
        noise = 1.0 + 0.1 * noise
    elif name.endswith(".bias") or name.endswith("expert_bias"):
        noise = 0.05 * noise
    elif name in ("model.transformer.wte.weight", "model.word_embeddings.weight"):
        pass
    elif name in ("model.transformer.ff_out.weight", "lm_head.weight"):
        noise = 0.5 * noise
    else:
        noise = noise / shape[-1] ** 0.5
    return noise.to(torch.bfloat16)


def write_checkpoint(family: str, config: dict[str, Any], folder: Path, device: str, seed: int) -> dict:
    """Write ``config`` and random bf16 tensors under the official names into ``folder`` (shards of
    ``SHARD_BYTES`` + index); each tensor is drawn on ``device`` and only one shard is held on the host.
    Reuses the folder when a previous call finished the same checkpoint (``done.json``)."""
    from safetensors.torch import save_file

    marker = folder / "done.json"
    stamp = {"config": config, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        return {"reused": True, "bytes": index["metadata"]["total_size"]}
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shapes = _TENSOR_SHAPES[family](config)
    start = time.perf_counter()
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    files: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        file_name = f"model-{len(files) + 1:05d}.safetensors"  # renamed to -of-N below
        save_file(shards[-1], str(folder / file_name), metadata={"format": "pt"})
        files.append(file_name)
        weight_map.update(dict.fromkeys(shards[-1], file_name))
        shards[-1] = {}
        sizes[-1] = 0

    for index, (name, shape) in enumerate(shapes.items()):
        generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
        tensor = _random(name, shape, generator, device).cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + nbytes > SHARD_BYTES:
            flush()
        shards[-1][name] = tensor
        sizes[-1] += nbytes
        total += nbytes
    flush()
    renamed = {old: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, old in enumerate(files)}
    for old, new in renamed.items():
        (folder / old).rename(folder / new)
    index_data = {
        "metadata": {"total_size": total},
        "weight_map": {k: renamed[v] for k, v in weight_map.items()},
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_data, indent=2) + "\n")
    marker.write_text(json.dumps(stamp))
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {"reused": False, "bytes": total, "shards": len(files), "write_s": time.perf_counter() - start}


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


# ----- comparison and report ---------------------------------------------------------------------------------
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
