"""What the benchmark attaches to a running engine: byte counts for the roofline, and timers that split a step into
its CPU and GPU parts."""

from __future__ import annotations

import statistics
import time
from collections import defaultdict

import torch


def weight_bytes_read_per_step(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every parameter once, except an untied embedding table, of which
    only the batch's rows are read."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if not model.spec.tie_word_embeddings:
        emb = model.embed_tokens.weight
        total -= emb.numel() * emb.element_size()
    return total


def kv_bytes_per_token(core) -> int:
    """K and V of one token over all layers: 2 * num_layers * num_kv_heads * head_dim * dtype bytes."""
    spec = core.spec
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * core.kv_caches[0].element_size()


class _TimedForward:
    """Stands in for the runner's model: device time of the forward and of the logits, by CUDA events."""

    def __init__(self, inner, timers: StepTimers, key: str = "forward_gpu") -> None:
        self.inner = inner
        self.timers = timers
        self.key = key

    def _timed(self, key: str, fn, *args):
        if not self.timers.cuda:
            t0 = time.perf_counter()
            out = fn(*args)
            self.timers.host[key].append(time.perf_counter() - t0)
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn(*args)
        end.record()
        self.timers.events[key].append((start, end))
        return out

    def __call__(self, *args):
        return self._timed(self.key, self.inner, *args)

    def compute_logits(self, hidden):
        return self._timed("logits_gpu", self.inner.compute_logits, hidden)


class StepTimers:
    """Context manager that wraps the engine's stages with timers for the duration of a measurement.

    CPU share of a step = (wall time of LLMEngine.step - device time of forward and logits) / wall time: the
    engine runs one step at a time and waits for the GPU, so the rest is time the GPU waits for the host
    (scheduling, batch building, sampling bookkeeping, detokenizing).
    """

    def __init__(self, engine, cuda: bool, final_only: bool = False) -> None:
        self.engine = engine
        self.final_only = final_only  # consume steps as LLM.generate does (only finished outputs are built)
        self.core = engine.core
        self.cuda = cuda
        self.host: dict[str, list[float]] = defaultdict(list)  # stage -> seconds per call
        self.events: dict[str, list] = defaultdict(list)  # stage -> (start, end) CUDA events per call

    def __enter__(self) -> StepTimers:
        core = self.core
        # (object, method, label): the method is wrapped on the instance for the measurement.
        self._methods = [(core.scheduler, "schedule", "schedule"), (core.scheduler, "update_from_output", "update"),
                         (core.runner, "_build_batch", "build_batch"), (core, "step", "core_step")]
        for obj, name, label in self._methods:
            setattr(obj, name, self._wrap(getattr(obj, name), label))
        # The runner calls `forward` (the CUDA-graph runner, or the model itself) for the hidden states and
        # `model.compute_logits`; both are timed, and nothing else of the model is.
        runner = core.runner
        self._model, self._forward = runner.model, runner.forward
        runner.forward = _TimedForward(self._forward, self)
        runner.model = _TimedForward(self._model, self, key="unexpected_model_call")
        return self

    def __exit__(self, *exc) -> None:
        for obj, name, _ in self._methods:
            delattr(obj, name)  # back to the class's method
        self.core.runner.model, self.core.runner.forward = self._model, self._forward

    def _wrap(self, fn, name: str):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.host[name].append(time.perf_counter() - t0)
        return timed

    def step(self) -> None:
        t0 = time.perf_counter()
        self.engine.step(final_only=self.final_only)
        self.host["engine_step"].append(time.perf_counter() - t0)

    def summary(self) -> dict:
        def ms(values: list[float]) -> float:
            return statistics.median(values) * 1e3 if values else 0.0

        gpu = {k: [s.elapsed_time(e) / 1e3 for s, e in v] for k, v in self.events.items()}
        stages = {**self.host, **gpu}
        step = ms(stages["engine_step"])
        device = ms(stages.get("forward_gpu", [])) + ms(stages.get("logits_gpu", []))
        out = {f"{k}_ms": ms(v) for k, v in stages.items()}
        out["output_processing_ms"] = step - ms(stages["core_step"])
        out["step_ms"] = step
        out["cpu_ms"] = step - device
        out["cpu_share"] = (step - device) / step if step else 0.0
        out["num_steps"] = len(stages["engine_step"])
        return out
