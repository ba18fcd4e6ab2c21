// Float32-activation quantized matmul (the default path): weights are decoded to exactly the
// float32 values quant.dequantize gives and multiplied with the untouched activations by
// float32 FMAs, so results match x @ dequantize(W).T to float32 rounding. (The int8 path of
// quant_common.h is faster but moves real activations by ~1 %, enough to flip greedy
// tokens of SmolLM2.)
//
// Two ways to feed a tile of kTileRows weight rows x up to 4 activation rows:
//   packed: decode each GGUF block in registers right before its FMAs (few rows of x),
//   decoded: decode a chunk of rows to a float buffer once, reuse it for many rows of x.
#pragma once

#include <immintrin.h>

#include <algorithm>

#include "quant_common.h"

namespace quant::f32 {

struct KernelSet {
    const char* name;
    // rows x K float32 into out (row stride K), equal to quant.dequantize
    void (*decode_rows)(QType t, const uint8_t* src, int64_t row_bytes, int rows, int K,
                        float* out);
    // out[c * ldo + r] = w row r . x row c for r < valid_rows, c < acts; w holds kTileRows
    // rows (stride K, rows past valid_rows readable), x holds `acts` rows (stride K)
    void (*tile)(const float* w, int valid_rows, const float* x, int acts, int K, float* out,
                 int64_t ldo);
    // Optional (null: decode first): the same from GGUF rows `rows` (stride row_bytes)
    void (*packed_tile)(QType t, const uint8_t* rows, int64_t row_bytes, int valid_rows,
                        const float* x, int acts, int K, float* out, int64_t ldo);
    int max_tile_acts;
};

namespace scalar {

// Signed quant j of a block: Q4_0 nibble - 8, Q4_1 nibble, Q8_0 the int8.
inline int block_quant(QType t, const uint8_t* qs, int j) {
    if (t == QType::Q8_0) return static_cast<int8_t>(qs[j]);
    const int half = kBlock / 2;
    const int nibble = j < half ? (qs[j] & 0x0F) : (qs[j - half] >> 4);
    return t == QType::Q4_0 ? nibble - 8 : nibble;
}

// Baseline x86-64 has no FMA, so d * q + m rounds twice, as in quant.dequantize.
inline void decode_rows(QType t, const uint8_t* src, int64_t row_bytes, int rows, int K,
                        float* out) {
    const FormatInfo f = format_info(t);
    for (int r = 0; r < rows; ++r) {
        for (int b = 0; b < K / kBlock; ++b) {
            const uint8_t* blk = src + r * row_bytes + static_cast<int64_t>(b) * f.block_bytes;
            const float d = fp16_to_fp32(load_u16(blk));
            const float m = f.has_min ? fp16_to_fp32(load_u16(blk + 2)) : 0.0f;
            float* dst = out + static_cast<int64_t>(r) * K + b * kBlock;
            for (int j = 0; j < kBlock; ++j) {
                const float scaled = d * static_cast<float>(block_quant(t, blk + f.header_bytes, j));
                dst[j] = f.has_min ? scaled + m : scaled;
            }
        }
    }
}

inline void tile(const float* w, int valid_rows, const float* x, int acts, int K, float* out,
                 int64_t ldo) {
    for (int r = 0; r < valid_rows; ++r)
        for (int c = 0; c < acts; ++c) {
            float acc = 0.0f;
            for (int k = 0; k < K; ++k) acc += w[static_cast<int64_t>(r) * K + k] * x[static_cast<int64_t>(c) * K + k];
            out[c * ldo + r] = acc;
        }
}

inline const KernelSet kernels = {"scalar", decode_rows, tile, nullptr, kMaxTileActs};

}  // namespace scalar

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

namespace avx512 {

constexpr int kLanes = 16;

// One block -> its 32 float32 weights (lo: 0-15, hi: 16-31), as quant.dequantize computes
// them: d * q, then + m for Q4_1 (mul and add stay separate instructions).
template <QType T>
inline void block_to_f32(const uint8_t* blk, __m512& lo, __m512& hi) {
    constexpr FormatInfo f = format_info(T);
    const uint8_t* qs = blk + f.header_bytes;
    const __m512 d = _mm512_set1_ps(_cvtsh_ss(load_u16(blk)));
    __m512i q_lo, q_hi;
    if (T == QType::Q8_0) {
        q_lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
        q_hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + kLanes)));
    } else {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
        const __m128i nibble_mask = _mm_set1_epi8(0x0F);
        q_lo = _mm512_cvtepu8_epi32(_mm_and_si128(bytes, nibble_mask));
        q_hi = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble_mask));
        if (T == QType::Q4_0) {
            q_lo = _mm512_sub_epi32(q_lo, _mm512_set1_epi32(8));
            q_hi = _mm512_sub_epi32(q_hi, _mm512_set1_epi32(8));
        }
    }
    lo = _mm512_mul_ps(d, _mm512_cvtepi32_ps(q_lo));
    hi = _mm512_mul_ps(d, _mm512_cvtepi32_ps(q_hi));
    if (f.has_min) {
        const __m512 m = _mm512_set1_ps(_cvtsh_ss(load_u16(blk + 2)));
        lo = _mm512_add_ps(lo, m);
        hi = _mm512_add_ps(hi, m);
    }
}

