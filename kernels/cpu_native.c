/* Native CPU kernels for decode steps, built on first use by cpu_native.py (-march=native, OpenMP).
 *
 * 1. splitserve_gemv_bf16: y = x . w^T (+ bias) for a few rows of bf16 x (cpu_gemv.py).
 *    A decode step of one sequence reads every weight once for one row of activations, so it is bound
 *    by memory bandwidth; oneDNN's bf16 kernel reaches about 40% of it on the CPUs measured here (it is
 *    tuned for GEMMs). This reads each weight row once, converts bf16 to float32 by a 16-bit shift
 *    and accumulates in float32, 16 lanes at a time.
 *    Numbers: each output is sum_k x[k] * w[k] in float32, lane l of 16 adding the elements k = l (mod 16)
 *    in order, the 16 lane sums added in a fixed tree, then the bias, then one rounding to bf16 (nearest,
 *    ties to even; NaN stays NaN). The order depends on nothing else (not the number of rows, threads
 *    or the instruction set), so a row's result is the same in every call.
 * 2. splitserve_decode_scores_* / splitserve_decode_values_*: decode attention read from the paged KV
 *    cache in place (cpu_decode_attention.py): scores = scale * q . K over each sequence's blocks, and,
 *    after the caller's softmax, out = probs . V; float32 arithmetic, bf16 or float32 caches.
 * 3. splitserve_add_rms_norm_bf16 / splitserve_rotary_bf16: a bf16 decoder layer's residual add + RMSNorm and
 *    its rotary embedding, one call each instead of several torch ops (cpu_layer_ops.py).
 *
 * The GEMV, the attention items, the norm row and the rotation of a head are also functions of one part of the work
 * (declared in cpu_vec.h), which cpu_decode_step.c runs inside its own parallel region for a whole decode step.
 *
 * Parallel regions run on the OpenMP runtime torch already uses: the GOMP_* symbols are left for the
 * process to provide. Written with GCC/Clang vector extensions: the compiler emits AVX-512, AVX2 or
 * SSE for the machine it builds on.
 */
#include "cpu_vec.h"

/* Weight elements read ahead of the loads (2 KiB): a layer's matrices are small (a few MiB, split over the
 * threads), and the hardware prefetchers ramp up too late on each; 9-10 -> 15-17 GB/s for 60 GEMVs of 3072 x 576
 * on a 2-core EPYC (runs/s29/bw.py). */
#define PREFETCH_AHEAD 1024
/* Output rows [r0, r1) of M rows of x; k16 = k rounded down to a multiple of 16 (the rest in scalar order). */
#define ROWS_KERNEL(M)                                                                                       \
    static void rows_##M(const uint16_t* w, const uint16_t* bias, const float* x, uint16_t* y, int64_t k,    \
                         int64_t n, int64_t r0, int64_t r1) {                                                \
        const int64_t k16 = k - k % 16;                                                                      \
        for (int64_t r = r0; r < r1; r++) {                                                                  \
            const uint16_t* wr = w + r * k;                                                                  \
            f32x16 acc[M];                                                                                   \
            for (int i = 0; i < M; i++) acc[i] = v_zero();                                                   \
            for (int64_t j = 0; j < k16; j += 16) {                                                          \
                __builtin_prefetch(wr + j + PREFETCH_AHEAD, 0, 0);                                           \
                f32x16 wv = load_bf16x16(wr + j);                                                            \
                for (int i = 0; i < M; i++) acc[i] = v_fma(acc[i], wv, load_f32x16(x + i * k + j));          \
            }                                                                                                \
            for (int i = 0; i < M; i++) {                                                                    \
                float s = sum_lanes(acc[i]);                                                                 \
                float tail = 0.f;                                                                            \
                for (int64_t j = k16; j < k; j++) tail += bf16_to_f32(wr[j]) * x[i * k + j];                 \
                s += tail;                                                                                   \
                if (bias) s += bf16_to_f32(bias[r]);                                                         \
                y[i * n + r] = f32_to_bf16(s);                                                               \
            }                                                                                                \
        }                                                                                                    \
    }
