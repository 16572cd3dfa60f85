// Weight-only quantized matmuls for small row counts (decode) and dequantization to bfloat16 (prefill), CPU.
//
// int8 weights with group scales (W8A16):  w[n, k] = scales[n, k / group] * q[n, k],  q int8.
//   Per-channel scales are group = K. GGUF's Q8_0 (group 32) and Q6_K (group 16) land here exactly: their scales
//   are float16 (times an int8 sub-scale for Q6_K), exact in float32.
// int4 weights (W4A16) with float16 group scales and offsets: see int4_gemm below.
#define _GNU_SOURCE  // syscall (the AMX tile state's request)
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "kernels.h"  // the prototypes, checked against the definitions here
#include "simd.h"

// One output element, float32 or bfloat16 (x_dtype 0 / 1, the activations' dtype).
static inline void store_out(void *out, int x_dtype, int64_t index, float total) {
    if (x_dtype == 0)
        ((float *)out)[index] = total;
    else
        ((uint16_t *)out)[index] = f32_to_bf16(total);
}

// The blocks of rows in which the kernels process x from MIN_BLOCKED_ROWS rows (kernels.h): each weight chunk
// widened once per block.
#define ROW_BLOCK 8

// x [M, K] (row stride x_stride elements; dtype 0 float32, 1 bfloat16) -> float32 [M, K] contiguous, followed
// by zero rows up to a multiple of ROW_BLOCK.
static float *to_f32(const void *x, int x_dtype, int64_t x_stride, int64_t M, int64_t K) {
    const int64_t padded = (M + ROW_BLOCK - 1) / ROW_BLOCK * ROW_BLOCK;
    float *xf = (float *)calloc((size_t)(padded * K), sizeof(float));
    if (xf == NULL) return NULL;
    for (int64_t m = 0; m < M; m++) {
        if (x_dtype == 0) {
            memcpy(xf + m * K, (const float *)x + m * x_stride, sizeof(float) * (size_t)K);
        } else {
            const uint16_t *row = (const uint16_t *)x + m * x_stride;
            for (int64_t k = 0; k < K; k++) xf[m * K + k] = bf16_to_f32(row[k]);
        }
    }
    return xf;
}

#ifdef TOKENMILL_AVX2
// One int8 weight row against one float32 row x (AVX2 + FMA): the same sums as the AVX512 path, 8 lanes. Four
// partial sums per group keep four multiply-adds in flight; group is a multiple of 16.
static inline float int8_row_avx2(const int8_t *qr, const float *sr, int64_t group, int64_t num_groups,
                                  const float *xr) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t g = 0; g < num_groups; g++) {
        const int8_t *qg = qr + g * group;
        const float *xg = xr + g * group;
        __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps(), p2 = _mm256_setzero_ps(),
               p3 = _mm256_setzero_ps();
        int64_t c = 0;
        for (; c + 32 <= group; c += 32) {
            p0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qg + c)))),
                                 _mm256_loadu_ps(xg + c), p0);
            p1 = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qg + c + 8)))),
                _mm256_loadu_ps(xg + c + 8), p1);
            p2 = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qg + c + 16)))),
                _mm256_loadu_ps(xg + c + 16), p2);
            p3 = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qg + c + 24)))),
                _mm256_loadu_ps(xg + c + 24), p3);
        }
        if (c < group) {  // a group of 16 (GGUF Q6_K), or a last 16
            p0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qg + c)))),
                                 _mm256_loadu_ps(xg + c), p0);
            p1 = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qg + c + 8)))),
                _mm256_loadu_ps(xg + c + 8), p1);
        }
        const __m256 part = _mm256_add_ps(_mm256_add_ps(p0, p1), _mm256_add_ps(p2, p3));
        acc = _mm256_fmadd_ps(part, _mm256_set1_ps(sr[g]), acc);
    }
    return hsum256(acc);
}

// One float32 row x against two int8 weight rows qr[0..1] (output columns n, n + 1; AVX2 + FMA), for groups that
// are a multiple of 32: as int4_cols2_avx2, one flat loop over 32-input chunks, the x chunk loaded once for both
// columns, each chunk's sum times its group's scale, and the next two rows prefetched. The sums are
// int8_row_avx2's up to float32 order.
static inline void int8_cols2_avx2(const int8_t *const qr[2], const float *const sr[2], int64_t group,
                                   int64_t num_groups, const float *x, float total[2]) {
    const int shift = __builtin_ctzll((unsigned long long)(group / 32));
    const int64_t next = 2 * group * num_groups;  // two rows of K bytes ahead
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < num_groups << shift; b++) {
        const float *xb = x + 32 * b;
        const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
        const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
        for (int j = 0; j < 2; j++) {
            const int8_t *qb = qr[j] + 32 * b;
            if ((b & 1) == 0) _mm_prefetch((const char *)(qb + next), _MM_HINT_T0);
            __m256 pa = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)qb))), x0);
            __m256 pb = _mm256_mul_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + 8)))), x1);
            pa = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + 16)))),
                                 x2, pa);
            pb = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qb + 24)))),
                                 x3, pb);
            acc[j] = _mm256_fmadd_ps(_mm256_add_ps(pa, pb), _mm256_broadcast_ss(sr[j] + (b >> shift)), acc[j]);
        }
    }
    total[0] = hsum256(acc[0]);
    total[1] = hsum256(acc[1]);
}

// Output columns [n0, n1) of out (out_dtype as store_out's; row stride out_stride) for every row of the float32
// x [rows, K]: two columns at a time where the groups allow (multiples of 32), int8_row_avx2 otherwise.
static void int8_columns_avx2(const int8_t *q, const float *scales, int64_t group, int64_t K, int64_t n0, int64_t n1,
                              const float *x, int64_t rows, void *out, int out_dtype, int64_t out_stride) {
    const int64_t num_groups = K / group;
    int64_t n = n0;
    if (group % 32 == 0)
        for (; n + 2 <= n1; n += 2) {
            const int8_t *qr[2] = {q + n * K, q + (n + 1) * K};
            const float *sr[2] = {scales + n * num_groups, scales + (n + 1) * num_groups};
            for (int64_t m = 0; m < rows; m++) {
                float total[2];
                int8_cols2_avx2(qr, sr, group, num_groups, x + m * K, total);
                store_out(out, out_dtype, m * out_stride + n, total[0]);
                store_out(out, out_dtype, m * out_stride + n + 1, total[1]);
            }
        }
    for (; n < n1; n++)
        for (int64_t m = 0; m < rows; m++)
            store_out(out, out_dtype, m * out_stride + n,
                      int8_row_avx2(q + n * K, scales + n * num_groups, group, num_groups, x + m * K));
}

// R (1 or 2) float32 rows of x against one int4 weight row (AVX2 + FMA): each 16-byte chunk of 32 nibbles is
// widened to float32 once for the R rows. Same sums as int4_gemm's other paths up to float32 order: s_g * sum(x q)
// plus b_g * sum(x) per group g (xsum [R, num_groups]: the groups' sums of x). One flat loop over the chunks, each
// chunk's sum times its group's scale, and the accumulators in named variables (as int4_cols2_avx2).
static inline __attribute__((always_inline)) void int4_rows_avx2(const int R, const uint8_t *qr,
                                                                  const uint16_t *sr, const uint16_t *br,
                                                                  int64_t group, int64_t num_groups, const float *x,
                                                                  int64_t K, const float *xsum, float *total) {
    const __m256i low = _mm256_set1_epi32(15);
    // The row's scales in float32, 8 conversions at a time: each chunk then broadcasts its group's from memory.
    float scale[num_groups];
    int64_t h = 0;
    for (; h + 8 <= num_groups; h += 8)
        _mm256_storeu_ps(scale + h, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sr + h))));
    for (; h < num_groups; h++) scale[h] = _cvtsh_ss(sr[h]);
    const int shift = __builtin_ctzll((unsigned long long)(group / 32));
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t b = 0; b < num_groups << shift; b++) {
        const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qr + 16 * b)));
        const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qr + 16 * b + 8)));
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(b0, low));  // inputs 0..7 of the chunk
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(b1, low));  // 8..15
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4));   // 16..23
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));   // 24..31
        const __m256 s = _mm256_broadcast_ss(scale + (b >> shift));
        const float *x0 = x + 32 * b;
        __m256 pa = _mm256_mul_ps(w0, _mm256_loadu_ps(x0)), pb = _mm256_mul_ps(w1, _mm256_loadu_ps(x0 + 8));
        pa = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x0 + 16), pa);
        pb = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x0 + 24), pb);
        acc0 = _mm256_fmadd_ps(_mm256_add_ps(pa, pb), s, acc0);
        if (R > 1) {
            const float *x1 = x0 + K;
            __m256 qa = _mm256_mul_ps(w0, _mm256_loadu_ps(x1)), qb = _mm256_mul_ps(w1, _mm256_loadu_ps(x1 + 8));
            qa = _mm256_fmadd_ps(w2, _mm256_loadu_ps(x1 + 16), qa);
            qb = _mm256_fmadd_ps(w3, _mm256_loadu_ps(x1 + 24), qb);
            acc1 = _mm256_fmadd_ps(_mm256_add_ps(qa, qb), s, acc1);
        }
    }
    int64_t g = 0;
    for (; g + 8 <= num_groups; g += 8) {  // the offsets, 8 groups at a time
        const __m256 bias = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(br + g)));
        acc0 = _mm256_fmadd_ps(bias, _mm256_loadu_ps(xsum + g), acc0);
        if (R > 1) acc1 = _mm256_fmadd_ps(bias, _mm256_loadu_ps(xsum + num_groups + g), acc1);
    }
    total[0] = hsum256(acc0);
    if (R > 1) total[1] = hsum256(acc1);
    for (int r = 0; r < R; r++)
        for (int64_t h2 = g; h2 < num_groups; h2++) total[r] += _cvtsh_ss(br[h2]) * xsum[r * num_groups + h2];
}

