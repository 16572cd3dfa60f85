"""Correctness on the GPU (the same comparison CI makes under the interpreter, at real shapes) and kernel
timings against the copy bandwidth and torch's SDPA."""

from __future__ import annotations

import torch

from tests.attention.triton.attention_cases import build_metadata, make_case, rel_error
from tokenmill.attention.torch_backend import TorchAttentionBackend
from tokenmill.attention.triton_backend import TritonAttentionBackend

BOUNDS = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}
MIXED = [(1000, 1), (0, 700), (300, 257), (33, 1), (4095, 1), (2000, 64), (0, 1), (17, 1)]
# name, sequences, heads, kv heads, head dim, dtype, sliding window, forced decode splits
CASES = [
    ("llama-8b heads, bf16, mixed", MIXED, 32, 8, 128, torch.bfloat16, None, None),
    ("qwen-0.5b heads (group 7), bf16, mixed", MIXED, 14, 2, 64, torch.bfloat16, None, None),
    ("group 4, fp16, mixed", MIXED, 16, 4, 128, torch.float16, None, None),
    ("mha, fp32, mixed", MIXED, 8, 8, 64, torch.float32, None, None),
    ("sliding window 300, bf16", MIXED, 16, 4, 128, torch.bfloat16, 300, None),
    ("long decodes, auto splits, bf16", [(8000, 1), (3000, 1), (100, 1)], 32, 8, 128, torch.bfloat16, None, None),
    ("long decodes, 16 splits, fp32", [(8000, 1), (3000, 1), (5, 1)], 32, 8, 128, torch.float32, None, 16),
    ("head dim 80 (padded), bf16", MIXED[:4], 8, 2, 80, torch.bfloat16, None, None),
]
# For a CPU smoke run under the interpreter.
TINY_CASES = [
    ("tiny, bf16, mixed", [(40, 1), (5, 20), (0, 1)], 4, 2, 32, torch.bfloat16, None, None),
    ("tiny, fp32, 2 splits, window", [(70, 1), (9, 1)], 4, 1, 32, torch.float32, 50, 2),
]


def check_kernels(device: torch.device) -> list[dict]:
    results = []
    cases = CASES if device.type == "cuda" else TINY_CASES
    for i, (name, seqs, heads, kv_heads, dim, dtype, window, splits) in enumerate(cases):
        case = make_case(seqs, heads, kv_heads, dim, 16, dtype, seed=i, device=str(device))
        args = (heads, kv_heads, dim, dim**-0.5, window)
        ref_cache, tri_cache = case.kv_cache.clone(), case.kv_cache.clone()
        with torch.inference_mode():
            ref = TorchAttentionBackend(*args).forward(case.query, case.key, case.value, ref_cache, case.meta)
            out = TritonAttentionBackend(*args, decode_num_splits=splits).forward(
                case.query, case.key, case.value, tri_cache, case.meta)
        err = rel_error(out, ref)
        cache_ok = torch.equal(ref_cache, tri_cache)
        ok = bool(err < BOUNDS[dtype] and cache_ok and torch.isfinite(out).all())
        results.append({"case": name, "dtype": str(dtype), "rel_error": err, "bound": BOUNDS[dtype],
                        "cache_equal": cache_ok, "ok": ok})
    return results


