// Softmax cross-entropy over rows of logits (float32 or bfloat16) with its gradient in the
// same pass: the training loss's [tokens, vocab] chunk is read once from memory, its row's
// exponentials kept in a per-thread float32 buffer (a 49152-word vocabulary: 192 KiB, in
// L2) and the scaled gradient written once in the logits' dtype. Threads split the rows.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "ops_common.h"
#include "registry.h"
#include "views.h"

namespace py = pybind11;

namespace llama_ops {
namespace {

// One row: loss = logsumexp(logits) - logits[label]; grad (when given) = scale * (softmax -
// one_hot(label)). A negative label (ignored token) gives loss 0 and a zero gradient row.
template <class T>
ALWAYS_INLINE void cross_entropy_row_of(const T* logits, int64_t vocab, int64_t label,
                                        float scale, float* exps, T* grad, float* loss) {
    if (label < 0) {
        *loss = 0.0f;
        if (grad != nullptr) std::memset(grad, 0, sizeof(T) * vocab);
        return;
    }
    float max = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : max)
    for (int64_t i = 0; i < vocab; ++i) {
        const float x = widen(logits[i]);
        max = x > max ? x : max;
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < vocab; ++i) {
        const float e = exp_f32(widen(logits[i]) - max);
        exps[i] = e;
        sum += e;
    }
    *loss = max + std::log(sum) - widen(logits[label]);
    if (grad == nullptr) return;
    const float k = scale / sum;
#pragma omp simd
    for (int64_t i = 0; i < vocab; ++i) narrow(exps[i] * k, grad + i);
    narrow(exps[label] * k - scale, grad + label);
}

LLAMA_SIMD_CLONES
void cross_entropy_row(const float* logits, int64_t vocab, int64_t label, float scale,
                       float* exps, float* grad, float* loss) {
    cross_entropy_row_of(logits, vocab, label, scale, exps, grad, loss);
}

LLAMA_SIMD_CLONES
void cross_entropy_row(const uint16_t* logits, int64_t vocab, int64_t label, float scale,
                       float* exps, uint16_t* grad, float* loss) {
    cross_entropy_row_of(logits, vocab, label, scale, exps, grad, loss);
}

template <class T>
void cross_entropy_rows(const T* logits, const int64_t* labels, const float* scale, float* loss,
                        T* grad, int64_t rows, int64_t vocab) {
    parallel_for(rows, worth_threading(rows * vocab), [&](int64_t r) {
        thread_local std::vector<float> exps;
        exps.resize(static_cast<size_t>(vocab));
        cross_entropy_row(logits + r * vocab, vocab, labels[r], scale[r], exps.data(),
                          grad != nullptr ? grad + r * vocab : nullptr, loss + r);
    });
}

}  // namespace
}  // namespace llama_ops

void register_loss(py::module_& m) {
    using namespace llama_ops;
    using namespace pybind11::literals;
    m.def("cross_entropy", [](const TensorView& logits, const TensorView& labels,
                              const TensorView& scale, const TensorView& loss,
                              const std::optional<TensorView>& grad) {
              if (logits.ndim != 2) fail("logits: expected [rows, vocab]");
              const int64_t rows = logits.sizes[0], vocab = logits.sizes[1];
              bool bf16 = false;
              const void* data = dense_weights(logits, "logits", {rows, vocab}, &bf16);
              const int64_t* label = dense<int64_t>(labels, "labels", {rows});
              for (int64_t r = 0; r < rows; ++r) {
                  if (label[r] >= vocab) fail("labels: " + std::to_string(label[r]) + " is outside the vocabulary");
              }
              const float* s = dense<float>(scale, "scale", {rows});
              float* out = dense<float>(loss, "loss", {rows});
              void* grad_data = nullptr;
              if (grad) {
                  bool grad_bf16 = false;
                  grad_data = const_cast<void*>(dense_weights(*grad, "grad", {rows, vocab}, &grad_bf16));
                  if (grad_bf16 != bf16) fail("grad: expected the logits' dtype");
              }
              py::gil_scoped_release release;
              if (bf16) {
                  cross_entropy_rows(static_cast<const uint16_t*>(data), label, s, out,
                                     static_cast<uint16_t*>(grad_data), rows, vocab);
              } else {
                  cross_entropy_rows(static_cast<const float*>(data), label, s, out,
                                     static_cast<float*>(grad_data), rows, vocab);
              }
          },
          "logits"_a, "labels"_a, "scale"_a, "loss"_a, "grad"_a,
          "Per row of logits [rows, vocab] (float32 or bfloat16, C-contiguous): loss[r] = "
          "logsumexp(logits[r]) - logits[r, labels[r]] (0 where labels[r] < 0), and when grad "
          "(the logits' dtype and shape) is given, grad[r] = scale[r] * (softmax(logits[r]) - "
          "one_hot(labels[r])) (zero where labels[r] < 0). labels int64 [rows], scale and loss "
          "float32 [rows].");
}
