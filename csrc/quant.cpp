// Quantized matmul and dequantization for GGUF block formats Q4_0, Q4_1, Q8_0 (CPU).
// Pipeline and integer semantics: see quant_common.h. This file picks the instruction set
// at run time, splits the work over OpenMP threads and exposes the pybind11 functions.
// GCC 12's AVX-512 intrinsic headers trip -Wmaybe-uninitialized on their own undefined
// pass-through operands (_mm512_undefined_*) wherever they are inlined: silence that noise.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "ops_common.h"
#include "views.h"
#include "quant_avx2.h"
#include "quant_avx512.h"
#include "quant_common.h"
#include "quant_f32.h"
#include "quant_nf4.h"
#include "quant_scalar.h"
#include "cpu_ops.h"
#include "views.h"
#include "registry.h"

namespace py = pybind11;

namespace quant {
namespace {

// Weight rows one thread takes at once: a multiple of kTileRows; decoded, they stay in L1
// (int8 path: 16 x K=1536 bytes = 24 KiB) or L2 (float32 path: 96 KiB).
constexpr int kChunkRows = 16;
// Activation rows one work item multiplies against its decoded chunk: each chunk is decoded
// once per this many rows, and that many rows of x (int8: ~2.3 bytes per element, float32:
// 4) stay in L2.
constexpr int kActTileRows = 64;

// int8 path: up to this many rows of x, a kernel set with a packed_tile re-reads the 4 GGUF
// rows (from L1) for every 4 rows of x instead of decoding them once: the in-register
// decode costs ~5 vector ops per block pair, a decode pass ~22 plus a reload. (The float32
// decode is dearer, ~14 ops per block, so that path decodes once beyond 4 rows.)
constexpr int kPackedMaxActs = 16;

// Below this many multiply-adds a matmul stays on the calling thread: waking the OpenMP
// team costs microseconds. Measured on 2 idle cores, decode-sized calls (one row against
// 576x576 .. 3072x576 Q4_1) run 1.5-1.75x faster on two threads (17.6 -> 12.0 us at
// 576x576), and single-stream decode of SmolLM2 goes from 86 to 99 tok/s. On a busy
// machine a team member that lost its core can stall a call for a time slice.
constexpr int64_t kMinParallelMacs = int64_t{1} << 18;

// Same for element-wise passes (activation quantization, dequantization).
constexpr int64_t kMinParallelQuantize = int64_t{1} << 16;

bool worth_threads(int M, int N, int K) {
    return static_cast<int64_t>(M) * N * K >= kMinParallelMacs;
}

enum class Isa : int { Auto = 0, Scalar = 1, Avx2 = 2, Avx512 = 3 };

// The kernel set for `isa` among one precision's three (AUTO: the best this CPU runs).
template <class Set>
const Set& pick_kernels(Isa isa, const Set& avx512_set, bool avx512_ok, const Set& avx2_set,
                        bool avx2_ok, const Set& scalar_set) {
    switch (isa) {
        case Isa::Auto: return avx512_ok ? avx512_set : avx2_ok ? avx2_set : scalar_set;
        case Isa::Scalar: return scalar_set;
        case Isa::Avx2:
            if (!avx2_ok) throw std::runtime_error("this CPU lacks AVX2/FMA/F16C");
            return avx2_set;
        case Isa::Avx512:
            if (!avx512_ok) throw std::runtime_error("this CPU lacks the AVX-512 features needed");
            return avx512_set;
    }
    throw std::invalid_argument("unknown instruction set");
}

const KernelSet& kernels_for(Isa isa) {
    return pick_kernels(isa, avx512::kernels, avx512::supported(), avx2::kernels,
                        avx2::supported(), scalar::kernels);
}

const f32::KernelSet& f32_kernels_for(Isa isa) {
    return pick_kernels(isa, f32::avx512::kernels, f32::avx512::supported(), f32::avx2::kernels,
                        f32::avx2::supported(), f32::scalar::kernels);
}

QType parse_qtype(const std::string& name) {
    if (name == "Q4_0") return QType::Q4_0;
    if (name == "Q4_1") return QType::Q4_1;
    if (name == "Q8_0") return QType::Q8_0;
    throw std::invalid_argument("unsupported packed format " + name);
}

// Owns the quantized copy of x for the duration of one matmul.
struct ActBuffers {
    std::vector<int8_t> q;
    std::vector<int32_t> bias;
    std::vector<float> d, s;

