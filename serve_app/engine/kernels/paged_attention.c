/* Decode attention straight over the paged KV cache, for CPUs (no gather, no padding).
 *
 * Each decoding row has one query token per head and attends to its first lens[n] positions,
 * found through its block table. Keys and values are read once, in place; the query heads
 * that share a KV head (grouped-query attention) are computed together so each key is loaded
 * once for all of them. Rows x KV heads are spread over the OpenMP threads of the process
 * (torch's own pool: this library resolves libgomp to the one torch loaded).
 *
 * The cache may hold 16-bit keys and values under float32 queries (half the bytes to read; the
 * sums stay float32). Layouts (contiguous): q, out [N, Hq, D]; k_cache, v_cache [blocks, bs, Hkv, D];
 * block_tables [N, bt_stride] (int64); lens [N] (int64). The score buffer is per task.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"



#define DEFINE_KERNEL(NAME, TQ, LOADQ, STOREQ, T, LOAD)                                              \
int NAME(const TQ* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,              \
         int64_t bt_stride, const int64_t* lens, TQ* out, int64_t N, int64_t Hq, int64_t Hkv,        \
         int64_t D, int64_t bs, float scale) {                                                       \
    const int64_t G = Hq / Hkv;                                                                      \
    int failed = 0;                                                                                  \
    _Pragma("omp parallel for collapse(2) schedule(dynamic, 1)")                                     \
    for (int64_t n = 0; n < N; n++) {                                                                \
        for (int64_t h = 0; h < Hkv; h++) {                                                          \
            const int64_t L = lens[n];                                                               \
            float* scores = (float*)malloc(sizeof(float) * (size_t)(G * L + G * D + G * D));         \
            if (!scores) { failed = 1; continue; }                                                   \
            float* qf = scores + G * L;                                                              \
            float* acc = qf + G * D;                                                                 \
            for (int64_t g = 0; g < G; g++)                                                          \
                for (int64_t d = 0; d < D; d++)                                                      \
                    qf[g * D + d] = LOADQ(q[(n * Hq + h * G + g) * D + d]) * scale;                  \
            const int64_t* table = block_tables + n * bt_stride;                                     \
            float mx[G], sum[G];                                                                     \
            for (int64_t g = 0; g < G; g++) { mx[g] = -INFINITY; sum[g] = 0.f; }                     \
            /* Block by block: a block's slots are consecutive, so no division per position. */    \
            for (int64_t t0 = 0; t0 < L; t0 += bs) {                                                 \
                const int64_t span = L - t0 < bs ? L - t0 : bs;                                      \
                const T* kb = k_cache + (table[t0 / bs] * bs * Hkv + h) * D;                         \
                for (int64_t o = 0; o < span; o++) {                                                 \
                    const T* k = kb + o * Hkv * D;                                                   \
                    for (int64_t g = 0; g < G; g++) {                                                \
                        const float* qg = qf + g * D;                                                \
                        float s = 0.f;                                                               \
                        _Pragma("omp simd reduction(+:s)")                                           \
                        for (int64_t d = 0; d < D; d++) s += qg[d] * LOAD(k[d]);                     \
                        scores[g * L + t0 + o] = s;                                                  \
                        if (s > mx[g]) mx[g] = s;                                                    \
                    }                                                                                \
                }                                                                                    \
            }                                                                                        \
            for (int64_t g = 0; g < G; g++) {                                                        \
                float* sg = scores + g * L;                                                          \
                const float m = mx[g];                                                               \
                float total = 0.f;                                                                   \
                _Pragma("omp simd reduction(+:total)")                                               \
                for (int64_t t = 0; t < L; t++) { sg[t] = exp_nonpositive(sg[t] - m); total += sg[t]; } \
                sum[g] = total;                                                                      \
            }                                                                                        \
            memset(acc, 0, sizeof(float) * (size_t)(G * D));                                         \
            for (int64_t t0 = 0; t0 < L; t0 += bs) {                                                 \
                const int64_t span = L - t0 < bs ? L - t0 : bs;                                      \
                const T* vb = v_cache + (table[t0 / bs] * bs * Hkv + h) * D;                         \
                for (int64_t o = 0; o < span; o++) {                                                 \
                    const T* v = vb + o * Hkv * D;                                                   \
                    for (int64_t g = 0; g < G; g++) {                                                \
                        const float p = scores[g * L + t0 + o];                                      \
                        float* ag = acc + g * D;                                                     \
                        _Pragma("omp simd")                                                          \
                        for (int64_t d = 0; d < D; d++) ag[d] += p * LOAD(v[d]);                     \
                    }                                                                                \
                }                                                                                    \
            }                                                                                        \
            for (int64_t g = 0; g < G; g++)                                                          \
                for (int64_t d = 0; d < D; d++)                                                      \
                    out[(n * Hq + h * G + g) * D + d] = STOREQ(acc[g * D + d] / sum[g]);             \
            free(scores);                                                                            \
        }                                                                                            \
    }                                                                                                \
    return failed;                                                                                   \
}

/* Named by query dtype, then cache dtype. */
#define IDENTITY(x) (x)

/* float32 queries over a float32 or float16 cache: common.h's attend_tokens_shared (vectorized
 * by hand where AVX-512 exists); its G query heads read the same keys while they are in cache
 * (one task per query head measured up to 1.5x slower). */
static int paged_decode_attention_f32(const float* q, const void* k_cache, const void* v_cache, int kv_f16,
                                      const int64_t* block_tables, int64_t bt_stride, const int64_t* lens, float* out,
                                      int64_t N, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, float scale) {
    const int64_t G = Hq / Hkv;
    int64_t max_len = 0;
    for (int64_t n = 0; n < N; n++) max_len = lens[n] > max_len ? lens[n] : max_len;
    int failed = 0;
#pragma omp parallel
    {
        float* scores = (float*)malloc(sizeof(float) * (size_t)attend_work(G, D, max_len));
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
        attend_tokens_shared(q, Hq * D, k_cache, v_cache, kv_f16, block_tables, bt_stride, lens, 0, N, NULL, 0, Hkv,
                             G, D, bs, scale, scores, out);
        free(scores);
    }
    return failed;
}

int paged_decode_attention_f32_f32(const float* q, const float* k_cache, const float* v_cache,
                                   const int64_t* block_tables, int64_t bt_stride, const int64_t* lens, float* out,
                                   int64_t N, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, float scale) {
    return paged_decode_attention_f32(q, k_cache, v_cache, 0, block_tables, bt_stride, lens, out, N, Hq, Hkv, D, bs,
                                      scale);
}

int paged_decode_attention_f32_f16(const float* q, const _Float16* k_cache, const _Float16* v_cache,
                                   const int64_t* block_tables, int64_t bt_stride, const int64_t* lens, float* out,
                                   int64_t N, int64_t Hq, int64_t Hkv, int64_t D, int64_t bs, float scale) {
    return paged_decode_attention_f32(q, k_cache, v_cache, 1, block_tables, bt_stride, lens, out, N, Hq, Hkv, D, bs,
                                      scale);
}
DEFINE_KERNEL(paged_decode_attention_f32_bf16, float, IDENTITY, IDENTITY, uint16_t, bf16_to_f32)
DEFINE_KERNEL(paged_decode_attention_bf16_bf16, uint16_t, bf16_to_f32, f32_to_bf16, uint16_t, bf16_to_f32)
