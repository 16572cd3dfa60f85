"""The engine core behind its client: the wire format, and the engine core process (LLM(multiprocess=True))."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.engine.core_client import EngineDeadError, MPClient
from tokenmill.engine.messages import (
    EngineCoreError,
    EngineCoreOutputs,
    EngineCoreOutputType,
    EngineCoreRequest,
    EngineCoreRequestType,
    MsgpackDecoder,
    MsgpackEncoder,
)
from tokenmill.metrics.stats import SchedulerStats
from tokenmill.outputs import EngineCoreOutput, Logprob, RequestMetrics
from tokenmill.pooling_params import PoolingParams
from tokenmill.structured_output.params import StructuredOutputCompileTimeout, StructuredOutputsParams

KV = "64MiB"


def test_engine_core_request_round_trip():
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=3, stop=["x", "yz"], stop_token_ids=[7],
                            max_tokens=33, min_tokens=2, logprobs=3, prompt_logprobs=1, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(json={"type": "object"}, backend="guidance"))
    request = EngineCoreRequest("r-1", [1, 2, 3], params, frozenset({2, 9}), 1234.5)
    pooling = EngineCoreRequest("p", [4, 5], None, frozenset(), 1.0, PoolingParams(pooling_type="MEAN",
                                                                                    normalize=False))
    message_type, (decoded, decoded_pooling) = MsgpackDecoder().decode(
        MsgpackEncoder().encode_requests([request, pooling]))
    assert message_type == EngineCoreRequestType.ADD
    assert decoded == request and decoded_pooling == pooling
    assert decoded.sampling_params.stop_strings == ["x", "yz"]
    assert decoded.sampling_params.structured_outputs.json == {"type": "object"}


def test_engine_core_outputs_round_trip():
    outputs = EngineCoreOutputs(
        outputs=[
            EngineCoreOutput("a", [5], [{5: Logprob(-0.5, 1), 8: Logprob(-1.25, 2)}], None, None, None),
            EngineCoreOutput("b", [6], None, [{1: Logprob(-2.0, 3)}], "stop", "END"),
            EngineCoreOutput("c", [], None, None, "abort", None, error=StructuredOutputCompileTimeout("slow")),
            EngineCoreOutput("d", [], None, None, "stop", None, pooled=torch.tensor([0.25, -1.5, 3.0])),
            EngineCoreOutput("e", [], None, None, "abort", None, error=RuntimeError("boom")),
        ],
        metrics={"a": RequestMetrics(1.0, 1.5, 2.0, 2.5, None, 0.125, 16)},
        cumulative_logprobs={"a": -0.5},
        scheduler_stats=SchedulerStats(num_running=3, num_waiting=1, kv_cache_usage=0.5, prefix_cache_queries=10,
                                       prefix_cache_hits=4, num_preemptions=2, busy_seconds=1.5, num_steps=7,
                                       num_kv_blocks=100, block_size=16),
        timestamp=99.0,
    )
    message_type, decoded = MsgpackDecoder().decode(MsgpackEncoder().encode_outputs(outputs))
    assert message_type == EngineCoreOutputType.OUTPUTS
    assert decoded.outputs[:2] == outputs.outputs[:2]
    assert decoded.metrics == outputs.metrics
    assert decoded.cumulative_logprobs == outputs.cumulative_logprobs
    assert decoded.scheduler_stats == outputs.scheduler_stats
    assert decoded.timestamp == 99.0
    error = decoded.outputs[2].error
    assert type(error) is StructuredOutputCompileTimeout and str(error) == "slow"
    assert decoded.outputs[3].pooled.tolist() == [0.25, -1.5, 3.0]
    error = decoded.outputs[4].error
    assert isinstance(error, EngineCoreError) and error.type_name == "RuntimeError" and str(error) == "boom"


@pytest.mark.slow
def test_multiprocess_engine_matches_in_process(llama_dir):
    prompts = [[1, 5, 9, 13], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20], [7] * 30]
    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    seeded = SamplingParams(max_tokens=8, temperature=0.8, seed=11, n=2, ignore_eos=True)
    inproc = LLM(str(llama_dir), dtype="float32", kv_cache_memory=KV, show_progress=False)
    expected = inproc.generate(prompts, greedy, use_tqdm=False) + inproc.generate(prompts[:1], seeded, use_tqdm=False)
    expected_embed = inproc.embed(prompts[:2], use_tqdm=False)
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory=KV, show_progress=False, multiprocess=True)
    try:
        proc = llm.llm_engine.engine_core.proc
        assert proc.is_alive() and proc.pid != os.getpid()
        got = llm.generate(prompts, greedy, use_tqdm=False) + llm.generate(prompts[:1], seeded, use_tqdm=False)
        for e, g in zip(expected, got, strict=True):
            assert [c.token_ids for c in g.outputs] == [c.token_ids for c in e.outputs]
            assert [c.text for c in g.outputs] == [c.text for c in e.outputs]
        assert got[0].outputs[0].cumulative_logprob == pytest.approx(expected[0].outputs[0].cumulative_logprob)
        assert got[0].metrics.first_token_time is not None and got[0].metrics.compute_seconds > 0
        embeddings = llm.embed(prompts[:2], use_tqdm=False)
        for e, g in zip(expected_embed, embeddings, strict=True):
            assert g.outputs.embedding == pytest.approx(e.outputs.embedding, abs=1e-6)
        stats = llm.llm_engine.scheduler_stats
        assert stats.num_steps > 0 and stats.num_running == 0 and stats.prefix_cache_queries > 0
        with pytest.raises(AttributeError, match="another process"):
            _ = llm.llm_engine.core
    finally:
        llm.llm_engine.shutdown()
    assert not proc.is_alive()


@pytest.mark.slow
def test_multiprocess_engine_death_is_reported(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory=KV, show_progress=False, multiprocess=True)
    client = llm.llm_engine.engine_core
    assert isinstance(client, MPClient)
    deaths = []
    client.add_dead_callback(deaths.append)
    os.kill(client.proc.pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(EngineDeadError, match="died"):
        llm.generate([[1, 2, 3]], SamplingParams(max_tokens=1000, ignore_eos=True), use_tqdm=False)
    assert time.monotonic() - start < 5
    while not deaths and time.monotonic() - start < 5:  # the callbacks run on the client's monitor thread
        time.sleep(0.01)
    assert len(deaths) == 1 and "exit status -9" in str(deaths[0])
    llm.llm_engine.shutdown()


def core_reach_offenders(root: Path) -> list[str]:
    """Lines outside the engine, under root, that reach into EngineCore or its runner."""
    import re

    pattern = re.compile(r"\bengine\.core\b|llm_engine\.core\b|(?<!tokenmill\.)\bcore\.(scheduler|kv_cache_manager|"
                         r"runner|busy_seconds|num_steps|kv_sizing|dtype|set_async_scheduling|model|kv_caches|spec|"
                         r"graph_runner|graph_capture_seconds|memory_profile|worker|executor|step)\b|"
                         r"\brunner\.(forward|model|_build_batch)\b|\bcore = ")
    outside = ("entrypoints", "benchmarks", "metrics", "router")
    files = [p for part in outside for p in (root / "tokenmill" / part).rglob("*.py")]
    files += [root / "benchmarks" / name for name in ("serving_overhead.py", "host_overhead.py",
                                                     "offline_throughput.py", "batch_invariance.py")]
    files += sorted((root / "benchmarks" / "gpu").glob("*.py"))
    return [f"{path.relative_to(root)}:{i}: {line.strip()}"
            for path in files for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]


def test_nothing_outside_the_engine_reaches_into_the_core():
    """The server, the offline benchmark, the benchmarks' engine counters and the GPU benchmark's step timers read
    the stats surface (LLMEngine.scheduler_stats), engine_info() and the step timing utility calls, never
    EngineCore's attributes or the runner's methods (no monkeypatching): the core may be in another process."""
    offenders = core_reach_offenders(Path(__file__).resolve().parents[2])
    assert not offenders, "\n".join(offenders)
