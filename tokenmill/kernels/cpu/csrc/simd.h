// Helpers shared by tokenmill's native CPU kernels: bfloat16 <-> float32 conversions and, with AVX512-BF16, a
// vectorized e^x and tail masks.
#ifndef TOKENMILL_SIMD_H
#define TOKENMILL_SIMD_H

#include <stdint.h>
#include <string.h>
// AVX512-BF16: the kernels' AVX512 paths, which also use AVX512-BW, AVX512-VNNI and AVX512-VBMI (Sapphire Rapids
// and later, Zen 4 and later; Cooper Lake, without VBMI, builds the AVX2 paths).
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && \
    defined(__AVX512VBMI__)
#include <immintrin.h>
#define TOKENMILL_AVX512_BF16 1
#endif
// AMX (Sapphire Rapids and later): the tile kernels' matrix multiplies (TDPBF16PS), where the kernel grants the
// process the tile state (quant.c's amx_ready(), tokenmill_quant_tile_amx()).
#if defined(TOKENMILL_AVX512_BF16) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#define TOKENMILL_AMX 1
#endif
// x86-64-v3 (AVX2, FMA, F16C): the packed kernels' float32 paths where AVX512-BF16 is missing.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TOKENMILL_AVX2 1
#endif

// Bytes of weights the AVX512 GEMVs of one row prefetch ahead of the column they multiply: such a GEMV streams a
// few hundred bytes per column, which the hardware prefetcher follows too late (1.3-1.5x at one row measured by
// benchmarks/packed_bf16.py; BENCHMARKS.md, "The packed kernels' loads ahead").
#define PREFETCH_BYTES 2048

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
    u += 0x7fffu + ((u >> 16) & 1u);                                            // round to nearest even
    return (uint16_t)(u >> 16);
}

#ifdef TOKENMILL_AVX2
// e^x for 8 floats: exp512's method, with the power of two built from its exponent bits (no scalef in AVX2).
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f));
    const __m256 k = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, k), _mm256_set1_ps(0.6931471805599453f));
    __m256 p = _mm256_set1_ps(1.f / 720.f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 120.f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 24.f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f / 6.f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
    const __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(two_k));
}

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

#ifdef TOKENMILL_AVX512_BF16
// 16 bfloat16 values (bits) as float32, exactly.
static inline __m512 bf16x16_to_f32(__m256i v) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static inline __m512 load_bf16x16(const uint16_t *p) {
    return bf16x16_to_f32(_mm256_loadu_si256((const __m256i *)p));
}

// float -> bfloat16 (round to nearest even) -> float.
static inline __m512 round_bf16(__m512 x) { return bf16x16_to_f32((__m256i)_mm512_cvtneps_pbh(x)); }

// The first `remaining` of 16 lanes.
static inline __mmask16 tail_mask(int remaining) {
    return remaining >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << remaining) - 1);
}

// e^x for 16 floats: 2^(x log2 e) as an integer power (scalef) times a degree-6 polynomial on [-0.5, 0.5].
static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-88.0f)), _mm512_set1_ps(88.0f));
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
#endif

#endif
