// Batched LoRA (declared in lora.h). Tokens are regrouped by adapter slot so that each
// slot's weights are streamed once per run of its tokens, whatever the order of the
// sequences in the step: at decode (one token per sequence) that turns per-token
// matrix-vector products into one small matrix product per adapter, as Punica's SGMV does on
// the GPU. Work items are (slot, run of tokens), so threads never write the same output
// row; the register-tiled kernels are in lora_kernels.h.
#include "lora.h"

#include <omp.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "lora_simd.h"
#include "ops_common.h"
#include "registry.h"
#include "views.h"

namespace py = pybind11;

namespace lora {
namespace {

using llama_ops::TensorView;
using llama_ops::dense;
using llama_ops::fail;

// The fewest tokens a run is cut to when runs are shortened so that every thread gets
// work: one register tile of the widest kernels (lora_kernels.h).
constexpr int64_t kMinRunTokens = 4;

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

// A run of tokens of one group: groups.tokens[begin:end].
struct TokenRun {
    int32_t slot;
    int64_t begin;
    int64_t end;
};

// Runs of at most kMaxRunTokens tokens; shorter (down to kMinRunTokens) when that would
// leave fewer than two runs per thread, as at decode with one or two adapters.
std::vector<TokenRun> token_runs(const SlotGroups& groups) {
    const int64_t tokens = static_cast<int64_t>(groups.tokens.size());
    const int64_t wanted = 2 * omp_get_max_threads();
    const int64_t per_run = std::clamp((tokens + wanted - 1) / wanted, kMinRunTokens,
                                       kMaxRunTokens);
    std::vector<TokenRun> runs;
    for (size_t g = 0; g < groups.slot.size(); ++g) {
        for (int64_t b = groups.start[g]; b < groups.start[g + 1]; b += per_run)
            runs.push_back({groups.slot[g], b, std::min(b + per_run, groups.start[g + 1])});
    }
    return runs;
}

// body(slot, tokens, count) for each run of the step's tokens that use an adapter (runs of
// one slot: token_runs). On this thread when the runs' work (`work_per_token` multiply-adds
// per token) is small, else over the OpenMP team in runs that idle threads help finish
// (for_each_in_runs: on a busy machine a static split waits for its slowest thread).
template <class Body>
void for_each_run(const Segments& segments, int64_t work_per_token, Body&& body) {
    const SlotGroups groups = group_by_slot(segments);
    const std::vector<TokenRun> runs = token_runs(groups);
    const auto item = [&](int64_t i) {
        const TokenRun& run = runs[i];
        body(run.slot, groups.tokens.data() + run.begin, run.end - run.begin);
    };
    const int64_t n = static_cast<int64_t>(runs.size());
    if (!llama_ops::worth_threading(static_cast<int64_t>(groups.tokens.size()) * work_per_token)) {
        for (int64_t i = 0; i < n; ++i) item(i);
        return;
    }
    llama_ops::for_each_in_runs(n, [] { return 0; }, [&](int, int64_t i) { item(i); });
}

WeightType weight_type(bool bf16) { return bf16 ? WeightType::kBFloat16 : WeightType::kFloat32; }

size_t element_size(WeightType type) { return type == WeightType::kBFloat16 ? 2 : 4; }

// Row pointers rows[i] = base + tokens[i] * width for a run's tokens.
template <class T>
void token_rows(const int32_t* tokens, int64_t count, T* base, int64_t width, T** rows) {
    for (int64_t i = 0; i < count; ++i) rows[i] = base + static_cast<int64_t>(tokens[i]) * width;
}

const simd::KernelSet& kernel_set(Isa isa) {
    switch (isa) {
        case Isa::kScalar: return simd::scalar::kernels;
        case Isa::kAvx2: return simd::avx2::kernels;
        case Isa::kAvx512: return simd::avx512::kernels;
        default: return simd::kernels();
    }
}

// h[i][:rows] = x[i] @ a[slot]^T for a run's `count` token rows.
void shrink_rows(const simd::KernelSet& kernels, const float* const* x, int64_t count,
                 const void* a_stack, WeightType type, int32_t slot, int64_t rows, int64_t k,
                 float* const* h) {
    const char* a = static_cast<const char*>(a_stack) + slot * rows * k * element_size(type);
    if (type == WeightType::kBFloat16) {
        kernels.shrink_bf16(x, count, reinterpret_cast<const uint16_t*>(a), rows, k, h);
    } else {
        kernels.shrink_f32(x, count, reinterpret_cast<const float*>(a), rows, k, h);
    }
}

// y[i] updated with slot's expand of h[i], every output slice, for a run's token rows.
void expand_rows(const simd::KernelSet& kernels, const float* const* h, int64_t count,
                 const ExpandWeights& w, int32_t slot, float* const* y) {
    const char* b =
        static_cast<const char*>(w.b_stack) + slot * w.rank * w.n * element_size(w.type);
    const float* ratio = w.magnitude_ratio == nullptr ? nullptr : w.magnitude_ratio + slot * w.n;
    for (int64_t p = 0; p < w.num_slices; ++p) {
        const float scale = w.scales[slot * w.num_slices + p];
        const int64_t c0 = w.slice_offsets[p], c1 = w.slice_offsets[p + 1];
        if (w.type == WeightType::kBFloat16) {
            kernels.expand_bf16(h, p * w.rank, count, reinterpret_cast<const uint16_t*>(b), w.n,
                                w.rank, scale, ratio, c0, c1, y);
        } else {
            kernels.expand_f32(h, p * w.rank, count, reinterpret_cast<const float*>(b), w.n,
                               w.rank, scale, ratio, c0, c1, y);
        }
    }
}

}  // namespace

Isa parse_isa(const std::string& name) {
    if (name == "auto") return Isa::kAuto;
    if (name == "scalar") return Isa::kScalar;
    if (name == "avx2" && simd::avx2::supported()) return Isa::kAvx2;
    if (name == "avx512" && simd::avx512::supported()) return Isa::kAvx512;
    fail("isa: '" + name + "' is not one of auto, scalar, avx2, avx512 that this CPU runs");
}

const char* isa_name(Isa isa) { return kernel_set(isa).name; }

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
            WeightType type, int64_t rows, float* h, Isa isa) {
    for (int64_t i = 0; i < segments.count; ++i) {  // tokens with no adapter: zero
        if (segments.slots[i] < 0) {
            const int64_t begin = segments.indptr[i], end = segments.indptr[i + 1];
            std::memset(h + begin * rows, 0, sizeof(float) * (end - begin) * rows);
        }
    }
    for_each_run(segments, rows * k, [&](int32_t slot, const int32_t* tokens, int64_t count) {
        const float* x_rows[kMaxRunTokens];
        float* h_rows[kMaxRunTokens];
        token_rows(tokens, count, x, k, x_rows);
        token_rows(tokens, count, h, rows, h_rows);
        shrink_rows(kernel_set(isa), x_rows, count, a_stack, type, slot, rows, k, h_rows);
    });
}

