// The two fused halves of a decoder block around attention, for packed weights on the CPU.
// At decode each op of a block is a few microseconds of work, about what one Python call
// into the extension costs, so the chain before attention (RMSNorm -> QKV projection ->
// RoPE) and the one after it (output projection -> RMSNorm -> SwiGLU MLP) run as one call
// each. The ops are the same kernels the unfused bindings run, so results are identical.
#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu_ops.h"
#include "ops_common.h"
#include "registry.h"

namespace py = pybind11;
using namespace llama_ops;

namespace {

// A packed weight as the bindings receive it: address, [rows, row_bytes], format.
struct PackedArg {
    std::uintptr_t data;
    int64_t rows;
    int64_t row_bytes;
    std::string qtype;
};

// y [M, N] = x [M, K] @ w^T, checking the packed layout first.
void matmul(const PackedArg& w, const float* x, int64_t M, int64_t K, int64_t N, float* y,
            bool int8_activations) {
    quant::packed_matmul(x, static_cast<int>(M), static_cast<int>(K),
                         tensor_at<const uint8_t>(w.data), w.qtype, static_cast<int>(N), y, 0,
                         int8_activations && w.qtype != "NF4");
}

void check(const PackedArg& w, int64_t N, int64_t K) {
    quant::check_packed_shape(w.rows, w.row_bytes, w.qtype, static_cast<int>(N),
                              static_cast<int>(K));
}

// Per-thread scratch for intermediates (grown, never shrunk: decode reuses it every layer).
float* scratch(std::vector<float>& buffer, int64_t elements) {
    if (static_cast<int64_t>(buffer.size()) < elements) buffer.resize(elements);
    return buffer.data();
}

// x [T, C] (+ residual, may be 0) -> normed -> qkv = normed @ wqkv^T -> RoPE on q and k;
// writes q [T, H, D], k and v [T, Hkv, D], and x + residual to new_residual (when given).
void qkv_projection(std::uintptr_t x, std::uintptr_t residual, std::uintptr_t norm_weight,
                    float eps, std::uintptr_t new_residual, const PackedArg& wqkv,
                    std::uintptr_t positions, std::uintptr_t cos_sin, int64_t max_pos,
                    std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, int64_t tokens,
                    int64_t hidden, int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                    bool int8_activations) {
    const int64_t q_width = q_heads * head_dim, kv_width = kv_heads * head_dim;
    const int64_t qkv_width = q_width + 2 * kv_width;
    check(wqkv, qkv_width, hidden);
    const int64_t* pos = tensor_at<const int64_t>(positions);
    check_positions(pos, tokens, max_pos);
    py::gil_scoped_release release;
    thread_local std::vector<float> normed_buffer, qkv_buffer;
    float* normed = scratch(normed_buffer, tokens * hidden);
    float* qkv = scratch(qkv_buffer, tokens * qkv_width);
    rms_norm_rows(tensor_at<const float>(x), tensor_at<const float>(norm_weight), eps,
                  tensor_at<const float>(residual), normed, tensor_at<float>(new_residual),
                  tokens, hidden);
    matmul(wqkv, normed, tokens, hidden, qkv_width, qkv, int8_activations);
    rope_rows(qkv, qkv_width, q_heads, qkv + q_width, qkv_width, kv_heads, tokens, head_dim,
              pos, tensor_at<const float>(cos_sin));
    float* q_out = tensor_at<float>(q);
    float* k_out = tensor_at<float>(k);
    float* v_out = tensor_at<float>(v);
    for (int64_t t = 0; t < tokens; ++t) {
        const float* row = qkv + t * qkv_width;
        std::memcpy(q_out + t * q_width, row, q_width * sizeof(float));
        std::memcpy(k_out + t * kv_width, row + q_width, kv_width * sizeof(float));
        std::memcpy(v_out + t * kv_width, row + q_width + kv_width, kv_width * sizeof(float));
    }
}

// attn [T, A] -> h = attn @ wo^T -> normed = rmsnorm(h + residual) -> out = down(silu(gate)
// * up) with gate_up = normed @ w_gate_up^T; writes out [T, C] and h + residual to
// new_residual.
void block_output(std::uintptr_t attn, int64_t attn_width, std::uintptr_t residual,
                  const PackedArg& wo, std::uintptr_t norm_weight, float eps,
                  const PackedArg& w_gate_up, const PackedArg& w_down, std::uintptr_t out,
                  std::uintptr_t new_residual, int64_t tokens, int64_t hidden,
                  int64_t ffn_width, bool int8_activations) {
    check(wo, hidden, attn_width);
    check(w_gate_up, 2 * ffn_width, hidden);
    check(w_down, hidden, ffn_width);
    py::gil_scoped_release release;
    thread_local std::vector<float> h_buffer, normed_buffer, gate_up_buffer, act_buffer;
    float* h = scratch(h_buffer, tokens * hidden);
    float* normed = scratch(normed_buffer, tokens * hidden);
    float* gate_up = scratch(gate_up_buffer, tokens * 2 * ffn_width);
    float* act = scratch(act_buffer, tokens * ffn_width);
    matmul(wo, tensor_at<const float>(attn), tokens, attn_width, hidden, h, int8_activations);
    rms_norm_rows(h, tensor_at<const float>(norm_weight), eps, tensor_at<const float>(residual),
                  normed, tensor_at<float>(new_residual), tokens, hidden);
    matmul(w_gate_up, normed, tokens, hidden, 2 * ffn_width, gate_up, int8_activations);
    silu_and_mul_rows(gate_up, act, tokens, ffn_width);
    matmul(w_down, act, tokens, ffn_width, hidden, tensor_at<float>(out), int8_activations);
}

PackedArg packed_arg(const py::tuple& t) {
    if (t.size() != 4) fail("packed weight: expected (address, rows, row_bytes, qtype)");
    return {t[0].cast<std::uintptr_t>(), t[1].cast<int64_t>(), t[2].cast<int64_t>(),
            t[3].cast<std::string>()};
}

}  // namespace