// One float32 row x against two int4 weight rows qr[0..1] (output columns n, n + 1; AVX2 + FMA): batch-1 decode.
// Each 32 inputs of x are loaded once for both columns, and their multiply-add chains run side by side (one column
// alone waits on its own chain, and pays its set-up and horizontal sum alone). Both columns' rows are read at
// once, two streams that the hardware prefetcher follows poorly once a row passes a few cache lines, so each
// cache line of them also prefetches the same line of the next two columns. The sums are those of int4_rows_avx2
// up to float32 order. 1.04-1.35x the one-column loop it replaced on a 2-core AVX2 EPYC (benchmarks/packed_f32.py
// --against, BENCHMARKS.md).
static inline void int4_cols2_avx2(const uint8_t *const qr[2], const uint16_t *const sr[2],
                                   const uint16_t *const br[2], int64_t group, int64_t num_groups, const float *x,
                                   const float *xsum, float total[2]) {
    const __m256i low = _mm256_set1_epi32(15);
    const int64_t next = group * num_groups;  // two rows of K / 2 bytes ahead
    float scale[2][num_groups];
    for (int j = 0; j < 2; j++) {
        int64_t h = 0;
        for (; h + 8 <= num_groups; h += 8)
            _mm256_storeu_ps(scale[j] + h, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sr[j] + h))));
        for (; h < num_groups; h++) scale[j][h] = _cvtsh_ss(sr[j][h]);
    }
    // One flat loop over the 32-input chunks, each chunk's sum times its group's scale (nested loops over groups
    // and their chunks cost more than a chunk's work). Groups are 32 << shift inputs.
    const int shift = __builtin_ctzll((unsigned long long)(group / 32));
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < num_groups << shift; b++) {
        const float *xb = x + 32 * b;
        const __m256 x0 = _mm256_loadu_ps(xb), x1 = _mm256_loadu_ps(xb + 8);
        const __m256 x2 = _mm256_loadu_ps(xb + 16), x3 = _mm256_loadu_ps(xb + 24);
        for (int j = 0; j < 2; j++) {
            if ((b & 3) == 0) _mm_prefetch((const char *)(qr[j] + 16 * b + next), _MM_HINT_T0);
            const __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qr[j] + 16 * b)));
            const __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qr[j] + 16 * b + 8)));
            __m256 pa = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b0, low)), x0);  // inputs 0..7
            __m256 pb = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b1, low)), x1);  // 8..15
            pa = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), x2, pa);     // 16..23
            pb = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)), x3, pb);     // 24..31
            acc[j] = _mm256_fmadd_ps(_mm256_add_ps(pa, pb), _mm256_broadcast_ss(scale[j] + (b >> shift)), acc[j]);
        }
    }
    int64_t g = 0;
    for (; g + 8 <= num_groups; g += 8) {  // the offsets, 8 groups at a time
        const __m256 xs = _mm256_loadu_ps(xsum + g);
        for (int j = 0; j < 2; j++)
            acc[j] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(br[j] + g))), xs, acc[j]);
    }
    for (int j = 0; j < 2; j++) {
        total[j] = hsum256(acc[j]);
        for (int64_t h = g; h < num_groups; h++) total[j] += _cvtsh_ss(br[j][h]) * xsum[h];
    }
}

// Output columns [n0, n1) for one row of x (int4_cols2_avx2 two at a time, int4_rows_avx2 for an odd last one).
static void int4_row_columns_avx2(const uint8_t *q, const uint16_t *scales, const uint16_t *offsets, int64_t group,
                                  int64_t K, int64_t n0, int64_t n1, const float *x, const float *xsum, void *out,
                                  int out_dtype) {
    const int64_t num_groups = K / group;
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) {
        const uint8_t *qr[2];
        const uint16_t *sr[2], *br[2];
        for (int j = 0; j < 2; j++) {
            qr[j] = q + (n + j) * (K / 2);
            sr[j] = scales + (n + j) * num_groups;
            br[j] = offsets + (n + j) * num_groups;
        }
        float total[2];
        int4_cols2_avx2(qr, sr, br, group, num_groups, x, xsum, total);
        for (int j = 0; j < 2; j++) store_out(out, out_dtype, n + j, total[j]);
    }
    for (; n < n1; n++) {
        float total;
        int4_rows_avx2(1, q + n * (K / 2), scales + n * num_groups, offsets + n * num_groups, group, num_groups, x,
                       K, xsum, &total);
        store_out(out, out_dtype, n, total);
    }
}

// Output column n of out (out_dtype as store_out's; row stride out_stride) for every row of the float32 x [rows,
// K] with its group sums xsum [rows, K / group], two rows at a time.
static void int4_column_avx2(const uint8_t *q, const uint16_t *scales, const uint16_t *offsets, int64_t group,
                             int64_t K, int64_t n, const float *x, const float *xsum, int64_t rows, void *out,
                             int out_dtype, int64_t out_stride) {
    const int64_t num_groups = K / group;
    const uint8_t *qr = q + n * (K / 2);
    const uint16_t *sr = scales + n * num_groups, *br = offsets + n * num_groups;
    for (int64_t m0 = 0; m0 < rows; m0 += 2) {
        float total[2];
        const float *xs = xsum + m0 * num_groups;
        if (rows - m0 >= 2)
            int4_rows_avx2(2, qr, sr, br, group, num_groups, x + m0 * K, K, xs, total);
        else
            int4_rows_avx2(1, qr, sr, br, group, num_groups, x + m0 * K, K, xs, total);
        for (int i = 0; i < 2 && m0 + i < rows; i++) store_out(out, out_dtype, (m0 + i) * out_stride + n, total[i]);
    }
}
#endif

#ifdef TOKENMILL_AVX512_BF16
// Prefetch the column PREFETCH_BYTES of weights (at least one column) after the one at q: its weight_bytes of q
// and scale_bytes of scales, columns being contiguous in both.
static inline void prefetch_ahead(const void *q, int64_t weight_bytes, const void *scales, int64_t scale_bytes,
                                  int64_t column_bytes) {
    const int64_t ahead = PREFETCH_BYTES / column_bytes > 0 ? PREFETCH_BYTES / column_bytes : 1;
    const char *qa = (const char *)q + ahead * weight_bytes, *sa = (const char *)scales + ahead * scale_bytes;
    for (int64_t b = 0; b < weight_bytes; b += 64) _mm_prefetch(qa + b, _MM_HINT_T0);
    for (int64_t b = 0; b < scale_bytes; b += 64) _mm_prefetch(sa + b, _MM_HINT_T0);
}

// One int8 weight row against one float32 row of x, groups a multiple of 16: two groups at a time on two
// accumulators (one accumulator's chain of multiply-adds, a group apart, bound the loop before).
static inline __m512 int8_group_avx512(const int8_t *qg, const float *xg, int64_t group) {
    __m512 part = _mm512_setzero_ps();
    for (int64_t c = 0; c < group; c += 16) {
        const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qg + c))));
        part = _mm512_fmadd_ps(w, _mm512_loadu_ps(xg + c), part);
    }
    return part;
}

static inline float int8_row_avx512(const int8_t *qr, const float *sr, int64_t group, int64_t num_groups,
                                    const float *xr) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t g = 0;
    for (; g + 1 < num_groups; g += 2) {
        acc0 = _mm512_fmadd_ps(int8_group_avx512(qr + g * group, xr + g * group, group), _mm512_set1_ps(sr[g]),
                               acc0);
        acc1 = _mm512_fmadd_ps(int8_group_avx512(qr + (g + 1) * group, xr + (g + 1) * group, group),
                               _mm512_set1_ps(sr[g + 1]), acc1);
    }
    if (g < num_groups)
        acc0 = _mm512_fmadd_ps(int8_group_avx512(qr + g * group, xr + g * group, group), _mm512_set1_ps(sr[g]),
                               acc0);
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// Output columns [n0, n1) of out [rows, N] (dtype out_dtype, row stride out_stride) for x [rows, K] float32
// contiguous, a column at a time with the next ones prefetched: int8_gemm's kernel below MIN_BLOCKED_ROWS rows.
static void int8_columns_avx512(const float *xf, int64_t rows, int64_t K, const int8_t *q, const float *scales,
                                int64_t group, void *out, int out_dtype, int64_t out_stride, int64_t n0, int64_t n1) {
    const int64_t num_groups = K / group;
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *qr = q + n * K;
        const float *sr = scales + n * num_groups;
        prefetch_ahead(qr, K, sr, num_groups * (int64_t)sizeof(float), K);
        for (int64_t m = 0; m < rows; m++)
            store_out(out, out_dtype, m * out_stride + n, int8_row_avx512(qr, sr, group, num_groups, xf + m * K));
    }
}
#endif

// int8_gemm's sums below 4 rows on output columns [n0, n1) only, on the caller's thread, for callers that split
// the columns over threads of their own (decode_layer.c's bfloat16 step, which converts x once per projection):
// x [rows, K] contiguous float32, out in out_dtype (the activations' code) with row stride out_stride. Returns -2
// without AVX512-BF16 (the caller uses int8_gemm).
int int8_gemv_columns(const float *x, int64_t rows, int64_t K, const int8_t *q, const float *scales, int64_t group,
                      void *out, int out_dtype, int64_t out_stride, int64_t n0, int64_t n1) {
#ifdef TOKENMILL_AVX512_BF16
    if (rows >= MIN_BLOCKED_ROWS) return -2;
    int8_columns_avx512(x, rows, K, q, scales, group, out, out_dtype, out_stride, n0, n1);
    return 0;
#else
    (void)x, (void)rows, (void)K, (void)q, (void)scales, (void)group, (void)out, (void)out_dtype, (void)out_stride;
    (void)n0, (void)n1;
    return -2;
#endif
}

// out[m, n] = sum_k x[m, k] * scales[n, k / group] * q[n, k]; out dtype as x's (row stride out_stride).
// group is a multiple of 16 dividing K. Returns 0, or -1 when memory runs out.
int int8_gemm(const void *x, int x_dtype, int64_t x_stride, const int8_t *q, const float *scales, int64_t group,
              void *out, int64_t out_stride, int64_t M, int64_t N, int64_t K, int num_threads) {
    float *xf = to_f32(x, x_dtype, x_stride, M, K);
    if (xf == NULL) return -1;
    const int64_t num_groups = K / group;
#if defined(TOKENMILL_AVX2) && !defined(TOKENMILL_AVX512_BF16)
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += 16)
        int8_columns_avx2(q, scales, group, K, n0, n0 + 16 < N ? n0 + 16 : N, xf, M, out, x_dtype, out_stride);
    free(xf);
    return 0;
