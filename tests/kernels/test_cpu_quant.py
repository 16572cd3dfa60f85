"""The quantized CPU matmuls (tokenmill/kernels/cpu/quant.py, csrc/quant.c) against a reference written here:
the weight dequantized from its (q, scales, offsets) in float64, rounded as each kernel documents, times the
activations. Covers the tile kernels (many rows: AMX where the CPU has it, and the AVX512-BF16 one, on such a CPU
too) for every int4 group size and int8 group, row counts that are not multiples of the register block, column
counts that are not multiples of the tile, and the choice of kernel per row count, including the fallback where
the library is built without AVX512-BF16."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tokenmill.kernels.cpu import ops, quant
from tokenmill.kernels.cpu.quant import pack_int4, pack_int8

tile_built = pytest.mark.skipif(not quant._tile_native(), reason="the tile kernels need a C compiler and AVX512-BF16")
ROWS = (1, 3, 9, 17, 64, 100)


@pytest.fixture(params=["amx", "avx512"])
def tile_multiply(request):
    """The tile kernels' multiply: on AMX (skipped where the CPU or the build has none), or AVX512-BF16 dot
    products (on a CPU with AMX, with AMX switched off for the test)."""
    lib = ops.load_library()
    amx = lib is not None and quant._tile_amx()
    if request.param == "amx":
        if not amx:
            pytest.skip("no AMX tile multiply on this CPU or build")
        yield request.param
        return
    before = lib.tokenmill_quant_use_amx(0) if amx else None
    try:
        yield request.param
    finally:
        if before is not None:
            lib.tokenmill_quant_use_amx(before)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def int4_case(n: int, k: int, group: int, with_zeros: bool, seed: int = 0):
    """An int4 weight and its exact float64 value. Scales and offsets are float16 numbers, so the kernel's
    float16 storage holds them exactly."""
    g = _generator(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scales = (torch.rand(n, k // group, generator=g) * 0.02 + 1e-3).half().double()
    if with_zeros:  # AWQ / GPTQ / RTN: w = (q - zero) * scale, an integer zero point; offset = -zero * scale
        zeros = torch.randint(0, 16, (n, k // group), generator=g).double()
        offsets = (-zeros * scales).half().double()  # what the float16 offset holds
        weight = pack_int4(q, scales.float(), zeros.float(), group)
    else:  # GGUF Q4_0 / Q4_1: w = q * scale + minimum
        offsets = (torch.randn(n, k // group, generator=g) * 0.05).half().double()
        weight = pack_int4(q, scales.float(), None, group, bias=offsets.float())
    w = q.double() * scales.repeat_interleave(group, 1) + offsets.repeat_interleave(group, 1)
    return weight, w


def int8_case(n: int, k: int, group: int, seed: int = 0):
    g = _generator(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, k // group, generator=g) * 0.01 + 1e-4
    weight = pack_int8(q, scales, group)
    return weight, q.double() * scales.double().repeat_interleave(group, 1)


def tile_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What the tile kernel computes: the exact weight times the (bfloat16) activations, summed in float64 here
    (float32 there)."""
    return x.double() @ w.double().T


