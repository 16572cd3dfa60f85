// int4 GEMV with AVX512 integer dot products for the few rows of a decode step: bfloat16 activations, the packed
// int4 layout of quant.c (int4_gemm: in each chunk of 32 inputs, byte i holds input i in its low nibble and input
// i + 16 in its high nibble; float16 scales and offsets per group, w = q * scale + offset), the same sum
//   out[m, n] = sum_c (s_c * sum_{k in c} x[m, k] q[n, k] + b_c * sum_{k in c} x[m, k])   over chunks c of 32.
// The inner sums are integer: each chunk of x is laid out once per call as 16-bit integers scaled by a power of
// two (x = d_c * xi, |xi| < 2^15, d_c = 2^(e_c - 15) where 2^e_c bounds the chunk's largest |x|), so a bfloat16
// input within 2^7 of its chunk's largest is exact, a smaller one rounded at 2^-16 of that largest (a relative
// error of the sum far below the output's bfloat16 rounding, 2^-9). The nibbles times xi sum exactly in int32
// (VPDPWSSD: 32 multiply-adds an instruction), converted to float32 exactly and scaled by s_c, then d_c; the
// offsets multiply each chunk's float32 sum of x. On the Xeon this was measured on, VPDPWSSD ran 3x as many
// instructions a nanosecond as AVX512-BF16's VDPBF16PS, which this kernel used before: 1.3-2.1x at one row
// (BENCHMARKS.md).
// Used by tokenmill/kernels/cpu/quant.py (Int4Weight, up to INT4_MAX_PACKED_ROWS rows of bfloat16, each call its
// own parallel loop) and, in pieces (int4_gemv_prepare, then int4_gemv_columns on the ranges of columns each thread
// takes), by the fused decode step (decode_layer.c).
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

// The layout of one row of x: the 16-bit integers of every four chunks (128 inputs, as the four vectors int4_rows
// multiplies), then per four chunks 16 float32 scales (d_c on lanes 4c..4c + 3), zero-padded to four chunks.
static inline int64_t num_quads(int64_t k) { return (k / 32 + 3) / 4; }

// uint16 elements per row of int4_gemv_prepare's layout.
int64_t int4_gemv_layout_width(int64_t k) { return num_quads(k) * (128 + 32); }

#ifdef TOKENMILL_AVX512_BF16
// 2^e as a float32, e in [-126, 127].
static inline float ldexp_f32(int e) {
    const uint32_t bits = (uint32_t)(e + 127) << 23;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// 2^e as the product of two powers of two, e in [-252, 254]: exact down to float32's subnormals (2^-149).
static inline float pow2_f32(int e) { return ldexp_f32(e / 2) * ldexp_f32(e - e / 2); }

// The four 16-bit vectors of a 64-byte load of nibbles, each 16-bit lane n of the load holding bytes 2n, 2n + 1:
// its nibbles, bits 0-3, 4-7, 8-11, 12-15. Lane n of the four holds inputs 2(n % 8) + {0, 16, 1, 17} of chunk n / 8,
// the order int4_gemv_prepare lays x out in; int32 lane l of a dot product sums 16-bit lanes 2l and 2l + 1, so
// lanes 4c..4c + 3 hold chunk c of the four.
static inline __attribute__((always_inline)) void nibbles_i16(__m512i w, __m512i v[4]) {
    const __m512i nibble = _mm512_set1_epi16(0x000F);
    v[0] = _mm512_and_si512(w, nibble);
    v[1] = _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble);
    v[2] = _mm512_and_si512(_mm512_srli_epi16(w, 8), nibble);
    v[3] = _mm512_srli_epi16(w, 12);
}

// R rows of x against one weight row of num_chunks chunks, four chunks (64 bytes) at a time, the last 1-3 with
// masked loads (x and its scales are zero-padded there). cs, cb: one float16 scale and offset per chunk.
static inline __attribute__((always_inline)) void int4_rows(
    const int R, const uint8_t *qr, const uint16_t *cs, const uint16_t *cb, int num_chunks, const int16_t *xr,
    int64_t xr_stride, const float *xsum, int64_t xsum_stride, float *total) {
    // A chunk's scale on its four float32 lanes.
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const int64_t values = 128 * num_quads(32 * (int64_t)num_chunks);  // then the scales, in each row
    __m512 acc[4];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int c = 0; c < num_chunks; c += 4) {
        const int n = num_chunks - c < 4 ? num_chunks - c : 4;
        __m512i w;
        __m128i s16;
        if (n == 4) {
            w = _mm512_loadu_si512(qr + 16 * c);
            s16 = _mm_loadl_epi64((const __m128i *)(cs + c));
            _mm_prefetch((const char *)(qr + 16 * c + PREFETCH_BYTES), _MM_HINT_T0);
        } else {
            w = _mm512_maskz_loadu_epi8(((__mmask64)1 << (16 * n)) - 1, qr + 16 * c);
            s16 = _mm_maskz_loadu_epi16((__mmask8)((1 << n) - 1), cs + c);
        }
        const __m512 s = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_cvtph_ps(s16)));
        __m512i v[4];
        nibbles_i16(w, v);
        for (int r = 0; r < R; r++) {
            const int16_t *xp = xr + r * xr_stride + 32 * c;
            __m512i part = _mm512_dpwssd_epi32(_mm512_setzero_si512(), v[0], _mm512_loadu_si512(xp));
            part = _mm512_dpwssd_epi32(part, v[1], _mm512_loadu_si512(xp + 32));
            part = _mm512_dpwssd_epi32(part, v[2], _mm512_loadu_si512(xp + 64));
            part = _mm512_dpwssd_epi32(part, v[3], _mm512_loadu_si512(xp + 96));
            // (sum * s_c) * d_c: d_c may be subnormal, s_c * d_c would round where the result does not.
            const __m512 d = _mm512_loadu_ps((const float *)(xr + r * xr_stride + values) + 4 * c);
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(part), s), d, acc[r]);
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

