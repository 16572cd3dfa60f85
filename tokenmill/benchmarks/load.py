"""Load shapes shared by the offline and the serving benchmark: arrival times and concurrency sweeps."""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(
    num_requests: int, request_rate: float = math.inf, burstiness: float = 1.0, seed: int = 0
) -> list[float]:
    """Seconds after the start at which each request is sent.

    request_rate inf sends everything at once. Otherwise the gaps are gamma-distributed with mean
    1/request_rate and shape `burstiness`: 1 is a Poisson process (exponential gaps), below 1 burstier, above
    1 more regular. The first request goes at 0; the gaps come from a RNG seeded with `seed`, so a run is
    reproducible.
    """
    if num_requests < 0:
        raise ValueError(f"num_requests must be >= 0, got {num_requests}")
    if not request_rate > 0:
        raise ValueError(f"request rate must be > 0 requests/s (or inf), got {request_rate}")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0 (1 = Poisson arrivals), got {burstiness}")
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=max(num_requests - 1, 0))
    return [0.0, *np.cumsum(gaps).tolist()][:num_requests]


def parse_concurrencies(text: str | None) -> list[int | None]:
    """'64' -> [64]; '1,4,16,64' -> a sweep; None or '' -> [None] (no limit)."""
    if text is None or not str(text).strip():
        return [None]
    values = []
    for part in str(text).split(","):
        try:
            value = int(part)
        except ValueError:
            raise ValueError(
                f"--max-concurrency {text!r}: give a count or a comma-separated list such as 1,8,64"
            ) from None
        if value < 1:
            raise ValueError(f"--max-concurrency values must be >= 1, got {value}")
        values.append(value)
    return values
