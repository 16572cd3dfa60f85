"""Rate limits per API key and per feature tag: requests per minute and tokens per minute (token buckets).

A bucket holds up to one minute's allowance and refills continuously. A request takes 1 from every request
bucket and (prompt tokens + max_tokens x n) from every token bucket that applies to it, or nothing at all when
any of them is short: then it gets 429 with Retry-After, the seconds until all of them could serve it. When the
request ends, the output tokens it did not generate are given back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus

from tokenmill.entrypoints.openai.errors import OpenAIError
from tokenmill.entrypoints.openai.server_config import ApiKey, RateLimit


class TokenBucket:
    def __init__(self, per_minute: int, now: float) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # per second
        self.level = self.capacity
        self.updated = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
        self.updated = now

    def seconds_until(self, amount: float) -> float:
        """Seconds until `amount` is available (after refill())."""
        return max(0.0, (amount - self.level) / self.rate)

    def take(self, amount: float) -> None:
        self.level -= amount

    def give_back(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level = min(self.capacity, self.level + amount)


@dataclass
class Reservation:
    """What one admitted request took from the token buckets."""

    num_tokens: int
    token_buckets: list[TokenBucket] = field(default_factory=list)
    settled: bool = False


class RateLimiter:
    def __init__(
        self,
        default_limit: RateLimit,
        feature_limits: dict[str, RateLimit],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default_limit = default_limit
        self.feature_limits = dict(feature_limits)
        self.clock = clock
        # (scope, name) -> (request bucket or None, token bucket or None); scope is "key" or "feature".
        self._buckets: dict[tuple[str, str], tuple[TokenBucket | None, TokenBucket | None]] = {}

    def _limits(self, key: ApiKey, feature: str | None) -> list[tuple[str, str, RateLimit]]:
        limits = [("API key", key.name, key.rate_limit or self.default_limit)]
        if feature is not None and feature in self.feature_limits:
            limits.append(("feature", feature, self.feature_limits[feature]))
        return [x for x in limits if not x[2].is_unlimited]

    def _bucket_pair(self, scope: str, name: str, limit: RateLimit, now: float):
        pair = self._buckets.get((scope, name))
        if pair is None:
            pair = (
                TokenBucket(limit.requests_per_minute, now) if limit.requests_per_minute else None,
                TokenBucket(limit.tokens_per_minute, now) if limit.tokens_per_minute else None,
            )
            self._buckets[(scope, name)] = pair
        return pair

    def acquire(self, key: ApiKey, feature: str | None, num_tokens: int) -> Reservation:
        """Admit a request costing num_tokens, or raise OpenAIError (429, or 400 if it can never fit)."""
        reservation = Reservation(num_tokens)
        limits = self._limits(key, feature)
        if not limits:
            return reservation
        now = self.clock()
        wait, blocker = 0.0, ""
        pairs = []
        for scope, name, limit in limits:
            if limit.tokens_per_minute is not None and num_tokens > limit.tokens_per_minute:
                raise OpenAIError(
                    f"this request needs {num_tokens} tokens (prompt + max_tokens x n) but the {scope} {name!r} "
                    f"is limited to {limit.tokens_per_minute} tokens per minute: lower max_tokens or shorten the "
                    "prompt", HTTPStatus.BAD_REQUEST, code="request_too_large", param="max_tokens",
                )
            requests, tokens = self._bucket_pair(scope, name, limit, now)
            pairs.append((requests, tokens))
            for bucket, amount, unit in ((requests, 1, "requests"), (tokens, num_tokens, "tokens")):
                if bucket is None:
                    continue
                bucket.refill(now)
                seconds = bucket.seconds_until(amount)
                if seconds > wait:
                    per_minute = int(bucket.capacity)
                    wait, blocker = seconds, f"the {scope} {name!r} is limited to {per_minute} {unit} per minute"
        if wait > 0:
            retry_after = max(1, math.ceil(wait))
            raise OpenAIError(
                f"Rate limit reached: {blocker}. Retry after {retry_after} s.", HTTPStatus.TOO_MANY_REQUESTS,
                code="rate_limit_exceeded", headers={"Retry-After": str(retry_after)},
            )
        for requests, tokens in pairs:
            if requests is not None:
                requests.take(1)
            if tokens is not None:
                tokens.take(num_tokens)
                reservation.token_buckets.append(tokens)
        return reservation

    def settle(self, reservation: Reservation, num_tokens_used: int) -> None:
        """Give back what the request reserved and did not use (call once, when it ends)."""
        if reservation.settled:
            return
        reservation.settled = True
        unused = reservation.num_tokens - num_tokens_used
        if unused > 0 and reservation.token_buckets:
            now = self.clock()
            for bucket in reservation.token_buckets:
                bucket.give_back(unused, now)
