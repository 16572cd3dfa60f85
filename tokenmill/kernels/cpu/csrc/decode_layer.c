// The decoder stack of a Llama-family model for a decode step (a few rows, one new token each), bfloat16 or float32
// activations, weights in tokenmill's packed int4 / int8 layouts (quant.c), in one call from Python instead of
// ~10 a layer. Each layer runs, as tokenmill/model/llama.py does op by op:
//   rms_norm (+ residual) -> qkv GEMV (+ bias) -> rotary -> write_kv -> paged decode attention -> o_proj GEMV
//   -> rms_norm + residual -> gate_up GEMV -> silu_and_mul -> down GEMV
// then the final norm and, where the output layer is packed too and the caller asks, the logits, inside one OpenMP
// parallel region: the threads split each projection's output columns
// (the same kernels as the op-by-op path, whose column sums do not depend on the split) and meet at a barrier
// between dependent stages, so a step pays one fork and join instead of one per matmul. Its results are those of
// the op-by-op path, bit for bit, at any number of threads, while attention cuts each sequence into the same
// splits: up to 256 positions (at most 4 splits of 64 at any thread count), or when attention's work passes
// min_parallel_attention (the splits of the engine's thread count, as op by op); in between, one thread's
// splits, whose partial sums merge in another order than the op-by-op path's.
// Built with the other kernels by tokenmill/kernels/cpu/ops.py; driven by tokenmill/kernels/cpu/decode.py.
#define _GNU_SOURCE  // syscall, clock_gettime
#include <limits.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

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
    const void *bias;         // [n] in the activations' dtype, or NULL
} TmWeight;

typedef struct {
    const void *input_norm, *post_norm;      // [hidden], the activations' dtype
    TmWeight qkv, o, gate_up, down;
    int32_t sliding_window;                  // 0: none
} TmLayer;

// The model, set up once by decode.py: shapes, weights, and scratch rows for up to max_rows tokens.
typedef struct {
    int32_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, max_rows;
    float eps, scale;
    const TmLayer *layers;
    const void *final_norm;
    const float *cos, *sin;                  // [max_positions, head_dim / 2]
    // attention's work (positions x query heads x head_dim) below which its splits are those of one thread
    // (as the op-by-op path's would be); the decoder's multiply-adds (rows x weights) below which a step runs on
    // one thread.
    int64_t min_parallel_attention, min_parallel_step;
    // Scratch shared by the threads, rows in the activations' dtype: x [max_rows, hidden], qkv [max_rows,
    // (heads + 2 kv_heads) * head_dim], q and attention output [max_rows, heads * head_dim], gate_up [max_rows,
    // 2 * intermediate].
    void *x, *qkv, *q, *attn, *gate_up;
    // The activations' and KV cache's dtype: DTYPE_F32 or DTYPE_BF16 (paged_decode_attention's codes).
    int32_t dtype;
    // The output layer [vocab, hidden] when a packed kernel holds it (q NULL otherwise): the logits are then
    // computed in the step's region, where the caller passes a buffer for them.
    TmWeight lm_head;
} TmModel;

enum { DTYPE_F32 = 0, DTYPE_BF16 = 1 };

static inline int64_t elem_size(const TmModel *m) { return m->dtype == DTYPE_BF16 ? 2 : 4; }

// The element `offset` elements into a buffer in the model's dtype.
static inline void *row_at(const TmModel *m, void *base, int64_t offset) {
    return (char *)base + offset * elem_size(m);
}

// RMSNorm of x (with residual: of x + residual, stored back into residual), one thread, the model's dtype.
static void norm_rows(const TmModel *m, const void *x, void *residual, const void *weight, void *out, int rows) {
    if (m->dtype == DTYPE_BF16)
        rms_norm_bf16(x, m->hidden, residual, m->hidden, weight, out, m->hidden, rows, m->hidden, m->eps, 1);
    else
        rms_norm_f32(x, m->hidden, residual, m->hidden, weight, out, m->hidden, rows, m->hidden, m->eps);
}

