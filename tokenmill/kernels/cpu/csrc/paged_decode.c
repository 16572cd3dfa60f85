// Paged decode attention for the CPU: one query token per sequence, keys and values read in place from the
// block-paged KV cache (no gather into a contiguous copy). Built at first use by tokenmill/kernels/cpu/ops.py.
//
// KV cache of one layer: [2][num_blocks][block_size][num_kv_heads][head_dim], keys then values.
// q and out: [num_seqs][num_heads][head_dim]. block_tables: [num_seqs][max_blocks] int32. seq_lens: int32.
// dtype: 0 = float32, 1 = bfloat16 (q, cache and out share it). Accumulation is float32.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"  // the prototypes, checked against the definitions here
#include "simd.h"

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

#ifdef TOKENMILL_AVX512_BF16
// Softmax of each row of scores in place; with row_max and row_sum given, the rows keep exp(s - max) without
// the division, and each row's max and sum of exponentials are returned there (a split to merge later).
static void softmax_rows_avx512(float *scores, int group, int n, float *row_max, float *row_sum) {
    for (int g = 0; g < group; g++) {
        float *sg = scores + (int64_t)g * n;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int t = 0; t < n; t += 16) {
            const __mmask16 m = tail_mask(n - t);
            vmax = _mm512_mask_max_ps(vmax, m, vmax, _mm512_maskz_loadu_ps(m, sg + t));
        }
        const float max = _mm512_reduce_max_ps(vmax);
        const __m512 mx = _mm512_set1_ps(max);
        __m512 vsum = _mm512_setzero_ps();
        for (int t = 0; t < n; t += 16) {
            const __mmask16 m = tail_mask(n - t);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + t), mx));
            _mm512_mask_storeu_ps(sg + t, m, e);
            vsum = _mm512_mask_add_ps(vsum, m, vsum, e);
        }
        const float sum = _mm512_reduce_add_ps(vsum);
        if (row_max != NULL) {
            row_max[g] = max;
            row_sum[g] = sum;
            continue;
        }
        const __m512 inv = _mm512_set1_ps(sum > 0.f ? 1.f / sum : 0.f);
        for (int t = 0; t < n; t += 16) {
            const __mmask16 m = tail_mask(n - t);
            _mm512_mask_storeu_ps(sg + t, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sg + t), inv));
        }
    }
}

// Lane i of the result = the sum of the 16 lanes of v[i]: 16 dot products finished in 45 shuffles and adds
// instead of 16 separate horizontal reductions.
static inline __m512 reduce16(const __m512 *v) {
    __m512 w[8], u[4];
    for (int i = 0; i < 8; i++)  // per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3]
        w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  // per 128-bit lane: the lane's partial sums of rows 4i..4i+3
        const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xdd));
}

// The keys and values a task reads are walked in tiles: up to 16 consecutive positions inside one block, whose
// rows (all KV heads of a position side by side) are read front to back.
typedef struct {
    const uint16_t *q;        // this sequence's queries [num_heads][head_dim]
    const uint16_t *keys;     // the layer's key half; values follow at value_offset
    int64_t value_offset;
    const int32_t *table;     // this sequence's block table
    int start, n;             // positions [start, start + n) are attended
    int h0, h1;               // KV heads of this task
    int group, head_dim, block_size;
    int64_t block_stride, token_stride;
    float scale;
} Task;

static inline int tile_at(const Task *task, int t, int64_t *row) {
    const int pos = task->start + t;
    const int in_block = pos % task->block_size;
    int cnt = task->block_size - in_block;
    if (cnt > 16) cnt = 16;
    if (cnt > task->n - t) cnt = task->n - t;
    *row = (int64_t)task->table[pos / task->block_size] * task->block_stride + (int64_t)in_block * task->token_stride;
    return cnt;
}

