/* Shared by the kernels (static inline: each file gets its own vectorized copy). */
#ifndef SERVE_APP_KERNELS_COMMON_H
#define SERVE_APP_KERNELS_COMMON_H
#include <math.h>
#include <stdint.h>
#include <string.h>

/* bfloat16 <-> float32 (a bf16 is the top half of a float32). */
static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 64);  /* NaN */
    bits += 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

/* exp for x <= 0 (softmax of scores minus their max), written so that gcc vectorizes the loop
 * around it: a scalar libm expf per score was most of the kernel's time. Cephes' expf:
 * exp(x) = 2^k exp(r), |r| <= ln2/2, degree-6 polynomial; relative error below 2e-7. */
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float k = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    const uint32_t bits = (uint32_t)((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* silu(g) * u, with the sigmoid from exp(-|g|) <= 1 (no overflow); vectorizes in a simd loop. */
static inline float silu_times(float g, float u) {
    const float e = exp_nonpositive(-fabsf(g));
    return g * (g >= 0.f ? 1.f : e) / (1.f + e) * u;
}

/* Rotary embedding of one head in place, transformers' rotate_half convention: pairs (i, i + D/2). */
static inline void rotate_head(float* v, const float* c, const float* s, int64_t D) {
    const int64_t half = D / 2;
#pragma omp simd
    for (int64_t i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i + half] + a * s[i + half];
    }
}

/* Attention of one query token's G heads (q [G, D]) over the first L positions of a block table
 * in a cache [blocks, bs, Hkv, D] of float32 (attend_f32) or float16 (attend_f16: half the bytes,
 * widened in registers), at KV head kh: out [G, D] = softmax(q k * scale) v, float32 throughout.
 * scores holds G * L floats. Softmax in two passes over the stored scores (exact, max subtracted).
 * AVX-512 keeps q's products and the output in registers (D up to 256); elsewhere plain loops. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define ATTEND_MAX_CHUNKS 16
#define ATTEND_FAST(D) ((D) % 16 == 0 && (D) <= 16 * ATTEND_MAX_CHUNKS)
#define LOAD16_F32(p) _mm512_loadu_ps(p)
#define LOAD16_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p)))
#else
#define ATTEND_FAST(D) 0
#endif
#define TO_F32_F32(x) (x)
#define TO_F32_F16(x) ((float)(x))

/* Rows of a block table are scattered in memory (a block of bs positions here, the next anywhere),
 * so the hardware prefetcher cannot follow them: the loops below fetch the next block's row o
 * while they read this block's row o. */
static inline void prefetch_bytes(const void* row, int64_t bytes) {
#if defined(__AVX512F__)
    for (int64_t c = 0; c < bytes; c += 64) _mm_prefetch((const char*)row + c, _MM_HINT_T0);
#else
    (void)row; (void)bytes;
#endif
}

/* From this many rows, a task attends one row at all its KV heads (its blocks' lines, which hold
 * every head, are read while in cache: 1.2x at 32 rows); below, a task per row and KV head keeps
 * the threads busy. */
#define ATTEND_ROWS_MIN 8

/* One attend_<SUFFIX> for a cache of element type T: LOAD16 widens 16 elements to an __m512,
 * TO_F32 one element to a float. */
#define DEFINE_ATTEND(SUFFIX, T, LOAD16, TO_F32)                                                             \
/* KV head kh's row at the first position of the table's block b, or NULL past L positions. */               \
static inline const T* block_rows_##SUFFIX(const T* cache, const int64_t* table, int64_t b, int64_t L,        \
                                           int64_t bs, int64_t Hkv, int64_t kh, int64_t D) {                  \
    return b * bs < L ? cache + (table[b] * bs * Hkv + kh) * D : NULL;                                       \
}                                                                                                            \
                                                                                                             \
