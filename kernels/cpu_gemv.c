/* bf16 matrix-vector products for CPU decode steps: y = x . w^T (+ bias), one or two rows of x.
 *
 * A decode step of one sequence reads every weight once for one row of activations, so it is bound
 * by memory bandwidth; oneDNN's bf16 kernel reaches about 40% of it on the CPUs measured here (it is
 * tuned for GEMMs). This reads each weight row once, converts bf16 to float32 by a 16-bit shift
 * and accumulates in float32, 16 lanes at a time, with the OpenMP runtime torch already uses
 * (the GOMP_* symbols are left for the process to provide: see cpu_gemv.py).
 *
 * Numbers: each output is sum_k x[k] * w[k] in float32, lane l of 16 adding the elements k = l (mod 16)
 * in order, the 16 lane sums added in a fixed tree, then the bias, then one rounding to bf16 (nearest,
 * ties to even; NaN stays NaN). The order depends on nothing else (not the number of rows, threads
 * or the instruction set), so a row's result is the same in every call.
 *
 * Written with GCC/Clang vector extensions: the compiler emits AVX-512, AVX2 or SSE for the machine
 * it builds on (-march=native).
 */
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

static inline f32x16 load_bf16x16(const uint16_t* p) {
    u16x16 h;
    memcpy(&h, p, sizeof h);
    u32x16 u = __builtin_convertvector(h, u32x16) << 16;
    f32x16 f;
    memcpy(&f, &u, sizeof f);
    return f;
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

static inline float sum_lanes(f32x16 v) {
    float a[16];
    memcpy(a, &v, sizeof a);
    float s8[8], s4[4];
    for (int l = 0; l < 8; l++) s8[l] = a[l] + a[l + 8];
    for (int l = 0; l < 4; l++) s4[l] = s8[l] + s8[l + 4];
    return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

/* Output rows [r0, r1) of M rows of x; k16 = k rounded down to a multiple of 16 (the rest in scalar order). */
#define ROWS_KERNEL(M)                                                                                       \
    static void rows_##M(const uint16_t* w, const uint16_t* bias, const uint16_t* x, uint16_t* y, int64_t k,  \
                         int64_t n, int64_t r0, int64_t r1) {                                                \
        const int64_t k16 = k - k % 16;                                                                      \
        for (int64_t r = r0; r < r1; r++) {                                                                  \
            const uint16_t* wr = w + r * k;                                                                  \
            f32x16 acc[M];                                                                                   \
            for (int i = 0; i < M; i++) acc[i] = (f32x16){0};                                                \
            for (int64_t j = 0; j < k16; j += 16) {                                                          \
                f32x16 wv = load_bf16x16(wr + j);                                                            \
                for (int i = 0; i < M; i++) acc[i] += wv * load_bf16x16(x + i * k + j);                      \
            }                                                                                                \
            for (int i = 0; i < M; i++) {                                                                    \
                float s = sum_lanes(acc[i]);                                                                 \
                float tail = 0.f;                                                                            \
                for (int64_t j = k16; j < k; j++) tail += bf16_to_f32(wr[j]) * bf16_to_f32(x[i * k + j]);    \
                s += tail;                                                                                   \
                if (bias) s += bf16_to_f32(bias[r]);                                                         \
                y[i * n + r] = f32_to_bf16(s);                                                               \
            }                                                                                                \
        }                                                                                                    \
    }
ROWS_KERNEL(1)
ROWS_KERNEL(2)

/* y (m x n) = x (m x k) . w (n x k)^T + bias (n, or NULL); all bf16, row-major, contiguous; m is 1 or 2.
 * The output rows are split evenly over num_threads threads (one thread for small products). */
void splitserve_gemv_bf16(const uint16_t* w, const uint16_t* bias, const uint16_t* x, uint16_t* y, int64_t m,
                          int64_t k, int64_t n, int num_threads) {
    if (num_threads < 1 || n * k < 65536) num_threads = 1;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        int64_t parts = 1, part = 0;
#ifdef _OPENMP
        parts = omp_get_num_threads();
        part = omp_get_thread_num();
#endif
        int64_t r0 = n * part / parts, r1 = n * (part + 1) / parts;
        if (m == 1)
            rows_1(w, bias, x, y, k, n, r0, r1);
        else
            rows_2(w, bias, x, y, k, n, r0, r1);
    }
}
