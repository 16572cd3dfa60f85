// Paged decode attention for the CPU: one query token per sequence, keys and values read in place from the
// block-paged KV cache (no gather into a contiguous copy). Built at first use by tokenmill/attention/cpu_kernels.py.
//
// KV cache of one layer: [2][num_blocks][block_size][num_kv_heads][head_dim], keys then values.
// q and out: [num_seqs][num_heads][head_dim]. block_tables: [num_seqs][max_blocks] int32. seq_lens: int32.
// dtype: 0 = float32, 1 = bfloat16 (q, cache and out share it). Accumulation is float32.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define HAVE_AVX512_BF16 1
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return (uint16_t)(u >> 16);
}

// Loads n elements at src (float32 or bfloat16) into dst as float32.
static inline void load_row(float *restrict dst, const void *restrict src, int64_t offset, int n, int dtype) {
    if (dtype == 0) {
        memcpy(dst, (const float *)src + offset, (size_t)n * sizeof(float));
    } else {
        const uint16_t *s = (const uint16_t *)src + offset;
        for (int i = 0; i < n; i++) dst[i] = bf16_to_f32(s[i]);
    }
}

static void softmax_rows(float *scores, int group, int n) {
    for (int g = 0; g < group; g++) {
        float *sg = scores + (int64_t)g * n;
        float m = -INFINITY;
        for (int t = 0; t < n; t++) m = sg[t] > m ? sg[t] : m;
        float sum = 0.f;
        for (int t = 0; t < n; t++) {
            sg[t] = expf(sg[t] - m);
            sum += sg[t];
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        for (int t = 0; t < n; t++) sg[t] *= inv;
    }
}

#ifdef HAVE_AVX512_BF16
// e^x for 16 floats: 2^(x log2 e) split into an integer power (scalef) and a degree-6 polynomial on [-0.5, 0.5].
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, k), _mm512_set1_ps(0.6931471805599453f));
    __m512 p = _mm512_set1_ps(1.f / 720.f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, k);
}

static void softmax_rows_avx512(float *scores, int group, int n) {
    for (int g = 0; g < group; g++) {
        float *sg = scores + (int64_t)g * n;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int t = 0; t < n; t += 16) {
            const __mmask16 m = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, sg + t));
        }
        const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        for (int t = 0; t < n; t += 16) {
            const __mmask16 m = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + t), mx));
            _mm512_mask_storeu_ps(sg + t, m, e);
            vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
        }
        const float sum = _mm512_reduce_add_ps(vsum);
        const __m512 inv = _mm512_set1_ps(sum > 0.f ? 1.f / sum : 0.f);
        for (int t = 0; t < n; t += 16) {
            const __mmask16 m = n - t >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - t)) - 1);
            _mm512_mask_storeu_ps(sg + t, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sg + t), inv));
        }
    }
}

// acc[g][:] = sum_t p[g][t] * v[t][:]. The accumulators stay in registers when G and C (head_dim / 16) are
// compile-time constants, which the dispatch in value_pass arranges.
static inline __attribute__((always_inline)) void value_pass_fixed(
    const int G, const int C, const uint16_t *values, const int32_t *table, int start, int n, int block_size,
    int64_t block_stride, int64_t token_stride, const float *scores, float *acc) {
    __m512 a[G][C];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++) a[g][c] = _mm512_setzero_ps();
    for (int t = 0; t < n; t++) {
        const int pos = start + t;
        const uint16_t *v = values + (int64_t)table[pos / block_size] * block_stride
                            + (int64_t)(pos % block_size) * token_stride;
        for (int c = 0; c < C; c++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(v + c * 16));
            __m512 vf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            for (int g = 0; g < G; g++) a[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(int64_t)g * n + t]), vf, a[g][c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++) _mm512_storeu_ps(acc + (int64_t)g * C * 16 + c * 16, a[g][c]);
}

static void value_pass(const uint16_t *values, const int32_t *table, int start, int n, int group, int head_dim,
                       int block_size, int64_t block_stride, int64_t token_stride, const float *scores, float *acc) {
#define VP(G, C) value_pass_fixed(G, C, values, table, start, n, block_size, block_stride, token_stride, scores, acc)
    if (head_dim == 64) {
        switch (group) {
            case 1: VP(1, 4); return;
            case 2: VP(2, 4); return;
            case 3: VP(3, 4); return;
            case 4: VP(4, 4); return;
            case 5: VP(5, 4); return;
            case 6: VP(6, 4); return;
            case 7: VP(7, 4); return;
            case 8: VP(8, 4); return;
        }
    } else if (head_dim == 128) {
        switch (group) {
            case 1: VP(1, 8); return;
            case 2: VP(2, 8); return;
            case 3: VP(3, 8); return;
            case 4: VP(4, 8); return;
        }
    }
#undef VP
    // Any other shape: accumulate in memory.
    memset(acc, 0, sizeof(float) * (size_t)group * head_dim);
    for (int t = 0; t < n; t++) {
        const int pos = start + t;
        const uint16_t *v = values + (int64_t)table[pos / block_size] * block_stride
                            + (int64_t)(pos % block_size) * token_stride;
        for (int d = 0; d < head_dim; d += 16) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(v + d));
            __m512 vf = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
            for (int g = 0; g < group; g++) {
                float *ap = acc + (int64_t)g * head_dim + d;
                _mm512_storeu_ps(ap, _mm512_fmadd_ps(_mm512_set1_ps(scores[(int64_t)g * n + t]), vf, _mm512_loadu_ps(ap)));
            }
        }
    }
}