    QuantizedActs quantize(const KernelSet& k, const float* x, int M, int K, int offset) {
        const int nb = K / kBlock;
        q.resize(static_cast<size_t>(M) * K);
        bias.resize(offset != 0 ? static_cast<size_t>(M) * K / kGroup : 0);
        d.resize(static_cast<size_t>(M) * nb);
        s.resize(static_cast<size_t>(M) * nb);
        constexpr int kRowsPerTask = 4;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(M) * K >= kMinParallelQuantize)
        for (int row0 = 0; row0 < M; row0 += kRowsPerTask)
            k.quantize_acts(x, row0, std::min(M, row0 + kRowsPerTask), offset, q.data(),
                            offset != 0 ? bias.data() : nullptr, d.data(), s.data(), K);
        return {q.data(), offset != 0 ? bias.data() : nullptr, d.data(), s.data(), K, nb};
    }
};

// A thread's decode buffer for kChunkRows weight rows (int8 path). Tiles always read
// kTileRows rows; past the chunk's end they read stale rows whose outputs are dropped.
struct ChunkBuffer {
    std::vector<uint8_t> vals;
    std::vector<uint16_t> d, m;
    DecodedRows rows;

    explicit ChunkBuffer(int K) : vals(static_cast<size_t>(kChunkRows) * K),
                                  d(static_cast<size_t>(kChunkRows) * (K / kBlock)),
                                  m(static_cast<size_t>(kChunkRows) * (K / kBlock)),
                                  rows{vals.data(), d.data(), m.data(), K, K / kBlock} {}
    ChunkBuffer(const ChunkBuffer&) = delete;  // `rows` points into this object
    ChunkBuffer& operator=(const ChunkBuffer&) = delete;
};

// tile(r0, valid_rows, c0, acts) for every kTileRows x acts_per_tile tile of y [M, N], rows
// of W in chunks of kChunkRows spread over threads (kernels reading GGUF rows directly).
// Each thread streams a contiguous run of rows, which the kernels prefetch ahead of
// (chunks handed out round-robin interleave the threads' rows: ~1.5x slower at decode).
template <class TileFn>
void for_each_packed_tile(int N, int M, int K, int acts_per_tile, TileFn&& tile) {
    const int n_chunks = (N + kChunkRows - 1) / kChunkRows;
    const auto run_chunk = [&](int chunk) {
        const int chunk_end = std::min(N, (chunk + 1) * kChunkRows);
        for (int r0 = chunk * kChunkRows; r0 < chunk_end; r0 += kTileRows)
            for (int c0 = 0; c0 < M; c0 += acts_per_tile)
                tile(r0, std::min(kTileRows, chunk_end - r0), c0, std::min(acts_per_tile, M - c0));
    };
    if (!worth_threads(M, N, K)) {
        for (int chunk = 0; chunk < n_chunks; ++chunk) run_chunk(chunk);
        return;
    }
    llama_ops::for_each_in_runs(n_chunks, [] { return 0; },
                                [&](int, int64_t chunk) { run_chunk(static_cast<int>(chunk)); });
}

// Each thread owns make_buffer(); per (tile of kActTileRows rows of x, chunk of W rows):
// decode(buffer, n0, chunk_rows), then tile(buffer, n0, r0, valid_rows, c0, acts) with r0
// relative to the chunk. A thread walks consecutive chunks, which the decoders prefetch.
template <class MakeBuffer, class DecodeFn, class TileFn>
void for_each_decoded_tile(int N, int M, int K, int acts_per_tile, MakeBuffer&& make_buffer,
                           DecodeFn&& decode, TileFn&& tile) {
    const int n_chunks = (N + kChunkRows - 1) / kChunkRows;
    const int m_tiles = (M + kActTileRows - 1) / kActTileRows;
    const auto run_item = [&](auto& buffer, int64_t item) {
        const int m_tile = static_cast<int>(item / n_chunks);
        const int n0 = static_cast<int>(item % n_chunks) * kChunkRows;
        const int chunk_rows = std::min(kChunkRows, N - n0);
        decode(buffer, n0, chunk_rows);
        const int m1 = std::min(M, (m_tile + 1) * kActTileRows);
        for (int r0 = 0; r0 < chunk_rows; r0 += kTileRows)
            for (int c0 = m_tile * kActTileRows; c0 < m1; c0 += acts_per_tile)
                tile(buffer, n0, r0, std::min(kTileRows, chunk_rows - r0), c0,
                     std::min(acts_per_tile, m1 - c0));
    };
    const int64_t items = static_cast<int64_t>(m_tiles) * n_chunks;
    if (!worth_threads(M, N, K)) {
        auto buffer = make_buffer();
        for (int64_t item = 0; item < items; ++item) run_item(buffer, item);
        return;
    }
    llama_ops::for_each_in_runs(items, make_buffer, run_item);
}

int64_t packed_row_bytes(QType t, int K) {
    return static_cast<int64_t>(K / kBlock) * format_info(t).block_bytes;
}

// y[M, N] = x[M, K] @ W^T with int8-quantized activations (see quant_common.h).
void matmul_int8(const KernelSet& k, QType t, const float* x, int M, int K, const uint8_t* w,
                 int N, float* y) {
    ActBuffers act_buffers;
    const bool has_min = format_info(t).has_min;
    const QuantizedActs acts = act_buffers.quantize(k, x, M, K, weight_offset(t, k));
    const int64_t row_bytes = packed_row_bytes(t, K);
    if (k.packed_tile != nullptr && M <= kPackedMaxActs) {
        for_each_packed_tile(N, M, K, k.max_tile_acts, [&](int r0, int valid, int c0, int n_acts) {
            k.packed_tile(t, w + r0 * row_bytes, row_bytes, valid, acts, c0, n_acts,
                          y + c0 * N + r0, N);
        });
        return;
    }
    for_each_decoded_tile(
        N, M, K, k.max_tile_acts, [&] { return ChunkBuffer(K); },
        [&](ChunkBuffer& buffer, int n0, int rows) {
            k.decode_rows(t, w + n0 * row_bytes, row_bytes, rows, buffer.rows);
        },
        [&](ChunkBuffer& buffer, int n0, int r0, int valid, int c0, int n_acts) {
            k.tile(buffer.rows, r0, valid, acts, c0, n_acts, has_min,
                   y + static_cast<int64_t>(c0) * N + n0 + r0, N);
        });
}

// Float32 path through decoded chunks: decode(rows_ptr, row_bytes, rows, K, out) turns
// packed rows into float32 rows for the dense tile kernel.
template <class DecodeFn>
void matmul_f32_decoded(const f32::KernelSet& k, DecodeFn&& decode, const float* x, int M,
                        int K, const uint8_t* w, int64_t row_bytes, int N, float* y) {
    for_each_decoded_tile(
        N, M, K, k.max_tile_acts,
        [&] { return std::vector<float>(static_cast<size_t>(kChunkRows) * K); },
        [&](std::vector<float>& buffer, int n0, int rows) {
            decode(w + n0 * row_bytes, row_bytes, rows, K, buffer.data());
        },
        [&](std::vector<float>& buffer, int n0, int r0, int valid, int c0, int n_acts) {
            k.tile(buffer.data() + static_cast<int64_t>(r0) * K, valid,
                   x + static_cast<int64_t>(c0) * K, n_acts, K,
                   y + static_cast<int64_t>(c0) * N + n0 + r0, N);
        });
}

// y[M, N] = x[M, K] @ W^T in float32 (see quant_f32.h).
void matmul_f32(const f32::KernelSet& k, QType t, const float* x, int M, int K,
                const uint8_t* w, int N, float* y) {
    const int64_t row_bytes = packed_row_bytes(t, K);
    if (k.packed_tile != nullptr && M <= k.max_tile_acts) {
        for_each_packed_tile(N, M, K, k.max_tile_acts, [&](int r0, int valid, int c0, int n_acts) {
            k.packed_tile(t, w + r0 * row_bytes, row_bytes, valid, x + static_cast<int64_t>(c0) * K,
                          n_acts, K, y + c0 * N + r0, N);
        });
        return;
    }
    const auto decode = [&](const uint8_t* rows, int64_t stride, int n, int cols, float* out) {
        k.decode_rows(t, rows, stride, n, cols, out);
    };
    matmul_f32_decoded(k, decode, x, M, K, w, row_bytes, N, y);
}

// y[M, N] = x[M, K] @ W^T for NF4 rows: decoded to float32 chunks for any M (an NF4 block
// decode is a table lookup per weight, too dear to repeat per 4 rows of x).
void matmul_nf4(const f32::KernelSet& k, const float* x, int M, int K, const uint8_t* w, int N,
                float* y) {
    const auto decode = f32::avx512::supported() ? nf4::decode_rows_avx512 : nf4::decode_rows_scalar;
    matmul_f32_decoded(k, decode, x, M, K, w, nf4::row_bytes(K), N, y);
}

// One decoded float32 row rounded to bfloat16 (to nearest even, as torch's .to()).
LLAMA_SIMD_CLONES
void narrow_row(const float* row, int64_t n, uint16_t* out) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) llama_ops::narrow(row[i], out + i);
}

