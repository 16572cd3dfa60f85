"""What a request cost on a backend, from the backend's configured price and the response's usage block."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokenmill.router.config import Price


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    # tokenmill's usage extension (usage.gpu_seconds): engine seconds the request took; None if not reported.
    gpu_seconds: float | None = None

    @classmethod
    def from_block(cls, usage: dict[str, Any] | None) -> Usage:
        usage = usage if isinstance(usage, dict) else {}
        gpu = usage.get("gpu_seconds")
        return cls(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                   float(gpu) if isinstance(gpu, int | float) else None)


def cost_usd(price: Price, usage: Usage) -> float | None:
    """USD for one request; None for a gpu_hourly backend that did not report gpu_seconds."""
    if price.gpu_hourly is not None:
        if usage.gpu_seconds is None:
            return None
        return usage.gpu_seconds * price.gpu_hourly / 3600.0
    return (usage.input_tokens * price.input_per_1m + usage.output_tokens * price.output_per_1m) / 1e6
