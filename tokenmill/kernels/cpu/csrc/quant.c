// Weight-only quantized matmuls for small row counts (decode) and dequantization to bfloat16 (prefill), CPU.
//
// int8 weights with group scales (W8A16):  w[n, k] = scales[n, k / group] * q[n, k],  q int8.
//   Per-channel scales are group = K. GGUF's Q8_0 (group 32) and Q6_K (group 16) land here exactly: their scales
//   are float16 (times an int8 sub-scale for Q6_K), exact in float32.
// int4 weights in torch's CPU int4pack layout (what _weight_int4pack_mm_for_cpu reads): rows in blocks of 64;
//   byte [nb, k, j] holds row nb*64 + j in its low nibble and row nb*64 + 32 + j in its high nibble, and
//   w[n, k] = (q - 8) * sz[k / group, n, 0] + sz[k / group, n, 1]  (sz in the activation dtype).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

// x [M, K] (row stride x_stride elements; dtype 0 float32, 1 bfloat16) -> float32 [M, K] contiguous.
static float *to_f32(const void *x, int x_dtype, int64_t x_stride, int64_t M, int64_t K) {
    float *xf = (float *)malloc(sizeof(float) * (size_t)(M * K));
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
        for (int64_t m = 0; m < M; m++) {
            const float *xr = xf + m * K;
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
            for (int64_t k = g * group; k < (g + 1) * group; k++) w[n * K + k] = f32_to_bf16(s * (float)q[n * K + k]);
        }
    }
}

// w [N, K] (dtype 0 float32, 1 bfloat16) from the int4pack layout above; sz [K / group, N, 2] in w's dtype.
void int4pack_dequant(const uint8_t *packed, const void *sz, int sz_dtype, int64_t group, void *w, int64_t N,
                      int64_t K, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int64_t nb = 0; nb < N / 64; nb++) {
        const uint8_t *block = packed + nb * 32 * K;
        for (int64_t half = 0; half < 2; half++) {
            for (int64_t j = 0; j < 32; j++) {
                const int64_t n = nb * 64 + half * 32 + j;
                for (int64_t k = 0; k < K; k++) {
                    const int q = half ? (block[k * 32 + j] >> 4) : (block[k * 32 + j] & 15);
                    const int64_t at = ((k / group) * N + n) * 2;
                    float s, z;
                    if (sz_dtype == 0) {
                        s = ((const float *)sz)[at];
                        z = ((const float *)sz)[at + 1];
                    } else {
                        s = bf16_to_f32(((const uint16_t *)sz)[at]);
                        z = bf16_to_f32(((const uint16_t *)sz)[at + 1]);
                    }
                    const float v = (float)(q - 8) * s + z;
                    if (sz_dtype == 0)
                        ((float *)w)[n * K + k] = v;
                    else
                        ((uint16_t *)w)[n * K + k] = f32_to_bf16(v);
                }
            }
        }
    }
}