// A barrier for the threads of one step's parallel region. Stages are microseconds to tens of microseconds
// apart, so a thread that arrives first spins for up to BARRIER_SPIN_NS (the other is about to arrive), then
// sleeps on a futex until the last one wakes it (the other thread was descheduled: on a shared machine, spinning
// on would hold a core that another process, or that thread, needs). OpenMP's own barrier under
// OMP_WAIT_POLICY=PASSIVE, which tokenmill sets, sleeps at once: a wake-up at each of a step's ~150 barriers.
// Measured on a loaded 2-core VM (BENCHMARKS.md, issue 15): yielding the core instead (sched_yield) and spinning
// without limit were 2-30x slower than one thread; a 50 us spin did best, up to 200 us and 1 ms worse.
typedef struct {
    atomic_int arrived;
    atomic_int generation;
    atomic_int sleepers;
    int num_threads;
} Barrier;

#define BARRIER_SPIN_NS 50000

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void barrier_wait(Barrier *b) {
    if (b->num_threads == 1) return;
    const int generation = atomic_load(&b->generation);
    if (atomic_fetch_add(&b->arrived, 1) == b->num_threads - 1) {
        atomic_store(&b->arrived, 0);
        atomic_fetch_add(&b->generation, 1);
#ifdef __linux__
        if (atomic_load(&b->sleepers) > 0)
            syscall(SYS_futex, &b->generation, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
#endif
        return;
    }
    const int64_t deadline = now_ns() + BARRIER_SPIN_NS;
    for (int spins = 1; atomic_load_explicit(&b->generation, memory_order_acquire) == generation; spins++) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
        if (spins % 256 || now_ns() < deadline) continue;
#ifdef __linux__
        // The generation is re-read by the kernel: a release between our check and the sleep returns at once.
        atomic_fetch_add(&b->sleepers, 1);
        syscall(SYS_futex, &b->generation, FUTEX_WAIT_PRIVATE, generation, NULL, NULL, 0);
        atomic_fetch_sub(&b->sleepers, 1);
#else
        sched_yield();
#endif
    }
}

// What one thread of the region owns: its copy of the residual stream and of the rows every thread reads whole
// (computed by each thread instead of one thread and a barrier), and the packed GEMV's scratch.
typedef struct {
    void *residual, *normed, *act;       // [rows, hidden], [rows, hidden], [rows, intermediate], model's dtype
    uint16_t *xr, *expanded;             // int4_gemv_prepare's layout of the GEMV input; its scale scratch
    float *xsum;
    float *xf;                           // [rows, k]: a bfloat16 input in float32, for the int8 GEMV
} ThreadScratch;

// Output columns handed out per grab: about CHUNK_BYTES of weights (at least 16 columns), so a thread that
// runs slower (its core shared with another process) takes fewer chunks instead of holding up the barrier.
#define CHUNK_BYTES 16384