#endif
#ifdef TOKENMILL_AVX512_BF16
    if (M < MIN_BLOCKED_ROWS) {  // contiguous ranges of columns per thread, for the prefetch
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += 16)
            int8_columns_avx512(xf, M, K, q, scales, group, out, x_dtype, out_stride, n0, n0 + 16 < N ? n0 + 16 : N);
        free(xf);
        return 0;
    }
#endif
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *qr = q + n * K;
        const float *sr = scales + n * num_groups;
#ifdef TOKENMILL_AVX512_BF16
        {  // MIN_BLOCKED_ROWS rows or more: blocks of ROW_BLOCK rows
            for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
                __m512 acc[ROW_BLOCK], part[ROW_BLOCK];
                for (int i = 0; i < ROW_BLOCK; i++) acc[i] = _mm512_setzero_ps();
                for (int64_t g = 0; g < num_groups; g++) {
                    for (int i = 0; i < ROW_BLOCK; i++) part[i] = _mm512_setzero_ps();
                    for (int64_t c = g * group; c < (g + 1) * group; c += 16) {
                        const __m512 w =
                            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qr + c))));
                        for (int i = 0; i < ROW_BLOCK; i++)
                            part[i] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xf + (m0 + i) * K + c), part[i]);
                    }
                    const __m512 s = _mm512_set1_ps(sr[g]);
                    for (int i = 0; i < ROW_BLOCK; i++) acc[i] = _mm512_fmadd_ps(part[i], s, acc[i]);
                }
                for (int i = 0; i < ROW_BLOCK && m0 + i < M; i++) {
                    const float total = _mm512_reduce_add_ps(acc[i]);
                    store_out(out, x_dtype, (m0 + i) * out_stride + n, total);
                }
            }
            continue;
        }
#endif
        for (int64_t m = 0; m < M; m++) {
            const float *xr = xf + m * K;
#if defined(TOKENMILL_AVX2)
            const float total = int8_row_avx2(qr, sr, group, num_groups, xr);
#else
            float acc[16] = {0};
            for (int64_t g = 0; g < num_groups; g++) {
                const float s = sr[g];
                const int8_t *qg = qr + g * group;
                const float *xg = xr + g * group;
                for (int64_t c = 0; c < group; c += 16) {
                    float part[16];
                    for (int l = 0; l < 16; l++) part[l] = xg[c + l] * (float)qg[c + l];
                    for (int l = 0; l < 16; l++) acc[l] += part[l] * s;
                }
            }
            float total = 0.f;
            for (int l = 0; l < 16; l++) total += acc[l];
#endif
            store_out(out, x_dtype, m * out_stride + n, total);
        }
    }
    free(xf);
    return 0;
}

// w [N, K] = scales[n, k / group] * q[n, k] in w_dtype (0 float32, 1 bfloat16): the float32 product, exact for
// an 8-bit q and a float32 scale up to one rounding, then rounded to bfloat16 for w_dtype 1.
void int8_dequant(const int8_t *q, const float *scales, int64_t group, void *w, int w_dtype, int64_t N, int64_t K,
                  int num_threads) {
    const int64_t num_groups = K / group;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < num_groups; g++) {
            const float s = scales[n * num_groups + g];
            int64_t k = g * group;
            const int8_t *qn = q + n * K;
#ifdef TOKENMILL_AVX512_BF16
            if (w_dtype == 1)
                for (; k < (g + 1) * group; k += 16) {
                    const __m512 v = _mm512_mul_ps(
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qn + k)))),
                        _mm512_set1_ps(s));
                    _mm256_storeu_si256((__m256i *)((uint16_t *)w + n * K + k), (__m256i)_mm512_cvtneps_pbh(v));
                }
#endif
#ifdef TOKENMILL_AVX2
            if (w_dtype == 0)
                for (; k + 8 <= (g + 1) * group; k += 8)
                    _mm256_storeu_ps((float *)w + n * K + k,
                                     _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                       _mm_loadl_epi64((const __m128i *)(qn + k)))),
                                                   _mm256_set1_ps(s)));
#endif
            for (; k < (g + 1) * group; k++) {
                if (w_dtype == 0)
                    ((float *)w)[n * K + k] = (float)qn[k] * s;
                else
                    ((uint16_t *)w)[n * K + k] = f32_to_bf16(s * (float)qn[k]);
            }
        }
    }
}

static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (mant << 13);  // inf / NaN
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (mant << 13);
    } else if (mant == 0) {
        bits = sign;
    } else {  // subnormal: normalize
        exp = 113u;
        while (!(mant & 0x400u)) {
            mant <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

// int4 weights, tokenmill's layout: q uint8 [N, K / 2] where, in each chunk of 32 inputs, byte i holds input i in
// its low nibble and input i + 16 in its high nibble (llama.cpp's order within a block); scales and offsets
// float16 [N, K / group]: w[n, k] = q[n, k] * scales[n, k / group] + offsets[n, k / group].
//
// out[m, n] = sum_g (s_g * sum_{k in g} x[m, k] q[n, k] + b_g * sum_{k in g} x[m, k]); out dtype as x's.
// group is a multiple of 32 dividing K. Returns 0, or -1 when memory runs out.
int int4_gemm(const void *x, int x_dtype, int64_t x_stride, const uint8_t *q, const uint16_t *scales,
              const uint16_t *offsets, int64_t group, void *out, int64_t out_stride, int64_t M, int64_t N, int64_t K,
              int num_threads) {
    float *xf = to_f32(x, x_dtype, x_stride, M, K);
    if (xf == NULL) return -1;
    const int64_t num_groups = K / group;
    const int64_t padded = (M + ROW_BLOCK - 1) / ROW_BLOCK * ROW_BLOCK;
    float *xsum = (float *)calloc((size_t)(padded * num_groups), sizeof(float));
    if (xsum == NULL) {
        free(xf);
        return -1;
    }
    int4_group_sums(xf, M, K, group, xsum);
#if defined(TOKENMILL_AVX2) && !defined(TOKENMILL_AVX512_BF16)
    if (M == 1) {  // batch-1 decode: two columns at a time
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += 16)
            int4_row_columns_avx2(q, scales, offsets, group, K, n0, n0 + 16 < N ? n0 + 16 : N, xf, xsum, out, x_dtype);
        free(xsum);
        free(xf);
        return 0;
    }
#endif
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *qr = q + n * (K / 2);
        const uint16_t *sr = scales + n * num_groups, *br = offsets + n * num_groups;
#ifdef TOKENMILL_AVX512_BF16
        if (M >= MIN_BLOCKED_ROWS) {
            const __m512i low = _mm512_set1_epi32(15);
            for (int64_t m0 = 0; m0 < M; m0 += ROW_BLOCK) {
                __m512 acc[ROW_BLOCK], part[ROW_BLOCK];
                float bias_total[ROW_BLOCK];
                for (int i = 0; i < ROW_BLOCK; i++) {
                    acc[i] = _mm512_setzero_ps();
                    bias_total[i] = 0.f;
                }
                for (int64_t g = 0; g < num_groups; g++) {
                    const float b = _cvtsh_ss(br[g]);
                    for (int i = 0; i < ROW_BLOCK; i++) {
                        bias_total[i] += b * xsum[(m0 + i) * num_groups + g];
                        part[i] = _mm512_setzero_ps();
                    }
                    for (int64_t c = g * group; c < (g + 1) * group; c += 32) {
                        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qr + c / 2)));
                        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, low));
                        const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
                        for (int i = 0; i < ROW_BLOCK; i++) {
                            const float *xr = xf + (m0 + i) * K + c;
                            part[i] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr), part[i]);
                            part[i] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), part[i]);
                        }
                    }
                    const __m512 s = _mm512_set1_ps(_cvtsh_ss(sr[g]));
                    for (int i = 0; i < ROW_BLOCK; i++) acc[i] = _mm512_fmadd_ps(part[i], s, acc[i]);
                }
                for (int i = 0; i < ROW_BLOCK && m0 + i < M; i++) {
                    const float total = bias_total[i] + _mm512_reduce_add_ps(acc[i]);
                    store_out(out, x_dtype, (m0 + i) * out_stride + n, total);
                }
            }
            continue;
        }
#elif defined(TOKENMILL_AVX2)
        int4_column_avx2(q, scales, offsets, group, K, n, xf, xsum, M, out, x_dtype, out_stride);
        continue;
#endif
        for (int64_t m = 0; m < M; m++) {
            const float *xr = xf + m * K;
            float bias_total = 0.f;
#ifdef TOKENMILL_AVX512_BF16
            const __m512i low = _mm512_set1_epi32(15);
            __m512 acc = _mm512_setzero_ps();
            for (int64_t g = 0; g < num_groups; g++) {
                bias_total += _cvtsh_ss(br[g]) * xsum[m * num_groups + g];
                __m512 part = _mm512_setzero_ps();
                for (int64_t c = g * group; c < (g + 1) * group; c += 32) {
                    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qr + c / 2)));
                    const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(b, low));
                    const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
                    part = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xr + c), part);
                    part = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + c + 16), part);
                }
                acc = _mm512_fmadd_ps(part, _mm512_set1_ps(_cvtsh_ss(sr[g])), acc);
            }
            const float total = bias_total + _mm512_reduce_add_ps(acc);
#else
            float acc[16] = {0};
            for (int64_t g = 0; g < num_groups; g++) {
                const float s = f16_to_f32(sr[g]);
                bias_total += f16_to_f32(br[g]) * xsum[m * num_groups + g];
                float part[16] = {0};
                for (int64_t c = g * group; c < (g + 1) * group; c += 32) {
                    const uint8_t *qc = qr + c / 2;
                    for (int l = 0; l < 16; l++)
                        part[l] += xr[c + l] * (float)(qc[l] & 15) + xr[c + 16 + l] * (float)(qc[l] >> 4);
                }
                for (int l = 0; l < 16; l++) acc[l] += part[l] * s;
            }
            float total = bias_total;
            for (int l = 0; l < 16; l++) total += acc[l];
