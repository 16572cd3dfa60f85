"""Native CPU kernels, compiled with the system C compiler at first use and loaded with ctypes.

The source lives beside this file (csrc/). The shared library is cached under the tokenmill cache directory,
keyed by the source, the compiler and the CPU's feature flags, so it builds once per machine (about a
second). Without a C compiler the engine falls back to the pure PyTorch attention path.
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

import torch

logger = logging.getLogger("tokenmill")

_SOURCE = Path(__file__).parent / "csrc" / "paged_decode.c"
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


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel library, or None (with a log line saying why) when it cannot be built."""
    if os.environ.get("TOKENMILL_DISABLE_CPU_KERNELS"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: CPU decode attention uses the slower PyTorch path")
        return None
    source = _SOURCE.read_bytes()
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
            result = subprocess.run([compiler, *flags, str(_SOURCE), "-o", str(built), "-lm"],
                                    capture_output=True, text=True)
            if result.returncode != 0:
                logger.warning("building the CPU attention kernel failed; using the PyTorch path:\n%s",
                               result.stderr[-2000:])
                return None
            os.replace(built, target)  # atomic: concurrent builders never see a half-written library
    lib = ctypes.CDLL(str(target))
    fn = lib.paged_decode_attention
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 6 + [ctypes.c_int64, ctypes.c_float] + [ctypes.c_int] * 3
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
) -> torch.Tensor:
    """Attention of one new token per sequence over its paged keys/values.

    q: [num_seqs, num_heads, head_dim]; kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim];
    block_tables: [num_seqs, max_blocks] int32; seq_lens: [num_seqs] int32 (including the new token).
    Returns [num_seqs, num_heads, head_dim] in q's dtype.
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
    out = torch.empty_like(q)
    lib.paged_decode_attention(
        q.data_ptr(), kv_cache.data_ptr(), out.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(),
        num_seqs, num_heads, num_kv_heads, head_dim, block_size, block_tables.shape[1],
        num_blocks, float(scale), int(sliding_window or 0), _DTYPE_CODES[q.dtype],
        num_threads or torch.get_num_threads(),
    )
    return out
