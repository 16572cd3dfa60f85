"""Money: cost per million output tokens, spot vs on-demand, and break-even against an API.

    cost_per_1M_output = hourly_price * num_gpus / (output_tokens_per_s * 3600 * utilization) * 1e6

``utilization`` is the fraction of the time the deployment is busy at the throughput estimated for it; an
idle GPU still bills by the hour.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tokenmill.planner.gpus import GPUSpec

WORKLOADS = ("realtime", "batch")


def cost_per_million_tokens(price_per_hour: float, tokens_per_s: float, utilization: float = 1.0) -> float:
    """Dollars per 1M tokens for a deployment billed ``price_per_hour`` producing ``tokens_per_s`` while busy."""
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}: use e.g. 0.5 for half-busy")
    if tokens_per_s <= 0:
        raise ValueError(f"tokens_per_s must be positive, got {tokens_per_s}")
    return price_per_hour / (tokens_per_s * 3600 * utilization) * 1e6


@dataclass(frozen=True)
class BreakEven:
    """When self-hosting beats an API billed per token.

    The deployment costs ``gpu_cost_per_day`` whatever it serves; the API costs ``api_cost_per_request`` per
    request. Above ``requests_per_day`` requests a day self-hosting is cheaper; that volume keeps the
    deployment busy ``utilization`` of the time. ``self_hosting_wins`` is False when even a deployment busy
    around the clock cannot serve enough requests (utilization > 1).
    """

    api_price_input_per_1m: float
    api_price_output_per_1m: float
    api_cost_per_request: float
    gpu_cost_per_day: float
    capacity_requests_per_day: float
    requests_per_day: float
    utilization: float
    self_hosting_wins: bool

    def to_dict(self) -> dict:
        return asdict(self)


def break_even(
    gpu_cost_per_hour: float,
    requests_per_s_capacity: float,
    input_len: int,
    output_len: int,
    api_price_input_per_1m: float,
    api_price_output_per_1m: float | None = None,
) -> BreakEven:
    """Requests per day (and busy fraction) at which renting GPUs costs the same as the API.

    ``api_price_output_per_1m`` defaults to the input price (a single blended price).
    """
    out_price = api_price_input_per_1m if api_price_output_per_1m is None else api_price_output_per_1m
    if api_price_input_per_1m < 0 or out_price < 0:
        raise ValueError("API prices per 1M tokens must be >= 0")
    per_request = (input_len * api_price_input_per_1m + output_len * out_price) / 1e6
    per_day = gpu_cost_per_hour * 24
    capacity = requests_per_s_capacity * 86400
    if per_request <= 0:
        return BreakEven(
            api_price_input_per_1m, out_price, 0.0, per_day, capacity, float("inf"), float("inf"), False
        )
    needed = per_day / per_request
    util = needed / capacity if capacity > 0 else float("inf")
    return BreakEven(
        api_price_input_per_1m=api_price_input_per_1m,
        api_price_output_per_1m=out_price,
        api_cost_per_request=per_request,
        gpu_cost_per_day=per_day,
        capacity_requests_per_day=capacity,
        requests_per_day=needed,
        utilization=util,
        self_hosting_wins=util <= 1.0,
    )


@dataclass(frozen=True)
class CostEstimate:
    """Prices of ``num_gpus`` devices of one type, and what a million output tokens costs on them."""

    gpu: str
    num_gpus: int
    price_date: str | None
    utilization: float
    on_demand_per_hour: float | None  # all devices
    spot_per_hour: float | None
    on_demand_per_day: float | None
    spot_per_day: float | None
    cost_per_1m_output_on_demand: float | None
    cost_per_1m_output_spot: float | None
    recommended_pricing: str | None  # "spot" | "on-demand" | None (no prices)
    recommendation: str
    break_even: BreakEven | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["break_even"] = self.break_even.to_dict() if self.break_even else None
        return d


def recommend_pricing(workload: str, on_demand: float | None, spot: float | None) -> tuple[str | None, str]:
    """Spot for interruptible batch work, on-demand for latency-bound traffic."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    if on_demand is None and spot is None:
        return None, "no price in the catalog for this device: add one with --gpu-catalog"
    if spot is None:
        return "on-demand", "no spot price known: on-demand"
    if on_demand is None:
        return "spot", "only a spot price is known"
    saving = 1 - spot / on_demand if on_demand else 0.0
    if workload == "batch":
        return "spot", (
            f"batch work tolerates preemption: spot saves {saving:.0%}; checkpoint progress and resubmit "
            "interrupted requests"
        )
    return "on-demand", (
        f"real-time traffic needs capacity that is not reclaimed mid-request: on-demand "
        f"(spot would save {saving:.0%}, usable only for overflow replicas behind a load balancer)"
    )


def cost_estimate(
    gpu: GPUSpec,
    num_gpus: int,
    output_tokens_per_s: float,
    requests_per_s: float,
    input_len: int,
    output_len: int,
    utilization: float = 0.5,
    workload: str = "realtime",
    api_price_input_per_1m: float | None = None,
    api_price_output_per_1m: float | None = None,
) -> CostEstimate:
    """Costs of a deployment of ``num_gpus`` x ``gpu`` serving at the given throughput."""
    od = gpu.on_demand_per_hour * num_gpus if gpu.on_demand_per_hour is not None else None
    spot = gpu.spot_per_hour * num_gpus if gpu.spot_per_hour is not None else None
    choice, reason = recommend_pricing(workload, od, spot)

    def per_1m(price: float | None) -> float | None:
        if price is None or output_tokens_per_s <= 0:
            return None
        return cost_per_million_tokens(price, output_tokens_per_s, utilization)

    be = None
    chosen_price = spot if choice == "spot" else od
    if api_price_input_per_1m is not None and chosen_price is not None:
        be = break_even(
            chosen_price,
            requests_per_s,
            input_len,
            output_len,
            api_price_input_per_1m,
            api_price_output_per_1m,
        )
    return CostEstimate(
        gpu=gpu.name,
        num_gpus=num_gpus,
        price_date=gpu.price_date,
        utilization=utilization,
        on_demand_per_hour=od,
        spot_per_hour=spot,
        on_demand_per_day=od * 24 if od is not None else None,
        spot_per_day=spot * 24 if spot is not None else None,
        cost_per_1m_output_on_demand=per_1m(od),
        cost_per_1m_output_spot=per_1m(spot),
        recommended_pricing=choice,
        recommendation=reason,
        break_even=be,
    )