// Columns of out [rows, w->n] = x [rows, w->k] @ w.T (+ bias), taken chunk by chunk from *next by every thread of
// the region; with one thread, all of them in one call. The columns' sums do not depend on the split: the same
// kernels and results as the op-by-op path (quant.py). Returns 0, or -1 when memory ran out.
static int linear_columns(const TmModel *m, const TmWeight *w, const void *x, void *out, int rows, atomic_long *next,
                          int num_threads, ThreadScratch *scratch) {
    const int64_t n = w->n, k = w->k, num_groups = k / w->group;
    const int64_t column_bytes = (w->kind == WEIGHT_INT4 ? k / 2 + 4 * num_groups : k + 4 * num_groups);
    int64_t chunk = num_threads == 1 ? n : (CHUNK_BYTES / column_bytes + 15) / 16 * 16;
    if (chunk < 16) chunk = 16;
    int status = 0;
    const int dtype = m->dtype;
#ifdef TOKENMILL_AVX512_BF16
    const int packed_int4 = w->kind == WEIGHT_INT4 && dtype == DTYPE_BF16;
    // Every thread lays out the (small) input itself, so no barrier separates the layout from the GEMV.
    if (packed_int4) int4_gemv_prepare(x, k, rows, k, scratch->xr, scratch->xsum);
    // int8 on bfloat16: the input in float32 once, not once per chunk (int8_gemm converts it on every call);
    const int packed_int8 = w->kind == WEIGHT_INT8 && dtype == DTYPE_BF16 && rows < MIN_BLOCKED_ROWS;
    if (packed_int8)
        for (int64_t i = 0; i < rows * k; i++) scratch->xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
#else
    const int packed_int4 = 0, packed_int8 = 0;
#endif
#ifdef TOKENMILL_AVX2
    // float32: the AVX2 column kernels read x in place (each thread sums the int4 groups of x itself).
    const int f32_columns = dtype == DTYPE_F32;
    if (f32_columns && w->kind == WEIGHT_INT4) int4_group_sums(x, rows, k, w->group, scratch->xsum);
#else
    const int f32_columns = 0;
#endif
    for (;;) {
        const int64_t n0 = atomic_fetch_add_explicit(next, 1, memory_order_relaxed) * chunk;
        if (n0 >= n) break;
        const int64_t n1 = n0 + chunk < n ? n0 + chunk : n;
        int chunk_status;
        if (f32_columns && w->kind == WEIGHT_INT4) {
            chunk_status = int4_gemv_f32_columns(x, scratch->xsum, rows, k, w->q, w->scales, w->offsets, w->group,
                                                 out, n, n0, n1);
        } else if (f32_columns) {
            chunk_status = int8_gemv_f32_columns(x, rows, k, w->q, w->scales, w->group, out, n, n0, n1);
        } else if (packed_int8) {
            chunk_status = int8_gemv_columns(scratch->xf, rows, k, w->q, w->scales, w->group, out, dtype, n, n0, n1);
        } else if (packed_int4) {
            chunk_status = int4_gemv_columns(scratch->xr, scratch->xsum, rows, k, w->q, w->scales, w->offsets,
                                             w->group, out, n, n0, n1, scratch->expanded);
        } else if (w->kind == WEIGHT_INT4) {  // float32, or no AVX512-BF16: quant.c's kernel on these columns
            chunk_status = int4_gemm(x, dtype, k, (const uint8_t *)w->q + n0 * (k / 2),
                                     (const uint16_t *)w->scales + n0 * num_groups,
                                     (const uint16_t *)w->offsets + n0 * num_groups, w->group, row_at(m, out, n0), n,
                                     rows, n1 - n0, k, 1);
        } else {
            chunk_status = int8_gemm(x, dtype, k, (const int8_t *)w->q + n0 * k,
                                     (const float *)w->scales + n0 * num_groups, w->group, row_at(m, out, n0), n,
                                     rows, n1 - n0, k, 1);
        }
        if (chunk_status != 0) status = -1;
        if (w->bias == NULL) continue;
        for (int i = 0; i < rows; i++)
            for (int64_t j = n0; j < n1; j++) {
                if (dtype == DTYPE_F32) {
                    ((float *)out)[i * n + j] += ((const float *)w->bias)[j];
                } else {  // as PyTorch's bfloat16 add: the float32 sum rounded once
                    uint16_t *o = (uint16_t *)out + i * n + j;
                    *o = f32_to_bf16(bf16_to_f32(*o) + bf16_to_f32(((const uint16_t *)w->bias)[j]));
                }
            }
    }
    return status;
}

// Multiply-adds of one row through every decoder layer's projections (and the output layer: with_head).
static int64_t layer_work(const TmModel *m, int with_head) {
    int64_t total = with_head ? m->lm_head.n * m->lm_head.k : 0;
    for (int l = 0; l < m->num_layers; l++) {
        const TmLayer *layer = &m->layers[l];
        total += layer->qkv.n * layer->qkv.k + layer->o.n * layer->o.k + layer->gate_up.n * layer->gate_up.k
                 + layer->down.n * layer->down.k;
    }
    return total;
}

