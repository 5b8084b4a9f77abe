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

/* Attention over a block table in a cache [blocks, bs, Hkv, D] of float32 (attend_run_f32) or
 * float16 (attend_run_f16: half the bytes, widened in registers), at KV head kh, float32
 * throughout: softmax(q k * scale) v, in two passes over the stored scores (exact, max subtracted).
 *
 * A run is n tokens of one sequence, consecutive positions under one block table: token j attends
 * to the table's first L0 + j positions. A decode row is a run of 1; a speculative draft (the row's
 * token and its k drafted ones) or a piece of a prompt chunk is a longer one. Each key and value
 * row is read once for all n * G query heads of the run (G: the query heads of a KV head): rows
 * come from scattered blocks, and fetching them, not the arithmetic, is the cost.
 * AVX-512 widens a value row once for all of them; elsewhere plain loops. */
#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX512F__)
#define ATTEND_MAX_CHUNKS 16
#define ATTEND_FAST(D) ((D) % 16 == 0 && (D) <= 16 * ATTEND_MAX_CHUNKS)
#define LOAD16_F32(p) _mm512_loadu_ps(p)
#define LOAD16_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p)))
#else
#define ATTEND_FAST(D) 0
#endif

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

/* Tokens per run at most: a draft or a prompt chunk is cut into runs of this many, so its pieces
 * spread over the threads (a draft of 5 in one run left one of two threads idle for a third of the
 * attention: 5-token steps after 1,500 positions 43 -> 45 ms; in runs of 3, 44 -> 41 ms). Each
 * run's scores take ATTEND_RUN_MAX * G * (its length + D) floats (attend_work). */
#define ATTEND_RUN_MAX 3

/* From this many runs, a task attends one run at all its KV heads (its blocks' lines, which hold
 * every head, are read while in cache: 1.2x at 32 rows); below, a task per run and KV head keeps
 * the threads busy. */
#define ATTEND_ROWS_MIN 8

/* The floats of one thread's attention work buffer for runs of up to max_len positions. */
static inline int64_t attend_work(int64_t G, int64_t D, int64_t max_len) {
    return ATTEND_RUN_MAX * G * (max_len + D) + 16 * D;
}

/* A run's causal rule: query r belongs to token r / G, which sees the first L0 + r / G positions.
 * The first query that sees position i, and how many of the m positions from i0 query r sees. */
static inline int64_t first_query_seeing(int64_t i, int64_t L0, int64_t G) {
    return (i < L0 ? 0 : i - L0 + 1) * G;
}

static inline int64_t positions_seen(int64_t r, int64_t G, int64_t L0, int64_t i0, int64_t m) {
    const int64_t seen = L0 + r / G - i0;
    return seen < m ? seen : m;
}

/* Scores [nq][L] (query r of a run's token r / G sees its first L0 + r / G) become probabilities
 * in place, max mx[r] subtracted; inv[r] = 1 / their sum. */
static inline void attend_softmax(float* scores, int64_t L, int64_t L0, int64_t G, int64_t nq, const float* mx,
                                  float* inv) {
    for (int64_t r = 0; r < nq; r++) {
        float* sg = scores + r * L;
        const int64_t len = L0 + r / G;
        const float top = mx[r];
        float total = 0.f;
#pragma omp simd reduction(+:total)
        for (int64_t i = 0; i < len; i++) { sg[i] = exp_nonpositive(sg[i] - top); total += sg[i]; }
        inv[r] = 1.f / total;
    }
}

/* A cache row as float32: a float32 row as it is; a float16 one widened into buf (F16C where the
 * CPU has it: gcc leaves a plain _Float16 loop scalar, which made the plain attention ~6x slower
 * than over a float32 cache). */
static inline const float* widen_row_f32(const float* row, float* buf, int64_t D) {
    (void)buf; (void)D;
    return row;
}

static inline const float* widen_row_f16(const _Float16* row, float* buf, int64_t D) {
    int64_t d = 0;
#if defined(__F16C__)
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(buf + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(row + d))));
#endif
    for (; d < D; d++) buf[d] = (float)row[d];
    return buf;
}

