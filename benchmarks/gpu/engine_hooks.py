"""What the benchmark reads from a running engine, all through LLMEngine's public surface: the engine's facts
(engine_info: weight and KV bytes for the roofline, backend, CUDA graphs) and the stages of its steps
(set_step_timing / take_step_timings: schedule, build batch, forward, logits, sample, update)."""

from __future__ import annotations

import statistics
import time
from dataclasses import fields

from tokenmill.engine.engine_core import StepTiming

STAGES = tuple(f.name for f in fields(StepTiming) if f.type in ("float", float))


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3 if values else 0.0


class StepTimers:
    """Context manager that switches the engine's step timing on for a measurement, and steps the engine as
    LLM.generate does (final_only: outputs built for finished requests only).

    CPU share of a step = (wall time of LLMEngine.step - device time of forward and logits) / wall time: the
    engine runs one step at a time and waits for the GPU, so the rest is time the GPU waits for the host
    (scheduling, batch building, sampling and its bookkeeping, detokenizing). On CPU the "device" stages are
    host time too.
    """

    def __init__(self, engine, final_only: bool = False) -> None:
        self.engine = engine
        self.final_only = final_only
        self.engine_steps: list[float] = []  # seconds of each LLMEngine.step (the core's step and output processing)
        self.timings: list[StepTiming] = []

    def __enter__(self) -> StepTimers:
        self.engine.set_step_timing(True)
        return self

    def __exit__(self, *exc) -> None:
        self.timings += self.engine.take_step_timings()
        self.engine.set_step_timing(False)

    def step(self) -> None:
        t0 = time.perf_counter()
        self.engine.step(final_only=self.final_only)
        self.engine_steps.append(time.perf_counter() - t0)

    def summary(self) -> dict:
        timings = self.timings
        out = {f"{stage}_ms": median_ms([getattr(t, stage) for t in timings]) for stage in STAGES}
        core_step = out.pop("step_ms")  # EngineCore.step
        out["core_step_ms"] = core_step
        step = median_ms(self.engine_steps)  # LLMEngine.step: the core's step and output processing
        out["model_ms"] = out["forward_ms"] + out["logits_ms"]
        out["step_ms"] = out["engine_step_ms"] = step
        steps = self.engine_steps
        if len(timings) == len(steps):
            # In-process each LLMEngine.step ran one core step: the host's part of every step, then its median
            # (a difference of medians of separate series can even come out negative on a noisy machine).
            cpu = median_ms([s - t.forward - t.logits for s, t in zip(steps, timings, strict=True)])
            out["output_processing_ms"] = median_ms([s - t.step for s, t in zip(steps, timings, strict=True)])
        else:  # the core steps on its own (another process): only the medians compare
            cpu = step - out["model_ms"]
            out["output_processing_ms"] = step - core_step
        out["cpu_ms"] = cpu
        out["cpu_share"] = cpu / step if step else 0.0
        out["num_steps"] = len(self.engine_steps)
        out["num_timed_steps"] = len(timings)
        return out
