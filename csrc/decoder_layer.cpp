// Fused decoder-layer ops for packed weights on the CPU. At decode each op of a layer is a
// few microseconds of work, about what one Python call into the extension costs, so:
//   qkv_projection: RMSNorm -> QKV projection -> RoPE, one call;
//   o_proj_and_mlp:   output projection -> RMSNorm -> SwiGLU MLP, one call;
//   decoder_layer:  both, with the paged-KV store and attention between them, one call.
// They run the same kernel bodies as the unfused bindings (cpu_ops.h), so results are
// identical to calling the ops one by one.
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

PackedArg packed_arg(const py::tuple& t) {
    if (t.size() != 4) fail("packed weight: expected (address, rows, row_bytes, qtype)");
    return {t[0].cast<std::uintptr_t>(), t[1].cast<int64_t>(), t[2].cast<int64_t>(),
            t[3].cast<std::string>()};
}

void check(const PackedArg& w, int64_t N, int64_t K) {
    quant::check_packed_shape(w.rows, w.row_bytes, w.qtype, static_cast<int>(N),
                              static_cast<int>(K));
}

// y [M, N] = x [M, K] @ w^T (layout checked beforehand).
void matmul(const PackedArg& w, const float* x, int64_t M, int64_t K, int64_t N, float* y,
            bool int8_activations) {
    quant::packed_matmul(x, static_cast<int>(M), static_cast<int>(K),
                         tensor_at<const uint8_t>(w.data), w.qtype, static_cast<int>(N), y, 0,
                         int8_activations && w.qtype != "NF4");
}

struct LayerShape {
    int64_t tokens, hidden, q_heads, kv_heads, head_dim;
    int64_t q_width() const { return q_heads * head_dim; }
    int64_t kv_width() const { return kv_heads * head_dim; }
    int64_t qkv_width() const { return q_width() + 2 * kv_width(); }
};

// Per-thread scratch for intermediates (grown, never shrunk: decode reuses it every layer).
float* scratch(std::vector<float>& buffer, int64_t elements) {
    if (static_cast<int64_t>(buffer.size()) < elements) buffer.resize(elements);
    return buffer.data();
}

// x [T, C] (+ residual, may be null: then new_residual is not written) -> normed -> qkv ->
// RoPE on q and k; q [T, H, D], k and v [T, Hkv, D] dense.
void qkv_core(const float* x, const float* residual, const float* norm_weight, float eps,
              float* new_residual, const PackedArg& wqkv, const int64_t* positions,
              const float* cos_sin, float* q, float* k, float* v, const LayerShape& s,
              bool int8_activations) {
    thread_local std::vector<float> normed_buffer, qkv_buffer;
    float* normed = scratch(normed_buffer, s.tokens * s.hidden);
    float* qkv = scratch(qkv_buffer, s.tokens * s.qkv_width());
    rms_norm_rows(x, norm_weight, eps, residual, normed, new_residual, s.tokens, s.hidden);
    matmul(wqkv, normed, s.tokens, s.hidden, s.qkv_width(), qkv, int8_activations);
    rope_rows(qkv, s.qkv_width(), s.q_heads, qkv + s.q_width(), s.qkv_width(), s.kv_heads,
              s.tokens, s.head_dim, positions, cos_sin);
    for (int64_t t = 0; t < s.tokens; ++t) {
        const float* row = qkv + t * s.qkv_width();
        std::memcpy(q + t * s.q_width(), row, s.q_width() * sizeof(float));
        std::memcpy(k + t * s.kv_width(), row + s.q_width(), s.kv_width() * sizeof(float));
        std::memcpy(v + t * s.kv_width(), row + s.q_width() + s.kv_width(),
                    s.kv_width() * sizeof(float));
    }
}

