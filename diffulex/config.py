"""Launch configuration: pydantic models that reject unknown keys and name the bad one.

``EngineConfig`` is what the engine needs; it loads from YAML (``configs/*.yaml``), keyword arguments and
``--set key=value`` overrides, in that order of increasing priority. ``ServerConfig`` is what the HTTP
server needs (``server:`` section of the same YAML); ``load_serve_config`` builds both.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)

StrategyName = str  # validated against the strategy registry by the engine (the registry lives above)
DTypeName = Literal["auto", "float32", "float16", "bfloat16", "float64"]


class ConfigError(ValueError):
    """A launch option is unknown or has a bad value; the message names the key."""


class EngineConfig(BaseModel):
    """Everything the engine is launched with. Defaults are the documented defaults (docs/configuration.md)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(description="Path to a Hugging Face checkpoint folder (config.json + safetensors).")
    base_model: str | None = Field(
        None,
        description="When model is a PEFT LoRA adapter folder: its base checkpoint folder (the adapter is "
        "merged at load); None = the adapter config's base_model_name_or_path, if a local folder.",
    )
    dtype: DTypeName = Field("auto", description="auto = bfloat16 on CUDA, float32 on CPU.")
    device: str = Field("auto", description="auto = cuda when available, else cpu.")
    data_parallel_size: int = Field(
        1,
        ge=1,
        description="Engine replicas behind one server, each in its own process (with auto/cuda device: "
        "GPU i for replica i); requests go to the least-loaded replica. 1 = one in-process engine. "
        "Read by `diffulex serve`; the offline LLM always runs one engine.",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="Ranks one model is split over (attention heads, MLP and expert intermediate sizes, "
        "vocabulary), one process each; rank 0 runs the engine and starts the others (gloo on CPU, NCCL "
        "with GPU r for rank r on CUDA), or they come from torchrun. 1 = no torch.distributed at all.",
    )
    expert_parallel_size: int = Field(
        1,
        ge=1,
        description="MoE models: ranks the routed experts are split over, whole experts (num_experts / "
        "size each), tokens sent to them with all-to-all. Runs over the tensor-parallel ranks: 1 (experts "
        "split by intermediate size under tensor parallelism) or equal to tensor_parallel_size.",
    )
    distributed_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Tensor parallel: a collective that waits longer than this on a silent rank fails "
        "the step (a rank that dies is noticed at once); the group is then broken and the engine unhealthy.",
    )
    strategy: StrategyName | None = Field(None, description="Decoding strategy; None = the family default.")
    block_size: int | None = Field(
        None, ge=1, description="Tokens per diffusion block; None = family default."
    )
    buffer_size: int | None = Field(
        None, ge=1, description="Blocks in flight per request; None = strategy default (multi_bd 2, d2f all)."
    )
    page_size: int = Field(
        32, ge=1, description="Tokens per KV-cache page (any size works with any block_size)."
    )
    kv_cache_memory_gb: float = Field(1.0, gt=0, description="Memory for K/V pages (CPU or GPU).")
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="On CUDA: size the KV cache to this fraction of GPU memory after a warm-up "
        "(overrides kv_cache_memory_gb); None = use kv_cache_memory_gb.",
    )
    num_kv_pages: int | None = Field(None, ge=1, description="Exact page count (overrides the budget).")
    max_num_reqs: int = Field(64, ge=1, description="Most requests running at once.")
    max_num_batched_tokens: int = Field(16384, ge=1, description="Most query tokens in one step.")
    max_model_len: int | None = Field(None, ge=1, description="Longest prompt+output; None = model max.")
    max_waiting_reqs: int = Field(4096, ge=1, description="Waiting-queue limit; beyond it add_request fails.")
    enable_prefix_caching: bool = Field(True, description="Share full prompt pages across requests.")
    enforce_eager: bool = Field(False, description="Never capture CUDA graphs.")
    cuda_graph_max_reqs: int = Field(128, ge=1, description="Largest running-request bucket captured.")
    cuda_graph_single_tokens: list[PositiveInt] = Field(
        [64, 128, 192, 256, 384, 512],
        description="Query sizes of one-request steps (prefills, full-recompute and prefix-cache steps) "
        "captured as CUDA graphs: such a step is padded to the smallest size that holds it and replayed "
        "instead of launching every kernel from the host. [] = those steps run eagerly.",
    )
    attention_backend: Literal["auto", "torch", "triton"] = Field(
        "auto", description="auto = Triton on CUDA, the torch reference on CPU."
    )
    fused_sampling: bool = Field(
        True, description="Greedy and temperature sampling with the fused Triton kernels on CUDA."
    )
    denoise_iterations_per_sync: int = Field(
        8,
        ge=1,
        le=256,
        description="Greedy denoise iterations run on the device before the host applies them, when "
        "every request of a step is denoising a block with a known schedule (block_diffusion); 1 = the "
        "host sees every forward. Outputs are the same either way.",
    )
    seed: int = Field(0, description="Default seed for requests without one.")
    # Strategy knobs (named as in the official code).
    cache_mode: Literal["prefix", "dual"] = Field("prefix", description="fast_dllm: prefix or dual cache.")
    block_add_threshold: float = Field(
        0.1, ge=0, le=1, description="d2f/multi_bd: add a block at this fraction."
    )
    decoded_token_threshold: float = Field(
        0.95,
        ge=0,
        le=1,
        description="d2f/multi_bd: a block is fully active once its predecessor reaches this.",
    )
    remasking: Literal["static", "dynamic", "sequential"] | None = Field(
        None, description="block_diffusion (SDAR) rule; None = dynamic with a threshold, else static."
    )
    fuse_block_store: bool = Field(
        False,
        description="block_diffusion: store a finished block in the next block's first forward "
        "(same tokens, one forward less per block than SDAR).",
    )
    small_block_size: int | None = Field(
        None,
        ge=1,
        description="fast_dllm_v2: sub-block size; a block is decoded one sub-block at a time, left to "
        "right. None = 8 (the published setting) when it divides block_size, else block_size. Must "
        "divide block_size.",
    )
    use_block_cache: bool = Field(
        False,
        description="fast_dllm_v2: Fast-dLLM v2's block cache: the first forward of each sub-block "
        "computes the whole block and keeps its K/V; later forwards query only the sub-block against "
        "them (approximate, faster; the published evaluation leaves it off).",
    )
    vanilla_schedule: Literal["auto", "llada", "dream"] = Field(
        "auto", description="vanilla: LLaDA per-block even split or Dream linspace schedule; auto = family."
    )
    mask_token_id: int | None = Field(None, description="Override the checkpoint's mask token id.")

    @field_validator("expert_parallel_size")
    @classmethod
    def _expert_parallel_over_tensor_ranks(cls, value: int, info: ValidationInfo) -> int:
        tensor_parallel_size = info.data.get("tensor_parallel_size", 1)
        if value not in (1, tensor_parallel_size):
            raise ValueError(
                f"expert_parallel_size={value} must be 1 or equal tensor_parallel_size={tensor_parallel_size} "
                f"(expert parallelism runs over the tensor-parallel ranks)"
            )
        return value


