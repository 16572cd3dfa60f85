"""Weights, KV cache layout, activations and overhead."""

import pytest

from tokenmill.planner import (
    ModelArch,
    activation_peak_bytes,
    dtype_bytes,
    get_model_config,
    kv_cache_bytes_per_block,
    kv_cache_bytes_per_sequence,
    kv_cache_bytes_per_token,
    load_arch,
    normalize_dtype,
    num_kv_heads_per_rank,
    overhead_bytes,
    resolve_precision,
    valid_tensor_parallel_sizes,
    weight_bytes,
)

GiB = 1024**3


def test_block_bytes_follow_the_engine_layout():
    """Per layer the engine allocates [2, num_blocks, block_size, num_kv_heads, head_dim]."""
    for name in ("Llama-3.1-8B", "Qwen3-0.6B", "Gemma-2-9B", "Mistral-7B", "SmolLM2-135M"):
        arch = load_arch(name)
        for dtype, nbytes in (("bfloat16", 2), ("fp8", 1), ("float32", 4)):
            per_layer = 2 * 16 * arch.num_kv_heads * arch.head_dim * nbytes
            assert kv_cache_bytes_per_block(arch, 16, dtype) == arch.num_layers * per_layer


def test_block_bytes_with_torch_tensors():
    torch = pytest.importorskip("torch")
    arch = load_arch("SmolLM2-135M")
    num_blocks, block_size = 7, 16
    layers = [
        torch.empty(2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim, dtype=torch.float16)
        for _ in range(arch.num_layers)
    ]
    allocated = sum(t.numel() * t.element_size() for t in layers)
    assert allocated == num_blocks * kv_cache_bytes_per_block(arch, block_size, torch.float16)


def test_block_bytes_ignore_sliding_windows_but_sequences_do_not():
    arch = load_arch("Mistral-7B-v0.1")  # window 4096 on every layer
    assert kv_cache_bytes_per_block(arch, 16) == 16 * kv_cache_bytes_per_token(arch)
    assert kv_cache_bytes_per_sequence(arch, 32768) == kv_cache_bytes_per_sequence(arch, 4096)
    assert kv_cache_bytes_per_sequence(arch, 1000) == 1000 * kv_cache_bytes_per_token(arch)
    gemma = load_arch("Gemma-2-9B")  # half the layers slide over 4096 tokens
    full = kv_cache_bytes_per_token(gemma)
    assert kv_cache_bytes_per_sequence(gemma, 8192) == (8192 + 4096) // 2 * full


def test_sequence_bytes_round_to_blocks():
    arch = load_arch("Llama-3.1-8B")
    assert kv_cache_bytes_per_sequence(arch, 17, block_size=16) == 32 * kv_cache_bytes_per_token(arch)


def test_kv_heads_replicated_beyond_their_count():
    arch = load_arch("Llama-3.1-70B")  # 64 query heads, 8 KV heads
    assert num_kv_heads_per_rank(arch, 8) == 1
    assert num_kv_heads_per_rank(arch, 16) == 1  # 8 heads over 16 ranks: each stored twice
    assert kv_cache_bytes_per_token(arch, "bf16", 16) == 80 * 2 * 1 * 128 * 2
    assert kv_cache_bytes_per_token(arch, "bf16", 4) == 327_680 // 4
    assert 16 in valid_tensor_parallel_sizes(arch, 16)


def test_mla_latent_is_replicated_across_ranks():
    arch = load_arch("DeepSeek-V3")
    assert kv_cache_bytes_per_token(arch, "bf16", 8) == kv_cache_bytes_per_token(arch, "bf16", 1)
    assert kv_cache_bytes_per_block(arch, 64, "bf16") == 61 * 64 * 576 * 2


def test_dtypes():
    torch = pytest.importorskip("torch")
    assert normalize_dtype(torch.bfloat16) == "bfloat16"
    assert dtype_bytes(torch.float8_e4m3fn) == 1
    assert dtype_bytes("FP16") == dtype_bytes("half") == 2
    assert dtype_bytes("float32") == 4
    arch = load_arch("Llama-3.1-8B")
    assert kv_cache_bytes_per_token(arch, "fp8") == 131_072 // 2


def test_weight_bytes_by_precision():
    arch = load_arch("Llama-3.1-8B")
    bf16 = weight_bytes(arch, "bf16").total
    assert bf16 == 2 * 8_030_261_248
    assert weight_bytes(arch, "fp32").total == 2 * bf16
    fp8 = weight_bytes(arch, "fp8").total
    awq = weight_bytes(arch, "int4-awq").total
    gptq = weight_bytes(arch, "int4-gptq").total
    # 16-bit embedding + lm_head (2 x 1.05 GB) keep the 4-bit model well above bf16 / 4.
    assert bf16 / 4 < awq < gptq < fp8 < bf16
    assert 5.2 * GiB < awq < 5.5 * GiB  # published AWQ checkpoint: 5.73 GB
    assert weight_bytes(arch, "int4-awq", group_size=32).total > awq  # more groups, more scales


def test_weight_bytes_split_by_tensor_parallelism():
    arch = load_arch("Llama-3.1-70B")
    one = weight_bytes(arch, "bf16", 1).total
    four = weight_bytes(arch, "bf16", 4).total
    assert one / 4 < four < one / 4 * 1.001  # only norms are replicated


def test_quantization_config_sets_auto_precision():
    cfg = get_model_config("Llama-3.1-8B") | {
        "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 64}
    }
    arch = ModelArch.from_hf_config(cfg)
    assert resolve_precision(arch).name == "int4-awq" and resolve_precision(arch).group_size == 64
    assert resolve_precision(load_arch("DeepSeek-V3")).name == "fp8"
    assert resolve_precision(load_arch("Gemma-2-9B")).name == "bf16"  # fp32 checkpoints are served in bf16


def test_activation_peak_grows_with_batched_tokens():
    arch = load_arch("Llama-3.1-8B")
    small = activation_peak_bytes(arch, 2048)
    large = activation_peak_bytes(arch, 8192)
    assert small < large
    # An engine profiling an 8192-token batch of Llama-3-8B reserves about a GiB, not "10% of weights".
    assert 0.8 * GiB < large < 1.6 * GiB
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        activation_peak_bytes(arch, 0)


def test_activation_peak_of_moe_and_mla():
    assert activation_peak_bytes(load_arch("Mixtral-8x7B"), 8192) > 0
    assert activation_peak_bytes(load_arch("DeepSeek-V3"), 8192, tensor_parallel_size=8) > 0


def test_overhead():
    single = overhead_bytes("gpu", 1)
    assert single.communication == 0 and single.total == int(1.25 * GiB)
    assert overhead_bytes("gpu", 2).communication > 0
    assert overhead_bytes("gpu", 1, enforce_eager=True).cuda_graphs == 0
    assert overhead_bytes("apple").runtime > 0
    with pytest.raises(ValueError, match="device_kind"):
        overhead_bytes("tpu")
