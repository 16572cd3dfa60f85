// Weight-only quantized matmuls for small row counts (decode) and dequantization to bfloat16 (prefill), CPU.
//
// int8 weights with group scales (W8A16):  w[n, k] = scales[n, k / group] * q[n, k],  q int8.
//   Per-channel scales are group = K. GGUF's Q8_0 (group 32) and Q6_K (group 16) land here exactly: their scales
//   are float16 (times an int8 sub-scale for Q6_K), exact in float32.
// int4 weights (W4A16) with float16 group scales and offsets: see int4_gemm below.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"  // the prototypes, checked against the definitions here
#include "simd.h"

// Rows from which the kernels process x in blocks of 8 (each weight chunk widened once per block of rows).
#define ROW_BLOCK 8
#define MIN_BLOCKED_ROWS 4

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

// out[m, n] = sum_k x[m, k] * scales[n, k / group] * q[n, k]; out dtype as x's (row stride out_stride).
// group is a multiple of 16 dividing K. Returns 0, or -1 when memory runs out.
int int8_gemm(const void *x, int x_dtype, int64_t x_stride, const int8_t *q, const float *scales, int64_t group,
              void *out, int64_t out_stride, int64_t M, int64_t N, int64_t K, int num_threads) {
    float *xf = to_f32(x, x_dtype, x_stride, M, K);
    if (xf == NULL) return -1;
    const int64_t num_groups = K / group;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int8_t *qr = q + n * K;
        const float *sr = scales + n * num_groups;
#ifdef TOKENMILL_AVX512_BF16
        if (M >= MIN_BLOCKED_ROWS) {
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
                    if (x_dtype == 0)
                        ((float *)out)[(m0 + i) * out_stride + n] = total;
                    else
                        ((uint16_t *)out)[(m0 + i) * out_stride + n] = f32_to_bf16(total);
                }
            }
            continue;
        }
#endif
        for (int64_t m = 0; m < M; m++) {
            const float *xr = xf + m * K;
#ifdef TOKENMILL_AVX512_BF16
            __m512 acc = _mm512_setzero_ps();
            for (int64_t g = 0; g < num_groups; g++) {
                const int8_t *qg = qr + g * group;
                const float *xg = xr + g * group;
                __m512 part = _mm512_setzero_ps();
                for (int64_t c = 0; c < group; c += 16) {
                    const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qg + c))));
                    part = _mm512_fmadd_ps(w, _mm512_loadu_ps(xg + c), part);
                }
                acc = _mm512_fmadd_ps(part, _mm512_set1_ps(sr[g]), acc);
            }
            const float total = _mm512_reduce_add_ps(acc);
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
            if (x_dtype == 0)
                ((float *)out)[m * out_stride + n] = total;
            else
                ((uint16_t *)out)[m * out_stride + n] = f32_to_bf16(total);
        }
    }
    free(xf);
    return 0;
}

// w [N, K] bfloat16 = scales[n, k / group] * q[n, k].
void int8_dequant_bf16(const int8_t *q, const float *scales, int64_t group, uint16_t *w, int64_t N, int64_t K,
                       int num_threads) {
    const int64_t num_groups = K / group;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < num_groups; g++) {
            const float s = scales[n * num_groups + g];
#ifdef TOKENMILL_AVX512_BF16
            for (int64_t k = g * group; k < (g + 1) * group; k += 16) {
                const __m512 v = _mm512_mul_ps(
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + n * K + k)))),
                    _mm512_set1_ps(s));
                _mm256_storeu_si256((__m256i *)(w + n * K + k), (__m256i)_mm512_cvtneps_pbh(v));
            }
#else
            for (int64_t k = g * group; k < (g + 1) * group; k++) w[n * K + k] = f32_to_bf16(s * (float)q[n * K + k]);
#endif
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
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < num_groups; g++) {
            float t = 0.f;
            for (int64_t k = g * group; k < (g + 1) * group; k++) t += xf[m * K + k];
            xsum[m * num_groups + g] = t;
        }
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
                    if (x_dtype == 0)
                        ((float *)out)[(m0 + i) * out_stride + n] = total;
                    else
                        ((uint16_t *)out)[(m0 + i) * out_stride + n] = f32_to_bf16(total);
                }
            }
            continue;
        }
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
            if (x_dtype == 0)
                ((float *)out)[m * out_stride + n] = total;
            else
                ((uint16_t *)out)[m * out_stride + n] = f32_to_bf16(total);
        }
    }
    free(xsum);
    free(xf);
    return 0;
}

// w [N, K] (dtype 0 float32, 1 bfloat16) from the int4 layout above.
void int4_dequant(const uint8_t *q, const uint16_t *scales, const uint16_t *offsets, int64_t group, void *w,
                  int w_dtype, int64_t N, int64_t K, int num_threads) {
    const int64_t num_groups = K / group;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *qr = q + n * (K / 2);
        float row[32];
        for (int64_t c = 0; c < K; c += 32) {
            const int64_t g = c / group;
            const float s = f16_to_f32(scales[n * num_groups + g]), b = f16_to_f32(offsets[n * num_groups + g]);
#ifdef TOKENMILL_AVX512_BF16
            if (w_dtype == 1) {
                const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qr + c / 2)));
                const __m512 vs = _mm512_set1_ps(s), vb = _mm512_set1_ps(b);
                const __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15))),
                                                  vs, vb);
                const __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), vs, vb);
                _mm512_storeu_si512((void *)((uint16_t *)w + n * K + c), (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
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
