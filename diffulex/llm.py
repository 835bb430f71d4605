"""The offline API: ``LLM(path, **options).generate(prompts, params)`` and ``forward_logits``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from diffulex.config import EngineConfig, load_engine_config
from diffulex.engine.engine import Engine
from diffulex.request import RequestOutput
from diffulex.sampling_params import SamplingParams

Prompt = str | list[int]
# The bundled default: a 4.3M-parameter LLaDA-architecture model trained on the synthetic task suite
# (scripts/train_tiny.py; docs/quality.md). A sibling SDAR-style block-diffusion model is "tiny-sdar".
BUNDLED_MODELS_DIR = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = "tiny-llada"


def default_model_path() -> str:
    """The bundled default model's folder (shipped inside the package)."""
    path = BUNDLED_MODELS_DIR / DEFAULT_MODEL
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"the bundled model is missing at {path}; reinstall diffulex or pass a checkpoint folder"
        )
    return str(path)


def chat_prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """One user turn through the tokenizer's chat template, assistant header appended, as token ids.

    The rendered template already holds its special tokens, so it is encoded without adding more (the
    server's /v1/chat/completions does the same).
    """
    messages = [{"role": "user", "content": text}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(rendered, add_special_tokens=False))


def _file_names_model(config: str | Path | None) -> bool:
    if config is None:
        return False
    data = yaml.safe_load(Path(config).read_text()) or {}
    return isinstance(data, dict) and "model" in data.get("engine", data)


class LLM:
    """Generate with a diffusion LM from Python: loads the checkpoint, runs the engine to completion.

    ``LLM(model, config=None, **options)``: ``model`` is a checkpoint folder (None = the bundled default),
    ``config`` an optional YAML launch file, ``options`` any EngineConfig field (they win over the file).
    """

    def __init__(self, model: str | None = None, config: str | Path | None = None, **options: Any):
        overrides = options.pop("overrides", None)
        if model is None and "model" not in (overrides or {}) and not _file_names_model(config):
            model = default_model_path()
        engine_config: EngineConfig = load_engine_config(config, overrides=overrides, model=model, **options)
        self.engine = Engine(engine_config)

    def close(self) -> None:
        """Stop the engine's tensor-parallel workers, if any (they also stop when this process exits)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def tokenizer(self) -> Any | None:
        return self.engine.tokenizer

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "this checkpoint has no tokenizer files (tokenizer.json / tokenizer_config.json): "
                    "pass prompts as lists of token ids"
                )
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return list(prompt)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (a string or a list of token ids); outputs keep the prompts' order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompts)
            if isinstance(sampling_params, SamplingParams)
            else list(sampling_params)
        )
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} sampling params for {len(prompts)} prompts")
        encoded = [self._encode(p) for p in prompts]
        ids = []
        try:
            for tokens, params in zip(encoded, params_list):
                ids.append(self.engine.add_request(tokens, params))
        except Exception:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        results: dict[str, RequestOutput] = {}
        while len(results) < len(ids):
            for output in self.engine.step():
                results[output.request_id] = output
        return [results[i] for i in ids]

    def forward_logits(
        self,
        token_ids: list[int],
        attention: Literal["native", "bidirectional", "block_causal"] = "native",
        block_size: int | None = None,
    ) -> torch.Tensor:
        """Raw (unshifted) float32 logits ``[len, vocab]`` of one full forward, without any cache."""
        if not token_ids:
            raise ValueError("token_ids is empty")
        if attention == "native":
            attention = (
                "block_causal" if self.engine.spec.native_attention == "block_causal" else "bidirectional"
            )
        if attention == "bidirectional":
            block_ids = [0] * len(token_ids)
        elif attention == "block_causal":
            size = block_size or self.engine.block_size
            block_ids = [p // size for p in range(len(token_ids))]
        else:
            raise ValueError(f"attention must be native, bidirectional or block_causal, got {attention!r}")
        return self.engine.runner.full_logits(token_ids, block_ids)
