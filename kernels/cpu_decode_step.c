/* A whole decode step of a bf16 Llama-family decoder in one call (cpu_decode_step.py).
 *
 * The op-by-op path makes ~11 native calls and a dozen torch ops per layer, each with its own argument
 * passing, allocation and OpenMP fork/join: on a 135M-parameter model at one sequence that is a fifth of
 * the step beside the weight reads. Here one parallel region runs every layer; its threads split each
 * phase (norm, QKV, rotation and cache write, scores, softmax, values, O, norm, gate/up, SiLU, down)
 * and meet at a barrier between phases.
 *
 * Numbers: each phase is the op-by-op native path's own kernel (cpu_native.c: the GEMV, the decode
 * attention items, the residual add + RMSNorm, the rotation) with its roundings; the softmax and SiLU,
 * torch's ops there, are float32 here too (exp_vf below), each bf16 op's result rounded to bf16 where
 * torch's would be. A sequence's numbers do not depend on the other rows of the step or the thread count.
 */
#include "cpu_vec.h"

/* One layer's weights (bf16, contiguous; NULL where the model has none). */
typedef struct {
    const uint16_t *input_norm, *qkv, *qkv_bias, *o_proj, *o_proj_bias, *qk_norm, *post_norm, *gate_up, *down;
} LayerWeights;

typedef struct {
    int64_t num_layers, dim, heads, kv_heads, head_dim, intermediate;
    float eps, scale;
    const LayerWeights* layers;
    const uint16_t *cos, *sin; /* rotary tables [positions, head_dim] (engine/rope.py) */
} Decoder;

INLINE float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }

static void widen(const uint16_t* x, float* out, int64_t n) {
    for (int64_t j = 0; j < n; j++) out[j] = bf16_to_f32(x[j]);
}

typedef int32_t vi32 __attribute__((vector_size(4 * NATIVE_LANES)));

/* exp of each lane in float32 (Cody-Waite reduction by ln 2 and Cephes' degree-7 polynomial: within ~1 ulp of the
 * exact result, as libm's expf and torch's vectorised exp are; each of the three rounds differently). 0 below
 * -87.34 (-inf included), exp(88) above 88, NaN stays NaN. */
INLINE vf exp_vf(vf x) {
    const vi32 nan = x != x, tiny = x < -87.336544f;
    const vi32 big = x > 88.f;
    x = (vf)(((vi32)x & ~big) | ((vi32)((vf){0} + 88.f) & big));
    x = (vf)((vi32)x & ~tiny); /* any finite value: masked below */
    const vf shifted = x * 1.44269504088896341f + 12582912.f; /* 1.5 * 2^23: rounds x / ln 2 to an integer */
    const vf n = shifted - 12582912.f;
    const vf r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.f;
    const vi32 two_n = ((vi32)shifted - 0x4B400000 + 127) << 23; /* 2^n from n in the low bits of shifted */
    vf e = p * (vf)two_n;
    e = (vf)((vi32)e & ~tiny);
    return (vf)(((vi32)e & ~nan) | ((vi32)x & nan));
}

/* out[j] = exp(x[j]) for n values (the tail through one padded vector) */
static void exp_array(const float* x, float* out, int64_t n) {
    int64_t j = 0;
    for (; j + NATIVE_LANES <= n; j += NATIVE_LANES) *(vf_any*)(out + j) = exp_vf(*(const vf_any*)(x + j));
    if (j < n) {
        float tail[NATIVE_LANES] = {0};
        memcpy(tail, x + j, (size_t)(n - j) * sizeof(float));
        const vf e = exp_vf(*(vf_any*)tail);
        memcpy(out + j, &e, (size_t)(n - j) * sizeof(float));
    }
}

/* exp_array as an entry point, for its tests */
void splitserve_exp_f32(const float* x, float* out, int64_t n) { exp_array(x, out, n); }

/* x = softmax(x) over n float32 scores (-inf: weight 0), as torch's: exp(x - max), then times 1 / sum */
static void softmax_row(float* x, int64_t n) {
    float max = -INFINITY, sum = 0.f;
    for (int64_t t = 0; t < n; t++) max = x[t] > max ? x[t] : max;
    for (int64_t t = 0; t < n; t++) x[t] -= max;
    exp_array(x, x, n);
    for (int64_t t = 0; t < n; t++) sum += x[t];
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < n; t++) x[t] *= inv;
}

