// Element-wise hot ops of a transformer block: RMSNorm with the residual add fused in front,
// rotary embedding (in place) and the SwiGLU activation. Threads split the tokens.
#include <cmath>
#include <optional>

#include <pybind11/stl.h>

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

void rms_norm(py::array x, py::array weight, float eps, std::optional<py::array> residual,
              py::array out, std::optional<py::array> new_residual) {
    const float* x_data = dense<float>(x, "x", 2);
    const int64_t tokens = x.shape(0), hidden = x.shape(1);
    const float* w = dense<float>(weight, "weight", 1);
    if (weight.shape(0) != hidden) fail("weight: length must equal the hidden size");
    float* out_data = dense_mutable<float>(out, "out", 2);
    if (out.shape(0) != tokens || out.shape(1) != hidden) fail("out: shape must match x");
    const float* res_data = nullptr;
    float* new_res_data = nullptr;
    if (residual.has_value() != new_residual.has_value()) {
        fail("residual and new_residual come together");
    }
    if (residual.has_value()) {
        res_data = dense<float>(*residual, "residual", 2);
        new_res_data = dense_mutable<float>(*new_residual, "new_residual", 2);
        if (residual->shape(0) != tokens || residual->shape(1) != hidden ||
            new_residual->shape(0) != tokens || new_residual->shape(1) != hidden) {
            fail("residual/new_residual: shape must match x");
        }
    }
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) if (worth_threading(tokens * hidden))
    for (int64_t t = 0; t < tokens; ++t) {
        const int64_t offset = t * hidden;
        rms_norm_row(x_data + offset, res_data ? res_data + offset : nullptr, w, eps, hidden,
                     out_data + offset, new_res_data ? new_res_data + offset : nullptr);
    }
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

void rope(py::array q, py::array k, py::array positions, py::array cos_sin) {
    const TokenRows<float> q_rows = token_rows<float>(q, "q", 3);
    const TokenRows<float> k_rows = token_rows<float>(k, "k", 3);
    const int64_t head_dim = q.shape(2);
    if (k.shape(2) != head_dim || head_dim % 2 != 0) fail("q/k: same even head dim expected");
    if (k_rows.tokens != q_rows.tokens) fail("q/k: same number of tokens expected");
    const int64_t* pos = dense<int64_t>(positions, "positions", 1);
    if (positions.shape(0) != q_rows.tokens) fail("positions: one per token expected");
    const float* table = dense<float>(cos_sin, "cos_sin", 2);
    const int64_t max_pos = cos_sin.shape(0);
    if (cos_sin.shape(1) != head_dim) fail("cos_sin: width must equal the head dim");
    for (int64_t t = 0; t < q_rows.tokens; ++t) {
        if (pos[t] < 0 || pos[t] >= max_pos) fail("positions: outside the cos/sin table");
    }
    const int64_t q_heads = q.shape(1), k_heads = k.shape(1), tokens = q_rows.tokens;
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) if (worth_threading(tokens * (q_heads + k_heads) * head_dim))
    for (int64_t t = 0; t < tokens; ++t) {
        const float* angles = table + pos[t] * head_dim;
        rope_token(q_rows.row(t), q_heads, head_dim, angles);
        rope_token(k_rows.row(t), k_heads, head_dim, angles);
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

void silu_and_mul(py::array gate_up, py::array out) {
    const float* in = dense<float>(gate_up, "gate_up", 2);
    const int64_t rows = gate_up.shape(0), width = gate_up.shape(1) / 2;
    if (gate_up.shape(1) % 2 != 0) fail("gate_up: last dim must be even");
    float* out_data = dense_mutable<float>(out, "out", 2);
    if (out.shape(0) != rows || out.shape(1) != width) fail("out: shape must be [rows, F]");
    py::gil_scoped_release release;
#pragma omp parallel for schedule(static) if (worth_threading(rows * width))
    for (int64_t r = 0; r < rows; ++r) {
        const float* gate = in + r * 2 * width;
        silu_and_mul_row(gate, gate + width, width, out_data + r * width);
    }
}

}  // namespace

void register_norm(py::module_& m) {
    m.def("rms_norm", &rms_norm, py::arg("x"), py::arg("weight"), py::arg("eps"),
          py::arg("residual"), py::arg("out"), py::arg("new_residual"),
          "out = rmsnorm(x + residual) * weight over [T, hidden]; writes x + residual to "
          "new_residual when a residual is given.");
    m.def("rope", &rope, py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("cos_sin"),
          "Rotary embedding in place on q [T, H, D] and k [T, Hkv, D] (token dim may be "
          "strided), positions int64 [T], cos_sin [max_pos, D].");
    m.def("silu_and_mul", &silu_and_mul, py::arg("gate_up"), py::arg("out"),
          "out [R, F] = silu(gate_up[:, :F]) * gate_up[:, F:].");
}
