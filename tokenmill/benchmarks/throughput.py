"""The offline benchmark: drives an in-process engine step by step with the same load shapes as `bench serve`.

Requests are added to the engine when their arrival time has come and fewer than max_concurrency are in flight
(no limit and an infinite rate = everything queued at once, as LLM.generate does). Each engine step's outputs
carry the step's timestamp; RequestTimings (the engine's own stats, tokenmill.metrics.stats) turns them into
TTFT, ITL, TPOT and latency per request without a server.
Optionally a few engine steps at full batch are profiled (torch operators and tokenmill's Python stages), to
show where a step's time goes.
"""

from __future__ import annotations

import cProfile
import io
import math
import pstats
import time
from collections import deque
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from tokenmill.benchmarks.datasets import SampleRequest
from tokenmill.benchmarks.load import arrival_offsets
from tokenmill.benchmarks.metrics import RequestResult
from tokenmill.metrics.stats import RequestTimings


@dataclass
class _InFlight:
    index: int
    timings: RequestTimings

    @property
    def started(self) -> bool:
        return self.timings.first_token_time[0] is not None


@dataclass
class OfflineRun:
    results: list[RequestResult]
    duration_s: float
    # Engine counters over the run: steps taken and seconds spent computing inside them.
    num_steps: int
    busy_seconds: float
    profile: str | None = None
    # Each request's output token ids, in request order.
    token_ids: list[list[int]] = field(default_factory=list)

    def engine_stats(self) -> dict[str, float]:
        return {
            "num_steps": self.num_steps,
            "busy_seconds": self.busy_seconds,
            "mean_step_ms": 1000.0 * self.busy_seconds / self.num_steps if self.num_steps else math.nan,
            # Share of wall time the engine spent computing (the rest: scheduling, output handling, idling).
            "busy_fraction": self.busy_seconds / self.duration_s if self.duration_s > 0 else math.nan,
        }


def reset_prefix_cache(llm) -> bool:
    """Forget cached prefixes between runs, so a run does not reuse an earlier run's KV blocks."""
    return llm.llm_engine.reset_prefix_cache()


def warm_up(llm, num_warmups: int = 1, prompt_len: int = 16, output_len: int = 4) -> None:
    """A few short requests before measuring: the first steps pay one-off allocation and setup costs."""
    from tokenmill import SamplingParams

    if num_warmups <= 0:
        return
    prompts = [
        {"prompt_token_ids": [(17 * i + j) % 100 + 10 for j in range(prompt_len)]} for i in range(num_warmups)
    ]
    llm.generate(
        prompts, SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0), use_tqdm=False
    )
    reset_prefix_cache(llm)


def run_offline(
    llm,
    requests: list[SampleRequest],
    *,
    max_concurrency: int | None = None,
    request_rate: float = math.inf,
    burstiness: float = 1.0,
    seed: int = 0,
    use_tqdm: bool = True,
    profile_steps: int = 0,
) -> OfflineRun:
    """Run `requests` (greedy, ignore_eos, each to its expected_output_len) through llm's engine."""
    from tokenmill import SamplingParams

    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    engine = llm.llm_engine
    offsets = arrival_offsets(len(requests), request_rate, burstiness, seed)
    pending = deque(range(len(requests)))
    in_flight: dict[str, _InFlight] = {}  # request_id -> its timings so far
    results: list[RequestResult | None] = [None] * len(requests)
    token_ids: list[list[int]] = [[] for _ in requests]
    full_batch = min(max_concurrency or len(requests), len(requests))
    profiler = StepProfiler(profile_steps) if profile_steps > 0 else None
    stats_before = engine.scheduler_stats
    bar = tqdm(total=len(requests), desc="Benchmark", unit="req", disable=not use_tqdm)
    start = time.perf_counter()
    start_wall = time.time()
    try:
        while pending or in_flight:
            now = time.perf_counter()
            while (
                pending
                and offsets[pending[0]] <= now - start
                and (max_concurrency is None or len(in_flight) < max_concurrency)
            ):
                index = pending.popleft()
                request = requests[index]
                request_id = engine.next_request_id()
                params = SamplingParams(
                    max_tokens=request.expected_output_len, ignore_eos=True, temperature=0.0
                )
                arrival = time.time()
                engine.add_request(
                    request_id,
                    {"prompt": request.prompt, "prompt_token_ids": request.prompt_token_ids},
                    params,
                    arrival_time=arrival,
                )
                in_flight[request_id] = _InFlight(index, RequestTimings(arrival, 1))
            if not in_flight:
                time.sleep(max(0.0, start + offsets[pending[0]] - time.perf_counter()))
                continue
            if (
                profiler is not None
                and not profiler.done
                and (profiler.started or _at_full_decode(in_flight, full_batch, pending))
            ):
                outputs = profiler.step(engine)
            else:
                outputs = engine.step()
            now = engine.last_step_time
            for output in outputs:
                entry = in_flight.get(output.request_id)
                if entry is None:
                    continue
                entry.timings.observe(output, now)
                if output.finished:
                    del in_flight[output.request_id]
                    results[entry.index] = _result(requests[entry.index], entry.timings, now, start_wall)
                    token_ids[entry.index] = list(output.outputs[0].token_ids)
                    bar.update(1)
    except BaseException:
        engine.abort_request(list(in_flight))
        raise
    finally:
        bar.close()
    duration = time.perf_counter() - start
    if profiler is not None:
        profiler.finish()
    return OfflineRun(
        results=[r for r in results if r is not None],
        duration_s=duration,
        num_steps=engine.scheduler_stats.num_steps - stats_before.num_steps,
        busy_seconds=engine.scheduler_stats.busy_seconds - stats_before.busy_seconds,
        profile=profiler.report if profiler is not None else None,
        token_ids=token_ids,
    )


