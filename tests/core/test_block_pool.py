"""Block pool and scheduler invariants under randomized workloads (no model: a fake runner samples)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.core.block_pool import BlockPool, hash_block
from tokenmill.core.kv_cache_manager import KVCacheManager
from tokenmill.core.scheduler import Scheduler
from tokenmill.outputs import ModelRunnerOutput, SampledToken
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import SamplingParams

EOS = 0


def fake_step(scheduler: Scheduler, rng: random.Random) -> None:
    sched = scheduler.schedule()
    assert sched.total_num_scheduled_tokens <= scheduler.max_num_batched_tokens
    assert len(scheduler.running) <= scheduler.max_num_seqs
    scheduler.on_launched(sched)
    sampled = {request_id: SampledToken(rng.randrange(0, 50)) for request_id in scheduler.sampling_request_ids()}
    scheduler.update_from_output(sched, ModelRunnerOutput(sampled), 0.01)


workload = st.fixed_dictionaries({
    "num_blocks": st.integers(12, 60),
    "block_size": st.sampled_from([1, 4, 16]),
    "budget": st.integers(8, 96),
    "max_seqs": st.integers(1, 12),
    "caching": st.booleans(),
    "seed": st.integers(0, 2**16),
    "num_requests": st.integers(1, 30),
})


@settings(max_examples=60, deadline=None)
@given(workload)
def test_invariants_hold_after_every_step(w):
    rng = random.Random(w["seed"])
    max_model_len = w["num_blocks"] * w["block_size"]
    kv = KVCacheManager(w["num_blocks"], w["block_size"], w["caching"])
    scheduler = Scheduler(kv, w["max_seqs"], w["budget"], max_model_len)
    prefixes = [[rng.randrange(1, 50) for _ in range(rng.randrange(1, 40))] for _ in range(3)]
    pending = []
    for i in range(w["num_requests"]):
        prompt = (rng.choice(prefixes) + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 30))])
        prompt = prompt[: max(1, max_model_len - 1)]
        params = SamplingParams(max_tokens=rng.randrange(1, 20), ignore_eos=rng.random() < 0.5)
        pending.append(Request(str(i), prompt, params, frozenset([EOS])))
    steps = 0
    while (pending or scheduler.has_unfinished_requests()) and steps < 2000:
        if pending and rng.random() < 0.5:
            scheduler.add_request(pending.pop(0))
        if scheduler.requests and rng.random() < 0.05:
            scheduler.finish_requests([rng.choice(list(scheduler.requests))], RequestStatus.FINISHED_ABORTED)
        fake_step(scheduler, rng)
        scheduler.check_integrity()
        steps += 1
    assert not pending and not scheduler.has_unfinished_requests(), "workload did not drain"
    # Every block is free once all requests finished or were aborted.
    assert kv.pool.num_free_blocks == kv.num_blocks
    assert kv.usage == 0.0
    kv.check_integrity()


def test_prefix_hit_shares_blocks_and_refcounts():
    kv = KVCacheManager(num_blocks=10, block_size=4, enable_caching=True)
    a = Request("a", list(range(1, 11)), SamplingParams())
    assert kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    b = Request("b", list(range(1, 9)) + [42, 43], SamplingParams())
    blocks, num_cached = kv.get_computed_blocks(b)
    assert num_cached == 8 and [x.block_id for x in blocks] == kv.block_ids("a")[:2]
    assert kv.allocate_slots(b, 2, blocks)
    assert [kv.pool.blocks[i].ref_cnt for i in kv.block_ids("b")[:2]] == [2, 2]
    kv.check_integrity()
    kv.free(a)
    kv.free(b)
    kv.check_integrity()
    assert kv.pool.num_free_blocks == 10
    # Freed blocks stay cached until evicted: a third request still hits.
    c = Request("c", list(range(1, 9)) + [7], SamplingParams())
    assert kv.get_computed_blocks(c)[1] == 8


def test_full_hit_still_computes_last_token():
    kv = KVCacheManager(num_blocks=4, block_size=4, enable_caching=True)
    a = Request("a", list(range(1, 9)), SamplingParams())
    kv.allocate_slots(a, 8)
    kv.free(a)
    b = Request("b", list(range(1, 9)), SamplingParams())
    assert kv.get_computed_blocks(b)[1] == 4  # 8 tokens cached, but the last must be computed for logits


def test_hash_collision_cannot_serve_wrong_tokens():
    pool = BlockPool(4)
    [block] = pool.allocate(1)
    h = hash_block(None, [1, 2, 3, 4])
    pool.cache_block(block, h, [1, 2, 3, 4])
    # Same hash presented with other tokens (a forced collision) is a miss.
    assert pool.get_cached_block(h, [9, 9, 9, 9]) is None
    assert pool.get_cached_block(h, [1, 2, 3, 4]) is block


def test_lru_eviction_prefers_oldest_freed():
    kv = KVCacheManager(num_blocks=4, block_size=2, enable_caching=True)
    old = Request("old", [1, 2, 3, 4, 5], SamplingParams())
    kv.allocate_slots(old, 5)
    kv.free(old)
    new = Request("new", [7, 8, 9], SamplingParams())
    kv.allocate_slots(new, 3)
    kv.free(new)
    # The uncached partial blocks go first, then the oldest cached ones; "new"'s prefix survives longest.
    third = Request("third", [11, 12, 13, 14, 15], SamplingParams())
    kv.allocate_slots(third, 5)
    assert kv.get_computed_blocks(Request("probe", [7, 8, 0], SamplingParams()))[1] == 2


def test_block_pool_rejects_double_free():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(RuntimeError):
        pool.free(blocks)
