"""Launch configuration: YAML files, keyword arguments and --set overrides; clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diffulex.config import ConfigError, EngineConfig, load_engine_config, parse_override

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path) -> None:
    names_model = "model" in yaml.safe_load(path.read_text())["engine"]
    config = load_engine_config(path) if names_model else load_engine_config(path, model="/some/checkpoint")
    assert isinstance(config, EngineConfig) and config.model


def test_priority_file_then_kwargs_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  model: /m\n  block_size: 8\n  page_size: 16\n")
    config = load_engine_config(path, overrides={"page_size": 64}, block_size=4)
    assert (config.model, config.block_size, config.page_size) == ("/m", 4, 64)


def test_override_parsing_types() -> None:
    assert parse_override("block_size=8") == ("block_size", 8)
    assert parse_override("enforce_eager=true") == ("enforce_eager", True)
    assert parse_override("model=/a/b") == ("model", "/a/b")
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("block_size")


def test_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key 'blok_size'"):
        load_engine_config(model="/m", blok_size=4)
    with pytest.raises(ConfigError, match="'max_num_reqs'"):
        load_engine_config(model="/m", max_num_reqs=0)
    with pytest.raises(ConfigError, match="'dtype'"):
        load_engine_config(model="/m", dtype="float8")
    with pytest.raises(ConfigError, match="'model'"):
        load_engine_config()
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_engine_config(bad)
