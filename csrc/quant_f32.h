// Float32-activation quantized matmul (the default path): weights are decoded to the float32
// values quant.dequantize gives (Q4_1: to within half an ulp, see block_to_f32) and
// multiplied with the untouched activations by float32 FMAs, so results match
// x @ dequantize(W).T to float32 rounding. (The int8 path of
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

// Vector traits for quant_f32_kernels.h, one set per instruction set.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

namespace avx512 {

struct V {
    using F = __m512;
    using I = __m512i;
    static constexpr int kLanes = 16;
    static F zero() { return _mm512_setzero_ps(); }
    static F set1(float v) { return _mm512_set1_ps(v); }
    static F load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, F v) { _mm512_storeu_ps(p, v); }
    static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static float reduce(F v) { return _mm512_reduce_add_ps(v); }
    static F to_float(I v) { return _mm512_cvtepi32_ps(v); }
    template <bool SIGNED>
    static void widen(__m128i bytes, I* out) {
        out[0] = SIGNED ? _mm512_cvtepi8_epi32(bytes) : _mm512_cvtepu8_epi32(bytes);
    }
    static F fp16_pair(uint32_t bits) {
        return _mm512_cvtph_ps(_mm256_set1_epi32(static_cast<int>(bits)));
    }
    static F even_lanes(F v) { return _mm512_moveldup_ps(v); }
    static F odd_lanes(F v) { return _mm512_movehdup_ps(v); }
    // A nibble has 16 values and a zmm 16 lanes: decode each value once into a table, then
    // one permute per 16 weights picks them (vpermps reads only the low 4 bits of each
    // index, so the high nibbles need a shift but no mask). Cheaper than converting every
    // weight to float and scaling it.
    static void nibbles_to_f32(const uint8_t* qs, F scale, F offset, F* w) {
        const F values = _mm512_fmadd_ps(
            scale, _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), offset);
        const I bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)));
        w[0] = _mm512_permutexvar_ps(bytes, values);
        w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), values);
    }
};

constexpr int kMaxActs = kMaxTileActs;  // 4 x 4 accumulators + 8 weight vectors: 24 zmm

#include "quant_f32_kernels.h"

inline bool supported() {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

inline const KernelSet kernels = {"avx512", decode_rows, tile, packed_tile, kMaxActs};

}  // namespace avx512

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace avx2 {

struct V {
    using F = __m256;
    using I = __m256i;
    static constexpr int kLanes = 8;
    static F zero() { return _mm256_setzero_ps(); }
    static F set1(float v) { return _mm256_set1_ps(v); }
    static F load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, F v) { _mm256_storeu_ps(p, v); }
    static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
    static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static float reduce(F v) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
    static F to_float(I v) { return _mm256_cvtepi32_ps(v); }
    template <bool SIGNED>
    static void widen(__m128i bytes, I* out) {
        const __m128i high = _mm_srli_si128(bytes, 8);
        out[0] = SIGNED ? _mm256_cvtepi8_epi32(bytes) : _mm256_cvtepu8_epi32(bytes);
        out[1] = SIGNED ? _mm256_cvtepi8_epi32(high) : _mm256_cvtepu8_epi32(high);
    }
    static F fp16_pair(uint32_t bits) {
        return _mm256_cvtph_ps(_mm_set1_epi32(static_cast<int>(bits)));
    }
    static F even_lanes(F v) { return _mm256_moveldup_ps(v); }
    static F odd_lanes(F v) { return _mm256_movehdup_ps(v); }
    // vpermps has 8 lanes, too few for a 16-value table: widen and convert each nibble.
    static void nibbles_to_f32(const uint8_t* qs, F scale, F offset, F* w) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
        const __m128i nibble_mask = _mm_set1_epi8(0x0F);
        I q[4];
        widen<false>(_mm_and_si128(bytes, nibble_mask), q);
        widen<false>(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble_mask), q + 2);
        for (int i = 0; i < 4; ++i) w[i] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(q[i]), offset);
    }
};

constexpr int kMaxActs = 2;  // 16 ymm registers: 4 x 2 accumulators + operands

#include "quant_f32_kernels.h"

inline bool supported() {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}

inline const KernelSet kernels = {"avx2", decode_rows, tile, packed_tile, kMaxActs};

}  // namespace avx2

#pragma GCC pop_options

}  // namespace quant::f32