#define SILU_CHUNK 256
/* out[e] = bf16(bf16(silu(g)) * u) for elements [a, b) of the step's [m, inter] MLP activations, g and u from the rows
 * of gate_up [m, 2 inter] (as torch's F.silu(gate).mul_(up) in bf16) */
static void silu_mul(const uint16_t* gate_up, float* out, int64_t inter, int64_t a, int64_t b) {
    float neg[SILU_CHUNK], e[SILU_CHUNK];
    for (int64_t c0 = a; c0 < b; c0 += SILU_CHUNK) {
        const int64_t c1 = c0 + SILU_CHUNK < b ? c0 + SILU_CHUNK : b;
        for (int64_t i = c0; i < c1; i++) neg[i - c0] = -bf16_to_f32(gate_up[i / inter * 2 * inter + i % inter]);
        exp_array(neg, e, c1 - c0);
        for (int64_t i = c0; i < c1; i++) {
            const uint16_t* gu = gate_up + i / inter * 2 * inter + i % inter;
            const float x = bf16_to_f32(gu[0]);
            out[i] = round_bf16(round_bf16(x / (1.f + e[i - c0])) * bf16_to_f32(gu[inter]));
        }
    }
}

/* h [m, dim] (bf16, the step's embedded tokens) becomes the residual stream after the last layer (its MLP output
 * added). Token r is a decode at positions[r] whose K and V go to slot slots[r] of the paged cache
 * [blocks, layers, 2, block_size, kv_heads, head_dim] and which attends over its lens[r] tokens (block table
 * row r of max_blocks). Returns 0, or -1 if memory ran out (h is then partly updated). */
