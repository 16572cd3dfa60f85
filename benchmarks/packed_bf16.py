"""The packed int4 / int8 kernels with bfloat16 activations (CPUs with AVX512-BF16) against the same kernels as
committed at a git revision, side by side in one run.

    python benchmarks/packed_bf16.py --against HEAD~1            # SmolLM2-135M's shapes, 1 row, 1 thread
    python benchmarks/packed_bf16.py --against HEAD~1 --rows 1,2,4 --threads 2 --json packed_bf16.json
    python benchmarks/packed_bf16.py --against HEAD~1 --tile --rows 16,64,512 --threads 2   # the tile kernels
    python benchmarks/packed_bf16.py --against HEAD~1 --dequant --threads 2   # dequantization to bfloat16

A decode step's projections on such a CPU: int4 weights through csrc/gemv_bf16.c's int4_gemv_bf16 (the fused
decode step's kernel too), int8 ones (the output layer of a Q4_1 GGUF, stored Q8_0) through csrc/quant.c's
int8_gemm. This builds both files twice with the engine's compiler flags: as in the working tree, and as
committed at REV (git show). Both run the same weights (random, in the engine's packed layouts: int4 nibbles with
float16 scales and offsets per group of 32, int8 with float32 scales per group of 32 as GGUF Q8_0) and inputs,
alternating, best of --repeat; the outputs are compared. Reported: ms per pass over every layer's weights of each
shape, the weight bytes streamed per second, and the speed-up. --tile runs the tile kernels (int4_tile_gemm,
int8_tile_gemm: the kernels for more rows than the packed ones take, on AMX where the CPU has it) instead;
--dequant the dequantization of the whole weight to bfloat16 (int4_dequant, int8_dequant: longer prefill chunks,
before oneDNN's GEMM), where --rows does not apply and the outputs compared are the dequantized weights.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.packed_f32 import CSRC, GROUP, SHAPES, build, checkout_csrc, make_weights  # noqa: E402

SOURCES = ("quant.c", "gemv_bf16.c")


def load(tmp: Path, name: str, csrc: Path) -> ctypes.CDLL:
    lib = build(tmp, name, [], csrc, SOURCES)
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.int4_gemv_bf16.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32]
    lib.int4_tile_gemm.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32]
    lib.int8_tile_gemm.argtypes = [ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32]
    lib.int4_dequant.argtypes = [ptr, ptr, ptr, i64, ptr, i32, i64, i64, i32]
    lib.int8_dequant.argtypes = [ptr, ptr, i64, ptr, i32, i64, i64, i32]
    lib.int4_dequant.restype = lib.int8_dequant.restype = None
    return lib


def to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), rounded to nearest even."""
    bits = x.astype(np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32)


def run(lib: ctypes.CDLL, kind: str, weights: list[dict], x: np.ndarray, out: np.ndarray, threads: int,
        tile: bool = False) -> None:
    m, k = x.shape
    n = out.shape[1]
    for w in weights:
        if tile and kind == "int4":
            status = lib.int4_tile_gemm(x.ctypes.data, k, w["q"].ctypes.data, w["scales"].ctypes.data,
                                        w["offsets"].ctypes.data, GROUP, out.ctypes.data, n, m, n, k, threads)
        elif tile:
            status = lib.int8_tile_gemm(x.ctypes.data, k, w["q"].ctypes.data, w["scales"].ctypes.data, GROUP,
                                        out.ctypes.data, n, m, n, k, threads)
        elif kind == "int4":
            status = lib.int4_gemv_bf16(x.ctypes.data, k, w["q"].ctypes.data, w["scales"].ctypes.data,
                                        w["offsets"].ctypes.data, GROUP, out.ctypes.data, n, m, n, k, threads)
        else:
            status = lib.int8_gemm(x.ctypes.data, 1, k, w["q"].ctypes.data, w["scales"].ctypes.data, GROUP,
                                   out.ctypes.data, n, m, n, k, threads)
        if status != 0:
            sys.exit(f"{kind} kernel returned {status} (-2: this CPU has no AVX512-BF16)")