// scores[(kvh - h0) * group + g][t] = scale * q[kvh * group + g] . k[t][kvh], with C = head_dim / 32.
static inline __attribute__((always_inline)) void score_pass_fixed(const int C, const Task *task, float *scores) {
    const __m512 vscale = _mm512_set1_ps(task->scale);
    const int n = task->n, group = task->group, head_dim = task->head_dim;
    for (int t = 0; t < n;) {
        int64_t row;
        const int cnt = tile_at(task, t, &row);
        const __mmask16 m = (__mmask16)((1u << cnt) - 1);
        for (int kvh = task->h0; kvh < task->h1; kvh++) {
            const uint16_t *k = task->keys + row + (int64_t)kvh * head_dim;
            for (int g = 0; g < group; g++) {
                const int h = kvh * group + g;
                __m512bh qv[8];
                for (int c = 0; c < C; c++) qv[c] = (__m512bh)_mm512_loadu_si512(task->q + (int64_t)h * head_dim + c * 32);
                __m512 d[16];
                for (int j = 0; j < 16; j++) {
                    // Rows past the tile repeat its first row (their scores are not stored): no branches.
                    const uint16_t *kj = k + (j < cnt ? j : 0) * task->token_stride;
                    d[j] = _mm512_dpbf16_ps(_mm512_setzero_ps(), qv[0], (__m512bh)_mm512_loadu_si512(kj));
                    for (int c = 1; c < C; c++)
                        d[j] = _mm512_dpbf16_ps(d[j], qv[c], (__m512bh)_mm512_loadu_si512(kj + c * 32));
                }
                float *dst = scores + (int64_t)(h - task->h0 * group) * n + t;
                _mm512_mask_storeu_ps(dst, m, _mm512_mul_ps(reduce16(d), vscale));
            }
        }
        t += cnt;
    }
}

static void score_pass(const Task *task, float *scores) {
    switch (task->head_dim / 32) {
        case 1: score_pass_fixed(1, task, scores); return;
        case 2: score_pass_fixed(2, task, scores); return;
        case 3: score_pass_fixed(3, task, scores); return;
        case 4: score_pass_fixed(4, task, scores); return;
        case 5: score_pass_fixed(5, task, scores); return;
        case 6: score_pass_fixed(6, task, scores); return;
        case 7: score_pass_fixed(7, task, scores); return;
        default: score_pass_fixed(8, task, scores); return;
    }
}

