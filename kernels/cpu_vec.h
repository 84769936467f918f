/* Vector helpers shared by the native CPU kernels (cpu_native.c, cpu_decode_step.c), and the entry points of
 * cpu_native.c that the fused decode step runs inside its own parallel region (one part of the work each).
 */
#ifndef SPLITSERVE_CPU_VEC_H
#define SPLITSERVE_CPU_VEC_H
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h> /* built with -fopenmp (cpu_native.py) */

#define INLINE static inline __attribute__((always_inline))

/* f32x16: 16 float32 lanes, held as the machine's own vectors (one AVX-512 register, two AVX ones, four
 * SSE ones). GCC lowers a 64-byte vector type on a machine without AVX-512 through the stack (AVX2 GEMV
 * 2.6x slower than torch's bf16 path), so the kernels go through the helpers below instead of vector operators.
 * Every operation is lane by lane, and sum_lanes adds the lanes in one fixed tree whatever the width. */
#if defined(__AVX512F__)
#define NATIVE_LANES 16
#elif defined(__AVX__)
#define NATIVE_LANES 8
#else
#define NATIVE_LANES 4
#endif
#define PIECES (16 / NATIVE_LANES)
typedef float vf __attribute__((vector_size(4 * NATIVE_LANES)));
typedef uint32_t vu32 __attribute__((vector_size(4 * NATIVE_LANES)));
typedef uint16_t vu16 __attribute__((vector_size(2 * NATIVE_LANES)));
/* the same vectors at any address (unaligned loads and stores) */
typedef float vf_any __attribute__((vector_size(4 * NATIVE_LANES), aligned(4), may_alias));
typedef uint16_t vu16_any __attribute__((vector_size(2 * NATIVE_LANES), aligned(2), may_alias));
typedef struct {
    vf p[PIECES]; /* lanes NATIVE_LANES * i ... of the 16 in p[i] */
} f32x16;

INLINE f32x16 v_zero(void) {
    f32x16 r;
    for (int i = 0; i < PIECES; i++) r.p[i] = (vf){0};
    return r;
}
INLINE f32x16 v_splat(float s) {
    f32x16 r;
    for (int i = 0; i < PIECES; i++) r.p[i] = (vf){0} + s;
    return r;
}
INLINE f32x16 v_mul(f32x16 a, f32x16 b) {
    for (int i = 0; i < PIECES; i++) a.p[i] *= b.p[i];
    return a;
}
/* acc + a * b, lane by lane (contracted to a fused multiply-add where the machine has one) */
INLINE f32x16 v_fma(f32x16 acc, f32x16 a, f32x16 b) {
    for (int i = 0; i < PIECES; i++) acc.p[i] += a.p[i] * b.p[i];
    return acc;
}
INLINE f32x16 load_bf16x16(const uint16_t* p) {
    f32x16 r;
    for (int i = 0; i < PIECES; i++)
        r.p[i] = (vf)(__builtin_convertvector(*(const vu16_any*)(p + i * NATIVE_LANES), vu32) << 16);
    return r;
}
INLINE f32x16 load_f32x16(const float* p) {
    f32x16 r;
    for (int i = 0; i < PIECES; i++) r.p[i] = *(const vf_any*)(p + i * NATIVE_LANES);
    return r;
}
INLINE void store_f32x16(float* p, f32x16 v) {
    for (int i = 0; i < PIECES; i++) *(vf_any*)(p + i * NATIVE_LANES) = v.p[i];
}

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
typedef float f32x2 __attribute__((vector_size(8)));

/* lanes l and l + 8 first, then l and l + 4, then l and l + 2, then the last two */
INLINE float sum_lanes(f32x16 v) {
#if NATIVE_LANES == 16
    f32x8 a = __builtin_shufflevector(v.p[0], v.p[0], 0, 1, 2, 3, 4, 5, 6, 7) +
              __builtin_shufflevector(v.p[0], v.p[0], 8, 9, 10, 11, 12, 13, 14, 15);
    f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
#elif NATIVE_LANES == 8
    f32x8 a = v.p[0] + v.p[1];
    f32x4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
#else
    f32x4 b = (v.p[0] + v.p[2]) + (v.p[1] + v.p[3]);
#endif
    f32x2 c = __builtin_shufflevector(b, b, 0, 1) + __builtin_shufflevector(b, b, 2, 3);
    return c[0] + c[1];
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as torch rounds it */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#define HIDDEN __attribute__((visibility("hidden")))

/* [a, b): part `part` of `parts` even shares of n items */
INLINE void share(int64_t n, int64_t part, int64_t parts, int64_t* a, int64_t* b) {
    *a = n * part / parts;
    *b = n * (part + 1) / parts;
}

/* part `part` of `parts` of y = x . w^T (+ bias): its share of the n output columns, for m rows of float32 x */
HIDDEN void gemv_part(const uint16_t* w, const uint16_t* bias, const float* xf, uint16_t* y, int64_t m, int64_t k, int64_t n,
                      int64_t part, int64_t parts);
/* work items [it0, it1) of splitserve_decode_scores_bf16 / splitserve_decode_values_bf16 (same arguments; the values'
 * items split each head's output into slices equal parts, cpu_native.c) */
HIDDEN void decode_scores_items_bf16(const float* q, const uint16_t* cache, const int64_t* tables, const int64_t* lens,
                                     float* scores, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_blocks,
                                     int64_t max_len, int64_t layer, int64_t num_layers, int64_t block_size, float scale,
                                     int64_t it0, int64_t it1);
HIDDEN void decode_values_items_bf16(const float* probs, const uint16_t* cache, const int64_t* tables, const int64_t* lens,
                                     float* out, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_blocks,
                                     int64_t max_len, int64_t layer, int64_t num_layers, int64_t block_size, int64_t slices,
                                     int64_t it0, int64_t it1);
/* one row of splitserve_add_rms_norm_bf16 (y may be NULL) */
HIDDEN void add_rms_norm_row_bf16(uint16_t* h, const uint16_t* y, const uint16_t* w, uint16_t* out, int64_t dim, float eps);
/* one head of splitserve_rotary_bf16: xh rotated in place by the tables' rows c and s */
HIDDEN void rotary_head_bf16(uint16_t* xh, int64_t head_dim, const uint16_t* c, const uint16_t* s);

#endif
