// Element-wise hot ops of a decoder layer: RMSNorm with the residual add fused in front,
// rotary embedding (in place) and the SwiGLU activation. Threads split the tokens.
#include <cmath>

#include "cpu_ops.h"
#include "ops_common.h"
#include "registry.h"

namespace py = pybind11;

namespace llama_ops {
namespace {

// One token: new_residual = x + residual (skipped when residual is null), then
// out = new_residual * rsqrt(mean(new_residual^2) + eps) * weight.
LLAMA_SIMD_CLONES
void rms_norm_row(const float* x, const float* residual, const float* weight, float eps,
                  int64_t hidden, float* out, float* new_residual) {
    const float* summed = x;
    if (residual != nullptr) {
#pragma omp simd
        for (int64_t i = 0; i < hidden; ++i) new_residual[i] = x[i] + residual[i];
        summed = new_residual;
    }
    float sum_sq = 0.0f;
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t i = 0; i < hidden; ++i) sum_sq += summed[i] * summed[i];
    const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(hidden) + eps);
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) out[i] = summed[i] * inv_rms * weight[i];
}

// Rotates every head of one token in place, "rotate half" convention: the pair
// (x[i], x[i + half]) turns by the angle whose cos/sin sit at cos_sin[i], cos_sin[half + i].
LLAMA_SIMD_CLONES
void rope_token(float* heads, int64_t num_heads, int64_t head_dim, const float* cos_sin) {
    const int64_t half = head_dim / 2;
    const float* cos = cos_sin;
    const float* sin = cos_sin + half;
    for (int64_t h = 0; h < num_heads; ++h) {
        float* x1 = heads + h * head_dim;
        float* x2 = x1 + half;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
            const float a = x1[i], b = x2[i];
            x1[i] = a * cos[i] - b * sin[i];
            x2[i] = b * cos[i] + a * sin[i];
        }
    }
}

// T: float, or uint16_t for bfloat16 (its bits): the math is float32 either way, each
// result rounded once to T.
template <class T>
ALWAYS_INLINE void silu_and_mul_row_of(const T* gate, const T* up, int64_t width, T* out) {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
        const float g = widen(gate[i]);
        narrow(g / (1.0f + exp_f32(-g)) * widen(up[i]), out + i);
    }
}

LLAMA_SIMD_CLONES
void silu_and_mul_row(const float* gate, const float* up, int64_t width, float* out) {
    silu_and_mul_row_of(gate, up, width, out);
}

LLAMA_SIMD_CLONES
void silu_and_mul_row(const uint16_t* gate, const uint16_t* up, int64_t width, uint16_t* out) {
    silu_and_mul_row_of(gate, up, width, out);
}

// SwiGLU's gradient for one token: with s = sigmoid(g), silu(g) = g s and
// silu'(g) = s (1 + g (1 - s)): d_gate = dy * up * silu'(g), d_up = dy * silu(g).
template <class T>
ALWAYS_INLINE void silu_and_mul_backward_row_of(const T* gate, const T* up, const T* grad_out,
                                                int64_t width, T* grad_gate, T* grad_up) {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
        const float g = widen(gate[i]), dy = widen(grad_out[i]);
        const float s = 1.0f / (1.0f + exp_f32(-g));
        narrow(dy * widen(up[i]) * s * (1.0f + g * (1.0f - s)), grad_gate + i);
        narrow(dy * g * s, grad_up + i);
    }
}

LLAMA_SIMD_CLONES
void silu_and_mul_backward_row(const float* gate, const float* up, const float* grad_out,
                               int64_t width, float* grad_gate, float* grad_up) {
    silu_and_mul_backward_row_of(gate, up, grad_out, width, grad_gate, grad_up);
}

LLAMA_SIMD_CLONES
void silu_and_mul_backward_row(const uint16_t* gate, const uint16_t* up, const uint16_t* grad_out,
                               int64_t width, uint16_t* grad_gate, uint16_t* grad_up) {
    silu_and_mul_backward_row_of(gate, up, grad_out, width, grad_gate, grad_up);
}

