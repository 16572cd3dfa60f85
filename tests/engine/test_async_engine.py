"""AsyncLLMEngine in-process: concurrent streams, aborts free blocks, an idle engine does not spin."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from tokenmill.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tokenmill.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineStepError
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.metrics.stats import StatLogger
from tokenmill.sampling_params import SamplingParams


class Recorder(StatLogger):
    def __init__(self) -> None:
        self.finished = []
        self.last = None

    def record(self, scheduler_stats, iteration_stats) -> None:
        self.last = scheduler_stats
        if iteration_stats is not None:
            self.finished.extend(iteration_stats.finished_requests)


def thread_cpu_seconds(native_id: int) -> float:
    fields = open(f"/proc/self/task/{native_id}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async-scheduling"])
def llm_engine(server_model_dir, request) -> LLMEngine:
    config = EngineConfig(model=ModelConfig(model=str(server_model_dir), dtype="float32"),
                          cache=CacheConfig(kv_cache_memory="8MiB"),
                          scheduler=SchedulerConfig(async_scheduling=request.param))
    return LLMEngine(config, show_progress=False)


def test_streams_abort_and_idle(llm_engine):
    recorder = Recorder()

    async def main():
        engine = AsyncLLMEngine(llm_engine, [recorder])
        engine.start()
        greedy = SamplingParams(temperature=0.0, max_tokens=8)

        async def collect(request_id: str, prompt: str):
            outputs = [o async for o in engine.generate(request_id, prompt, greedy)]
            assert outputs[-1].finished and all(not o.finished for o in outputs[:-1])
            return outputs[-1].outputs[0].token_ids

        # Several requests in one batch; each gets its own complete, cumulative stream.
        results = await asyncio.gather(*(collect(f"r{i}", f"prompt number {i}") for i in range(4)))
        assert all(len(ids) == 8 for ids in results)

        # Leaving a stream early aborts the request; its blocks are freed at the next step.
        long = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
        stream = engine.generate("gone", "a long one", long)
        async for output in stream:
            if len(output.outputs[0].token_ids) >= 2:
                break
        await stream.aclose()
        deadline = time.monotonic() + 5
        while engine.scheduler_stats.num_running or engine.scheduler_stats.kv_cache_usage > 0:
            assert time.monotonic() < deadline, engine.scheduler_stats
            await asyncio.sleep(0.01)
        assert engine.num_in_flight == 0

        # A bad prompt fails that request alone, with the engine's message.
        with pytest.raises(ValueError, match="outside the vocabulary"):
            async for _ in engine.generate("bad", [10**9], greedy):
                pass
        assert len(await collect("after-bad", "still fine")) == 8

        # Idle: the engine thread blocks on its inbox instead of spinning.
        await asyncio.sleep(0.1)
        before = thread_cpu_seconds(engine._thread.native_id)
        await asyncio.sleep(0.5)
        assert thread_cpu_seconds(engine._thread.native_id) - before < 0.05

        # A failing step fails the requests in flight (not the engine): the next request is served.
        real_step = llm_engine.step

        def failing_step():
            llm_engine.step = real_step
            raise RuntimeError("injected failure")

        llm_engine.step = failing_step
        with pytest.raises(EngineStepError, match="injected failure"):
            async for _ in engine.generate("unlucky", "x", greedy):
                pass
        assert len(await collect("lucky", "y")) == 8

        await asyncio.to_thread(engine.shutdown)
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            async for _ in engine.generate("late", "x", greedy):
                pass

    asyncio.run(main())
    reasons = {s.request_id: s.finish_reason for s in recorder.finished}
    assert reasons["gone"] == "abort" and reasons["r0"] == "length" and "bad" not in reasons
    assert reasons["unlucky"] == "abort"
    # Every step's time is attributed to the requests in it.
    total = sum(s.gpu_seconds for s in recorder.finished)
    assert total == pytest.approx(recorder.last.busy_seconds, rel=1e-6)


def test_encode_and_abort(llm_engine):
    """encode() yields one finished output with the vector; leaving it early aborts the pooling request."""
    from tokenmill.outputs import EmbeddingRequestOutput
    from tokenmill.pooling_params import PoolingParams

    recorder = Recorder()
    prompt = "Embeddings arrive in one output. " * 6  # 150 tokens

    async def main():
        engine = AsyncLLMEngine(llm_engine, [recorder])
        engine.start()
        try:
            outputs = [o async for o in engine.encode("e1", prompt, PoolingParams(pooling_type="MEAN"))]
            assert len(outputs) == 1 and isinstance(outputs[0], EmbeddingRequestOutput) and outputs[0].finished
            stream = engine.encode("e2", prompt * 3, PoolingParams(pooling_type="MEAN"))
            task = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await stream.aclose()
            deadline = time.monotonic() + 5
            while len(recorder.finished) < 2 or llm_engine.has_unfinished_requests():
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            return outputs[0]
        finally:
            await asyncio.to_thread(engine.shutdown)

    output = asyncio.run(main())
    assert len(output.outputs.embedding) == 64
    assert llm_engine.core.kv_cache_manager.req_to_blocks == {}
    reasons = {s.request_id: s.finish_reason for s in recorder.finished}
    assert reasons.get("e1") == "stop"
    # Accounted once either way (it may have finished before the abort reached the engine thread).
    assert reasons["e2"] in ("abort", "stop")
    assert [s.num_generation_tokens for s in recorder.finished] == [0, 0]