void expand(const Segments& segments, const float* h, int64_t h_cols,
            const ExpandWeights& weights, float* y, Isa isa) {
    for_each_run(segments, weights.rank * weights.n,
                 [&](int32_t slot, const int32_t* tokens, int64_t count) {
        const float* h_rows[kMaxRunTokens];
        float* y_rows[kMaxRunTokens];
        token_rows(tokens, count, h, h_cols, h_rows);
        token_rows(tokens, count, y, weights.n, y_rows);
        expand_rows(kernel_set(isa), h_rows, count, weights, slot, y_rows);
    });
}

void add(const Segments& segments, const float* x, const ProjectionLoRA& weights, float* y,
         Isa isa) {
    const simd::KernelSet& kernels = kernel_set(isa);
    const ExpandWeights& e = weights.expand;
    const int64_t rows = e.num_slices * e.rank;
    for_each_run(segments, rows * weights.k + e.rank * e.n,
                 [&](int32_t slot, const int32_t* tokens, int64_t count) {
        thread_local std::vector<float> h_buffer;  // one run's h, on the thread that uses it
        if (static_cast<int64_t>(h_buffer.size()) < count * rows)
            h_buffer.resize(static_cast<size_t>(count * rows));
        const float* x_rows[kMaxRunTokens];
        float* h_rows[kMaxRunTokens];
        float* y_rows[kMaxRunTokens];
        token_rows(tokens, count, x, weights.k, x_rows);
        for (int64_t t = 0; t < count; ++t) h_rows[t] = h_buffer.data() + t * rows;
        token_rows(tokens, count, y, e.n, y_rows);
        shrink_rows(kernels, x_rows, count, weights.a_stack, e.type, slot, rows, weights.k,
                    h_rows);
        expand_rows(kernels, h_rows, count, e, slot, y_rows);
    });
}

namespace {

// ValueError unless every slot the segments use has weights.
void require_slots(const StepSegments& step, int64_t num_slots) {
    if (step.max_slot >= num_slots)
        fail("seg_slots: a slot outside the stacked weights (-1 means no adapter)");
}

TensorView view_of(const py::object& tensor, const char* name) {
    TensorView view;
    if (!llama_ops::read_tensor(tensor, view))
        fail(std::string(name) + ": expected a torch.Tensor");
    return view;
}

}  // namespace