int splitserve_decode_step_bf16(const Decoder* d, uint16_t* h, int64_t m, const int64_t* positions, const int64_t* slots,
                                uint16_t* cache, int64_t block_size, const int64_t* tables, int64_t max_blocks,
                                const int64_t* lens, int64_t max_len, int num_threads) {
    const int64_t dim = d->dim, heads = d->heads, kv_heads = d->kv_heads, hd = d->head_dim, inter = d->intermediate;
    const int64_t q_size = heads * hd, kv_size = kv_heads * hd, qkv_size = q_size + 2 * kv_size, group = heads / kv_heads;
    const int64_t layers = d->num_layers, qkv_heads = heads + 2 * kv_heads;
    int64_t widest = dim > q_size ? dim : q_size; /* float32 inputs of a GEMV */
    widest = widest > inter ? widest : inter;
    const int64_t wide_out = qkv_size > 2 * inter ? qkv_size : 2 * inter; /* bf16 outputs of QKV and gate/up */
    float* xf = malloc((size_t)(m * widest) * sizeof(float));
    float* qf = malloc((size_t)(m * q_size) * sizeof(float));
    float* scores = malloc((size_t)(m * heads * max_len) * sizeof(float));
    uint16_t* wide = malloc((size_t)(m * wide_out) * sizeof(uint16_t));
    uint16_t* normed = malloc((size_t)(m * dim) * sizeof(uint16_t));
    uint16_t* out = malloc((size_t)(m * dim) * sizeof(uint16_t)); /* O's output, then the MLP's */
    int status = 0;
    if (!xf || !qf || !scores || !wide || !normed || !out) {
        status = -1;
        goto done;
    }
    const int64_t kv_stride = block_size * kv_size; /* one layer's K (or V) in a block */
    const int64_t score_items = m * kv_heads * ((max_len + block_size - 1) / block_size);
    const int64_t slices = hd % 32 ? 1 : hd / 32; /* 64 bytes of each bf16 value row: one cache line */
#pragma omp parallel num_threads(num_threads > 0 ? num_threads : 1)
    {
        const int64_t part = omp_get_thread_num(), parts = omp_get_num_threads();
        int64_t a, b;
        for (int64_t l = 0; l < layers; l++) {
            const LayerWeights* w = d->layers + l;
            /* residual add (the previous layer's MLP) + input norm, widened for the QKV GEMV */
            share(m, part, parts, &a, &b);
            for (int64_t r = a; r < b; r++) {
                add_rms_norm_row_bf16(h + r * dim, l ? out + r * dim : NULL, w->input_norm, normed + r * dim, dim, d->eps);
                widen(normed + r * dim, xf + r * dim, dim);
            }
#pragma omp barrier
            gemv_part(w->qkv, w->qkv_bias, xf, wide, m, dim, qkv_size, part, parts);
#pragma omp barrier
            /* each head of each token: q and k (normalised and) rotated, q widened for the scores, k and v cached */
            share(m * qkv_heads, part, parts, &a, &b);
            for (int64_t it = a; it < b; it++) {
                const int64_t r = it / qkv_heads, j = it % qkv_heads;
                uint16_t* x = wide + r * qkv_size + j * hd;
                if (j < heads + kv_heads) {
                    if (w->qk_norm) add_rms_norm_row_bf16(x, NULL, w->qk_norm + j * hd, x, hd, d->eps);
                    rotary_head_bf16(x, hd, d->cos + positions[r] * hd, d->sin + positions[r] * hd);
                }
                if (j < heads) {
                    widen(x, qf + r * q_size + j * hd, hd);
                } else {
                    const int64_t is_v = j >= heads + kv_heads, g = j - heads - is_v * kv_heads;
                    const int64_t block = slots[r] / block_size, offset = slots[r] % block_size;
                    uint16_t* dst = cache + ((block * layers + l) * 2 + is_v) * kv_stride + offset * kv_size + g * hd;
                    memcpy(dst, x, (size_t)hd * sizeof(uint16_t));
                }
            }
#pragma omp barrier
            share(score_items, part, parts, &a, &b);
            decode_scores_items_bf16(qf, cache, tables, lens, scores, heads, kv_heads, hd, max_blocks, max_len, l, layers,
                                     block_size, d->scale, a, b);
#pragma omp barrier
            share(m * heads, part, parts, &a, &b);
            for (int64_t row = a; row < b; row++) softmax_row(scores + row * max_len, max_len);
#pragma omp barrier
            /* probs . V per sequence, KV head and slice of head_dim (a cache line of each value row), rounded to bf16 */
            share(m * kv_heads * slices, part, parts, &a, &b);
            decode_values_items_bf16(scores, cache, tables, lens, xf, heads, kv_heads, hd, max_blocks, max_len, l, layers, block_size,
                                     slices, a, b);
            for (int64_t it = a; it < b; it++) {
                const int64_t first = it / (kv_heads * slices) * heads + it / slices % kv_heads * group; /* in [m, heads] */
                for (int64_t j = 0; j < group; j++) {
                    float* o = xf + (first + j) * hd + it % slices * (hd / slices);
                    for (int64_t e = 0; e < hd / slices; e++) o[e] = round_bf16(o[e]);
                }
            }
#pragma omp barrier
            gemv_part(w->o_proj, w->o_proj_bias, xf, out, m, q_size, dim, part, parts);
#pragma omp barrier
            share(m, part, parts, &a, &b);
            for (int64_t r = a; r < b; r++) {
                add_rms_norm_row_bf16(h + r * dim, out + r * dim, w->post_norm, normed + r * dim, dim, d->eps);
                widen(normed + r * dim, xf + r * dim, dim);
            }
#pragma omp barrier
            gemv_part(w->gate_up, NULL, xf, wide, m, dim, 2 * inter, part, parts);
#pragma omp barrier
            share(m * inter, part, parts, &a, &b);
            silu_mul(wide, xf, inter, a, b);
#pragma omp barrier
            gemv_part(w->down, NULL, xf, out, m, inter, dim, part, parts);
#pragma omp barrier
        }
        share(m * dim, part, parts, &a, &b);
        for (int64_t e = a; e < b; e++) h[e] = f32_to_bf16(bf16_to_f32(h[e]) + bf16_to_f32(out[e]));
    }
done:
    free(xf);
    free(qf);
    free(scores);
    free(wide);
    free(normed);
    free(out);
    return status;
}
