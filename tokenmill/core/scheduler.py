"""Continuous batching: which requests compute how many tokens in the next engine step.

One token budget per step is shared by decodes (1 token each) and prefill chunks. Running requests go first,
in arrival order; waiting requests join while budget, max_num_seqs and KV blocks allow (first come, first
served). When a running request needs a block and none is free, the most recently arrived running request
is preempted: its blocks are freed and it is recomputed later (its cached prefix usually survives).

What a step hands the runner is plain data (SchedulerOutput, tokenmill/outputs.py): a request's prompt,
sampling params and block table once (NewRequestData: when first scheduled, and again when resumed after a
preemption), then only diffs (new block ids, num_computed_tokens), plus the ids of requests finished or
preempted since the previous step. The scheduler remembers which blocks the runner has been sent.

A step's requests advance when it is launched (`on_launched`: its tokens count as computed, and a sampling
request gets a pending token) and take their sampled tokens when it is collected (`update_from_output`:
append, stops, finished requests). Launched steps are collected in launch order. Synchronous steps collect at once; with async scheduling the next step is
scheduled first, and a pending token is that step's input, read on the device. A request certain to stop
on length with its pending token is not scheduled again; one stopping on EOS or a stop string computes one
more token, which is dropped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.metrics.stats import SchedulerStats
from tokenmill.outputs import EngineCoreOutput, ModelRunnerOutput, NewRequestData, SchedulerOutput
from tokenmill.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    """The scheduler's own record of one request in a step (never handed to the runner)."""

    request: Request
    # Tokens computed for this request in this step (a prefill chunk, or 1 for a decode).
    num_new_tokens: int
    # Whether this step finishes the request's known tokens, so a next token is sampled.
    samples: bool