StepSegments::StepSegments(const TensorView& seg_indptr, const TensorView& seg_slots,
                           int64_t tokens) {
    segments.slots = dense<int32_t>(seg_slots, "seg_slots", 1);
    segments.count = seg_slots.sizes[0];
    segments.indptr = dense<int32_t>(seg_indptr, "seg_indptr", {segments.count + 1});
    segments.tokens = tokens >= 0 ? tokens : segments.indptr[segments.count];
    max_slot = -1;
    for (int64_t i = 0; i < segments.count; ++i) max_slot = std::max(max_slot, segments.slots[i]);
    check_segments(segments, static_cast<int64_t>(max_slot) + 1);
}

StepSegments::StepSegments(py::object seg_indptr, py::object seg_slots)
    : StepSegments(view_of(seg_indptr, "seg_indptr"), view_of(seg_slots, "seg_slots")) {
    owners = py::make_tuple(seg_indptr, seg_slots);
}

ProjectionLoRA::ProjectionLoRA(const std::optional<TensorView>& a, const TensorView& b,
                               const TensorView& offsets, const TensorView& scales,
                               const std::optional<TensorView>& ratio) {
    bool b_bf16 = false;
    expand.b_stack = llama_ops::dense_weights(b, "b_stack", {-1, -1, -1}, &b_bf16);
    expand.type = weight_type(b_bf16);
    num_slots = b.sizes[0];
    expand.rank = b.sizes[1];
    expand.n = b.sizes[2];
    expand.slice_offsets = dense<int64_t>(offsets, "slice_offsets", 1);
    expand.num_slices = offsets.sizes[0] - 1;
    if (expand.num_slices < 1 || expand.slice_offsets[0] != 0 ||
        expand.slice_offsets[expand.num_slices] != expand.n)
        fail("slice_offsets: must run from 0 to b_stack's columns");
    for (int64_t p = 0; p < expand.num_slices; ++p) {
        if (expand.slice_offsets[p + 1] < expand.slice_offsets[p])
            fail("slice_offsets: must not decrease");
    }
    expand.scales = dense<float>(scales, "scales", {num_slots, expand.num_slices});
    expand.magnitude_ratio =
        ratio ? dense<float>(*ratio, "magnitude_ratio", {num_slots, expand.n}) : nullptr;
    a_stack = nullptr;
    k = 0;
    if (a) {
        bool a_bf16 = false;
        const int64_t rows = expand.num_slices * expand.rank;
        a_stack = llama_ops::dense_weights(*a, "a_stack", {num_slots, rows, -1}, &a_bf16);
        if (a_bf16 != b_bf16) fail("a_stack: expected b_stack's dtype");
        k = a->sizes[2];
    }
}

ProjectionLoRA::ProjectionLoRA(py::object a, py::object b, py::object offsets, py::object scales,
                               std::optional<py::object> ratio)
    : ProjectionLoRA(view_of(a, "a_stack"), view_of(b, "b_stack"),
                     view_of(offsets, "slice_offsets"), view_of(scales, "scales"),
                     ratio && !ratio->is_none()
                         ? std::optional<TensorView>(view_of(*ratio, "magnitude_ratio"))
                         : std::nullopt) {
    owners = py::make_tuple(a, b, offsets, scales, ratio ? *ratio : py::none());
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

}  // namespace lora

