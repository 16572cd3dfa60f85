"""The native bfloat16 layer ops equal the model's PyTorch code (up to float32 summation order)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.kernels.cpu import ops as cpu_kernels
from tokenmill.model.llama import RMSNorm, _rotate

pytestmark = pytest.mark.skipif(not cpu_kernels.layer_ops_supported(),
                                reason="fused bf16 layer ops need a C compiler and AVX512-BF16")


def assert_bf16_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal, except that a few elements may differ by one bfloat16 step (a float32 sum in another order
    can land on the other side of a rounding boundary)."""
    assert got.dtype == expected.dtype == torch.bfloat16 and got.shape == expected.shape
    diff = (got.float() - expected.float()).abs()
    step = torch.exp2(torch.floor(torch.log2(expected.float().abs().clamp_min(1e-30))) - 7)
    assert bool((diff <= step * 1.001).all()), f"max difference {diff.max()}"
    assert (diff > 0).float().mean() < 0.01


def randn(*shape, seed=0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2).to(torch.bfloat16)


@pytest.mark.parametrize("hidden", [576, 100])
def test_rms_norm(hidden):
    norm = RMSNorm(hidden, 1e-5).to(torch.bfloat16)
    norm.weight.data = randn(hidden, seed=1)
    x = randn(37, hidden)
    assert_bf16_close(cpu_kernels.rms_norm(x, norm.weight, 1e-5), norm._norm(x))


def test_rms_norm_with_residual_updates_it_in_place():
    norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    norm.weight.data = randn(64, seed=1)
    x, residual = randn(2000, 64, seed=2), randn(2000, 64, seed=3)  # over the threading threshold
    expected_sum = x + residual
    expected = norm._norm(expected_sum)
    got = cpu_kernels.rms_norm(x, norm.weight, 1e-6, residual=residual)
    assert torch.equal(residual, expected_sum)
    assert_bf16_close(got, expected)


def test_rms_norm_module_uses_fused_path_with_same_result():
    norm = RMSNorm(96, 1e-6).to(torch.bfloat16)
    x, residual = randn(5, 96, seed=4), randn(5, 96, seed=5)
    out, new_residual = norm(x, residual.clone())
    assert torch.equal(new_residual, x + residual)
    assert_bf16_close(out, norm._norm(x + residual))


def test_rotary_in_place_on_qkv_views():
    tokens, heads, kv_heads, head_dim = 50, 9, 3, 64
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(tokens, kv_heads, head_dim)
    v_before = qkv[:, (heads + kv_heads) * head_dim :].clone()
    positions = torch.randint(0, 500, (tokens,), generator=torch.Generator().manual_seed(6))
    freqs = torch.outer(torch.arange(512).float(), 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)))
    cos, sin = freqs.cos(), freqs.sin()
    expected_q = _rotate(q, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    expected_k = _rotate(k, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    cpu_kernels.rotary_embedding_(q, k, positions, cos, sin)
    assert_bf16_close(q.contiguous(), expected_q)
    assert_bf16_close(k.contiguous(), expected_k)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim :], v_before)  # values untouched


def test_silu_and_mul():
    gate_up = randn(300, 2 * 200)  # 200: not a multiple of the vector width
    gate, up = gate_up.chunk(2, dim=-1)
    assert_bf16_close(cpu_kernels.silu_and_mul(gate_up), F.silu(gate) * up)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_matches_reference_and_skips_padding(dtype):
    blocks, block_size, kv_heads, head_dim = 6, 4, 2, 8
    kv = randn(10, 3 * kv_heads * head_dim, seed=7).to(dtype)  # rows of [q | k | v] as the fused projection
    key = kv[:, kv_heads * head_dim : 2 * kv_heads * head_dim].view(10, kv_heads, head_dim)
    value = kv[:, 2 * kv_heads * head_dim :].view(10, kv_heads, head_dim)
    slots = torch.tensor([3, 7, 0, 23, 12, 5, 9, 1, 2, 4])
    expected = torch.zeros(2, blocks, block_size, kv_heads, head_dim, dtype=dtype)
    TorchAttentionBackend(kv_heads, kv_heads, head_dim, 1.0).write_kv(key, value, expected, slots)
    got = torch.zeros_like(expected)
    cpu_kernels.write_kv(key, value, got, slots)
    assert torch.equal(got, expected)
    padded = torch.zeros_like(expected)
    cpu_kernels.write_kv(key, value, padded, torch.where(torch.arange(10) < 5, slots, -1))
    assert torch.equal(padded.view(2, -1, kv_heads, head_dim)[:, slots[:5]],
                       expected.view(2, -1, kv_heads, head_dim)[:, slots[:5]])
    assert int(padded.ne(0).sum()) == int(expected.view(2, -1, kv_heads, head_dim)[:, slots[:5]].ne(0).sum())


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match="bfloat16"):
        cpu_kernels.silu_and_mul(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="residual shape"):
        cpu_kernels.rms_norm(randn(2, 8), randn(8), 1e-6, residual=randn(3, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_matches_torch_including_ties_and_nan(dtype):
    logits = randn(70, 1000, seed=8).to(dtype)
    logits[3, 10] = logits[3, 500] = 100.0  # a tie: the first index wins
    logits[4] = float("-inf")
    logits[5, 7] = float("nan")
    logits[6, 999] = 1e4  # in the vector tail
    expected = logits.argmax(dim=-1)
    assert torch.equal(cpu_kernels.argmax(logits), expected)
    assert expected[3] == 10 and expected[5] == 7
    assert torch.equal(cpu_kernels.argmax(logits[::2]), logits[::2].argmax(dim=-1))  # strided rows


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_bf16_model_same_with_and_without_fused_ops(tiny_models, arch, monkeypatch):
    """The fused path (residual adds folded into the norms, in-place RoPE; with q/k norms, sliding window and
    q/k/v bias) computes the same model: prompt logprobs of tiny models in bfloat16 agree with the PyTorch path
    to bfloat16 precision."""
    from tokenmill import LLM, SamplingParams
    from tokenmill.model import llama

    llm = LLM(str(tiny_models[arch]), dtype="bfloat16", kv_cache_memory="8MiB", enable_prefix_caching=False,
              show_progress=False)
    prompts = [{"prompt_token_ids": list(range(5 + i, 60 + 7 * i))} for i in range(3)]
    params = SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=0, ignore_eos=True)

    def run() -> list[list[float]]:
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [[next(iter(p.values())).logprob for p in o.prompt_logprobs[1:]] for o in outs]

    fused = run()
    monkeypatch.setattr(llama, "_cpu_layer_ops", lambda: None)
    plain = run()
    for a, b in zip(fused, plain, strict=True):
        assert len(a) == len(b) > 40
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 0.05
