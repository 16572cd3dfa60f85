"""The engine's facts (engine_info) and its per-step stage timing (set_step_timing / take_step_timings): the
supported surface the GPU benchmark reads instead of reaching into the core, in-process and across processes."""

from __future__ import annotations

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.engine.engine_core import StepTiming

KV = "64MiB"
RUNNER_STAGES = ("build_batch", "forward", "logits", "sample")


def check_timings(timings: list[StepTiming], num_steps: int, tokens: int) -> None:
    assert len(timings) == num_steps and all(isinstance(t, StepTiming) for t in timings)
    assert sum(t.num_collected for t in timings) == num_steps
    assert sum(t.num_scheduled_tokens for t in timings) == tokens
    for t in timings:
        assert t.step > 0 and t.schedule > 0 and t.update > 0 and t.launch > 0
        assert all(getattr(t, stage) > 0 for stage in RUNNER_STAGES), t
        # The host stages lie inside the call; on CPU the runner's stages inside its launch (or its pipe).
        assert t.schedule + t.launch + t.collect + t.update <= t.step
        assert t.build_batch + t.forward + t.logits + t.sample <= t.launch + t.collect


def run(llm: LLM, prompts: list[list[int]], max_tokens: int) -> None:
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    for prompt in prompts:
        engine.add_request(engine.next_request_id(), {"prompt_token_ids": prompt}, params)
    while engine.has_unfinished_requests():
        engine.step()


def test_step_timing_and_engine_info_in_process(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory=KV, show_progress=False, max_num_seqs=4)
    engine = llm.llm_engine
    try:
        info = engine.engine_info()
        assert info["device"] == "cpu" and info["dtype"] == "float32"
        assert info["attention_backend"] in ("cpu", "torch")
        assert info["cuda_graph_sizes"] is None and info["graph_capture_seconds"] is None
        assert info["num_kv_blocks"] == engine.scheduler_stats.num_kv_blocks and info["block_size"] == 16
        assert info["kv_bytes_per_token"] * 16 == info["kv_bytes_per_block"]
        assert 0 < info["weight_bytes_read_per_step"] <= info["weight_bytes"]
        assert info["max_model_len"] == engine.max_model_len

        run(llm, [[1, 2, 3]], 3)
        assert engine.take_step_timings() == []  # off by default: nothing recorded
        engine.set_step_timing(True)
        before = engine.scheduler_stats.num_steps
        run(llm, [[5, 6, 7, 8], [9, 10]], 4)  # one prefill step, then 3 decode steps of both
        timings = engine.take_step_timings()
        check_timings(timings, engine.scheduler_stats.num_steps - before, 6 + 3 * 2)
        assert engine.take_step_timings() == []  # taken once

        engine.set_step_timing(False)
        run(llm, [[1, 2, 3]], 3)
        assert engine.take_step_timings() == []

        # Async scheduling: a call launches one step and collects the one before; every step is collected once.
        engine.set_async_scheduling(True)
        engine.set_step_timing(True)
        before = engine.scheduler_stats.num_steps
        run(llm, [[5, 6, 7, 8]], 5)
        timings = engine.take_step_timings()
        assert sum(t.num_collected for t in timings) == engine.scheduler_stats.num_steps - before == 5
        assert sum(t.forward > 0 for t in timings) == 5
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.slow
def test_step_timing_across_processes(llama_dir):
    """The records cross the engine core process's utility calls and the worker process's pipe."""
    llm = LLM(str(llama_dir), dtype="float32", kv_cache_memory=KV, show_progress=False, multiprocess=True,
              distributed_executor_backend="mp")
    engine = llm.llm_engine
    try:
        assert engine.engine_info()["distributed_executor_backend"] == "mp"
        engine.set_step_timing(True)
        before = engine.scheduler_stats.num_steps
        run(llm, [[5, 6, 7, 8], [9, 10]], 4)
        check_timings(engine.take_step_timings(), engine.scheduler_stats.num_steps - before, 6 + 3 * 2)
    finally:
        engine.shutdown()