// x [rows, hidden]: the embeddings of this step's tokens, one token per sequence; out [rows, hidden]: the final
// normed hidden states, both in the model's dtype; logits [rows, vocab] in the model's dtype, or NULL: computed
// with m->lm_head (which must then be set) in the step's region, the sums of the op-by-op path's packed kernel.
// kv_caches[layer]: [2, num_blocks, block_size, num_kv_heads, head_dim] in the model's dtype;
// slots, positions: [rows] int64; block_tables [rows, max_blocks] and seq_lens [rows] int32 (seq_lens
// including the new token). num_threads: the engine's thread count, which the op-by-op path runs with (it sets
// attention's splits, hence its sums); step_threads: the threads this call runs on (the results do not depend
// on it). Returns 0, -1 when memory ran out, -2 when rows exceeds max_rows.
//
// One parallel region for the whole step (one fork and join instead of one per matmul): the threads split
// every projection's output columns, and meet at a barrier after each stage whose output they all read.
// Stages whose output each thread needs whole (the norms with their residual add, the activation) are
// computed by every thread into its own copy; rotary, the KV write and attention by thread 0.
int tokenmill_decode_forward(const TmModel *m, const void *x, void *out, int rows, const int64_t *positions,
                             const int64_t *slots, void *const *kv_caches, int64_t num_blocks, int block_size,
                             const int32_t *block_tables, int max_blocks, const int32_t *seq_lens, int num_threads,
                             int step_threads, void *logits) {
    if (rows > m->max_rows || rows < 1 || (logits != NULL && m->lm_head.q == NULL)) return -2;
    const int hidden = m->hidden, head_dim = m->head_dim, inter = m->intermediate;
    const int q_size = m->num_heads * head_dim, kv_size = m->num_kv_heads * head_dim;
    const int qkv_size = q_size + 2 * kv_size;
    int64_t positions_attended = 0;
    for (int i = 0; i < rows; i++) positions_attended += seq_lens[i];
    const int attention_threads = positions_attended * q_size < m->min_parallel_attention ? 1 : num_threads;
    const int64_t es = elem_size(m);
    const int64_t value_offset = num_blocks * block_size * kv_size * es;
    const int region_threads =
        step_threads < 1 || (int64_t)rows * layer_work(m, logits != NULL) < m->min_parallel_step ? 1 : step_threads;

    // Per thread: residual, normed [rows, hidden], act [rows, intermediate], the GEMV input layout and scratch.
    int64_t max_k = hidden > inter ? hidden : inter;
    for (int l = 0; l < m->num_layers; l++) max_k = m->layers[l].o.k > max_k ? m->layers[l].o.k : max_k;
    const int64_t layout_width = int4_gemv_layout_width(max_k);
    // Bytes: residual, normed, act in the model's dtype, then the int4 GEMV's input layout and scale scratch.
    const size_t per_thread_bytes = (size_t)((2 * rows * hidden + rows * inter) * es
                                             + 2 * (rows * layout_width + 2 * (max_k / 32 + 1)));
    // Floats: the group sums, then the float32 input of the int8 GEMV.
    const size_t per_thread_f32 = (size_t)(rows * (max_k / 32) + 1 + rows * max_k);
    // Chunk counters: 4 projections a layer, and the output layer.
    const int num_stages = 4 * m->num_layers + 1;
    char *bytes = malloc(per_thread_bytes * (size_t)region_threads);
    float *f32 = malloc(sizeof(float) * per_thread_f32 * (size_t)region_threads);
    atomic_long *next = malloc(sizeof(atomic_long) * (size_t)num_stages);
    if (bytes == NULL || f32 == NULL || next == NULL) {
        free(bytes);
        free(f32);
        free(next);
        return -1;
    }
    for (int i = 0; i < num_stages; i++) atomic_init(&next[i], 0);
    Barrier barrier;
    atomic_init(&barrier.arrived, 0);
    atomic_init(&barrier.generation, 0);
    atomic_init(&barrier.sleepers, 0);
    barrier.num_threads = region_threads;
    atomic_int status;
    atomic_init(&status, 0);

#pragma omp parallel num_threads(region_threads)
    {
        const int t = omp_get_thread_num();
        // The team may be smaller than asked (nested in another region, a thread limit): its real size, read by
        // every thread before the first barrier.
#pragma omp single
        barrier.num_threads = omp_get_num_threads();
        const int nt = barrier.num_threads;
        char *mine = bytes + per_thread_bytes * (size_t)t;
        uint16_t *layout = (uint16_t *)(mine + (2 * rows * hidden + rows * inter) * es);
        float *mine_f32 = f32 + per_thread_f32 * (size_t)t;
        ThreadScratch scratch = {
            .residual = mine, .normed = mine + rows * hidden * es, .act = mine + 2 * rows * hidden * es,
            .xr = layout, .expanded = layout + rows * layout_width, .xsum = mine_f32,
            .xf = mine_f32 + rows * (max_k / 32) + 1,
        };
        memcpy(scratch.residual, x, (size_t)(rows * hidden * es));
        int failed = 0;
        for (int l = 0; l < m->num_layers; l++) {
            const TmLayer *layer = &m->layers[l];
            atomic_long *stage_next = next + 4 * l;
            // The first layer's norm reads the embeddings; later ones add the previous MLP output into the
            // residual.
            if (l == 0)
                norm_rows(m, scratch.residual, NULL, layer->input_norm, scratch.normed, rows);
            else
                norm_rows(m, m->x, scratch.residual, layer->input_norm, scratch.normed, rows);
            failed |= linear_columns(m, &layer->qkv, scratch.normed, m->qkv, rows, &stage_next[0], nt, &scratch);
            barrier_wait(&barrier);
            if (t == 0) {
                void *k = row_at(m, m->qkv, q_size), *v = row_at(m, m->qkv, q_size + kv_size);
                if (m->dtype == DTYPE_BF16)
                    rotary_bf16(m->qkv, qkv_size, m->num_heads, k, qkv_size, m->num_kv_heads, rows, head_dim,
                                positions, m->cos, m->sin, 1);
                else
                    rotary_f32(m->qkv, qkv_size, m->num_heads, k, qkv_size, m->num_kv_heads, rows, head_dim,
                               positions, m->cos, m->sin);
                write_kv((const char *)k, qkv_size * es, (const char *)v, qkv_size * es, (char *)kv_caches[l],
                         value_offset, slots, rows, kv_size * es, 1);
                for (int i = 0; i < rows; i++)  // the queries as [rows, heads, head_dim], contiguous
                    memcpy(row_at(m, m->q, (int64_t)i * q_size), row_at(m, m->qkv, (int64_t)i * qkv_size),
                           (size_t)(q_size * es));
                paged_decode_attention(m->q, kv_caches[l], m->attn, block_tables, seq_lens, rows, m->num_heads,
                                       m->num_kv_heads, head_dim, block_size, max_blocks, num_blocks, m->scale,
                                       layer->sliding_window, m->dtype, attention_threads, 1);
            }
            barrier_wait(&barrier);
            failed |= linear_columns(m, &layer->o, m->attn, m->x, rows, &stage_next[1], nt, &scratch);
            barrier_wait(&barrier);
            norm_rows(m, m->x, scratch.residual, layer->post_norm, scratch.normed, rows);
            failed |= linear_columns(m, &layer->gate_up, scratch.normed, m->gate_up, rows, &stage_next[2], nt,
                                     &scratch);
            barrier_wait(&barrier);
            if (m->dtype == DTYPE_BF16)
                silu_and_mul_bf16(m->gate_up, 2 * inter, scratch.act, inter, rows, inter, 1);
            else
                silu_and_mul_f32(m->gate_up, 2 * inter, scratch.act, inter, rows, inter);
            // Every thread has read x (its post-attention norm) before any writes it again here: the barrier
            // after gate_up lies between.
            failed |= linear_columns(m, &layer->down, scratch.act, m->x, rows, &stage_next[3], nt, &scratch);
            barrier_wait(&barrier);
        }
        if (logits != NULL) {  // every thread normalizes its own copy, which the output layer reads
            norm_rows(m, m->x, scratch.residual, m->final_norm, scratch.normed, rows);
            if (t == 0) memcpy(out, scratch.normed, (size_t)(rows * hidden * es));
            failed |= linear_columns(m, &m->lm_head, scratch.normed, logits, rows, &next[num_stages - 1], nt,
                                     &scratch);
        } else if (t == 0) {
            norm_rows(m, m->x, scratch.residual, m->final_norm, out, rows);
        }
        if (failed) atomic_store(&status, -1);
    }
    free(bytes);
    free(f32);
    free(next);
    return atomic_load(&status);
}