// acc[g][:] += sum_j p[g][j] * v[j][:] over one tile of cnt positions, for one KV head's G query heads. The
// accumulators stay in registers when G and C (head_dim / 16) are compile-time constants (see value_pass).
static inline __attribute__((always_inline)) void value_tile_fixed(
    const int G, const int C, const uint16_t *v, int cnt, int64_t token_stride, const float *p, int n, float *acc) {
    __m512 a[G][C];
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++) a[g][c] = _mm512_loadu_ps(acc + (int64_t)(g * C + c) * 16);
    for (int j = 0; j < cnt; j++, v += token_stride) {
        for (int c = 0; c < C; c++) {
            const __m512 vf = load_bf16x16(v + c * 16);
            for (int g = 0; g < G; g++) a[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(p[(int64_t)g * n + j]), vf, a[g][c]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int c = 0; c < C; c++) _mm512_storeu_ps(acc + (int64_t)(g * C + c) * 16, a[g][c]);
}

static void value_tile(const uint16_t *v, int cnt, int64_t token_stride, const float *p, int n, int group,
                       int head_dim, float *acc) {
#define VT(G, C) value_tile_fixed(G, C, v, cnt, token_stride, p, n, acc)
    if (head_dim == 64) {
        switch (group) {
            case 1: VT(1, 4); return;
            case 2: VT(2, 4); return;
            case 3: VT(3, 4); return;
            case 4: VT(4, 4); return;
            case 5: VT(5, 4); return;
            case 6: VT(6, 4); return;
            case 7: VT(7, 4); return;
            case 8: VT(8, 4); return;
        }
    } else if (head_dim == 128) {
        switch (group) {
            case 1: VT(1, 8); return;
            case 2: VT(2, 8); return;
            case 3: VT(3, 8); return;
            case 4: VT(4, 8); return;
        }
    }
#undef VT
    // Any other shape: accumulate in memory.
    for (int j = 0; j < cnt; j++, v += token_stride)
        for (int d = 0; d < head_dim; d += 16) {
            const __m512 vf = load_bf16x16(v + d);
            for (int g = 0; g < group; g++) {
                float *ap = acc + (int64_t)g * head_dim + d;
                _mm512_storeu_ps(ap, _mm512_fmadd_ps(_mm512_set1_ps(p[(int64_t)g * n + j]), vf, _mm512_loadu_ps(ap)));
            }
        }
}

// One task in bfloat16 with AVX512-BF16 dot products; head_dim a multiple of 32. scores: [heads of the task][n];
// acc: [heads of the task][head_dim], zeroed. Writes the normalized output to out, or, for one split of a
// sequence (partial not NULL), the unnormalized sums to partial[h][0:head_dim] with the row max and sum of
// exponentials at partial[h][head_dim] and [head_dim + 1], for merge_splits.
static void task_bf16_avx512(const Task *task, uint16_t *out, float *scores, float *acc, float *partial) {
    const int group = task->group, head_dim = task->head_dim, n = task->n;
    const int heads = (task->h1 - task->h0) * group;
    float row_max[heads], row_sum[heads];
    score_pass(task, scores);
    softmax_rows_avx512(scores, heads, n, partial ? row_max : NULL, partial ? row_sum : NULL);
    const uint16_t *values = task->keys + task->value_offset;
    for (int t = 0; t < n;) {
        int64_t row;
        const int cnt = tile_at(task, t, &row);
        for (int kvh = task->h0; kvh < task->h1; kvh++) {
            const int i = (kvh - task->h0) * group;
            value_tile(values + row + (int64_t)kvh * head_dim, cnt, task->token_stride, scores + (int64_t)i * n + t, n,
                       group, head_dim, acc + (int64_t)i * head_dim);
        }
        t += cnt;
    }
    if (partial == NULL) {
        for (int i = 0; i < heads * head_dim; i++) out[i] = f32_to_bf16(acc[i]);
        return;
    }
    for (int h = 0; h < heads; h++) {
        float *p = partial + (int64_t)h * (head_dim + 2);
        memcpy(p, acc + (int64_t)h * head_dim, sizeof(float) * head_dim);
        p[head_dim] = row_max[h];
        p[head_dim + 1] = row_sum[h];
    }
}
#endif

#ifdef TOKENMILL_AVX2
// head_generic's work for float32 with AVX2 + FMA, head_dim a multiple of 8: keys and values read in place from the
// cache, the softmax's exponentials 8 at a time (exp256). qf [group, head_dim], scores [group, n], acc [group,
// head_dim] (written).
static void head_f32_avx2(const float *qf, const float *cache, const int32_t *table, int kvh, int start, int n,
                          int group, int head_dim, int block_size, int64_t block_stride, int64_t token_stride,
                          int64_t value_offset, float scale, float *scores, float *acc) {
    for (int t = 0; t < n; t++) {
        const int pos = start + t;
        const float *key = cache + (int64_t)table[pos / block_size] * block_stride
                           + (int64_t)(pos % block_size) * token_stride + (int64_t)kvh * head_dim;
        for (int g = 0; g < group; g++) {
            const float *qg = qf + g * head_dim;
            __m256 d0 = _mm256_setzero_ps(), d1 = _mm256_setzero_ps();
            int d = 0;
            for (; d + 16 <= head_dim; d += 16) {
                d0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(key + d), d0);
                d1 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d + 8), _mm256_loadu_ps(key + d + 8), d1);
            }
            if (d < head_dim) d0 = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(key + d), d0);
            scores[(int64_t)g * n + t] = hsum256(_mm256_add_ps(d0, d1)) * scale;
        }
    }
    for (int g = 0; g < group; g++) {  // softmax of each row
        float *sg = scores + (int64_t)g * n;
        float m = -INFINITY;
        for (int t = 0; t < n; t++) m = sg[t] > m ? sg[t] : m;
        const __m256 mx = _mm256_set1_ps(m);
        __m256 vsum = _mm256_setzero_ps();
        int t = 0;
        for (; t + 8 <= n; t += 8) {
            const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sg + t), mx));
            _mm256_storeu_ps(sg + t, e);
            vsum = _mm256_add_ps(vsum, e);
        }
        float sum = hsum256(vsum);
        for (; t < n; t++) {
            sg[t] = expf(sg[t] - m);
            sum += sg[t];
        }
        const float inv = sum > 0.f ? 1.f / sum : 0.f;
        for (t = 0; t < n; t++) sg[t] *= inv;
    }
    // The weighted sum of values, 32 dimensions of one query head at a time in four registers (the value rows
    // of one KV head stay in cache between the passes).
    for (int g = 0; g < group; g++) {
        const float *sg = scores + (int64_t)g * n;
        for (int d0 = 0; d0 < head_dim; d0 += 32) {
            const int lanes = head_dim - d0 >= 32 ? 4 : (head_dim - d0) / 8;
            __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            for (int t = 0; t < n; t++) {
                const int pos = start + t;
                const float *value = cache + value_offset + (int64_t)table[pos / block_size] * block_stride
                                     + (int64_t)(pos % block_size) * token_stride + (int64_t)kvh * head_dim + d0;
                const __m256 p = _mm256_set1_ps(sg[t]);
                for (int j = 0; j < lanes; j++) a[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(value + 8 * j), a[j]);
            }
            for (int j = 0; j < lanes; j++) _mm256_storeu_ps(acc + g * head_dim + d0 + 8 * j, a[j]);
        }
    }
}
#endif