def check_layer_ops(device: torch.device) -> list[dict]:
    """Fused RMSNorm / rotary / SiLU-and-mul against the model's PyTorch code at Llama-8B widths, bf16."""
    import torch.nn.functional as F

    from tokenmill.attention.triton.layer_ops import rms_norm, rotary_embedding_, silu_and_mul
    from tokenmill.model.llama import RMSNorm, _rotate

    results = []
    dtype, tokens = torch.bfloat16, 300
    with torch.inference_mode():
        norm = RMSNorm(4096, 1e-5).to(device=device, dtype=dtype)
        norm.weight.normal_()
        x = torch.randn(tokens, 4096, device=device, dtype=dtype)
        res = torch.randn(tokens, 4096, device=device, dtype=dtype)
        results.append(("rms_norm", rel_error(rms_norm(x, norm.weight, norm.eps), norm._norm(x))))
        res_copy = res.clone()
        out = rms_norm(x, norm.weight, norm.eps, residual=res_copy)
        results.append(("rms_norm + residual", max(rel_error(out, norm._norm(x + res)), rel_error(res_copy, x + res))))
        qkv = torch.randn(tokens, 6144, device=device, dtype=dtype)
        q, k, _ = qkv.split([4096, 1024, 1024], dim=-1)
        q, k = q.view(tokens, 32, 128), k.view(tokens, 8, 128)
        freqs = torch.outer(torch.arange(8192, device=device, dtype=torch.float32),
                            torch.rand(64, device=device))
        cos, sin = freqs.cos(), freqs.sin()
        positions = torch.randint(0, 8192, (tokens,), device=device)
        c, s = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)
        q_ref, k_ref = _rotate(q, c, s), _rotate(k, c, s)
        rotary_embedding_(q, k, positions, cos, sin)
        results.append(("rotary", max(rel_error(q, q_ref), rel_error(k, k_ref))))
        gate_up = torch.randn(tokens, 2 * 14336, device=device, dtype=dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        results.append(("silu_and_mul", rel_error(silu_and_mul(gate_up), F.silu(gate) * up)))
    return [{"case": f"layer op {name}", "dtype": str(dtype), "rel_error": err, "bound": 1e-2, "ok": err < 1e-2}
            for name, err in results]


def _tiny_model(device: torch.device, dtype: torch.dtype):
    from tokenmill.model.llama import LlamaForCausalLM
    from tokenmill.model.registry import DecoderSpec

    spec = DecoderSpec.from_hf_config({
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    })
    torch.manual_seed(0)
    backend = TritonAttentionBackend(spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.head_dim**-0.5)
    return LlamaForCausalLM(spec, backend, 1024).to(device=device, dtype=dtype).eval(), spec


def check_cuda_graph_replay(device: torch.device) -> dict:
    """Eager forward vs graph replay of a tiny bf16 model, for two batches with different lengths (padded)."""
    from tokenmill.worker.cuda_graphs import CUDAGraphRunner

    model, spec = _tiny_model(device, torch.bfloat16)
    shape = (2, 64, 16, spec.num_kv_heads, spec.head_dim)
    kv_caches = [torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(spec.num_layers)]
    runner = CUDAGraphRunner(model, kv_caches, max_num_seqs=8, max_model_len=1024, block_size=16, device=device)
    seconds = runner.capture()
    errors = []
    batches = [([(50, 1), (7, 1), (300, 1)], [[1, 2, 3, 4], [5], list(range(6, 26))]),
               ([(100, 1), (20, 1)], [list(range(30, 37)), [40, 41]])]
    with torch.inference_mode():
        for seqs, tables in batches:
            meta = build_metadata(seqs, tables, 16, str(device))
            ids = torch.randint(0, 1000, (len(seqs),), device=device)
            positions = torch.tensor([c for c, _ in seqs], device=device)
            eager_caches = [c.clone() for c in kv_caches]
            expected = model(ids, positions, eager_caches, meta)
            got = runner(ids, positions, kv_caches, meta).clone()
            errors.append(rel_error(got, expected))
            errors.append(0.0 if all(torch.equal(a, b) for a, b in zip(kv_caches, eager_caches)) else 1.0)
    err = max(errors)
    return {"rel_error": err, "ok": err < 1e-2 and runner.num_replays == 2, "capture_s": seconds,
            "replays": runner.num_replays}


def kernel_timings(device: torch.device, copy_bw: float | None) -> dict:
    """Decode attention against the copy bandwidth; prefill attention against torch SDPA (flash)."""
    import triton.testing

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3  # seconds

    out = {}
    heads, kv_heads, dim, bs, dtype = 32, 8, 128, 16, torch.bfloat16
    tri = TritonAttentionBackend(heads, kv_heads, dim, dim**-0.5)
    ref = TorchAttentionBackend(heads, kv_heads, dim, dim**-0.5)
    with torch.inference_mode():
        for batch, ctx in ((64, 2048), (1, 32768)):
            # Caches far larger than L2 (50-60 MB), so repeated runs measure memory, not the cache.
            blocks_per_seq = ctx // bs
            tables = torch.randperm(batch * blocks_per_seq).view(batch, blocks_per_seq).tolist()
            meta = build_metadata([(ctx - 1, 1)] * batch, tables, bs, str(device))
            kv = torch.randn(2, batch * blocks_per_seq, bs, kv_heads, dim, device=device, dtype=dtype)
            q = torch.randn(batch, heads, dim, device=device, dtype=dtype)
            seconds = bench(lambda: tri.attend(q, q, q, kv, meta))  # noqa: B023
            torch_seconds = bench(lambda: ref.attend(q, q, q, kv, meta))  # noqa: B023
            nbytes = batch * ctx * kv_heads * dim * 2 * kv.element_size()
            entry = {"triton_ms": seconds * 1e3, "torch_backend_ms": torch_seconds * 1e3, "kv_bytes": nbytes,
                     "GBps": nbytes / seconds / 1e9, "splits": tri.num_decode_splits(batch, ctx, device)}
            if copy_bw:
                entry["fraction_of_copy_bandwidth"] = nbytes / seconds / copy_bw
            out[f"decode b{batch} ctx{ctx} (8b heads)"] = entry
            del kv

        batch, n = 4, 2048
        meta = build_metadata([(0, n)] * batch, [list(range(i * n // bs, (i + 1) * n // bs)) for i in range(batch)],
                              bs, str(device))
        kv = torch.randn(2, batch * n // bs, bs, kv_heads, dim, device=device, dtype=dtype)
        q = torch.randn(batch * n, heads, dim, device=device, dtype=dtype)
        k = kv[0].reshape(batch, n, kv_heads, dim).transpose(1, 2)
        v = kv[1].reshape(batch, n, kv_heads, dim).transpose(1, 2)
        qb = q.view(batch, n, heads, dim).transpose(1, 2)
        flops = batch * 4 * heads * n * n * dim / 2  # QK^T and PV, causal half
        seconds = bench(lambda: tri.attend(q, q, q, kv, meta))
        sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
            qb, k, v, is_causal=True, enable_gqa=True))
        out[f"prefill {batch}x{n} causal (8b heads)"] = {
            "triton_ms": seconds * 1e3, "triton_TFLOPs": flops / seconds / 1e12,
            "sdpa_ms": sdpa * 1e3, "sdpa_TFLOPs": flops / sdpa / 1e12,
        }
    return out
