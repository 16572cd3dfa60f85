"""Quantized linear kernels per shape: packed int4 / int8 GEMV-GEMM vs tile kernel vs dequantize + bf16 GEMM vs bf16.

    python benchmarks/quant_kernels.py                    # SmolLM2-135M's layer shapes, 2 torch threads
    python benchmarks/quant_kernels.py --rows 1,4,16 --json quant_kernels.json
    python benchmarks/quant_kernels.py --rows 64,128,256,512 --layers 30   # weights streamed, as in a model step

For each weight shape [N, K] and activation row count M, the same bf16 activations go through
- int4 packed: tokenmill's int4_gemm (csrc/quant.c) on q4 + float16 scales/offsets (group 32);
- int4 tile: int4_tile_gemm, a 32-column tile dequantized to bf16 in cache, AVX512-BF16 dot products against all rows;
- int4 dequant: the whole weight dequantized to bf16 (int4_dequant), then oneDNN's matmul;
- int8 packed / int8 tile / int8 dequant: the same for int8 with float32 group scales (Q8_0's layout);
- bf16 packed: the unquantized method's oneDNN pre-packed bf16 weight (the full-precision reference);
- torch int4: torch's _weight_int4pack_mm_for_cpu (bf16 scales), the candidate that was not kept.
With --layers N, each kernel runs over N different weights of the shape in turn (a model's layers: the weights
come from memory, not from the cache, as in an engine step; the output layer's size: one) and the time is per
weight.
Milliseconds per call (median of --repeat), and per kernel family and weight size the largest M at which the
packed kernel is still faster than the tile kernel, and whether dequantize + GEMM beats the tile kernel at any M:
the crossovers tokenmill/kernels/cpu/quant.py uses.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# SmolLM2-135M: fused qkv, o, fused gate_up, down, lm_head (tied embedding).
DEFAULT_SHAPES = "960x576,576x576,3072x576,576x1536,49152x576"


def _dequant_linear(weight, x):
    import torch
    import torch.nn.functional as F

    return F.linear(x, weight.dequantize(torch.bfloat16))


def _forced(weight, x, kernel: str):
    """weight.matmul(x) with the kernel for M forced: 'packed' or 'tile'."""
    weight.max_packed_rows = 1 << 30 if kernel == "packed" else 0
    weight.max_tile_rows = 1 << 30
    return weight.matmul(x)


def _onednn_linear(packed, x):
    import torch

    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


def _torch_int4(packed, scale_zeros, x):
    import torch

    return torch._weight_int4pack_mm_for_cpu(x, packed, 32, scale_zeros)


def _layer_weights(n: int, k: int) -> dict:
    """One layer's [n, k] weight in every form the kernels take."""
    import torch

    from tokenmill.kernels.cpu.quant import pack_int4, pack_int8

    w = torch.randn(n, k) * 0.05
    q4 = torch.randint(0, 16, (n, k), dtype=torch.uint8)
    return {
        "int4": pack_int4(q4, torch.rand(n, k // 32) * 0.01, None, 32),
        "int8": pack_int8(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, k // 32) * 0.01, 32),
        "onednn": torch.ops.mkldnn._reorder_linear_weight(w.bfloat16(), 64),
        "tq": torch._convert_weight_to_int4pack_for_cpu(q4.to(torch.int32), 1),
        "tsz": torch.rand(k // 32, n, 2, dtype=torch.bfloat16),
    }


def _each(fn, layers: list[dict], *names: str):
    """fn(x) over every layer's weights (names: which of them, as fn's first arguments), as one call."""
    return lambda x: [fn(*(layer[name] for name in names), x) for layer in layers]


def _time_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    import torch

    from tokenmill.kernels.cpu.quant import LARGE_WEIGHT

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated NxK weight shapes")
    parser.add_argument("--rows", default="1,2,3,4,8,16,64,256,1024", help="comma-separated activation row counts M")
    parser.add_argument("--layers", type=int, default=1, help="different weights of each shape, run in turn")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--json", dest="json_path", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows_list = [int(m) for m in args.rows.split(",")]
    results = []
    families = ("int4", "int8")
    kinds = ("packed", "tile", "dequant")
    print(f"{'shape':>12} {'M':>4} | {'int4 pk':>8} {'int4 tl':>8} {'int4 dq':>8} | {'int8 pk':>8} {'int8 tl':>8} "
          f"{'int8 dq':>8} | {'bf16':>8} {'torch i4':>8}  (ms)")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        count = args.layers if n * k < LARGE_WEIGHT else 1  # a model has one output layer
        layers = [_layer_weights(n, k) for _ in range(count)]
        for m in rows_list:
            x = torch.randn(m, k).bfloat16()
            repeat = max(3, args.repeat // (4 if n * m > 2**20 else 1))
            kernels = {
                "int4_packed": _each(functools.partial(_forced, kernel="packed"), layers, "int4"),
                "int4_tile": _each(functools.partial(_forced, kernel="tile"), layers, "int4"),
                "int4_dequant": _each(_dequant_linear, layers, "int4"),
                "int8_packed": _each(functools.partial(_forced, kernel="packed"), layers, "int8"),
                "int8_tile": _each(functools.partial(_forced, kernel="tile"), layers, "int8"),
                "int8_dequant": _each(_dequant_linear, layers, "int8"),
                "bf16_packed": _each(_onednn_linear, layers, "onednn"),
                "torch_int4": _each(_torch_int4, layers, "tq", "tsz"),
            }
            row = {"n": n, "k": k, "m": m}
            row.update({name: _time_ms(functools.partial(fn, x), repeat) / count for name, fn in kernels.items()})
            results.append(row)
            cells = " | ".join(" ".join(f"{row[f'{f}_{kind}']:8.3f}" for kind in kinds) for f in families)
            print(f"{shape:>12} {m:>4} | {cells} | {row['bf16_packed']:8.3f} {row['torch_int4']:8.3f}", flush=True)
    crossover = {}
    for family in families:
        for size, in_size in (("small", lambda r: r["n"] * r["k"] < LARGE_WEIGHT),
                              ("large", lambda r: r["n"] * r["k"] >= LARGE_WEIGHT)):
            # Summed over the shapes of a size class (one decoder step's mix, or the output layer).
            rows = [r for r in results if in_size(r)]
            if not rows:
                continue
            total = {(kind, m): sum(r[f"{family}_{kind}"] for r in rows if r["m"] == m) for kind in kinds
                     for m in rows_list}
            packed_up_to = max([m for m in rows_list if total["packed", m] <= total["tile", m]], default=0)
            dequant_wins = [m for m in rows_list if total["dequant", m] < total["tile", m]]
            crossover[f"{family}_{size}"] = {"max_packed_rows": packed_up_to, "dequant_faster_than_tile_at": dequant_wins}
            print(f"{family} {size} weights: packed wins up to M = {packed_up_to}, tile above; dequantize + GEMM "
                  f"beats the tile kernel at M = {dequant_wins or 'none'}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({"benchmark": "quant_kernels", "threads": args.threads, "args": vars(args),
                       "results": results, "crossover": crossover}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
