"""The planner's weight bytes for the engine (engine_weight_bytes) equal what the engine allocates, for every
registered quantization format."""

from __future__ import annotations

import pytest

from tests.model.quant_checkpoints import CHECKPOINTS
from tokenmill import LLM
from tokenmill.model.loader import read_hf_config
from tokenmill.model.quantization import quantization_methods
from tokenmill.planner import ModelArch, engine_weight_bytes


def test_every_registered_format_has_a_test_checkpoint():
    missing = set(quantization_methods()) - set(CHECKPOINTS)
    assert not missing, f"add builders for {sorted(missing)} to tests/model/quant_checkpoints.py"


@pytest.mark.slow  # an engine per format and dtype
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("method", sorted(CHECKPOINTS))
def test_planner_weight_bytes_equal_engine_allocations(method, dtype, tmp_path, tiny_models, tiny_tokenizer_dir):
    model_dir, quantization = CHECKPOINTS[method](tmp_path, tiny_models, tiny_tokenizer_dir)
    llm = LLM(str(model_dir), dtype=dtype, quantization=quantization, kv_cache_memory="2MiB", show_progress=False)
    model = llm.llm_engine.core.model
    arch = ModelArch.from_hf_config(read_hf_config(model_dir))
    quant_config = None if method == "unquantized" else model.quant_config
    assert engine_weight_bytes(arch, dtype, quant_config) == model.weight_bytes()