#endif
            store_out(out, x_dtype, m * out_stride + n, total);
        }
    }
    free(xsum);
    free(xf);
    return 0;
}

// xsum [rows, K / group] = each group's sum of x [rows, K] (float32, contiguous), as int4_gemm sums them.
void int4_group_sums(const float *x, int64_t rows, int64_t K, int64_t group, float *xsum) {
    const int64_t num_groups = K / group;
    for (int64_t m = 0; m < rows; m++)
        for (int64_t g = 0; g < num_groups; g++) {
            float t = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) t += x[m * K + k];
            xsum[m * num_groups + g] = t;
        }
}

// int4_gemm's and int8_gemm's float32 sums on output columns [n0, n1) only, on the caller's thread, for callers
// that split the columns over threads of their own (decode_layer.c's float32 step): x [rows, K] contiguous
// float32, xsum its group sums (int4_group_sums), out float32 with row stride out_stride. With AVX2 the same
// sums as int4_gemm / int8_gemm on few rows, whatever the split; returns -2 without AVX2 (the caller uses those).
int int4_gemv_f32_columns(const float *x, const float *xsum, int64_t rows, int64_t K, const uint8_t *q,
                          const uint16_t *scales, const uint16_t *offsets, int64_t group, float *out,
                          int64_t out_stride, int64_t n0, int64_t n1) {
#ifdef TOKENMILL_AVX2
    if (rows == 1) {
        int4_row_columns_avx2(q, scales, offsets, group, K, n0, n1, x, xsum, out, 0);
        return 0;
    }
    for (int64_t n = n0; n < n1; n++)
        int4_column_avx2(q, scales, offsets, group, K, n, x, xsum, rows, out, 0, out_stride);
    return 0;
#else
    (void)x, (void)xsum, (void)rows, (void)K, (void)q, (void)scales, (void)offsets, (void)group, (void)out;
    (void)out_stride, (void)n0, (void)n1;
    return -2;
#endif
}

int int8_gemv_f32_columns(const float *x, int64_t rows, int64_t K, const int8_t *q, const float *scales,
                          int64_t group, float *out, int64_t out_stride, int64_t n0, int64_t n1) {
#ifdef TOKENMILL_AVX2
    int8_columns_avx2(q, scales, group, K, n0, n1, x, rows, out, 0, out_stride);
    return 0;
#else
    (void)x, (void)rows, (void)K, (void)q, (void)scales, (void)group, (void)out, (void)out_stride, (void)n0, (void)n1;
    return -2;
#endif
}

#ifdef TOKENMILL_AVX512_BF16
// Row n of int4_dequant into bfloat16: the row's scales and offsets converted 16 groups at a time (F16C), then each
// chunk of 32 inputs as q * scale + offset in float32, rounded to bfloat16.
static void int4_dequant_row_bf16(const uint8_t *qr, const uint16_t *sr, const uint16_t *br, int64_t group,
                                  int64_t K, uint16_t *dst) {
    const int64_t num_groups = K / group;
    const __m512i nibble = _mm512_set1_epi32(15);
    float s[16], b[16];
    for (int64_t g0 = 0; g0 < num_groups; g0 += 16) {
        const int count = num_groups - g0 < 16 ? (int)(num_groups - g0) : 16;
        const __mmask16 m = tail_mask(count);
        _mm512_storeu_ps(s, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, sr + g0)));
        _mm512_storeu_ps(b, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, br + g0)));
        for (int j = 0; j < count; j++) {
            const __m512 vs = _mm512_set1_ps(s[j]), vb = _mm512_set1_ps(b[j]);
            for (int64_t c = (g0 + j) * group; c < (g0 + j + 1) * group; c += 32) {
                const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qr + c / 2)));
                const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, nibble)), vs, vb);
                const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), vs, vb);
                _mm512_storeu_si512((void *)(dst + c), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
        }
    }
}
#endif

// w [N, K] (dtype 0 float32, 1 bfloat16) from the int4 layout above.
void int4_dequant(const uint8_t *q, const uint16_t *scales, const uint16_t *offsets, int64_t group, void *w,
                  int w_dtype, int64_t N, int64_t K, int num_threads) {
    const int64_t num_groups = K / group;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *qr = q + n * (K / 2);
#ifdef TOKENMILL_AVX512_BF16
        if (w_dtype == 1) {
            int4_dequant_row_bf16(qr, scales + n * num_groups, offsets + n * num_groups, group, K,
                                  (uint16_t *)w + n * K);
            continue;
        }
#endif
        float row[32];
        for (int64_t c = 0; c < K; c += 32) {
            const int64_t g = c / group;
            const float s = f16_to_f32(scales[n * num_groups + g]), b = f16_to_f32(offsets[n * num_groups + g]);
#ifdef TOKENMILL_AVX2
            if (w_dtype == 0) {  // float32, 8 lanes: the same q * s + b as below
                const __m256 vs = _mm256_set1_ps(s), vb = _mm256_set1_ps(b);
                const __m256i low = _mm256_set1_epi32(15);
                float *dst = (float *)w + n * K + c;
                for (int half = 0; half < 2; half++) {
                    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qr + c / 2 + 8 * half)));
                    _mm256_storeu_ps(dst + 8 * half,
                                     _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(bytes, low)), vs, vb));
                    _mm256_storeu_ps(dst + 16 + 8 * half,
                                     _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4)), vs, vb));
                }
                continue;
            }
#endif
            for (int l = 0; l < 16; l++) {
                row[l] = (float)(qr[c / 2 + l] & 15) * s + b;
                row[l + 16] = (float)(qr[c / 2 + l] >> 4) * s + b;
            }
            if (w_dtype == 0)
                memcpy((float *)w + n * K + c, row, sizeof row);
            else
                for (int l = 0; l < 32; l++) ((uint16_t *)w)[n * K + c + l] = f32_to_bf16(row[l]);
        }
    }
}

// ---- Tile kernels: many activation rows, bfloat16 activations ----------------------------------------------------
//
// For each tile of TILE_COLS output columns, the quantized values q (int4: 0..15; int8: -127..127, both exact in
// bfloat16) are unpacked into a buffer of TILE_COLS x K bfloat16 that stays in the core's L2, next to the tile's
// group scales (and int4 offsets) in float32; then every activation row is multiplied against it with AVX512-BF16
// dot products (vdpbf16ps), summed per group in float32 and scaled there:
//   out[m, n] = sum_g (scales[n, g] * sum_{k in g} x[m, k] q[n, k] + offsets[n, g] * sum_{k in g} x[m, k]).
// So the weight is never rounded (the result is the packed kernels' up to the activations' bfloat16), and no
// bfloat16 copy of the whole weight is ever written: each thread reuses one tile buffer.
//
// Tile layout, the one vdpbf16ps wants for broadcast activations: [K / 2][TILE_VECS][16 lanes][2] bfloat16, where
// lane i of vector v at pair p holds q[n0 + 16 v + i, 2p] and q[n0 + 16 v + i, 2p + 1]. The activation pair
// x[m, 2p], x[m, 2p + 1] is broadcast as one 32-bit value, so each vdpbf16ps adds two products into 16 columns.
// Register block: TILE_ROWS rows x TILE_VECS vectors of 16 columns, twice (the group's sums and the totals).
#define TILE_VECS 2
#define TILE_COLS (16 * TILE_VECS)
#define TILE_ROWS 6

int tokenmill_quant_tile_vectorized(void) {
#ifdef TOKENMILL_AVX512_BF16
    return 1;
#else
    return 0;
#endif
}

#ifdef TOKENMILL_AVX512_BF16
#include <omp.h>

// One tile: the quantized values and, per group, TILE_VECS vectors of scales and (int4) of offsets.
typedef struct {
    __m512i *q;        // [K / 2][TILE_VECS]
    __m512 *scales;    // [num_groups][TILE_VECS]
    __m512 *offsets;   // [num_groups][TILE_VECS], or NULL (int8)
} Tile;

// out[r, 0:TILE_COLS] (bfloat16, masked to the valid columns) for r < rows. rows and with_offsets are
// compile-time constants in every call below, so the accumulators live in registers. xsum [rows][num_groups]:
// the activations' sums per group (int4 only).
static inline __attribute__((always_inline)) void tile_rows(const int rows, const int with_offsets, const uint16_t *x,
                                                            int64_t x_stride, const Tile *tile, const float *xsum,
                                                            int64_t num_groups, int64_t group_pairs, uint16_t *out,
                                                            int64_t out_stride, __mmask16 mask0, __mmask16 mask1) {
    __m512 acc[TILE_ROWS][TILE_VECS];
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < TILE_VECS; v++) acc[r][v] = _mm512_setzero_ps();
    const __m512i *q = tile->q;
    for (int64_t g = 0; g < num_groups; g++) {
        __m512 part[TILE_ROWS][TILE_VECS];
        for (int r = 0; r < rows; r++)
            for (int v = 0; v < TILE_VECS; v++) part[r][v] = _mm512_setzero_ps();
        for (int64_t p = g * group_pairs; p < (g + 1) * group_pairs; p++) {
            const __m512bh w0 = (__m512bh)_mm512_load_si512(q + p * TILE_VECS);
            const __m512bh w1 = (__m512bh)_mm512_load_si512(q + p * TILE_VECS + 1);
            for (int r = 0; r < rows; r++) {
                int32_t pair;
                memcpy(&pair, x + r * x_stride + 2 * p, sizeof pair);
                const __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);
                part[r][0] = _mm512_dpbf16_ps(part[r][0], w0, xb);
                part[r][1] = _mm512_dpbf16_ps(part[r][1], w1, xb);
            }
        }
        for (int v = 0; v < TILE_VECS; v++) {
            const __m512 s = tile->scales[g * TILE_VECS + v];
            for (int r = 0; r < rows; r++) acc[r][v] = _mm512_fmadd_ps(part[r][v], s, acc[r][v]);
            if (with_offsets) {
                const __m512 b = tile->offsets[g * TILE_VECS + v];
                for (int r = 0; r < rows; r++)
                    acc[r][v] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[r * num_groups + g]), b, acc[r][v]);
            }
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm256_mask_storeu_epi16(out + r * out_stride, mask0, (__m256i)_mm512_cvtneps_pbh(acc[r][0]));
        _mm256_mask_storeu_epi16(out + r * out_stride + 16, mask1, (__m256i)_mm512_cvtneps_pbh(acc[r][1]));
    }
}

