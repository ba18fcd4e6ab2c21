// Batched LoRA for a step that mixes many adapters and the base model (Punica's SGMV,
// S-LoRA): tokens come in segments, each segment uses one adapter slot of a stacked weight
// (or none). Shrink, expand and their checked bound forms (StepSegments, ProjectionLoRA)
// are declared here so that the fused decoder layer (decoder_layer.cpp) runs them inside
// its own extension call; csrc/lora.cpp binds them for Python.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>

#include "views.h"

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

// Tokens of one slot per work item: enough to reuse the slot's weights from cache across
// tokens, few enough that a long prefill segment still splits over the threads.
constexpr int64_t kMaxRunTokens = 16;

// Throws std::invalid_argument unless indptr runs from 0 to tokens without going back and
// every slot is -1 or below num_slots.
void check_segments(const Segments& segments, int64_t num_slots);

// The instruction sets the kernels are compiled for; kAuto: the best this CPU runs.
enum class Isa { kAuto, kScalar, kAvx2, kAvx512 };

// "auto", "scalar", "avx2" or "avx512" as an Isa; std::invalid_argument for another name
// or an instruction set this CPU lacks.
Isa parse_isa(const std::string& name);

// The name of the instruction set `isa` runs on ("avx512", "avx2" or "scalar").
const char* isa_name(Isa isa);

// h [tokens, rows] = x [tokens, k] @ a_stack[slot]^T per token (a_stack [num_slots, rows,
// k]); rows of tokens with no adapter are zero. A slot's tokens are gathered from all its
// segments, so its A is read once per run of up to kMaxRunTokens of them.
void shrink(const Segments& segments, const float* x, int64_t k, const void* a_stack,
            WeightType type, int64_t rows, float* h, Isa isa = Isa::kAuto);

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
            const ExpandWeights& weights, float* y, Isa isa = Isa::kAuto);

// A step's segments (kernels.LoRAMapping) as a bound object that keeps its int32 tensors
// alive. Checked when built: indptr runs from 0 without going back, slots are >= -1.
struct StepSegments {
    pybind11::object owners;
    Segments segments;
    int32_t max_slot;  // the largest slot used (-1: none)

    // int32 seg_indptr [count + 1] and seg_slots [count], dense CPU tensors; ValueError
    // naming the tensor otherwise. `tokens`: the count indptr must end at (-1: any).
    StepSegments(const llama_ops::TensorView& seg_indptr, const llama_ops::TensorView& seg_slots,
                 int64_t tokens = -1);
    StepSegments(pybind11::object seg_indptr, pybind11::object seg_slots);
};

// One (possibly fused) projection's stacked adapter weights (kernels.LoRAStack) as a bound
// object that keeps its tensors alive, checked against each other when built: a_stack
// [num_slots, num_slices * rank, k] and b_stack [num_slots, rank, n] of one dtype (float32
// or bfloat16), slice_offsets int64 [num_slices + 1] rising from 0 to n, scales float32
// [num_slots, num_slices], magnitude_ratio float32 [num_slots, n] or None. All dense CPU
// tensors; ValueError naming the tensor otherwise.
struct ProjectionLoRA {
    pybind11::object owners;
    const void* a_stack;  // null when built for expand alone
    int64_t num_slots, k;
    ExpandWeights expand;

    // a_stack may be absent (expand alone): k is then 0.
    ProjectionLoRA(const std::optional<llama_ops::TensorView>& a_stack,
                   const llama_ops::TensorView& b_stack,
                   const llama_ops::TensorView& slice_offsets, const llama_ops::TensorView& scales,
                   const std::optional<llama_ops::TensorView>& magnitude_ratio);
    ProjectionLoRA(pybind11::object a_stack, pybind11::object b_stack,
                   pybind11::object slice_offsets, pybind11::object scales,
                   std::optional<pybind11::object> magnitude_ratio);
    // ValueError naming `name` unless this projection maps k_ inputs to n_ outputs and the
    // segments' slots and tokens fit.
    void require_fits(const char* name, int64_t k_, int64_t n_, const StepSegments& segments,
                      int64_t tokens) const;
};

// y [tokens, n] += each token's adapter update of x [tokens, k] (shrink, then expand with the
// DoRA ratio when there is one); checked beforehand (require_fits). Each work item is one
// slot's run of tokens, shrunk and expanded by one thread: h never leaves its cache, and a
// projection costs one parallel region.
void add(const Segments& segments, const float* x, const ProjectionLoRA& weights, float* y,
         Isa isa = Isa::kAuto);

}  // namespace lora
