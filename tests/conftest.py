"""Shared fixtures: tiny random-weight Hugging Face models built locally (no hub access).

The GPU path's tests (tests/attention/triton, tests/worker) run on CPU tensors under Triton's interpreter, so CI
needs no GPU. TRITON_INTERPRET must be set before triton is first imported: triton.jit reads it when a kernel
is decorated, so it is set here, before any test module is collected.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    # Something imported triton before this conftest (a GPU test session): its kernels would compile for a GPU.
    import warnings

    warnings.warn("triton was imported before tests/conftest.py set TRITON_INTERPRET=1; kernels may not run on CPU",
                  stacklevel=1)
os.environ["TRITON_INTERPRET"] = "1"
# No test may reach a model hub: a hub id resolves from the local HF cache only (tests/model/test_hub.py).
os.environ["HF_HUB_OFFLINE"] = "1"

from tests.tiny_models import TINY_ARCHS, build_tiny_model, build_tokenizer  # noqa: E402


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
def server_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """The tiny random-weight Llama the server and async-engine tests use."""
    return build_tiny_model("llama", tmp_path_factory.mktemp("server_model") / "llama", tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def llama_dir(tiny_models) -> Path:
    return tiny_models["llama"]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