// attn [T, A] -> h = attn @ wo^T -> normed = rmsnorm(h + residual) -> out = down(silu(gate)
// * up), gate_up = normed @ w_gate_up^T; out [T, C], h + residual into new_residual.
void output_core(const float* attn, int64_t attn_width, const float* residual,
                 const PackedArg& wo, const float* norm_weight, float eps,
                 const PackedArg& w_gate_up, const PackedArg& w_down, int64_t ffn_width,
                 float* out, float* new_residual, const LayerShape& s, bool int8_activations) {
    thread_local std::vector<float> h_buffer, normed_buffer, gate_up_buffer, act_buffer;
    float* h = scratch(h_buffer, s.tokens * s.hidden);
    float* normed = scratch(normed_buffer, s.tokens * s.hidden);
    float* gate_up = scratch(gate_up_buffer, s.tokens * 2 * ffn_width);
    float* act = scratch(act_buffer, s.tokens * ffn_width);
    matmul(wo, attn, s.tokens, attn_width, s.hidden, h, int8_activations);
    rms_norm_rows(h, norm_weight, eps, residual, normed, new_residual, s.tokens, s.hidden);
    matmul(w_gate_up, normed, s.tokens, s.hidden, 2 * ffn_width, gate_up, int8_activations);
    silu_and_mul_rows(gate_up, act, s.tokens, ffn_width);
    matmul(w_down, act, s.tokens, ffn_width, s.hidden, out, int8_activations);
}

void check_output_weights(const PackedArg& wo, const PackedArg& w_gate_up,
                          const PackedArg& w_down, int64_t attn_width, int64_t hidden,
                          int64_t ffn_width) {
    check(wo, hidden, attn_width);
    check(w_gate_up, 2 * ffn_width, hidden);
    check(w_down, hidden, ffn_width);
}

}  // namespace

