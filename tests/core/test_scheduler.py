"""Scheduler decisions step by step, with hand-built runner outputs and no model: preemption order, the
token budget split between decodes and prefill chunks, no admission after a preemption, pending tokens
(async scheduling), and the prefix-cache counters."""

from __future__ import annotations

from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.scheduler import Scheduler
from tokenmill.outputs import ModelRunnerOutput, SampledToken, SchedulerOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams

EOS = 0


def make_scheduler(num_blocks: int, block_size: int = 4, budget: int = 100, max_num_seqs: int = 16,
                   caching: bool = False, max_model_len: int = 1000) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, block_size, caching), max_num_seqs, budget, max_model_len)


def make_request(request_id: str, prompt: list[int] | int, max_tokens: int = 50) -> Request:
    if isinstance(prompt, int):
        prompt = [1 + (i % 40) for i in range(prompt)]
    return Request(request_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), frozenset([EOS]))


def scheduled(sched: SchedulerOutput) -> dict[str, int]:
    """request_id -> tokens scheduled for it, in scheduling order."""
    return dict(sched.num_scheduled_tokens)


def collect(scheduler: Scheduler, sched: SchedulerOutput, token: int = 7) -> None:
    """The runner's part of a step: every sampling request gets `token`."""
    sampled = {request_id: SampledToken(token) for request_id in scheduler.sampling_request_ids()}
    scheduler.update_from_output(sched, ModelRunnerOutput(sampled), 0.01)


def step(scheduler: Scheduler, token: int = 7) -> SchedulerOutput:
    sched = scheduler.schedule()
    scheduler.on_launched(sched)
    collect(scheduler, sched, token)
    scheduler.check_integrity()
    return sched


def three_running(budget: int = 100) -> tuple[Scheduler, list[Request]]:
    """Five blocks of 4 tokens; r0 and r1 hold one block each, r2 two, one is free; each has sampled one token
    (so the next decode of r0 and r1 needs a new block)."""
    scheduler = make_scheduler(num_blocks=5, budget=budget)
    requests = [make_request("r0", 4), make_request("r1", 4), make_request("r2", 8)]
    for r in requests:
        scheduler.add_request(r)
    assert scheduled(step(scheduler)) == {"r0": 4, "r1": 4, "r2": 8}
    assert scheduler.kv.pool.num_free_blocks == 1
    return scheduler, requests


def test_preemption_takes_the_latest_arrival_first():
    scheduler, (r0, r1, r2) = three_running()
    sched = step(scheduler)
    # r0 takes the free block; r1 finds none, so the latest arrival (r2, not yet scheduled) is preempted.
    assert sched.preempted_ids == ["r2"]
    assert scheduled(sched) == {"r0": 1, "r1": 1}
    assert r2.status == RequestStatus.PREEMPTED and r2.num_computed_tokens == 0 and r2.num_preemptions == 1
    assert scheduler.waiting[0] is r2 and scheduler.running == [r0, r1]
    assert scheduler.num_preemptions == 1


def test_a_request_preempts_itself_when_it_is_the_latest():
    scheduler = make_scheduler(num_blocks=2)
    r0, r1 = make_request("r0", 4), make_request("r1", 4)
    scheduler.add_request(r0)
    scheduler.add_request(r1)
    step(scheduler)  # both prompts fill their only block
    sched = step(scheduler)
    # r0 cannot grow either: nothing is free, r1 is the latest arrival and is preempted; r0 then has room.
    assert sched.preempted_ids == ["r1"] and scheduled(sched) == {"r0": 1}
    r0.sampling_params.max_tokens = 100
    for _ in range(3):
        step(scheduler)  # r0 decodes into its second block
    # r0 alone needs a third block and none is free: with nobody later to preempt, it preempts itself.
    sched = step(scheduler)
    assert sched.preempted_ids == ["r0"] and sched.is_empty
    assert [r.request_id for r in scheduler.waiting] == ["r0", "r1"]  # the preempted go back to the front


def test_no_admission_in_a_step_that_preempted():
    scheduler, (r0, r1, r2) = three_running()
    # One token of budget is left after the two decodes: r2's first prefill chunk would fit in the block its
    # preemption freed, but a step that preempted admits nobody (it would thrash).
    scheduler.max_num_batched_tokens = 3
    sched = step(scheduler)
    assert sched.preempted_ids == ["r2"]
    assert scheduler.kv.pool.num_free_blocks == 1
    assert "r2" not in scheduled(sched) and r2 in scheduler.waiting
    # The next step (no preemption) readmits it, from scratch, with the budget left over.
    sched = step(scheduler)
    assert scheduled(sched) == {"r0": 1, "r1": 1, "r2": 1}
    assert r2.status == RequestStatus.RUNNING and r2.num_computed_tokens == 1


