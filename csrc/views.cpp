// Building and checking the boundary views (views.h), and their Python bindings.
#include "views.h"

#include <algorithm>

#include "cpu_ops.h"
#include "registry.h"

namespace llama_ops {

namespace {

const char* dtype_name(DType d) {
    switch (d) {
        case DType::Float32: return "float32";
        case DType::Int32: return "int32";
        case DType::Int64: return "int64";
        case DType::UInt8: return "uint8";
        case DType::Float64: return "float64";
        case DType::Float16: return "float16";
        case DType::BFloat16: return "bfloat16";
        default: return "another dtype";
    }
}

// Interned attribute names and torch's dtype objects, looked up once. Never released: the
// module lives as long as the interpreter.
struct TorchNames {
    PyObject* tensor_type;
    PyObject* data_ptr;
    PyObject* dtype;
    PyObject* shape;
    PyObject* stride;
    PyObject* is_cpu;
    PyObject* dtypes[kNamedDTypes];  // in the order of DType

    TorchNames() {
        py::module_ torch = py::module_::import("torch");
        tensor_type = py::object(torch.attr("Tensor")).release().ptr();
        data_ptr = PyUnicode_InternFromString("data_ptr");
        dtype = PyUnicode_InternFromString("dtype");
        shape = PyUnicode_InternFromString("shape");
        stride = PyUnicode_InternFromString("stride");
        is_cpu = PyUnicode_InternFromString("is_cpu");
        for (int i = 0; i < kNamedDTypes; ++i) dtypes[i] = py::object(torch.attr(dtype_name(static_cast<DType>(i)))).release().ptr();
    }
};

const TorchNames& torch_names() {
    static const TorchNames* names = new TorchNames();
    return *names;
}

// A tuple of ints (torch.Size or stride()) into `out`; its length.
int read_ints(PyObject* tuple, int64_t* out) {
    const Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    if (n > kMaxDims) {
        throw py::value_error("tensor: at most " + std::to_string(kMaxDims) +
                              " dims expected, got " + std::to_string(n));
    }
    for (Py_ssize_t i = 0; i < n; ++i) out[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(tuple, i));
    return static_cast<int>(n);
}

// "[2, *, 64]": a -1 size (not checked) is written as *.
std::string sizes_string(const int64_t* sizes, int ndim) {
    std::string s = "[";
    for (int d = 0; d < ndim; ++d) {
        s += (d ? ", " : "") + (sizes[d] < 0 ? std::string("*") : std::to_string(sizes[d]));
    }
    return s + "]";
}

std::string shape_string(const TensorView& t) { return sizes_string(t.sizes, t.ndim); }

// ValueError naming `name` unless t's sizes are `sizes` (a -1 size is not checked); t's
// rank was checked before.
void require_sizes(const TensorView& t, const char* name, const int64_t* sizes) {
    for (int d = 0; d < t.ndim; ++d) {
        if (sizes[d] >= 0 && t.sizes[d] != sizes[d]) {
            fail(std::string(name) + ": expected shape " + sizes_string(sizes, t.ndim) +
                 ", got " + shape_string(t));
        }
    }
}

void require(const TensorView& t, const char* name, DType dtype, int ndim) {
    if (!t.on_cpu) fail(std::string(name) + ": expected a CPU tensor");
    if (t.dtype != dtype) {
        fail(std::string(name) + ": expected " + dtype_name(dtype) + ", got " +
             dtype_name(t.dtype));
    }
    if (t.ndim != ndim) {
        fail(std::string(name) + ": expected " + std::to_string(ndim) + " dims, got " +
             shape_string(t));
    }
}

TensorView view_of(const py::object& tensor, const char* name) {
    TensorView view;
    if (!read_tensor(tensor, view)) fail(std::string(name) + ": expected a torch.Tensor");
    return view;
}

}  // namespace

bool read_tensor(py::handle src, TensorView& view) {
    const TorchNames& names = torch_names();
    PyObject* obj = src.ptr();
    if (!PyObject_TypeCheck(obj, reinterpret_cast<PyTypeObject*>(names.tensor_type))) {
        return false;
    }
    py::object dtype = py::reinterpret_steal<py::object>(PyObject_GetAttr(obj, names.dtype));
    py::object shape = py::reinterpret_steal<py::object>(PyObject_GetAttr(obj, names.shape));
    py::object strides =
        py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(obj, names.stride));
    py::object address =
        py::reinterpret_steal<py::object>(PyObject_CallMethodNoArgs(obj, names.data_ptr));
    py::object is_cpu = py::reinterpret_steal<py::object>(PyObject_GetAttr(obj, names.is_cpu));
    if (!dtype || !shape || !strides || !address || !is_cpu) throw py::error_already_set();
    view.dtype = DType::Other;
    for (int i = 0; i < kNamedDTypes; ++i) {
        if (dtype.ptr() == names.dtypes[i]) view.dtype = static_cast<DType>(i);
    }
    view.ndim = read_ints(shape.ptr(), view.sizes);
    read_ints(strides.ptr(), view.strides);
    view.data = static_cast<std::uintptr_t>(PyLong_AsUnsignedLongLong(address.ptr()));
    view.on_cpu = is_cpu.ptr() == Py_True;
    return true;
}