// All M rows against one tile, TILE_ROWS at a time.
static void tile_matmul(const uint16_t *x, int64_t x_stride, const Tile *tile, const float *xsum, int64_t K,
                        int64_t group, uint16_t *out, int64_t out_stride, int64_t M, int64_t valid_cols) {
    const __mmask16 mask0 = tail_mask((int)(valid_cols < 16 ? valid_cols : 16));
    const __mmask16 mask1 = valid_cols > 16 ? tail_mask((int)(valid_cols - 16)) : (__mmask16)0;
    const int64_t num_groups = K / group, group_pairs = group / 2;
    for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
        const uint16_t *xr = x + m0 * x_stride;
        const float *sr = xsum != NULL ? xsum + m0 * num_groups : NULL;
        uint16_t *outr = out + m0 * out_stride;
        const int rows = M - m0 < TILE_ROWS ? (int)(M - m0) : TILE_ROWS;
        switch (rows + (xsum != NULL ? TILE_ROWS : 0)) {
#define TILE_CASE(R, OFFSETS)                                                                                   \
    case R + (OFFSETS ? TILE_ROWS : 0):                                                                         \
        tile_rows(R, OFFSETS, xr, x_stride, tile, sr, num_groups, group_pairs, outr, out_stride, mask0, mask1); \
        break;
            TILE_CASE(1, 0) TILE_CASE(2, 0) TILE_CASE(3, 0) TILE_CASE(4, 0) TILE_CASE(5, 0) TILE_CASE(6, 0)
            TILE_CASE(1, 1) TILE_CASE(2, 1) TILE_CASE(3, 1) TILE_CASE(4, 1) TILE_CASE(5, 1) TILE_CASE(6, 1)
#undef TILE_CASE
        }
    }
}

// Asks for bytes [p, p + n) in the cache ahead of use: the tile fills read the next tile's columns while filling
// this one's (0.89-0.96x the time of a fill without, at 16 rows).
static inline void prefetch_bytes(const void *p, int64_t n) {
    for (int64_t at = 0; at < n; at += 64) _mm_prefetch((const char *)p + at, _MM_HINT_T0);
}

// The 16 rows of columns n0 .. n0 + 15 (clamped to N - 1: columns past the end repeat the last one and are never
// stored), each row_bytes long.
static inline void column_rows(const uint8_t *base, int64_t row_bytes, int64_t n0, int64_t N, const uint8_t *rows[16],
                               int64_t index[16]) {
    for (int i = 0; i < 16; i++) {
        index[i] = n0 + i < N ? n0 + i : N - 1;
        rows[i] = base + index[i] * row_bytes;
    }
}

// Bytes [at, at + 16) of four rows as one vector (row r in bytes 16 r .. 16 r + 15).
static inline __m512i load4x16(const uint8_t *const rows[4], int64_t at) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(rows[0] + at)));
    v = _mm512_inserti64x2(v, _mm_loadu_si128((const __m128i *)(rows[1] + at)), 1);
    v = _mm512_inserti64x2(v, _mm_loadu_si128((const __m128i *)(rows[2] + at)), 2);
    return _mm512_inserti64x2(v, _mm_loadu_si128((const __m128i *)(rows[3] + at)), 3);
}

// Bytes [at, at + 16) of eight rows, split into their first halves (lo: qword i = row i's bytes at .. at + 7) and
// their second halves (hi: bytes at + 8 .. at + 15).
static inline void load8x16(const uint8_t *const rows[8], int64_t at, __m512i *lo, __m512i *hi) {
    const __m512i a = load4x16(rows, at), b = load4x16(rows + 4, at);
    *lo = _mm512_permutex2var_epi64(a, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14), b);
    *hi = _mm512_permutex2var_epi64(a, _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15), b);
}

// The tile of the int4 weight (layout of int4_gemm) for columns n0 .. n0 + TILE_COLS - 1; the next tile's bytes
// prefetched.
static void int4_fill_tile(const uint8_t *q, const uint16_t *scales, const uint16_t *offsets, int64_t group,
                           int64_t N, int64_t K, int64_t n0, const Tile *tile) {
    const int64_t num_groups = K / group;
    const __m512i nibble = _mm512_set1_epi32(15);
    if (n0 + 2 * TILE_COLS <= N) {
        prefetch_bytes(q + (n0 + TILE_COLS) * (K / 2), TILE_COLS * (K / 2));
        prefetch_bytes(scales + (n0 + TILE_COLS) * num_groups, TILE_COLS * num_groups * 2);
        prefetch_bytes(offsets + (n0 + TILE_COLS) * num_groups, TILE_COLS * num_groups * 2);
    }
    for (int v = 0; v < TILE_VECS; v++) {
        const uint8_t *rows[16];
        int64_t index[16];
        column_rows(q, K / 2, n0 + 16 * v, N, rows, index);
        // Lane by lane (a column's groups are contiguous), read as vectors only much later: a vector load of lanes
        // just stored one at a time waits for those stores.
        for (int i = 0; i < 16; i++)
            for (int64_t g = 0; g < num_groups; g++) {
                ((float *)&tile->scales[g * TILE_VECS + v])[i] = _cvtsh_ss(scales[index[i] * num_groups + g]);
                ((float *)&tile->offsets[g * TILE_VECS + v])[i] = _cvtsh_ss(offsets[index[i] * num_groups + g]);
            }
        for (int64_t c = 0; c < K; c += 32) {
            // [columns 0-7 | 8-15][bytes 0-7 | 8-15 of the chunk]
            __m512i src[2][2];
            load8x16(rows, c / 2, &src[0][0], &src[0][1]);
            load8x16(rows + 8, c / 2, &src[1][0], &src[1][1]);
#pragma GCC unroll 16
            for (int p = 0; p < 16; p++) {
                // Inputs 2p and 2p + 1 of the chunk: the low nibbles of bytes 2p, 2p + 1 (p < 8), else the high
                // nibbles of bytes 2p - 16, 2p - 15. multishift moves each nibble to the bottom of its lane:
                // lanes 2i, 2i + 1 of lo (hi) take column i's (8 + i's) two inputs.
                const int byte = (2 * p) & 15, half = byte >> 3, bit = 8 * (byte & 7) + (p >= 8 ? 4 : 0);
                const __m512i ctrl = _mm512_set1_epi64((int64_t)bit | ((int64_t)(bit + 8) << 32));
                const __m512 lo = _mm512_cvtepi32_ps(
                    _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, src[0][half]), nibble));
                const __m512 hi = _mm512_cvtepi32_ps(
                    _mm512_and_si512(_mm512_multishift_epi64_epi8(ctrl, src[1][half]), nibble));
                _mm512_store_si512(tile->q + (c / 2 + p) * TILE_VECS + v, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
        }
    }
}

// The tile of the int8 weight (layout of int8_gemm) for columns n0 .. n0 + TILE_COLS - 1, as int4_fill_tile.
static void int8_fill_tile(const int8_t *q, const float *scales, int64_t group, int64_t N, int64_t K, int64_t n0,
                           const Tile *tile) {
    const int64_t num_groups = K / group;
    if (n0 + 2 * TILE_COLS <= N) {
        prefetch_bytes(q + (n0 + TILE_COLS) * K, TILE_COLS * K);
        prefetch_bytes(scales + (n0 + TILE_COLS) * num_groups, TILE_COLS * num_groups * 4);
    }
    for (int v = 0; v < TILE_VECS; v++) {
        const uint8_t *rows[16];
        int64_t index[16];
        column_rows((const uint8_t *)q, K, n0 + 16 * v, N, rows, index);
        for (int i = 0; i < 16; i++)
            for (int64_t g = 0; g < num_groups; g++)
                ((float *)&tile->scales[g * TILE_VECS + v])[i] = scales[index[i] * num_groups + g];
        for (int64_t c = 0; c < K; c += 16) {
            __m512i src[2][2];
            load8x16(rows, c, &src[0][0], &src[0][1]);
            load8x16(rows + 8, c, &src[1][0], &src[1][1]);
#pragma GCC unroll 8
            for (int p = 0; p < 8; p++) {
                // Inputs 2p and 2p + 1: multishift puts each byte at the top of its lane, the arithmetic shift
                // sign-extends it.
                const int half = p >> 2, bit = 16 * (p & 3);
                const __m512i ctrl = _mm512_set1_epi64((int64_t)bit << 24 | (int64_t)(bit + 8) << 56);
                const __m512 lo =
                    _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_multishift_epi64_epi8(ctrl, src[0][half]), 24));
                const __m512 hi =
                    _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_multishift_epi64_epi8(ctrl, src[1][half]), 24));
                _mm512_store_si512(tile->q + (c / 2 + p) * TILE_VECS + v, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            }
        }
    }
}

// One tile buffer per thread (values, scales, offsets), or NULL.
static void *tile_buffers(int64_t K, int64_t group, int num_threads, size_t *per_thread) {
    *per_thread = (size_t)(K / 2) * TILE_VECS * 64 + (size_t)(K / group) * TILE_VECS * 64 * 2;
    return aligned_alloc(64, *per_thread * (size_t)num_threads);
}

static Tile thread_tile(void *buffers, size_t per_thread, int64_t K, int64_t group, int with_offsets) {
    char *base = (char *)buffers + per_thread * (size_t)omp_get_thread_num();
    Tile tile;
    tile.q = (__m512i *)base;
    tile.scales = (__m512 *)(base + (size_t)(K / 2) * TILE_VECS * 64);
    tile.offsets = with_offsets ? tile.scales + (K / group) * TILE_VECS : NULL;
    return tile;
}