// One chunk of 32 bfloat16 inputs into the layout: its 16-bit integers (in the order nibbles_i16 pairs them with
// the weights) at values, its scale d on the four float32 lanes at scales; returns its float32 sum.
static inline float prepare_chunk(const uint16_t *chunk, int16_t *values, float *scales) {
    // inputs {0, 2, .., 14}, {16, .., 30}, {1, .., 15}, {17, .., 31}: the four vectors' lanes of this chunk
    const __m512i order = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1,
                                           30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i lo = _mm512_castps_si512(load_bf16x16(chunk)), hi = _mm512_castps_si512(load_bf16x16(chunk + 16));
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    // The largest |x| as its bits (integer order is float order for non-negative floats, NaN and inf above all).
    const int largest = _mm512_reduce_max_epi32(
        _mm512_max_epi32(_mm512_and_si512(lo, magnitude), _mm512_and_si512(hi, magnitude)));
    const int biased = largest >> 23;  // 255: inf or NaN, whose scale NaN carries into the sums
    // 2^e bounds |x| (subnormals: 2^-126); x * 2^(15 - e) in two exact steps, each factor a normal float32.
    const int e = biased - 126, up = 15 - e;
    const __m512 up_a = _mm512_set1_ps(ldexp_f32(up / 2)), up_b = _mm512_set1_ps(ldexp_f32(up - up / 2));
    const float d = biased == 255 ? __builtin_nanf("") : pow2_f32(e - 15);
#define TO_I16(v) \
    _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(_mm512_castsi512_ps(v), up_a), up_b)))
    const __m256i lo16 = TO_I16(lo), hi16 = TO_I16(hi);
#undef TO_I16
    const __m512i ordered =
        _mm512_permutexvar_epi16(order, _mm512_inserti64x4(_mm512_castsi256_si512(lo16), hi16, 1));
    for (int v = 0; v < 4; v++)
        _mm_storeu_si128((__m128i *)(values + 32 * v), _mm512_extracti32x4_epi32(ordered, v));
    _mm_storeu_ps(scales, _mm_set1_ps(d));
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_castsi512_ps(lo), _mm512_castsi512_ps(hi)));
}
#endif

// The activations' layout for int4_rows: xr [rows, int4_gemv_layout_width(k)] (as 16-bit integers and their
// scales, see num_quads) and xsum [rows, k / 32] (each chunk's float32 sum of x). Without AVX512-BF16 nothing is
// written (int4_gemv_columns then returns -2).
void int4_gemv_prepare(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t k, uint16_t *xr, float *xsum) {
#ifdef TOKENMILL_AVX512_BF16
    const int64_t num_chunks = k / 32, quads = num_quads(k), width = int4_gemv_layout_width(k);
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xs = x + r * x_stride;
        int16_t *values = (int16_t *)(xr + r * width);
        float *scales = (float *)(values + 128 * quads);
        if (num_chunks % 4) {  // the last four chunks' missing ones: zeros
            memset(values + 128 * (quads - 1), 0, sizeof(int16_t) * 128);
            memset(scales + 16 * (quads - 1), 0, sizeof(float) * 16);
        }
        for (int64_t c = 0; c < num_chunks; c++)
            xsum[r * num_chunks + c] =
                prepare_chunk(xs + 32 * c, values + 128 * (c / 4) + 8 * (c % 4), scales + 4 * c);
    }
#else
    (void)x, (void)x_stride, (void)rows, (void)k, (void)xr, (void)xsum;
#endif
}

// Output columns [n0, n1) of out [rows, n] (row stride out_stride) from the prepared activations. Each column's
// sum is computed the same way whatever the range, so any split of the columns over threads gives the same
// result. expanded: scratch of 2 * (k / 32 + 1) uint16 (unused, may be NULL, when group is 32).
// Returns 0, or -2 without AVX512-BF16.
int int4_gemv_columns(const uint16_t *xr, const float *xsum, int64_t rows, int64_t k, const uint8_t *q,
                      const uint16_t *scales, const uint16_t *offsets, int64_t group, uint16_t *out,
                      int64_t out_stride, int64_t n0, int64_t n1, uint16_t *expanded) {
#ifdef TOKENMILL_AVX512_BF16
    const int64_t num_chunks = k / 32, num_groups = k / group, width = int4_gemv_layout_width(k);
    const int chunks_per_group = (int)(group / 32);
    // Scales and offsets read in place where there is one per chunk (group 32); otherwise expanded per weight row
    // to one per chunk.
    const int in_place = chunks_per_group == 1;
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
            const int16_t *xb = (const int16_t *)xr + r0 * width;
            const float *sb = xsum + r0 * num_chunks;
            const int nc = (int)num_chunks;
            switch (block) {
                case 1: int4_rows(1, qr, cs, cb, nc, xb, width, sb, num_chunks, total); break;
                case 2: int4_rows(2, qr, cs, cb, nc, xb, width, sb, num_chunks, total); break;
                case 3: int4_rows(3, qr, cs, cb, nc, xb, width, sb, num_chunks, total); break;
                default: int4_rows(4, qr, cs, cb, nc, xb, width, sb, num_chunks, total); break;
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
    uint16_t *xr = malloc(sizeof(uint16_t) * (size_t)(rows * int4_gemv_layout_width(k)));
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
