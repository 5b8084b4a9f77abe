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
 * in a float32 cache [blocks, bs, Hkv, D], at KV head kh: out [G, D] = softmax(q k * scale) v.
 * scores holds G * L floats. Softmax in two passes over the stored scores (exact, max subtracted).
 * AVX-512 keeps q's products and the output in registers (D up to 256); elsewhere plain loops. */
#if defined(__AVX512F__)
#include <immintrin.h>
#define ATTEND_MAX_CHUNKS 16
#define ATTEND_FAST(D) ((D) % 16 == 0 && (D) <= 16 * ATTEND_MAX_CHUNKS)
#else
#define ATTEND_FAST(D) 0
#endif

/* Rows of a block table are scattered in memory (a block of bs positions here, the next anywhere),
 * so the hardware prefetcher cannot follow them: the loops below fetch rows this far ahead. */
#define PREFETCH_ROWS 16
static inline void prefetch_row(const float* row, int64_t D) {
#if defined(__AVX512F__)
    for (int64_t c = 0; c < D; c += 16) _mm_prefetch((const char*)(row + c), _MM_HINT_T0);
#else
    (void)row; (void)D;
#endif
}

/* From this many rows, a task attends one row at all its KV heads (its blocks' lines, which hold
 * every head, are read while in cache: 1.2x at 32 rows); below, a task per row and KV head keeps
 * the threads busy. */
#define ATTEND_ROWS_MIN 8

/* The key (or value) row of position p of a block table, at KV head kh. */
static inline const float* cache_row(const float* cache, const int64_t* table, int64_t p, int64_t bs, int64_t Hkv,
                                     int64_t kh, int64_t D) {
    return cache + ((table[p / bs] * bs + p % bs) * Hkv + kh) * D;
}

/* out [D] = softmax(scores [L], whose max is mx) @ values; the scores become probabilities. */
static inline void attend_values(float* sg, float mx, const float* v_cache, const int64_t* table, int64_t L,
                                 int64_t bs, int64_t Hkv, int64_t kh, int64_t D, float* og) {
    const int64_t row = Hkv * D;
    float total = 0.f;
#pragma omp simd reduction(+:total)
    for (int64_t i = 0; i < L; i++) { sg[i] = exp_nonpositive(sg[i] - mx); total += sg[i]; }
    const float inv = 1.f / total;
#if defined(__AVX512F__)
    if (ATTEND_FAST(D)) {
        const int64_t chunks = D / 16;
        __m512 acc[ATTEND_MAX_CHUNKS];
        for (int64_t c = 0; c < chunks; c++) acc[c] = _mm512_setzero_ps();
        for (int64_t t0 = 0; t0 < L; t0 += bs) {
            const int64_t span = L - t0 < bs ? L - t0 : bs;
            const float* vb = v_cache + (table[t0 / bs] * bs * Hkv + kh) * D;
            const float* vnext = t0 + bs < L ? v_cache + (table[t0 / bs + 1] * bs * Hkv + kh) * D : NULL;
            for (int64_t o = 0; o < span; o++) {
                const float* v = vb + o * row;
                if (vnext) prefetch_row(vnext + o * row, D);
                const __m512 p = _mm512_set1_ps(sg[t0 + o]);
                for (int64_t c = 0; c < chunks; c++) acc[c] = _mm512_fmadd_ps(p, _mm512_loadu_ps(v + c * 16), acc[c]);
            }
        }
        for (int64_t c = 0; c < chunks; c++) _mm512_storeu_ps(og + c * 16, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
        return;
    }
#endif
    memset(og, 0, sizeof(float) * (size_t)D);
    for (int64_t t0 = 0; t0 < L; t0 += bs) {
        const int64_t span = L - t0 < bs ? L - t0 : bs;
        const float* vb = v_cache + (table[t0 / bs] * bs * Hkv + kh) * D;
        for (int64_t o = 0; o < span; o++) {
            const float* v = vb + o * row;
            const float p = sg[t0 + o];
#pragma omp simd
            for (int64_t d = 0; d < D; d++) og[d] += p * v[d];
        }
    }
    for (int64_t d = 0; d < D; d++) og[d] *= inv;
}

static inline void attend_f32(const float* q, const float* k_cache, const float* v_cache, const int64_t* table,
                              int64_t L, int64_t bs, int64_t Hkv, int64_t kh, int64_t G, int64_t D, float scale,
                              float* scores, float* out) {
    for (int64_t g = 0; g < G; g++) {
        const float* qg = q + g * D;
        float* sg = scores + g * L;
        float mx = -INFINITY;
        for (int64_t p = 0; p < L; p++) {
            const float* k = cache_row(k_cache, table, p, bs, Hkv, kh, D);
            float dot = 0.f;
#if defined(__AVX512F__)
            if (ATTEND_FAST(D)) {
                if (g == 0 && p + PREFETCH_ROWS < L) prefetch_row(cache_row(k_cache, table, p + PREFETCH_ROWS, bs, Hkv, kh, D), D);
                __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(qg), _mm512_loadu_ps(k)), a1 = _mm512_setzero_ps();
                for (int64_t c = 1; c + 1 < D / 16; c += 2) {
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c * 16), _mm512_loadu_ps(k + c * 16), a1);
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c * 16 + 16), _mm512_loadu_ps(k + c * 16 + 16), a0);
                }
                if (D / 16 % 2 == 0) a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + D - 16), _mm512_loadu_ps(k + D - 16), a1);
                dot = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
            } else
#endif
            {
#pragma omp simd reduction(+:dot)
                for (int64_t d = 0; d < D; d++) dot += qg[d] * k[d];
            }
            dot *= scale;
            sg[p] = dot;
            mx = dot > mx ? dot : mx;
        }
        attend_values(sg, mx, v_cache, table, L, bs, Hkv, kh, D, out + g * D);
    }
}


#endif
