/* A whole Llama-family forward over a step's tokens in one call, for CPUs: every layer's norms,
 * products (bf16 weights, float32 arithmetic: linear_bf16w.c), rotary, KV-cache writes and paged
 * attention, inside one OpenMP parallel region with a barrier between phases.
 *
 * Why: at a few rows, a step of 30 layers x ~12 Python-level operations spent a third of its time
 * between them (Python, torch dispatch, one OpenMP fork/join per operation); a decode step is then
 * the weights' bytes and little else, as in llama.cpp's graph runner.
 *
 * Which steps: any tokens whose attention is small (decode rows, speculative drafts, short prompt
 * chunks; model_runner.pack_step decides): token t attends to the first positions[t] + 1 slots of
 * its own block table (a prompt chunk's tokens share one table with growing positions: causal),
 * after this layer's keys and values of every token are written. Long prompt chunks go through torch (SDPA).
 * KV cache float32 or float16 [blocks, bs, Hkv, D]; slots index its flattened [blocks * bs] positions.
 *
 * Buffers (float32, the caller's): x [T, H] the residual stream (the embeddings in, updated in
 * place), h_out [T, H] the final-normed hidden states out, scratch of llama_forward_scratch floats. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

/* the work-shared forms of linear_bf16w.c and layer_ops.c */
void linear_bf16w_shared(const float* x, const uint16_t* packed, const float* bias, float* out,
                         int64_t M, int64_t N, int64_t K);
void add_rms_norm_shared(float* x, const float* delta, const float* weight, float* out, int64_t M, int64_t K,
                         float eps);
void silu_mul_shared(const float* gate_up, float* out, int64_t M, int64_t I);
void linear_bf16w_gated_shared(const float* x, const uint16_t* packed, const float* bias, float* gate_up,
                               float* act, int64_t M, int64_t I, int64_t K);

typedef struct {
    const float* input_norm;
    const float* post_norm;
    const uint16_t* qkv;
    const float* qkv_bias;
    const uint16_t* o;
    const float* o_bias;
    const uint16_t* gate_up;
    const float* gate_up_bias;
    const uint16_t* down;
    const float* down_bias;
    void* k_cache;  /* float32, or _Float16 when LlamaShape.kv_f16 */
    void* v_cache;
} LlamaLayer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate, kv_f16;
    float eps, scale;
} LlamaShape;

int64_t llama_forward_scratch(const LlamaShape* s, int64_t T) {
    const int64_t qkv = (s->heads + 2 * s->kv_heads) * s->head_dim;
    return T * (s->hidden + qkv + s->heads * s->head_dim + s->hidden + 2 * s->intermediate + s->intermediate);
}

int llama_forward(const LlamaLayer* layers, const LlamaShape* shape, const float* final_norm, float* x,
                  float* h_out, float* scratch, const int64_t* positions, const int64_t* slots,
                  const int64_t* tables, int64_t table_stride, int64_t block_size, const float* cos_table,
                  const float* sin_table, int64_t T) {
    const int64_t H = shape->hidden, Hq = shape->heads, Hkv = shape->kv_heads, D = shape->head_dim;
    const int64_t I = shape->intermediate, G = Hq / Hkv, row_heads = Hq + 2 * Hkv;
    const float eps = shape->eps, scale = shape->scale;
    const int kv_f16 = shape->kv_f16 != 0;
    float* h = scratch;
    float* qkv = h + T * H;
    float* attn = qkv + T * row_heads * D;
    float* proj = attn + T * Hq * D;  /* o's and down's outputs: the next residual delta */
    float* gate_up = proj + T * H;
    float* act = gate_up + T * 2 * I;
    int64_t max_len = 0;
    for (int64_t t = 0; t < T; t++) max_len = positions[t] + 1 > max_len ? positions[t] + 1 : max_len;
    /* a draft's tokens, or a prompt chunk's, attend as runs that read each key and value row once */
    int64_t* runs = (int64_t*)malloc(sizeof(int64_t) * (size_t)(T + 1));
    if (!runs) return 1;
    const int64_t run_count = attend_runs(tables, table_stride, positions, 1, T, block_size, runs);
    int failed = 0;
#pragma omp parallel
    {
        float* work = (float*)malloc(sizeof(float) * (size_t)attend_work(G, D, max_len));  /* attention */
        if (!work) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            for (int64_t l = 0; l < shape->layers; l++) {
                const LlamaLayer* w = layers + l;
                add_rms_norm_shared(x, l ? proj : NULL, w->input_norm, h, T, H, eps);
                linear_bf16w_shared(h, w->qkv, w->qkv_bias, qkv, T, row_heads * D, H);
                /* rotary on q and k, then this layer's keys and values into the cache */
#pragma omp for schedule(static)
                for (int64_t t = 0; t < T; t++) {
                    const float* c = cos_table + positions[t] * D;
                    const float* s = sin_table + positions[t] * D;
                    float* row = qkv + t * row_heads * D;
                    for (int64_t hh = 0; hh < Hq + Hkv; hh++) rotate_head(row + hh * D, c, s, D);
                    if (kv_f16) {  /* rounded to nearest, as torch's .half() */
                        _Float16* k = (_Float16*)w->k_cache + slots[t] * Hkv * D;
                        _Float16* v = (_Float16*)w->v_cache + slots[t] * Hkv * D;
#pragma omp simd
                        for (int64_t i = 0; i < Hkv * D; i++) {
                            k[i] = (_Float16)row[Hq * D + i];
                            v[i] = (_Float16)row[(Hq + Hkv) * D + i];
                        }
                    } else {
                        memcpy((float*)w->k_cache + slots[t] * Hkv * D, row + Hq * D, sizeof(float) * (size_t)(Hkv * D));
                        memcpy((float*)w->v_cache + slots[t] * Hkv * D, row + (Hq + Hkv) * D,
                               sizeof(float) * (size_t)(Hkv * D));
                    }
                }
                /* attention: token t over its first positions[t] + 1 positions */
                attend_tokens_shared(qkv, row_heads * D, w->k_cache, w->v_cache, kv_f16, tables, table_stride,
                                     positions, 1, T, runs, run_count, Hkv, G, D, block_size, scale, work, attn);
                linear_bf16w_shared(attn, w->o, w->o_bias, proj, T, H, Hq * D);
                add_rms_norm_shared(x, proj, w->post_norm, h, T, H, eps);
                if (I % 32 == 0) {  /* linear_bf16w.c's block width */
                    linear_bf16w_gated_shared(h, w->gate_up, w->gate_up_bias, gate_up, act, T, I, H);
                } else {
                    linear_bf16w_shared(h, w->gate_up, w->gate_up_bias, gate_up, T, 2 * I, H);
                    silu_mul_shared(gate_up, act, T, I);
                }
                linear_bf16w_shared(act, w->down, w->down_bias, proj, T, H, I);
            }
            add_rms_norm_shared(x, shape->layers ? proj : NULL, final_norm, h_out, T, H, eps);
        }
        free(work);
    }
    free(runs);
    return failed;
}