template <class T>
void silu_and_mul_rows_of(const T* gate_up, T* out, int64_t rows, int64_t width) {
    parallel_for(rows, worth_threading(rows * width), [&](int64_t r) {
        const T* gate = gate_up + r * 2 * width;
        silu_and_mul_row(gate, gate + width, width, out + r * width);
    });
}

template <class T>
void silu_and_mul_backward_rows_of(const T* gate_up, const T* grad_out, T* grad_gate_up,
                                   int64_t rows, int64_t width) {
    parallel_for(rows, worth_threading(rows * width), [&](int64_t r) {
        const T* gate = gate_up + r * 2 * width;
        T* grad_gate = grad_gate_up + r * 2 * width;
        silu_and_mul_backward_row(gate, gate + width, grad_out + r * width, width, grad_gate,
                                  grad_gate + width);
    });
}

// F of gate_up [..., 2F] (a ValueError for an odd last dim).
int64_t swiglu_width(int64_t gate_up_width) {
    if (gate_up_width % 2 != 0) {
        fail("gate_up: last dim must be even, got " + std::to_string(gate_up_width));
    }
    return gate_up_width / 2;
}

// silu_and_mul (and its gradient, `backward`) over gate_up [..., 2F] of T, out [..., F] of T,
// checked here before the GIL is released.
template <class T>
void silu_and_mul_checked(const TensorView& gate_up, const TensorView& out) {
    const TokenRows<T> rows = dense_rows<T>(gate_up, "gate_up");
    const int64_t width = swiglu_width(rows.width);
    T* out_rows = dense_like<T>(out, "out", gate_up, width);
    py::gil_scoped_release release;
    silu_and_mul_rows_of<T>(rows.data, out_rows, rows.tokens, width);
}

template <class T>
void silu_and_mul_backward_checked(const TensorView& gate_up, const TensorView& grad_out,
                                   const TensorView& grad_gate_up) {
    const TokenRows<T> rows = dense_rows<T>(gate_up, "gate_up");
    const int64_t width = swiglu_width(rows.width);
    const T* grad = dense_like<T>(grad_out, "grad_out", gate_up, width);
    T* grad_rows = dense_like<T>(grad_gate_up, "grad_gate_up", gate_up);
    py::gil_scoped_release release;
    silu_and_mul_backward_rows_of<T>(rows.data, grad, grad_rows, rows.tokens, width);
}

}  // namespace

void rms_norm_rows(const float* x, const float* weight, float eps, const float* residual,
                   float* out, float* new_residual, int64_t tokens, int64_t hidden) {
    parallel_for(tokens, worth_threading(tokens * hidden), [&](int64_t t) {
        const int64_t offset = t * hidden;
        rms_norm_row(x + offset, residual ? residual + offset : nullptr, weight, eps, hidden,
                     out + offset, new_residual ? new_residual + offset : nullptr);
    });
}

void check_positions(const int64_t* positions, int64_t tokens, int64_t max_pos) {
    for (int64_t t = 0; t < tokens; ++t) {
        if (positions[t] < 0 || positions[t] >= max_pos) {
            fail("positions: outside the cos/sin table");
        }
    }
}

void rope_rows(float* q, int64_t q_stride, int64_t q_heads, float* k, int64_t k_stride,
               int64_t k_heads, int64_t tokens, int64_t head_dim, const int64_t* positions,
               const float* cos_sin) {
    const TokenRows<float> q_rows{q, tokens, q_stride, q_heads * head_dim};
    const TokenRows<float> k_rows{k, tokens, k_stride, k_heads * head_dim};
    const int64_t elements = tokens * (q_heads + k_heads) * head_dim;
    parallel_for(tokens, worth_threading(elements), [&](int64_t t) {
        const float* angles = cos_sin + positions[t] * head_dim;
        rope_token(q_rows.row(t), q_heads, head_dim, angles);
        rope_token(k_rows.row(t), k_heads, head_dim, angles);
    });
}

void silu_and_mul_rows(const float* gate_up, float* out, int64_t rows, int64_t width) {
    silu_and_mul_rows_of(gate_up, out, rows, width);
}

}  // namespace llama_ops