class ServerConfig(BaseModel):
    """Everything the HTTP server is launched with (the engine's options live in EngineConfig)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 exposes the server to the network.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 = any free port).")
    api_key: str | None = Field(
        default_factory=lambda: os.environ.get("DIFFULEX_API_KEY") or None,
        description="Require 'Authorization: Bearer <key>' on /v1/*; None (default: $DIFFULEX_API_KEY) = open.",
    )
    served_model_name: str | None = Field(
        None, description="Model name clients pass as 'model'; None = the checkpoint folder's name."
    )
    request_timeout_s: float = Field(600.0, gt=0, description="A request running longer is aborted (504).")


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "config"
        if item["type"] == "extra_forbidden":
            parts.append(f"unknown key '{key}'")
        else:
            parts.append(f"'{key}': {item['msg']}")
    return "; ".join(parts)


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` → (key, YAML-parsed value), so ``--set block_size=8`` gives an int."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw) if raw.strip() else None


def load_engine_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None, **kwargs: Any
) -> EngineConfig:
    """Build an EngineConfig from an optional YAML file, then keyword arguments, then overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values")
        data.update(loaded.get("engine", loaded))
    data.update({k: v for k, v in kwargs.items() if v is not None})
    data.update(overrides or {})
    try:
        return EngineConfig(**data)
    except ValidationError as error:
        raise ConfigError(f"invalid engine config: {_describe(error)}") from None


def load_serve_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    model: str | None = None,
    default_model: Callable[[], str] | None = None,
    **server_kwargs: Any,
) -> tuple[EngineConfig, ServerConfig]:
    """Build (EngineConfig, ServerConfig) for ``diffulex serve``.

    Priority, lowest first: the YAML file (``engine:`` and ``server:`` sections; a flat file is all
    engine), then ``model``/``server_kwargs`` (explicit flags), then ``overrides`` (``--set``): a key is
    a server key when it is a ServerConfig field or starts with ``server.``, else an engine key (an
    ``engine.`` prefix is allowed). No model anywhere → ``default_model()`` (the caller passes the
    bundled model's resolver: this ground-floor module imports nothing of the engine).
    """
    engine_data: dict[str, Any] = {}
    server_data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values")
        if "engine" in loaded or "server" in loaded:
            unknown = set(loaded) - {"engine", "server"}
            if unknown:
                raise ConfigError(
                    f"{path}: unknown top-level key(s) {sorted(unknown)}; use engine: and server:"
                )
            engine_data.update(loaded.get("engine") or {})
            server_data.update(loaded.get("server") or {})
        else:
            engine_data.update(loaded)
    if model is not None:
        engine_data["model"] = model
    server_data.update({k: v for k, v in server_kwargs.items() if v is not None})
    for key, value in (overrides or {}).items():
        if key.startswith("server."):
            server_data[key.removeprefix("server.")] = value
        elif key.startswith("engine."):
            engine_data[key.removeprefix("engine.")] = value
        elif key in ServerConfig.model_fields:
            server_data[key] = value
        else:
            engine_data[key] = value
    if not engine_data.get("model") and default_model is not None:
        engine_data["model"] = default_model()
    try:
        engine_config = EngineConfig(**engine_data)
    except ValidationError as error:
        raise ConfigError(f"invalid engine config: {_describe(error)}") from None
    try:
        server_config = ServerConfig(**server_data)
    except ValidationError as error:
        raise ConfigError(f"invalid server config: {_describe(error)}") from None
    return engine_config, server_config
