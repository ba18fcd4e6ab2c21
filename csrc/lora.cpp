// Batched LoRA kernels (declared in lora.h). Tokens are regrouped by adapter slot so that
// each slot's weights are streamed once per call, whatever the order of the sequences in
// the step: at decode (one token per sequence) that turns per-token matrix-vector products
// into one small matrix product per adapter, as Punica's SGMV does on the GPU. Work items
// are (slot, run of tokens) for shrink and (slot, run of tokens, column block) for
// expand, so threads never write the same output element.
#include "lora.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "ops_common.h"
#include "registry.h"

namespace py = pybind11;

namespace lora {
namespace {

using llama_ops::fail;

// Tokens per work item: enough to reuse a slot's weights from cache across tokens, few
// enough that a long prefill segment still splits over the threads.
constexpr int64_t kTokensPerItem = 16;
// Output columns per expand work item: the y block and the rows of B^T it reads stay in L1.
constexpr int64_t kColumnsPerItem = 256;
// Tokens whose x rows one shrink pass reads together (four accumulators per weight load).
constexpr int64_t kShrinkTokenTile = 4;

// The step's tokens grouped by slot: group g holds tokens[start[g]:start[g + 1]], all of
// slot slot[g], in token order.
struct SlotGroups {
    std::vector<int32_t> tokens;
    std::vector<int64_t> start;
    std::vector<int32_t> slot;
};

SlotGroups group_by_slot(const Segments& segments) {
    int32_t max_slot = -1;
    for (int64_t i = 0; i < segments.count; ++i) max_slot = std::max(max_slot, segments.slots[i]);
    std::vector<int64_t> count(static_cast<size_t>(max_slot + 1), 0);
    for (int64_t i = 0; i < segments.count; ++i) {
        if (segments.slots[i] >= 0)
            count[segments.slots[i]] += segments.indptr[i + 1] - segments.indptr[i];
    }
    SlotGroups groups;
    std::vector<int64_t> next(count.size(), 0);
    groups.start.push_back(0);
    for (int32_t s = 0; s <= max_slot; ++s) {
        if (count[s] == 0) continue;
        next[s] = groups.start.back();
        groups.slot.push_back(s);
        groups.start.push_back(groups.start.back() + count[s]);
    }
    groups.tokens.resize(static_cast<size_t>(groups.start.back()));
    for (int64_t i = 0; i < segments.count; ++i) {
        const int32_t s = segments.slots[i];
        if (s < 0) continue;
        for (int32_t t = segments.indptr[i]; t < segments.indptr[i + 1]; ++t)
            groups.tokens[next[s]++] = t;
    }
    return groups;
}

// A run of at most kTokensPerItem tokens of one group: groups.tokens[begin:end].
struct TokenRun {
    int32_t slot;
    int64_t begin;
    int64_t end;
};

std::vector<TokenRun> token_runs(const SlotGroups& groups) {
    std::vector<TokenRun> runs;
    for (size_t g = 0; g < groups.slot.size(); ++g) {
        for (int64_t b = groups.start[g]; b < groups.start[g + 1]; b += kTokensPerItem)
            runs.push_back({groups.slot[g], b, std::min(b + kTokensPerItem, groups.start[g + 1])});
    }
    return runs;
}

// h[t, :rows] for `count` tokens of one slot whose weights are a [rows, k].
LLAMA_SIMD_CLONES
void shrink_tokens(const float* x, int64_t k, const float* a, int64_t rows,
                   const int32_t* tokens, int64_t count, float* h) {
    for (int64_t i = 0; i < count; i += kShrinkTokenTile) {
        const int64_t n = std::min(kShrinkTokenTile, count - i);
        // fewer than four tokens left: the spare accumulators re-read the last one
        const float* x0 = x + static_cast<int64_t>(tokens[i]) * k;
        const float* x1 = x + static_cast<int64_t>(tokens[i + std::min<int64_t>(1, n - 1)]) * k;
        const float* x2 = x + static_cast<int64_t>(tokens[i + std::min<int64_t>(2, n - 1)]) * k;
        const float* x3 = x + static_cast<int64_t>(tokens[i + std::min<int64_t>(3, n - 1)]) * k;
        for (int64_t r = 0; r < rows; ++r) {
            const float* w = a + r * k;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
            for (int64_t j = 0; j < k; ++j) {
                s0 += w[j] * x0[j];
                s1 += w[j] * x1[j];
                s2 += w[j] * x2[j];
                s3 += w[j] * x3[j];
            }
            const float sums[kShrinkTokenTile] = {s0, s1, s2, s3};
            for (int64_t j = 0; j < n; ++j) h[static_cast<int64_t>(tokens[i + j]) * rows + r] = sums[j];
        }
    }
}

// y[t, c0:c0 + width] of `count` tokens of one slot, for one column block of slice p.
// b points at column c0 of the slot's B^T rows (n apart), ratio at column c0 (or null).
LLAMA_SIMD_CLONES
void expand_tokens(const int32_t* tokens, int64_t count, const float* h, int64_t h_cols,
                   int64_t h_offset, const float* b, int64_t n, int64_t rank, float scale,
                   const float* ratio, int64_t width, float* y) {
    for (int64_t i = 0; i < count; ++i) {
        const int64_t t = tokens[i];
        float* out = y + t * n;
        const float* coefficients = h + t * h_cols + h_offset;
        for (int64_t r = 0; r < rank; ++r) {
            const float c = scale * coefficients[r];
            const float* row = b + r * n;
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) out[j] += c * row[j];
        }
        if (ratio != nullptr) {
#pragma omp simd
            for (int64_t j = 0; j < width; ++j) out[j] *= ratio[j];
        }
    }
}

// A block of output columns inside one slice.
struct ColumnBlock {
    int64_t begin;
    int64_t end;
    int64_t slice;
};

}  // namespace