/* og [D] = softmax(sg [L], whose max is mx) @ values; the scores become probabilities. */                   \
static inline void attend_values_##SUFFIX(float* sg, float mx, const T* v_cache, const int64_t* table,       \
                                          int64_t L, int64_t bs, int64_t Hkv, int64_t kh, int64_t D,          \
                                          float* og) {                                                       \
    const int64_t row = Hkv * D;                                                                             \
    float total = 0.f;                                                                                       \
    _Pragma("omp simd reduction(+:total)")                                                                   \
    for (int64_t i = 0; i < L; i++) { sg[i] = exp_nonpositive(sg[i] - mx); total += sg[i]; }                 \
    const float inv = 1.f / total;                                                                           \
    ATTEND_VALUES_FAST(SUFFIX, T, LOAD16)                                                                    \
    memset(og, 0, sizeof(float) * (size_t)D);                                                                \
    for (int64_t t0 = 0; t0 < L; t0 += bs) {                                                                 \
        const int64_t span = L - t0 < bs ? L - t0 : bs;                                                      \
        const T* vb = block_rows_##SUFFIX(v_cache, table, t0 / bs, L, bs, Hkv, kh, D);                      \
        for (int64_t o = 0; o < span; o++) {                                                                 \
            const T* v = vb + o * row;                                                                       \
            const float p = sg[t0 + o];                                                                      \
            _Pragma("omp simd")                                                                              \
            for (int64_t d = 0; d < D; d++) og[d] += p * TO_F32(v[d]);                                       \
        }                                                                                                    \
    }                                                                                                        \
    for (int64_t d = 0; d < D; d++) og[d] *= inv;                                                            \
}                                                                                                            \
                                                                                                             \
static inline void attend_##SUFFIX(const float* q, const T* k_cache, const T* v_cache, const int64_t* table, \
                                   int64_t L, int64_t bs, int64_t Hkv, int64_t kh, int64_t G, int64_t D,      \
                                   float scale, float* scores, float* out) {                                 \
    /* Block by block (a division per block, not per position), each key row read once for all G heads. */   \
    const int64_t row = Hkv * D;                                                                             \
    float mx[G];                                                                                             \
    for (int64_t g = 0; g < G; g++) mx[g] = -INFINITY;                                                       \
    for (int64_t t0 = 0; t0 < L; t0 += bs) {                                                                 \
        const int64_t span = L - t0 < bs ? L - t0 : bs;                                                      \
        const T* kb = block_rows_##SUFFIX(k_cache, table, t0 / bs, L, bs, Hkv, kh, D);                      \
        const T* knext = block_rows_##SUFFIX(k_cache, table, t0 / bs + 1, L, bs, Hkv, kh, D);               \
        for (int64_t o = 0; o < span; o++) {                                                                 \
            const T* k = kb + o * row;                                                                       \
            if (knext) prefetch_bytes(knext + o * row, D * (int64_t)sizeof *k);                              \
            for (int64_t g = 0; g < G; g++) {                                                                \
                const float* qg = q + g * D;                                                                 \
                float dot = 0.f;                                                                             \
                ATTEND_DOT_FAST(LOAD16)                                                                      \
                {                                                                                            \
                    _Pragma("omp simd reduction(+:dot)")                                                     \
                    for (int64_t d = 0; d < D; d++) dot += qg[d] * TO_F32(k[d]);                             \
                }                                                                                            \
                dot *= scale;                                                                                \
                scores[g * L + t0 + o] = dot;                                                                \
                mx[g] = dot > mx[g] ? dot : mx[g];                                                           \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    for (int64_t g = 0; g < G; g++)                                                                          \
        attend_values_##SUFFIX(scores + g * L, mx[g], v_cache, table, L, bs, Hkv, kh, D, out + g * D);       \
}

#if defined(__AVX512F__)
/* q . k for one position, two accumulators (an if/else head: the plain loop is the else) */
#define ATTEND_DOT_FAST(LOAD16)                                                                              \
    if (ATTEND_FAST(D)) {                                                                                    \
        __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(qg), LOAD16(k)), a1 = _mm512_setzero_ps();                 \
        for (int64_t c = 1; c + 1 < D / 16; c += 2) {                                                        \
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c * 16), LOAD16(k + c * 16), a1);                      \
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c * 16 + 16), LOAD16(k + c * 16 + 16), a0);            \
        }                                                                                                    \
        if (D / 16 % 2 == 0) a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + D - 16), LOAD16(k + D - 16), a1);     \
        dot = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));                                                   \
    } else