ROWS_KERNEL(1)
ROWS_KERNEL(2)
ROWS_KERNEL(3)
ROWS_KERNEL(4)

void gemv_part(const uint16_t* w, const uint16_t* bias, const float* xf, uint16_t* y, int64_t m, int64_t k, int64_t n,
               int64_t part, int64_t parts) {
    /* weight rows per pass over the row groups of x: ~128 KiB, so that the second and later groups read them from cache */
    const int64_t chunk = m <= 4 ? n : (65536 + k - 1) / k;
    int64_t r0, r1;
    share(n, part, parts, &r0, &r1);
    for (int64_t c0 = r0; c0 < r1; c0 += chunk) {
        const int64_t c1 = c0 + chunk < r1 ? c0 + chunk : r1;
        for (int64_t i = 0; i < m; i += 4) {
            const float* xi = xf + i * k;
            uint16_t* yi = y + i * n;
            switch (m - i < 4 ? m - i : 4) {
                case 1: rows_1(w, bias, xi, yi, k, n, c0, c1); break;
                case 2: rows_2(w, bias, xi, yi, k, n, c0, c1); break;
                case 3: rows_3(w, bias, xi, yi, k, n, c0, c1); break;
                default: rows_4(w, bias, xi, yi, k, n, c0, c1); break;
            }
        }
    }
}

/* y (m x n) = x (m x k) . w (n x k)^T + bias (n, or NULL); all bf16, row-major, contiguous. x is widened to
 * float32 once; the output rows are split evenly over num_threads threads (one thread for small products),
 * and each thread reads a weight row from memory once: for more than four rows of x it goes over its rows in
 * chunks of ~128 KiB, each chunk once per four rows of x. Returns 0, or -1 if memory ran out. */
int splitserve_gemv_bf16(const uint16_t* w, const uint16_t* bias, const uint16_t* x, uint16_t* y, int64_t m,
                         int64_t k, int64_t n, int num_threads) {
    float* xf = malloc((size_t)(m * k) * sizeof(float));
    if (!xf) return -1;
    for (int64_t j = 0; j < m * k; j++) xf[j] = bf16_to_f32(x[j]);
    if (num_threads < 1 || n * k < 65536) num_threads = 1;
#pragma omp parallel num_threads(num_threads) if (num_threads > 1)
    {
        gemv_part(w, bias, xf, y, m, k, n, omp_get_thread_num(), omp_get_num_threads());
    }
    free(xf);
    return 0;
}

/* ---- decode attention over the paged cache ----------------------------------------------------------
 * The cache is [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim] (K then V of each layer);
 * token t of sequence s is at offset t % block_size of block tables[s * max_blocks + t / block_size].
 * head_dim is a multiple of 16 and at most 256 (the caller checks). Query head h reads KV head
 * h / (num_heads / num_kv_heads). */
#define MAX_HEAD_VECTORS 16

/* Ask for rows rows of one head's nv * 16 elements (row_stride apart) ahead of their reads: a block's K or V of one
 * layer and head is a few KiB away from the last one read, where the hardware prefetchers do not look. */
/* how many blocks (or score items) ahead they are asked for: a block's few KiB take longer to arrive than one block's
 * arithmetic (4 against 1: 8-14% off decode attention at 8 and 32 sequences of 1,024 tokens, runs/s29/prefetch_ab.py) */
#ifndef PREFETCH_BLOCKS
#define PREFETCH_BLOCKS 4
#endif
#define prefetch_rows(first, rows, row_stride, nv)                                                            \
    for (int64_t pr = 0; pr < (rows); pr++)                                                                \
        for (int64_t pl = 0; pl < (nv) * 16 * (int64_t)sizeof(*(first)); pl += 64)                          \
            __builtin_prefetch((const char*)((first) + pr * (row_stride)) + pl, 0, 3);
#define GROUP_TILE 4

