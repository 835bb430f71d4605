"""Shared fixtures: tiny random checkpoints in the official layouts and an LLM factory that checks,
after every test, that the page pool is whole again (no leaked pages)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from diffulex.llm import LLM
from diffulex.models.tiny_checkpoint import write_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_llada(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint("llada", tmp_path_factory.mktemp("ckpt") / "llada", seed=1)


@pytest.fixture(scope="session")
def tiny_sdar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint("sdar", tmp_path_factory.mktemp("ckpt") / "sdar", seed=2)


@pytest.fixture(scope="session")
def tiny_dream(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint("dream", tmp_path_factory.mktemp("ckpt") / "dream", seed=3)


@pytest.fixture(scope="session")
def tiny_llada2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint("llada2_moe", tmp_path_factory.mktemp("ckpt") / "llada2_moe", seed=4)


@pytest.fixture(scope="session")
def tiny_paths(tiny_llada: Path, tiny_sdar: Path, tiny_dream: Path, tiny_llada2: Path) -> dict[str, Path]:
    return {"llada": tiny_llada, "sdar": tiny_sdar, "dream": tiny_dream, "llada2_moe": tiny_llada2}


@pytest.fixture
def make_llm() -> Iterator[Callable[..., LLM]]:
    """``make_llm(path, **options)``: a CPU float32 LLM; every one made is checked for leaked pages."""
    made: list[LLM] = []

    def factory(path: Path | str, **options) -> LLM:
        options.setdefault("device", "cpu")
        options.setdefault("dtype", "float32")
        llm = LLM(str(path), **options)
        made.append(llm)
        return llm

    yield factory
    for llm in made:
        engine = llm.engine
        assert not engine.has_unfinished(), "a test left requests unfinished"
        assert engine.kv_cache.is_whole(), (
            f"leaked KV pages: {engine.kv_cache.num_free_pages}/{engine.kv_cache.num_pages} free"
        )
