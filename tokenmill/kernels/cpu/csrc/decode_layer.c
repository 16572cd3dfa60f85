// The decoder stack of a Llama-family model for a decode step (a few rows, one new token each), bfloat16
// activations, weights in tokenmill's packed int4 / int8 layouts (quant.c), in one call from Python instead of
// ~10 a layer. Each layer runs, as tokenmill/model/llama.py does op by op:
//   rms_norm (+ residual) -> qkv GEMV (+ bias) -> rotary -> write_kv -> paged decode attention -> o_proj GEMV
//   -> rms_norm + residual -> gate_up GEMV -> silu_and_mul -> down GEMV
// then the final norm. It calls the same kernels (kernels.h) with the same arguments and thread counts (except
// attention, which stays on one thread for small work), so its results are those of the op-by-op path, bit for
// bit while attention cuts each sequence into the same splits: up to 256 positions (at most 4 splits of 64 at
// any thread count), or at the same thread count; beyond, the splits' partial sums merge in another order.
// Built with the other kernels by tokenmill/kernels/cpu/ops.py; driven by tokenmill/kernels/cpu/decode.py.
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

enum { WEIGHT_INT8 = 0, WEIGHT_INT4 = 1 };

// One linear layer's packed weight [n, k] (quant.py's Int8Weight / Int4Weight) and its optional bias.
typedef struct {
    int32_t kind;             // WEIGHT_INT8 or WEIGHT_INT4
    const void *q;            // int8 [n, k], or int4 nibbles uint8 [n, k / 2]
    const void *scales;       // int8: float32 [n, k / group]; int4: float16 [n, k / group]
    const void *offsets;      // int4: float16 [n, k / group]; int8: unused
    int64_t group, n, k;
    const uint16_t *bias;     // bfloat16 [n] or NULL
} TmWeight;

typedef struct {
    const uint16_t *input_norm, *post_norm;  // bfloat16 [hidden]
    TmWeight qkv, o, gate_up, down;
    int32_t sliding_window;                  // 0: none
} TmLayer;

// The model, set up once by decode.py: shapes, weights, and scratch rows for up to max_rows tokens.
typedef struct {
    int32_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, max_rows;
    float eps, scale;
    const TmLayer *layers;
    const uint16_t *final_norm;
    const float *cos, *sin;                  // [max_positions, head_dim / 2]
    // Thread policy of the op-by-op path (ops.py _MIN_PARALLEL_ELEMENTS, quant.py _MIN_PARALLEL_WORK) and the
    // attention work (positions x query heads x head_dim) below which attention runs on one thread.
    int64_t min_parallel_elements, min_parallel_work, min_parallel_attention;
    // Scratch, bfloat16 rows: residual and x [max_rows, hidden], normed [max_rows, hidden], qkv [max_rows,
    // (heads + 2 kv_heads) * head_dim], q and attention output [max_rows, heads * head_dim], gate_up [max_rows,
    // 2 * intermediate], act [max_rows, intermediate].
    uint16_t *residual, *x, *normed, *qkv, *q, *attn, *gate_up, *act;
} TmModel;

static int elementwise_threads(const TmModel *m, int64_t elements, int num_threads) {
    return elements < m->min_parallel_elements ? 1 : num_threads;
}

// out [rows, w->n] = x [rows, w->k] @ w.T (+ bias), contiguous rows; 0, or -1 when memory ran out.
static int linear(const TmModel *m, const TmWeight *w, const uint16_t *x, uint16_t *out, int rows, int num_threads) {
    const int threads = (int64_t)rows * w->n * w->k < m->min_parallel_work ? 1 : num_threads;
    int status;
    if (w->kind == WEIGHT_INT4) {
        // The op-by-op path's kernel for these rows too (quant.py), so both paths compute the same sums.
        status = int4_gemv_bf16(x, w->k, (const uint8_t *)w->q, (const uint16_t *)w->scales,
                                (const uint16_t *)w->offsets, w->group, out, w->n, rows, w->n, w->k, threads);
        if (status == -2)  // no AVX512-BF16
            status = int4_gemm(x, 1, w->k, (const uint8_t *)w->q, (const uint16_t *)w->scales,
                               (const uint16_t *)w->offsets, w->group, out, w->n, rows, w->n, w->k, threads);
    } else {
        status = int8_gemm(x, 1, w->k, (const int8_t *)w->q, (const float *)w->scales, w->group, out, w->n, rows,
                           w->n, w->k, threads);
    }
    if (status != 0 || w->bias == NULL) return status;
    for (int i = 0; i < rows; i++)  // as PyTorch's bfloat16 add: the float32 sum rounded once
        for (int64_t j = 0; j < w->n; j++) {
            uint16_t *o = out + i * w->n + j;
            *o = f32_to_bf16(bf16_to_f32(*o) + bf16_to_f32(w->bias[j]));
        }
    return 0;
}

