"""LLMEngine: text in, text out around the engine core (tokenize and validate; detokenize, stop strings, n > 1).

The engine core sits behind an EngineCoreClient: in this process (InprocClient, LLM's default) or in a child
process (MPClient: `tokenmill serve`, LLM(multiprocess=True)). This side keeps each request's text state and
output tokens; the core sends per step each request's new tokens, logprobs, finish reason and metrics.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenmill.config import EngineConfig
from tokenmill.engine.core_client import EngineCoreClient
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.messages import EngineCoreOutputs, EngineCoreRequest
from tokenmill.metrics.stats import SchedulerStats
from tokenmill.model.default_model import prepare_model
from tokenmill.model.tokenizer import Tokenizer
from tokenmill.outputs import (
    CompletionOutput,
    EmbeddingOutput,
    EmbeddingRequestOutput,
    EngineCoreOutput,
    PositionLogprobs,
    RequestMetrics,
    RequestOutput,
)
from tokenmill.pooling_params import PoolingParams
from tokenmill.request import RequestStatus
from tokenmill.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenmill.engine.engine_core import StepTiming


@dataclass
class _Child:
    """One sample of a request (n > 1: one of n children), as the front end sees it."""

    index: int
    request_id: str
    detokenizer: IncrementalDetokenizer
    logprobs: list[PositionLogprobs] | None
    metrics: RequestMetrics
    output_token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    def completion(self) -> CompletionOutput:
        finished = self.finish_reason is not None
        return CompletionOutput(
            index=self.index,
            text=self.detokenizer.visible_text(finished),
            token_ids=list(self.output_token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )


@dataclass
class _Parent:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    children: list[_Child] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.children)

    @property
    def num_samples(self) -> int:
        return len(self.children)

    def metrics(self) -> RequestMetrics:
        if len(self.children) == 1:
            return self.children[0].metrics.snapshot()
        ms = [c.metrics for c in self.children]

        def first(values):
            values = [v for v in values if v is not None]
            return min(values) if values else None

        finished = [m.finished_time for m in ms if m.finished_time is not None]
        return RequestMetrics(
            arrival_time=ms[0].arrival_time,
            first_scheduled_time=first(m.first_scheduled_time for m in ms),
            first_token_time=first(m.first_token_time for m in ms),
            last_token_time=max((m.last_token_time for m in ms if m.last_token_time), default=None),
            finished_time=max(finished) if len(finished) == len(ms) else None,
            compute_seconds=sum(m.compute_seconds for m in ms),
            num_cached_tokens=ms[0].num_cached_tokens,
        )

    def output(self, finished: bool | None = None) -> RequestOutput:
        metrics = self.metrics()
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            prompt_logprobs=self.prompt_logprobs,
            outputs=[c.completion() for c in self.children],
            finished=self.finished if finished is None else finished,
            metrics=metrics,
            num_cached_tokens=metrics.num_cached_tokens,
        )


@dataclass
class _PoolingParent:
    """A pooling request: one engine request, no sampling, one vector at the end."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    metrics: RequestMetrics
    embedding: list[float] | None = None

    @property
    def finished(self) -> bool:
        return self.embedding is not None

    @property
    def num_samples(self) -> int:
        return 0

    def output(self, finished: bool | None = None) -> EmbeddingRequestOutput:
        metrics = self.metrics.snapshot()
        return EmbeddingRequestOutput(
            request_id=self.request_id, outputs=EmbeddingOutput(list(self.embedding or [])),
            prompt_token_ids=self.prompt_token_ids, finished=self.finished if finished is None else finished,
            prompt=self.prompt, metrics=metrics, num_cached_tokens=metrics.num_cached_tokens,
        )