def test_budget_goes_to_decodes_first_then_prefill_chunks():
    scheduler = make_scheduler(num_blocks=64, budget=8)
    r0, r1 = make_request("r0", 3), make_request("r1", 3)
    scheduler.add_request(r0)
    scheduler.add_request(r1)
    assert scheduled(step(scheduler)) == {"r0": 3, "r1": 3}
    long = make_request("long", 20)
    late = make_request("late", 2)
    scheduler.add_request(long)
    scheduler.add_request(late)
    chunks = []
    while True:
        num_outputs = long.num_output_tokens
        sched = step(scheduler)
        # Only the chunk that completes the prompt samples.
        assert long.num_output_tokens == num_outputs + (long.num_computed_tokens == 20)
        # Every running decode is scheduled, one token each, before any prefill chunk.
        assert list(scheduled(sched))[:2] == ["r0", "r1"]
        assert scheduled(sched)["r0"] == scheduled(sched)["r1"] == 1
        assert sched.total_num_scheduled_tokens <= 8
        if long.num_output_tokens:
            break
        chunks.append(scheduled(sched)["long"])
        # "late" waits behind "long" (first come, first served) while the budget is used up.
        assert "late" not in scheduled(sched)
    chunks.append(scheduled(sched)["long"])
    assert chunks == [6, 6, 6, 2]
    assert scheduled(sched) == {"r0": 1, "r1": 1, "long": 2, "late": 2}  # the leftover budget admits "late"
    assert late.num_output_tokens == 1 and long.num_output_tokens == 1


def test_requests_beyond_the_budget_stay_running_unscheduled():
    scheduler = make_scheduler(num_blocks=64, budget=8)
    requests = [make_request(f"r{i}", 2) for i in range(4)]
    for r in requests:
        scheduler.add_request(r)
    step(scheduler)
    scheduler.max_num_batched_tokens = 3
    sched = step(scheduler)
    assert scheduled(sched) == {"r0": 1, "r1": 1, "r2": 1}
    assert scheduler.running == requests and not sched.preempted_ids
    # Arrival order holds: the request left out is not moved ahead of the others.
    assert scheduled(step(scheduler)) == {"r0": 1, "r1": 1, "r2": 1}


def test_max_num_seqs_caps_the_batch():
    scheduler = make_scheduler(num_blocks=64, max_num_seqs=2)
    for i in range(3):
        scheduler.add_request(make_request(f"r{i}", 2))
    assert scheduled(step(scheduler)) == {"r0": 2, "r1": 2}
    assert scheduler.num_waiting == 1


def test_pending_tokens_with_async_scheduling():
    """Step N+1 is scheduled before step N's tokens are collected: each decode's input is its pending token."""
    scheduler = make_scheduler(num_blocks=64)
    a = make_request("a", 5, max_tokens=3)
    b = make_request("b", 5, max_tokens=1)
    scheduler.add_request(a)
    scheduler.add_request(b)
    first = scheduler.schedule()
    scheduler.on_launched(first)
    assert a.num_pending_tokens == b.num_pending_tokens == 1 and a.num_computed_tokens == 5
    second = scheduler.schedule()
    # a decodes its pending token; b ends on max_tokens=1 with that token, so nothing is computed for it.
    assert scheduled(second) == {"a": 1}
    assert b in scheduler.running
    scheduler.on_launched(second)
    assert a.num_pending_tokens == 2 and a.num_computed_tokens == 6
    collect(scheduler, first, token=11)
    assert a.output_token_ids == [11] and a.num_pending_tokens == 1
    assert b.status == RequestStatus.FINISHED_LENGTH and b.output_token_ids == [11]
    assert b not in scheduler.running and "b" not in scheduler.kv.req_to_blocks
    third = scheduler.schedule()
    scheduler.on_launched(third)
    assert scheduled(third) == {"a": 1}
    collect(scheduler, second, token=12)
    # a now has 2 outputs and a third pending: max_tokens=3 is reached, so it is not scheduled again.
    assert scheduler.schedule().is_empty
    collect(scheduler, third, token=13)
    assert a.output_token_ids == [11, 12, 13] and a.status == RequestStatus.FINISHED_LENGTH
    assert not scheduler.has_unfinished_requests()
    scheduler.check_integrity()


