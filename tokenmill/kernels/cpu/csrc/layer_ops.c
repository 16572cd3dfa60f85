// Fused elementwise work of a decoder layer for bfloat16 activations on the CPU: RMSNorm (with the residual add
// folded in), rotate-half rotary embedding in place, SiLU-and-multiply, the KV-cache write (and greedy argmax
// over logits). In eager
// PyTorch these are about 30 small ops a layer, each a pass over memory with float32 temporaries; here each is
// one pass. The arithmetic and its roundings follow tokenmill/model/llama.py's PyTorch code (float32 inside,
// rounded to bfloat16 where PyTorch stores a bfloat16 tensor), so results agree up to float32 summation order.
// Built with paged_decode.c by tokenmill/kernels/cpu/ops.py.
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"  // the prototypes, checked against the definitions here
#include "simd.h"

// Rows x width below which a call stays on one thread: waking the pool costs more than the work.
#define PARALLEL_MIN_ELEMENTS 32768

int tokenmill_layer_ops_vectorized(void) {
#ifdef TOKENMILL_AVX512_BF16
    return 1;
#else
    return 0;
#endif
}

#ifdef TOKENMILL_AVX512_BF16
static inline __m512 load16(const uint16_t *p, __mmask16 m) {
    return bf16x16_to_f32(_mm256_maskz_loadu_epi16(m, p));
}

// Round to nearest even, as PyTorch's float -> bfloat16 conversion (NaN handling aside: activations are finite).
static inline void store16(uint16_t *p, __m512 x, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(x));
}

#endif

// out[i] = weight * bf16(s / rms(s)) with s = x[i], or with residual: s = bf16(x[i] + residual[i]), stored back
// into residual[i] (vLLM's fused_add_rms_norm). Rows have their own strides; elements within a row are contiguous.
void rms_norm_bf16(const uint16_t *x, int64_t x_stride, uint16_t *residual, int64_t r_stride,
                   const uint16_t *weight, uint16_t *out, int64_t o_stride, int n, int hidden, float eps,
                   int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if ((int64_t)n * hidden >= PARALLEL_MIN_ELEMENTS)
    for (int i = 0; i < n; i++) {
        const uint16_t *xi = x + (int64_t)i * x_stride;
        uint16_t *oi = out + (int64_t)i * o_stride;
        uint16_t *ri = residual ? residual + (int64_t)i * r_stride : NULL;
        const uint16_t *src = xi;
#ifdef TOKENMILL_AVX512_BF16
        __m512 sq = _mm512_setzero_ps();
        for (int d = 0; d < hidden; d += 16) {
            const __mmask16 m = tail_mask(hidden - d);
            __m512 s = load16(xi + d, m);
            if (ri) {
                s = round_bf16(_mm512_add_ps(s, load16(ri + d, m)));
                store16(ri + d, s, m);
            }
            sq = _mm512_fmadd_ps(s, s, sq);
        }
        if (ri) src = ri;
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sq) / (float)hidden + eps));
        for (int d = 0; d < hidden; d += 16) {
            const __mmask16 m = tail_mask(hidden - d);
            const __m512 normed = round_bf16(_mm512_mul_ps(load16(src + d, m), inv));
            store16(oi + d, _mm512_mul_ps(load16(weight + d, m), normed), m);
        }
#else
        float sq = 0.f;
        for (int d = 0; d < hidden; d++) {
            float s = bf16_to_f32(xi[d]);
            if (ri) {
                ri[d] = f32_to_bf16(s + bf16_to_f32(ri[d]));
                s = bf16_to_f32(ri[d]);
            }
            sq += s * s;
        }
        if (ri) src = ri;
        const float inv = 1.0f / sqrtf(sq / (float)hidden + eps);
        for (int d = 0; d < hidden; d++) oi[d] = f32_to_bf16(bf16_to_f32(weight[d]) * bf16_to_f32(f32_to_bf16(bf16_to_f32(src[d]) * inv)));
#endif
    }
}