void register_decoder_layer(py::module_& m) {
    // Tensors are addresses (data_ptr()), packed weights (address, rows, row_bytes, qtype)
    // tuples; llama_engine/kernels/cpu/decoder_layer.py checks dtypes and shapes. Checks that need
    // the data run here before the GIL is released (or, for the attention metadata, right
    // after: pybind11 re-acquires it while the exception unwinds).
    m.def("qkv_projection", [](std::uintptr_t x, std::uintptr_t residual,
                               std::uintptr_t norm_weight, float eps,
                               std::uintptr_t new_residual, const py::tuple& wqkv_arg,
                               std::uintptr_t positions, std::uintptr_t cos_sin,
                               int64_t max_pos, std::uintptr_t q, std::uintptr_t k,
                               std::uintptr_t v, int64_t tokens, int64_t hidden,
                               int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                               bool int8_activations) {
              const LayerShape s{tokens, hidden, q_heads, kv_heads, head_dim};
              const PackedArg wqkv = packed_arg(wqkv_arg);
              check(wqkv, s.qkv_width(), hidden);
              check_positions(tensor_at<const int64_t>(positions), tokens, max_pos);
              py::gil_scoped_release release;
              qkv_core(tensor_at<const float>(x), tensor_at<const float>(residual),
                       tensor_at<const float>(norm_weight), eps, tensor_at<float>(new_residual),
                       wqkv, tensor_at<const int64_t>(positions), tensor_at<const float>(cos_sin),
                       tensor_at<float>(q), tensor_at<float>(k), tensor_at<float>(v), s,
                       int8_activations);
          },
          "RMSNorm (residual add fused) -> QKV projection -> RoPE, into q, k, v.");
    m.def("o_proj_and_mlp", [](std::uintptr_t attn, int64_t attn_width, std::uintptr_t residual,
                             const py::tuple& wo_arg, std::uintptr_t norm_weight, float eps,
                             const py::tuple& w_gate_up_arg, const py::tuple& w_down_arg,
                             std::uintptr_t out, std::uintptr_t new_residual, int64_t tokens,
                             int64_t hidden, int64_t ffn_width, bool int8_activations) {
              const LayerShape s{tokens, hidden, 0, 0, 0};
              const PackedArg wo = packed_arg(wo_arg), w_gate_up = packed_arg(w_gate_up_arg),
                              w_down = packed_arg(w_down_arg);
              check_output_weights(wo, w_gate_up, w_down, attn_width, hidden, ffn_width);
              py::gil_scoped_release release;
              output_core(tensor_at<const float>(attn), attn_width,
                          tensor_at<const float>(residual), wo,
                          tensor_at<const float>(norm_weight), eps, w_gate_up, w_down,
                          ffn_width, tensor_at<float>(out), tensor_at<float>(new_residual), s,
                          int8_activations);
          },
          "Output projection -> RMSNorm (residual add fused) -> SwiGLU MLP, into out.");
    m.def("decoder_layer", [](std::uintptr_t x, std::uintptr_t residual,
                              std::uintptr_t attn_norm, std::uintptr_t ffn_norm, float eps,
                              const py::tuple& wqkv_arg, const py::tuple& wo_arg,
                              const py::tuple& w_gate_up_arg, const py::tuple& w_down_arg,
                              std::uintptr_t positions, std::uintptr_t cos_sin,
                              int64_t max_pos, std::uintptr_t k_cache, std::uintptr_t v_cache,
                              const py::tuple& step, std::uintptr_t out,
                              std::uintptr_t new_residual, int64_t tokens, int64_t hidden,
                              int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                              int64_t ffn_width, bool int8_activations) {
              // step: (num_blocks, block_size, slot_mapping, block_tables, max_blocks,
              //        context_lens, cu_seqlens_q, num_seqs, scale), the same every layer
              if (step.size() != 9) fail("step: expected the 9 paged-attention arguments");
              const int64_t num_blocks = step[0].cast<int64_t>();
              const int64_t block_size = step[1].cast<int64_t>();
              const auto slots = step[2].cast<std::uintptr_t>();
              const auto tables = step[3].cast<std::uintptr_t>();
              const int64_t max_blocks = step[4].cast<int64_t>();
              const auto lens = step[5].cast<std::uintptr_t>();
              const auto cu_seqlens = step[6].cast<std::uintptr_t>();
              const int64_t num_seqs = step[7].cast<int64_t>();
              const float scale = step[8].cast<float>();
              const LayerShape s{tokens, hidden, q_heads, kv_heads, head_dim};
              const PackedArg wqkv = packed_arg(wqkv_arg), wo = packed_arg(wo_arg),
                              w_gate_up = packed_arg(w_gate_up_arg),
                              w_down = packed_arg(w_down_arg);
              check(wqkv, s.qkv_width(), hidden);
              check_output_weights(wo, w_gate_up, w_down, s.q_width(), hidden, ffn_width);
              check_positions(tensor_at<const int64_t>(positions), tokens, max_pos);
              py::gil_scoped_release release;
              thread_local std::vector<float> mid_buffer, q_buffer, k_buffer, v_buffer,
                  attn_buffer;
              float* q = scratch(q_buffer, tokens * s.q_width());
              float* k = scratch(k_buffer, tokens * s.kv_width());
              float* v = scratch(v_buffer, tokens * s.kv_width());
              float* attn = scratch(attn_buffer, tokens * s.q_width());
              // x + residual between the two halves (x itself in the first layer)
              float* mid = residual ? scratch(mid_buffer, tokens * hidden) : nullptr;
              qkv_core(tensor_at<const float>(x), tensor_at<const float>(residual),
                       tensor_at<const float>(attn_norm), eps, mid, wqkv,
                       tensor_at<const int64_t>(positions), tensor_at<const float>(cos_sin), q,
                       k, v, s, int8_activations);
              const auto address = [](const float* p) { return reinterpret_cast<std::uintptr_t>(p); };
              store_kv(address(k), s.kv_width(), address(v), s.kv_width(), k_cache, v_cache,
                       slots, tokens, s.kv_width(), num_blocks * block_size);
              paged_attention(address(q), s.q_width(), tokens, q_heads, head_dim, k_cache,
                              v_cache, num_blocks, block_size, kv_heads, tables, max_blocks,
                              lens, cu_seqlens, num_seqs, scale, address(attn));
              output_core(attn, s.q_width(), mid ? mid : tensor_at<const float>(x), wo,
                          tensor_at<const float>(ffn_norm), eps, w_gate_up, w_down, ffn_width,
                          tensor_at<float>(out), tensor_at<float>(new_residual), s,
                          int8_activations);
          },
          "qkv_projection, store_kv + paged_attention over the layer's caches, then "
          "o_proj_and_mlp: one decoder layer.");
}
