"""Throughput estimates: never above the roofline, sensible in shape."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill.planner import (
    GPU_CATALOG,
    MODEL_CONFIGS,
    decode_estimate,
    get_gpu,
    kv_cache_bytes_per_sequence,
    load_arch,
    prefill_estimate,
    serving_estimate,
    valid_tensor_parallel_sizes,
    weight_bytes,
)

ARCHS = {name: load_arch(name) for name in MODEL_CONFIGS}


@settings(max_examples=300, deadline=None, database=None)
@given(
    model=st.sampled_from(sorted(ARCHS)),
    gpu=st.sampled_from(sorted(GPU_CATALOG)),
    batch=st.integers(1, 1024),
    context=st.integers(0, 131072),
    precision=st.sampled_from(["auto", "bf16", "fp8", "int4-awq", "q4_k_m"]),
    kv_dtype=st.sampled_from(["auto", "fp8"]),
    tp_index=st.integers(0, 3),
)
def test_decode_never_exceeds_the_bandwidth_roofline(
    model, gpu, batch, context, precision, kv_dtype, tp_index
):
    arch, spec = ARCHS[model], GPU_CATALOG[gpu]
    sizes = valid_tensor_parallel_sizes(arch, 8)
    tp = sizes[min(tp_index, len(sizes) - 1)]
    est = decode_estimate(arch, spec, batch, context, precision, kv_dtype, tp)
    # Roofline: B tokens per step; a step reads at least the bytes counted, at no more than peak bandwidth.
    bytes_per_step = est.weight_bytes_read + est.kv_bytes_read
    bandwidth_roofline = batch * spec.bandwidth_bytes_per_s / bytes_per_step
    assert est.tokens_per_s <= bandwidth_roofline * (1 + 1e-9)
    assert est.tokens_per_s <= est.roofline_tokens_per_s * (1 + 1e-9)
    assert est.tokens_per_s <= est.compute_roofline_tokens_per_s * (1 + 1e-9)
    # The bytes include every sequence's KV cache.
    if kv_dtype == "fp8":
        assert est.kv_bytes_read == batch * kv_cache_bytes_per_sequence(arch, context, "fp8", tp)


def test_single_stream_decode_is_bandwidth_over_weights():
    arch, h100 = ARCHS["Llama-3.1-8B"], get_gpu("H100")
    est = decode_estimate(arch, h100, 1, 0, "bf16")
    # With no context, one token per step reads the weights minus the embedding table (a row gather).
    w = weight_bytes(arch, "bf16")
    read = w.total - w.by_component["embedding"]
    assert est.weight_bytes_read == pytest.approx(read)
    assert est.bandwidth_roofline_tokens_per_s == pytest.approx(h100.bandwidth_bytes_per_s / read)
    assert est.tokens_per_s == pytest.approx(0.75 * est.bandwidth_roofline_tokens_per_s)
    assert est.bound == "memory"


def test_batching_raises_throughput_until_compute_bound():
    arch, h100 = ARCHS["Llama-3.1-8B"], get_gpu("H100")
    rates = [decode_estimate(arch, h100, b, 1024, "bf16").tokens_per_s for b in (1, 8, 64, 256)]
    assert rates == sorted(rates)
    assert decode_estimate(arch, h100, 4096, 128, "bf16").bound == "compute"


def test_moe_small_batches_read_few_experts():
    arch, h100 = ARCHS["Mixtral-8x7B-v0.1"], get_gpu("H100")
    one = decode_estimate(arch, h100, 1, 0, "bf16").weight_bytes_read
    many = decode_estimate(arch, h100, 256, 0, "bf16").weight_bytes_read
    total = weight_bytes(arch, "bf16")
    assert one < 0.35 * total.total  # 2 of 8 experts + attention
    assert many == pytest.approx(total.total - total.by_component["embedding"], rel=1e-6)


def test_prefill_is_compute_bound_for_long_prompts():
    arch, h100 = ARCHS["Llama-3.1-8B"], get_gpu("H100")
    est = prefill_estimate(arch, h100, 8192)
    assert est.time_s == est.compute_bound_time_s
    # 2 * 8B params * 8192 tokens at 50% of 989 TFLOP/s is about 0.27 s, plus attention.
    assert 0.25 < est.time_s < 0.4


def test_serving_estimate_accounts_for_prefill():
    arch, l4 = ARCHS["Llama-3.1-8B"], get_gpu("L4")
    srv = serving_estimate(arch, l4, 8, 1536, 512, "int4-awq")
    assert 0 < srv.output_tokens_per_s < srv.decode.tokens_per_s
    assert srv.requests_per_s == pytest.approx(srv.output_tokens_per_s / 512)


def test_bad_batch():
    with pytest.raises(ValueError, match="batch_size"):
        decode_estimate(ARCHS["Llama-3.1-8B"], get_gpu("L4"), 0, 10)
