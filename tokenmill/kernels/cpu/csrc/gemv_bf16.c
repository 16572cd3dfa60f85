// int4 GEMV with AVX512-BF16 dot products for the few rows of a decode step: bfloat16 activations, the packed int4
// layout of quant.c (int4_gemm: in each chunk of 32 inputs, byte i holds input i in its low nibble and input i + 16
// in its high nibble; float16 scales and offsets per group, w = q * scale + offset), the same sum
//   out[m, n] = sum_c (s_c * sum_{k in c} x[m, k] q[n, k] + b_c * sum_{k in c} x[m, k])   over chunks c of 32.
// int4_gemm widens every nibble to float32 and applies each group's scale with scalar work per group, which
// keeps it compute-bound at a few GB/s on one core. Here 64 nibbles become 64 bfloat16 values (exact: 0..15)
// with one table lookup per 32, and each instruction does 32 multiply-adds. Products are exact and sums float32,
// as in int4_gemm; the order of the additions differs. Used by tokenmill/kernels/cpu/quant.py (Int4Weight, up to
// INT4_MAX_PACKED_ROWS rows of bfloat16, each call its own parallel loop) and, in pieces (int4_gemv_prepare, then
// int4_gemv_columns on the ranges of columns each thread takes), by the fused decode step (decode_layer.c).
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

#ifdef TOKENMILL_AVX512_BF16
// R rows of x against one weight row. Two chunks A, B (64 inputs, 32 bytes) at a time: the 32 bytes widened to
// 16-bit lanes hold A's bytes then B's, so the low nibbles are inputs [A 0..15, B 0..15] and the high ones
// [A 16..31, B 16..31]; x is laid out once per call in that order (xr). Float32 lanes 0..7 of each dot product
// belong to A, 8..15 to B, scaled by s_A and s_B in one multiply-add.
static inline __attribute__((always_inline)) void int4_rows(
    const int R, const uint8_t *qr, const uint16_t *cs, const uint16_t *cb, int num_chunks, const uint16_t *xr,
    int64_t xr_stride, const float *xsum, int64_t xsum_stride, __m512i lut, float *total) {
    const __m512i low = _mm512_set1_epi16(15);
    const __m512i pair_lanes = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const int num_pairs = (num_chunks + 1) / 2;
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int p = 0; p < num_pairs; p++) {
        const __m256i bytes = 2 * p + 1 < num_chunks ? _mm256_loadu_si256((const __m256i *)(qr + 32 * p))
                                                     : _mm256_maskz_loadu_epi8(0xffff, qr + 32 * p);
        const __m512i b16 = _mm512_cvtepu8_epi16(bytes);
        const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(b16, low), lut);
        const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b16, 4), lut);
        int32_t two;
        memcpy(&two, cs + 2 * p, sizeof two);  // s_A, s_B as float16
        const __m512 s =
            _mm512_permutexvar_ps(pair_lanes, _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(two))));
        for (int r = 0; r < R; r++) {
            const uint16_t *xp = xr + r * xr_stride + 64 * p;
            __m512 part = _mm512_dpbf16_ps(_mm512_setzero_ps(), lo, (__m512bh)_mm512_loadu_si512(xp));
            part = _mm512_dpbf16_ps(part, hi, (__m512bh)_mm512_loadu_si512(xp + 32));
            acc[r] = _mm512_fmadd_ps(part, s, acc[r]);
        }
    }
    for (int c = 0; c < num_chunks; c += 16) {  // the offsets: b_c times the chunk's sum of x
        const __mmask16 mask = tail_mask(num_chunks - c);
        const __m512 b = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, cb + c));
        for (int r = 0; r < R; r++)
            acc[r] = _mm512_fmadd_ps(b, _mm512_maskz_loadu_ps(mask, xsum + r * xsum_stride + c), acc[r]);
    }
    for (int r = 0; r < R; r++) total[r] = _mm512_reduce_add_ps(acc[r]);
}
#endif

// The activations' layout for int4_rows: xr [rows, padded_k] (each pair of 32-input chunks interleaved as
// int4_rows reads it, zero-padded to an even number of chunks) and xsum [rows, k / 32] (each chunk's sum of x).
// padded_k = int4_gemv_padded_k(k).
int64_t int4_gemv_padded_k(int64_t k) { return (k / 32 + 1) / 2 * 64; }

void int4_gemv_prepare(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t k, uint16_t *xr, float *xsum) {
    const int64_t num_chunks = k / 32, padded_k = int4_gemv_padded_k(k);
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xs = x + r * x_stride;
        uint16_t *dst = xr + r * padded_k;
        memset(dst, 0, sizeof(uint16_t) * (size_t)padded_k);
        for (int64_t c = 0; c < num_chunks; c++) {
            const int64_t p = c / 2, half = c % 2;  // chunk A of its pair fills lanes 0..15, B lanes 16..31
            memcpy(dst + 64 * p + 16 * half, xs + 32 * c, 32);
            memcpy(dst + 64 * p + 32 + 16 * half, xs + 32 * c + 16, 32);
            float t = 0.f;
            for (int i = 0; i < 32; i++) t += bf16_to_f32(xs[32 * c + i]);
            xsum[r * num_chunks + c] = t;
        }
    }
}