/* the probabilities times the values, the output in registers (returns from attend_values) */
#define ATTEND_VALUES_FAST(SUFFIX, T, LOAD16)                                                                     \
    if (ATTEND_FAST(D)) {                                                                                    \
        const int64_t chunks = D / 16;                                                                       \
        __m512 acc[ATTEND_MAX_CHUNKS];                                                                       \
        for (int64_t c = 0; c < chunks; c++) acc[c] = _mm512_setzero_ps();                                   \
        for (int64_t t0 = 0; t0 < L; t0 += bs) {                                                             \
            const int64_t span = L - t0 < bs ? L - t0 : bs;                                                  \
            const T* vb = block_rows_##SUFFIX(v_cache, table, t0 / bs, L, bs, Hkv, kh, D);                  \
            const T* vnext = block_rows_##SUFFIX(v_cache, table, t0 / bs + 1, L, bs, Hkv, kh, D);           \
            for (int64_t o = 0; o < span; o++) {                                                             \
                const T* v = vb + o * row;                                                                   \
                if (vnext) prefetch_bytes(vnext + o * row, D * (int64_t)sizeof *v);                          \
                const __m512 p = _mm512_set1_ps(sg[t0 + o]);                                                 \
                for (int64_t c = 0; c < chunks; c++) acc[c] = _mm512_fmadd_ps(p, LOAD16(v + c * 16), acc[c]); \
            }                                                                                                \
        }                                                                                                    \
        for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(og + c * 16, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv))); \
        return;                                                                                              \
    }
DEFINE_ATTEND(f32, float, LOAD16_F32, TO_F32_F32)
DEFINE_ATTEND(f16, _Float16, LOAD16_F16, TO_F32_F16)
#else
#define ATTEND_DOT_FAST(LOAD16)
#define ATTEND_VALUES_FAST(SUFFIX, T, LOAD16)
DEFINE_ATTEND(f32, float, , TO_F32_F32)
DEFINE_ATTEND(f16, _Float16, , TO_F32_F16)
#endif

/* The attention of T query tokens, shared by the threads of an enclosing parallel region (an
 * orphaned `omp for`): token t's Hkv * G query heads at q + t * q_stride, its block table at
 * tables + t * table_stride, its first lens[t] + len_add positions of a float32 or (kv_f16)
 * float16 cache; out [T, Hkv * G, D]. scores: this thread's G * (longest length) floats, or NULL
 * (it could not get them: it skips its share, and the caller reports the failure). One task per
 * token and KV head, or per token from ATTEND_ROWS_MIN tokens. */
static inline void attend_one(const float* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                              int kv_f16, const int64_t* tables, int64_t table_stride, const int64_t* lens,
                              int64_t len_add, int64_t t, int64_t kh, int64_t Hkv, int64_t G, int64_t D,
                              int64_t bs, float scale, float* scores, float* out) {
    if (!scores) return;
    const float* qt = q + t * q_stride + kh * G * D;
    float* ot = out + (t * Hkv + kh) * G * D;
    if (kv_f16)
        attend_f16(qt, k_cache, v_cache, tables + t * table_stride, lens[t] + len_add, bs, Hkv, kh, G, D, scale,
                   scores, ot);
    else
        attend_f32(qt, k_cache, v_cache, tables + t * table_stride, lens[t] + len_add, bs, Hkv, kh, G, D, scale,
                   scores, ot);
}

static inline void attend_tokens_shared(const float* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                                        int kv_f16, const int64_t* tables, int64_t table_stride,
                                        const int64_t* lens, int64_t len_add, int64_t T, int64_t Hkv, int64_t G,
                                        int64_t D, int64_t bs, float scale, float* scores, float* out) {
#define ATTEND_ONE(t, kh) attend_one(q, q_stride, k_cache, v_cache, kv_f16, tables, table_stride, lens, len_add, \
                                     t, kh, Hkv, G, D, bs, scale, scores, out)
    if (T >= ATTEND_ROWS_MIN) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < T; t++)
            for (int64_t kh = 0; kh < Hkv; kh++) ATTEND_ONE(t, kh);
    } else {
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t t = 0; t < T; t++)
            for (int64_t kh = 0; kh < Hkv; kh++) ATTEND_ONE(t, kh);
    }
#undef ATTEND_ONE
}

#endif