// Rows of float32 (T float) or bfloat16 (T uint16_t: the float32 values rounded once) from
// packed rows with an exact decoder (the reference rounds alike).
template <class T, class DecodeFn>
void dequantize_rows(DecodeFn&& decode, const uint8_t* w, int64_t row_bytes, int N, int K,
                     T* out) {
    // embedding lookups dequantize a handful of rows: keep those on the calling thread
#pragma omp parallel if (static_cast<int64_t>(N) * K >= kMinParallelQuantize)
    {
        std::vector<float> row(std::is_same_v<T, float> ? 0 : K);  // one row per thread
#pragma omp for schedule(static)
        for (int n = 0; n < N; ++n) {
            T* dst = out + static_cast<int64_t>(n) * K;
            if constexpr (std::is_same_v<T, float>) {
                decode(w + n * row_bytes, row_bytes, 1, K, dst);
            } else {
                decode(w + n * row_bytes, row_bytes, 1, K, row.data());
                narrow_row(row.data(), K, dst);
            }
        }
    }
}

const std::string kNf4Name = "NF4";

// Bytes per packed row of format `qtype` (GGUF block formats or NF4), validating K.
int64_t row_bytes_for(const std::string& qtype, int K) {
    const bool nf4 = qtype == kNf4Name;
    const int block = nf4 ? nf4::kBlock : kBlock;
    if (K <= 0 || K % block != 0)
        throw std::invalid_argument(qtype + " needs K to be a positive multiple of " + std::to_string(block));
    return nf4 ? nf4::row_bytes(K) : packed_row_bytes(parse_qtype(qtype), K);
}