/* KV head kh's row at the first position of the table's block b, or NULL past L positions. */
#define DEFINE_BLOCK_ROWS(SUFFIX, T)                                                                         \
static inline const T* block_rows_##SUFFIX(const T* cache, const int64_t* table, int64_t b, int64_t L,        \
                                           int64_t bs, int64_t Hkv, int64_t kh, int64_t D) {                  \
    return b * bs < L ? cache + (table[b] * bs * Hkv + kh) * D : NULL;                                       \
}
DEFINE_BLOCK_ROWS(f32, float)
DEFINE_BLOCK_ROWS(f16, _Float16)

#define DEFINE_ATTEND(SUFFIX, T)                                                                     \
/* q: token j's G heads of KV head kh at q + j * q_stride; out likewise at out + j * out_stride.           \
 * work: attend_work floats: scores [n * G][L], then the outputs' sums [n * G][D]. */                      \
static inline void attend_run_##SUFFIX(const float* q, int64_t q_stride, const T* k_cache, const T* v_cache, \
                                       const int64_t* table, int64_t L0, int64_t n, int64_t bs, int64_t Hkv,  \
                                       int64_t kh, int64_t G, int64_t D, float scale, float* work, float* out,\
                                       int64_t out_stride) {                                                 \
    ATTEND_RUN_FAST(SUFFIX)                                                                                  \
    const int64_t row = Hkv * D, L = L0 + n - 1, nq = n * G;                                                 \
    float* scores = work;                                                                                    \
    float* sums = work + nq * L;                                                                             \
    float mx[nq], inv[nq], rowbuf[D];                                                                        \
    for (int64_t r = 0; r < nq; r++) mx[r] = -INFINITY;                                                      \
    /* keys block by block; position i is seen by the run's tokens j >= i - L0 + 1 */                      \
    for (int64_t t0 = 0; t0 < L; t0 += bs) {                                                                 \
        const int64_t span = L - t0 < bs ? L - t0 : bs;                                                      \
        const T* kb = block_rows_##SUFFIX(k_cache, table, t0 / bs, L, bs, Hkv, kh, D);                      \
        const T* knext = block_rows_##SUFFIX(k_cache, table, t0 / bs + 1, L, bs, Hkv, kh, D);               \
        for (int64_t o = 0; o < span; o++) {                                                                 \
            const int64_t i = t0 + o;                                                                        \
            if (knext) prefetch_bytes(knext + o * row, D * (int64_t)sizeof(T));                              \
            const float* k = widen_row_##SUFFIX(kb + o * row, rowbuf, D);                                    \
            for (int64_t r = first_query_seeing(i, L0, G); r < nq; r++) {                                  \
                const float* qg = q + r / G * q_stride + r % G * D;                                          \
                float dot = 0.f;                                                                             \
                _Pragma("omp simd reduction(+:dot)")                                                         \
                for (int64_t d = 0; d < D; d++) dot += qg[d] * k[d];                                         \
                dot *= scale;                                                                                \
                scores[r * L + i] = dot;                                                                     \
                mx[r] = dot > mx[r] ? dot : mx[r];                                                           \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    attend_softmax(scores, L, L0, G, nq, mx, inv);                                                           \
    /* values: the probabilities times each row, summed in position order for every head */                \
    memset(sums, 0, sizeof(float) * (size_t)(nq * D));                                                       \
    for (int64_t t0 = 0; t0 < L; t0 += bs) {                                                                 \
        const int64_t span = L - t0 < bs ? L - t0 : bs;                                                      \
        const T* vb = block_rows_##SUFFIX(v_cache, table, t0 / bs, L, bs, Hkv, kh, D);                      \
        const T* vnext = block_rows_##SUFFIX(v_cache, table, t0 / bs + 1, L, bs, Hkv, kh, D);               \
        for (int64_t o = 0; o < span; o++) {                                                                 \
            const int64_t i = t0 + o;                                                                        \
            if (vnext) prefetch_bytes(vnext + o * row, D * (int64_t)sizeof(T));                              \
            const float* v = widen_row_##SUFFIX(vb + o * row, rowbuf, D);                                    \
            for (int64_t r = first_query_seeing(i, L0, G); r < nq; r++) {                                  \
                const float p = scores[r * L + i];                                                           \
                float* s = sums + r * D;                                                                     \
                _Pragma("omp simd")                                                                          \
                for (int64_t d = 0; d < D; d++) s[d] += p * v[d];                                            \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    for (int64_t r = 0; r < nq; r++) {                                                                       \
        float* og = out + r / G * out_stride + r % G * D;                                                    \
        for (int64_t d = 0; d < D; d++) og[d] = sums[r * D + d] * inv[r];                                    \
    }                                                                                                        \
}

#if defined(__AVX512F__)
/* Row o of 16 goes into slot ATTEND_SLOT[o] so that sum16 returns the rows' sums in order. */
static const int ATTEND_SLOT[16] = {0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15};

/* The sums of 16 vectors' lanes as one vector, by a transpose-and-add tree: 15 additions and 30
 * shuffles instead of 16 horizontal sums. (Decode attention is bound by fetching rows, not by this
 * arithmetic: the tree is about even with a sum per score; it lets a run's scores be stored and
 * compared 16 at a time.) */
static inline __m512 sum16(const __m512* p) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(p[i], p[i + 8], 0x44), _mm512_shuffle_f32x4(p[i], p[i + 8], 0xEE));
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], 0x88), _mm512_shuffle_f32x4(a[i], a[i + 4], 0xDD));
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[i], b[i + 2], 0x44), _mm512_shuffle_ps(b[i], b[i + 2], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_ps(c[0], c[1], 0x88), _mm512_shuffle_ps(c[0], c[1], 0xDD));
}