// ---- The tile kernels on AMX -------------------------------------------------------------------------------------
//
// On CPUs with AMX the weight is the A operand of TDPBF16PS: 16 output columns, each column's 32 inputs of a chunk in
// order, filled straight from the column's packed bytes (an int4 nibble becomes its bfloat16 by a table lookup;
// nothing is interleaved across columns, so the fill costs a fraction of the tile above). The activations are the B
// operand, laid out once per call in pairs of inputs (amx_layout_x). One TDPBF16PS then gives one chunk's products,
// exact, summed in float32, for 16 columns x 16 rows; per group they accumulate in a tile register, are stored, and
// are scaled into 16 vectors of running sums, one per column, its scale and (int4) offset broadcast:
//   sums[n] += scales[n, g] * (the group's sums for column n) + offsets[n, g] * (the rows' sums of x over g).
// Groups go through a pipeline (amx_multiply) so that no step waits for the one just before it. Against the AMX
// multiply of the tile above (16 activation rows as the A operand, its sums scaled 16 rows x 2 vectors at a time):
// 1.02-1.78x at 8-256 rows on SmolLM2-135M's shapes (benchmarks/packed_bf16.py --tile, BENCHMARKS.md).
#define AMX_COLS 16  // output columns a weight tile
#ifdef TOKENMILL_AMX
// Tile registers (literal numbers: the intrinsics paste them into the instruction): two sets of sums, weight and
// activations, used by alternate groups.
#define TILE_C0 0
#define TILE_W0 1
#define TILE_X0 2
#define TILE_C1 3
#define TILE_W1 4
#define TILE_X1 5

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

// Loads the tile configuration on the calling thread: six tiles of 16 rows x 64 bytes.
static void amx_configure(void) {
    TileConfig config;
    memset(&config, 0, sizeof config);
    config.palette_id = 1;
    for (int t = 0; t < 6; t++) {
        config.colsb[t] = 64;
        config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
}

typedef struct {
    uint16_t *w;     // [K / 32][AMX_COLS][32] bfloat16
    float *scales;   // [num_groups][AMX_COLS]
    float *offsets;  // [num_groups][AMX_COLS], or NULL (int8)
    float *staging;  // int4: [2][AMX_COLS][num_groups], the columns' scales and offsets before their transpose
} AmxTile;

// Lane i: i * step (gather offsets of 16 rows or columns step elements apart).
static inline __m512i lanes_times(int32_t step) {
    return _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                              _mm512_set1_epi32(step));
}

// Columns n0 .. n0 + AMX_COLS - 1 of the int4 weight (layout of int4_gemm; clamped as column_rows does); the next
// tile's columns prefetched. Each column's scales and offsets are converted 16 groups at a time; each chunk of 32
// inputs is one byte permute (its 16 bytes into both halves of 32 words), one variable shift (0 in the first half,
// 4 in the second: low nibbles, then high), a mask and a table lookup (the nibble's bfloat16).
static void amx_fill_int4(const uint8_t *q, const uint16_t *scales, const uint16_t *offsets, int64_t group,
                          int64_t N, int64_t K, int64_t n0, const AmxTile *t) {
    const int64_t num_groups = K / group;
    static const uint16_t bf16_of[32] = {0,      0x3f80, 0x4000, 0x4040, 0x4080, 0x40a0, 0x40c0, 0x40e0,
                                         0x4100, 0x4110, 0x4120, 0x4130, 0x4140, 0x4150, 0x4160, 0x4170};
    static const uint16_t byte_of_word[32] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                              0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    static const uint16_t shift_of_word[32] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                               4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4};
    const __m512i values = _mm512_loadu_si512(bf16_of), nibble = _mm512_set1_epi16(15);
    // As byte indices: word j's low byte from byte byte_of_word[j], its high byte zeroed by the mask.
    const __m512i spread = _mm512_loadu_si512(byte_of_word), shifts = _mm512_loadu_si512(shift_of_word);
    const __mmask64 low_bytes = 0x5555555555555555ull;
    const uint8_t *rows[AMX_COLS];
    int64_t index[AMX_COLS];
    column_rows(q, K / 2, n0, N, rows, index);
    for (int i = 0; i < AMX_COLS; i++) {
        const int64_t n = index[i];
        const uint8_t *row = rows[i];
        if (n + AMX_COLS < N) prefetch_bytes(row + AMX_COLS * (K / 2), K / 2);
        for (int64_t g = 0; g < num_groups; g += 16) {
            const __mmask16 m = tail_mask(num_groups - g < 16 ? (int)(num_groups - g) : 16);
            _mm512_mask_storeu_ps(t->staging + i * num_groups + g, m,
                                  _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, scales + n * num_groups + g)));
            _mm512_mask_storeu_ps(t->staging + (AMX_COLS + i) * num_groups + g, m,
                                  _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, offsets + n * num_groups + g)));
        }
        uint16_t *dst = t->w + i * 32;  // chunk c / 32 of column i: t->w + ((c / 32) * AMX_COLS + i) * 32
        for (int64_t c = 0; c < K; c += 32, dst += AMX_COLS * 32) {
            const __m512i bytes = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(row + c / 2)));
            const __m512i words = _mm512_maskz_permutexvar_epi8(low_bytes, spread, bytes);
            const __m512i nibbles = _mm512_and_si512(_mm512_srlv_epi16(words, shifts), nibble);
            _mm512_store_si512(dst, _mm512_permutexvar_epi16(nibbles, values));
        }
    }
    // Group by group, the 16 columns' scales and offsets side by side (amx_multiply broadcasts them from one line).
    const __m512i across = lanes_times((int32_t)num_groups);
    for (int64_t g = 0; g < num_groups; g++) {
        _mm512_store_ps(t->scales + g * AMX_COLS, _mm512_i32gather_ps(across, t->staging + g, 4));
        _mm512_store_ps(t->offsets + g * AMX_COLS,
                        _mm512_i32gather_ps(across, t->staging + AMX_COLS * num_groups + g, 4));
    }
}

// The same for the int8 weight (layout of int8_gemm).
static void amx_fill_int8(const int8_t *q, const float *scales, int64_t group, int64_t N, int64_t K, int64_t n0,
                          const AmxTile *t) {
    const int64_t num_groups = K / group;
    const uint8_t *rows[AMX_COLS];
    int64_t index[AMX_COLS];
    column_rows((const uint8_t *)q, K, n0, N, rows, index);
    for (int i = 0; i < AMX_COLS; i++) {
        const int64_t n = index[i];
        const int8_t *row = (const int8_t *)rows[i];
        if (n + AMX_COLS < N) prefetch_bytes(row + AMX_COLS * K, K);
        for (int64_t c = 0; c < K; c += 32) {
            const __m256i bytes = _mm256_loadu_si256((const __m256i *)(row + c));
            const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(bytes)));
            const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(bytes, 1)));
            _mm512_store_si512(t->w + ((c / 32) * AMX_COLS + i) * 32, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
        }
    }
    // Group by group, the 16 columns' scales side by side, gathered from column_rows' columns (relative to n0).
    const __m512i columns = _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(_mm512_loadu_si512(index))),
                                               _mm512_cvtepi64_epi32(_mm512_loadu_si512(index + 8)), 1);
    const __m512i across = _mm512_mullo_epi32(_mm512_sub_epi32(columns, _mm512_set1_epi32((int32_t)n0)),
                                              _mm512_set1_epi32((int32_t)num_groups));
    const float *tile_scales = scales + n0 * num_groups;
    for (int64_t g = 0; g < num_groups; g++)
        _mm512_store_ps(t->scales + g * AMX_COLS, _mm512_i32gather_ps(across, tile_scales + g, 4));
}

// Group g of rows [16 b, 16 b + 16) of x [M, K] bfloat16 (row stride x_stride) as B operands, in xv [blocks][K / 32]
// [16 pairs of inputs][16 rows] (a pair: 32 bits; zero for rows past M); with xs given (int4), the rows' sums of x
// over the group in xs [blocks][num_groups][16 rows].
static void amx_layout_x(const uint16_t *x, int64_t x_stride, int64_t M, int64_t K, int64_t group, int64_t b,
                         int64_t g, uint32_t *xv, float *xs) {
    const __m512i rows = lanes_times((int32_t)x_stride);  // in bfloat16 units
    const __mmask16 valid = tail_mask(M - 16 * b < 16 ? (int)(M - 16 * b) : 16);
    const __m512i high = _mm512_set1_epi32((int32_t)0xffff0000u);
    const uint16_t *xb = x + 16 * b * x_stride;
    __m512 sums = _mm512_setzero_ps();
    for (int64_t c = g * group; c < (g + 1) * group; c += 32)
        for (int p = 0; p < 16; p++) {
            const __m512i pairs = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, rows, xb + c + 2 * p, 2);
            _mm512_store_si512(xv + ((b * (K / 32) + c / 32) * 16 + p) * 16, pairs);
            if (xs == NULL) continue;
            sums = _mm512_add_ps(sums, _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16)));
            sums = _mm512_add_ps(sums, _mm512_castsi512_ps(_mm512_and_si512(pairs, high)));
        }
    if (xs != NULL) _mm512_store_ps(xs + (b * (K / group) + g) * 16, sums);
}

// One group of one block of rows (xb: the block's B operands) into tile registers CT, WT, XT (stored later).
#define AMX_GROUP(CT, WT, XT, g)                                             \
    do {                                                                   \
        _tile_zero(CT);                                                    \
        for (int64_t c = (g) * group; c < ((g) + 1) * group; c += 32) {    \
            _tile_loadd(WT, t->w + (c / 32) * AMX_COLS * 32, 64);          \
            _tile_loadd(XT, xb + (c / 32) * 256, 64);                      \
            _tile_dpbf16ps(CT, WT, XT);                                    \
        }                                                                  \
    } while (0)