// x [rows, hidden]: the embeddings of this step's tokens, one token per sequence; out [rows, hidden]: the final
// normed hidden states. kv_caches[layer]: [2, num_blocks, block_size, num_kv_heads, head_dim] bfloat16;
// slots, positions: [rows] int64; block_tables [rows, max_blocks] and seq_lens [rows] int32 (seq_lens
// including the new token). Returns 0, -1 when memory ran out, -2 when rows exceeds max_rows.
int tokenmill_decode_forward(const TmModel *m, const uint16_t *x, uint16_t *out, int rows, const int64_t *positions,
                             const int64_t *slots, void *const *kv_caches, int64_t num_blocks, int block_size,
                             const int32_t *block_tables, int max_blocks, const int32_t *seq_lens, int num_threads) {
    if (rows > m->max_rows || rows < 1) return -2;
    const int hidden = m->hidden, head_dim = m->head_dim, inter = m->intermediate;
    const int q_size = m->num_heads * head_dim, kv_size = m->num_kv_heads * head_dim;
    const int qkv_size = q_size + 2 * kv_size;
    const int norm_threads = elementwise_threads(m, (int64_t)rows * hidden, num_threads);
    const int rope_threads = elementwise_threads(m, (int64_t)rows * (q_size + kv_size), num_threads);
    const int kv_threads = elementwise_threads(m, (int64_t)rows * 2 * kv_size, num_threads);
    const int silu_threads = elementwise_threads(m, (int64_t)rows * 2 * inter, num_threads);
    int64_t positions_attended = 0;
    for (int i = 0; i < rows; i++) positions_attended += seq_lens[i];
    const int attention_threads =
        positions_attended * q_size < m->min_parallel_attention ? 1 : num_threads;
    const int64_t value_offset = num_blocks * block_size * kv_size * (int64_t)sizeof(uint16_t);

    memcpy(m->residual, x, sizeof(uint16_t) * (size_t)rows * hidden);
    for (int l = 0; l < m->num_layers; l++) {
        const TmLayer *layer = &m->layers[l];
        // The first layer's norm reads the embeddings; later ones add the previous MLP output into the residual.
        if (l == 0)
            rms_norm_bf16(m->residual, hidden, NULL, 0, layer->input_norm, m->normed, hidden, rows, hidden, m->eps,
                          norm_threads);
        else
            rms_norm_bf16(m->x, hidden, m->residual, hidden, layer->input_norm, m->normed, hidden, rows, hidden,
                          m->eps, norm_threads);
        if (linear(m, &layer->qkv, m->normed, m->qkv, rows, num_threads) != 0) return -1;
        uint16_t *k = m->qkv + q_size, *v = m->qkv + q_size + kv_size;
        rotary_bf16(m->qkv, qkv_size, m->num_heads, k, qkv_size, m->num_kv_heads, rows, head_dim, positions, m->cos,
                    m->sin, rope_threads);
        write_kv((const char *)k, (int64_t)qkv_size * 2, (const char *)v, (int64_t)qkv_size * 2, (char *)kv_caches[l],
                 value_offset, slots, rows, (int64_t)kv_size * 2, kv_threads);
        for (int i = 0; i < rows; i++)  // the queries as [rows, heads, head_dim], contiguous
            memcpy(m->q + (int64_t)i * q_size, m->qkv + (int64_t)i * qkv_size, sizeof(uint16_t) * (size_t)q_size);
        paged_decode_attention(m->q, kv_caches[l], m->attn, block_tables, seq_lens, rows, m->num_heads,
                               m->num_kv_heads, head_dim, block_size, max_blocks, num_blocks, m->scale,
                               layer->sliding_window, 1, attention_threads, 1);
        if (linear(m, &layer->o, m->attn, m->x, rows, num_threads) != 0) return -1;
        rms_norm_bf16(m->x, hidden, m->residual, hidden, layer->post_norm, m->normed, hidden, rows, hidden, m->eps,
                      norm_threads);
        if (linear(m, &layer->gate_up, m->normed, m->gate_up, rows, num_threads) != 0) return -1;
        silu_and_mul_bf16(m->gate_up, 2 * inter, m->act, inter, rows, inter, silu_threads);
        if (linear(m, &layer->down, m->act, m->x, rows, num_threads) != 0) return -1;
    }
    rms_norm_bf16(m->x, hidden, m->residual, hidden, m->final_norm, out, hidden, rows, hidden, m->eps, norm_threads);
    return 0;
}