void check_segments(const Segments& segments, int64_t num_slots) {
    if (segments.count < 0 || segments.indptr[0] != 0 ||
        segments.indptr[segments.count] != segments.tokens) {
        fail("seg_indptr: must run from 0 to the number of tokens");
    }
    for (int64_t i = 0; i < segments.count; ++i) {
        if (segments.indptr[i + 1] < segments.indptr[i]) fail("seg_indptr: must not decrease");
        if (segments.slots[i] < -1 || segments.slots[i] >= num_slots)
            fail("seg_slots: a slot outside the stacked weights (-1 means no adapter)");
    }
}

void shrink(const Segments& segments, const float* x, int64_t k, const float* a_stack,
            int64_t rows, float* h) {
    for (int64_t i = 0; i < segments.count; ++i) {  // tokens with no adapter: zero
        if (segments.slots[i] < 0) {
            const int64_t begin = segments.indptr[i], end = segments.indptr[i + 1];
            std::memset(h + begin * rows, 0, sizeof(float) * (end - begin) * rows);
        }
    }
    const SlotGroups groups = group_by_slot(segments);
    const std::vector<TokenRun> runs = token_runs(groups);
    const int64_t work = static_cast<int64_t>(groups.tokens.size()) * rows * k;
    llama_ops::parallel_for(static_cast<int64_t>(runs.size()),
                            llama_ops::worth_threading(work), [&](int64_t i) {
        const TokenRun& run = runs[i];
        shrink_tokens(x, k, a_stack + run.slot * rows * k, rows,
                      groups.tokens.data() + run.begin, run.end - run.begin, h);
    });
}