// Output columns [n0, n1) of out [rows, n] (row stride out_stride) from the prepared activations. Each column's
// sum is computed the same way whatever the range, so any split of the columns over threads gives the same
// result. expanded: scratch of 2 * (k / 32 + 1) uint16 (unused, may be NULL, when group is 32 and k / 32 even).
// Returns 0, or -2 without AVX512-BF16.
int int4_gemv_columns(const uint16_t *xr, const float *xsum, int64_t rows, int64_t k, const uint8_t *q,
                      const uint16_t *scales, const uint16_t *offsets, int64_t group, uint16_t *out,
                      int64_t out_stride, int64_t n0, int64_t n1, uint16_t *expanded) {
#ifdef TOKENMILL_AVX512_BF16
    const int64_t num_chunks = k / 32, num_groups = k / group, padded_k = int4_gemv_padded_k(k);
    const int chunks_per_group = (int)(group / 32);
    uint16_t table[32] = {0};
    for (int i = 0; i < 16; i++) table[i] = f32_to_bf16((float)i);
    const __m512i lut = _mm512_loadu_si512(table);
    // Scales and offsets read in place where there is one per chunk (group 32, an even number of chunks);
    // otherwise expanded per weight row to one per chunk, with a zero for the missing partner of an odd last chunk.
    const int in_place = chunks_per_group == 1 && num_chunks % 2 == 0;
    if (!in_place) memset(expanded, 0, sizeof(uint16_t) * (size_t)(2 * (num_chunks + 1)));
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *cs = scales + n * num_groups, *cb = offsets + n * num_groups;
        if (!in_place) {
            for (int64_t c = 0; c < num_chunks; c++) {
                expanded[c] = cs[c / chunks_per_group];
                expanded[num_chunks + 1 + c] = cb[c / chunks_per_group];
            }
            cs = expanded;
            cb = expanded + num_chunks + 1;
        }
        const uint8_t *qr = q + n * (k / 2);
        for (int64_t r0 = 0; r0 < rows; r0 += 4) {
            float total[4];
            const int block = rows - r0 < 4 ? (int)(rows - r0) : 4;
            const uint16_t *xb = xr + r0 * padded_k;
            const float *sb = xsum + r0 * num_chunks;
            const int nc = (int)num_chunks;
            switch (block) {
                case 1: int4_rows(1, qr, cs, cb, nc, xb, padded_k, sb, num_chunks, lut, total); break;
                case 2: int4_rows(2, qr, cs, cb, nc, xb, padded_k, sb, num_chunks, lut, total); break;
                case 3: int4_rows(3, qr, cs, cb, nc, xb, padded_k, sb, num_chunks, lut, total); break;
                default: int4_rows(4, qr, cs, cb, nc, xb, padded_k, sb, num_chunks, lut, total); break;
            }
            for (int r = 0; r < block; r++) out[(r0 + r) * out_stride + n] = f32_to_bf16(total[r]);
        }
    }
    return 0;
#else
    (void)xr, (void)xsum, (void)rows, (void)k, (void)q, (void)scales, (void)offsets, (void)group, (void)out;
    (void)out_stride, (void)n0, (void)n1, (void)expanded;
    return -2;
#endif
}

// out [rows, n] (row stride out_stride) = x [rows, k] (row stride x_stride) @ w.T, bfloat16; group a multiple of
// 32 dividing k. Returns 0, -1 when memory ran out, -2 without AVX512-BF16 (the caller uses int4_gemm).
int int4_gemv_bf16(const uint16_t *x, int64_t x_stride, const uint8_t *q, const uint16_t *scales,
                   const uint16_t *offsets, int64_t group, uint16_t *out, int64_t out_stride, int64_t rows,
                   int64_t n_out, int64_t k, int num_threads) {
#ifdef TOKENMILL_AVX512_BF16
    const int64_t num_chunks = k / 32;
    uint16_t *xr = malloc(sizeof(uint16_t) * (size_t)(rows * int4_gemv_padded_k(k)));
    float *xsum = malloc(sizeof(float) * (size_t)(rows * num_chunks + 1));
    if (xr == NULL || xsum == NULL) {
        free(xr);
        free(xsum);
        return -1;
    }
    int4_gemv_prepare(x, x_stride, rows, k, xr, xsum);
    int status = 0;
#pragma omp parallel num_threads(num_threads)
    {
        uint16_t *expanded = malloc(sizeof(uint16_t) * (size_t)(2 * (num_chunks + 1)));
        if (expanded == NULL) {
#pragma omp atomic write
            status = -1;
        }
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        if (expanded != NULL)
            int4_gemv_columns(xr, xsum, rows, k, q, scales, offsets, group, out, out_stride, n_out * t / nt,
                              n_out * (t + 1) / nt, expanded);
        free(expanded);
    }
    free(xr);
    free(xsum);
    return status;
#else
    (void)x, (void)x_stride, (void)q, (void)scales, (void)offsets, (void)group, (void)out, (void)out_stride;
    (void)rows, (void)n_out, (void)k, (void)num_threads;
    return -2;
#endif
}
