"""Quantized GEMMs on the GPU: the Triton W4A16 / W8A16 kernel on AWQ and GPTQ layouts (act-order too) and the
fp8 torch._scaled_mm path, checked against the dequantized weight and timed against bf16 cuBLAS (F.linear).

Weights are random packed words (any bit pattern is a valid 4-/8-bit value), dequantized by the engine's CPU
loaders (tokenmill/model/quantization: awq_to_canonical, gptq_to_canonical), whose layouts CI checks against
the test quantizer's own reference (tests/model/test_quant_checkpoints.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# (label, N, K): Llama-3.1-8B's projections.
SHAPES = [("8b qkv", 6144, 4096), ("8b down", 4096, 14336)]
TINY_SHAPES = [("tiny", 96, 128)]
ROWS = (1, 16, 256)
TINY_ROWS = (1, 19)


def _case(layout: str, n: int, k: int, bits: int, group: int, act_order: bool, device: torch.device, seed: int):
    """Packed tensors of one layer in `layout`, and the dequantized weight [N, K] float32 (from the loaders)."""
    from tokenmill.model.quantization.awq import awq_to_canonical
    from tokenmill.model.quantization.gptq import gptq_to_canonical

    gen = torch.Generator().manual_seed(seed)
    pack = 32 // bits
    num_groups = k // group
    scales = (torch.rand(num_groups, n, generator=gen) * 0.02 + 0.001).half()

    def words(*shape: int) -> torch.Tensor:
        return torch.randint(-(2**31), 2**31 - 1, shape, generator=gen, dtype=torch.int64).to(torch.int32)

    g_idx = None
    if layout == "awq":
        qweight, qzeros = words(k, n // 8), words(num_groups, n // 8)
        c = awq_to_canonical("bench", qweight, qzeros, scales, group)
        zero_offset = 0
    else:
        qweight = words(k // pack, n)
        # v1 zero points stored as zero - 1: keep every field below 2^bits - 1.
        qzeros = words(num_groups, n // pack) & int("0x" + ("7" if bits == 4 else "7f") * pack, 16)
        if act_order:
            g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=gen)].to(torch.int32)
        c = gptq_to_canonical("bench", qweight, qzeros, scales, g_idx, bits, group)
        zero_offset = 1
    gs = torch.arange(k) // group
    w = (c.q.float() - c.zeros.float()[:, gs]) * c.scales.float()[:, gs]  # [N, K], columns in c.perm order
    if c.perm is not None:
        w = torch.empty_like(w).index_copy_(1, c.perm, w)  # back to the checkpoint's column order
    args = {"qweight": qweight.to(device), "scales": scales.to(device), "qzeros": qzeros.to(device),
            "layout": layout, "bits": bits, "group_size": group,
            "g_idx": g_idx.to(device) if g_idx is not None else None, "zero_offset": zero_offset}
    return args, w.to(device)


VARIANTS = [("awq g128", "awq", 4, 128, False), ("gptq g128", "gptq", 4, 128, False),
            ("gptq g128 act-order", "gptq", 4, 128, True), ("gptq 8-bit g128", "gptq", 8, 128, False)]


def check_quant_gemms(device: torch.device) -> list[dict]:
    """Each variant at each shape: Triton GEMM vs x @ dequantized weight, bf16 activations."""
    from tokenmill.kernels.triton.quant_gemm import quant_gemm

    cuda = device.type == "cuda"
    shapes = SHAPES if cuda else TINY_SHAPES
    dtype = torch.bfloat16
    results = []
    for i, (label, layout, bits, group, act_order) in enumerate(VARIANTS):
        for name, n, k in shapes:
            g = group if k % group == 0 else 32
            args, w = _case(layout, n, k, bits, g, act_order, device, seed=i)
            x = torch.randn(7, k, device=device, dtype=dtype)
            with torch.inference_mode():
                out = quant_gemm(x, **args).float()
                ref = x.float() @ w.T
            err = float((out - ref).norm() / ref.norm())
            results.append({"case": f"quant gemm {label}, {name}", "rel_error": err, "bound": 2e-2,
                            "ok": bool(err < 2e-2 and torch.isfinite(out).all())})
    return results


def quant_timings(device: torch.device, copy_bw: float | None) -> dict:
    """Median time of each variant against bf16 F.linear, per rows M; at M=1 the fraction of the copy
    bandwidth the packed weight is read at. fp8 _scaled_mm where the GPU has fp8 tensor cores."""
    import triton.testing

    from tokenmill.kernels.triton.quant_gemm import quant_gemm
    from tokenmill.model.quantization.fp8 import fp8_scaled_mm, scaled_mm_supported

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") / 1e3

    out: dict = {}
    dtype = torch.bfloat16
    with torch.inference_mode():
        for name, n, k in SHAPES:
            dense = torch.randn(n, k, device=device, dtype=dtype) * 0.02
            fp8_w = fp8_scale = None
            if scaled_mm_supported(device):
                fp8_scale = dense.float().abs().amax(dim=1) / 448
                fp8_w = (dense.float() / fp8_scale[:, None]).to(torch.float8_e4m3fn)
            for i, (label, layout, bits, group, act_order) in enumerate(VARIANTS):
                args, _ = _case(layout, n, k, bits, group, act_order, device, seed=i)
                nbytes = sum(t.numel() * t.element_size() for t in args.values() if isinstance(t, torch.Tensor))
                for m in ROWS:
                    x = torch.randn(m, k, device=device, dtype=dtype)
                    t_q = bench(lambda: quant_gemm(x, **args))  # noqa: B023
                    t_bf16 = bench(lambda: F.linear(x, dense))  # noqa: B023
                    entry = {"quant_ms": t_q * 1e3, "bf16_ms": t_bf16 * 1e3, "speedup_vs_bf16": t_bf16 / t_q,
                             "weight_bytes": nbytes}
                    if m == 1 and copy_bw:
                        entry["fraction_of_copy_bandwidth"] = nbytes / t_q / copy_bw
                    out[f"{label} {name} M={m}"] = entry
            if fp8_w is not None:
                for m in ROWS:
                    x = torch.randn(m, k, device=device, dtype=dtype)
                    t_f = bench(lambda: fp8_scaled_mm(x, fp8_w, fp8_scale))  # noqa: B023
                    t_bf16 = bench(lambda: F.linear(x, dense))  # noqa: B023
                    out[f"fp8 scaled_mm {name} M={m}"] = {"fp8_ms": t_f * 1e3, "bf16_ms": t_bf16 * 1e3,
                                                          "speedup_vs_bf16": t_bf16 / t_f}
    return out
