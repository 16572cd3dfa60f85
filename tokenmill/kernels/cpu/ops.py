"""Native CPU kernels, compiled with the system C compiler at first use and loaded with ctypes.

- paged_decode_attention: decode attention reading the paged KV cache in place (csrc/paged_decode.c);
- rms_norm, rotary_embedding_, silu_and_mul, write_kv: the fused elementwise work of a layer for bfloat16
  activations (csrc/layer_ops.c), used by the model when layer_ops_supported() says so;
- argmax: greedy sampling of a batch of logits (float32 or bfloat16) in one pass;
- int8_gemm, int8_dequant, int4_gemm, int4_dequant, int8_tile_gemm, int4_tile_gemm: weight-only quantized
  matmuls (csrc/quant.c), called through tokenmill.kernels.cpu.quant, with int4_gemv_bf16 (csrc/gemv_bf16.c:
  AVX512-BF16 dot products) for a few rows of bfloat16;
- tokenmill_decode_forward: every decoder layer of a decode step in one call, composed of the kernels above
  (csrc/decode_layer.c), driven by tokenmill.kernels.cpu.decode.

The sources live beside this file (csrc/). The shared library is cached under the tokenmill cache directory,
keyed by the sources, the compiler and the CPU's feature flags, so it builds once per machine (a few
seconds). Without a C compiler the engine falls back to the pure PyTorch path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("tokenmill")

_CSRC = Path(__file__).parent / "csrc"
# Compiled into one library; decode_layer.c composes the others (through kernels.h) into a whole decode step.
_SOURCES = [_CSRC / "paged_decode.c", _CSRC / "layer_ops.c", _CSRC / "quant.c", _CSRC / "gemv_bf16.c",
            _CSRC / "decode_layer.c"]
_HEADERS = [_CSRC / "simd.h", _CSRC / "kernels.h"]
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor()


def _cache_root() -> Path:
    from tokenmill.model.default_model import cache_dir

    return cache_dir() / "kernels"


def _library() -> ctypes.CDLL:
    """The library, for ops that only run where layer_ops_supported() (or supports()) said yes."""
    lib = load_library()
    if lib is None:
        raise RuntimeError("the CPU kernel library is not available (the log says why): use the PyTorch path")
    return lib


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with a log line saying why) when it cannot be built."""
    if os.environ.get("TOKENMILL_DISABLE_CPU_KERNELS"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: CPU decode attention uses the slower PyTorch path")
        return None
    missing = [path.name for path in _SOURCES + _HEADERS if not path.is_file()]
    if missing:
        logger.warning("the CPU kernel sources %s are missing from this install; using the PyTorch path", missing)
        return None
    source = b"".join(path.read_bytes() for path in _SOURCES + _HEADERS)
    # Reassociation lets the compiler vectorize dot products; unlike -ffast-math it does not switch the
    # whole process to flush-to-zero.
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-fassociative-math",
             "-fno-signed-zeros", "-fno-trapping-math"]
    key = hashlib.sha256(source + _cpu_flags().encode() + compiler.encode() + " ".join(flags).encode())
    target = _cache_root() / f"paged_decode-{key.hexdigest()[:16]}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            built = Path(tmp) / target.name
            result = subprocess.run([compiler, *flags, *map(str, _SOURCES), "-o", str(built), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                logger.warning("building the CPU attention kernel failed; using the PyTorch path:\n%s",
                               result.stderr[-2000:])
                return None
            os.replace(built, target)  # atomic: concurrent builders never see a half-written library
    lib = ctypes.CDLL(str(target))
    fn = lib.paged_decode_attention
    fn.restype = None
    argtypes: list[Any] = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6 + [ctypes.c_int64, ctypes.c_float]
    fn.argtypes = argtypes + [ctypes.c_int] * 4
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    signatures: dict[str, list[Any]] = {
        "rms_norm_bf16": [ptr, i64, ptr, i64, ptr, ptr, i64, i32, i32, ctypes.c_float, i32],
        "rotary_bf16": [ptr, i64, i32, ptr, i64, i32, i32, i32, ptr, ptr, ptr, i32],
        "silu_and_mul_bf16": [ptr, i64, ptr, i64, i32, i32, i32],
        "write_kv": [ptr, i64, ptr, i64, ptr, i64, ptr, i32, i64, i32],
        "argmax_rows": [ptr, i32, i64, i32, i32, ptr, i32],
        "tokenmill_layer_ops_vectorized": [],
        "int8_gemm": [ptr, i32, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32],
        "int8_dequant": [ptr, ptr, i64, ptr, i32, i64, i64, i32],
        "int4_gemm": [ptr, i32, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32],
        "int4_dequant": [ptr, ptr, ptr, i64, ptr, i32, i64, i64, i32],
        "tokenmill_decode_forward": [ptr, ptr, ptr, i32, ptr, ptr, ptr, i64, i32, ptr, i32, ptr, i32, i32, ptr],
        "int4_gemv_bf16": [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32],
        "tokenmill_quant_tile_vectorized": [],
        "tokenmill_quant_tile_amx": [],
        "tokenmill_quant_use_amx": [i32],
        "int8_tile_gemm": [ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32],
        "int4_tile_gemm": [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32],
        "tokenmill_quant_tile_f32_vectorized": [],
        "int8_tile_gemm_f32": [ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32],
        "int4_tile_gemm_f32": [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32],
    }
    for name, argtypes in signatures.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = (ctypes.c_int if name.startswith("tokenmill_") or name.endswith(("_gemm", "_gemm_f32", "_gemv_bf16"))
                                      else None)
    return lib


def supports(dtype: torch.dtype) -> bool:
    return dtype in _DTYPE_CODES and load_library() is not None


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    num_threads: int | None = None,
    out: torch.Tensor | None = None,
    allow_split: bool = True,
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged keys/values.

    q: [num_seqs, num_heads, head_dim]; kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim];
    block_tables: [num_seqs, max_blocks] int32; seq_lens: [num_seqs] int32 (including the new token).
    Returns [num_seqs, num_heads, head_dim] in q's dtype, written into `out` when given (a contiguous tensor of
    that shape and dtype, e.g. a row slice of the layer's output). allow_split=False never splits a sequence's
    positions across threads (flash-decoding), so each row's result does not depend on how many rows there are.
    """
    lib = load_library()
    if lib is None:
        raise RuntimeError("the CPU attention kernel is not available")
    if q.dtype != kv_cache.dtype or q.dtype not in _DTYPE_CODES:
        raise ValueError(f"unsupported dtypes q={q.dtype}, kv_cache={kv_cache.dtype}")
    q = q.contiguous()
    block_tables = block_tables.to(torch.int32).contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    if not kv_cache.is_contiguous():
        raise ValueError("kv_cache must be contiguous")
    num_seqs, num_heads, head_dim = q.shape
    _, num_blocks, block_size, num_kv_heads, _ = kv_cache.shape
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {q.dtype} tensor of shape {tuple(q.shape)}")
    lib.paged_decode_attention(
        q.data_ptr(), kv_cache.data_ptr(), out.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(),
        num_seqs, num_heads, num_kv_heads, head_dim, block_size, block_tables.shape[1],
        num_blocks, float(scale), int(sliding_window or 0), _DTYPE_CODES[q.dtype],
        num_threads or torch.get_num_threads(), int(allow_split),
    )
    return out


# ---- fused layer ops (bfloat16) ----------------------------------------------------------------------------


@functools.cache
def layer_ops_supported() -> bool:
    """Whether the fused bfloat16 layer ops are built and vectorized on this CPU (else PyTorch is as fast)."""
    lib = load_library()
    return lib is not None and bool(lib.tokenmill_layer_ops_vectorized())


# Elements below which an elementwise layer op runs on one thread (a decode step of a small model): waking the
# other threads costs more than the work, and much more on a CPU shared with other busy processes.
_MIN_PARALLEL_ELEMENTS = 1 << 16


def _threads(num_elements: int) -> int:
    return 1 if num_elements < _MIN_PARALLEL_ELEMENTS else torch.get_num_threads()


def _rows(x: torch.Tensor, name: str) -> tuple[int, int]:
    """(rows, row stride) of a 2-D bfloat16 CPU view whose rows are contiguous inside."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name} must be a 2-D bfloat16 CPU tensor with contiguous rows, got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()}")
    return x.shape[0], x.stride(0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """weight * (s / rms(s)) for x [num_tokens, hidden], s = x or, with residual, residual <- x + residual
    (in place) and s the sum. Returns a new tensor."""
    n, x_stride = _rows(x, "x")
    r_stride = _rows(residual, "residual")[1] if residual is not None else 0
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    weight = weight.to(torch.bfloat16).contiguous()
    out = torch.empty(x.shape, dtype=x.dtype)
    _library().rms_norm_bf16(x.data_ptr(), x_stride, residual.data_ptr() if residual is not None else None,
                                 r_stride, weight.data_ptr(), out.data_ptr(), out.stride(0), n, x.shape[1],
                                 float(eps), _threads(x.numel()))
    return out


def rotary_embedding_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor) -> None:
    """Rotate-half RoPE in place on q [num_tokens, num_heads, head_dim] and k [num_tokens, num_kv_heads,
    head_dim] (views with contiguous heads, e.g. into the fused qkv projection); cos/sin [max_pos, head_dim / 2]
    float32."""
    head_dim = q.shape[-1]
    for name, t in (("q", q), ("k", k)):
        if t.dtype != torch.bfloat16 or t.dim() != 3 or t.stride(2) != 1 or t.stride(1) != head_dim:
            raise ValueError(f"{name} must be a bfloat16 [tokens, heads, head_dim] view with contiguous heads")
    positions = positions.to(torch.int64).contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    _library().rotary_bf16(q.data_ptr(), q.stride(0), q.shape[1], k.data_ptr(), k.stride(0), k.shape[1],
                               q.shape[0], head_dim, positions.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                               _threads(q.numel() + k.numel()))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up [num_tokens, 2 * intermediate] (gate first, as the fused projection)."""
    n, stride = _rows(gate_up, "gate_up")
    inter = gate_up.shape[1] // 2
    out = torch.empty((n, inter), dtype=gate_up.dtype)
    _library().silu_and_mul_bf16(gate_up.data_ptr(), stride, out.data_ptr(), out.stride(0), n, inter,
                                     _threads(gate_up.numel()))
    return out


def write_kv(key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store key/value [num_tokens, num_kv_heads, head_dim] (views with contiguous rows) at slot_mapping in
    kv_cache [2, num_blocks, block_size, num_kv_heads, head_dim]; slots < 0 are skipped."""
    if not kv_cache.is_contiguous() or key.dtype != kv_cache.dtype or value.dtype != kv_cache.dtype:
        raise ValueError("kv_cache must be contiguous and share key/value's dtype")
    row = kv_cache.shape[3] * kv_cache.shape[4]
    for name, t in (("key", key), ("value", value)):
        if t.shape[1] * t.shape[2] != row or t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"{name} must be [tokens, num_kv_heads, head_dim] with contiguous rows")
    slots = slot_mapping.to(torch.int64).contiguous()
    item = kv_cache.element_size()
    _library().write_kv(key.data_ptr(), key.stride(0) * item, value.data_ptr(), value.stride(0) * item,
                            kv_cache.data_ptr(), kv_cache[0].numel() * item, slots.data_ptr(),
                            key.shape[0], row * item, _threads(2 * key.numel()))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """torch.argmax(logits, dim=-1) for [rows, vocab] float32 or bfloat16 CPU logits (the first index of the
    largest value; a NaN counts as largest), about 10x faster than torch's on CPU."""
    lib = load_library()
    if (lib is None or logits.device.type != "cpu" or logits.dim() != 2 or logits.stride(1) != 1
            or logits.dtype not in _DTYPE_CODES):
        return logits.argmax(dim=-1)
    out = torch.empty(logits.shape[0], dtype=torch.long)
    lib.argmax_rows(logits.data_ptr(), _DTYPE_CODES[logits.dtype], logits.stride(0), logits.shape[0], logits.shape[1],
                    out.data_ptr(), torch.get_num_threads())
    return out
