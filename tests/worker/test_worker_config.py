"""Defaults are resolved in one place (config.resolve_defaults): the engine core resolves the config it is
given once, and the worker receives no "auto" and no None left to decide."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from tokenmill.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    cpu_supports_bf16,
    default_cpu_kv_cache_bytes,
    resolve_defaults,
    unresolved_defaults,
)
from tokenmill.engine.arg_utils import EngineArgs
from tokenmill.worker.worker import Worker

CONFIGS = [
    EngineConfig(),
    EngineConfig(model=ModelConfig(device="cpu", dtype="bf16")),
    EngineConfig(model=ModelConfig(device="cpu", dtype="fp32"), scheduler=SchedulerConfig(max_num_batched_tokens=64),
                 cache=CacheConfig(kv_cache_memory="1MiB")),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_a_config_resolved_twice_is_unchanged(config):
    resolved = resolve_defaults(config)
    assert unresolved_defaults(config) and not unresolved_defaults(resolved)
    assert resolve_defaults(resolved) == resolved
    # What was given stays as given (aliases spelled out); only the open defaults are filled in.
    if config.scheduler.max_num_batched_tokens is not None:
        assert resolved.scheduler.max_num_batched_tokens == config.scheduler.max_num_batched_tokens
    if config.cache.kv_cache_memory is not None:
        assert resolved.cache.kv_cache_memory == config.cache.kv_cache_memory


def test_the_cpu_defaults():
    resolved = resolve_defaults(EngineConfig(model=ModelConfig(device="cpu")))
    assert resolved.model.dtype == ("bfloat16" if cpu_supports_bf16() else "float32")
    assert resolved.scheduler.max_num_batched_tokens == 2048
    assert resolved.cache.kv_cache_bytes == default_cpu_kv_cache_bytes()
    # EngineArgs goes through the same function: the same config from the same settings.
    assert EngineArgs(device="cpu").create_engine_config() == resolved


def test_the_worker_receives_no_open_default(llama_dir):
    from tokenmill.engine.engine_core import EngineCore

    # Built directly (as tests do), with every default open: "auto" dtype and device, no token budget, no KV size.
    config = EngineConfig(model=ModelConfig(model=str(llama_dir), device="cpu"))
    assert unresolved_defaults(config)
    core = EngineCore(config, llama_dir, show_progress=False)
    try:
        given = core.worker.config
        assert unresolved_defaults(given) == [] and given == core.config
        fields = {**dataclasses.asdict(given.model), **dataclasses.asdict(given.cache),
                  **dataclasses.asdict(given.scheduler)}
        open_fields = {k for k, v in fields.items() if v == "auto" or v is None}
        # Left open on purpose: what the user did not ask for (no chat template override, no hub revision, the
        # checkpoint's own weight format...).
        assert open_fields <= {"chat_template", "revision", "download_dir", "max_model_len", "quantization",
                               "num_gpu_blocks_override"}, open_fields
        assert given.distributed_executor_backend == "uni"  # one rank: in the engine's process
        assert core.max_num_batched_tokens == 2048
        assert core.kv_sizing.num_blocks * core.kv_sizing.bytes_per_block <= default_cpu_kv_cache_bytes()
    finally:
        core.shutdown()
    with pytest.raises(ValueError, match=r"unresolved defaults \(dtype='auto'.*resolve_defaults"):
        Worker(dataclasses.replace(config, model=dataclasses.replace(config.model, dtype="auto")), llama_dir)


def test_every_default_is_written_once():
    """The defaults resolve_defaults settles have no second copy in the package (the planner's fit, which sizes
    hypothetical GPUs, is a different question)."""
    root = Path(__file__).resolve().parents[2] / "tokenmill"
    pattern = re.compile(r'is_available\(\) else "cpu"|default_cpu_kv_cache_bytes\(\)|is_bf16_supported\(|'
                         r"cpu_supports_bf16\(\)|\b8192 if\b|\b2048 if\b")
    found = [f"{path.relative_to(root)}:{i}" for path in root.rglob("*.py") if path.name != "fit.py"
             for i, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line) and not line.lstrip().startswith(("#", "def "))]
    assert all(place.startswith("config.py:") for place in found), found


def test_bfloat16_on_a_cpu_that_emulates_it_is_warned_about(monkeypatch):
    """bfloat16 on a CPU without native bf16 gets a warning naming the faster choice; nothing else does."""
    import tokenmill.config as config_module

    monkeypatch.setattr(config_module, "cpu_supports_bf16", lambda: False)
    warning = config_module.emulated_dtype_warning("cpu", "bfloat16")
    assert warning is not None and "emulated" in warning and "--dtype auto" in warning
    assert config_module.emulated_dtype_warning("cpu", "float32") is None
    assert config_module.emulated_dtype_warning("cuda", "bfloat16") is None
    monkeypatch.setattr(config_module, "cpu_supports_bf16", lambda: True)
    assert config_module.emulated_dtype_warning("cpu", "bfloat16") is None
