"""Shared fixtures: tiny random-weight Hugging Face models built locally (no hub access)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.tiny_models import TINY_ARCHS, build_tiny_model, build_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """model_type -> directory of a tiny random-weight model with config, safetensors and tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return {name: build_tiny_model(name, root / name, tiny_tokenizer_dir) for name in TINY_ARCHS}


@pytest.fixture(scope="session")
def llama_dir(tiny_models) -> Path:
    return tiny_models["llama"]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