template <QType T>
void decode_rows_typed(const uint8_t* src, int64_t row_bytes, int rows, int K, float* out) {
    constexpr int kBytes = format_info(T).block_bytes;
    const int64_t next_chunk = rows * row_bytes;
    for (int r = 0; r < rows; ++r)
        for (int b = 0; b < K / kBlock; ++b) {
            __m512 lo, hi;
            const uint8_t* blk = src + r * row_bytes + static_cast<int64_t>(b) * kBytes;
            // the thread's next chunk usually follows this one: fetch it while computing
            _mm_prefetch(reinterpret_cast<const char*>(blk + next_chunk), _MM_HINT_T1);
            block_to_f32<T>(blk, lo, hi);
            float* dst = out + static_cast<int64_t>(r) * K + b * kBlock;
            _mm512_storeu_ps(dst, lo);
            _mm512_storeu_ps(dst + kLanes, hi);
        }
}

inline void decode_rows(QType t, const uint8_t* src, int64_t row_bytes, int rows, int K,
                        float* out) {
    switch (t) {
        case QType::Q4_0: decode_rows_typed<QType::Q4_0>(src, row_bytes, rows, K, out); break;
        case QType::Q4_1: decode_rows_typed<QType::Q4_1>(src, row_bytes, rows, K, out); break;
        case QType::Q8_0: decode_rows_typed<QType::Q8_0>(src, row_bytes, rows, K, out); break;
    }
}

template <int ACTS>
inline void store_tile(__m512 (&acc)[kTileRows][ACTS], int valid_rows, float* out, int64_t ldo) {
    for (int r = 0; r < valid_rows; ++r)
        for (int c = 0; c < ACTS; ++c) out[c * ldo + r] = _mm512_reduce_add_ps(acc[r][c]);
}

template <int ACTS>
void tile_impl(const float* w, int valid_rows, const float* x, int K, float* out, int64_t ldo) {
    __m512 acc[kTileRows][ACTS];
    for (auto& row : acc)
        for (auto& v : row) v = _mm512_setzero_ps();
    for (int k = 0; k < K; k += kLanes) {
        __m512 wv[kTileRows];
        for (int r = 0; r < kTileRows; ++r) wv[r] = _mm512_loadu_ps(w + static_cast<int64_t>(r) * K + k);
        for (int c = 0; c < ACTS; ++c) {
            const __m512 xv = _mm512_loadu_ps(x + static_cast<int64_t>(c) * K + k);
            for (int r = 0; r < kTileRows; ++r) acc[r][c] = _mm512_fmadd_ps(wv[r], xv, acc[r][c]);
        }
    }
    store_tile(acc, valid_rows, out, ldo);
}