// Rotate-half rotary embedding in place for the heads of one tensor: x[i][h][:] of n rows (row stride
// x_stride, heads head_dim apart), with cos/sin tables [max_positions][head_dim / 2] in float32.
static void rotate_rows(uint16_t *x, int64_t x_stride, int heads, int n, int head_dim, const int64_t *positions,
                        const float *cos, const float *sin, int num_threads) {
    const int half = head_dim / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if ((int64_t)n * heads * head_dim >= PARALLEL_MIN_ELEMENTS)
    for (int i = 0; i < n; i++) {
        const float *c = cos + positions[i] * half;
        const float *s = sin + positions[i] * half;
        for (int h = 0; h < heads; h++) {
            uint16_t *x1 = x + (int64_t)i * x_stride + (int64_t)h * head_dim;
            uint16_t *x2 = x1 + half;
#ifdef TOKENMILL_AVX512_BF16
            for (int d = 0; d < half; d += 16) {
                const __mmask16 m = tail_mask(half - d);
                const __m512 a = load16(x1 + d, m), b = load16(x2 + d, m);
                const __m512 cv = _mm512_maskz_loadu_ps(m, c + d), sv = _mm512_maskz_loadu_ps(m, s + d);
                store16(x1 + d, _mm512_sub_ps(_mm512_mul_ps(a, cv), _mm512_mul_ps(b, sv)), m);
                store16(x2 + d, _mm512_add_ps(_mm512_mul_ps(b, cv), _mm512_mul_ps(a, sv)), m);
            }
#else
            for (int d = 0; d < half; d++) {
                const float a = bf16_to_f32(x1[d]), b = bf16_to_f32(x2[d]);
                x1[d] = f32_to_bf16(a * c[d] - b * s[d]);
                x2[d] = f32_to_bf16(b * c[d] + a * s[d]);
            }
#endif
        }
    }
}

void rotary_bf16(uint16_t *q, int64_t q_stride, int q_heads, uint16_t *k, int64_t k_stride, int k_heads, int n,
                 int head_dim, const int64_t *positions, const float *cos, const float *sin, int num_threads) {
    rotate_rows(q, q_stride, q_heads, n, head_dim, positions, cos, sin, num_threads);
    rotate_rows(k, k_stride, k_heads, n, head_dim, positions, cos, sin, num_threads);
}

// out[i][j] = bf16(bf16(silu(gate)) * up) with gate = x[i][j], up = x[i][inter + j], as F.silu(gate) * up.
void silu_and_mul_bf16(const uint16_t *x, int64_t x_stride, uint16_t *out, int64_t o_stride, int n, int inter,
                       int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) \
    if ((int64_t)n * inter >= PARALLEL_MIN_ELEMENTS)
    for (int i = 0; i < n; i++) {
        const uint16_t *g = x + (int64_t)i * x_stride;
        const uint16_t *u = g + inter;
        uint16_t *o = out + (int64_t)i * o_stride;
#ifdef TOKENMILL_AVX512_BF16
        for (int d = 0; d < inter; d += 16) {
            const __mmask16 m = tail_mask(inter - d);
            const __m512 gv = load16(g + d, m);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv));
            const __m512 act = round_bf16(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
            store16(o + d, _mm512_mul_ps(act, load16(u + d, m)), m);
        }
#else
        for (int d = 0; d < inter; d++) {
            const float gv = bf16_to_f32(g[d]);
            o[d] = f32_to_bf16(bf16_to_f32(f32_to_bf16(gv / (1.f + expf(-gv)))) * bf16_to_f32(u[d]));
        }
#endif
    }
}

// float32 versions of the three ops above, for the fused decode step in float32 (decode_layer.c; one thread, a
// few rows): PyTorch's float32 arithmetic (F.rms_norm, the rotate-half rotary, F.silu(gate) * up) in plain C
// that the compiler vectorizes; results agree with PyTorch's up to float32 summation order.
void rms_norm_f32(const float *x, int64_t x_stride, float *residual, int64_t r_stride, const float *weight,
                  float *out, int64_t o_stride, int n, int hidden, float eps) {
    for (int i = 0; i < n; i++) {
        const float *src = x + (int64_t)i * x_stride;
        float *oi = out + (int64_t)i * o_stride;
        if (residual != NULL) {  // residual = x + residual, normed in its place
            float *ri = residual + (int64_t)i * r_stride;
            for (int d = 0; d < hidden; d++) ri[d] = src[d] + ri[d];
            src = ri;
        }
        float sq = 0.f;
        for (int d = 0; d < hidden; d++) sq += src[d] * src[d];
        const float inv = 1.0f / sqrtf(sq / (float)hidden + eps);
        for (int d = 0; d < hidden; d++) oi[d] = src[d] * inv * weight[d];
    }
}