void register_norm(py::module_& m) {
    using namespace llama_ops;
    using namespace pybind11::literals;
    // Tensors arrive as views (views.h), checked here before the GIL is released.
    m.def("rms_norm", [](const TensorView& x, const TensorView& weight, float eps,
                         const std::optional<TensorView>& residual, const TensorView& out,
                         const std::optional<TensorView>& new_residual) {
              const TokenRows<float> rows = dense_rows<float>(x, "x");
              const float* w = dense<float>(weight, "weight", {rows.width});
              float* normed = dense_like<float>(out, "out", x);
              if (residual.has_value() != new_residual.has_value()) {
                  fail("new_residual: given exactly when residual is");
              }
              const float* res = residual ? dense_like<float>(*residual, "residual", x) : nullptr;
              float* new_res =
                  new_residual ? dense_like<float>(*new_residual, "new_residual", x) : nullptr;
              py::gil_scoped_release release;
              rms_norm_rows(rows.data, w, eps, res, normed, new_res, rows.tokens, rows.width);
          },
          "x"_a, "weight"_a, "eps"_a, "residual"_a, "out"_a, "new_residual"_a,
          "out = rmsnorm(x + residual) * weight over x float32 [..., hidden]; writes x + "
          "residual to new_residual when a residual is given (both None: no residual). All "
          "C-contiguous and shaped like x; weight float32 [hidden].");
    m.def("rope", [](const TensorView& q, const TensorView& k, const TensorView& positions,
                     const TensorView& cos_sin) {
              const TokenRows<float> q_rows = token_rows<float>(q, "q", -1, -1);
              const int64_t q_heads = q.sizes[1], head_dim = q.sizes[2];
              if (head_dim % 2 != 0) fail("q: head dim must be even, got " + std::to_string(head_dim));
              const TokenRows<float> k_rows = token_rows<float>(k, "k", -1, head_dim);
              if (k_rows.tokens != q_rows.tokens) fail("q/k: same number of tokens expected");
              const int64_t* pos = dense<int64_t>(positions, "positions", {q_rows.tokens});
              const float* table = dense<float>(cos_sin, "cos_sin", {-1, head_dim});
              check_positions(pos, q_rows.tokens, cos_sin.sizes[0]);
              py::gil_scoped_release release;
              rope_rows(q_rows.data, q_rows.stride, q_heads, k_rows.data, k_rows.stride,
                        k.sizes[1], q_rows.tokens, head_dim, pos, table);
          },
          "q"_a, "k"_a, "positions"_a, "cos_sin"_a,
          "Rotary embedding in place on float32 q [T, H, D] and k [T, Hkv, D] (each token's "
          "[H, D] dense, dim 0 any stride), positions int64 [T], cos_sin float32 [max_pos, D].");
    m.def("silu_and_mul", [](const TensorView& gate_up, const TensorView& out) {
              if (gate_up.dtype == DType::BFloat16) return silu_and_mul_checked<uint16_t>(gate_up, out);
              silu_and_mul_checked<float>(gate_up, out);
          },
          "gate_up"_a, "out"_a,
          "out [..., F] = silu(gate_up[..., :F]) * gate_up[..., F:] for C-contiguous float32 "
          "or bfloat16 gate_up [..., 2F] (float32 math), out of gate_up's dtype.");
    m.def("silu_and_mul_backward", [](const TensorView& gate_up, const TensorView& grad_out,
                                      const TensorView& grad_gate_up) {
              if (gate_up.dtype == DType::BFloat16) {
                  return silu_and_mul_backward_checked<uint16_t>(gate_up, grad_out, grad_gate_up);
              }
              silu_and_mul_backward_checked<float>(gate_up, grad_out, grad_gate_up);
          },
          "gate_up"_a, "grad_out"_a, "grad_gate_up"_a,
          "grad_gate_up [..., 2F] = the gradient of silu_and_mul at gate_up [..., 2F] given "
          "grad_out [..., F]; all C-contiguous, float32 or all bfloat16 (float32 math).");
}