template <QType T, int ACTS>
void packed_tile_impl(const uint8_t* const (&rows)[kTileRows], int64_t row_bytes, int valid_rows,
                      const float* x, int K, float* out, int64_t ldo) {
    constexpr int kBytes = format_info(T).block_bytes;
    __m512 acc[kTileRows][ACTS];
    for (auto& row : acc)
        for (auto& v : row) v = _mm512_setzero_ps();
    for (int b = 0; b < K / kBlock; ++b) {
        __m512 lo[kTileRows], hi[kTileRows];
        for (int r = 0; r < kTileRows; ++r) {
            const uint8_t* blk = rows[r] + static_cast<int64_t>(b) * kBytes;
            // rows stream from memory once: fetch the next tile's rows meanwhile
            _mm_prefetch(reinterpret_cast<const char*>(blk + kTileRows * row_bytes), _MM_HINT_T0);
            block_to_f32<T>(blk, lo[r], hi[r]);
        }
        for (int c = 0; c < ACTS; ++c) {
            const float* xb = x + static_cast<int64_t>(c) * K + b * kBlock;
            const __m512 x_lo = _mm512_loadu_ps(xb), x_hi = _mm512_loadu_ps(xb + kLanes);
            for (int r = 0; r < kTileRows; ++r) {
                acc[r][c] = _mm512_fmadd_ps(lo[r], x_lo, acc[r][c]);
                acc[r][c] = _mm512_fmadd_ps(hi[r], x_hi, acc[r][c]);
            }
        }
    }
    store_tile(acc, valid_rows, out, ldo);
}
inline void tile(const float* w, int valid_rows, const float* x, int acts, int K, float* out,
                 int64_t ldo) {
    switch (acts) {
        case 1: tile_impl<1>(w, valid_rows, x, K, out, ldo); break;
        case 2: tile_impl<2>(w, valid_rows, x, K, out, ldo); break;
        case 3: tile_impl<3>(w, valid_rows, x, K, out, ldo); break;
        default: tile_impl<4>(w, valid_rows, x, K, out, ldo); break;
    }
}

template <QType T>
void packed_tile_typed(const uint8_t* base, int64_t row_bytes, int valid_rows, const float* x,
                       int acts, int K, float* out, int64_t ldo) {
    const uint8_t* rows[kTileRows];
    for (int r = 0; r < kTileRows; ++r)  // rows past the end re-read the last valid one
        rows[r] = base + std::min(r, valid_rows - 1) * row_bytes;
    switch (acts) {
        case 1: packed_tile_impl<T, 1>(rows, row_bytes, valid_rows, x, K, out, ldo); break;
        case 2: packed_tile_impl<T, 2>(rows, row_bytes, valid_rows, x, K, out, ldo); break;
        case 3: packed_tile_impl<T, 3>(rows, row_bytes, valid_rows, x, K, out, ldo); break;
        default: packed_tile_impl<T, 4>(rows, row_bytes, valid_rows, x, K, out, ldo); break;
    }
}

inline void packed_tile(QType t, const uint8_t* rows, int64_t row_bytes, int valid_rows,
                        const float* x, int acts, int K, float* out, int64_t ldo) {
    switch (t) {
        case QType::Q4_0: packed_tile_typed<QType::Q4_0>(rows, row_bytes, valid_rows, x, acts, K, out, ldo); break;
        case QType::Q4_1: packed_tile_typed<QType::Q4_1>(rows, row_bytes, valid_rows, x, acts, K, out, ldo); break;
        case QType::Q8_0: packed_tile_typed<QType::Q8_0>(rows, row_bytes, valid_rows, x, acts, K, out, ldo); break;
    }
}

inline bool supported() {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

inline const KernelSet kernels = {"avx512", decode_rows, tile, packed_tile, kMaxTileActs};

}  // namespace avx512

#pragma GCC pop_options

}  // namespace quant::f32