// One (sequence, KV head) in portable C: float32, or bfloat16 without AVX512-BF16 or for other head sizes.
static void head_generic(const void *q, const void *kv_cache, void *out, const int32_t *table, int s, int kvh,
                         int start, int n, int num_heads, int group, int head_dim, int block_size,
                         int64_t block_stride, int64_t token_stride, int64_t value_offset, float scale, int dtype) {
    float *qf = malloc(sizeof(float) * (size_t)group * head_dim);
    float *acc = calloc((size_t)group * head_dim, sizeof(float));
    float *scores = malloc(sizeof(float) * (size_t)group * (n > 0 ? n : 1));
    float *row = malloc(sizeof(float) * head_dim);
    for (int g = 0; g < group; g++)
        load_row(qf + g * head_dim, q, ((int64_t)s * num_heads + kvh * group + g) * head_dim, head_dim, dtype);
    int vectorized = 0;
#ifdef TOKENMILL_AVX2
    if (dtype == 0 && head_dim % 8 == 0) {
        head_f32_avx2(qf, (const float *)kv_cache, table, kvh, start, n, group, head_dim, block_size, block_stride,
                      token_stride, value_offset, scale, scores, acc);
        vectorized = 1;
    }
#endif
    if (!vectorized) {
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

#ifdef TOKENMILL_AVX512_BF16
// The task of every KV head of sequence s over positions [start, start + n).
static Task make_task(const void *q, const void *kv_cache, int64_t value_offset, const int32_t *table, int s,
                      int num_heads, int num_kv_heads, int group, int head_dim, int block_size, int start, int n,
                      float scale) {
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    const Task task = {
        .q = (const uint16_t *)q + (int64_t)s * num_heads * head_dim, .keys = (const uint16_t *)kv_cache,
        .value_offset = value_offset, .table = table, .start = start, .n = n, .h0 = 0, .h1 = num_kv_heads,
        .group = group, .head_dim = head_dim, .block_size = block_size,
        .block_stride = (int64_t)block_size * token_stride, .token_stride = token_stride, .scale = scale,
    };
    return task;
}

// Positions per split below which splitting a sequence further costs more in merging than it gains.
#define MIN_SPLIT_LEN 64

// Few sequences (fewer than two per thread): each sequence's positions are cut into splits so every thread has
// work, each split computed as a task of all KV heads, and the splits merged by their softmax statistics
// (flash-decoding). A sequence of at most MIN_SPLIT_LEN positions is one split, written directly.
static void split_decode(const void *q, const void *kv_cache, void *out, const int32_t *block_tables,
                         const int32_t *seq_lens, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                         int block_size, int max_blocks, int64_t value_offset, float scale, int sliding_window,
                         int num_threads) {
    const int group = num_heads / num_kv_heads;
    const int wanted = (4 * num_threads + num_seqs - 1) / num_seqs;  // splits per sequence for 4 tasks a thread
    int first_task[num_seqs + 1], splits[num_seqs], split_len[num_seqs], first_pos[num_seqs];
    first_task[0] = 0;
    for (int s = 0; s < num_seqs; s++) {
        const int len = seq_lens[s];
        first_pos[s] = (sliding_window > 0 && len > sliding_window) ? len - sliding_window : 0;
        const int n = len - first_pos[s];
        int k = (n + MIN_SPLIT_LEN - 1) / MIN_SPLIT_LEN;
        k = k < wanted ? k : wanted;
        k = k > 0 ? k : 1;
        split_len[s] = (n + k - 1) / k;
        splits[s] = (n + split_len[s] - 1) / split_len[s];  // no empty split
        if (splits[s] < 1) splits[s] = 1;
        first_task[s + 1] = first_task[s] + splits[s];
    }
    const int num_tasks = first_task[num_seqs];
    const int64_t per_task = (int64_t)num_heads * (head_dim + 2);
    float *partials = malloc(sizeof(float) * (size_t)num_tasks * per_task);

#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int task_id = 0; task_id < num_tasks; task_id++) {
        int s = 0;
        while (first_task[s + 1] <= task_id) s++;
        const int j = task_id - first_task[s];
        const int len = seq_lens[s] - first_pos[s];
        const int start = first_pos[s] + j * split_len[s];
        const int n = (j + 1) * split_len[s] <= len ? split_len[s] : len - j * split_len[s];
        const Task task = make_task(q, kv_cache, value_offset, block_tables + (int64_t)s * max_blocks, s, num_heads,
                                    num_kv_heads, group, head_dim, block_size, start, n, scale);
        float *scores = malloc(sizeof(float) * (size_t)num_heads * (n > 0 ? n : 1));
        float *acc = calloc((size_t)num_heads * head_dim, sizeof(float));
        uint16_t *dst = (uint16_t *)out + (int64_t)s * num_heads * head_dim;
        task_bf16_avx512(&task, dst, scores, acc, splits[s] > 1 ? partials + (int64_t)task_id * per_task : NULL);
        free(scores);
        free(acc);
    }

    // Merge: out = sum_j e^(m_j - M) acc_j / sum_j e^(m_j - M) l_j, M the largest split max.
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int sh = 0; sh < num_seqs * num_heads; sh++) {
        const int s = sh / num_heads, h = sh % num_heads;
        if (splits[s] == 1) continue;
        const float *p0 = partials + (int64_t)first_task[s] * per_task + (int64_t)h * (head_dim + 2);
        float m = -INFINITY;
        for (int j = 0; j < splits[s]; j++) {
            const float mj = p0[j * per_task + head_dim];
            m = mj > m ? mj : m;
        }
        float acc[head_dim], total = 0.f;
        memset(acc, 0, sizeof acc);
        for (int j = 0; j < splits[s]; j++) {
            const float *p = p0 + j * per_task;
            const float w = expf(p[head_dim] - m);
            total += w * p[head_dim + 1];
            for (int d = 0; d < head_dim; d++) acc[d] += w * p[d];
        }
        const float inv = total > 0.f ? 1.f / total : 0.f;
        uint16_t *dst = (uint16_t *)out + ((int64_t)s * num_heads + h) * head_dim;
        for (int d = 0; d < head_dim; d++) dst[d] = f32_to_bf16(acc[d] * inv);
    }
    free(partials);
}
#endif