// One weight tile against all M rows (xv, xs: amx_layout_x's): out[m, 0:valid_cols] bfloat16 (row stride
// out_stride).
static void amx_multiply(const AmxTile *t, const uint32_t *xv, const float *xs, int64_t K, int64_t group, int64_t M,
                         uint16_t *out, int64_t out_stride, int64_t valid_cols) {
    const int64_t num_groups = K / group, chunks = K / 32, blocks = (M + 15) / 16;
    const __mmask16 mask = tail_mask((int)(valid_cols < AMX_COLS ? valid_cols : AMX_COLS));
    const __m512i across = lanes_times(16);
    float stored[3][AMX_COLS * 16] __attribute__((aligned(64)));  // three groups' sums: [column][row]
    for (int64_t b = 0; b < blocks; b++) {
        const uint32_t *xb = xv + b * chunks * 256;
        __m512 sums[AMX_COLS];  // column i's sums for the block's 16 rows
        for (int i = 0; i < AMX_COLS; i++) sums[i] = _mm512_setzero_ps();
        // A pipeline of three groups: g multiplies while g - 1 (multiplied before g) is stored and g - 2 (stored
        // before that) is scaled; each step waits for no result of the step before.
        for (int64_t g = 0; g < num_groups + 2; g++) {
            if (g < num_groups) {
                if (g & 1)
                    AMX_GROUP(TILE_C1, TILE_W1, TILE_X1, g);
                else
                    AMX_GROUP(TILE_C0, TILE_W0, TILE_X0, g);
            }
            if (g >= 1 && g <= num_groups) {
                if ((g - 1) & 1)
                    _tile_stored(TILE_C1, stored[(g - 1) % 3], 64);
                else
                    _tile_stored(TILE_C0, stored[(g - 1) % 3], 64);
            }
            if (g < 2) continue;
            const float *done = stored[(g - 2) % 3], *scale = t->scales + (g - 2) * AMX_COLS;
            if (t->offsets != NULL) {
                const __m512 x_sums = _mm512_load_ps(xs + (b * num_groups + g - 2) * 16);
                const float *offset = t->offsets + (g - 2) * AMX_COLS;
                for (int i = 0; i < AMX_COLS; i++)
                    sums[i] = _mm512_fmadd_ps(
                        _mm512_set1_ps(offset[i]), x_sums,
                        _mm512_fmadd_ps(_mm512_load_ps(done + 16 * i), _mm512_set1_ps(scale[i]), sums[i]));
            } else {
                for (int i = 0; i < AMX_COLS; i++)
                    sums[i] = _mm512_fmadd_ps(_mm512_load_ps(done + 16 * i), _mm512_set1_ps(scale[i]), sums[i]);
            }
        }
        // Column-major in registers, row-major out: each row gathered from the stored columns.
        for (int i = 0; i < AMX_COLS; i++) _mm512_store_ps(stored[0] + 16 * i, sums[i]);
        const int rows = M - 16 * b < 16 ? (int)(M - 16 * b) : 16;
        for (int j = 0; j < rows; j++)
            _mm256_mask_storeu_epi16(out + (16 * b + j) * out_stride, mask,
                                     (__m256i)_mm512_cvtneps_pbh(_mm512_i32gather_ps(across, stored[0] + j, 4)));
    }
}

// The int4 (offsets given) or int8 weight on AMX, on num_threads threads. Returns 0, or -1 when memory runs out.
static int amx_gemm(const uint16_t *x, int64_t x_stride, const void *q, const void *scales, const uint16_t *offsets,
                    int64_t group, uint16_t *out, int64_t out_stride, int64_t M, int64_t N,
                    int64_t K, int num_threads) {
    const int64_t num_groups = K / group, blocks = (M + 15) / 16;
    const size_t per_thread = (sizeof(uint16_t) * (size_t)(K * AMX_COLS)
                               + sizeof(float) * (size_t)(4 * num_groups * AMX_COLS) + 63) / 64 * 64;
    uint32_t *xv = aligned_alloc(64, sizeof(uint32_t) * (size_t)(blocks * (K / 32) * 256));
    float *xs = offsets != NULL ? aligned_alloc(64, sizeof(float) * (size_t)(blocks * num_groups * 16)) : NULL;
    char *buffers = aligned_alloc(64, per_thread * (size_t)num_threads);
    if (xv == NULL || (offsets != NULL && xs == NULL) || buffers == NULL) {
        free(xv), free(xs), free(buffers);
        return -1;
    }
    const int64_t num_tiles = (N + AMX_COLS - 1) / AMX_COLS;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t bg = 0; bg < blocks * num_groups; bg++)
            amx_layout_x(x, x_stride, M, K, group, bg / num_groups, bg % num_groups, xv, xs);
        char *base = buffers + per_thread * (size_t)omp_get_thread_num();
        AmxTile t;
        t.w = (uint16_t *)base;
        t.scales = (float *)(base + sizeof(uint16_t) * (size_t)(K * AMX_COLS));
        t.offsets = offsets != NULL ? t.scales + num_groups * AMX_COLS : NULL;
        t.staging = t.scales + 2 * num_groups * AMX_COLS;
        amx_configure();
#pragma omp for schedule(static)
        for (int64_t tile = 0; tile < num_tiles; tile++) {
            const int64_t n0 = tile * AMX_COLS;
            if (offsets != NULL)
                amx_fill_int4(q, scales, offsets, group, N, K, n0, &t);
            else
                amx_fill_int8(q, scales, group, N, K, n0, &t);
            amx_multiply(&t, xv, xs, K, group, M, out + n0, out_stride, N - n0 < AMX_COLS ? N - n0 : AMX_COLS);
        }
        _tile_release();
    }
    free(xv), free(xs), free(buffers);
    return 0;
}
#endif

// Every tile of the weight (int4 where offsets is given, else int8) on num_threads threads: filled, then multiplied
// (xsum: tile_matmul's). Returns 0, or -1 when memory runs out.
static int tile_gemm_bf16(const uint16_t *x, int64_t x_stride, const void *q, const void *scales,
                          const uint16_t *offsets, int64_t group, const float *xsum, uint16_t *out,
                          int64_t out_stride, int64_t M, int64_t N, int64_t K, int num_threads) {
    size_t per_thread;
    void *buffers = tile_buffers(K, group, num_threads, &per_thread);
    if (buffers == NULL) return -1;
    const int64_t num_tiles = (N + TILE_COLS - 1) / TILE_COLS;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t t = 0; t < num_tiles; t++) {
        const Tile tile = thread_tile(buffers, per_thread, K, group, offsets != NULL);
        const int64_t n0 = t * TILE_COLS;
        if (offsets != NULL)
            int4_fill_tile(q, scales, offsets, group, N, K, n0, &tile);
        else
            int8_fill_tile(q, scales, group, N, K, n0, &tile);
        tile_matmul(x, x_stride, &tile, xsum, K, group, out + n0, out_stride, M,
                    N - n0 < TILE_COLS ? N - n0 : TILE_COLS);
    }
    free(buffers);
    return 0;
}
#endif

// Whether the tile kernels multiply on AMX in this process: built with AMX, the group a multiple of 32 (one
// TDPBF16PS a chunk of 32 inputs), at least AMX_MIN_ROWS rows (the 16-row multiply is then mostly padding, but the
// fill is cheap: against the AVX512 tile kernel, int8 weights took 0.65-0.90x the time at 3 rows and 0.62-1.06x at
// 2, on SmolLM2-135M's shapes and 2 threads; int4 ones take the packed kernel at so few rows), and the kernel
// granting the process the tile state (asked once: Linux hands AMX's 8 KiB of tile registers only to processes
// that request them).
#define AMX_MIN_ROWS 3
static int amx_ready(void) {
#ifdef TOKENMILL_AMX
    static int state = -1;  // -1: not asked yet
    if (state < 0) {
        enum { ARCH_GET_XCOMP_PERM = 0x1022, ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18 };
        unsigned long features = 0;
        const long requested = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA);
        const long got = syscall(SYS_arch_prctl, ARCH_GET_XCOMP_PERM, &features);
        state = requested == 0 && got == 0 && (features & (1ul << XFEATURE_XTILEDATA)) != 0;
    }
    return state;
#else
    return 0;
#endif
}

int tokenmill_quant_tile_amx(void) { return amx_ready(); }

// Whether the tile kernels may multiply on AMX where amx_ready() (1, the default) or never (0, so that the AVX512
// tile kernels can be checked on a CPU with AMX too). Returns the setting before.
static int amx_allowed = 1;
int tokenmill_quant_use_amx(int allow) {
    const int before = amx_allowed;
    amx_allowed = allow != 0;
    return before;
}

// Whether a tile kernel call of M rows and this group multiplies on AMX.
static inline int amx_call(int64_t group, int64_t M) {
    return group % 32 == 0 && M >= AMX_MIN_ROWS && amx_allowed && amx_ready();
}

// out [M, N] bfloat16 (row stride out_stride) = x [M, K] bfloat16 (row stride x_stride) @ w.T, w the int4 weight
// of int4_gemm. Returns 0; -1 when memory runs out; -2 when built without AVX512-BF16 (use dequantize + GEMM).
int int4_tile_gemm(const uint16_t *x, int64_t x_stride, const uint8_t *q, const uint16_t *scales,
                   const uint16_t *offsets, int64_t group, uint16_t *out, int64_t out_stride, int64_t M, int64_t N,
                   int64_t K, int num_threads) {
#ifdef TOKENMILL_AVX512_BF16
#ifdef TOKENMILL_AMX
    if (amx_call(group, M))
        return amx_gemm(x, x_stride, q, scales, offsets, group, out, out_stride, M, N, K, num_threads);
#endif
    const int64_t num_groups = K / group;
    float *xsum = malloc(sizeof(float) * (size_t)(M * num_groups));
    if (xsum == NULL) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < num_groups; g++) {
            float t = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) t += bf16_to_f32(x[m * x_stride + k]);
            xsum[m * num_groups + g] = t;
        }
    const int status =
        tile_gemm_bf16(x, x_stride, q, scales, offsets, group, xsum, out, out_stride, M, N, K, num_threads);
    free(xsum);
    return status;
#else
    (void)x, (void)x_stride, (void)q, (void)scales, (void)offsets, (void)group, (void)out, (void)out_stride;
    (void)M, (void)N, (void)K, (void)num_threads;
    return -2;
#endif
}

