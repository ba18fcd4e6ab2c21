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
#include "views.h"

namespace py = pybind11;

namespace lora {
namespace {

using llama_ops::fail;

// Tokens per work item: enough to reuse a slot's weights from cache across tokens, few
// enough that a long prefill segment still splits over the threads.
constexpr int64_t kTokensPerItem = 16;
// Output columns per expand work item: the y block and the rows of B^T it reads stay in L1.
constexpr int64_t kColumnsPerItem = 256;
// Tokens whose x rows one shrink pass reads together.
constexpr int64_t kShrinkTokenTile = 4;
// Output columns of one expand register tile (two tokens: 2 x 64 float32 accumulators).
constexpr int64_t kExpandTile = 64;

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

// float32 weights as they are; bfloat16 ones are the top half of a float32.
ALWAYS_INLINE float widen(float w) { return w; }
ALWAYS_INLINE float widen(uint16_t w) {
    const uint32_t bits = static_cast<uint32_t>(w) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

// h[t, :rows] for `count` tokens of one slot whose weights are a [rows, k]. Tiles of
// kShrinkTokenTile tokens x 2 weight rows keep 8 accumulators in registers: every weight
// and x element loaded feeds several multiply-adds.
template <class W>
ALWAYS_INLINE void shrink_tokens_impl(const float* x, int64_t k, const W* a, int64_t rows,
                                      const int32_t* tokens, int64_t count, float* h) {
    for (int64_t i = 0; i < count; i += kShrinkTokenTile) {
        const int64_t n = std::min(kShrinkTokenTile, count - i);
        // fewer than four tokens left: the spare accumulators re-read the last one
        const int64_t t0 = tokens[i], t1 = tokens[i + std::min<int64_t>(1, n - 1)];
        const int64_t t2 = tokens[i + std::min<int64_t>(2, n - 1)];
        const int64_t t3 = tokens[i + std::min<int64_t>(3, n - 1)];
        const float *x0 = x + t0 * k, *x1 = x + t1 * k, *x2 = x + t2 * k, *x3 = x + t3 * k;
        for (int64_t r = 0; r < rows; r += 2) {
            const bool pair = r + 1 < rows;
            const W* w0 = a + r * k;
            const W* w1 = pair ? w0 + k : w0;
            float s00 = 0.0f, s10 = 0.0f, s20 = 0.0f, s30 = 0.0f;
            float s01 = 0.0f, s11 = 0.0f, s21 = 0.0f, s31 = 0.0f;
#pragma omp simd reduction(+ : s00, s10, s20, s30, s01, s11, s21, s31)
            for (int64_t j = 0; j < k; ++j) {
                const float u = widen(w0[j]), v = widen(w1[j]);
                s00 += u * x0[j]; s10 += u * x1[j]; s20 += u * x2[j]; s30 += u * x3[j];
                s01 += v * x0[j]; s11 += v * x1[j]; s21 += v * x2[j]; s31 += v * x3[j];
            }
            const float first[kShrinkTokenTile] = {s00, s10, s20, s30};
            const float second[kShrinkTokenTile] = {s01, s11, s21, s31};
            for (int64_t q = 0; q < n; ++q) {
                float* out = h + static_cast<int64_t>(tokens[i + q]) * rows + r;
                out[0] = first[q];
                if (pair) out[1] = second[q];
            }
        }
    }
}

LLAMA_SIMD_CLONES
void shrink_tokens(const float* x, int64_t k, const float* a, int64_t rows,
                   const int32_t* tokens, int64_t count, float* h) {
    shrink_tokens_impl(x, k, a, rows, tokens, count, h);
}

LLAMA_SIMD_CLONES
void shrink_tokens(const float* x, int64_t k, const uint16_t* a, int64_t rows,
                   const int32_t* tokens, int64_t count, float* h) {
    shrink_tokens_impl(x, k, a, rows, tokens, count, h);
}

// Columns [c, c + width) of two tokens' outputs (y0 and y1 may be the same row, then only
// y0 is written): the rank sum is accumulated in a register tile, then added to y once.
template <bool kFullTile, class W>
ALWAYS_INLINE void expand_tile(float* y0, float* y1, bool two, const float* h0, const float* h1,
                               const W* b, int64_t n, int64_t rank, float scale,
                               const float* ratio, int64_t width) {
    const int64_t cols = kFullTile ? kExpandTile : width;
    float acc0[kExpandTile] = {}, acc1[kExpandTile] = {};
    for (int64_t r = 0; r < rank; ++r) {
        const float u = scale * h0[r], v = scale * h1[r];
        const W* row = b + r * n;
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) {
            const float w = widen(row[j]);
            acc0[j] += u * w;
            acc1[j] += v * w;
        }
    }
    if (ratio != nullptr) {
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) {
            y0[j] = (y0[j] + acc0[j]) * ratio[j];
            if (two) y1[j] = (y1[j] + acc1[j]) * ratio[j];
        }
    } else {
#pragma omp simd
        for (int64_t j = 0; j < cols; ++j) {
            y0[j] += acc0[j];
            if (two) y1[j] += acc1[j];
        }
    }
}

// y[t, c0:c0 + width] of `count` tokens of one slot, for one column block of slice p.
// b points at column c0 of the slot's B^T rows (n apart), ratio at column c0 (or null).
template <class W>
ALWAYS_INLINE void expand_tokens_impl(const int32_t* tokens, int64_t count, const float* h,
                                      int64_t h_cols, int64_t h_offset, const W* b, int64_t n,
                                      int64_t rank, float scale, const float* ratio,
                                      int64_t width, float* y) {
    for (int64_t i = 0; i < count; i += 2) {
        const bool two = i + 1 < count;
        const int64_t t0 = tokens[i], t1 = two ? tokens[i + 1] : t0;
        float* y0 = y + t0 * n;
        float* y1 = y + t1 * n;
        const float* h0 = h + t0 * h_cols + h_offset;
        const float* h1 = h + t1 * h_cols + h_offset;
        int64_t c = 0;
        for (; c + kExpandTile <= width; c += kExpandTile) {
            expand_tile<true>(y0 + c, y1 + c, two, h0, h1, b + c, n, rank, scale,
                              ratio ? ratio + c : nullptr, kExpandTile);
        }
        if (c < width) {
            expand_tile<false>(y0 + c, y1 + c, two, h0, h1, b + c, n, rank, scale,
                               ratio ? ratio + c : nullptr, width - c);
        }
    }
}

LLAMA_SIMD_CLONES
void expand_tokens(const int32_t* tokens, int64_t count, const float* h, int64_t h_cols,
                   int64_t h_offset, const float* b, int64_t n, int64_t rank, float scale,
                   const float* ratio, int64_t width, float* y) {
    expand_tokens_impl(tokens, count, h, h_cols, h_offset, b, n, rank, scale, ratio, width, y);
}

LLAMA_SIMD_CLONES
void expand_tokens(const int32_t* tokens, int64_t count, const float* h, int64_t h_cols,
                   int64_t h_offset, const uint16_t* b, int64_t n, int64_t rank, float scale,
                   const float* ratio, int64_t width, float* y) {
    expand_tokens_impl(tokens, count, h, h_cols, h_offset, b, n, rank, scale, ratio, width, y);
}

// body(i) for i in [0, n): on this thread when the work is small, else over the OpenMP
// team in runs that idle threads help finish (for_each_in_runs: on a busy machine a static
// split waits for its slowest thread).
template <class Body>
void for_each_item(int64_t n, bool threaded, Body&& body) {
    if (!threaded) {
        for (int64_t i = 0; i < n; ++i) body(i);
        return;
    }
    llama_ops::for_each_in_runs(n, [] { return 0; }, [&](int, int64_t i) { body(i); });
}

WeightType weight_type(bool bf16) { return bf16 ? WeightType::kBFloat16 : WeightType::kFloat32; }

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

void shrink(const Segments& segments, const float* x, int64_t k, const void* a_stack,
            WeightType type, int64_t rows, float* h) {
    for (int64_t i = 0; i < segments.count; ++i) {  // tokens with no adapter: zero
        if (segments.slots[i] < 0) {
            const int64_t begin = segments.indptr[i], end = segments.indptr[i + 1];
            std::memset(h + begin * rows, 0, sizeof(float) * (end - begin) * rows);
        }
    }
    const SlotGroups groups = group_by_slot(segments);
    const std::vector<TokenRun> runs = token_runs(groups);
    const int64_t work = static_cast<int64_t>(groups.tokens.size()) * rows * k;
    for_each_item(static_cast<int64_t>(runs.size()), llama_ops::worth_threading(work),
                  [&](int64_t i) {
        const TokenRun& run = runs[i];
        const int32_t* tokens = groups.tokens.data() + run.begin;
        const int64_t offset = run.slot * rows * k;
        if (type == WeightType::kBFloat16) {
            shrink_tokens(x, k, static_cast<const uint16_t*>(a_stack) + offset, rows, tokens,
                          run.end - run.begin, h);
        } else {
            shrink_tokens(x, k, static_cast<const float*>(a_stack) + offset, rows, tokens,
                          run.end - run.begin, h);
        }
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
    for_each_item(items, llama_ops::worth_threading(work), [&](int64_t i) {
        const TokenRun& run = runs[i / num_blocks];
        const ColumnBlock& block = blocks[i % num_blocks];
        const float* ratio = weights.magnitude_ratio == nullptr
            ? nullptr : weights.magnitude_ratio + run.slot * weights.n + block.begin;
        const int64_t offset = run.slot * slot_size + block.begin;
        const float scale = weights.scales[run.slot * weights.num_slices + block.slice];
        const auto expand_with = [&](const auto* b) {
            expand_tokens(groups.tokens.data() + run.begin, run.end - run.begin, h, h_cols,
                          block.slice * weights.rank, b + offset, weights.n, weights.rank, scale,
                          ratio, block.end - block.begin, y + block.begin);
        };
        if (weights.type == WeightType::kBFloat16) {
            expand_with(static_cast<const uint16_t*>(weights.b_stack));
        } else {
            expand_with(static_cast<const float*>(weights.b_stack));
        }
    });
}

void add(const Segments& segments, const float* x, const ProjectionLoRA& weights, float* y) {
    thread_local std::vector<float> h_buffer;
    const int64_t rows = weights.expand.num_slices * weights.expand.rank;
    if (static_cast<int64_t>(h_buffer.size()) < segments.tokens * rows)
        h_buffer.resize(static_cast<size_t>(segments.tokens * rows));
    shrink(segments, x, weights.k, weights.a_stack, weights.expand.type, rows, h_buffer.data());
    expand(segments, h_buffer.data(), rows, weights.expand, y);
}

namespace {

using llama_ops::DType;
using llama_ops::TensorView;

TensorView tensor_view(const py::object& tensor, const char* name) {
    TensorView view;
    if (!llama_ops::read_tensor(tensor, view)) fail(std::string(name) + ": expected a torch.Tensor");
    return view;
}

// Stacked weights: a C-contiguous CPU tensor of float32 or bfloat16 with `ndim` dims.
const void* stacked(const TensorView& t, const char* name, int ndim) {
    if (!t.on_cpu || !t.contiguous() || t.ndim != ndim ||
        (t.dtype != DType::Float32 && t.dtype != DType::BFloat16)) {
        fail(std::string(name) + ": expected a C-contiguous CPU float32 or bfloat16 tensor with " +
             std::to_string(ndim) + " dims");
    }
    return reinterpret_cast<const void*>(t.data);
}

}  // namespace

StepSegments::StepSegments(py::object seg_indptr, py::object seg_slots)
    : owners(py::make_tuple(seg_indptr, seg_slots)) {
    const TensorView slots_view = tensor_view(seg_slots, "seg_slots");
    segments.slots = llama_ops::dense<int32_t>(slots_view, "seg_slots", 1);
    segments.count = slots_view.sizes[0];
    segments.indptr = llama_ops::dense<int32_t>(tensor_view(seg_indptr, "seg_indptr"),
                                                "seg_indptr", {segments.count + 1});
    segments.tokens = segments.indptr[segments.count];
    max_slot = -1;
    for (int64_t i = 0; i < segments.count; ++i) max_slot = std::max(max_slot, segments.slots[i]);
    check_segments(segments, static_cast<int64_t>(max_slot) + 1);
}

ProjectionLoRA::ProjectionLoRA(py::object a, py::object b, py::object offsets, py::object scales,
                               std::optional<py::object> ratio)
    : owners(py::make_tuple(a, b, offsets, scales, ratio ? *ratio : py::none())) {
    const TensorView a_view = tensor_view(a, "a_stack"), b_view = tensor_view(b, "b_stack");
    a_stack = stacked(a_view, "a_stack", 3);
    expand.b_stack = stacked(b_view, "b_stack", 3);
    if (a_view.dtype != b_view.dtype) fail("b_stack: must have a_stack's dtype");
    expand.type = weight_type(b_view.dtype == DType::BFloat16);
    num_slots = b_view.sizes[0];
    expand.rank = b_view.sizes[1];
    expand.n = b_view.sizes[2];
    k = a_view.sizes[2];
    const TensorView offsets_view = tensor_view(offsets, "slice_offsets");
    expand.slice_offsets = llama_ops::dense<int64_t>(offsets_view, "slice_offsets", 1);
    expand.num_slices = offsets_view.sizes[0] - 1;
    if (expand.num_slices < 1 || expand.slice_offsets[0] != 0 ||
        expand.slice_offsets[expand.num_slices] != expand.n)
        fail("slice_offsets: must run from 0 to b_stack's columns");
    for (int64_t p = 0; p < expand.num_slices; ++p) {
        if (expand.slice_offsets[p + 1] < expand.slice_offsets[p])
            fail("slice_offsets: must not decrease");
    }
    if (a_view.sizes[0] != num_slots || a_view.sizes[1] != expand.num_slices * expand.rank)
        fail("a_stack: expected [slots, num_slices * rank, k] matching b_stack");
    expand.scales = llama_ops::dense<float>(tensor_view(scales, "scales"), "scales",
                                            {num_slots, expand.num_slices});
    expand.magnitude_ratio = nullptr;
    if (ratio && !ratio->is_none()) {
        expand.magnitude_ratio = llama_ops::dense<float>(
            tensor_view(*ratio, "magnitude_ratio"), "magnitude_ratio", {num_slots, expand.n});
    }
}

void ProjectionLoRA::require_fits(const char* name, int64_t k_, int64_t n_,
                                  const StepSegments& step, int64_t tokens) const {
    if (k != k_ || expand.n != n_) {
        fail(std::string(name) + ": adapters of a [" + std::to_string(expand.n) + ", " +
             std::to_string(k) + "] projection, the layer's is [" + std::to_string(n_) + ", " +
             std::to_string(k_) + "]");
    }
    if (step.max_slot >= num_slots) fail(std::string(name) + ": a segment's slot has no weights");
    if (step.segments.tokens != tokens) fail("lora_segments: not this step's tokens");
}

namespace {

// The bindings' arguments, from addresses: the segments (values checked) and the expand
// weights.
Segments segments_at(std::uintptr_t indptr, std::uintptr_t slots, int64_t count,
                     int64_t tokens, int64_t num_slots) {
    const Segments segments{llama_ops::tensor_at<const int32_t>(indptr),
                            llama_ops::tensor_at<const int32_t>(slots), count, tokens};
    check_segments(segments, num_slots);
    return segments;
}

ExpandWeights expand_weights_at(std::uintptr_t b_stack, bool bf16, int64_t rank, int64_t n,
                                std::uintptr_t slice_offsets, int64_t num_slices,
                                std::uintptr_t scales, std::uintptr_t magnitude_ratio) {
    using llama_ops::tensor_at;
    return {tensor_at<const void>(b_stack), weight_type(bf16), rank, n,
            tensor_at<const int64_t>(slice_offsets), num_slices, tensor_at<const float>(scales),
            tensor_at<const float>(magnitude_ratio)};
}

}  // namespace
}  // namespace lora

void register_lora(py::module_& m) {
    using llama_ops::tensor_at;
    using namespace pybind11::literals;
    py::class_<lora::StepSegments>(m, "LoRASegments",
                                   "A step's adapter segments, checked once (kernels.LoRAMapping).")
        .def(py::init<py::object, py::object>(), "seg_indptr"_a, "seg_slots"_a);
    py::class_<lora::ProjectionLoRA>(m, "LoRAProjection",
                                     "One projection's stacked adapters (kernels.LoRAStack).")
        .def(py::init<py::object, py::object, py::object, py::object,
                      std::optional<py::object>>(),
             "a_stack"_a, "b_stack"_a, "slice_offsets"_a, "scales"_a, "magnitude_ratio"_a);
    // Tensors are passed as addresses (data_ptr()), checked by llama_engine/kernels/cpu/lora.py.
    m.def("lora_shrink", [](std::uintptr_t x, int64_t tokens, int64_t k, std::uintptr_t a_stack,
                            bool bf16, int64_t num_slots, int64_t rows, std::uintptr_t seg_indptr,
                            std::uintptr_t seg_slots, int64_t num_segments, std::uintptr_t h) {
              const lora::Segments segments =
                  lora::segments_at(seg_indptr, seg_slots, num_segments, tokens, num_slots);
              py::gil_scoped_release release;
              lora::shrink(segments, tensor_at<const float>(x), k, tensor_at<const void>(a_stack),
                           lora::weight_type(bf16), rows, tensor_at<float>(h));
          },
          py::arg("x"), py::arg("tokens"), py::arg("k"), py::arg("a_stack"), py::arg("bf16"),
          py::arg("num_slots"), py::arg("rows"), py::arg("seg_indptr"), py::arg("seg_slots"),
          py::arg("num_segments"), py::arg("h"),
          "h [tokens, rows] = x [tokens, k] @ a_stack[slot]^T per segment of tokens "
          "(a_stack [num_slots, rows, k], float32 or bfloat16; slot -1: zero rows).");
    m.def("lora_expand", [](std::uintptr_t y, int64_t tokens, int64_t n, std::uintptr_t h,
                            int64_t h_cols, std::uintptr_t b_stack, bool bf16, int64_t num_slots,
                            int64_t rank, std::uintptr_t slice_offsets, int64_t num_slices,
                            std::uintptr_t scales, std::uintptr_t magnitude_ratio,
                            std::uintptr_t seg_indptr, std::uintptr_t seg_slots,
                            int64_t num_segments) {
              const lora::Segments segments =
                  lora::segments_at(seg_indptr, seg_slots, num_segments, tokens, num_slots);
              const lora::ExpandWeights weights = lora::expand_weights_at(
                  b_stack, bf16, rank, n, slice_offsets, num_slices, scales, magnitude_ratio);
              py::gil_scoped_release release;
              lora::expand(segments, tensor_at<const float>(h), h_cols, weights,
                           tensor_at<float>(y));
          },
          py::arg("y"), py::arg("tokens"), py::arg("n"), py::arg("h"), py::arg("h_cols"),
          py::arg("b_stack"), py::arg("bf16"), py::arg("num_slots"), py::arg("rank"),
          py::arg("slice_offsets"),
          py::arg("num_slices"), py::arg("scales"), py::arg("magnitude_ratio"),
          py::arg("seg_indptr"), py::arg("seg_slots"), py::arg("num_segments"),
          "In place: y = ratio * (y + scale * h[:, slice's rank columns] @ b_stack[slot]) per "
          "segment and output slice (magnitude_ratio = 0: no DoRA ratio; slot -1: y kept).");
    m.def("lora_add", [](std::uintptr_t y, std::uintptr_t x, int64_t tokens, int64_t k,
                         int64_t n, std::uintptr_t a_stack, std::uintptr_t b_stack, bool bf16,
                         int64_t num_slots, int64_t rank, std::uintptr_t slice_offsets,
                         int64_t num_slices, std::uintptr_t scales,
                         std::uintptr_t magnitude_ratio, std::uintptr_t seg_indptr,
                         std::uintptr_t seg_slots, int64_t num_segments) {
              const lora::Segments segments =
                  lora::segments_at(seg_indptr, seg_slots, num_segments, tokens, num_slots);
              const lora::ExpandWeights weights = lora::expand_weights_at(
                  b_stack, bf16, rank, n, slice_offsets, num_slices, scales, magnitude_ratio);
              py::gil_scoped_release release;
              const int64_t rows = num_slices * rank;
              std::vector<float> h(static_cast<size_t>(tokens * rows));
              lora::shrink(segments, tensor_at<const float>(x), k, tensor_at<const void>(a_stack),
                           weights.type, rows, h.data());
              lora::expand(segments, h.data(), rows, weights, tensor_at<float>(y));
          },
          py::arg("y"), py::arg("x"), py::arg("tokens"), py::arg("k"), py::arg("n"),
          py::arg("a_stack"), py::arg("b_stack"), py::arg("bf16"), py::arg("num_slots"),
          py::arg("rank"), py::arg("slice_offsets"), py::arg("num_slices"), py::arg("scales"),
          py::arg("magnitude_ratio"), py::arg("seg_indptr"), py::arg("seg_slots"),
          py::arg("num_segments"),
          "lora_shrink then lora_expand in one call: y += the adapters' delta of x, in place "
          "(a_stack [num_slots, num_slices * rank, k] and b_stack of one dtype).");
}
