"""Fit, concurrency, context, tensor-parallel choice, cost and the whole plan."""

import math

import pytest

from tokenmill.planner import (
    ServingConfig,
    Workload,
    break_even,
    cost_per_million_tokens,
    get_gpu,
    kv_cache_bytes_per_sequence,
    load_arch,
    max_concurrency,
    max_model_len,
    memory_breakdown,
    min_tensor_parallel_size,
    plan,
    recommend_pricing,
)

GiB = 1024**3
LLAMA8B = load_arch("Llama-3.1-8B")


def test_max_concurrency_is_tight():
    h100, cfg = get_gpu("H100"), ServingConfig(precision="bf16")
    n = max_concurrency(LLAMA8B, h100, 8192, cfg)
    assert n > 0
    assert memory_breakdown(LLAMA8B, h100, 8192, n, cfg).fits
    assert not memory_breakdown(LLAMA8B, h100, 8192, n + 1, cfg).fits


def test_max_model_len_is_tight():
    l4, cfg = get_gpu("L4"), ServingConfig(precision="int4-awq")
    length = max_model_len(LLAMA8B, l4, 32, cfg)
    assert 0 < length < LLAMA8B.max_position_embeddings
    assert memory_breakdown(LLAMA8B, l4, length, 32, cfg).fits
    assert not memory_breakdown(LLAMA8B, l4, length + cfg.block_size, 32, cfg).fits


def test_max_model_len_caps_at_the_model_limit():
    assert max_model_len(load_arch("SmolLM2-135M"), get_gpu("H200"), 1) == 8192


def test_gpu_memory_utilization_shrinks_the_budget():
    h100 = get_gpu("H100")
    high = max_concurrency(LLAMA8B, h100, 4096, ServingConfig(gpu_memory_utilization=0.95))
    low = max_concurrency(LLAMA8B, h100, 4096, ServingConfig(gpu_memory_utilization=0.5))
    assert low < high
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        ServingConfig(gpu_memory_utilization=1.5)


def test_smallest_tensor_parallel_size_divides_the_heads():
    arch = load_arch("Llama-3.1-70B")
    fit = min_tensor_parallel_size(arch, get_gpu("A100-80GB"), 8192, 32, ServingConfig(precision="bf16"))
    assert fit.status == "fits"
    assert fit.tensor_parallel_size in (2, 4, 8)
    assert arch.num_attention_heads % fit.tensor_parallel_size == 0
    assert 3 not in fit.valid_sizes


def test_model_too_big_for_a_node():
    fit = min_tensor_parallel_size(load_arch("DeepSeek-V3"), get_gpu("L4"), 4096, 1, ServingConfig())
    assert fit.status == "no" and fit.tensor_parallel_size is None


def test_eight_billion_fp16_twenty_2k_requests():
    """The worked example of the docs: 20 concurrent 2K-token requests of Llama-3.1-8B in fp16."""
    p = plan("Llama-3.1-8B", ["L4", "A10G", "H100"], Workload(context_len=2048, concurrency=20),
             ServingConfig(precision="fp16"))  # fmt: skip
    by_name = {g.gpu.name: g for g in p.gpus}
    # 20 x 2048 tokens x 128 KiB = 5 GiB of KV: the weights (15 GiB) plus KV plus ~2.3 GiB of activations
    # and runtime overhead exceed a 24 GB card's 90%, so L4/A10G need two GPUs; one H100 has room to spare.
    assert p.kv_bytes_per_sequence * 20 == 5 * GiB
    assert by_name["L4"].tensor_parallel_size == 2 and by_name["A10G"].tensor_parallel_size == 2
    assert by_name["H100-SXM"].tensor_parallel_size == 1 and by_name["H100-SXM"].max_concurrency > 200
    assert max_concurrency(LLAMA8B, get_gpu("L4"), 2048, ServingConfig(precision="fp16")) < 20


def test_no_gpu_fits_adds_cpu_and_apple():
    # 4-bit 405B needs ~205 GiB: more than 8 x L4, less than a 512 GB Mac Studio or a CPU server.
    p = plan(
        "Llama-3.1-405B",
        ["L4"],
        Workload(context_len=4096, concurrency=1),
        ServingConfig(precision="int4-awq"),
    )
    kinds = {g.gpu.kind for g in p.gpus}
    assert {"cpu", "apple"} <= kinds
    fitting = [g for g in p.gpus if g.status != "no"]
    assert fitting and all(g.gpu.kind != "gpu" for g in fitting)
    m3 = next(g for g in p.gpus if g.gpu.name == "M3-Ultra-512GB")
    assert m3.status == "fits" and m3.serving is not None and m3.serving.decode.tokens_per_s > 0


def test_context_beyond_the_model_limit():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        plan("SmolLM2-135M", ["L4"], Workload(context_len=100_000))


def test_plan_json_round_trip():
    import json

    p = plan("Qwen3-30B-A3B", ["H100", "L40S"], Workload(context_len=8192, concurrency=32),
             ServingConfig(precision="fp8", kv_dtype="fp8"))  # fmt: skip
    d = json.loads(json.dumps(p.to_dict()))
    assert d["model"]["params_total"] == p.params.total
    assert d["gpus"][0]["memory"]["weights"] > 0
    assert d["kv_bytes_per_sequence"] == kv_cache_bytes_per_sequence(p.arch, 8192, "fp8")


def test_cost_per_million():
    # $2/h at 1000 tok/s fully busy: 3.6M tokens per hour -> $0.556 per 1M.
    assert cost_per_million_tokens(2.0, 1000, 1.0) == pytest.approx(2.0 / 3.6)
    assert cost_per_million_tokens(2.0, 1000, 0.5) == pytest.approx(2 * 2.0 / 3.6)
    with pytest.raises(ValueError, match="utilization"):
        cost_per_million_tokens(2.0, 1000, 0)


def test_break_even():
    # $48/day of GPU against $0.001 per request: 48,000 requests/day; capacity 1 req/s = 86,400/day.
    be = break_even(2.0, 1.0, 1000, 0, 1.0, 0.0)
    assert be.api_cost_per_request == pytest.approx(0.001)
    assert be.requests_per_day == pytest.approx(48_000)
    assert be.utilization == pytest.approx(48_000 / 86_400)
    assert be.self_hosting_wins
    never = break_even(100.0, 0.01, 100, 100, 0.1, 0.1)
    assert not never.self_hosting_wins and never.utilization > 1
    assert math.isinf(break_even(1.0, 1.0, 10, 10, 0.0).requests_per_day)


def test_pricing_recommendation():
    assert recommend_pricing("batch", 3.0, 1.0)[0] == "spot"
    assert recommend_pricing("realtime", 3.0, 1.0)[0] == "on-demand"
    assert recommend_pricing("batch", 3.0, None)[0] == "on-demand"
    assert recommend_pricing("batch", None, None)[0] is None
    with pytest.raises(ValueError, match="workload"):
        recommend_pricing("interactive-ish", 1.0, 1.0)


def test_plan_costs_and_break_even():
    p = plan("Llama-3.1-8B", ["H100"], Workload(context_len=4096, concurrency=32, api_price_input=0.2,
                                                api_price_output=0.6, workload="batch"))  # fmt: skip
    g = p.gpus[0]
    assert g.cost.recommended_pricing == "spot"
    assert g.cost.cost_per_1m_output_spot < g.cost.cost_per_1m_output_on_demand
    assert g.cost.break_even is not None and g.cost.break_even.requests_per_day > 0
