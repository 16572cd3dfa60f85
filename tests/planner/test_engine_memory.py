"""The engine's start-up line "per-rank memory: ..." sets what each rank allocated beside the planner's prediction
(tokenmill/planner/engine_memory.py): they agree for a full-precision tiny model and for the bundled GGUF."""

from __future__ import annotations

import dataclasses
import logging
import re
from types import SimpleNamespace

import pytest

from tokenmill import LLM
from tokenmill.model.loader import read_hf_config
from tokenmill.planner import ModelArch, engine_weight_bytes, kv_cache_bytes_per_block
from tokenmill.planner.engine_memory import log_rank_memory, planned_rank_memory

LINE = re.compile(
    r"per-rank memory: rank (\d+) \(tp rank (\d+)/(\d+), pp stage (\d+)/(\d+)\): weights ([\d.]+) MiB "
    r"\(planned ([\d.]+) MiB\), KV cache ([\d.]+) MiB \(planned ([\d.]+) MiB, (\d+) blocks\)"
)


def start_and_read_the_line(caplog, model, **kwargs) -> tuple[re.Match, LLM]:
    with caplog.at_level(logging.INFO, logger="tokenmill"):
        llm = LLM(model, show_progress=False, **kwargs)
    lines = [r for r in caplog.records if r.getMessage().startswith("per-rank memory:")]
    assert len(lines) == 1, caplog.text
    assert lines[0].levelno == logging.INFO  # a disagreement would be a warning
    match = LINE.fullmatch(lines[0].getMessage())
    assert match, lines[0].getMessage()
    return match, llm


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tiny_model_measured_equals_planned(caplog, server_model_dir, dtype):
    match, llm = start_and_read_the_line(caplog, str(server_model_dir), dtype=dtype, kv_cache_memory="1MiB")
    rank, tp_rank, tp, stage, pp, weights, planned_weights, kv, planned_kv, blocks = match.groups()
    assert (rank, tp_rank, tp, stage, pp) == ("0", "0", "1", "0", "1")
    core = llm.llm_engine.core
    # The measured numbers are the real allocations ...
    assert weights == mib(core.model.weight_bytes())
    assert kv == mib(sum(t.numel() * t.element_size() for t in core.kv_caches))
    assert int(blocks) == core.kv_sizing.num_blocks
    # ... and the planned ones the planner's functions, which agree with them.
    arch = ModelArch.from_hf_config(read_hf_config(server_model_dir))
    assert planned_weights == mib(engine_weight_bytes(arch, dtype)) == weights
    assert planned_kv == mib(int(blocks) * kv_cache_bytes_per_block(arch, 16, dtype)) == kv


@pytest.mark.slow  # loads the 135M-parameter bundled model
def test_bundled_gguf_model_measured_equals_planned(caplog):
    match, llm = start_and_read_the_line(caplog, None, kv_cache_memory="4MiB")
    weights, planned_weights, kv, planned_kv = match.group(6, 7, 8, 9)
    core = llm.llm_engine.core
    assert float(weights) > 90  # the Q4_1 blocks as allocated (~94 MiB), not only the float norms
    assert weights == mib(core.model.weight_bytes()) == planned_weights
    assert kv == planned_kv


def fake_config(tp: int, pp: int) -> SimpleNamespace:
    """The fields of a resolved EngineConfig that log_rank_memory reads."""
    return SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                           model=SimpleNamespace(dtype="float32", quantization=None),
                           cache=SimpleNamespace(block_size=16))


def test_ranks_map_to_tensor_parallel_ranks_and_stages(caplog, server_model_dir):
    model_dir = server_model_dir
    arch = ModelArch.from_hf_config(read_hf_config(model_dir))
    facts = []
    for rank in range(4):
        weights, kv = planned_rank_memory(arch, "float32", None, 16, 10, 2, 2, rank // 2)
        facts.append({"rank": rank, "weight_bytes": weights, "kv_cache_bytes": kv})
    with caplog.at_level(logging.INFO, logger="tokenmill"):
        records = log_rank_memory(fake_config(2, 2), model_dir, facts, 10)
    assert [(r.rank, r.tensor_parallel_rank, r.pipeline_stage) for r in records] == [(0, 0, 0), (1, 1, 0),
                                                                                   (2, 0, 1), (3, 1, 1)]
    assert all(r.agrees() for r in records)
    assert [r.levelno for r in caplog.records] == [logging.INFO] * 4
    # A rank's share: half the heads and MLP columns, half the layers, half the KV heads of its half of the layers.
    whole_kv = 10 * kv_cache_bytes_per_block(arch, 16, "float32")
    assert records[0].planned_kv_cache_bytes * 4 == whole_kv
    assert records[0].planned_weight_bytes < engine_weight_bytes(arch, "float32") / 2


def test_a_disagreement_is_a_warning(caplog, server_model_dir):
    model_dir = server_model_dir
    arch = ModelArch.from_hf_config(read_hf_config(model_dir))
    weights, kv = planned_rank_memory(arch, "float32", None, 16, 10)
    with caplog.at_level(logging.INFO, logger="tokenmill"):
        [record] = log_rank_memory(fake_config(1, 1), model_dir, {"weight_bytes": weights * 2, "kv_cache_bytes": kv},
                                   10)
    assert not record.agrees()
    assert caplog.records[-1].levelno == logging.WARNING
    assert "the planner's memory model disagrees with this engine" in caplog.text


@pytest.mark.parametrize("tp", [2, 4])
def test_engine_weight_bytes_per_tensor_parallel_rank(tp, server_model_dir):
    """Column-parallel q/k/v and gate/up by rows, row-parallel o/down by columns, the vocab by rows; norms
    replicated (float32, unquantized: 4 bytes an element)."""
    arch = ModelArch.from_hf_config(read_hf_config(server_model_dir))
    h, d, inter, vocab = arch.hidden_size, arch.head_dim, arch.intermediate_size, arch.vocab_size
    q, kv = arch.num_attention_heads * d // tp, max(1, arch.num_kv_heads // tp) * d
    layer = (q + 2 * kv) * h + h * q + 2 * inter // tp * h + h * inter // tp + 2 * h
    vocab_rows = -(-vocab // tp)
    head = 0 if arch.tie_word_embeddings else vocab_rows * h
    expected = 4 * (vocab_rows * h + head + arch.num_layers * layer + h)
    assert engine_weight_bytes(arch, "float32", None, tp) == expected


def test_a_rank_the_planner_cannot_place_is_a_warning_not_a_crash(caplog, server_model_dir):
    with caplog.at_level(logging.INFO, logger="tokenmill"):
        records = log_rank_memory(fake_config(1, 1), server_model_dir, {"rank": 5, "weight_bytes": 1}, 10)
    assert records == []
    assert "the planner cannot predict this engine's memory (pipeline_stage must be in 0..0" in caplog.text


def test_the_packed_output_copy_is_a_cpu_bfloat16_allocation(server_model_dir):
    from tokenmill.model.quantization.unquantized import _onednn_packing_available

    arch = ModelArch.from_hf_config(read_hf_config(server_model_dir))
    tied = dataclasses.replace(arch, tie_word_embeddings=True)
    table = tied.vocab_size * tied.hidden_size * 2
    extra = table if _onednn_packing_available() else 0
    assert engine_weight_bytes(tied, "bfloat16", device_type="cpu") == engine_weight_bytes(
        tied, "bfloat16", device_type="cuda") + extra
    assert engine_weight_bytes(tied, "float32", device_type="cpu") == engine_weight_bytes(
        tied, "float32", device_type="cuda")
