// Kernel bodies shared by their own bindings and by the fused decoder-layer ops
// (decoder_layer.cpp). They never touch the GIL. Those taking raw pointers trust their
// callers for shapes; those taking views (views.h) get sizes that were checked when the
// views were built.
#pragma once

#include <cstdint>
#include <string>

#include "views.h"

namespace llama_ops {

// out = rmsnorm(x + residual) * weight over [tokens, hidden]; residual may be null, else
// x + residual goes to new_residual.
void rms_norm_rows(const float* x, const float* weight, float eps, const float* residual,
                   float* out, float* new_residual, int64_t tokens, int64_t hidden);

// Throws std::invalid_argument unless every position indexes the cos/sin table.
void check_positions(const int64_t* positions, int64_t tokens, int64_t max_pos);

// Rotary embedding in place on q [tokens, q_heads, head_dim] and k [tokens, k_heads,
// head_dim] (each token's heads dense, tokens q_stride / k_stride elements apart);
// cos_sin [max_pos, head_dim] holds cos in its first half, sin in its second.
void rope_rows(float* q, int64_t q_stride, int64_t q_heads, float* k, int64_t k_stride,
               int64_t k_heads, int64_t tokens, int64_t head_dim, const int64_t* positions,
               const float* cos_sin);

// out [rows, width] = silu(gate_up[:, :width]) * gate_up[:, width:].
void silu_and_mul_rows(const float* gate_up, float* out, int64_t rows, int64_t width);

// Copies k/v rows [tokens, Hkv, D] into the paged caches at `slots` (int64 [tokens],
// checked against the cache's capacity; negative: padding, skipped).
void store_kv(const TokenRows<const float>& k, const TokenRows<const float>& v,
              const KvCache& cache, const int64_t* slots);

// Causal GQA attention of q [tokens, num_heads, D] over the paged caches, each sequence's
// rows and blocks given by `metadata` (its values are checked: std::invalid_argument);
// writes out, dense [tokens, num_heads, D].
void paged_attention(const TokenRows<const float>& q, int64_t num_heads, const KvCache& cache,
                     const AttentionMetadata& metadata, float* out);

}  // namespace llama_ops

namespace quant {

// Throws std::invalid_argument unless a packed weight's [rows, row_bytes] is [N, the packed
// row size of K] for qtype ("Q4_0", "Q4_1", "Q8_0" or "NF4").
void check_packed_shape(int64_t rows, int64_t row_bytes, const std::string& qtype, int N, int K);

// y [M, N] = x [M, K] @ dequantize(w)^T for N packed rows w (isa 0: the best this CPU runs).
void packed_matmul(const float* x, int M, int K, const uint8_t* w, const std::string& qtype,
                   int N, float* y, int isa, bool int8_activations);

}  // namespace quant