/* The loops below take head_dim / 16 (nv) and the number of query heads they serve (nj) as arguments;
 * called with constants (head_dim 64 or 128, up to GROUP_TILE heads), each copy is unrolled with its
 * sums in registers. */
#define VALUES_CALL(FN, NJ)                                                                                      \
    if (nv == 2)                                                                                                 \
        FN(p, cache, table, len, offset, block_stride, block_size, token_stride, max_len, o, head_dim, NJ, 2);   \
    else if (nv == 4)                                                                                            \
        FN(p, cache, table, len, offset, block_stride, block_size, token_stride, max_len, o, head_dim, NJ, 4);   \
    else if (nv == 8)                                                                                            \
        FN(p, cache, table, len, offset, block_stride, block_size, token_stride, max_len, o, head_dim, NJ, 8);   \
    else                                                                                                         \
        FN(p, cache, table, len, offset, block_stride, block_size, token_stride, max_len, o, head_dim, NJ, nv);

#define DECODE_KERNELS(SUFFIX, T, LOAD)                                                                        \
    /* scores of the group's query heads (qg, nj rows) for tokens t0 <= t < live of one block (k: its first) */ \
    INLINE void scores_tokens_##SUFFIX(const float* qg, const T* k, float* row, int64_t t0, int64_t live,      \
                                       int64_t token_stride, int64_t max_len, float scale, int64_t nj, int64_t nv) { \
        for (int64_t t = t0; t < live; t++) {                                                                  \
            const T* kt = k + (t - t0) * token_stride;                                                         \
            f32x16 kv[MAX_HEAD_VECTORS]; /* the token's key, widened once for the group's query heads */       \
            for (int64_t v = 0; v < nv; v++) kv[v] = LOAD(kt + 16 * v);                                        \
            for (int64_t j = 0; j < nj; j++) {                                                                 \
                const float* qh = qg + j * nv * 16;                                                            \
                f32x16 acc = v_mul(load_f32x16(qh), kv[0]);                                                    \
                for (int64_t v = 1; v < nv; v++) acc = v_fma(acc, load_f32x16(qh + 16 * v), kv[v]);            \
                row[j * max_len + t] = scale * sum_lanes(acc);                                                 \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    /* o[j] (o_stride apart) = sum over t < n of p[j, t] * V[t] for nj query heads of one KV head: nv * 16 elements     \
       of each value, from block_offset in each block */                                                                \
    INLINE void values_heads_##SUFFIX(const float* p, const T* cache, const int64_t* table, int64_t n,                  \
                                      int64_t block_offset, int64_t block_stride, int64_t block_size,                   \
                                      int64_t token_stride, int64_t max_len, float* o, int64_t o_stride, int64_t nj,    \
                                      int64_t nv) {                                                                     \
        f32x16 acc[GROUP_TILE][MAX_HEAD_VECTORS];                                                              \
        for (int64_t j = 0; j < nj; j++)                                                                       \
            for (int64_t v = 0; v < nv; v++) acc[j][v] = v_zero();                                             \
        for (int64_t t0 = 0; t0 < n; t0 += block_size) {                                                       \
            const T* val = cache + table[t0 / block_size] * block_stride + block_offset;                                \
            if (t0 + PREFETCH_BLOCKS * block_size < n) /* a later block's values, while this one's are summed */        \
                prefetch_rows(cache + table[t0 / block_size + PREFETCH_BLOCKS] * block_stride + block_offset, block_size, token_stride, nv); \
            const int64_t t1 = t0 + block_size < n ? t0 + block_size : n;                                      \
            for (int64_t t = t0; t < t1; t++, val += token_stride) {                                           \
                f32x16 vv[MAX_HEAD_VECTORS];                                                                   \
                for (int64_t v = 0; v < nv; v++) vv[v] = LOAD(val + 16 * v);                                   \
                for (int64_t j = 0; j < nj; j++) {                                                             \
                    const f32x16 pt = v_splat(p[j * max_len + t]);                                             \
                    for (int64_t v = 0; v < nv; v++) acc[j][v] = v_fma(acc[j][v], pt, vv[v]);                  \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (int64_t j = 0; j < nj; j++)                                                                       \
            for (int64_t v = 0; v < nv; v++) store_f32x16(o + j * o_stride + v * 16, acc[j][v]);              \
    }                                                                                                          \
    /* scores[s, h, t] (row stride max_len) = scale * q[s, h] . K[s, t]; -inf for len[s] <= t < max_len.                 \
       One work item: a sequence's KV head over one block of tokens, a block's heads in a row; items [it0, it1). */     \
    HIDDEN void decode_scores_items_##SUFFIX(const float* q, const T* cache, const int64_t* tables, const int64_t* lens, \
                                             float* scores, int64_t heads, int64_t kv_heads, int64_t head_dim,           \
                                             int64_t max_blocks, int64_t max_len, int64_t layer, int64_t num_layers,     \
                                             int64_t block_size, float scale, int64_t it0, int64_t it1) {                \
        const int64_t group = heads / kv_heads, blocks = (max_len + block_size - 1) / block_size, nv = head_dim / 16;    \
        const int64_t token_stride = kv_heads * head_dim, kv_stride = block_size * token_stride;                         \
        for (int64_t it = it0; it < it1; it++) {                                                                         \
            const int64_t s = it / (kv_heads * blocks), b = it / kv_heads % blocks, g = it % kv_heads;                     \
            const int64_t n = lens[s], t0 = b * block_size;                                                              \
            const int64_t t1 = t0 + block_size < max_len ? t0 + block_size : max_len;                                    \
            const int64_t live = n < t1 ? n : t1; /* tokens t0 <= t < live are in the sequence */                        \
            float* row = scores + (s * heads + g * group) * max_len;                                                     \
            for (int64_t j = 0; j < group; j++)                                                                          \
                for (int64_t t = live > t0 ? live : t0; t < t1; t++) row[j * max_len + t] = -INFINITY;                   \
            if (live <= t0) continue;                                                                                    \
            const T* k = cache + ((tables[s * max_blocks + b] * num_layers + layer) * 2) * kv_stride + g * head_dim;        \
            for (int64_t ahead = it == it0 ? it + 1 : it + PREFETCH_BLOCKS; ahead <= it + PREFETCH_BLOCKS && ahead < it1; ahead++) { \
                /* a later item's keys, while this one's scores are computed (the first item: the next few) */          \
                const int64_t s1 = ahead / (kv_heads * blocks), b1 = ahead / kv_heads % blocks, g1 = ahead % kv_heads;    \
                prefetch_rows(cache + ((tables[s1 * max_blocks + b1] * num_layers + layer) * 2) * kv_stride + g1 * head_dim, \
                              block_size, token_stride, nv);                                                            \
            }                                                                                                           \
            const float* qg = q + (s * heads + g * group) * head_dim;                                                    \
            if (nv == 4)                                                                                                 \
                scores_tokens_##SUFFIX(qg, k, row, t0, live, token_stride, max_len, scale, group, 4);                    \
            else if (nv == 8)                                                                                            \
                scores_tokens_##SUFFIX(qg, k, row, t0, live, token_stride, max_len, scale, group, 8);                    \
            else                                                                                                         \
                scores_tokens_##SUFFIX(qg, k, row, t0, live, token_stride, max_len, scale, group, nv);                   \
        }                                                                                                                \
    }                                                                                                                    \
    void splitserve_decode_scores_##SUFFIX(const float* q, const T* cache, const int64_t* tables, const int64_t* lens,   \
                                           float* scores, int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, \
                                           int64_t max_blocks, int64_t max_len, int64_t layer, int64_t num_layers,       \
                                           int64_t block_size, float scale, int num_threads) {                           \
        const int64_t items = batch * kv_heads * ((max_len + block_size - 1) / block_size);                              \
        _Pragma("omp parallel num_threads(num_threads) if (num_threads > 1 && items > 1)") {                             \
            int64_t it0, it1;                                                                                            \
            share(items, omp_get_thread_num(), omp_get_num_threads(), &it0, &it1);                                       \
            decode_scores_items_##SUFFIX(q, cache, tables, lens, scores, heads, kv_heads, head_dim, max_blocks, max_len, layer, \
                                         num_layers, block_size, scale, it0, it1);                                       \
        }                                                                                                                \
    }                                                                                                                    \
    /* out[s, h] = sum over t < len[s] of probs[s, h, t] * V[s, t]; one work item: a sequence's KV head and the         \
       query heads that read it, GROUP_TILE at a time (each value widened once for all of them), over one of slices     \
       equal slices of head_dim (a multiple of 16 elements: each output's sum is the same for any slices); items        \
       [it0, it1) of batch * kv_heads * slices. */                                                                      \
    HIDDEN void decode_values_items_##SUFFIX(const float* probs, const T* cache, const int64_t* tables, const int64_t* lens, \
                                             float* out, int64_t heads, int64_t kv_heads, int64_t head_dim,             \
                                             int64_t max_blocks, int64_t max_len, int64_t layer, int64_t num_layers,    \
                                             int64_t block_size, int64_t slices, int64_t it0, int64_t it1) {            \
        const int64_t group = heads / kv_heads, nv = head_dim / 16 / slices;                                            \
        const int64_t token_stride = kv_heads * head_dim, kv_stride = block_size * token_stride;                        \
        const int64_t block_stride = num_layers * 2 * kv_stride;                                                        \
        for (int64_t it = it0; it < it1; it++) {                                                                        \
            const int64_t s = it / (kv_heads * slices), g = it / slices % kv_heads, first = it % slices * nv * 16;      \
            const int64_t offset = (layer * 2 + 1) * kv_stride + g * head_dim + first;                                  \
            for (int64_t j0 = 0; j0 < group; j0 += GROUP_TILE) {                                                        \
                const int64_t nj = group - j0 < GROUP_TILE ? group - j0 : GROUP_TILE, h = g * group + j0;               \
                const float* p = probs + (s * heads + h) * max_len;                                                     \
                float* o = out + (s * heads + h) * head_dim + first;                                                    \
                const int64_t* table = tables + s * max_blocks;                                                         \
                const int64_t len = lens[s];                                                                            \
                switch (nj) {                                                                                           \
                    case 1: VALUES_CALL(values_heads_##SUFFIX, 1) break;                                                \
                    case 2: VALUES_CALL(values_heads_##SUFFIX, 2) break;                                                \
                    case 3: VALUES_CALL(values_heads_##SUFFIX, 3) break;                                                \
                    default: VALUES_CALL(values_heads_##SUFFIX, GROUP_TILE) break;                                      \
                }                                                                                                       \
            }                                                                                                           \
        }                                                                                                               \
    }                                                                                                                   \
    void splitserve_decode_values_##SUFFIX(const float* probs, const T* cache, const int64_t* tables, const int64_t* lens, \
                                           float* out, int64_t batch, int64_t heads, int64_t kv_heads, int64_t head_dim, \
                                           int64_t max_blocks, int64_t max_len, int64_t layer, int64_t num_layers,       \
                                           int64_t block_size, int num_threads) {                                        \
        const int64_t items = batch * kv_heads;                                                                          \
        _Pragma("omp parallel num_threads(num_threads) if (num_threads > 1 && items > 1)") {                             \
            int64_t it0, it1;                                                                                            \
            share(items, omp_get_thread_num(), omp_get_num_threads(), &it0, &it1);                                       \
            decode_values_items_##SUFFIX(probs, cache, tables, lens, out, heads, kv_heads, head_dim, max_blocks, max_len, layer, \
                                         num_layers, block_size, 1, it0, it1);                                              \
        }                                                                                                                \
    }

DECODE_KERNELS(bf16, uint16_t, load_bf16x16)
DECODE_KERNELS(f32, float, load_f32x16)

/* ---- the small ops of a bf16 decoder layer (cpu_layer_ops.py) ---------------------------------------
 * Each replaces several torch ops on a step's few rows, with torch's roundings: every op that torch runs
 * in bf16 rounds its float32 result to bf16 here too (nearest, ties to even). */

/* h = bf16(h + y) when y is given; then out = bf16(bf16(h * inv_rms) * w), inv_rms = 1 / sqrt(mean(h^2) + eps) in
 * float32 (the squares summed 16 lanes at a time, in a fixed tree). One row of dim elements. */
void add_rms_norm_row_bf16(uint16_t* h, const uint16_t* y, const uint16_t* w, uint16_t* out, int64_t dim, float eps) {
    const int64_t dim16 = dim - dim % 16;
    if (y)
        for (int64_t j = 0; j < dim; j++) h[j] = f32_to_bf16(bf16_to_f32(h[j]) + bf16_to_f32(y[j]));
    f32x16 acc = v_zero();
    for (int64_t j = 0; j < dim16; j += 16) {
        const f32x16 v = load_bf16x16(h + j);
        acc = v_fma(acc, v, v);
    }
    float sum = sum_lanes(acc);
    for (int64_t j = dim16; j < dim; j++) sum += bf16_to_f32(h[j]) * bf16_to_f32(h[j]);
    const float inv_rms = 1.0f / sqrtf(sum / (float)dim + eps);
    for (int64_t j = 0; j < dim; j++) out[j] = f32_to_bf16(bf16_to_f32(f32_to_bf16(bf16_to_f32(h[j]) * inv_rms)) * bf16_to_f32(w[j]));
}

/* add_rms_norm_row_bf16 on each of rows rows (y: NULL, or as many rows as h) */
void splitserve_add_rms_norm_bf16(uint16_t* h, const uint16_t* y, const uint16_t* w, uint16_t* out, int64_t rows,
                                  int64_t dim, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1 && rows * dim >= 65536)
    for (int64_t r = 0; r < rows; r++) add_rms_norm_row_bf16(h + r * dim, y ? y + r * dim : NULL, w, out + r * dim, dim, eps);
}

/* xh = bf16(bf16(xh * c) + bf16(swap_halves(xh) * s)) for one head (s: sin's row with its first half stored negated,
 * engine/rope.py) */
void rotary_head_bf16(uint16_t* xh, int64_t head_dim, const uint16_t* c, const uint16_t* s) {
    const int64_t half = head_dim / 2;
    for (int64_t j = 0; j < half; j++) {
        const float a = bf16_to_f32(xh[j]), b = bf16_to_f32(xh[j + half]);
        const float lo = bf16_to_f32(f32_to_bf16(a * bf16_to_f32(c[j]))) + bf16_to_f32(f32_to_bf16(b * bf16_to_f32(s[j])));
        const float hi = bf16_to_f32(f32_to_bf16(b * bf16_to_f32(c[j + half]))) + bf16_to_f32(f32_to_bf16(a * bf16_to_f32(s[j + half])));
        xh[j] = f32_to_bf16(lo);
        xh[j + half] = f32_to_bf16(hi);
    }
}

/* Rotate-half rotary embedding in place on x[t, h, :] (rows of heads * head_dim at row_stride elements), by the
 * cos and sin tables' rows at positions[t]. */
void splitserve_rotary_bf16(uint16_t* x, int64_t tokens, int64_t heads, int64_t head_dim, int64_t row_stride,
                            const uint16_t* cos, const uint16_t* sin, const int64_t* positions, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_threads > 1 && tokens * heads * head_dim >= 65536)
    for (int64_t t = 0; t < tokens; t++)
        for (int64_t h = 0; h < heads; h++)
            rotary_head_bf16(x + t * row_stride + h * head_dim, head_dim, cos + positions[t] * head_dim, sin + positions[t] * head_dim);
}