template <class T>
void dequantize_to(const llama_ops::PackedWeightView& w, T* out) {
    const int N = static_cast<int>(w.rows), K = static_cast<int>(w.cols);
    const int64_t row_bytes = row_bytes_for(w.qtype, K);
    py::gil_scoped_release release;
    if (w.qtype == kNf4Name) {
        // QLoRA's GEMMs dequantize every NF4 matrix up to three times a step: the vector
        // decoder gives the scalar one's values (tested) at a fraction of its cost
        const auto decode = f32::avx512::supported() ? nf4::decode_rows_avx512 : nf4::decode_rows_scalar;
        dequantize_rows(decode, w.data, row_bytes, N, K, out);
    } else {
        const QType t = parse_qtype(w.qtype);
        const auto decode = [t](const uint8_t* rows, int64_t stride, int n, int cols, float* dst) {
            f32::scalar::decode_rows(t, rows, stride, n, cols, dst);
        };
        dequantize_rows(decode, w.data, row_bytes, N, K, out);
    }
}

// out [rows, cols], float32 or bfloat16 = the dequantized rows of a checked packed weight
// (views.h).
void py_dequantize(const llama_ops::PackedWeightView& w, const llama_ops::TensorView& out) {
    bool bf16 = false;
    void* out_ptr = const_cast<void*>(llama_ops::dense_weights(out, "out", {w.rows, w.cols}, &bf16));
    if (bf16) return dequantize_to(w, static_cast<uint16_t*>(out_ptr));
    dequantize_to(w, static_cast<float*>(out_ptr));
}

}  // namespace