// One (sequence, KV head) in bfloat16 with AVX512-BF16 dot products; head_dim a multiple of 32, group <= 16.
static void head_bf16_avx512(const uint16_t *q, const uint16_t *keys, const uint16_t *values, uint16_t *out,
                             const int32_t *table, int start, int n, int group, int head_dim, int block_size,
                             int64_t block_stride, int64_t token_stride, float scale, float *scores, float *acc) {
    const int chunks = head_dim / 32;
    __m512bh qv[16 * 8];
    for (int g = 0; g < group; g++)
        for (int c = 0; c < chunks; c++)
            qv[g * chunks + c] = (__m512bh)_mm512_loadu_si512(q + (int64_t)g * head_dim + c * 32);
    for (int t = 0; t < n; t++) {
        const int pos = start + t;
        const uint16_t *k = keys + (int64_t)table[pos / block_size] * block_stride
                            + (int64_t)(pos % block_size) * token_stride;
        for (int g = 0; g < group; g++) {
            __m512 dot = _mm512_setzero_ps();
            for (int c = 0; c < chunks; c++)
                dot = _mm512_dpbf16_ps(dot, qv[g * chunks + c], (__m512bh)_mm512_loadu_si512(k + c * 32));
            scores[(int64_t)g * n + t] = _mm512_reduce_add_ps(dot) * scale;
        }
    }
    softmax_rows_avx512(scores, group, n);
    value_pass(values, table, start, n, group, head_dim, block_size, block_stride, token_stride, scores, acc);
    for (int g = 0; g < group; g++)
        for (int d = 0; d < head_dim; d++) out[(int64_t)g * head_dim + d] = f32_to_bf16(acc[(int64_t)g * head_dim + d]);
}
#endif

void paged_decode_attention(
    const void *q, const void *kv_cache, void *out,
    const int32_t *block_tables, const int32_t *seq_lens,
    int num_seqs, int num_heads, int num_kv_heads, int head_dim,
    int block_size, int max_blocks, int64_t num_blocks, float scale, int sliding_window, int dtype,
    int num_threads) {
    const int group = num_heads / num_kv_heads;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    const int64_t block_stride = (int64_t)block_size * token_stride;
    const int64_t value_offset = num_blocks * block_stride;

#pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(num_threads)
    for (int s = 0; s < num_seqs; s++) {
        for (int kvh = 0; kvh < num_kv_heads; kvh++) {
            const int len = seq_lens[s];
            const int start = (sliding_window > 0 && len > sliding_window) ? len - sliding_window : 0;
            const int n = len - start;
            float *qf = malloc(sizeof(float) * (size_t)group * head_dim);
            float *acc = calloc((size_t)group * head_dim, sizeof(float));
            float *scores = malloc(sizeof(float) * (size_t)group * (n > 0 ? n : 1));
            float *row = malloc(sizeof(float) * head_dim);
            for (int g = 0; g < group; g++)
                load_row(qf + g * head_dim, q, ((int64_t)s * num_heads + kvh * group + g) * head_dim, head_dim, dtype);
            const int32_t *table = block_tables + (int64_t)s * max_blocks;
#ifdef HAVE_AVX512_BF16
            if (dtype == 1 && head_dim % 32 == 0 && head_dim <= 256 && group <= 16) {
                const uint16_t *cache = (const uint16_t *)kv_cache + (int64_t)kvh * head_dim;
                head_bf16_avx512((const uint16_t *)q + ((int64_t)s * num_heads + kvh * group) * head_dim,
                                 cache, cache + value_offset,
                                 (uint16_t *)out + ((int64_t)s * num_heads + kvh * group) * head_dim,
                                 table, start, n, group, head_dim, block_size, block_stride, token_stride, scale,
                                 scores, acc);
                free(qf);
                free(acc);
                free(scores);
                free(row);
                continue;
            }
#endif
            // Pass 1: scores of every query head of this KV head against every key.
            for (int t = 0; t < n; t++) {
                const int pos = start + t;
                const int64_t base = (int64_t)table[pos / block_size] * block_stride
                                     + (int64_t)(pos % block_size) * token_stride + (int64_t)kvh * head_dim;
                load_row(row, kv_cache, base, head_dim, dtype);
                for (int g = 0; g < group; g++) {
                    const float *qg = qf + g * head_dim;
                    float dot = 0.f;
                    for (int d = 0; d < head_dim; d++) dot += qg[d] * row[d];
                    scores[(int64_t)g * n + t] = dot * scale;
                }
            }
            softmax_rows(scores, group, n);
            // Pass 2: weighted sum of values.
            for (int t = 0; t < n; t++) {
                const int pos = start + t;
                const int64_t base = value_offset + (int64_t)table[pos / block_size] * block_stride
                                     + (int64_t)(pos % block_size) * token_stride + (int64_t)kvh * head_dim;
                load_row(row, kv_cache, base, head_dim, dtype);
                for (int g = 0; g < group; g++) {
                    const float p = scores[(int64_t)g * n + t];
                    float *ag = acc + g * head_dim;
                    for (int d = 0; d < head_dim; d++) ag[d] += p * row[d];
                }
            }
            for (int g = 0; g < group; g++) {
                const int64_t o = ((int64_t)s * num_heads + kvh * group + g) * head_dim;
                if (dtype == 0) {
                    memcpy((float *)out + o, acc + g * head_dim, sizeof(float) * head_dim);
                } else {
                    uint16_t *dst = (uint16_t *)out + o;
                    for (int d = 0; d < head_dim; d++) dst[d] = f32_to_bf16(acc[g * head_dim + d]);
                }
            }
            free(qf);
            free(acc);
            free(scores);
            free(row);
        }
    }
}
