// Batched LoRA for a step that mixes many adapters and the base model (Punica's SGMV,
// S-LoRA): tokens come in segments, each segment uses one adapter slot of a stacked weight
// (or none). Shrink and expand are declared here so that fused ops (block.cpp) can run
// them inside their own extension call; csrc/lora.cpp binds them for Python.
#pragma once

#include <cstdint>

namespace lora {

// The step's segments: tokens [indptr[i], indptr[i + 1]) use adapter slot slots[i]
// (-1: no adapter). indptr int32 [count + 1] from 0 to `tokens`, slots int32 [count].
struct Segments {
    const int32_t* indptr;
    const int32_t* slots;
    int64_t count;
    int64_t tokens;
};

// Element type of the stacked adapter weights. bfloat16 halves the bytes streamed per step
// (with many distinct adapters at decode the kernels are bound by that traffic); x, h, y,
// scales and ratios stay float32, and all arithmetic is float32.
enum class WeightType { kFloat32, kBFloat16 };

// Throws std::invalid_argument unless indptr runs from 0 to tokens without going back and
// every slot is -1 or below num_slots.
void check_segments(const Segments& segments, int64_t num_slots);

// h [tokens, rows] = x [tokens, k] @ a_stack[slot]^T per token (a_stack [num_slots, rows,
// k]); rows of tokens with no adapter are zero. Each slot's A is read once per call, however
// many segments use it.
void shrink(const Segments& segments, const float* x, int64_t k, const void* a_stack,
            WeightType type, int64_t rows, float* h);

// The up-projection of a (possibly fused) projection whose output columns are cut into
// slices (q, k, v of a fused QKV): slice p covers columns [slice_offsets[p],
// slice_offsets[p + 1]) and reads h's columns [p * rank, (p + 1) * rank).
struct ExpandWeights {
    const void* b_stack;           // [num_slots, rank, n]: B^T of each slot, slices side by side
    WeightType type;
    int64_t rank;
    int64_t n;
    const int64_t* slice_offsets;  // [num_slices + 1], 0 .. n
    int64_t num_slices;
    const float* scales;           // [num_slots, num_slices]
    const float* magnitude_ratio;  // [num_slots, n] (DoRA), or null
};

// For each token t with slot s and each column c (in slice p):
//   y[t, c] = ratio[s, c] * (y[t, c] + scales[s, p] * sum_r h[t, p * rank + r] * b[s, r, c])
// with ratio = 1 when magnitude_ratio is null; tokens with no adapter keep y. y is [tokens,
// n], h [tokens, h_cols].
void expand(const Segments& segments, const float* h, int64_t h_cols,
            const ExpandWeights& weights, float* y);

}  // namespace lora