class Scheduler:
    def __init__(
        self,
        kv_cache_manager: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ) -> None:
        self.kv = kv_cache_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        # request_id -> Request, for every unfinished request.
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        # request_id -> how many of its block ids the runner holds (sent in NewRequestData or diffs); absent
        # while the runner holds no state for it (not yet scheduled, or preempted).
        self._num_sent_blocks: dict[str, int] = {}
        # Requests the runner has seen (scheduled at least once): their end is reported to it.
        self._runner_ids: set[str] = set()
        # Requests finished since the last schedule(): the next SchedulerOutput tells the runner.
        self._finished_ids: list[str] = []
        # The records of the last schedule() (until on_launched), and of launched steps not yet collected.
        self._unlaunched: tuple[SchedulerOutput, list[ScheduledRequest]] | None = None
        self._launched: deque[list[ScheduledRequest]] = deque()

    # ---- queue management -------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish unfinished requests (abort or a stop found outside the scheduler) and free their blocks."""
        finished = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)
            finished.append(request)
        return finished

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        request.metrics.finished_time = time.time()
        self.kv.free(request)
        self._num_sent_blocks.pop(request.request_id, None)
        if request.request_id in self._runner_ids:
            self._runner_ids.discard(request.request_id)
            self._finished_ids.append(request.request_id)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def make_stats(self) -> SchedulerStats:
        """The scheduler's part of the engine's stats (the counters are cumulative since start)."""
        kv = self.kv
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.num_queried_tokens,
            prefix_cache_hits=kv.num_hit_tokens,
            num_preemptions=self.num_preemptions,
            num_kv_blocks=kv.num_blocks,
            block_size=kv.block_size,
        )

    # ---- scheduling -------------------------------------------------------------------------------------
    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        # The runner drops its state; the request comes back as NewRequestData (its logits processors, a
        # grammar matcher among them, replay the output so far).
        self._num_sent_blocks.pop(request.request_id, None)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._finished_ids)
        self._finished_ids = []
        scheduled: list[ScheduledRequest] = []
        budget = self.max_num_batched_tokens
        now = time.time()

        kept: list[Request] = []
        queue = deque(self.running)
        while queue and budget > 0:
            request = queue.popleft()
            if request.num_pending_tokens and self._stops_on_length(request):
                kept.append(request)  # its last token is on the way: nothing left to compute
                continue
            num_new = min(request.num_tokens + request.num_pending_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, num_new):
                # Out of blocks: preempt the latest arrival still unscheduled, else this request itself.
                victim = queue.pop() if queue else request
                self._preempt(victim)
                out.preempted_ids.append(victim.request_id)
                if victim is request:
                    break
            else:
                kept.append(request)
                self._add_scheduled(out, scheduled, request, num_new)
                budget -= num_new
        # Requests left unscheduled for lack of budget stay running.
        self.running = kept + list(queue)

        # Admit waiting requests only when nothing had to be preempted this step.
        # A request that is not schedulable yet (its grammar compiles) is passed over; the rest keep their order.
        candidates = (r for r in list(self.waiting) if r.is_schedulable)
        for request in candidates:
            if budget <= 0 or len(self.running) >= self.max_num_seqs or out.preempted_ids:
                break
            if request.num_pending_tokens:
                break  # preempted while its last step ran: admitted once that step's token is known
            computed_blocks, num_cached = self.kv.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(request, num_new, computed_blocks):
                break
            self.waiting.remove(request)
            self.kv.record_admission(request, num_cached)
            request.num_computed_tokens = num_cached
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
                request.metrics.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_scheduled(out, scheduled, request, num_new)
            budget -= num_new
        self._unlaunched = (out, scheduled)
        return out

    def _add_scheduled(self, out: SchedulerOutput, scheduled: list[ScheduledRequest], request: Request,
                       num_new: int) -> None:
        samples = request.num_computed_tokens + num_new == request.num_tokens + request.num_pending_tokens
        scheduled.append(ScheduledRequest(request, num_new, samples))
        request_id = request.request_id
        block_ids = self.kv.req_to_blocks[request_id]
        num_sent = self._num_sent_blocks.get(request_id)
        if num_sent is None:
            self._runner_ids.add(request_id)
            pooler = request.pooler
            out.new_requests.append(NewRequestData(
                request_id, request.prompt_token_ids, list(request.output_token_ids), request.sampling_params,
                sorted(request.eos_token_ids), list(block_ids), request.num_computed_tokens,
                request.num_preemptions, pooler.pooling_type if pooler is not None else None,
                len(request.prompt_logprobs) - 1 if request.prompt_logprobs is not None else 0,
            ))
        else:
            cached = out.cached_requests
            cached.request_ids.append(request_id)
            cached.new_block_ids.append(block_ids[num_sent:])
            cached.num_computed_tokens.append(request.num_computed_tokens)
        self._num_sent_blocks[request_id] = len(block_ids)
        out.num_scheduled_tokens[request_id] = num_new
        out.total_num_scheduled_tokens += num_new

    def _stops_on_length(self, request: Request) -> bool:
        """Whether the request ends on max_tokens or max_model_len once its pending tokens are appended."""
        max_tokens = request.sampling_params.max_tokens
        pending = request.num_pending_tokens
        return (max_tokens is not None and request.num_output_tokens + pending >= max_tokens) or (
            request.num_tokens + pending >= self.max_model_len
        )

    # ---- after the model ran ----------------------------------------------------------------------------
    def on_launched(self, sched: SchedulerOutput) -> bool:
        """The step (the last one schedule() returned) runs: count its tokens as computed and its samples as
        pending. Returns whether a request it samples needs that token on the host before its next step
        (its logits processors read output tokens: the engine collects before scheduling again)."""
        if self._unlaunched is None or self._unlaunched[0] is not sched:
            raise RuntimeError("on_launched() takes the SchedulerOutput of the last schedule()")
        scheduled = self._unlaunched[1]
        self._unlaunched = None
        self._launched.append(scheduled)
        needs_sync = False
        for item in scheduled:
            request = item.request
            request.num_computed_tokens += item.num_new_tokens
            if item.samples:
                request.num_pending_tokens += 1
                needs_sync = needs_sync or request.needs_output_tokens
        return needs_sync

    def sampling_request_ids(self) -> list[str]:
        """The requests that the oldest launched, uncollected step samples (whose tokens its runner output
        carries): a check for runners, and how tests build runner outputs by hand."""
        if not self._launched:
            raise RuntimeError("no launched step is waiting to be collected")
        return [item.request.request_id for item in self._launched[0] if item.samples]

    def update_from_output(
        self, sched: SchedulerOutput, runner_out: ModelRunnerOutput, step_seconds: float
    ) -> list[EngineCoreOutput]:
        """Apply the sampled tokens of a step passed to on_launched (the oldest not yet collected): stops,
        finished requests, outputs."""
        outputs = []
        now = time.time()
        total_tokens = max(sched.total_num_scheduled_tokens, 1)
        for item in self._launched.popleft():
            request = item.request
            if item.samples:
                request.num_pending_tokens -= 1
            request.metrics.compute_seconds += step_seconds * item.num_new_tokens / total_tokens
            if request.is_finished:
                continue
            if request.pooler is not None:
                pooled = self._update_pooling(request, runner_out, now)
                if pooled is not None:
                    outputs.append(pooled)
                continue
            new_prompt_logprobs = runner_out.prompt_logprobs.get(request.request_id)
            if new_prompt_logprobs and request.prompt_logprobs is not None:
                request.prompt_logprobs.extend(new_prompt_logprobs)
            sampled = runner_out.sampled.get(request.request_id) if item.samples else None
            if sampled is None:
                if new_prompt_logprobs:
                    outputs.append(EngineCoreOutput(request.request_id, [], None, new_prompt_logprobs, None, None))
                continue
            request.append_output_token(sampled.token_id)
            if request.cumulative_logprob is not None and sampled.logprob is not None:
                request.cumulative_logprob += sampled.logprob
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
            request.metrics.last_token_time = now
            status = self._processor_status(request, runner_out) or self._check_stop(request)
            if status is not None:
                self.requests.pop(request.request_id, None)
                if request.status == RequestStatus.RUNNING:
                    self.running.remove(request)
                else:  # preempted while its step was in flight (async scheduling)
                    self.waiting.remove(request)
                self._finish(request, status)
            outputs.append(
                EngineCoreOutput(
                    request.request_id,
                    [sampled.token_id],
                    [sampled.logprobs] if sampled.logprobs is not None else None,
                    new_prompt_logprobs,
                    status.finish_reason if status is not None else None,
                    request.stop_reason,
                    error=request.error,
                )
            )
        return outputs

    def _update_pooling(self, request: Request, runner_out: ModelRunnerOutput, now: float
                        ) -> EngineCoreOutput | None:
        """Fold a pooling request's chunk in; once its whole prompt is pooled it finishes with the vector."""
        pooler = request.pooler
        assert pooler is not None
        chunk = runner_out.pooled.get(request.request_id)
        if chunk is not None:
            pooler.add(chunk)
        if not pooler.done:
            return None
        self.requests.pop(request.request_id, None)
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:  # preempted while its last chunk was in flight (async scheduling)
            self.waiting.remove(request)
        request.metrics.first_token_time = request.metrics.last_token_time = now
        self._finish(request, RequestStatus.FINISHED_STOPPED)
        return EngineCoreOutput(request.request_id, [], None, None, RequestStatus.FINISHED_STOPPED.finish_reason,
                                None, pooled=pooler.result())

    @staticmethod
    def _processor_status(request: Request, runner_out: ModelRunnerOutput) -> RequestStatus | None:
        """A logits processor ended the sequence with its token: "stop" when it terminated (a grammar complete
        and its end accepted); an abort with an error when it refused the token (the mask makes that a bug,
        not user input)."""
        if request.request_id not in runner_out.processor_finished:
            return None
        error = runner_out.processor_finished[request.request_id]
        if error is not None:
            request.error = RuntimeError(error)
            return RequestStatus.FINISHED_ABORTED
        return RequestStatus.FINISHED_STOPPED

    def _check_stop(self, request: Request) -> RequestStatus | None:
        params = request.sampling_params
        last = request.output_token_ids[-1]
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if params.stop_token_ids and last in params.stop_token_ids:
                request.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def check_integrity(self) -> None:
        self.kv.check_integrity()
        held = set(self.kv.req_to_blocks)
        running = {r.request_id for r in self.running}
        if not held <= running:
            raise AssertionError(f"requests {sorted(held - running)} hold blocks but are not running")
