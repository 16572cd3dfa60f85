// The entry points of tokenmill's native CPU kernels (paged_decode.c, layer_ops.c, quant.c, gemv_bf16.c), declared once for
// the kernels that compose them (decode_layer.c). tokenmill/kernels/cpu/ops.py sets the same signatures for ctypes.
#ifndef TOKENMILL_KERNELS_H
#define TOKENMILL_KERNELS_H

#include <stdint.h>

void paged_decode_attention(const void *q, const void *kv_cache, void *out, const int32_t *block_tables,
                            const int32_t *seq_lens, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                            int block_size, int max_blocks, int64_t num_blocks, float scale, int sliding_window,
                            int dtype, int num_threads, int allow_split);

void rms_norm_bf16(const uint16_t *x, int64_t x_stride, uint16_t *residual, int64_t r_stride,
                   const uint16_t *weight, uint16_t *out, int64_t o_stride, int n, int hidden, float eps,
                   int num_threads);
void rotary_bf16(uint16_t *q, int64_t q_stride, int q_heads, uint16_t *k, int64_t k_stride, int k_heads, int n,
                 int head_dim, const int64_t *positions, const float *cos, const float *sin, int num_threads);
void silu_and_mul_bf16(const uint16_t *x, int64_t x_stride, uint16_t *out, int64_t o_stride, int n, int inter,
                       int num_threads);
void rms_norm_f32(const float *x, int64_t x_stride, float *residual, int64_t r_stride, const float *weight,
                  float *out, int64_t o_stride, int n, int hidden, float eps);
void rotary_f32(float *q, int64_t q_stride, int q_heads, float *k, int64_t k_stride, int k_heads, int n, int head_dim,
                const int64_t *positions, const float *cos, const float *sin);
void silu_and_mul_f32(const float *x, int64_t x_stride, float *out, int64_t o_stride, int n, int inter);
void write_kv(const char *k, int64_t k_stride, const char *v, int64_t v_stride, char *cache, int64_t value_offset,
              const int64_t *slots, int n, int64_t row_bytes, int num_threads);

int int8_gemm(const void *x, int x_dtype, int64_t x_stride, const int8_t *q, const float *scales, int64_t group,
              void *out, int64_t out_stride, int64_t M, int64_t N, int64_t K, int num_threads);
int int4_gemm(const void *x, int x_dtype, int64_t x_stride, const uint8_t *q, const uint16_t *scales,
              const uint16_t *offsets, int64_t group, void *out, int64_t out_stride, int64_t M, int64_t N, int64_t K,
              int num_threads);

// float32 activations, AVX2: the packed kernels' sums on a range of output columns (-2 without AVX2).
void int4_group_sums(const float *x, int64_t rows, int64_t K, int64_t group, float *xsum);
int int4_gemv_f32_columns(const float *x, const float *xsum, int64_t rows, int64_t K, const uint8_t *q,
                          const uint16_t *scales, const uint16_t *offsets, int64_t group, float *out,
                          int64_t out_stride, int64_t n0, int64_t n1);
int int8_gemv_f32_columns(const float *x, int64_t rows, int64_t K, const int8_t *q, const float *scales,
                          int64_t group, float *out, int64_t out_stride, int64_t n0, int64_t n1);
// Rows from which int8_gemm multiplies in blocks of rows; below, int8_gemv_columns.
#define MIN_BLOCKED_ROWS 4
// int8_gemm's AVX512 sums below MIN_BLOCKED_ROWS rows on columns [n0, n1): float32 x, out in out_dtype (-2 without
// AVX512-BF16).
int int8_gemv_columns(const float *x, int64_t rows, int64_t K, const int8_t *q, const float *scales, int64_t group,
                      void *out, int out_dtype, int64_t out_stride, int64_t n0, int64_t n1);

// The float32 int8 tile kernel for more rows than the packed kernel takes (-2 without AVX2).
int tokenmill_quant_tile_f32_vectorized(void);
int int8_tile_gemm_f32(const float *x, int64_t x_stride, const int8_t *q, const float *scales, int64_t group,
                       float *out, int64_t out_stride, int64_t M, int64_t N, int64_t K, int num_threads);
int int4_tile_gemm_f32(const float *x, int64_t x_stride, const uint8_t *q, const uint16_t *scales,
                       const uint16_t *offsets, int64_t group, float *out, int64_t out_stride, int64_t M, int64_t N,
                       int64_t K, int num_threads);

int int4_gemv_bf16(const uint16_t *x, int64_t x_stride, const uint8_t *q, const uint16_t *scales,
                   const uint16_t *offsets, int64_t group, uint16_t *out, int64_t out_stride, int64_t rows,
                   int64_t n_out, int64_t k, int num_threads);
// int4_gemv_bf16 in pieces, for a caller that splits the columns over threads of its own: the activations laid
// out once (xr [rows, int4_gemv_layout_width(k)], xsum [rows, k / 32]), then any range of output columns.
int64_t int4_gemv_layout_width(int64_t k);
void int4_gemv_prepare(const uint16_t *x, int64_t x_stride, int64_t rows, int64_t k, uint16_t *xr, float *xsum);
int int4_gemv_columns(const uint16_t *xr, const float *xsum, int64_t rows, int64_t k, const uint8_t *q,
                      const uint16_t *scales, const uint16_t *offsets, int64_t group, uint16_t *out,
                      int64_t out_stride, int64_t n0, int64_t n1, uint16_t *expanded);

#endif