void check_packed_shape(int64_t rows, int64_t row_bytes, const std::string& qtype, int N, int K) {
    if (rows != N || row_bytes != row_bytes_for(qtype, K))
        throw std::invalid_argument("packed weight must be uint8 [N, packed row bytes]");
}

void packed_matmul(const float* x, int M, int K, const uint8_t* w, const std::string& qtype,
                   int N, float* y, int isa, bool int8_activations) {
    if (M == 0 || N == 0) return;
    if (qtype == kNf4Name) {
        if (int8_activations) throw std::invalid_argument("NF4 has float32-activation kernels only");
        matmul_nf4(f32_kernels_for(static_cast<Isa>(isa)), x, M, K, w, N, y);
    } else if (int8_activations) {
        matmul_int8(kernels_for(static_cast<Isa>(isa)), parse_qtype(qtype), x, M, K, w, N, y);
    } else {
        matmul_f32(f32_kernels_for(static_cast<Isa>(isa)), parse_qtype(qtype), x, M, K, w, N, y);
    }
}

}  // namespace quant

void register_quant(py::module_& m) {
    using namespace pybind11::literals;
    // x dense float32 [..., K] (M rows in all), w a checked packed view, out dense float32
    // [..., N] (views.h).
    m.def("quant_matmul", [](const llama_ops::TensorView& x, const llama_ops::PackedWeightView& w,
                             const llama_ops::TensorView& out, int isa, bool int8_activations) {
              const auto x_rows = llama_ops::dense_rows<float>(x, "x");
              if (x_rows.width != w.cols) {
                  throw std::invalid_argument("x: expected " + std::to_string(w.cols) +
                                              " features (the weight's columns), got " +
                                              std::to_string(x_rows.width));
              }
              float* out_rows = llama_ops::dense_like<float>(out, "out", x, w.rows);
              if (x_rows.tokens > INT32_MAX) throw std::invalid_argument("x: too many rows");
              py::gil_scoped_release release;
              quant::packed_matmul(x_rows.data, static_cast<int>(x_rows.tokens),
                                   static_cast<int>(w.cols), w.data, w.qtype,
                                   static_cast<int>(w.rows), out_rows, isa, int8_activations);
          },
          "out[M, N] = x[M, K] @ dequantize(w)^T, in float32 or with int8-quantized "
          "activations; isa: 0 auto, 1 scalar, 2 avx2, 3 avx512.",
          "x"_a, "w"_a, "out"_a, "isa"_a = 0, "int8_activations"_a = false);
    m.def("dequantize", &quant::py_dequantize,
          "out float32 or bfloat16 [N, K] (C-contiguous) = the dequantized rows of a packed "
          "[N, K] weight (bfloat16: the float32 values rounded to nearest even)",
          "w"_a, "out"_a);
    m.def("quant_isa", [](bool int8_activations) {
        return std::string(int8_activations ? quant::kernels_for(quant::Isa::Auto).name
                                            : quant::f32_kernels_for(quant::Isa::Auto).name);
    }, "instruction set the quantized matmul uses on this CPU", "int8_activations"_a = false);
    m.def("quant_isa_supported", [](int isa, bool int8_activations) {
        switch (static_cast<quant::Isa>(isa)) {
            case quant::Isa::Avx2:
                return int8_activations ? quant::avx2::supported() : quant::f32::avx2::supported();
            case quant::Isa::Avx512:
                return int8_activations ? quant::avx512::supported() : quant::f32::avx512::supported();
            default: return true;
        }
    }, "whether quant_matmul has a kernel for an instruction set (1 scalar, 2 avx2, 3 avx512) "
       "on this CPU", "isa"_a, "int8_activations"_a = false);
}
