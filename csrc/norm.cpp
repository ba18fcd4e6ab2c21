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

LLAMA_SIMD_CLONES
void silu_and_mul_row(const float* gate, const float* up, int64_t width, float* out) {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
        const float g = gate[i];
        out[i] = g / (1.0f + exp_f32(-g)) * up[i];
    }
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
    parallel_for(rows, worth_threading(rows * width), [&](int64_t r) {
        const float* gate = gate_up + r * 2 * width;
        silu_and_mul_row(gate, gate + width, width, out + r * width);
    });
}

}  // namespace llama_ops

void register_norm(py::module_& m) {
    using namespace llama_ops;
    // Tensors are passed as addresses (data_ptr()), checked by llama_engine/kernels/cpu/ops.py.
    m.def("rms_norm", [](std::uintptr_t x, std::uintptr_t weight, float eps,
                         std::uintptr_t residual, std::uintptr_t out,
                         std::uintptr_t new_residual, int64_t tokens, int64_t hidden) {
              py::gil_scoped_release release;
              rms_norm_rows(tensor_at<const float>(x), tensor_at<const float>(weight), eps,
                            tensor_at<const float>(residual), tensor_at<float>(out),
                            tensor_at<float>(new_residual), tokens, hidden);
          },
          py::arg("x"), py::arg("weight"), py::arg("eps"), py::arg("residual"), py::arg("out"),
          py::arg("new_residual"), py::arg("tokens"), py::arg("hidden"),
          "out = rmsnorm(x + residual) * weight over [tokens, hidden]; writes x + residual to "
          "new_residual when a residual is given (residual = new_residual = 0: none).");
    m.def("rope", [](std::uintptr_t q, int64_t q_stride, int64_t q_heads, std::uintptr_t k,
                     int64_t k_stride, int64_t k_heads, int64_t tokens, int64_t head_dim,
                     std::uintptr_t positions, std::uintptr_t cos_sin, int64_t max_pos) {
              check_positions(tensor_at<const int64_t>(positions), tokens, max_pos);
              py::gil_scoped_release release;
              rope_rows(tensor_at<float>(q), q_stride, q_heads, tensor_at<float>(k), k_stride,
                        k_heads, tokens, head_dim, tensor_at<const int64_t>(positions),
                        tensor_at<const float>(cos_sin));
          },
          py::arg("q"), py::arg("q_stride"), py::arg("q_heads"), py::arg("k"),
          py::arg("k_stride"), py::arg("k_heads"), py::arg("tokens"), py::arg("head_dim"),
          py::arg("positions"), py::arg("cos_sin"), py::arg("max_pos"),
          "Rotary embedding in place on q [T, H, D] and k [T, Hkv, D] (tokens q_stride / "
          "k_stride elements apart), positions int64 [T], cos_sin [max_pos, D].");
    m.def("silu_and_mul", [](std::uintptr_t gate_up, std::uintptr_t out, int64_t rows,
                             int64_t width) {
              py::gil_scoped_release release;
              silu_and_mul_rows(tensor_at<const float>(gate_up), tensor_at<float>(out), rows,
                                width);
          },
          py::arg("gate_up"), py::arg("out"), py::arg("rows"), py::arg("width"),
          "out [rows, width] = silu(gate_up[:, :width]) * gate_up[:, width:].");
}
