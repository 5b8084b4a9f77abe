/* Shared by the kernels (static inline: each file gets its own vectorized copy). */
#ifndef SERVE_APP_KERNELS_COMMON_H
#define SERVE_APP_KERNELS_COMMON_H
#include <math.h>
#include <stdint.h>
#include <string.h>

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

#endif
