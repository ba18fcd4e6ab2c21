// Element-wise hot ops of a transformer block: RMSNorm with the residual add fused in front,
// rotary embedding (in place) and the SwiGLU activation. Threads split the tokens.
#include <cmath>

#include "ops_common.h"
#include "registry.h"

namespace py = pybind11;
using namespace llama_ops;

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

// x, out [tokens, hidden] and weight [hidden], dense float32; residual and new_residual are
// both 0 (no residual) or both dense float32 [tokens, hidden].
void rms_norm(std::uintptr_t x, std::uintptr_t weight, float eps, std::uintptr_t residual,
              std::uintptr_t out, std::uintptr_t new_residual, int64_t tokens, int64_t hidden) {
    const float* x_data = tensor_at<const float>(x);
    const float* w = tensor_at<const float>(weight);
    const float* res_data = tensor_at<const float>(residual);
    float* out_data = tensor_at<float>(out);
    float* new_res_data = tensor_at<float>(new_residual);
    py::gil_scoped_release release;
    parallel_for(tokens, worth_threading(tokens * hidden), [&](int64_t t) {
        const int64_t offset = t * hidden;
        rms_norm_row(x_data + offset, res_data ? res_data + offset : nullptr, w, eps, hidden,
                     out_data + offset, new_res_data ? new_res_data + offset : nullptr);
    });
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

// q [tokens, q_heads, head_dim] and k [tokens, k_heads, head_dim] float32, each token's
// heads dense, tokens q_stride / k_stride elements apart; positions int64 [tokens];
// cos_sin dense float32 [max_pos, head_dim].
void rope(std::uintptr_t q, int64_t q_stride, int64_t q_heads, std::uintptr_t k,
          int64_t k_stride, int64_t k_heads, int64_t tokens, int64_t head_dim,
          std::uintptr_t positions, std::uintptr_t cos_sin, int64_t max_pos) {
    const TokenRows<float> q_rows{tensor_at<float>(q), tokens, q_stride, q_heads * head_dim};
    const TokenRows<float> k_rows{tensor_at<float>(k), tokens, k_stride, k_heads * head_dim};
    const int64_t* pos = tensor_at<const int64_t>(positions);
    const float* table = tensor_at<const float>(cos_sin);
    for (int64_t t = 0; t < tokens; ++t) {
        if (pos[t] < 0 || pos[t] >= max_pos) fail("positions: outside the cos/sin table");
    }
    py::gil_scoped_release release;
    const int64_t elements = tokens * (q_heads + k_heads) * head_dim;
    parallel_for(tokens, worth_threading(elements), [&](int64_t t) {
        const float* angles = table + pos[t] * head_dim;
        rope_token(q_rows.row(t), q_heads, head_dim, angles);
        rope_token(k_rows.row(t), k_heads, head_dim, angles);
    });
}

LLAMA_SIMD_CLONES
void silu_and_mul_row(const float* gate, const float* up, int64_t width, float* out) {
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
        const float g = gate[i];
        out[i] = g / (1.0f + exp_f32(-g)) * up[i];
    }
}

// gate_up dense float32 [rows, 2 * width], out dense float32 [rows, width].
void silu_and_mul(std::uintptr_t gate_up, std::uintptr_t out, int64_t rows, int64_t width) {
    const float* in = tensor_at<const float>(gate_up);
    float* out_data = tensor_at<float>(out);
    py::gil_scoped_release release;
    parallel_for(rows, worth_threading(rows * width), [&](int64_t r) {
        const float* gate = in + r * 2 * width;
        silu_and_mul_row(gate, gate + width, width, out_data + r * width);
    });
}

}  // namespace

void register_norm(py::module_& m) {
    // Tensors are passed as addresses (data_ptr()), checked by llama_engine/kernels/cpu/ops.py.
    m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"),
          py::arg("residual"), py::arg("out"), py::arg("new_residual"), py::arg("tokens"),
          py::arg("hidden"),
          "out = rmsnorm(x + residual) * weight over [tokens, hidden]; writes x + residual to "
          "new_residual when a residual is given (residual = new_residual = 0: none).");
    m.def("rope", &rope, py::arg("q"), py::arg("q_stride"), py::arg("q_heads"), py::arg("k"),
          py::arg("k_stride"), py::arg("k_heads"), py::arg("tokens"), py::arg("head_dim"),
          py::arg("positions"), py::arg("cos_sin"), py::arg("max_pos"),
          "Rotary embedding in place on q [T, H, D] and k [T, Hkv, D] (tokens q_stride / "
          "k_stride elements apart), positions int64 [T], cos_sin [max_pos, D].");
    m.def("silu_and_mul", &silu_and_mul, py::arg("gate_up"), py::arg("out"), py::arg("rows"),
          py::arg("width"), "out [rows, width] = silu(gate_up[:, :width]) * gate_up[:, width:].");
}
