/* out[M, N] = x[M, K] @ W[N, K]^T (+ bias), W stored in bfloat16, everything else float32.
 *
 * Why: a decode step reads every weight once, so at a few rows it is bound by those bytes
 * (SmolLM2-135M in float32: 540 MB per step). On a CPU without bfloat16 arithmetic, torch's
 * bf16 products are emulated and slower than float32; here the weights stay bfloat16 in memory
 * (half the bytes) and are widened to float32 in registers, so the products, sums and
 * activations are float32 (more exact than a bf16 x bf16 product, and exact for the weights of
 * a bfloat16 checkpoint).
 *
 * Layout: W is packed once (pack_bf16w) into blocks of NB output columns, [ceil(N/NB)][K][NB],
 * zero-padded. The inner loop is an outer product, out[m, n:n+NB] += x[m, k] * W[k, n:n+NB]:
 * contiguous loads and no horizontal sums. Column blocks are spread over torch's OpenMP threads
 * (this library resolves libgomp to the one torch loaded); rows go MR at a time, so a block is
 * read from memory once and from cache for the rest of the rows. AVX-512 has a hand-written
 * tile (gcc's vectorization of the plain one spilled its accumulators); other CPUs get the
 * plain C tile, which gcc vectorizes for AVX2 or NEON. */
#include <stdint.h>
#include <string.h>

#include "common.h"

#define NB 32  /* output columns per block: two AVX-512 vectors */
#if defined(__AVX512F__)
#define MR 12  /* rows per tile: 24 accumulators + 2 weight vectors + 1 broadcast fit 32 registers */
#else
/* the plain tile: 3 rows x 32 columns of accumulators + the widened weights fill AVX2's 16 (or NEON's
 * 32) registers; 12 rows spilled them (-march=haswell here: 254-token prompt steps 868 -> 664 ms) */
#define MR 3
#endif
#define PREFETCH 64  /* rows of a block ahead (4 KB): 1.2-1.3x at one row on a 2-core VM */


int64_t packed_bf16w_elements(int64_t N, int64_t K) { return (N + NB - 1) / NB * NB * K; }

/* w [N, K] (float32 when src_is_f32, else bfloat16) -> packed [ceil(N/NB)][K][NB]. */
void pack_bf16w(const void* w, int src_is_f32, uint16_t* packed, int64_t N, int64_t K) {
    const int64_t blocks = (N + NB - 1) / NB;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t j = 0; j < NB; j++) {
                const int64_t n = b * NB + j;
                uint16_t v = 0;
                if (n < N)
                    v = src_is_f32 ? f32_to_bf16(((const float*)w)[n * K + k]) : ((const uint16_t*)w)[n * K + k];
                packed[(b * K + k) * NB + j] = v;
            }
}

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 widen16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