class LLMEngine:
    """multiprocess: run the engine core in a child process (MPClient) instead of this one (InprocClient)."""

    def __init__(self, config: EngineConfig, show_progress: bool = True, multiprocess: bool = False) -> None:
        config.validate()
        self.model_dir: Path = prepare_model(config.model.model, config.model.revision, config.model.download_dir)
        self.tokenizer = Tokenizer.from_pretrained(self.model_dir)
        if config.model.chat_template is not None:
            self.tokenizer.chat_templates["default"] = config.model.chat_template
        self.multiprocess = multiprocess
        self.engine_core: EngineCoreClient = EngineCoreClient.make(config, self.model_dir, multiprocess,
                                                                   tokenizer=self.tokenizer)
        info = self.engine_core.info
        self.max_model_len: int = info["max_model_len"]
        self.vocab_size: int = info["vocab_size"]
        # The scheduler's stats as of the last step's outputs (counters cumulative since start).
        self.scheduler_stats = SchedulerStats(num_kv_blocks=info["num_kv_blocks"], block_size=info["block_size"])
        # time.time() of the last step whose outputs were processed.
        self.last_step_time = 0.0
        # request_id -> parent request state.
        self.parents: dict[str, _Parent] = {}
        # child (engine) request_id -> (parent, child).
        self.children: dict[str, tuple[_Parent, _Child]] = {}
        # request_id -> pooling request state.
        self.pooling: dict[str, _PoolingParent] = {}
        self.pooling_type = config.model.pooling_type
        # request_id -> why it failed inside the engine (a grammar that did not compile); read by take_errors.
        self.errors: dict[str, BaseException] = {}
        # engine request id -> (parent, child or None for pooling) of an aborted request whose final metrics have
        # not arrived yet; the parents whose all have arrived, for take_aborted().
        self._aborting: dict[str, tuple[_Parent | _PoolingParent, _Child | None]] = {}
        self._aborted_done: list[_Parent | _PoolingParent] = []
        self._counter = itertools.count()

    @property
    def core(self):
        """The in-process EngineCore (engine tests only: its internals are not part of any contract)."""
        core = getattr(self.engine_core, "core", None)
        if core is None:
            raise AttributeError("the engine core runs in another process (multiprocess=True): use the stats "
                                 "(LLMEngine.scheduler_stats) or a utility call instead")
        return core

    def set_async_scheduling(self, enabled: bool) -> None:
        """Switch async scheduling between runs (no request in flight); benchmarks compare both on one engine."""
        self.engine_core.call_utility("set_async_scheduling", bool(enabled))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (benchmarks between runs); False when blocks are still in use."""
        return bool(self.engine_core.call_utility("reset_prefix_cache"))

    def engine_info(self) -> dict[str, Any]:
        """What the engine settled at start-up (EngineCore.engine_info): device, dtype, attention backend, KV cache
        blocks and bytes, weight bytes, CUDA graph sizes and capture seconds, the GPU memory profile."""
        return self.engine_core.call_utility("engine_info")

    def set_step_timing(self, enabled: bool) -> None:
        """Record the stages of every engine step (schedule, build batch, forward, logits, sample,
        update) until switched
        off; read them with take_step_timings(). For benchmarks: on CUDA it adds CUDA events to each step."""
        self.engine_core.call_utility("set_step_timing", bool(enabled))

    def take_step_timings(self) -> list[StepTiming]:
        """The stage timings of the steps since the last call (StepTiming records, oldest first)."""
        from tokenmill.engine.engine_core import StepTiming

        return [StepTiming(**timing) for timing in self.engine_core.call_utility("take_step_timings")]

    @property
    def dtype(self) -> str:
        """The dtype the model runs in ("float32", "bfloat16", ...)."""
        return self.engine_core.info["dtype"]

    def shutdown(self) -> None:
        """Stop the engine core (its process, under multiprocess)."""
        self.engine_core.shutdown()

    def next_request_id(self) -> str:
        return str(next(self._counter))

    # ---- input ----------------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | dict | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self.tokenize_prompt(prompt["prompt"])
            raise ValueError("a prompt dict needs 'prompt' (text) or 'prompt_token_ids' (a list of token ids)")
        if isinstance(prompt, list | tuple) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError(
            f"prompt must be a string, a list of token ids or a dict with 'prompt_token_ids', got {type(prompt).__name__}"
        )

    def validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("the prompt is empty: give at least one token")
        if len(token_ids) > self.max_model_len:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens, max_model_len is {self.max_model_len}: "
                "shorten the prompt or raise max_model_len"
            )
        bad = next((t for t in token_ids if not isinstance(t, int) or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")

    def add_request(self, request_id: str, prompt: str | dict | list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> _Parent:
        if request_id in self.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self.tokenize_prompt(prompt)
        self.validate_prompt(token_ids)
        parent = _Parent(request_id, text, token_ids, [None] if params.prompt_logprobs is not None else None)
        arrival_time = time.time() if arrival_time is None else arrival_time
        eos = self.tokenizer.eos_token_ids
        requests = []
        for index in range(params.n):
            child_params = params if params.n == 1 else params.clone_for_child(index)
            child_id = request_id if params.n == 1 else f"{index}_{request_id}"
            child = _Child(index, child_id, IncrementalDetokenizer(self.tokenizer, token_ids, child_params),
                           [] if child_params.logprobs is not None else None, RequestMetrics(arrival_time),
                           cumulative_logprob=0.0 if child_params.logprobs is not None else None)
            parent.children.append(child)
            self.children[child_id] = (parent, child)
            requests.append(EngineCoreRequest(child_id, token_ids, child_params, eos, arrival_time))
        self.parents[request_id] = parent
        for request in requests:
            self.engine_core.add_request(request)
        return parent

    def add_pooling_request(self, request_id: str, prompt: str | dict | list[int], params: PoolingParams,
                            arrival_time: float | None = None) -> _PoolingParent:
        """A prefill-only request whose prompt's hidden states are pooled into one vector (LLM.embed)."""
        if request_id in self.parents or request_id in self.pooling:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, token_ids = self.tokenize_prompt(prompt)
        self.validate_prompt(token_ids)
        if params.pooling_type is None:
            params = PoolingParams(pooling_type=self.pooling_type, normalize=params.normalize)
        arrival_time = time.time() if arrival_time is None else arrival_time
        parent = self.pooling[request_id] = _PoolingParent(request_id, text, token_ids, RequestMetrics(arrival_time))
        self.engine_core.add_request(EngineCoreRequest(request_id, token_ids, None, frozenset(), arrival_time,
                                                       pooling_params=params))
        return parent

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Abort requests (unknown or finished ids are ignored). Their final metrics come with a later step's
        outputs: take_aborted() hands those requests' last outputs over then."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        engine_ids = []
        for request_id in request_ids:
            pooling = self.pooling.pop(request_id, None)
            if pooling is not None:
                engine_ids.append(request_id)
                self._aborting[request_id] = (pooling, None)
                continue
            parent = self.parents.pop(request_id, None)
            if parent is None:
                continue
            for child in parent.children:
                self.children.pop(child.request_id, None)
                if child.finish_reason is None:
                    engine_ids.append(child.request_id)
                    self._aborting[child.request_id] = (parent, child)
        if engine_ids:
            self.engine_core.abort_requests(engine_ids)

    def take_aborted(self) -> list[RequestOutput | EmbeddingRequestOutput]:
        """The last outputs of aborted requests whose final metrics have arrived since the last call."""
        done, self._aborted_done = self._aborted_done, []
        return [parent.output(False) for parent in done]

    def is_aborting(self, request_id: str) -> bool:
        """Whether an aborted request still waits for its final metrics."""
        return any(parent.request_id == request_id for parent, _ in self._aborting.values())

    def _settle_aborted(self, aborted: dict[str, RequestMetrics]) -> None:
        for engine_id, metrics in aborted.items():
            entry = self._aborting.pop(engine_id, None)
            if entry is None:
                continue
            parent, child = entry
            if child is not None:
                child.metrics = metrics
            elif isinstance(parent, _PoolingParent):
                parent.metrics = metrics
            if not any(p is parent for p, _ in self._aborting.values()):
                self._aborted_done.append(parent)

    def has_unfinished_requests(self) -> bool:
        return bool(self.parents or self.pooling)

    # ---- output ---------------------------------------------------------------------------------------
    def step(self, final_only: bool = False) -> list[RequestOutput | EmbeddingRequestOutput]:
        """Run one engine step (in-process) or take the next step's outputs (multiprocess); returns the current
        output of every request that changed (finished ones last time they appear), or with final_only only
        those that finished (the offline API needs no more). A pooling request appears once, finished."""
        return self.process_outputs(self.engine_core.get_output(), final_only)

    def process_outputs(self, core_outputs: EngineCoreOutputs | None, final_only: bool = False
                        ) -> list[RequestOutput | EmbeddingRequestOutput]:
        """Apply one step's EngineCoreOutputs: detokenize, stop strings, fan-in of n > 1."""
        if core_outputs is None:
            return []
        if core_outputs.scheduler_stats is not None:
            self.scheduler_stats = core_outputs.scheduler_stats
        self.last_step_time = core_outputs.timestamp
        if core_outputs.aborted:
            self._settle_aborted(core_outputs.aborted)
        changed: dict[str, _Parent] = {}
        pooled: list[EmbeddingRequestOutput] = []
        metrics = core_outputs.metrics
        for out in core_outputs.outputs:
            entry = self.children.get(out.request_id)
            if entry is None:
                pooling = self.pooling.pop(out.request_id, None)
                if pooling is not None and out.pooled is not None:
                    if out.request_id in metrics:
                        pooling.metrics = metrics[out.request_id]
                    pooling.embedding = out.pooled.tolist()
                    pooled.append(pooling.output())
                continue
            parent, child = entry
            if child.finish_reason is not None:
                continue  # ended by a stop string here; the core's step was already under way
            if out.request_id in metrics:
                child.metrics = metrics[out.request_id]
            if out.request_id in core_outputs.cumulative_logprobs:
                child.cumulative_logprob = core_outputs.cumulative_logprobs[out.request_id]
            if out.error is not None:
                self._fail(parent, out.error)
                changed.pop(parent.request_id, None)
                continue
            self._apply(parent, child, out, core_outputs.timestamp)
            changed[parent.request_id] = parent
        results: list[RequestOutput | EmbeddingRequestOutput] = []
        for parent in changed.values():
            finished = parent.finished
            if finished or not final_only:
                results.append(parent.output(finished))
            if finished:
                del self.parents[parent.request_id]
                for child in parent.children:
                    self.children.pop(child.request_id, None)
        return results + pooled

    def _fail(self, parent: _Parent, error: BaseException) -> None:
        """A request failed inside the engine: its samples end, and take_errors() reports it."""
        self.errors[parent.request_id] = error
        self.abort_request(parent.request_id)

    def take_errors(self) -> dict[str, BaseException]:
        """The requests that failed inside the engine since the last call (request_id -> error); they produce
        no more output."""
        errors, self.errors = self.errors, {}
        return errors

    def _apply(self, parent: _Parent, child: _Child, out: EngineCoreOutput, timestamp: float) -> None:
        if out.new_prompt_logprobs and child.index == 0 and parent.prompt_logprobs is not None:
            self._decode_logprobs(out.new_prompt_logprobs)
            parent.prompt_logprobs.extend(out.new_prompt_logprobs)
        if out.new_logprobs and child.logprobs is not None:
            self._decode_logprobs(out.new_logprobs)
            child.logprobs.extend(out.new_logprobs)
        stop = None
        child.output_token_ids.extend(out.new_token_ids)
        for token_id in out.new_token_ids:
            stop = child.detokenizer.add_token(token_id)
        if out.finish_reason is not None:
            child.finish_reason, child.stop_reason = out.finish_reason, out.stop_reason
        elif stop is not None:
            # The stop string is found here, after detokenization: end the request in the core as well.
            child.finish_reason, child.stop_reason = "stop", stop
            child.metrics.finished_time = timestamp
            self.engine_core.abort_requests([child.request_id], RequestStatus.FINISHED_STOPPED)

    def _decode_logprobs(self, positions: list[PositionLogprobs]) -> None:
        for position in positions:
            for token_id, logprob in position.items():
                logprob.decoded_token = self.tokenizer.decode([token_id], skip_special_tokens=False)