void register_block(py::module_& m) {
    // Tensors are addresses (data_ptr()), packed weights (address, rows, row_bytes, qtype)
    // tuples; llama_engine/kernels/cpu/block.py checks dtypes and shapes.
    m.def("qkv_projection", [](std::uintptr_t x, std::uintptr_t residual,
                               std::uintptr_t norm_weight, float eps,
                               std::uintptr_t new_residual, const py::tuple& wqkv,
                               std::uintptr_t positions, std::uintptr_t cos_sin,
                               int64_t max_pos, std::uintptr_t q, std::uintptr_t k,
                               std::uintptr_t v, int64_t tokens, int64_t hidden,
                               int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                               bool int8_activations) {
              qkv_projection(x, residual, norm_weight, eps, new_residual, packed_arg(wqkv),
                             positions, cos_sin, max_pos, q, k, v, tokens, hidden, q_heads,
                             kv_heads, head_dim, int8_activations);
          },
          "RMSNorm (residual add fused) -> QKV projection -> RoPE, into q, k, v.");
    m.def("block_output", [](std::uintptr_t attn, int64_t attn_width, std::uintptr_t residual,
                             const py::tuple& wo, std::uintptr_t norm_weight, float eps,
                             const py::tuple& w_gate_up, const py::tuple& w_down,
                             std::uintptr_t out, std::uintptr_t new_residual, int64_t tokens,
                             int64_t hidden, int64_t ffn_width, bool int8_activations) {
              block_output(attn, attn_width, residual, packed_arg(wo), norm_weight, eps,
                           packed_arg(w_gate_up), packed_arg(w_down), out, new_residual,
                           tokens, hidden, ffn_width, int8_activations);
          },
          "Output projection -> RMSNorm (residual add fused) -> SwiGLU MLP, into out.");
}
