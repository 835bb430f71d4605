"""bench_parallel's checkpoints: the NVLink-multicast-off environment (set at import, before
torch.distributed / NCCL start), the model shapes (LLaDA-8B, LLaDA2-mini, the --cpu-smoke tiny ones) and
the random bf16 checkpoints in the official Hugging Face layout."""

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

import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu_models import LLADA_8B  # noqa: E402

from diffulex.models.tiny_checkpoint import special_token_ids  # noqa: E402
from diffulex.models.tiny_layouts import CONFIGS, TENSOR_SHAPES  # noqa: E402

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
    dense = CONFIGS["llada"](special_token_ids("llada")) | LLADA_8B | {"torch_dtype": "bfloat16"}
    moe = CONFIGS["llada2_moe"](special_token_ids("llada2_moe")) | LLADA2_MINI
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
    shapes = TENSOR_SHAPES[family](config)
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