def _at_full_decode(in_flight: dict[str, _InFlight], full_batch: int, pending: deque) -> bool:
    """Every admitted request is decoding and the batch is as large as the load allows (steady state)."""
    return (len(in_flight) >= full_batch or not pending) and all(e.started for e in in_flight.values())


def _result(request: SampleRequest, timings: RequestTimings, finished: float, start: float) -> RequestResult:
    ttft = timings.ttft
    return RequestResult(
        prompt_len=request.prompt_len,
        output_len=timings.num_seen[0],
        ttft=ttft if ttft is not None else timings.e2e_latency(finished),
        latency=timings.e2e_latency(finished),
        itl=list(timings.inter_token_latencies),
        start_time=timings.arrival_time - start,
    )


class StepProfiler:
    """Profiles engine steps: num_steps under torch.profiler (operators), then num_steps under cProfile
    (tokenmill's Python: schedule / execute / update). The caller handles each step's outputs as usual; the
    profilers' overhead inflates those steps' timings: take latencies from a run without profiling."""

    def __init__(self, num_steps: int, row_limit: int = 25) -> None:
        self.num_steps = num_steps
        self.row_limit = row_limit
        self.count = 0
        self.report: str | None = None
        self._engine = None
        self._torch_profile = None
        self._python_profile = cProfile.Profile()
        self._header = ""

    @property
    def started(self) -> bool:
        return self.count > 0

    @property
    def done(self) -> bool:
        return self.report is not None

    def step(self, engine) -> list:
        """One engine step under the profiler of its turn; returns the step's outputs."""
        import torch.profiler

        self._engine = engine
        if self.count == 0:
            stats = engine.scheduler_stats
            self._batch = stats.num_running
            self._busy, self._steps, self._wall = stats.busy_seconds, stats.num_steps, time.perf_counter()
            self._torch_profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._torch_profile.__enter__()
        elif self.count == self.num_steps:
            self._python_profile.enable()
        outputs = engine.step()
        self.count += 1
        if self.count == self.num_steps:
            self._stop_torch_profile()
        elif self.count == 2 * self.num_steps:
            self.finish()
        return outputs

    def finish(self) -> None:
        """Stop profiling: after the last profiled step, or early when the run ends first."""
        if not self.started or self.done:
            return
        if self.count < self.num_steps:
            self._stop_torch_profile()
        self._python_profile.disable()
        stream = io.StringIO()
        pstats.Stats(self._python_profile, stream=stream).sort_stats("cumulative").print_stats(
            r"tokenmill", self.row_limit
        )
        table = self._torch_profile.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=self.row_limit
        )
        self.report = "\n".join(
            [
                self._header,
                "",
                "torch operators, by self CPU time:",
                table,
                "",
                "tokenmill Python functions, by cumulative time (cProfile):",
                stream.getvalue(),
            ]
        )

    def _stop_torch_profile(self) -> None:
        self._torch_profile.__exit__(None, None, None)
        stats = self._engine.scheduler_stats
        steps = max(stats.num_steps - self._steps, 1)
        self._header = (
            f"Profile of {steps} engine steps at {self._batch} running requests: "
            f"{1000 * (time.perf_counter() - self._wall) / steps:.2f} ms/step wall, "
            f"{1000 * (stats.busy_seconds - self._busy) / steps:.2f} ms/step from launch to collection "
            "(both under the profiler)"
        )