void expand(const Segments& segments, const float* h, int64_t h_cols,
            const ExpandWeights& weights, float* y) {
    const SlotGroups groups = group_by_slot(segments);
    const std::vector<TokenRun> runs = token_runs(groups);
    std::vector<ColumnBlock> blocks;
    for (int64_t p = 0; p < weights.num_slices; ++p) {
        for (int64_t c = weights.slice_offsets[p]; c < weights.slice_offsets[p + 1];
             c += kColumnsPerItem)
            blocks.push_back({c, std::min(c + kColumnsPerItem, weights.slice_offsets[p + 1]), p});
    }
    const int64_t num_blocks = static_cast<int64_t>(blocks.size());
    const int64_t items = static_cast<int64_t>(runs.size()) * num_blocks;
    const int64_t work = static_cast<int64_t>(groups.tokens.size()) * weights.rank * weights.n;
    const int64_t slot_size = weights.rank * weights.n;
    llama_ops::parallel_for(items, llama_ops::worth_threading(work), [&](int64_t i) {
        const TokenRun& run = runs[i / num_blocks];
        const ColumnBlock& block = blocks[i % num_blocks];
        const float* ratio = weights.magnitude_ratio == nullptr
            ? nullptr : weights.magnitude_ratio + run.slot * weights.n + block.begin;
        expand_tokens(groups.tokens.data() + run.begin, run.end - run.begin, h, h_cols,
                      block.slice * weights.rank,
                      weights.b_stack + run.slot * slot_size + block.begin, weights.n,
                      weights.rank, weights.scales[run.slot * weights.num_slices + block.slice],
                      ratio, block.end - block.begin, y + block.begin);
    });
}

}  // namespace lora

void register_lora(py::module_& m) {
    using llama_ops::tensor_at;
    // Tensors are passed as addresses (data_ptr()), checked by llama_engine/kernels/cpu/lora.py.
    m.def("lora_shrink", [](std::uintptr_t x, int64_t tokens, int64_t k, std::uintptr_t a_stack,
                            int64_t num_slots, int64_t rows, std::uintptr_t seg_indptr,
                            std::uintptr_t seg_slots, int64_t num_segments, std::uintptr_t h) {
              const lora::Segments segments{tensor_at<const int32_t>(seg_indptr),
                                            tensor_at<const int32_t>(seg_slots), num_segments,
                                            tokens};
              lora::check_segments(segments, num_slots);
              py::gil_scoped_release release;
              lora::shrink(segments, tensor_at<const float>(x), k, tensor_at<const float>(a_stack),
                           rows, tensor_at<float>(h));
          },
          py::arg("x"), py::arg("tokens"), py::arg("k"), py::arg("a_stack"),
          py::arg("num_slots"), py::arg("rows"), py::arg("seg_indptr"), py::arg("seg_slots"),
          py::arg("num_segments"), py::arg("h"),
          "h [tokens, rows] = x [tokens, k] @ a_stack[slot]^T per segment of tokens "
          "(a_stack [num_slots, rows, k]; slot -1: zero rows).");
    m.def("lora_expand", [](std::uintptr_t y, int64_t tokens, int64_t n, std::uintptr_t h,
                            int64_t h_cols, std::uintptr_t b_stack, int64_t num_slots,
                            int64_t rank, std::uintptr_t slice_offsets, int64_t num_slices,
                            std::uintptr_t scales, std::uintptr_t magnitude_ratio,
                            std::uintptr_t seg_indptr, std::uintptr_t seg_slots,
                            int64_t num_segments) {
              const lora::Segments segments{tensor_at<const int32_t>(seg_indptr),
                                            tensor_at<const int32_t>(seg_slots), num_segments,
                                            tokens};
              lora::check_segments(segments, num_slots);
              const lora::ExpandWeights weights{
                  tensor_at<const float>(b_stack), rank, n, tensor_at<const int64_t>(slice_offsets),
                  num_slices, tensor_at<const float>(scales),
                  tensor_at<const float>(magnitude_ratio)};
              py::gil_scoped_release release;
              lora::expand(segments, tensor_at<const float>(h), h_cols, weights,
                           tensor_at<float>(y));
          },
          py::arg("y"), py::arg("tokens"), py::arg("n"), py::arg("h"), py::arg("h_cols"),
          py::arg("b_stack"), py::arg("num_slots"), py::arg("rank"), py::arg("slice_offsets"),
          py::arg("num_slices"), py::arg("scales"), py::arg("magnitude_ratio"),
          py::arg("seg_indptr"), py::arg("seg_slots"), py::arg("num_segments"),
          "In place: y = ratio * (y + scale * h[:, slice's rank columns] @ b_stack[slot]) per "
          "segment and output slice (magnitude_ratio = 0: no DoRA ratio; slot -1: y kept).");
}
