"""Tiny random reference models (LLaDA and SDAR layouts) for the reference sanity tests."""

from __future__ import annotations

import pytest

from tests.reference.plain_models import PlainModel
from tests.reference.tiny_plain_ckpt import write_tiny_llada, write_tiny_sdar


@pytest.fixture(scope="module")
def llada(tmp_path_factory):
    return PlainModel(write_tiny_llada(tmp_path_factory.mktemp("llada")))


@pytest.fixture(scope="module")
def sdar(tmp_path_factory):
    return PlainModel(write_tiny_sdar(tmp_path_factory.mktemp("sdar")))
