// Fused decoder-layer ops for packed weights on the CPU. At decode each op of a layer is a
// few microseconds of work, about what one Python call into the extension costs, so:
//   qkv_projection: RMSNorm -> QKV projection -> RoPE, one call;
//   o_proj_and_mlp: output projection -> RMSNorm -> SwiGLU MLP, one call;
//   decoder_layer:  both, with the paged-KV store and attention between them, one call.
// They run the same kernel bodies as the unfused bindings (cpu_ops.h), so results are
// identical to calling the ops one by one. Every size comes from a checked view (views.h).
#include <cstring>
#include <vector>

#include "cpu_ops.h"
#include "lora.h"
#include "ops_common.h"
#include "registry.h"
#include "views.h"

namespace py = pybind11;
using namespace llama_ops;

namespace {

// y [M, N] = x [M, K] @ w^T (shapes checked beforehand).
void matmul(const PackedWeightView& w, const float* x, int64_t M, float* y,
            bool int8_activations) {
    quant::packed_matmul(x, static_cast<int>(M), static_cast<int>(w.cols), w.data, w.qtype,
                         static_cast<int>(w.rows), y, 0, int8_activations && w.qtype != "NF4");
}

struct LayerShape {
    int64_t tokens, hidden, q_heads, kv_heads, head_dim;
    int64_t q_width() const { return q_heads * head_dim; }
    int64_t kv_width() const { return kv_heads * head_dim; }
    int64_t qkv_width() const { return q_width() + 2 * kv_width(); }
};

// The step's adapters on a layer's four projections (each null where none applies), added
// to each projection's output right after its matmul.
struct LayerLoRA {
    const lora::Segments* segments = nullptr;
    const lora::ProjectionLoRA* qkv = nullptr;
    const lora::ProjectionLoRA* o = nullptr;
    const lora::ProjectionLoRA* gate_up = nullptr;
    const lora::ProjectionLoRA* down = nullptr;
};

// y += the adapters' update of x, for a projection that has adapters this step.
void add_lora(const LayerLoRA& adapters, const lora::ProjectionLoRA* weights, const float* x,
              float* y) {
    if (weights != nullptr) lora::add(*adapters.segments, x, *weights, y);
}

// Per-thread scratch for intermediates (grown, never shrunk: decode reuses it every layer).
float* scratch(std::vector<float>& buffer, int64_t elements) {
    if (static_cast<int64_t>(buffer.size()) < elements) buffer.resize(elements);
    return buffer.data();
}

// The inputs every token-wise op of a layer shares, checked against its shape.
struct TokenInputs {
    const float* x;
    const float* residual;  // null in the first layer
    const int64_t* positions;
    const float* cos_sin;
};

TokenInputs token_inputs(const TensorView& x, const std::optional<TensorView>& residual,
                         const TensorView& positions, const TensorView& cos_sin,
                         int64_t hidden, int64_t head_dim) {
    TokenInputs in;
    in.x = dense<float>(x, "x", {-1, hidden});
    const int64_t tokens = x.sizes[0];
    in.residual = residual ? dense<float>(*residual, "residual", {tokens, hidden}) : nullptr;
    in.positions = dense<int64_t>(positions, "positions", {tokens});
    in.cos_sin = dense<float>(cos_sin, "cos_sin", {-1, head_dim});
    check_positions(in.positions, tokens, cos_sin.sizes[0]);
    return in;
}

// x [T, C] (+ residual, may be null: then new_residual is not written) -> normed -> qkv ->
// RoPE on q and k; q [T, H, D], k and v [T, Hkv, D] dense.
void qkv_core(const TokenInputs& in, const float* norm_weight, float eps, float* new_residual,
              const PackedWeightView& wqkv, float* q, float* k, float* v, const LayerShape& s,
              bool int8_activations, const LayerLoRA& adapters = {}) {
    thread_local std::vector<float> normed_buffer, qkv_buffer;
    float* normed = scratch(normed_buffer, s.tokens * s.hidden);
    float* qkv = scratch(qkv_buffer, s.tokens * s.qkv_width());
    rms_norm_rows(in.x, norm_weight, eps, in.residual, normed, new_residual, s.tokens, s.hidden);
    matmul(wqkv, normed, s.tokens, qkv, int8_activations);
    add_lora(adapters, adapters.qkv, normed, qkv);
    rope_rows(qkv, s.qkv_width(), s.q_heads, qkv + s.q_width(), s.qkv_width(), s.kv_heads,
              s.tokens, s.head_dim, in.positions, in.cos_sin);
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
void output_core(const float* attn, const float* residual, const PackedWeightView& wo,
                 const float* norm_weight, float eps, const PackedWeightView& w_gate_up,
                 const PackedWeightView& w_down, float* out, float* new_residual,
                 int64_t tokens, bool int8_activations, const LayerLoRA& adapters = {}) {
    const int64_t hidden = wo.rows, ffn_width = w_down.cols;
    thread_local std::vector<float> h_buffer, normed_buffer, gate_up_buffer, act_buffer;
    float* h = scratch(h_buffer, tokens * hidden);
    float* normed = scratch(normed_buffer, tokens * hidden);
    float* gate_up = scratch(gate_up_buffer, tokens * 2 * ffn_width);
    float* act = scratch(act_buffer, tokens * ffn_width);
    matmul(wo, attn, tokens, h, int8_activations);
    add_lora(adapters, adapters.o, attn, h);
    rms_norm_rows(h, norm_weight, eps, residual, normed, new_residual, tokens, hidden);
    matmul(w_gate_up, normed, tokens, gate_up, int8_activations);
    add_lora(adapters, adapters.gate_up, normed, gate_up);
    silu_and_mul_rows(gate_up, act, tokens, ffn_width);
    matmul(w_down, act, tokens, out, int8_activations);
    add_lora(adapters, adapters.down, act, out);
}

// The output half's weights against each other: wo [C, A], w_gate_up [2F, C], w_down [C, F].
void check_output_weights(const PackedWeightView& wo, const PackedWeightView& w_gate_up,
                          const PackedWeightView& w_down, int64_t hidden) {
    wo.require_shape("wo", hidden, wo.cols);
    w_gate_up.require_shape("w_gate_up", 2 * w_down.cols, hidden);
    w_down.require_shape("w_down", hidden, w_down.cols);
}

void qkv_projection(const TensorView& x, const std::optional<TensorView>& residual,
                    const TensorView& norm_weight, float eps, const PackedWeightView& wqkv,
                    const TensorView& positions, const TensorView& cos_sin,
                    const TensorView& q, const TensorView& k, const TensorView& v,
                    const std::optional<TensorView>& new_residual, bool int8_activations) {
    const float* norm = dense<float>(norm_weight, "norm_weight", 1);
    const int64_t hidden = norm_weight.sizes[0];
    if (q.ndim != 3 || k.ndim != 3) fail("q/k: expected [T, H, D] outputs");
    const int64_t head_dim = q.sizes[2];
    const TokenInputs in = token_inputs(x, residual, positions, cos_sin, hidden, head_dim);
    const LayerShape s{x.sizes[0], hidden, q.sizes[1], k.sizes[1], head_dim};
    float* q_out = dense<float>(q, "q", {s.tokens, s.q_heads, head_dim});
    float* k_out = dense<float>(k, "k", {s.tokens, s.kv_heads, head_dim});
    float* v_out = dense<float>(v, "v", {s.tokens, s.kv_heads, head_dim});
    wqkv.require_shape("wqkv", s.qkv_width(), hidden);
    if (residual.has_value() != new_residual.has_value()) {
        fail("new_residual: given exactly when residual is");
    }
    float* new_res = new_residual ? dense<float>(*new_residual, "new_residual",
                                                 {s.tokens, hidden})
                                  : nullptr;
    py::gil_scoped_release release;
    qkv_core(in, norm, eps, new_res, wqkv, q_out, k_out, v_out, s, int8_activations);
}

void o_proj_and_mlp(const TensorView& attn, const TensorView& residual,
                    const PackedWeightView& wo, const TensorView& norm_weight, float eps,
                    const PackedWeightView& w_gate_up, const PackedWeightView& w_down,
                    const TensorView& out, const TensorView& new_residual,
                    bool int8_activations) {
    const float* norm = dense<float>(norm_weight, "norm_weight", 1);
    const int64_t hidden = norm_weight.sizes[0];
    check_output_weights(wo, w_gate_up, w_down, hidden);
    const float* attn_rows = dense<float>(attn, "attn", {-1, wo.cols});
    const int64_t tokens = attn.sizes[0];
    const float* res = dense<float>(residual, "residual", {tokens, hidden});
    float* out_rows = dense<float>(out, "out", {tokens, hidden});
    float* new_res = dense<float>(new_residual, "new_residual", {tokens, hidden});
    py::gil_scoped_release release;
    output_core(attn_rows, res, wo, norm, eps, w_gate_up, w_down, out_rows, new_res, tokens,
                int8_activations);
}

void decoder_layer(const DecoderLayerParams& w, const TensorView& x,
                   const std::optional<TensorView>& residual, const TensorView& positions,
                   const TensorView& cos_sin, const TensorView& k_cache,
                   const TensorView& v_cache, const AttentionMetadata& metadata,
                   const TensorView& out, const TensorView& new_residual,
                   bool int8_activations, const lora::StepSegments* lora_segments,
                   const lora::ProjectionLoRA* qkv_lora, const lora::ProjectionLoRA* o_lora,
                   const lora::ProjectionLoRA* gate_up_lora,
                   const lora::ProjectionLoRA* down_lora) {
    const TokenInputs in = token_inputs(x, residual, positions, cos_sin, w.hidden, w.head_dim);
    const LayerShape s{x.sizes[0], w.hidden, w.num_heads, w.num_kv_heads, w.head_dim};
    const LayerLoRA adapters{lora_segments ? &lora_segments->segments : nullptr, qkv_lora,
                             o_lora, gate_up_lora, down_lora};
    const struct { const lora::ProjectionLoRA* weights; const char* name; int64_t k, n; } fits[] = {
        {qkv_lora, "qkv_lora", s.hidden, s.qkv_width()}, {o_lora, "o_lora", s.q_width(), s.hidden},
        {gate_up_lora, "gate_up_lora", s.hidden, 2 * w.ffn_width},
        {down_lora, "down_lora", w.ffn_width, s.hidden}};
    for (const auto& f : fits) {
        if (f.weights == nullptr) continue;
        if (lora_segments == nullptr) fail(std::string(f.name) + ": needs lora_segments");
        f.weights->require_fits(f.name, f.k, f.n, *lora_segments, s.tokens);
    }
    const KvCache cache(k_cache, v_cache);
    if (cache.kv_heads != s.kv_heads || cache.head_dim != s.head_dim) {
        fail("k_cache: [Hkv, D] must match the layer's");
    }
    const int64_t* slots = metadata.slots_for(s.tokens, cache);
    float* out_rows = dense<float>(out, "out", {s.tokens, s.hidden});
    float* new_res = dense<float>(new_residual, "new_residual", {s.tokens, s.hidden});
    py::gil_scoped_release release;
    thread_local std::vector<float> mid_buffer, q_buffer, k_buffer, v_buffer, attn_buffer;
    float* q = scratch(q_buffer, s.tokens * s.q_width());
    float* k = scratch(k_buffer, s.tokens * s.kv_width());
    float* v = scratch(v_buffer, s.tokens * s.kv_width());
    float* attn = scratch(attn_buffer, s.tokens * s.q_width());
    // x + residual between the two halves (x itself in the first layer)
    float* mid = in.residual ? scratch(mid_buffer, s.tokens * s.hidden) : nullptr;
    qkv_core(in, w.attn_norm, w.eps, mid, w.wqkv, q, k, v, s, int8_activations, adapters);
    const TokenRows<const float> q_rows{q, s.tokens, s.q_width(), s.q_width()};
    store_kv({k, s.tokens, s.kv_width(), s.kv_width()}, {v, s.tokens, s.kv_width(), s.kv_width()},
             cache, slots);
    paged_attention(q_rows, s.q_heads, cache, metadata, attn);
    output_core(attn, mid ? mid : in.x, w.wo, w.ffn_norm, w.eps, w.w_gate_up, w.w_down,
                out_rows, new_res, s.tokens, int8_activations, adapters);
}

}  // namespace

void register_decoder_layer(py::module_& m) {
    using namespace pybind11::literals;
    // Checks run before the GIL is released (or, for the attention metadata's values, right
    // after: pybind11 re-acquires it while the exception unwinds).
    m.def("qkv_projection", &qkv_projection, "x"_a, "residual"_a, "norm_weight"_a, "eps"_a,
          "wqkv"_a, "positions"_a, "cos_sin"_a, "q"_a, "k"_a, "v"_a, "new_residual"_a,
          "int8_activations"_a,
          "RMSNorm (residual add fused) -> QKV projection -> RoPE, into q, k, v.");
    m.def("o_proj_and_mlp", &o_proj_and_mlp, "attn"_a, "residual"_a, "wo"_a, "norm_weight"_a,
          "eps"_a, "w_gate_up"_a, "w_down"_a, "out"_a, "new_residual"_a, "int8_activations"_a,
          "Output projection -> RMSNorm (residual add fused) -> SwiGLU MLP, into out.");
    m.def("decoder_layer", &decoder_layer, "weights"_a, "x"_a, "residual"_a, "positions"_a,
          "cos_sin"_a, "k_cache"_a, "v_cache"_a, "metadata"_a, "out"_a, "new_residual"_a,
          "int8_activations"_a, "lora_segments"_a = py::none(), "qkv_lora"_a = py::none(),
          "o_lora"_a = py::none(), "gate_up_lora"_a = py::none(), "down_lora"_a = py::none(),
          "qkv_projection, store_kv + paged_attention over the layer's caches, then "
          "o_proj_and_mlp: one decoder layer; the step's adapters (LoRAProjection, with "
          "lora_segments) are added after each projection they adapt.");
}
