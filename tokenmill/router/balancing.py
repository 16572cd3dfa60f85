"""Replica pools and the policies choosing a replica for each request.

Prefix affinity (the default) sends requests whose rendered prompts share leading blocks to the replica that
served that prefix, so the replica's prefix cache holds it; it gives way to the least loaded replica when the
preferred one has more than `load_threshold` more requests outstanding. The prompt is rendered whole (every
message of the conversation, in order), cut into blocks of `block_chars` characters, and each block's hash
chains the hashes before it, so a block hash names the whole prefix up to it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tokenmill.router.config import BackendConfig, BalancingConfig


@dataclass(eq=False)
class Replica:
    backend: str
    # The OpenAI base URL (ends in /v1).
    url: str
    healthy: bool = True
    # Requests sent and not yet finished.
    num_outstanding: int = 0
    num_requests: int = 0
    # Consecutive probe results (for re-admission / ejection).
    num_probe_passes: int = 0
    num_probe_failures: int = 0
    # Without active probes: monotonic time an ejected replica comes back.
    ejected_until: float = 0.0
    # Why the replica was last ejected (for /health and the log).
    last_error: str | None = None

    @property
    def root_url(self) -> str:
        return self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url


@dataclass(eq=False)
class Pool:
    """The replicas of one backend."""

    config: BackendConfig
    replicas: list[Replica] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.config.name

    def healthy(self, exclude: Sequence[Replica] = ()) -> list[Replica]:
        return [r for r in self.replicas if r.healthy and r not in exclude]


def render_prompt(body: dict[str, Any]) -> str:
    """The text whose leading blocks identify a request's cacheable prefix: the whole conversation (or prompt)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        parts = []
        for message in messages:
            if not isinstance(message, dict):
                parts.append(json.dumps(message, sort_keys=True))
                continue
            content = message.get("content")
            if not isinstance(content, str):
                content = json.dumps(content, sort_keys=True)
            # Role and content, separated so that "ab"+"c" and "a"+"bc" differ.
            parts.append(f"\x1e{message.get('role', '')}\x1f{content}")
        return "".join(parts)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    return json.dumps(prompt)


def prefix_block_hashes(text: str, block_chars: int) -> list[bytes]:
    """One hash per full block; hash i covers text[: (i + 1) x block_chars]."""
    hashes = []
    h = b""
    data = text.encode("utf-8", "surrogatepass")
    for start in range(0, len(data) - block_chars + 1, block_chars):
        h = hashlib.blake2b(h + data[start:start + block_chars], digest_size=12).digest()
        hashes.append(h)
    return hashes


class BalancingPolicy:
    """Chooses a replica among the candidates (healthy, not yet tried; never empty)."""

    def choose(self, pool: Pool, candidates: list[Replica], body: dict[str, Any]) -> Replica:
        raise NotImplementedError


class RoundRobin(BalancingPolicy):
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, pool: Pool, candidates: list[Replica], body: dict[str, Any]) -> Replica:
        # Index over the whole pool so that the rotation does not depend on which replicas are healthy.
        start = next(self._counter) % len(pool.replicas)
        for i in range(len(pool.replicas)):
            replica = pool.replicas[(start + i) % len(pool.replicas)]
            if replica in candidates:
                return replica
        return candidates[0]


class LeastOutstanding(BalancingPolicy):
    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, pool: Pool, candidates: list[Replica], body: dict[str, Any]) -> Replica:
        least = min(r.num_outstanding for r in candidates)
        tied = [r for r in candidates if r.num_outstanding == least]
        # Ties rotate, so an idle pool still spreads its requests.
        return tied[next(self._counter) % len(tied)]


class PrefixAffinity(BalancingPolicy):
    def __init__(self, config: BalancingConfig) -> None:
        self.block_chars = config.block_chars
        self.load_threshold = config.load_threshold
        self.table_size = config.table_size
        # block hash -> replica that last served a prompt with that prefix (least recently used first).
        self._owners: OrderedDict[bytes, Replica] = OrderedDict()
        self._least = LeastOutstanding()
        self.num_affinity_hits = 0

    def choose(self, pool: Pool, candidates: list[Replica], body: dict[str, Any]) -> Replica:
        hashes = prefix_block_hashes(render_prompt(body), self.block_chars)
        owner = None
        # The owner of the longest known prefix; blocks chain, so a miss ends the known prefix.
        for h in hashes:
            known = self._owners.get(h)
            if known is None:
                break
            if known in candidates:
                owner = known
        least = min(r.num_outstanding for r in candidates)
        if owner is not None and owner.num_outstanding - least <= self.load_threshold:
            chosen = owner
            self.num_affinity_hits += 1
        else:
            chosen = self._least.choose(pool, candidates, body)
        for h in hashes:
            self._owners[h] = chosen
            self._owners.move_to_end(h)
        while len(self._owners) > self.table_size:
            self._owners.popitem(last=False)
        return chosen


def make_policy(config: BalancingConfig) -> BalancingPolicy:
    if config.policy == "prefix":
        return PrefixAffinity(config)
    if config.policy == "least_outstanding":
        return LeastOutstanding()
    return RoundRobin()