def dequantize(lib: ctypes.CDLL, kind: str, weights: list[dict], out: np.ndarray, threads: int) -> None:
    """Each weight dequantized to bfloat16 into out [N, K] (dtype code 1)."""
    n, k = out.shape
    for w in weights:
        if kind == "int4":
            lib.int4_dequant(w["q"].ctypes.data, w["scales"].ctypes.data, w["offsets"].ctypes.data, GROUP,
                             out.ctypes.data, 1, n, k, threads)
        else:
            lib.int8_dequant(w["q"].ctypes.data, w["scales"].ctypes.data, GROUP, out.ctypes.data, 1, n, k, threads)


def tile_native(lib: ctypes.CDLL) -> str:
    """How a build's tile kernels multiply here: AMX, or AVX512-BF16 dot products."""
    amx = getattr(lib, "tokenmill_quant_tile_amx", None)
    return "AMX" if amx is not None and amx() else "AVX512-BF16"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--against", required=True, metavar="REV", help="the kernels as committed at this git revision")
    p.add_argument("--rows", default="1", help="comma-separated activation row counts M")
    kernels = p.add_mutually_exclusive_group()
    kernels.add_argument("--tile", action="store_true", help="the tile kernels (many rows) instead of the packed ones")
    kernels.add_argument("--dequant", action="store_true", help="the dequantization to bfloat16 instead (no rows)")
    p.add_argument("--threads", type=int, default=1, help="threads of each call")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    results = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
               "against": args.against, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "kernels": "dequant" if args.dequant else "tile" if args.tile else "packed", "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"now": load(Path(tmp), "now", CSRC),
                args.against: load(Path(tmp), "against", checkout_csrc(args.against, Path(tmp), SOURCES))}
        if args.tile:
            results["tile_multiply"] = {name: tile_native(lib) for name, lib in libs.items()}
            print("tile kernels multiply on:", results["tile_multiply"])
        for n, k, layers, kind in SHAPES:
            weights = make_weights(n, k, layers, kind, rng)
            nbytes = sum(a.nbytes for w in weights for a in w.values())
            for m in [0] if args.dequant else (int(r) for r in args.rows.split(",")):
                x = to_bf16(rng.standard_normal((m, k), dtype=np.float32))
                outs = {name: np.empty((n, k) if args.dequant else (m, n), dtype=np.uint16) for name in libs}
                best = {name: float("inf") for name in libs}
                for _ in range(args.repeat):
                    for name, lib in libs.items():
                        start = time.perf_counter()
                        if args.dequant:
                            dequantize(lib, kind, weights, outs[name], args.threads)
                        else:
                            run(lib, kind, weights, x, outs[name], args.threads, args.tile)
                        best[name] = min(best[name], time.perf_counter() - start)
                now, then = from_bf16(outs["now"]), from_bf16(outs[args.against])
                scale = float(np.abs(then).max()) or 1.0
                row = {"shape": f"{n}x{k}", "kind": kind, "layers": layers, "rows": m, "mb": nbytes / 1e6,
                       "now_ms": best["now"] * 1e3, "against_ms": best[args.against] * 1e3,
                       "speedup": best[args.against] / best["now"],
                       "max_rel_diff": float(np.abs(now - then).max()) / scale}
                results["rows"].append(row)
                print(f"{row['shape']} {kind} x{layers} M={m}: now {row['now_ms']:.2f} ms "
                      f"({nbytes / best['now'] / 1e9:.1f} GB/s), {args.against} {row['against_ms']:.2f} ms "
                      f"({nbytes / best[args.against] / 1e9:.1f} GB/s), {row['speedup']:.2f}x, "
                      f"max difference {row['max_rel_diff']:.1e} of the largest output", flush=True)
    print(f"\n{results['date']}, {results['machine']}, {results['kernels']} kernels, {args.threads} thread(s), "
          f"best of {args.repeat}\n")
    print(f"| shape (N x K) | weights | layers | M | MB | now ms | GB/s | {args.against} ms | GB/s | speed-up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        print(f"| {r['shape']} | {r['kind']} | {r['layers']} | {r['rows'] or '-'} | {r['mb']:.1f} | "
              f"{r['now_ms']:.2f} | {r['mb'] / r['now_ms']:.1f} | {r['against_ms']:.2f} | "
              f"{r['mb'] / r['against_ms']:.1f} | {r['speedup']:.2f}x |")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