int64_t TensorView::numel() const {
    int64_t n = 1;
    for (int d = 0; d < ndim; ++d) n *= sizes[d];
    return n;
}

bool TensorView::contiguous() const {
    int64_t expected = 1;
    for (int d = ndim - 1; d >= 0; --d) {
        if (sizes[d] != 1 && strides[d] != expected) return false;
        expected *= sizes[d];
    }
    return true;
}

template <class T>
T* dense(const TensorView& t, const char* name, int ndim) {
    require(t, name, dtype_of<T>(), ndim);
    if (!t.contiguous()) fail(std::string(name) + ": must be C-contiguous");
    return reinterpret_cast<T*>(t.data);
}

template <class T>
T* dense(const TensorView& t, const char* name, std::initializer_list<int64_t> sizes) {
    T* data = dense<T>(t, name, static_cast<int>(sizes.size()));
    require_sizes(t, name, sizes.begin());
    return data;
}

template <class T>
T* dense_like(const TensorView& t, const char* name, const TensorView& like, int64_t last) {
    T* data = dense<T>(t, name, like.ndim);
    int64_t sizes[kMaxDims];
    std::copy(like.sizes, like.sizes + like.ndim, sizes);
    if (last >= 0) sizes[like.ndim - 1] = last;
    require_sizes(t, name, sizes);
    return data;
}

const void* dense_weights(const TensorView& t, const char* name,
                          std::initializer_list<int64_t> sizes, bool* bf16) {
    const int ndim = static_cast<int>(sizes.size());
    if (t.dtype != DType::Float32 && t.dtype != DType::BFloat16) {
        if (!t.on_cpu) fail(std::string(name) + ": expected a CPU tensor");
        fail(std::string(name) + ": expected float32 or bfloat16, got " + dtype_name(t.dtype));
    }
    require(t, name, t.dtype, ndim);
    if (!t.contiguous()) fail(std::string(name) + ": must be C-contiguous");
    require_sizes(t, name, sizes.begin());
    *bf16 = t.dtype == DType::BFloat16;
    return reinterpret_cast<const void*>(t.data);
}

template <class T>
TokenRows<T> dense_rows(const TensorView& t, const char* name) {
    if (t.ndim < 1) fail(std::string(name) + ": expected [..., width], got a scalar");
    T* data = dense<T>(t, name, t.ndim);
    const int64_t width = t.sizes[t.ndim - 1];
    const int64_t rows = width ? t.numel() / width : 0;
    return {data, rows, width, width};
}

template float* dense<float>(const TensorView&, const char*, int);
template int32_t* dense<int32_t>(const TensorView&, const char*, int);
template int64_t* dense<int64_t>(const TensorView&, const char*, int);
template uint8_t* dense<uint8_t>(const TensorView&, const char*, int);
template float* dense<float>(const TensorView&, const char*, std::initializer_list<int64_t>);
template int32_t* dense<int32_t>(const TensorView&, const char*, std::initializer_list<int64_t>);
template int64_t* dense<int64_t>(const TensorView&, const char*, std::initializer_list<int64_t>);
template double* dense<double>(const TensorView&, const char*, std::initializer_list<int64_t>);
template float* dense_like<float>(const TensorView&, const char*, const TensorView&, int64_t);
template TokenRows<float> dense_rows<float>(const TensorView&, const char*);
template uint16_t* dense<uint16_t>(const TensorView&, const char*, int);
template uint16_t* dense_like<uint16_t>(const TensorView&, const char*, const TensorView&, int64_t);
template TokenRows<uint16_t> dense_rows<uint16_t>(const TensorView&, const char*);