void paged_decode_attention(
    const void *q, const void *kv_cache, void *out,
    const int32_t *block_tables, const int32_t *seq_lens,
    int num_seqs, int num_heads, int num_kv_heads, int head_dim,
    int block_size, int max_blocks, int64_t num_blocks, float scale, int sliding_window, int dtype,
    int num_threads, int allow_split) {
    const int group = num_heads / num_kv_heads;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    const int64_t block_stride = (int64_t)block_size * token_stride;
    const int64_t value_offset = num_blocks * block_stride;
#ifdef TOKENMILL_AVX512_BF16
    const int fast = dtype == 1 && head_dim % 32 == 0 && head_dim <= 256;
#else
    const int fast = 0;
#endif
#ifdef TOKENMILL_AVX512_BF16
    // Splitting depends on the batch (few sequences are split, many are not), and a split sequence sums its
    // softmax in another order: batch-invariant mode (allow_split = 0) never splits.
    if (fast && allow_split && num_seqs < 2 * num_threads) {
        split_decode(q, kv_cache, out, block_tables, seq_lens, num_seqs, num_heads, num_kv_heads, head_dim, block_size,
                     max_blocks, value_offset, scale, sliding_window, num_threads);
        return;
    }
#endif
    // A task is a whole sequence on the fast path, so its key and value rows are read once, front to back;
    // otherwise one KV head of one sequence.
    const int heads_per_task = fast ? num_kv_heads : 1;
    const int tasks_per_seq = num_kv_heads / heads_per_task;

#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int task_id = 0; task_id < num_seqs * tasks_per_seq; task_id++) {
        const int s = task_id / tasks_per_seq;
        const int h0 = (task_id % tasks_per_seq) * heads_per_task;
        const int len = seq_lens[s];
        const int start = (sliding_window > 0 && len > sliding_window) ? len - sliding_window : 0;
        const int n = len - start;
        const int32_t *table = block_tables + (int64_t)s * max_blocks;
#ifdef TOKENMILL_AVX512_BF16
        if (fast) {
            const Task task = make_task(q, kv_cache, value_offset, table, s, num_heads, num_kv_heads, group, head_dim,
                                        block_size, start, n, scale);
            float *scores = malloc(sizeof(float) * (size_t)num_heads * (n > 0 ? n : 1));
            float *acc = calloc((size_t)num_heads * head_dim, sizeof(float));
            task_bf16_avx512(&task, (uint16_t *)out + (int64_t)s * num_heads * head_dim, scores, acc, NULL);
            free(scores);
            free(acc);
            continue;
        }
#endif
        head_generic(q, kv_cache, out, table, s, h0, start, n, num_heads, group, head_dim, block_size, block_stride,
                     token_stride, value_offset, scale, dtype);
    }
}
