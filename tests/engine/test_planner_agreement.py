"""The planner's memory functions describe exactly what the engine allocates and loads."""

from __future__ import annotations

import pytest

from tests.tiny_models import TINY_ARCHS
from tokenmill import LLM
from tokenmill.model.loader import read_hf_config
from tokenmill.planner import ModelArch, kv_cache_bytes_per_block, param_count


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch_name", TINY_ARCHS)
def test_kv_bytes_per_block_and_params_match_engine(arch_name, dtype, tiny_models):
    llm = LLM(str(tiny_models[arch_name]), dtype=dtype, block_size=16, kv_cache_memory="4MiB",
              show_progress=False)
    core = llm.llm_engine.core
    arch = ModelArch.from_hf_config(read_hf_config(tiny_models[arch_name]))
    per_block = kv_cache_bytes_per_block(arch, 16, dtype)
    allocated = sum(t.numel() * t.element_size() for t in core.kv_caches)
    assert allocated == core.kv_sizing.num_blocks * per_block
    assert core.kv_sizing.num_blocks == 4 * 2**20 // per_block
    assert param_count(arch).total == core.model.num_weight_elements()