/* attend_run for D a multiple of 16: 16 positions at a time, their rows widened to float32 once
 * (rows: a [16][D] staging area) for all the run's heads; scores as 16-lane vectors, values
 * summed per head in registers. */
#define DEFINE_ATTEND_FAST(SUFFIX, T, LOAD16)                                                                \
/* rows [16][D] = m cache rows from src (stride `row`) widened to float32, the rest zeros; the rows  \
 * at the same offsets of the next block (next, or NULL) fetched meanwhile. */                            \
static inline void stage_rows_##SUFFIX(float* rows, const T* src, const T* next, int64_t row, int64_t m,     \
                                       int64_t D) {                                                          \
    for (int64_t o = 0; o < 16; o++)                                                                         \
        for (int64_t c = 0; c < D / 16; c++)                                                                 \
            _mm512_storeu_ps(rows + o * D + c * 16, o < m ? LOAD16(src + o * row + c * 16) : _mm512_setzero_ps()); \
    if (next)                                                                                                \
        for (int64_t o = 0; o < m; o++) prefetch_bytes(next + o * row, D * (int64_t)sizeof(T));              \
}                                                                                                            \
                                                                                                             \
static inline void attend_run_fast_##SUFFIX(const float* q, int64_t q_stride, const T* k_cache,              \
                                            const T* v_cache, const int64_t* table, int64_t L0, int64_t n,    \
                                            int64_t bs, int64_t Hkv, int64_t kh, int64_t G, int64_t D,        \
                                            float scale, float* work, float* out, int64_t out_stride) {       \
    const int64_t row = Hkv * D, L = L0 + n - 1, nq = n * G, chunks = D / 16;                                \
    float* scores = work;                                                                                    \
    float* sums = work + nq * L;                                                                             \
    float* rows = sums + nq * D;                                                                             \
    float mx[nq];                                                                                            \
    for (int64_t r = 0; r < nq; r++) mx[r] = -INFINITY;                                                      \
    for (int64_t t0 = 0; t0 < L; t0 += bs) {                                                                 \
        const int64_t span = L - t0 < bs ? L - t0 : bs;                                                      \
        const T* kb = block_rows_##SUFFIX(k_cache, table, t0 / bs, L, bs, Hkv, kh, D);                      \
        const T* knext = block_rows_##SUFFIX(k_cache, table, t0 / bs + 1, L, bs, Hkv, kh, D);               \
        for (int64_t o0 = 0; o0 < span; o0 += 16) {                                                          \
            const int64_t m = span - o0 < 16 ? span - o0 : 16, i0 = t0 + o0;                                 \
            stage_rows_##SUFFIX(rows, kb + o0 * row, knext ? knext + o0 * row : NULL, row, m, D);            \
            for (int64_t r = first_query_seeing(i0, L0, G); r < nq; r++) {                                 \
                const float* qg = q + r / G * q_stride + r % G * D;                                          \
                const int64_t valid = positions_seen(r, G, L0, i0, m);                                       \
                __m512 part[16];                                                                             \
                for (int o = 0; o < 16; o++) part[o] = _mm512_setzero_ps();                                  \
                for (int64_t c = 0; c < chunks; c++) {                                                       \
                    const __m512 qc = _mm512_loadu_ps(qg + c * 16);                                          \
                    for (int o = 0; o < 16; o++)                                                             \
                        part[ATTEND_SLOT[o]] = _mm512_fmadd_ps(qc, _mm512_loadu_ps(rows + o * D + c * 16),    \
                                                               part[ATTEND_SLOT[o]]);                        \
                }                                                                                            \
                const __m512 sc = _mm512_mul_ps(sum16(part), _mm512_set1_ps(scale));                         \
                const __mmask16 lanes = (__mmask16)((1u << valid) - 1);                                      \
                _mm512_mask_storeu_ps(scores + r * L + i0, lanes, sc);                                       \
                const float top = _mm512_mask_reduce_max_ps(lanes, sc);                                      \
                mx[r] = top > mx[r] ? top : mx[r];                                                           \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    float inv[nq];                                                                                           \
    attend_softmax(scores, L, L0, G, nq, mx, inv);                                                           \
    memset(sums, 0, sizeof(float) * (size_t)(nq * D));                                                       \
    for (int64_t t0 = 0; t0 < L; t0 += bs) {                                                                 \
        const int64_t span = L - t0 < bs ? L - t0 : bs;                                                      \
        const T* vb = block_rows_##SUFFIX(v_cache, table, t0 / bs, L, bs, Hkv, kh, D);                      \
        const T* vnext = block_rows_##SUFFIX(v_cache, table, t0 / bs + 1, L, bs, Hkv, kh, D);               \
        for (int64_t o0 = 0; o0 < span; o0 += 16) {                                                          \
            const int64_t m = span - o0 < 16 ? span - o0 : 16, i0 = t0 + o0;                                 \
            stage_rows_##SUFFIX(rows, vb + o0 * row, vnext ? vnext + o0 * row : NULL, row, m, D);            \
            for (int64_t r = first_query_seeing(i0, L0, G); r < nq; r++) {                                 \
                const float* p = scores + r * L + i0;                                                        \
                const int64_t valid = positions_seen(r, G, L0, i0, m);                                       \
                for (int64_t c = 0; c < chunks; c++) {                                                       \
                    __m512 acc = _mm512_loadu_ps(sums + r * D + c * 16);                                     \
                    for (int64_t o = 0; o < valid; o++)                                                      \
                        acc = _mm512_fmadd_ps(_mm512_set1_ps(p[o]), _mm512_loadu_ps(rows + o * D + c * 16), acc); \
                    _mm512_storeu_ps(sums + r * D + c * 16, acc);                                            \
                }                                                                                            \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    for (int64_t r = 0; r < nq; r++) {                                                                       \
        float* og = out + r / G * out_stride + r % G * D;                                                    \
        for (int64_t c = 0; c < chunks; c++)                                                                 \
            _mm512_storeu_ps(og + c * 16, _mm512_mul_ps(_mm512_loadu_ps(sums + r * D + c * 16),              \
                                                        _mm512_set1_ps(inv[r])));                           \
    }                                                                                                        \
}
DEFINE_ATTEND_FAST(f32, float, LOAD16_F32)
DEFINE_ATTEND_FAST(f16, _Float16, LOAD16_F16)
#define ATTEND_RUN_FAST(SUFFIX)                                                                              \
    if (ATTEND_FAST(D)) {                                                                                    \
        attend_run_fast_##SUFFIX(q, q_stride, k_cache, v_cache, table, L0, n, bs, Hkv, kh, G, D, scale, work, \
                                 out, out_stride);                                                           \
        return;                                                                                              \
    }
#else
#define ATTEND_RUN_FAST(SUFFIX)
#endif
DEFINE_ATTEND(f32, float)
DEFINE_ATTEND(f16, _Float16)

/* Where runs of up to ATTEND_RUN_MAX tokens start (runs[0..count], runs[count] = T): token t + 1
 * continues token t's run when it is the next position under the same block table. tables,
 * table_stride, lens, len_add: as attend_tokens_shared's. runs: T + 1 int64s. */
static inline int64_t attend_runs(const int64_t* tables, int64_t table_stride, const int64_t* lens, int64_t len_add,
                                  int64_t T, int64_t bs, int64_t* runs) {
    int64_t count = 0;
    for (int64_t t = 0; t < T; t++) {
        const int same = t > 0 && t - runs[count - 1] < ATTEND_RUN_MAX && lens[t] == lens[t - 1] + 1 &&
                         memcmp(tables + t * table_stride, tables + (t - 1) * table_stride,
                                sizeof(int64_t) * (size_t)((lens[t] + len_add + bs - 1) / bs)) == 0;
        if (!same) runs[count++] = t;
    }
    runs[count] = T;
    return count;
}

/* The attention of T query tokens in `count` runs (attend_runs; NULL: every token its own run),
 * shared by the threads of an enclosing parallel region (an orphaned `omp for`): token t's
 * Hkv * G query heads at q + t * q_stride, its block table at tables + t * table_stride, its first
 * lens[t] + len_add positions of a float32 or (kv_f16) float16 cache; out [T, Hkv * G, D]. work:
 * this thread's attend_work floats for the longest length, or NULL (it could not get them: it
 * skips its share, and the caller reports the failure). One task per run and KV head, or per run
 * from ATTEND_ROWS_MIN runs. */
static inline void attend_run(const float* q, int64_t q_stride, const void* k_cache, const void* v_cache, int kv_f16,
                              const int64_t* tables, int64_t table_stride, const int64_t* lens, int64_t len_add,
                              int64_t t, int64_t n, int64_t kh, int64_t Hkv, int64_t G, int64_t D, int64_t bs,
                              float scale, float* work, float* out) {
    if (!work) return;
    const float* qt = q + t * q_stride + kh * G * D;
    float* ot = out + (t * Hkv + kh) * G * D;
    if (kv_f16)
        attend_run_f16(qt, q_stride, k_cache, v_cache, tables + t * table_stride, lens[t] + len_add, n, bs, Hkv, kh,
                       G, D, scale, work, ot, Hkv * G * D);
    else
        attend_run_f32(qt, q_stride, k_cache, v_cache, tables + t * table_stride, lens[t] + len_add, n, bs, Hkv, kh,
                       G, D, scale, work, ot, Hkv * G * D);
}

static inline void attend_tokens_shared(const float* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                                        int kv_f16, const int64_t* tables, int64_t table_stride,
                                        const int64_t* lens, int64_t len_add, int64_t T, const int64_t* runs,
                                        int64_t count, int64_t Hkv, int64_t G, int64_t D, int64_t bs, float scale,
                                        float* work, float* out) {
    if (!runs) count = T;
#define RUN_START(u) (runs ? runs[u] : (u))
#define ATTEND_RUN(u, kh) attend_run(q, q_stride, k_cache, v_cache, kv_f16, tables, table_stride, lens, len_add, \
                                     RUN_START(u), RUN_START((u) + 1) - RUN_START(u), kh, Hkv, G, D, bs, scale, \
                                     work, out)
    if (count >= ATTEND_ROWS_MIN) {
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < count; u++)
            for (int64_t kh = 0; kh < Hkv; kh++) ATTEND_RUN(u, kh);
    } else {
#pragma omp for collapse(2) schedule(dynamic, 1)
        for (int64_t u = 0; u < count; u++)
            for (int64_t kh = 0; kh < Hkv; kh++) ATTEND_RUN(u, kh);
    }
#undef ATTEND_RUN
#undef RUN_START
}

#endif
