"""Continuous batching: which requests compute how many tokens in the next engine step.

One token budget per step is shared by decodes (1 token each) and prefill chunks. Running requests go first,
in arrival order; waiting requests join while budget, max_num_seqs and KV blocks allow (first come, first
served). When a running request needs a block and none is free, the most recently arrived running request
is preempted: its blocks are freed and it is recomputed later (its cached prefix usually survives).

A step's requests advance when it is launched (`on_launched`: its tokens count as computed, and a sampling
request gets a pending token) and take their sampled tokens when it is collected (`update_from_output`:
append, stops, finished requests). Synchronous steps collect at once; with async scheduling the next step is
scheduled first, and a pending token is that step's input, read on the device. A request certain to stop
on length with its pending token is not scheduled again; one stopping on EOS or a stop string computes one
more token, which is dropped.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.outputs import EngineCoreOutput, ModelRunnerOutput, ScheduledRequest, SchedulerOutput
from tokenmill.request import Request, RequestStatus


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

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- scheduling -------------------------------------------------------------------------------------
    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        if request.structured_output is not None:
            # Recompute restarts the sequence: its matcher restarts too and replays the output so far.
            request.structured_output.replay(request.output_token_ids)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
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
                self._add_scheduled(out, request, num_new)
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
            self._add_scheduled(out, request, num_new)
            budget -= num_new
        return out

    def _add_scheduled(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        samples = request.num_computed_tokens + num_new == request.num_tokens + request.num_pending_tokens
        out.scheduled.append(ScheduledRequest(request, num_new, samples))
        out.num_scheduled_tokens += num_new

    def _stops_on_length(self, request: Request) -> bool:
        """Whether the request ends on max_tokens or max_model_len once its pending tokens are appended."""
        max_tokens = request.sampling_params.max_tokens
        pending = request.num_pending_tokens
        return (max_tokens is not None and request.num_output_tokens + pending >= max_tokens) or (
            request.num_tokens + pending >= self.max_model_len
        )

    # ---- after the model ran ----------------------------------------------------------------------------
    def on_launched(self, sched: SchedulerOutput) -> None:
        """The step runs: count its tokens as computed and its samples as pending."""
        for item in sched.scheduled:
            request = item.request
            request.num_computed_tokens += item.num_new_tokens
            if item.samples:
                request.num_pending_tokens += 1

    def update_from_output(
        self, sched: SchedulerOutput, runner_out: ModelRunnerOutput, step_seconds: float
    ) -> list[EngineCoreOutput]:
        """Apply the sampled tokens of a step passed to on_launched: stops, finished requests, outputs."""
        outputs = []
        now = time.time()
        total_tokens = max(sched.num_scheduled_tokens, 1)
        for item in sched.scheduled:
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
            status = self._advance_grammar(request, sampled.token_id) or self._check_stop(request)
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
    def _advance_grammar(request: Request, token_id: int) -> RequestStatus | None:
        """The grammar matcher accepts the sampled token: "stop" once the grammar is complete and has accepted
        its end; an abort with an error if the token is refused (the mask makes that a bug, not user input)."""
        state = request.structured_output
        if state is None or state.matcher is None:
            return None
        if not state.matcher.accept_token(token_id):
            request.error = RuntimeError(
                f"the grammar matcher refused sampled token {token_id} of request {request.request_id!r}"
            )
            return RequestStatus.FINISHED_ABORTED
        if state.matcher.is_terminated():
            return RequestStatus.FINISHED_STOPPED
        return None

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