static inline __attribute__((always_inline)) void tile(const float* x, int64_t K, const uint16_t* wb,
                                                       const float* bias, float* out, int64_t N,
                                                       int64_t n0, int mr) {
    __m512 a0[MR], a1[MR];
    for (int m = 0; m < mr; m++) { a0[m] = _mm512_setzero_ps(); a1[m] = _mm512_setzero_ps(); }
    for (int64_t k = 0; k < K; k++) {
        _mm_prefetch((const char*)(wb + (k + PREFETCH) * NB), _MM_HINT_T0);  /* runs into the next block: ours too */
        const __m512 w0 = widen16(wb + k * NB), w1 = widen16(wb + k * NB + 16);
        for (int m = 0; m < mr; m++) {
            const __m512 xv = _mm512_set1_ps(x[m * K + k]);
            a0[m] = _mm512_fmadd_ps(xv, w0, a0[m]);
            a1[m] = _mm512_fmadd_ps(xv, w1, a1[m]);
        }
    }
    const int64_t cols = N - n0 < NB ? N - n0 : NB;
    const __mmask16 k0 = cols >= 16 ? 0xffff : (__mmask16)((1u << cols) - 1);
    const __mmask16 k1 = cols >= 32 ? 0xffff : cols <= 16 ? 0 : (__mmask16)((1u << (cols - 16)) - 1);
    const __m512 b0 = bias ? _mm512_maskz_loadu_ps(k0, bias + n0) : _mm512_setzero_ps();
    const __m512 b1 = bias ? _mm512_maskz_loadu_ps(k1, bias + n0 + 16) : _mm512_setzero_ps();
    for (int m = 0; m < mr; m++) {
        _mm512_mask_storeu_ps(out + m * N + n0, k0, _mm512_add_ps(a0[m], b0));
        _mm512_mask_storeu_ps(out + m * N + n0 + 16, k1, _mm512_add_ps(a1[m], b1));
    }
}
#else
static inline __attribute__((always_inline)) void tile(const float* x, int64_t K, const uint16_t* wb,
                                                       const float* bias, float* out, int64_t N,
                                                       int64_t n0, int mr) {
    float acc[MR][NB];
    for (int m = 0; m < mr; m++)
        for (int j = 0; j < NB; j++) acc[m][j] = 0.f;
    for (int64_t k = 0; k < K; k++) {
        float w[NB];
        for (int j = 0; j < NB; j++) w[j] = bf16_to_f32(wb[k * NB + j]);
        for (int m = 0; m < mr; m++) {
            const float xv = x[m * K + k];
            for (int j = 0; j < NB; j++) acc[m][j] += xv * w[j];
        }
    }
    const int64_t cols = N - n0 < NB ? N - n0 : NB;
    for (int m = 0; m < mr; m++)
        for (int64_t j = 0; j < cols; j++) out[m * N + n0 + j] = acc[m][j] + (bias ? bias[n0 + j] : 0.f);
}
#endif

/* out[:, n0:n0+NB] for every row of x (MR rows per tile), from the packed block wb. */
static inline void product_block(const float* x, int64_t K, const uint16_t* wb, const float* bias, float* out,
                                 int64_t M, int64_t N, int64_t n0) {
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
        const float* xm = x + m0 * K;
        float* om = out + m0 * N;
        /* one specialization per tile height, so the accumulators stay in registers */
        switch (M - m0 < MR ? M - m0 : MR) {
#define ROWS(R) case R: tile(xm, K, wb, bias, om, N, n0, R); break;
            ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8) ROWS(9) ROWS(10) ROWS(11)
            default: tile(xm, K, wb, bias, om, N, n0, MR); break;
#undef ROWS
        }
    }
}

/* The work of one product, shared by the threads of an enclosing parallel region (an orphaned
 * `omp for`: llama_forward.c calls it inside its own region; alone, one thread does it all).
 * x [M, K] and out [M, N] contiguous float32; bias [N] float32 or NULL. */
void linear_bf16w_shared(const float* x, const uint16_t* packed, const float* bias, float* out,
                         int64_t M, int64_t N, int64_t K) {
    const int64_t blocks = (N + NB - 1) / NB;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) product_block(x, K, packed + b * K * NB, bias, out, M, N, b * NB);
}

/* The gate/up product of a Llama MLP and its activation in one work-shared loop: packed holds
 * [gate; up] (2I rows), I a multiple of NB. A thread computes gate block b and up block b + I/NB
 * into gate_up [M, 2I], then act[:, b's columns] = silu(gate) * up from its own cache: no barrier
 * and no separate pass between the product and the activation. */
void linear_bf16w_gated_shared(const float* x, const uint16_t* packed, const float* bias, float* gate_up,
                               float* act, int64_t M, int64_t I, int64_t K) {
    const int64_t blocks = I / NB, N = 2 * I;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        for (int64_t block = b; block < 2 * blocks; block += blocks)  /* gate's block, then up's */
            product_block(x, K, packed + block * K * NB, bias, gate_up, M, N, block * NB);
        for (int64_t m = 0; m < M; m++) {
            const float* g = gate_up + m * N + b * NB;
            float* o = act + m * I + b * NB;
#pragma omp simd
            for (int j = 0; j < NB; j++) o[j] = silu_times(g[j], g[j + I]);
        }
    }
}

void linear_f32_bf16w(const float* x, const uint16_t* packed, const float* bias, float* out,
                      int64_t M, int64_t N, int64_t K) {
#pragma omp parallel
    linear_bf16w_shared(x, packed, bias, out, M, N, K);
}