void rotary_f32(float *q, int64_t q_stride, int q_heads, float *k, int64_t k_stride, int k_heads, int n, int head_dim,
                const int64_t *positions, const float *cos, const float *sin) {
    const int half = head_dim / 2;
    for (int pass = 0; pass < 2; pass++) {
        float *x = pass == 0 ? q : k;
        const int64_t stride = pass == 0 ? q_stride : k_stride;
        const int heads = pass == 0 ? q_heads : k_heads;
        for (int i = 0; i < n; i++) {
            const float *c = cos + positions[i] * half, *s = sin + positions[i] * half;
            for (int h = 0; h < heads; h++) {
                float *x1 = x + (int64_t)i * stride + (int64_t)h * head_dim, *x2 = x1 + half;
                for (int d = 0; d < half; d++) {
                    const float a = x1[d], b = x2[d];
                    x1[d] = a * c[d] - b * s[d];
                    x2[d] = b * c[d] + a * s[d];
                }
            }
        }
    }
}

void silu_and_mul_f32(const float *x, int64_t x_stride, float *out, int64_t o_stride, int n, int inter) {
    for (int i = 0; i < n; i++) {
        const float *g = x + (int64_t)i * x_stride, *u = g + inter;
        float *o = out + (int64_t)i * o_stride;
        for (int d = 0; d < inter; d++) o[d] = g[d] / (1.f + expf(-g[d])) * u[d];
    }
}

// Copies n key and value rows (row_bytes each; rows k_stride / v_stride bytes apart) into the paged cache: row i
// goes to slot slots[i] of the key half (cache) and of the value half (cache + value_offset). Any dtype.
void write_kv(const char *k, int64_t k_stride, const char *v, int64_t v_stride, char *cache, int64_t value_offset,
              const int64_t *slots, int n, int64_t row_bytes, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if ((int64_t)n * row_bytes >= 4 * PARALLEL_MIN_ELEMENTS)
    for (int i = 0; i < n; i++) {
        if (slots[i] < 0) continue;  // a padding row owns no slot
        memcpy(cache + slots[i] * row_bytes, k + (int64_t)i * k_stride, (size_t)row_bytes);
        memcpy(cache + value_offset + slots[i] * row_bytes, v + (int64_t)i * v_stride, (size_t)row_bytes);
    }
}

// out[i] = the first index of the largest element of row i (float32 when dtype == 0, bfloat16 when 1), as
// torch.argmax: greedy sampling of a whole batch's logits in one pass over memory.
void argmax_rows(const void *x, int dtype, int64_t stride, int rows, int cols, int64_t *out, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if ((int64_t)rows * cols >= PARALLEL_MIN_ELEMENTS)
    for (int i = 0; i < rows; i++) {
        const float *xf = (const float *)x + (dtype == 0 ? (int64_t)i * stride : 0);
        const uint16_t *xh = (const uint16_t *)x + (dtype == 1 ? (int64_t)i * stride : 0);
        float best = -INFINITY;
        int64_t at = 0;
        int j = 0;
#ifdef TOKENMILL_AVX512_BF16
        // Largest value first, then its first position (the second pass reads the row from cache). A NaN
        // anywhere leaves it to the scalar scan below, which returns the first NaN as torch does.
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        for (; j < cols; j += 16) {
            const __mmask16 m = tail_mask(cols - j);
            const __m512 v = dtype == 0 ? _mm512_maskz_loadu_ps(m, xf + j) : load16(xh + j, m);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, v);
            nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
        }
        j = 0;
        if (!nan) {
            const __m512 target = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
            for (; j < cols; j += 16) {
                const __mmask16 m = tail_mask(cols - j);
                const __m512 v = dtype == 0 ? _mm512_maskz_loadu_ps(m, xf + j) : load16(xh + j, m);
                const __mmask16 hit = _mm512_mask_cmp_ps_mask(m, v, target, _CMP_EQ_OQ);
                if (hit) {
                    at = j + __builtin_ctz(hit);
                    break;
                }
            }
            out[i] = at;
            continue;
        }
#endif
        for (; j < cols; j++) {
            const float v = dtype == 0 ? xf[j] : bf16_to_f32(xh[j]);
            if (v != v) {
                at = j;
                break;
            }
            if (v > best) {
                best = v;
                at = j;
            }
        }
        out[i] = at;
    }
}
