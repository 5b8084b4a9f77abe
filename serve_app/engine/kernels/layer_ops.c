/* The small float32 operations between a Llama layer's matrix products, fused.
 *
 * Why: at a few rows a decode step is ~30 layers x ~20 torch ops on vectors of a few hundred
 * floats; each op's dispatch and allocation cost more than its arithmetic (rms_norm alone was
 * 64 us per call, 4 ms of a 35 ms one-row step). Each function here replaces several ops and
 * writes into buffers the caller owns. The *_shared forms are the work of an enclosing parallel
 * region (llama_forward.c); the others open one only when there are many rows (a prefill chunk):
 * a decode step's few rows are not worth a fork. Layouts are contiguous, row-major. */
#include <math.h>
#include <stdint.h>

#include "common.h"

#define PARALLEL_MIN_ELEMENTS 65536

/* x[M, K] += delta (when not NULL); out = x * rsqrt(mean(x^2) + eps) * weight, row by row
 * (transformers' LlamaRMSNorm in float32). */
void add_rms_norm_shared(float* x, const float* delta, const float* weight, float* out, int64_t M, int64_t K,
                         float eps) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        float* xm = x + m * K;
        if (delta) {
            const float* dm = delta + m * K;
#pragma omp simd
            for (int64_t k = 0; k < K; k++) xm[k] += dm[k];
        }
        float ss = 0.f;
#pragma omp simd reduction(+:ss)
        for (int64_t k = 0; k < K; k++) ss += xm[k] * xm[k];
        const float r = 1.f / sqrtf(ss / (float)K + eps);
        float* om = out + m * K;
#pragma omp simd
        for (int64_t k = 0; k < K; k++) om[k] = weight[k] * (xm[k] * r);
    }
}

void add_rms_norm(float* x, const float* delta, const float* weight, float* out, int64_t M, int64_t K, float eps) {
#pragma omp parallel if (M * K >= PARALLEL_MIN_ELEMENTS)
    add_rms_norm_shared(x, delta, weight, out, M, K, eps);
}

/* gate_up[M, 2I] (gate, then up) -> out[M, I] = silu(gate) * up. */
void silu_mul_shared(const float* gate_up, float* out, int64_t M, int64_t I) {
#pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const float* g = gate_up + m * 2 * I;
        const float* u = g + I;
        float* o = out + m * I;
#pragma omp simd
        for (int64_t i = 0; i < I; i++) o[i] = silu_times(g[i], u[i]);
    }
}

void silu_mul(const float* gate_up, float* out, int64_t M, int64_t I) {
#pragma omp parallel if (M * I >= PARALLEL_MIN_ELEMENTS)
    silu_mul_shared(gate_up, out, M, I);
}

/* Rotary embedding in place on the first H heads of each row of x[T, row_heads, D] (the query
 * and key heads of a fused qkv), at positions[T], with cos/sin tables [positions, D]. */
void rope(float* x, const int64_t* positions, const float* cos_table, const float* sin_table, int64_t T,
          int64_t row_heads, int64_t H, int64_t D) {
#pragma omp parallel for schedule(static) if (T * H * D >= PARALLEL_MIN_ELEMENTS)
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++)
            rotate_head(x + (t * row_heads + h) * D, cos_table + positions[t] * D, sin_table + positions[t] * D, D);
}