def test_preempted_with_a_pending_token_waits_for_it():
    """A request preempted while its last step is in flight is not readmitted before that token is known."""
    scheduler, (r0, r1, r2) = three_running()
    sched = scheduler.schedule()  # preempts r2 (see test_preemption_takes_the_latest_arrival_first)
    scheduler.on_launched(sched)
    r0.sampling_params.max_tokens = r1.sampling_params.max_tokens = 1  # both stop with the step in flight
    collect(scheduler, sched)
    assert sched.preempted_ids == ["r2"]
    # Hand-build the in-flight case: r2 has a token on the way.
    r2.num_pending_tokens = 1
    assert scheduler.schedule().is_empty and r2 in scheduler.waiting
    r2.num_pending_tokens = 0
    assert scheduled(scheduler.schedule()) == {"r2": 9}


def test_prefix_cache_counters_count_once_on_admission():
    """A request waiting for blocks looks the cache up every step; the query and hit counters count it once,
    when it is admitted."""
    scheduler = make_scheduler(num_blocks=4, caching=True)
    kv = scheduler.kv
    holder = make_request("holder", list(range(1, 13)), max_tokens=4)  # 3 blocks, a 4th once it decodes
    scheduler.add_request(holder)
    step(scheduler)
    assert (kv.num_queried_tokens, kv.num_hit_tokens) == (12, 0)
    # Shares holder's first two blocks, needs two more: none is free while holder runs.
    waiter = make_request("waiter", list(range(1, 9)) + [40] * 8)
    scheduler.add_request(waiter)
    for _ in range(3):  # the last of these samples holder's 4th token: it finishes, its blocks stay cached
        sched = step(scheduler)
        assert "waiter" not in scheduled(sched)
        assert (kv.num_queried_tokens, kv.num_hit_tokens) == (12, 0)
    assert holder.is_finished
    sched = step(scheduler)
    assert scheduled(sched) == {"waiter": 8}  # the first 8 tokens came from the cache
    assert (kv.num_queried_tokens, kv.num_hit_tokens) == (12 + 16, 8)
    for _ in range(3):
        step(scheduler)
    assert (kv.num_queried_tokens, kv.num_hit_tokens) == (28, 8)


def test_make_stats_reports_queues_usage_prefix_counters_and_preemptions():
    scheduler, (r0, r1, r2) = three_running()
    stats = scheduler.make_stats()
    assert (stats.num_running, stats.num_waiting, stats.num_preemptions) == (3, 0, 0)
    assert stats.kv_cache_usage == 4 / 5 and (stats.num_kv_blocks, stats.block_size) == (5, 4)
    step(scheduler)  # preempts r2
    stats = scheduler.make_stats()
    assert (stats.num_running, stats.num_waiting, stats.num_preemptions) == (2, 1, 1)
    assert stats.kv_cache_usage == 4 / 5  # r2's two blocks went to r0 and r1
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (0, 0)  # caching is off here


def test_scheduler_output_sends_a_request_once_then_diffs():
    """NewRequestData when first scheduled and after a preemption (with the output so far); after that only
    new block ids and num_computed_tokens; finished and preempted ids reach the runner."""
    scheduler, (r0, r1, r2) = three_running()
    sched = scheduler.schedule()  # r0 takes the last free block, r1 none: r2 is preempted
    assert sched.preempted_ids == ["r2"] and not sched.new_requests
    cached = sched.cached_requests
    assert cached.request_ids == ["r0", "r1"] and cached.num_computed_tokens == [4, 4]
    r1_blocks = scheduler.kv.block_ids("r1")
    assert cached.new_block_ids == [scheduler.kv.block_ids("r0")[1:], r1_blocks[1:]]
    scheduler.on_launched(sched)
    collect(scheduler, sched)
    r0.sampling_params.max_tokens = r1.sampling_params.max_tokens = 3
    while r2.status != RequestStatus.RUNNING:
        sched = step(scheduler)
    [new] = sched.new_requests
    assert (new.request_id, new.output_token_ids, new.num_computed_tokens) == ("r2", [7], 0)
    assert new.block_ids == scheduler.kv.block_ids("r2") and new.prompt_token_ids == r2.prompt_token_ids
    assert sorted(sched.finished_request_ids) == ["r0", "r1"]
    assert scheduler.schedule().finished_request_ids == []