template <class T>
TokenRows<T> token_rows(const TensorView& t, const char* name, int64_t heads,
                        int64_t head_dim) {
    require(t, name, DType::Float32, 3);
    const int64_t expected[] = {-1, heads, head_dim};
    require_sizes(t, name, expected);
    heads = t.sizes[1];
    head_dim = t.sizes[2];
    const bool dense_heads = (heads == 1 || t.strides[1] == head_dim) &&
                             (head_dim == 1 || t.strides[2] == 1);
    if (!dense_heads) fail(std::string(name) + ": each token's [H, D] must be dense");
    return {reinterpret_cast<T*>(t.data), t.sizes[0], t.strides[0], heads * head_dim};
}

template TokenRows<const float> token_rows<const float>(const TensorView&, const char*,
                                                        int64_t, int64_t);
template TokenRows<float> token_rows<float>(const TensorView&, const char*, int64_t, int64_t);

PackedWeightView::PackedWeightView(py::object tensor, std::string qtype_, int64_t rows_,
                                   int64_t cols_)
    : owner(std::move(tensor)), qtype(std::move(qtype_)), rows(rows_), cols(cols_) {
    const TensorView t = view_of(owner, "packed weight");
    data = dense<uint8_t>(t, "packed weight", 2);
    if (rows <= 0 || cols <= 0 || cols > INT32_MAX || rows > INT32_MAX) {
        fail("packed weight: rows and cols must be positive int32 sizes");
    }
    quant::check_packed_shape(t.sizes[0], t.sizes[1], qtype, static_cast<int>(rows),
                              static_cast<int>(cols));
}

void PackedWeightView::require_shape(const char* name, int64_t rows_, int64_t cols_) const {
    if (rows != rows_ || cols != cols_) {
        fail(std::string(name) + ": expected a [" + std::to_string(rows_) + ", " +
             std::to_string(cols_) + "] weight, got [" + std::to_string(rows) + ", " +
             std::to_string(cols) + "]");
    }
}

KvCache::KvCache(const TensorView& k_cache, const TensorView& v_cache) {
    k = dense<float>(k_cache, "k_cache", 4);
    num_blocks = k_cache.sizes[0];
    block_size = k_cache.sizes[1];
    kv_heads = k_cache.sizes[2];
    head_dim = k_cache.sizes[3];
    v = dense<float>(v_cache, "v_cache", {num_blocks, block_size, kv_heads, head_dim});
    if (block_size <= 0 || kv_heads <= 0) fail("k_cache: empty block or head dim");
}

AttentionMetadata::AttentionMetadata(std::optional<py::object> slots, py::object tables,
                                     py::object lens, py::object cu_seqlens, float scale_)
    : owners(py::make_tuple(slots ? *slots : py::none(), tables, lens, cu_seqlens)),
      scale(scale_) {
    const TensorView lens_view = view_of(lens, "context_lens");
    context_lens = dense<int32_t>(lens_view, "context_lens", 1);
    num_seqs = lens_view.sizes[0];
    cu_seqlens_q = dense<int32_t>(view_of(cu_seqlens, "cu_seqlens_q"), "cu_seqlens_q",
                                  {num_seqs + 1});
    const TensorView tables_view = view_of(tables, "block_tables");
    block_tables = dense<int32_t>(tables_view, "block_tables", 2);
    if (tables_view.sizes[0] < num_seqs) fail("block_tables: one row per sequence expected");
    max_blocks = tables_view.sizes[1];
    num_tokens = cu_seqlens_q[num_seqs];
    slot_mapping = nullptr;
    if (slots && !slots->is_none()) {
        slot_mapping = dense<int64_t>(view_of(*slots, "slot_mapping"), "slot_mapping",
                                      {num_tokens});
    }
}

