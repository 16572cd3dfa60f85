"""Balancing policies on plain objects (no processes)."""

from __future__ import annotations

from tokenmill.router.balancing import (
    LeastOutstanding,
    Pool,
    PrefixAffinity,
    Replica,
    RoundRobin,
    prefix_block_hashes,
    render_prompt,
)
from tokenmill.router.config import BackendConfig, BalancingConfig


def _pool(n: int = 2) -> Pool:
    backend = BackendConfig("b", tuple(f"http://127.0.0.1:{8000 + i}/v1" for i in range(n)), "m")
    return Pool(backend, [Replica("b", url) for url in backend.urls])


def _chat(*contents: str) -> dict:
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": c}
                         for i, c in enumerate(contents)]}


def test_prefix_hashes_chain_over_the_whole_prefix():
    a = prefix_block_hashes("x" * 100 + "y" * 100, 50)
    b = prefix_block_hashes("x" * 100 + "z" * 100, 50)
    assert len(a) == 4 and a[:2] == b[:2] and a[2:] != b[2:]
    # A block's hash depends on everything before it, not only on its own text.
    assert prefix_block_hashes("a" * 50 + "x" * 50, 50)[1] != prefix_block_hashes("b" * 50 + "x" * 50, 50)[1]
    # Every message counts: conversations that differ only in a later message share only the leading blocks.
    first = render_prompt(_chat("s" * 300, "answer one", "q" * 300))
    second = render_prompt(_chat("s" * 300, "answer two", "q" * 300))
    assert first != second
    assert prefix_block_hashes(first, 64)[0] == prefix_block_hashes(second, 64)[0]
    assert prefix_block_hashes(first, 64)[-1] != prefix_block_hashes(second, 64)[-1]


def test_prefix_affinity_sticks_to_the_replica_of_the_prefix():
    pool = _pool(2)
    policy = PrefixAffinity(BalancingConfig(block_chars=16, load_threshold=2))
    docs = [f"document {i} " * 20 for i in range(6)]
    owners = {}
    for doc in docs:
        owners[doc] = policy.choose(pool, pool.replicas, {"prompt": doc + "question A"})
    # New prefixes spread over the idle pool.
    assert len(set(owners.values())) == 2
    for doc in docs:
        assert policy.choose(pool, pool.replicas, {"prompt": doc + "question B"}) is owners[doc]
    # A longer conversation over the same prefix stays too.
    chat = _chat("shared system prompt " * 10, "hi")
    owner = policy.choose(pool, pool.replicas, chat)
    longer = _chat("shared system prompt " * 10, "hi", "answer", "follow-up")
    assert policy.choose(pool, pool.replicas, longer) is owner


def test_prefix_affinity_is_bounded_by_load():
    pool = _pool(2)
    policy = PrefixAffinity(BalancingConfig(block_chars=16, load_threshold=2))
    body = {"prompt": "a long shared prefix " * 10}
    owner = policy.choose(pool, pool.replicas, body)
    other = next(r for r in pool.replicas if r is not owner)
    owner.num_outstanding = 2
    assert policy.choose(pool, pool.replicas, body) is owner  # 2 more than the least loaded: still within
    owner.num_outstanding = 3
    assert policy.choose(pool, pool.replicas, body) is other  # over the threshold: the least loaded
    # An unhealthy (excluded) owner is never chosen.
    owner.num_outstanding = 0
    assert policy.choose(pool, [r for r in pool.replicas if r is not other], body) is owner


def test_round_robin_and_least_outstanding():
    pool = _pool(3)
    rr = RoundRobin()
    assert [rr.choose(pool, pool.replicas, {}) for _ in range(6)] == pool.replicas * 2
    assert rr.choose(pool, pool.replicas[1:], {}) in pool.replicas[1:]
    lo = LeastOutstanding()
    pool.replicas[0].num_outstanding = 3
    pool.replicas[1].num_outstanding = 1
    pool.replicas[2].num_outstanding = 2
    assert lo.choose(pool, pool.replicas, {}) is pool.replicas[1]