void register_lora(py::module_& m) {
    using llama_ops::TensorView;
    using llama_ops::dense;
    using namespace pybind11::literals;
    using OptionalView = std::optional<TensorView>;
    py::class_<lora::StepSegments>(m, "LoRASegments",
                                   "A step's adapter segments, checked once (kernels.LoRAMapping).")
        .def(py::init<py::object, py::object>(), "seg_indptr"_a, "seg_slots"_a);
    py::class_<lora::ProjectionLoRA>(m, "LoRAProjection",
                                     "One projection's stacked adapters (kernels.LoRAStack).")
        .def(py::init<py::object, py::object, py::object, py::object,
                      std::optional<py::object>>(),
             "a_stack"_a, "b_stack"_a, "slice_offsets"_a, "scales"_a, "magnitude_ratio"_a);
    m.def("lora_isa", [](const std::string& isa) { return lora::isa_name(lora::parse_isa(isa)); },
          "isa"_a = "auto",
          "The instruction set the LoRA kernels run for `isa` (auto: the best this CPU runs): "
          "avx512, avx2 or scalar. ValueError for one this CPU lacks.");
    // Every tensor is checked (device, dtype, shape, layout, segment values) before the GIL
    // is released and any memory is written. isa: as lora_isa takes it (the tests run each
    // instruction set's kernels on one machine).
    m.def("lora_shrink", [](const TensorView& x, const TensorView& a_stack,
                            const TensorView& seg_indptr, const TensorView& seg_slots,
                            const TensorView& h, const std::string& isa) {
              const lora::Isa instruction_set = lora::parse_isa(isa);
              bool bf16 = false;
              const void* a = llama_ops::dense_weights(a_stack, "a_stack", {-1, -1, -1}, &bf16);
              const int64_t rows = a_stack.sizes[1], k = a_stack.sizes[2];
              const float* x_rows = dense<float>(x, "x", {-1, k});
              float* h_rows = dense<float>(h, "h", {x.sizes[0], rows});
              const lora::StepSegments step(seg_indptr, seg_slots, x.sizes[0]);
              lora::require_slots(step, a_stack.sizes[0]);
              py::gil_scoped_release release;
              lora::shrink(step.segments, x_rows, k, a, bf16 ? lora::WeightType::kBFloat16
                                                            : lora::WeightType::kFloat32,
                           rows, h_rows, instruction_set);
          },
          "x"_a, "a_stack"_a, "seg_indptr"_a, "seg_slots"_a, "h"_a, "isa"_a = "auto",
          "h [T, rows] = x [T, k] @ a_stack[slot]^T per segment of tokens (a_stack [slots, "
          "rows, k], float32 or bfloat16; seg_indptr int32 [S + 1], seg_slots int32 [S], slot "
          "-1: zero rows).");
    m.def("lora_expand", [](const TensorView& y, const TensorView& h, const TensorView& b_stack,
                            const TensorView& slice_offsets, const TensorView& scales,
                            const OptionalView& magnitude_ratio, const TensorView& seg_indptr,
                            const TensorView& seg_slots, const std::string& isa) {
              const lora::Isa instruction_set = lora::parse_isa(isa);
              const lora::ProjectionLoRA w(std::nullopt, b_stack, slice_offsets, scales,
                                           magnitude_ratio);
              float* y_rows = dense<float>(y, "y", {-1, w.expand.n});
              const float* h_rows = dense<float>(h, "h", {y.sizes[0], -1});
              const int64_t needed = w.expand.num_slices * w.expand.rank;
              if (h.sizes[1] < needed)
                  llama_ops::fail("h: expected at least " + std::to_string(needed) + " columns");
              const lora::StepSegments step(seg_indptr, seg_slots, y.sizes[0]);
              lora::require_slots(step, w.num_slots);
              py::gil_scoped_release release;
              lora::expand(step.segments, h_rows, h.sizes[1], w.expand, y_rows,
                           instruction_set);
          },
          "y"_a, "h"_a, "b_stack"_a, "slice_offsets"_a, "scales"_a, "magnitude_ratio"_a,
          "seg_indptr"_a, "seg_slots"_a, "isa"_a = "auto",
          "In place: y = ratio * (y + scale * h[:, slice's rank columns] @ b_stack[slot]) per "
          "segment and output slice (b_stack [slots, rank, n], slice_offsets int64 [P + 1], "
          "scales float32 [slots, P], magnitude_ratio float32 [slots, n] or None; slot -1: y "
          "kept).");
    m.def("lora_add", [](const TensorView& y, const TensorView& x, const TensorView& a_stack,
                         const TensorView& b_stack, const TensorView& slice_offsets,
                         const TensorView& scales, const OptionalView& magnitude_ratio,
                         const TensorView& seg_indptr, const TensorView& seg_slots,
                         const std::string& isa) {
              const lora::Isa instruction_set = lora::parse_isa(isa);
              const lora::ProjectionLoRA w(a_stack, b_stack, slice_offsets, scales,
                                           magnitude_ratio);
              float* y_rows = dense<float>(y, "y", {-1, w.expand.n});
              const float* x_rows = dense<float>(x, "x", {y.sizes[0], w.k});
              const lora::StepSegments step(seg_indptr, seg_slots, y.sizes[0]);
              lora::require_slots(step, w.num_slots);
              py::gil_scoped_release release;
              lora::add(step.segments, x_rows, w, y_rows, instruction_set);
          },
          "y"_a, "x"_a, "a_stack"_a, "b_stack"_a, "slice_offsets"_a, "scales"_a,
          "magnitude_ratio"_a, "seg_indptr"_a, "seg_slots"_a, "isa"_a = "auto",
          "lora_shrink then lora_expand in one call: y += the adapters' delta of x, in place "
          "(a_stack [slots, P * rank, k] and b_stack of one dtype).");
}