def assert_bf16_result(got: torch.Tensor, expected: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got (bfloat16) is expected rounded to bfloat16, up to float32 summation error: at most one bfloat16 step
    of the result plus 2^-15 of sum |x| |w| (the size of the terms summed; rounding the weights to bfloat16 would
    cost about 2^-9 of each term)."""
    assert got.dtype == torch.bfloat16 and got.shape == expected.shape
    magnitude = x.double().abs() @ w.double().abs().T
    bound = expected.abs() * 2.0**-8 + magnitude * 2.0**-15
    err = (got.double() - expected).abs()
    assert bool((err <= bound).all()), f"max error {(err - bound).max():.3g} over the bound"


def forced(weight, kernel: str):
    """weight with the kernel for every row count forced ("packed", "tile")."""
    weight.max_packed_rows = 1 << 30 if kernel == "packed" else 0
    weight.max_tile_rows = 1 << 30
    return weight


@tile_built
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("group", quant.INT4_GROUP_SIZES)
@pytest.mark.parametrize("with_zeros", [False, True], ids=["min", "zeros"])
def test_int4_tile_kernel_matches_reference(m, group, with_zeros, tile_multiply):
    n, k = 100, 512  # 100 columns: three full 32-column tiles and a tail of 4
    weight, w = int4_case(n, k, group, with_zeros, seed=group + m)
    forced(weight, "tile")
    assert weight.kernel_for(m, torch.bfloat16) == "tile"
    x = torch.randn(m, k, generator=_generator(m)).bfloat16()
    assert_bf16_result(weight.matmul(x), tile_reference(x, w), x, w)


@tile_built
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("group", [16, 32, 64, 512])  # 16: GGUF Q6_K; 32: Q8_0; 512 = K: per channel
def test_int8_tile_kernel_matches_reference(m, group, tile_multiply):
    n, k = 70, 512
    weight, w = int8_case(n, k, group, seed=group + m)
    forced(weight, "tile")
    x = torch.randn(m, k, generator=_generator(m)).bfloat16()
    assert_bf16_result(weight.matmul(x), tile_reference(x, w), x, w)


@tile_built
@pytest.mark.parametrize("n", [32, 64, 33, 7])
def test_tile_kernel_column_counts_and_strided_rows(n, tile_multiply):
    """Exact multiples of the tile, one past, fewer than a vector; activations that are a column slice of a
    wider tensor (rows not adjacent) and a 3-D batch."""
    k = 256
    for weight, w in (int4_case(n, k, 32, True, seed=n), int8_case(n, k, 32, seed=n)):
        forced(weight, "tile")
        wide = torch.randn(13, 2, k + 64, generator=_generator(n)).bfloat16()
        x = wide[..., 32:32 + k]
        got = weight.matmul(x)
        assert got.shape == (13, 2, n)
        flat = x.reshape(-1, k)
        assert_bf16_result(got.reshape(-1, n), tile_reference(flat, w), flat, w)


@tile_built
def test_tile_kernel_output_layer_shape_uses_both_threads(tile_multiply):
    """A weight big enough to run on every thread (the tiles are split between them)."""
    n, k = 2080, 576
    weight, w = int8_case(n, k, 32, seed=3)
    forced(weight, "tile")
    x = torch.randn(40, k, generator=_generator(3)).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = weight.matmul(x)
    finally:
        torch.set_num_threads(threads)
    assert_bf16_result(got, tile_reference(x, w), x, w)


@tile_built
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_tile_kernel_keeps_the_exact_weight(kind, tile_multiply):
    """The tile kernel applies the group scales and offsets in float32, not by rounding the weight to bfloat16: with
    a large offset (GGUF Q4_1's minimum) and a small scale, bfloat16 would keep only the offset (w = 1 + 0.001 q
    rounds to 1 or 1 + 2^-7), and activations summing to zero in each group leave just the scale's part."""
    n, k, group = 48, 256, 32
    g = _generator(5)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    if kind == "int4":
        scales, offsets = torch.full((n, k // group), 2.0**-10), torch.ones(n, k // group)
        weight = pack_int4(q, scales, None, group, bias=offsets)
        w = q.double() * 2.0**-10 + 1
    else:  # w = s q with q = 100 + small: bfloat16 keeps 8 bits of the 7-bit q times a float32 scale
        qi = q.to(torch.int8) + 100
        scales = torch.full((n, k // group), 1.01)
        weight = pack_int8(qi, scales, group)
        w = qi.double() * scales[0, 0].double()
    forced(weight, "tile")
    half = torch.randn(20, k // 2, generator=g).bfloat16()
    x = torch.cat([half.reshape(20, -1, group // 2), -half.reshape(20, -1, group // 2)], dim=-1).reshape(20, k)
    expected = x.double() @ w.T
    got = weight.matmul(x).double()
    rounded = x.double() @ w.float().bfloat16().double().T  # what a bfloat16 copy of the weight gives
    assert ((got - expected).abs() <= expected.abs() * 2.0**-8 + 1e-6).all()
    assert ((rounded - expected).abs() > expected.abs() * 2.0**-7).any()  # the case tells them apart


@pytest.mark.parametrize("m", [1, 2, 17])
def test_packed_kernels_still_exact_in_float32(m):
    """The packed kernels (few rows) use the float16 scales exactly: float32 activations give the float64 product
    up to float32 summation order."""
    weight, w = int4_case(96, 256, 64, False, seed=m)
    forced(weight, "packed")
    x = torch.randn(m, 256, generator=_generator(m))
    expected = x.double() @ w.T
    magnitude = x.double().abs() @ w.abs().T
    assert ((weight.matmul(x).double() - expected).abs() <= magnitude * 1e-5).all()


def test_kernel_choice_per_row_count():
    """Packed for a few rows, the tile kernel above for bfloat16 activations up to max_tile_rows (dequantize + GEMM
    where the tile kernel is not built, and above), dequantize + float32 GEMM for float32 activations above the
    packed rows; the output layer's size keeps the packed kernel for more rows."""
    small, _ = int4_case(96, 256, 32, False)
    large = pack_int8(torch.zeros(quant.LARGE_WEIGHT // 256, 256, dtype=torch.int8), torch.ones(quant.LARGE_WEIGHT // 256, 8),
                      32)
    assert small.max_packed_rows == quant.INT4_MAX_PACKED_ROWS
    assert large.max_packed_rows == quant.LARGE_WEIGHT_MAX_PACKED_ROWS > quant.INT8_MAX_PACKED_ROWS
    large_int4 = pack_int4(torch.zeros(quant.LARGE_WEIGHT // 256, 256, dtype=torch.uint8),
                           torch.ones(quant.LARGE_WEIGHT // 256, 8), None, 32)
    assert large_int4.max_packed_rows == quant.INT4_MAX_PACKED_ROWS  # int4: the packed kernel at any size
    if not quant._native():
        assert small.kernel_for(1, torch.bfloat16) == "dequant"
        return
    many = "tile" if quant._tile_native() else "dequant"
    for weight in (small, large):
        assert weight.kernel_for(1, torch.bfloat16) == "packed"
        assert weight.kernel_for(weight.max_packed_rows, torch.float32) == "packed"
        assert weight.kernel_for(weight.max_packed_rows + 1, torch.bfloat16) == many
        # Where the tile kernels run on AMX, oneDNN's bfloat16 GEMM does too, and dequantize + GEMM wins sooner.
        assert weight.max_tile_rows == (quant.MAX_TILE_ROWS_AMX if quant._tile_amx() else quant.MAX_TILE_ROWS)
        assert weight.kernel_for(weight.max_tile_rows, torch.bfloat16) == many
        assert weight.kernel_for(weight.max_tile_rows + 1, torch.bfloat16) == "dequant"  # a long prefill chunk
        assert weight.kernel_for(64, torch.float16) == "dequant"
    # float32: the AVX2 tile kernels where they are built, up to max_tile_rows_f32 (int8 and int4 apart), then
    # dequantize + GEMM.
    many_f32 = "tile" if quant._tile_f32_native() else "dequant"
    assert large.max_tile_rows_f32 == quant.INT8_MAX_TILE_ROWS_F32
    assert small.max_tile_rows_f32 == quant.INT4_MAX_TILE_ROWS_F32 > small.max_packed_rows
    for weight in (small, large):
        assert weight.kernel_for(weight.max_packed_rows + 1, torch.float32) == many_f32
        assert weight.kernel_for(weight.max_tile_rows_f32, torch.float32) == many_f32
        assert weight.kernel_for(weight.max_tile_rows_f32 + 1, torch.float32) == "dequant"


f32_tile_built = pytest.mark.skipif(not quant._tile_f32_native(),
                                    reason="the float32 tile kernels need a C compiler and AVX2 + FMA")


def forced_f32_tile(weight):
    """weight with the float32 tile kernel forced for every row count."""
    weight.max_packed_rows = 0
    weight.max_tile_rows_f32 = 1 << 30
    return weight


def assert_f32_result(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """got (float32) is the exact weight times x up to float32 summation order: 2^-20 of sum |x| |w|."""
    assert got.dtype == torch.float32
    expected = x.double() @ w.double().T
    magnitude = x.double().abs() @ w.double().abs().T
    assert bool(((got.double() - expected).abs() <= magnitude * 2.0**-20).all())


@f32_tile_built
@pytest.mark.parametrize("m", [2, 9, 64])
@pytest.mark.parametrize("group", [16, 32, 512])  # Q6_K's 16, Q8_0's 32, per channel
def test_int8_float32_tile_kernel_matches_reference(m, group):
    weight, w = int8_case(50, 512, group, seed=m)
    forced_f32_tile(weight)
    x = torch.randn(m, 512, generator=_generator(m))
    assert_f32_result(weight.matmul(x), x, w)
    # Activations that are a column slice of a wider tensor (a row stride of its own).
    wide = torch.randn(m, 700, generator=_generator(m + 1))
    assert_f32_result(weight.matmul(wide[:, 100:612]), wide[:, 100:612], w)


@f32_tile_built
@pytest.mark.parametrize("m", [5, 7, 64])
@pytest.mark.parametrize("group,with_zeros", [(32, False), (64, True), (128, True)])
def test_int4_float32_tile_kernel_matches_reference(m, group, with_zeros):
    """The int4 float32 tile (nibbles times scale plus offset, 8 inputs of 8 columns transposed at a time) gives
    the exact weight's product, for a partial last tile (50 columns) and rows with a stride of their own."""
    weight, w = int4_case(50, 512, group, with_zeros, seed=m)
    forced_f32_tile(weight)
    x = torch.randn(m, 512, generator=_generator(m))
    assert_f32_result(weight.matmul(x), x, w)
    wide = torch.randn(m, 700, generator=_generator(m + 1))
    assert_f32_result(weight.matmul(wide[:, 100:612]), wide[:, 100:612], w)


def test_without_the_tile_kernel_many_rows_dequantize(monkeypatch):
    """Where the library has no AVX512-BF16 tile kernel, many bfloat16 rows take dequantize + GEMM, and give the
    same result."""
    weight, w = int4_case(100, 512, 32, True)
    x = torch.randn(17, 512, generator=_generator(1)).bfloat16()
    monkeypatch.setattr(quant, "_tile_native", lambda: False)
    assert weight.kernel_for(17, torch.bfloat16) == "dequant"
    rounded = w.float().bfloat16().double()  # dequantize + GEMM holds the weight in bfloat16
    assert_bf16_result(weight.matmul(x), x.double() @ rounded.T, x, rounded)


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="needs a C compiler")
def test_library_built_without_avx512_bf16_reports_no_tile_kernel(tmp_path: Path):
    """Built for a CPU without AVX512 (x86-64-v3: AVX2, FMA), quant.c says it has no tile kernel, and the tile
    entry points refuse (status -2) instead of computing anything."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT" or not Path("/proc/cpuinfo").exists():
        pytest.skip("needs an x86-64 CPU")
    compiler = shutil.which("cc") or shutil.which("gcc")
    source = Path(ops.__file__).parent / "csrc" / "quant.c"
    library = tmp_path / "quant_v3.so"
    built = subprocess.run([compiler, "-O1", "-march=x86-64-v3", "-fopenmp", "-shared", "-fPIC", "-std=c11",
                            str(source), "-o", str(library)], capture_output=True, text=True)
    if built.returncode != 0 and "march" in built.stderr:
        pytest.skip("the compiler does not know x86-64-v3")
    assert built.returncode == 0, built.stderr
    lib = ctypes.CDLL(str(library))
    assert lib.tokenmill_quant_tile_vectorized() == 0
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.int4_tile_gemm.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32]
    lib.int8_tile_gemm.argtypes = [ptr, i64, ptr, ptr, i64, ptr, i64, i64, i64, i64, i32]
    assert lib.int4_tile_gemm(None, 0, None, None, None, 32, None, 0, 1, 1, 32, 1) == -2
    assert lib.int8_tile_gemm(None, 0, None, None, 32, None, 0, 1, 1, 32, 1) == -2
