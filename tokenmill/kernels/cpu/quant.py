"""Weight-only quantized linear kernels for the CPU: int8 (W8A16) and int4 (W4A16) weights, bf16/f32 activations.

Conventions (every quantization method maps its checkpoint to one of these):
- int8: ``w[n, k] = scales[n, k // group] * q[n, k]`` with q int8 [N, K] and float32 scales [N, K / group]
  (per-channel: group = K). Symmetric only: an int8 format with zero points is rejected by its method.
- int4: ``w[n, k] = (q[n, k] - zeros[n, k // group]) * scales[n, k // group]`` with q in 0..15 (uint8 [N, K]),
  scales [N, K / group] and zeros [N, K / group] (float or integer; None means 8, the symmetric case); or, for
  formats that store a minimum instead of a zero point (GGUF Q4_1, Q4_K), ``w = q * scales + bias`` with
  bias [N, K / group]. Groups of 32, 64, 128 or 256 along K. Stored as q * scale + offset with float16 scales
  and offsets (offset = -zeros * scales, or bias).

Which kernel runs depends on the number of activation rows M, chosen per call (kernel_for) from thresholds measured
on this CPU (benchmarks/quant_kernels.py, BENCHMARKS.md):
- M <= max_packed_rows (batch-1 decode; set per weight shape at construction): the packed kernels of csrc/quant.c
  (int4_gemm, int8_gemm) stream the quantized bytes once and keep the activations in float32 (AVX512, or AVX2 + FMA
  on x86-64-v3 CPUs, 3-6x the portable loops there); for int4 weights and
  up to INT4_MAX_PACKED_ROWS bfloat16 rows, csrc/gemv_bf16.c's int4_gemv_bf16 does the same sums with AVX512-VNNI
  integer dot products on 16-bit fixed-point activations (each chunk of 32 under a power-of-two scale: exact within
  2^7 of the chunk's largest input, smaller ones rounded at 2^-16 of it; 1.5-2.9x int4_gemm at one row);
- larger M with bfloat16 activations (decode batches, prefill) up to max_tile_rows: the tile kernels
  (int4_tile_gemm, int8_tile_gemm) unpack a few output columns at a time into a bfloat16 tile of the quantized
  values (exact) that stays in the core's cache, multiply it against every row (from 3 rows where the CPU has AMX:
  16 columns as the A operand of AMX tile multiplies; else 32 columns against AVX512-BF16 dot products) and apply
  the group scales and offsets to the float32 sums: the weight's bytes are read once, and no bfloat16 copy of the
  whole weight is written;
- float32 activations with AVX2 (the CPUs where --dtype auto picks float32), above max_packed_rows: the float32
  tile kernels (int8_tile_gemm_f32, int4_tile_gemm_f32: 16 columns unpacked to an exact float32 tile, 6 rows x 16
  columns of multiply-adds in registers) up to max_tile_rows_f32 rows;
- above those, or a CPU (library build) without AVX512-BF16 / AVX2: the weight is dequantized to the activation
  dtype, then one dense matmul (oneDNN).
The packed and tile kernels multiply by the exact weight; dequantize + GEMM rounds it to bfloat16 (for bfloat16
activations), which moved the bundled Q4_1 model's first answer token on a near-tie ("The" -> "L'Étoile").

Precision kept: int8 scales are float32, so GGUF Q8_0 / Q6_K weights are exact. int4 scales and offsets are
float16: GGUF Q4_0 / Q4_1 (float16 in the file) are exact; Q4_K's products d * sc and dmin * m are rounded to
float16 (11 significant bits). (torch's _weight_int4pack_mm_for_cpu was measured too: it needs its scales in
the activation dtype, and bfloat16 scales, 8 bits, changed the bundled model's answers.)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from tokenmill.kernels.cpu import ops

INT4_GROUP_SIZES = (32, 64, 128, 256)
# Rows up to which the packed kernels run rather than the tile kernel on this CPU (AVX512-BF16 and VNNI, no AMX),
# measured by benchmarks/quant_kernels.py on the bundled model's shapes (BENCHMARKS.md, "Tile kernels for many
# rows" and "Integer dot products in the int4 GEMV"): 8 for int4 projections (int4_gemv_bf16's integer dot
# products beat the tile kernel at 6 and 8 rows on every decoder shape and the output layer's, 1.1-1.6x, and at
# 12 on most; the float32 AVX2 packed kernel beat the float32 tile kernel 1.1-1.2x at 5-8 rows); 1 for int8
# projections (from 2 rows the tile kernel is as fast or faster); 2 for int8 weights of LARGE_WEIGHT elements or
# more (the output layer), where unpacking the whole weight into tiles outweighs the faster multiply for a few
# rows (it wins from 4). Chosen once per weight. The fused decode step takes as many rows as every one of its
# layers' packed kernels (the same sums as the op-by-op path). Above: the tile kernel for bfloat16 activations up to
# MAX_TILE_ROWS (decode batches, short prompts): faster than dequantize + oneDNN GEMM from 2 to 512 rows summed over
# the decoder's shapes, slower from 1024 (long prefill chunks), where the dequantization is spread over enough rows
# and oneDNN's larger register blocks win. Where the tile kernels multiply on AMX, oneDNN's bfloat16 GEMM runs on AMX
# too, and dequantize + GEMM wins sooner: MAX_TILE_ROWS_AMX (measured on a 2-core Sapphire Rapids class VM,
# benchmarks/quant_kernels.py --layers 30, BENCHMARKS.md "On a CPU with AMX, continued" and "the weight as the A
# operand": at 512 rows dequantize + GEMM won on every shape; at 256 and below the tile kernel did).
INT4_MAX_PACKED_ROWS = 8
INT8_MAX_PACKED_ROWS = 1
LARGE_WEIGHT = 1 << 23
LARGE_WEIGHT_MAX_PACKED_ROWS = 2
MAX_TILE_ROWS = 512
MAX_TILE_ROWS_AMX = 256
# float32 activations (--dtype auto on CPUs without native bf16): rows up to which the AVX2 float32 tile kernels
# (int8_tile_gemm_f32, int4_tile_gemm_f32) beat dequantize (int8_dequant, int4_dequant) + oneDNN's float32 GEMM,
# measured on a 2-core AVX2 EPYC (benchmarks/packed_f32.py --many-rows; BENCHMARKS.md, "On a CPU without native
# bf16"): every decoder shape and the output layer from 16 to 1024 rows (the output layer 2.3-6.9x, the decoder's
# int4 projections 1.0-3.8x, and faster than the dense float32 weight in most cases: the tile stays in cache);
# at 2048 rows the down projection (K = 1536) lost 0.7x, its activations no longer in cache for each tile.
INT8_MAX_TILE_ROWS_F32 = 1024
INT4_MAX_TILE_ROWS_F32 = 1024
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}
# Multiply-adds below which a packed matmul runs on one thread: waking a second one costs more than it saves
# (measured on the bundled model's layers, 2 cores; a busy machine makes the wake-up slower still).
_MIN_PARALLEL_WORK = 1 << 22


def _threads(m: int, n: int, k: int) -> int:
    return 1 if m * n * k < _MIN_PARALLEL_WORK else torch.get_num_threads()


@functools.cache
def _native() -> bool:
    return ops.load_library() is not None


@functools.cache
def _tile_native() -> bool:
    """Whether the tile kernels are built with AVX512-BF16 here (else dequantize + GEMM serves every M > packed)."""
    lib = ops.load_library()
    return lib is not None and bool(lib.tokenmill_quant_tile_vectorized())


@functools.cache
def _tile_amx() -> bool:
    """Whether the tile kernels multiply on AMX here (built with it, and the kernel grants this process the tiles)."""
    lib = ops.load_library()
    return lib is not None and bool(lib.tokenmill_quant_tile_amx())  # 0 in builds without the tile kernels


def _max_tile_rows() -> int:
    return MAX_TILE_ROWS_AMX if _tile_amx() else MAX_TILE_ROWS


@functools.cache
def _tile_f32_native() -> bool:
    """Whether the float32 tile kernels are built with AVX2 + FMA here."""
    lib = ops.load_library()
    return lib is not None and bool(lib.tokenmill_quant_tile_f32_vectorized())


class _QuantizedWeight:
    """What Int8Weight and Int4Weight share: the choice per call between the packed kernel (up to
    max_packed_rows activation rows), the tile kernel (bfloat16, up to max_tile_rows) and dequantize + dense GEMM."""

    in_features: int
    out_features: int
    max_packed_rows: int
    max_tile_rows: int
    max_tile_rows_f32: int
    kernel_name: str

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        raise NotImplementedError

    def _packed_gemm(self, x2: torch.Tensor, out: torch.Tensor, m: int, threads: int) -> int:
        """Run the native packed kernel on x2 [m, K] (contiguous rows) into out [m, N]; its status (0: done)."""
        raise NotImplementedError

    def _tile_gemm(self, x2: torch.Tensor, out: torch.Tensor, m: int, threads: int) -> int:
        """Run the native tile kernel on x2 [m, K] (bfloat16, or float32 where the AVX2 tile kernels are built;
        contiguous rows) into out [m, N]; its status."""
        raise NotImplementedError

    def kernel_for(self, m: int, dtype: torch.dtype) -> str:
        """Which kernel multiplies m activation rows of dtype (on the CPU): "packed", "tile" or "dequant"."""
        if dtype not in _DTYPE_CODES or not _native():
            return "dequant"
        if m <= self.max_packed_rows:
            return "packed"
        if m <= self.max_tile_rows and dtype == torch.bfloat16 and _tile_native():
            return "tile"
        if m <= self.max_tile_rows_f32 and dtype == torch.float32 and _tile_f32_native():
            return "tile"
        return "dequant"

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] @ w.T -> [..., N] in x's dtype."""
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        kernel = self.kernel_for(m, x2.dtype) if x2.device.type == "cpu" else "dequant"
        if kernel == "dequant":
            return F.linear(x2, self.dequantize(x2.dtype)).view(*x.shape[:-1], self.out_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = torch.empty((m, self.out_features), dtype=x2.dtype)
        run = self._packed_gemm if kernel == "packed" else self._tile_gemm
        if run(x2, out, m, _threads(m, self.out_features, self.in_features)) != 0:
            raise MemoryError(f"{self.kernel_name} ({kernel}) could not allocate its buffers for {m} x "
                              f"{self.in_features} activations")
        return out.view(*x.shape[:-1], self.out_features)


class Int8Weight(_QuantizedWeight):
    """An int8 weight with group scales, ready for matmul: see the module docstring for the convention."""

    kernel_name = "int8_gemm"
    max_tile_rows_f32 = INT8_MAX_TILE_ROWS_F32

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, group: int) -> None:
        if q.dtype != torch.int8 or q.dim() != 2:
            raise ValueError(f"int8 weight must be a 2-D int8 tensor, got {q.dtype} {tuple(q.shape)}")
        n, k = q.shape
        if group <= 0 or k % group or group % 16:
            raise ValueError(f"int8 group size {group} must be a multiple of 16 dividing in_features={k}")
        if tuple(scales.shape) != (n, k // group):
            raise ValueError(f"int8 scales have shape {tuple(scales.shape)}, expected {(n, k // group)}")
        self.q = q.contiguous()
        self.scales = scales.to(torch.float32).contiguous()
        self.group = group
        self.out_features, self.in_features = n, k
        self.max_packed_rows = LARGE_WEIGHT_MAX_PACKED_ROWS if n * k >= LARGE_WEIGHT else INT8_MAX_PACKED_ROWS
        self.max_tile_rows = _max_tile_rows()

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scales.nbytes

    def tensors(self) -> list[torch.Tensor]:
        return [self.q, self.scales]

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight [N, K] in dtype."""
        if dtype in _DTYPE_CODES and _native():
            w = torch.empty(self.q.shape, dtype=dtype)
            ops._library().int8_dequant(self.q.data_ptr(), self.scales.data_ptr(), self.group, w.data_ptr(),
                                        _DTYPE_CODES[dtype], self.out_features, self.in_features,
                                        torch.get_num_threads())
            return w
        scales = self.scales.repeat_interleave(self.group, dim=1)
        return (self.q.to(torch.float32) * scales).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows ids of the weight [len(ids), K] (an embedding lookup)."""
        q = self.q[ids].to(torch.float32)
        return (q * self.scales[ids].repeat_interleave(self.group, dim=-1)).to(dtype)

    def _packed_gemm(self, x2: torch.Tensor, out: torch.Tensor, m: int, threads: int) -> int:
        return ops._library().int8_gemm(
            x2.data_ptr(), _DTYPE_CODES[x2.dtype], x2.stride(0), self.q.data_ptr(), self.scales.data_ptr(),
            self.group, out.data_ptr(), out.stride(0), m, self.out_features, self.in_features, threads)

    def _tile_gemm(self, x2: torch.Tensor, out: torch.Tensor, m: int, threads: int) -> int:
        if x2.dtype == torch.float32:
            return ops._library().int8_tile_gemm_f32(
                x2.data_ptr(), x2.stride(0), self.q.data_ptr(), self.scales.data_ptr(), self.group, out.data_ptr(),
                out.stride(0), m, self.out_features, self.in_features, threads)
        return ops._library().int8_tile_gemm(
            x2.data_ptr(), x2.stride(0), self.q.data_ptr(), self.scales.data_ptr(), self.group, out.data_ptr(),
            out.stride(0), m, self.out_features, self.in_features, threads)


class Int4Weight(_QuantizedWeight):
    """An int4 group-quantized weight (see the module docstring): q packed two to a byte, uint8 [N, K / 2] (in
    each chunk of 32 inputs, byte i holds input i in its low nibble and input i + 16 in its high nibble), and
    float16 scales and offsets [N, K / group] with w = q * scale + offset."""

    kernel_name = "int4_gemm"
    max_tile_rows_f32 = INT4_MAX_TILE_ROWS_F32

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int) -> None:
        self.packed, self.scales, self.offsets, self.group = packed, scales, offsets, group
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.max_packed_rows = INT4_MAX_PACKED_ROWS
        self.max_tile_rows = _max_tile_rows()

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        return [self.packed, self.scales, self.offsets]

    def dequantize(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight [N, K] in dtype."""
        if dtype in _DTYPE_CODES and _native():
            w = torch.empty((self.out_features, self.in_features), dtype=dtype)
            ops._library().int4_dequant(self.packed.data_ptr(), self.scales.data_ptr(), self.offsets.data_ptr(),
                                        self.group, w.data_ptr(), _DTYPE_CODES[dtype], self.out_features,
                                        self.in_features, torch.get_num_threads())
            return w
        return self._dequantize_rows(self.packed, self.scales, self.offsets).to(dtype)

    def _dequantize_rows(self, packed: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        n = packed.shape[0]
        chunks = packed.reshape(n, -1, 16)
        q = torch.cat((chunks & 15, chunks >> 4), dim=-1).reshape(n, self.in_features).to(torch.float32)
        return (q * scales.float().repeat_interleave(self.group, dim=1)
                + offsets.float().repeat_interleave(self.group, dim=1))

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows ids of the weight [len(ids), K] (an embedding lookup)."""
        ids = ids.reshape(-1)
        return self._dequantize_rows(self.packed[ids], self.scales[ids], self.offsets[ids]).to(dtype)

    def _packed_gemm(self, x2: torch.Tensor, out: torch.Tensor, m: int, threads: int) -> int:
        if x2.dtype == torch.bfloat16 and m <= INT4_MAX_PACKED_ROWS:
            # bfloat16 dot products (csrc/gemv_bf16.c), the kernel of the fused decode step too; -2: no AVX512-BF16.
            status = ops._library().int4_gemv_bf16(
                x2.data_ptr(), x2.stride(0), self.packed.data_ptr(), self.scales.data_ptr(), self.offsets.data_ptr(),
                self.group, out.data_ptr(), out.stride(0), m, self.out_features, self.in_features, threads)
            if status != -2:
                return status
        return ops._library().int4_gemm(
            x2.data_ptr(), _DTYPE_CODES[x2.dtype], x2.stride(0), self.packed.data_ptr(), self.scales.data_ptr(),
            self.offsets.data_ptr(), self.group, out.data_ptr(), out.stride(0), m, self.out_features,
            self.in_features, threads)

    def _tile_gemm(self, x2: torch.Tensor, out: torch.Tensor, m: int, threads: int) -> int:
        if x2.dtype == torch.float32:
            return ops._library().int4_tile_gemm_f32(
                x2.data_ptr(), x2.stride(0), self.packed.data_ptr(), self.scales.data_ptr(), self.offsets.data_ptr(),
                self.group, out.data_ptr(), out.stride(0), m, self.out_features, self.in_features, threads)
        return ops._library().int4_tile_gemm(
            x2.data_ptr(), x2.stride(0), self.packed.data_ptr(), self.scales.data_ptr(), self.offsets.data_ptr(),
            self.group, out.data_ptr(), out.stride(0), m, self.out_features, self.in_features, threads)


def pack_int8(q: torch.Tensor, scales: torch.Tensor, group: int | None = None) -> Int8Weight:
    """An int8 weight: q int8 [N, K], scales [N] (per channel) or [N, K / group]; w = scales * q."""
    if scales.dim() == 1:
        scales = scales.reshape(-1, 1)
        group = q.shape[1]
    if group is None:
        group = q.shape[1] // scales.shape[1]
    return Int8Weight(q, scales, group)


def pack_int4(
    q: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    group: int,
    bias: torch.Tensor | None = None,
) -> Int4Weight:
    """An int4 weight.

    q: uint8 [N, K] with values 0..15; scales [N, K / group]; zeros [N, K / group] (None: 8, symmetric):
    w = (q - zeros) * scales. Or, instead of zeros, bias [N, K / group]: w = q * scales + bias (GGUF's minimums).
    Scales and offsets are stored in float16. Exact for GGUF Q4_0 / Q4_1 and for symmetric checkpoints with
    float16 scales; the offset -zeros * scales of an asymmetric checkpoint (AWQ, GPTQ with sym=false) is rounded
    to 11 significant bits (their methods keep q - zero in int8 with float32 scales when computing in float32).
    """
    if q.dim() != 2:
        raise ValueError(f"int4 weight must be 2-D [out_features, in_features], got {tuple(q.shape)}")
    n, k = q.shape
    if group not in INT4_GROUP_SIZES or k % group:
        raise ValueError(f"int4 group size {group} is not supported for in_features={k}: use one of "
                         f"{INT4_GROUP_SIZES} dividing in_features")
    num_groups = k // group
    for name, t in (("scales", scales), ("zeros", zeros), ("bias", bias)):
        if t is not None and tuple(t.shape) != (n, num_groups):
            raise ValueError(f"int4 {name} have shape {tuple(t.shape)}, expected {(n, num_groups)}")
    if zeros is not None and bias is not None:
        raise ValueError("pass zeros or bias for an int4 weight, not both")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError("int4 values must lie in 0..15")
    scales = scales.to(torch.float32)
    if bias is not None:
        offsets = bias.to(torch.float32)
    else:
        offsets = -(zeros.to(torch.float32) if zeros is not None else torch.full_like(scales, 8.0)) * scales
    chunks = q.to(torch.uint8).reshape(n, k // 32, 2, 16)
    packed = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    return Int4Weight(packed, scales.to(torch.float16).contiguous(), offsets.to(torch.float16).contiguous(), group)
