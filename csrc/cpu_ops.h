// Kernel bodies shared by their own bindings and by the fused decoder-layer ops (decoder_layer.cpp). They
// take dense float32 pointers unless said otherwise, never touch the GIL, and trust their
// callers for shapes (the torch wrappers in llama_engine/kernels/cpu check them).
#pragma once

#include <cstdint>
#include <string>

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

// Copies k/v [tokens, Hkv, D] (tokens k_stride / v_stride floats apart, `width` = Hkv * D)
// into the paged caches [capacity slots, Hkv, D] at slot_mapping (int64 [tokens]; negative:
// padding, skipped). Throws std::invalid_argument for a slot at or beyond `capacity`.
void store_kv(std::uintptr_t k, int64_t k_stride, std::uintptr_t v, int64_t v_stride,
              std::uintptr_t k_cache, std::uintptr_t v_cache, std::uintptr_t slot_mapping,
              int64_t tokens, int64_t width, int64_t capacity);

// Causal GQA attention of q [tokens, H, D] (tokens q_stride floats apart) over the paged
// caches [num_blocks, block_size, Hkv, D]; block_tables int32 [>= num_seqs, max_blocks],
// context_lens int32 [num_seqs], cu_seqlens_q int32 [num_seqs + 1] (values checked: throws
// std::invalid_argument); writes out, dense [tokens, H, D].
void paged_attention(std::uintptr_t q, int64_t q_stride, int64_t tokens, int64_t num_heads,
                     int64_t head_dim, std::uintptr_t k_cache, std::uintptr_t v_cache,
                     int64_t num_blocks, int64_t block_size, int64_t num_kv_heads,
                     std::uintptr_t block_tables, int64_t max_blocks,
                     std::uintptr_t context_lens, std::uintptr_t cu_seqlens_q, int64_t num_seqs,
                     float scale, std::uintptr_t out);

}  // namespace llama_ops

namespace quant {

// Throws std::invalid_argument unless a packed weight's [rows, row_bytes] is [N, the packed
// row size of K] for qtype ("Q4_0", "Q4_1", "Q8_0" or "NF4").
void check_packed_shape(int64_t rows, int64_t row_bytes, const std::string& qtype, int N, int K);

// y [M, N] = x [M, K] @ dequantize(w)^T for N packed rows w (isa 0: the best this CPU runs).
void packed_matmul(const float* x, int M, int K, const uint8_t* w, const std::string& qtype,
                   int N, float* y, int isa, bool int8_activations);

}  // namespace quant
