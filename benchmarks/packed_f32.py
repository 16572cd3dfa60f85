"""The packed int4 / int8 kernels with float32 activations: their AVX2 paths against the portable loops, side by
side in one run.

    python benchmarks/packed_f32.py                       # SmolLM2-135M's decoder and output-layer shapes, M = 1
    python benchmarks/packed_f32.py --rows 1,2,4 --threads 1 --json packed_f32.json

On CPUs without native bf16 (x86-64-v3: AVX2, FMA, F16C) --dtype auto runs the engine in float32, and a decode
step's projections are csrc/quant.c's int4_gemm / int8_gemm on float32 rows. This builds quant.c twice with the
engine's compiler flags: as the engine builds it, and with the AVX2 paths compiled out (-U__F16C__, so the
portable loops run, auto-vectorized for this CPU as before those paths existed). Both run the same weights
(random, in the engine's packed layouts: int4 nibbles with float16 scales and offsets per group of 32, int8 with
float32 scales per group of 32 as GGUF Q8_0) and inputs, alternating, best of --repeat; the outputs are compared.
Reported: ms per pass over every layer's weights of each shape, the weight bytes streamed per second, and the
speed-up.

    python benchmarks/packed_f32.py --against HEAD~1     # also quant.c as of a git revision, side by side

--against REV adds a third build: quant.c with its headers as committed at REV (git show), to measure a kernel
change against what it replaces in one run (with --many-rows: REV's float32 tile kernels, where it has them).

    python benchmarks/packed_f32.py --many-rows 8,64,256,512      # the kernel choice above the packed rows

--many-rows: for more rows than the packed kernels take, the engine's own Int4Weight / Int8Weight (the library
as the engine builds it) per shape and row count: through the float32 tile kernels (int8_tile_gemm_f32,
int4_tile_gemm_f32) and through dequantize + oneDNN's float32 GEMM, and the dense float32 weight (F.linear) for
reference: the crossovers tokenmill/kernels/cpu/quant.py uses (INT8_MAX_TILE_ROWS_F32, INT4_MAX_TILE_ROWS_F32).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
CSRC = REPO_ROOT / "tokenmill" / "kernels" / "cpu" / "csrc"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-fassociative-math",
         "-fno-signed-zeros", "-fno-trapping-math"]
# SmolLM2-135M: (N, K, layers, kind): fused qkv, o, fused gate_up, down (int4, Q4_1), the tied output layer (Q8_0).
SHAPES = [(960, 576, 30, "int4"), (576, 576, 30, "int4"), (3072, 576, 30, "int4"), (576, 1536, 30, "int4"),
          (49152, 576, 1, "int8")]
GROUP = 32


def build(tmp: Path, name: str, extra: list[str], csrc: Path = CSRC, sources: tuple[str, ...] = ("quant.c",)
          ) -> ctypes.CDLL:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        sys.exit("no C compiler found")
    out = tmp / f"{name}.so"
    subprocess.run([compiler, *FLAGS, *extra, *(str(csrc / s) for s in sources), "-o", str(out), "-lm"],
                   check=True)
    lib = ctypes.CDLL(str(out))
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.int4_gemm.argtypes = [ptr, i32, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32]
    lib.int8_gemm.argtypes = [ptr, i32, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32]
    return lib


def make_weights(n: int, k: int, layers: int, kind: str, rng: np.random.Generator) -> list[dict]:
    weights = []
    for _ in range(layers):
        if kind == "int4":
            weights.append({"q": rng.integers(0, 256, (n, k // 2), dtype=np.uint8),
                            "scales": (rng.random((n, k // GROUP), dtype=np.float32) * 0.02).astype(np.float16),
                            "offsets": (rng.random((n, k // GROUP), dtype=np.float32) * -0.1).astype(np.float16)})
        else:
            weights.append({"q": rng.integers(-127, 128, (n, k), dtype=np.int8),
                            "scales": rng.random((n, k // GROUP), dtype=np.float32) * 0.01})
    return weights


def checkout_csrc(rev: str, tmp: Path, sources: tuple[str, ...] = ("quant.c",)) -> Path:
    """The kernel sources (with their headers) as committed at rev, in a folder of tmp."""
    folder = tmp / "csrc-at-rev"
    folder.mkdir()
    relative = CSRC.relative_to(REPO_ROOT)
    for name in (*sources, "kernels.h", "simd.h"):
        text = subprocess.run(["git", "-C", str(REPO_ROOT), "show", f"{rev}:{relative / name}"], check=True,
                              capture_output=True, text=True).stdout
        (folder / name).write_text(text)
    return folder


def run(lib: ctypes.CDLL, kind: str, weights: list[dict], x: np.ndarray, out: np.ndarray, threads: int) -> None:
    m, k = x.shape
    n = out.shape[1]
    for w in weights:
        if kind == "int4":
            lib.int4_gemm(x.ctypes.data, 0, k, w["q"].ctypes.data, w["scales"].ctypes.data, w["offsets"].ctypes.data,
                          GROUP, out.ctypes.data, n, m, n, k, threads)
        else:
            lib.int8_gemm(x.ctypes.data, 0, k, w["q"].ctypes.data, w["scales"].ctypes.data, GROUP, out.ctypes.data,
                          n, m, n, k, threads)


def tile_at_rev(lib: ctypes.CDLL, weight, x, out, threads: int) -> None:
    """weight's float32 tile kernel as built from another revision's quant.c (lib), on x into out."""
    m, k = x.shape
    n = out.shape[1]
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    if hasattr(weight, "packed"):  # int4: q, scales, offsets
        lib.int4_tile_gemm_f32.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32]
        lib.int4_tile_gemm_f32(x.data_ptr(), k, weight.packed.data_ptr(), weight.scales.data_ptr(),
                               weight.offsets.data_ptr(), weight.group, out.data_ptr(), n, m, n, k, threads)
    else:
        lib.int8_tile_gemm_f32.argtypes = [ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32]
        lib.int8_tile_gemm_f32(x.data_ptr(), k, weight.q.data_ptr(), weight.scales.data_ptr(), weight.group,
                               out.data_ptr(), n, m, n, k, threads)


def many_rows(rows: list[int], repeat: int, threads: int, against: ctypes.CDLL | None = None) -> list[dict]:
    """ms per call of the engine's kernels for more rows than the packed kernels take (float32 activations); with
    against (quant.c built from another revision), its tile kernel on the same weights too, where it has one."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO_ROOT))
    from tokenmill.kernels.cpu.quant import pack_int4, pack_int8

    torch.set_num_threads(threads)
    torch.manual_seed(0)

    def best_ms(fn) -> float:
        fn()
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best * 1e3

    out = []
    for n, k, _, kind in SHAPES:
        if kind == "int4":
            weight = pack_int4(torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.rand(n, k // GROUP) * 0.02,
                               None, GROUP, bias=torch.rand(n, k // GROUP) * -0.1)
        else:
            weight = pack_int8(torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, k // GROUP) * 0.01,
                               GROUP)
        dense = weight.dequantize(torch.float32)
        for m in rows:
            x = torch.randn(m, k)
            row = {"shape": f"{n}x{k}", "kind": kind, "rows": m,
                   "dequant_gemm_ms": best_ms(lambda x=x, w=weight: F.linear(x, w.dequantize(torch.float32))),
                   "dense_f32_ms": best_ms(lambda x=x, d=dense: F.linear(x, d))}
            result = torch.empty(m, n)
            row["tile_ms"] = best_ms(lambda x=x, w=weight, r=result, m=m: w._tile_gemm(x, r, m, threads))
            if against is not None and hasattr(against, f"{kind}_tile_gemm_f32"):
                row["tile_against_ms"] = best_ms(lambda x=x, w=weight, r=result: tile_at_rev(against, w, x, r, threads))
            out.append(row)
            tile = f"tile {row['tile_ms']:.2f} ms, " if "tile_ms" in row else ""
            if "tile_against_ms" in row:
                tile += f"tile at the other revision {row['tile_against_ms']:.2f} ms, "
            print(f"{row['shape']} {kind} M={m}: {tile}dequantize + GEMM {row['dequant_gemm_ms']:.2f} ms, dense "
                  f"float32 {row['dense_f32_ms']:.2f} ms", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1", help="comma-separated activation row counts M")
    p.add_argument("--threads", type=int, default=1, help="threads of each call (the engine's decode step: 1)")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--many-rows", default=None,
                   help="comma-separated row counts: the kernel choice above the packed rows instead (2 threads)")
    p.add_argument("--against", default=None, metavar="REV", help="also quant.c as committed at this git revision")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)
    if args.many_rows:
        with tempfile.TemporaryDirectory() as tmp:
            against = (build(Path(tmp), "against", [], checkout_csrc(args.against, Path(tmp)))
                       if args.against else None)
            rows = many_rows([int(r) for r in args.many_rows.split(",")], args.repeat, max(args.threads, 2), against)
        extra = f" tile at {args.against} ms |" if args.against else ""
        print(f"\n| shape (N x K) | weights | M | tile ms |{extra} dequantize + GEMM ms | dense float32 ms |")
        print("|---|---|---:|---:|" + ("---:|" if args.against else "") + "---:|---:|")
        for r in rows:
            cells = f" {r['tile_ms']:.2f} |"
            if args.against:
                cells += f" {r['tile_against_ms']:.2f} |" if "tile_against_ms" in r else " - |"
            print(f"| {r['shape']} | {r['kind']} | {r['rows']} |{cells} {r['dequant_gemm_ms']:.2f} | "
                  f"{r['dense_f32_ms']:.2f} |")
        if args.json_path:
            Path(args.json_path).write_text(json.dumps({"many_rows": rows}, indent=2))
        return
    rng = np.random.default_rng(0)
    results = {"machine": platform.processor() or platform.machine(), "threads": args.threads,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        libs = {"avx2": build(Path(tmp), "avx2", []), "portable": build(Path(tmp), "portable", ["-U__F16C__"])}
        if args.against:
            libs[args.against] = build(Path(tmp), "against", [], checkout_csrc(args.against, Path(tmp)))
        for n, k, layers, kind in SHAPES:
            weights = make_weights(n, k, layers, kind, rng)
            nbytes = sum(a.nbytes for w in weights for a in w.values())
            for m in (int(r) for r in args.rows.split(",")):
                x = rng.standard_normal((m, k), dtype=np.float32)
                outs = {name: np.empty((m, n), dtype=np.float32) for name in libs}
                best = {name: float("inf") for name in libs}
                for _ in range(args.repeat):
                    for name, lib in libs.items():
                        start = time.perf_counter()
                        run(lib, kind, weights, x, outs[name], args.threads)
                        best[name] = min(best[name], time.perf_counter() - start)
                scale = float(np.abs(outs["portable"]).max()) or 1.0
                row = {"shape": f"{n}x{k}", "kind": kind, "layers": layers, "rows": m, "mb": nbytes / 1e6,
                       "avx2_ms": best["avx2"] * 1e3, "portable_ms": best["portable"] * 1e3,
                       "speedup": best["portable"] / best["avx2"],
                       "max_rel_diff": float(np.abs(outs["avx2"] - outs["portable"]).max()) / scale}
                against = ""
                if args.against:
                    row["against_ms"] = best[args.against] * 1e3
                    row["speedup_against"] = best[args.against] / best["avx2"]
                    against = f", {args.against} {row['against_ms']:.2f} ms ({row['speedup_against']:.2f}x)"
                results["rows"].append(row)
                print(f"{row['shape']} {kind} x{layers} M={m}: AVX2 {row['avx2_ms']:.2f} ms "
                      f"({nbytes / best['avx2'] / 1e9:.1f} GB/s), portable {row['portable_ms']:.2f} ms "
                      f"({nbytes / best['portable'] / 1e9:.1f} GB/s), {row['speedup']:.2f}x{against}", flush=True)
    print(f"\n{results['date']}, {results['machine']}, {args.threads} thread(s), best of {args.repeat}\n")
    extra = f" {args.against} ms | speed-up over {args.against} |" if args.against else ""
    print(f"| shape (N x K) | weights | layers | M | MB | AVX2 ms | GB/s | portable ms | GB/s | speed-up |{extra}")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if args.against else ""))
    for r in results["rows"]:
        cells = f" {r['against_ms']:.2f} | {r['speedup_against']:.2f}x |" if args.against else ""
        print(f"| {r['shape']} | {r['kind']} | {r['layers']} | {r['rows']} | {r['mb']:.1f} | {r['avx2_ms']:.2f} | "
              f"{r['mb'] / r['avx2_ms']:.1f} | {r['portable_ms']:.2f} | {r['mb'] / r['portable_ms']:.1f} | "
              f"{r['speedup']:.2f}x |{cells}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