// The same for the int8 weight of int8_gemm (group a multiple of 16 dividing K).
int int8_tile_gemm(const uint16_t *x, int64_t x_stride, const int8_t *q, const float *scales, int64_t group,
                   uint16_t *out, int64_t out_stride, int64_t M, int64_t N, int64_t K, int num_threads) {
#ifdef TOKENMILL_AVX512_BF16
#ifdef TOKENMILL_AMX
    if (amx_call(group, M))
        return amx_gemm(x, x_stride, q, scales, NULL, group, out, out_stride, M, N, K, num_threads);
#endif
    return tile_gemm_bf16(x, x_stride, q, scales, NULL, group, NULL, out, out_stride, M, N, K, num_threads);
#else
    (void)x, (void)x_stride, (void)q, (void)scales, (void)group, (void)out, (void)out_stride, (void)M, (void)N;
    (void)K, (void)num_threads;
    return -2;
#endif
}

// Tile kernels for int8 and int4 weights and float32 activations (AVX2 + FMA: the CPUs where --dtype auto runs
// float32).
// As the bfloat16 tile kernels above, for more rows than the packed kernel takes: 16 output columns at a time are
// unpacked into an exact float32 tile (q * scale, k-major: tile[k][j]) that stays in the core's cache, and every
// row is multiplied against it, 6 rows by 16 columns in registers, so the weight's bytes are read once and no
// dequantized copy of the whole weight is written. The products are those of the dequantized weight, summed in
// another order than oneDNN's. quant.py takes them up to max_tile_rows_f32 rows (measured there).
#define F32_TILE_COLS 16

int tokenmill_quant_tile_f32_vectorized(void) {
#ifdef TOKENMILL_AVX2
    return 1;
#else
    return 0;
#endif
}

#ifdef TOKENMILL_AVX2
// r[i] holds 8 consecutive inputs of column i; stores input kk's 8 columns at dst + kk * F32_TILE_COLS.
static inline void transpose_store_8x8(const __m256 r[8], float *dst) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(dst + i * F32_TILE_COLS, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * F32_TILE_COLS, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
    }
}

// The tile [K, 16] (k-major: the 16 columns' weights of input k side by side) of columns n0 .. n0 + cols - 1, zero
// beyond cols: 8 columns x 8 inputs at a time, each column's 8 weights widened and scaled in one vector, then the
// 8 x 8 block transposed in registers (a scalar fill, one strided store per weight, took as long as the GEMM on
// 64 rows). The same products q * scale as the scalar loop, so the same tile.
static void int8_fill_tile_f32(const int8_t *q, const float *scales, int64_t group, int64_t K, int64_t n0, int cols,
                               float *tile) {
    const int64_t num_groups = K / group;
    for (int jb = 0; jb < F32_TILE_COLS; jb += 8)
        for (int64_t k = 0; k < K; k += 8) {  // group is a multiple of 16: the 8 inputs share one scale
            __m256 r[8];
            for (int i = 0; i < 8; i++) {
                const int64_t n = n0 + jb + i;
                r[i] = jb + i < cols ? _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                         _mm_loadl_epi64((const __m128i *)(q + n * K + k)))),
                                                     _mm256_set1_ps(scales[n * num_groups + k / group]))
                                     : _mm256_setzero_ps();
            }
            transpose_store_8x8(r, tile + k * F32_TILE_COLS + jb);
        }
}

// The same for the int4 layout of int4_gemm: 8 inputs of a 32-input chunk are the low nibbles (inputs 0..15) or
// the high nibbles (16..31) of 8 consecutive bytes; w = q * scale + offset as int4_dequant computes it.
static void int4_fill_tile_f32(const uint8_t *q, const uint16_t *scales, const uint16_t *offsets, int64_t group,
                               int64_t K, int64_t n0, int cols, float *tile) {
    const int64_t num_groups = K / group;
    const __m256i low = _mm256_set1_epi32(15);
    for (int jb = 0; jb < F32_TILE_COLS; jb += 8)
        for (int64_t k = 0; k < K; k += 8) {
            const int64_t chunk = k / 32 * 16, within = k % 32;
            __m256 r[8];
            for (int i = 0; i < 8; i++) {
                const int64_t n = n0 + jb + i;
                if (jb + i >= cols) {
                    r[i] = _mm256_setzero_ps();
                    continue;
                }
                const __m256i bytes = _mm256_cvtepu8_epi32(
                    _mm_loadl_epi64((const __m128i *)(q + n * (K / 2) + chunk + within % 16)));
                const __m256i nibbles = within < 16 ? _mm256_and_si256(bytes, low) : _mm256_srli_epi32(bytes, 4);
                const int64_t g = n * num_groups + k / group;
                r[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(nibbles), _mm256_set1_ps(_cvtsh_ss(scales[g])),
                                       _mm256_set1_ps(_cvtsh_ss(offsets[g])));
            }
            transpose_store_8x8(r, tile + k * F32_TILE_COLS + jb);
        }
}

// Row r of x against the tile: its two accumulators c<r>0 and c<r>1 (columns 0..7, 8..15) take input k.
#define TILE_ROW_FMA(r)                                                     \
    if (R > r) {                                                            \
        const __m256 a = _mm256_broadcast_ss(x + r * x_stride + k);         \
        c##r##0 = _mm256_fmadd_ps(a, b0, c##r##0);                          \
        c##r##1 = _mm256_fmadd_ps(a, b1, c##r##1);                          \
    }
#define TILE_ROW_STORE(r)                                                   \
    if (R > r) {                                                            \
        float row[F32_TILE_COLS];                                           \
        _mm256_storeu_ps(row, c##r##0);                                     \
        _mm256_storeu_ps(row + 8, c##r##1);                                 \
        memcpy(out + r * out_stride + n0, row, sizeof(float) * (size_t)cols); \
    }

// R (1..6) rows of x against the tile: out[r][n0 + j] for j < cols. Six rows keep 12 accumulators in flight,
// enough to cover the multiply-add latency on two FMA ports. The accumulators are named variables, not an array:
// GCC kept an array's elements in registers but also stored all twelve to the stack on every input (2-3x slower).
static inline __attribute__((always_inline)) void tile_rows_f32(const int R, const float *x, int64_t x_stride,
                                                                 const float *tile, int64_t K, float *out,
                                                                 int64_t out_stride, int64_t n0, int cols) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00,
           c40 = c00, c41 = c00, c50 = c00, c51 = c00;
    for (int64_t k = 0; k < K; k++) {
        const __m256 b0 = _mm256_loadu_ps(tile + k * F32_TILE_COLS), b1 = _mm256_loadu_ps(tile + k * F32_TILE_COLS + 8);
        TILE_ROW_FMA(0)
        TILE_ROW_FMA(1)
        TILE_ROW_FMA(2)
        TILE_ROW_FMA(3)
        TILE_ROW_FMA(4)
        TILE_ROW_FMA(5)
    }
    TILE_ROW_STORE(0)
    TILE_ROW_STORE(1)
    TILE_ROW_STORE(2)
    TILE_ROW_STORE(3)
    TILE_ROW_STORE(4)
    TILE_ROW_STORE(5)
}
#undef TILE_ROW_FMA
#undef TILE_ROW_STORE
#endif

// out [M, N] (row stride out_stride) = x [M, K] (row stride x_stride) @ w.T, float32: a tile of 16 columns per
// task (int8_fill_tile_f32 or int4_fill_tile_f32: q int8 with float32 scales, or int4 with float16 scales and
// offsets), the tasks split over threads. Returns 0, -1 when memory runs out, -2 without AVX2.
static int tile_gemm_f32(const float *x, int64_t x_stride, const void *q, const void *scales, const uint16_t *offsets,
                         int64_t group, float *out, int64_t out_stride, int64_t M, int64_t N, int64_t K,
                         int num_threads) {
#ifdef TOKENMILL_AVX2
    const int64_t num_tiles = (N + F32_TILE_COLS - 1) / F32_TILE_COLS;
    int status = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *tile = aligned_alloc(64, (sizeof(float) * (size_t)(K * F32_TILE_COLS) + 63) / 64 * 64);
        if (tile == NULL) {
#pragma omp atomic write
            status = -1;
        }
#pragma omp for schedule(static)
        for (int64_t t = 0; t < num_tiles; t++) {
            if (tile == NULL) continue;
            const int64_t n0 = t * F32_TILE_COLS;
            const int cols = (int)(N - n0 < F32_TILE_COLS ? N - n0 : F32_TILE_COLS);
            if (offsets == NULL)
                int8_fill_tile_f32((const int8_t *)q, (const float *)scales, group, K, n0, cols, tile);
            else
                int4_fill_tile_f32((const uint8_t *)q, (const uint16_t *)scales, offsets, group, K, n0, cols, tile);
            int64_t m0 = 0;
            for (; m0 + 6 <= M; m0 += 6)
                tile_rows_f32(6, x + m0 * x_stride, x_stride, tile, K, out + m0 * out_stride, out_stride, n0, cols);
            for (; m0 + 2 <= M; m0 += 2)
                tile_rows_f32(2, x + m0 * x_stride, x_stride, tile, K, out + m0 * out_stride, out_stride, n0, cols);
            for (; m0 < M; m0++)
                tile_rows_f32(1, x + m0 * x_stride, x_stride, tile, K, out + m0 * out_stride, out_stride, n0, cols);
        }
        free(tile);
    }
    return status;
#else
    (void)x, (void)x_stride, (void)q, (void)scales, (void)offsets, (void)group, (void)out, (void)out_stride, (void)M;
    (void)N, (void)K, (void)num_threads;
    return -2;
#endif
}

int int8_tile_gemm_f32(const float *x, int64_t x_stride, const int8_t *q, const float *scales, int64_t group,
                       float *out, int64_t out_stride, int64_t M, int64_t N, int64_t K, int num_threads) {
    return tile_gemm_f32(x, x_stride, q, scales, NULL, group, out, out_stride, M, N, K, num_threads);
}

int int4_tile_gemm_f32(const float *x, int64_t x_stride, const uint8_t *q, const uint16_t *scales,
                       const uint16_t *offsets, int64_t group, float *out, int64_t out_stride, int64_t M, int64_t N,
                       int64_t K, int num_threads) {
    return tile_gemm_f32(x, x_stride, q, scales, offsets, group, out, out_stride, M, N, K, num_threads);
}
