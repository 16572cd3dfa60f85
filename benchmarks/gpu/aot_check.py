"""Compile the Triton kernels for Hopper (sm_90) on a machine without a GPU and report registers, spills and
the instructions that matter: what the interpreter cannot check (tl.dot shapes, layouts, register pressure).

    python benchmarks/gpu/aot_check.py        # about 30 s on 2 CPU cores; needs triton's bundled ptxas

Arguments get the 16-byte divisibility a real launch infers for aligned pointers and strides, so the code is
the code the GPU runs: expect LDGSTS (cp.async) loads in the attention kernels, HMMA in decode, HGMMA (wgmma)
in prefill, and no local memory (STACK 0, no LDL/STL).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tokenmill.attention.triton import layer_ops as lo  # noqa: E402
from tokenmill.attention.triton import paged_attention as pa  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
OPS = ("LDGSTS", "LDG.E.128", "HMMA", "HGMMA", "LDL", "STL")
STRIDES = {"stride_q_tok", "stride_q_head", "stride_o_tok", "stride_o_head", "stride_c_kv", "stride_c_block",
           "stride_c_slot", "stride_c_head", "stride_k_tok", "stride_k_head", "stride_v_tok", "stride_v_head",
           "head_dim", "stride_x", "stride_r", "stride_o", "stride_table", "hidden", "inter"}


def compile_report(name: str, fn, types: dict[str, str], consts: dict, num_warps: int = 4) -> dict:
    signature = {n: types.get(n, "i32") for n in fn.arg_names}
    signature.update({c: "constexpr" for c in consts})
    aligned = [n for n in fn.arg_names if types.get(n, "").startswith("*") or n in STRIDES]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    kernel = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps})
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([CUOBJDUMP, "--dump-sass", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    line = next((entry.strip() for entry in usage.splitlines() if "REG:" in entry), "")
    fields = dict(part.split(":") for part in line.split() if ":" in part)
    report = {"kernel": name, "regs": int(fields.get("REG", -1)), "stack": int(fields.get("STACK", -1)),
              "shared": kernel.metadata.shared, **{op: sass.count(op) for op in OPS}}
    print("  ".join(f"{k}={v}" for k, v in report.items()), flush=True)
    return report


def main() -> None:
    bf16 = "*bf16"
    decode_types = {"q_ptr": bf16, "cache_ptr": bf16, "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
                    "rows_ptr": "*i64", "out_ptr": bf16, "part_out_ptr": "*fp32", "part_max_ptr": "*fp32",
                    "part_sum_ptr": "*fp32", "scale_log2": "fp32"}
    prefill_types = {"q_ptr": bf16, "cache_ptr": bf16, "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32",
                     "query_start_loc_ptr": "*i32", "work_ptr": "*i32", "out_ptr": bf16, "scale_log2": "fp32"}
    reports = [
        compile_report("decode d128 (llama-8b)", pa._paged_decode_kernel, decode_types, dict(
            BLOCK_SIZE=16, GROUP_PAD=16, DIM_PAD=128, TILE_N=64, NUM_SPLITS=1, SLIDING=False, DOT_F32=False)),
        compile_report("decode d64 split 8", pa._paged_decode_kernel, decode_types, dict(
            BLOCK_SIZE=16, GROUP_PAD=16, DIM_PAD=64, TILE_N=64, NUM_SPLITS=8, SLIDING=False, DOT_F32=False)),
        compile_report("prefill d128 group 4", pa._paged_prefill_kernel, prefill_types, dict(
            BLOCK_SIZE=16, BLOCK_Q=16, GROUP_PAD=4, DIM_PAD=128, TILE_N=64, SLIDING=False, DOT_F32=False)),
        compile_report("reshape_and_cache", pa._reshape_and_cache_kernel,
                       {"key_ptr": bf16, "value_ptr": bf16, "cache_ptr": bf16, "slot_mapping_ptr": "*i64"},
                       dict(BLOCK_SIZE=16, HEADS_PAD=8, DIM_PAD=128)),
        compile_report("rms_norm 4096 + residual", lo._rms_norm_kernel,
                       {"x_ptr": bf16, "residual_ptr": bf16, "weight_ptr": bf16, "out_ptr": bf16, "eps": "fp32"},
                       dict(HAS_RESIDUAL=True, BLOCK=4096), num_warps=16),
        compile_report("rotary 32 heads d128", lo._rotary_kernel,
                       {"q_ptr": bf16, "k_ptr": bf16, "positions_ptr": "*i64", "cos_ptr": "*fp32", "sin_ptr": "*fp32"},
                       dict(HEADS_PAD=32, HALF_PAD=64)),
        compile_report("silu_and_mul", lo._silu_and_mul_kernel, {"x_ptr": bf16, "out_ptr": bf16}, dict(BLOCK=2048)),
    ]
    spilled = [r["kernel"] for r in reports if r["stack"] > 0 or r["LDL"] or r["STL"]]
    print("local memory (spills) in:", ", ".join(spilled) if spilled else "none")


if __name__ == "__main__":
    main()
