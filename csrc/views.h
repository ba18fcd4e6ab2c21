// Typed views of what crosses the Python boundary into the kernels: a tensor (address,
// dtype, device, sizes, strides), a packed weight, the paged KV caches, a step's
// paged-attention metadata and one decoder layer's parameters (the LoRA ones, built from
// these, are in lora.h).
//
// Each view is read from its Python object once, by a pybind11 type caster (TensorView,
// from a torch.Tensor) or a bound class (the others), and checked where it is built. The
// kernels take every size from the views, so there is no loose integer that a caller could
// swap with another: a tensor of the wrong dtype, rank or shape is a ValueError naming it.
#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <string>

#include "ops_common.h"

namespace llama_ops {

namespace py = pybind11;

// The dtypes the kernels take, then others they only name in errors.
enum class DType : int8_t { Float32, Int32, Int64, UInt8, Float64, Float16, BFloat16, Other };
constexpr int kNamedDTypes = 7;

template <class T> constexpr DType dtype_of();
template <> constexpr DType dtype_of<float>() { return DType::Float32; }
template <> constexpr DType dtype_of<int32_t>() { return DType::Int32; }
template <> constexpr DType dtype_of<int64_t>() { return DType::Int64; }
template <> constexpr DType dtype_of<uint8_t>() { return DType::UInt8; }
template <> constexpr DType dtype_of<double>() { return DType::Float64; }
template <> constexpr DType dtype_of<uint16_t>() { return DType::BFloat16; }  // its bits

constexpr int kMaxDims = 4;  // the widest tensor a kernel takes: a KV cache

// A torch.Tensor as the kernels see it. It holds no reference: it is valid while the
// Python call that passed the tensor runs (the bound classes below keep their tensors).
struct TensorView {
    std::uintptr_t data = 0;
    DType dtype = DType::Other;
    bool on_cpu = false;
    int ndim = 0;
    int64_t sizes[kMaxDims] = {};
    int64_t strides[kMaxDims] = {};  // in elements

    int64_t numel() const;
    bool contiguous() const;
};

// Reads a torch.Tensor (false for anything else; ValueError beyond kMaxDims dims).
bool read_tensor(py::handle src, TensorView& view);

// The tensor's data as T*, after checking that it is a C-contiguous CPU tensor of T with
// `ndim` dims; ValueError naming `name` otherwise.
template <class T>
T* dense(const TensorView& t, const char* name, int ndim);
// The same, plus the exact sizes (a -1 size is not checked).
template <class T>
T* dense(const TensorView& t, const char* name, std::initializer_list<int64_t> sizes);
// The same, shaped like `like` except for the last dim, which is `last` (-1: like's too).
template <class T>
T* dense_like(const TensorView& t, const char* name, const TensorView& like, int64_t last = -1);

// The data of a C-contiguous CPU tensor of float32 or bfloat16 (adapter weights) with
// these sizes (a -1 size is not checked), and in *bf16 which of the two it is; ValueError
// naming `name` otherwise.
const void* dense_weights(const TensorView& t, const char* name,
                          std::initializer_list<int64_t> sizes, bool* bf16);

// A C-contiguous CPU tensor of T of any rank >= 1 as rows of its last dim ([..., width]:
// numel / width rows), for the element-wise ops that take any leading dims.
template <class T>
TokenRows<T> dense_rows(const TensorView& t, const char* name);

// A float32 [T, heads, head_dim] tensor whose per-token dims are dense; dim 0 may have any
// stride (q, k and v are slices of one fused projection output). A -1 size is not checked.
// T = float for the kernels that write in place (rope).
template <class T = const float>
TokenRows<T> token_rows(const TensorView& t, const char* name, int64_t heads,
                        int64_t head_dim);

// A packed (GGUF block format or NF4) [rows, cols] weight over a uint8 [rows, row bytes]
// tensor, which it keeps alive. Checked when built: the row size fits qtype and cols.
struct PackedWeightView {
    py::object owner;
    const uint8_t* data;
    std::string qtype;
    int64_t rows, cols;

    PackedWeightView(py::object tensor, std::string qtype, int64_t rows, int64_t cols);
    // ValueError naming `name` unless this is a [rows, cols] weight.
    void require_shape(const char* name, int64_t rows, int64_t cols) const;
};

// A layer's paged K and V caches, float32 [num_blocks, block_size, Hkv, D], same layout.
struct KvCache {
    float* k;
    float* v;
    int64_t num_blocks, block_size, kv_heads, head_dim;

    KvCache(const TensorView& k_cache, const TensorView& v_cache);
    int64_t capacity() const { return num_blocks * block_size; }  // slots
    int64_t width() const { return kv_heads * head_dim; }         // floats per slot
};

// One step's paged-attention metadata (vLLM's names), the same for every layer; keeps its
// tensors alive. slot_mapping may be absent when the step only attends.
struct AttentionMetadata {
    py::object owners;
    const int64_t* slot_mapping;  // int64 [query tokens] or null
    const int32_t* block_tables;  // int32 [>= num_seqs, max_blocks]
    const int32_t* context_lens;  // int32 [num_seqs]
    const int32_t* cu_seqlens_q;  // int32 [num_seqs + 1]
    int64_t max_blocks, num_seqs, num_tokens;  // num_tokens = cu_seqlens_q[num_seqs]
    float scale;

    AttentionMetadata(std::optional<py::object> slot_mapping, py::object block_tables,
                      py::object context_lens, py::object cu_seqlens_q, float scale);
    // The slots, checked against `tokens` and the cache's capacity (negative: padding).
    const int64_t* slots_for(int64_t tokens, const KvCache& cache) const;
};

// One decoder layer's parameters for the fused kernel: RMSNorm weights, packed projections
// (fused QKV, output, fused gate/up, down) and the head counts, checked against each other
// when built. head_dim = wo.cols / num_heads.
struct DecoderLayerParams {
    py::object owners;
    const float* attn_norm;
    const float* ffn_norm;
    PackedWeightView wqkv, wo, w_gate_up, w_down;
    float eps;
    int64_t hidden, num_heads, num_kv_heads, head_dim, ffn_width;

    DecoderLayerParams(py::object attn_norm, PackedWeightView wqkv, PackedWeightView wo,
                       py::object ffn_norm, PackedWeightView w_gate_up, PackedWeightView w_down,
                       float eps, int64_t num_heads, int64_t num_kv_heads);
};

}  // namespace llama_ops

namespace pybind11 {
namespace detail {

template <>
struct type_caster<llama_ops::TensorView> {
    PYBIND11_TYPE_CASTER(llama_ops::TensorView, const_name("torch.Tensor"));
    bool load(handle src, bool) { return llama_ops::read_tensor(src, value); }
    static handle cast(const llama_ops::TensorView&, return_value_policy, handle) {
        return none().release();  // views only go into the extension
    }
};

}  // namespace detail
}  // namespace pybind11