const int64_t* AttentionMetadata::slots_for(int64_t tokens, const KvCache& cache) const {
    if (!slot_mapping) fail("slot_mapping: needed to store the step's keys and values");
    if (tokens != num_tokens) {
        fail("metadata: " + std::to_string(num_tokens) + " query tokens (cu_seqlens_q), got " +
             std::to_string(tokens));
    }
    for (int64_t t = 0; t < tokens; ++t) {
        if (slot_mapping[t] >= cache.capacity()) fail("slot_mapping: slot beyond the cache");
    }
    return slot_mapping;
}

DecoderLayerParams::DecoderLayerParams(py::object attn_norm_, PackedWeightView wqkv_,
                                       PackedWeightView wo_, py::object ffn_norm_,
                                       PackedWeightView w_gate_up_, PackedWeightView w_down_,
                                       float eps_, int64_t num_heads_, int64_t num_kv_heads_)
    : owners(py::make_tuple(attn_norm_, ffn_norm_)), wqkv(std::move(wqkv_)),
      wo(std::move(wo_)), w_gate_up(std::move(w_gate_up_)), w_down(std::move(w_down_)),
      eps(eps_), num_heads(num_heads_), num_kv_heads(num_kv_heads_) {
    const TensorView attn_view = view_of(attn_norm_, "attn_norm");
    attn_norm = dense<float>(attn_view, "attn_norm", 1);
    hidden = attn_view.sizes[0];
    ffn_norm = dense<float>(view_of(ffn_norm_, "ffn_norm"), "ffn_norm", {hidden});
    if (num_heads <= 0 || num_kv_heads <= 0 || num_heads % num_kv_heads != 0) {
        fail("num_heads: a positive multiple of num_kv_heads expected");
    }
    if (wo.cols % num_heads != 0) fail("wo: columns must be num_heads * head_dim");
    head_dim = wo.cols / num_heads;
    ffn_width = w_down.cols;
    wqkv.require_shape("wqkv", (num_heads + 2 * num_kv_heads) * head_dim, hidden);
    wo.require_shape("wo", hidden, num_heads * head_dim);
    w_gate_up.require_shape("w_gate_up", 2 * ffn_width, hidden);
    w_down.require_shape("w_down", hidden, ffn_width);
}

}  // namespace llama_ops

void register_views(pybind11::module_& m) {
    namespace py = pybind11;
    using namespace llama_ops;
    using namespace pybind11::literals;
    py::class_<PackedWeightView>(m, "PackedWeightView",
                                 "A packed [rows, cols] weight over uint8 [rows, row bytes].")
        .def(py::init<py::object, std::string, int64_t, int64_t>(), "data"_a, "qtype"_a,
             "rows"_a, "cols"_a)
        .def_readonly("qtype", &PackedWeightView::qtype)
        .def_readonly("rows", &PackedWeightView::rows)
        .def_readonly("cols", &PackedWeightView::cols);
    py::class_<AttentionMetadata>(m, "AttentionMetadata",
                                  "One step's paged-attention metadata, checked once.")
        .def(py::init<std::optional<py::object>, py::object, py::object, py::object, float>(),
             "slot_mapping"_a, "block_tables"_a, "context_lens"_a, "cu_seqlens_q"_a, "scale"_a)
        .def_readonly("num_seqs", &AttentionMetadata::num_seqs)
        .def_readonly("num_tokens", &AttentionMetadata::num_tokens)
        .def_readonly("scale", &AttentionMetadata::scale);
    py::class_<DecoderLayerParams>(m, "DecoderLayerParams",
                                   "One decoder layer's weights for the fused kernel.")
        .def(py::init<py::object, PackedWeightView, PackedWeightView, py::object,
                      PackedWeightView, PackedWeightView, float, int64_t, int64_t>(),
             "attn_norm"_a, "wqkv"_a, "wo"_a, "ffn_norm"_a, "w_gate_up"_a, "w_down"_a, "eps"_a,
             "num_heads"_a, "num_kv_heads"_a)
        .def_readonly("hidden", &DecoderLayerParams::hidden)
        .def_readonly("head_dim", &DecoderLayerParams::head_dim)
        .def_readonly("ffn_width", &DecoderLayerParams::ffn_width);
}
