// AVX2 + FMA + F16C kernels. The activation quantizer and the weight decoder here are also
// used by the AVX-512 kernel set; the AVX2 tile kernel is the path for CPUs without VNNI.
#pragma once

#include <immintrin.h>

#include "quant_common.h"
#include "quant_scalar.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace quant::avx2 {

inline float hmax8(__m256 v) {
    v = _mm256_max_ps(v, _mm256_permute2f128_ps(v, v, 1));
    v = _mm256_max_ps(v, _mm256_shuffle_ps(v, v, 0x4E));
    v = _mm256_max_ps(v, _mm256_shuffle_ps(v, v, 0xB1));
    return _mm256_cvtss_f32(v);
}

inline int32_t hsum8_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// One 32-float block -> 32 int8 (in order), returning the 8 group-of-4 sums.
inline __m256i quantize_block(const float* x, float inv_scale, int8_t* q) {
    const __m256 inv = _mm256_set1_ps(inv_scale);
    __m256i ints[4];
    for (int i = 0; i < 4; ++i) {
        const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), inv);
        ints[i] = _mm256_cvtps_epi32(
            _mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    // packs works within 128-bit lanes; the permute restores element order
    const __m256i packed16_lo = _mm256_packs_epi32(ints[0], ints[1]);
    const __m256i packed16_hi = _mm256_packs_epi32(ints[2], ints[3]);
    const __m256i packed8 = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(packed16_lo, packed16_hi), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), packed8);
    const __m256i pair_sums = _mm256_maddubs_epi16(_mm256_set1_epi8(1), packed8);
    return _mm256_madd_epi16(pair_sums, _mm256_set1_epi16(1));
}

inline void quantize_acts(const float* x, int row0, int row1, int offset, int8_t* q,
                          int32_t* bias, float* d, float* s, int K) {
    const int nb = K / kBlock;
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i neg_offset = _mm256_set1_epi32(-offset);
    for (int row = row0; row < row1; ++row) {
        for (int b = 0; b < nb; ++b) {
            const int64_t base = static_cast<int64_t>(row) * K + b * kBlock;
            const float* xb = x + base;
            __m256 amax = _mm256_and_ps(_mm256_loadu_ps(xb), abs_mask);
            for (int i = 1; i < 4; ++i)
                amax = _mm256_max_ps(amax, _mm256_and_ps(_mm256_loadu_ps(xb + 8 * i), abs_mask));
            float scale, inv_scale;
            scalar::block_scale(hmax8(amax), scale, inv_scale);
            const __m256i group_sums = quantize_block(xb, inv_scale, q + base);
            const int64_t scale_index = static_cast<int64_t>(row) * nb + b;
            d[scale_index] = scale;
            s[scale_index] = scale * static_cast<float>(hsum8_epi32(group_sums));
            if (offset != 0)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(bias + base / kGroup),
                                    _mm256_mullo_epi32(group_sums, neg_offset));
        }
    }
}

// Same layout as scalar::decode_rows; Q8_0 bytes get `q8_flip` xor-ed in (0x80: w + 128).
template <QType T>
void decode_rows_typed(const uint8_t* src, int64_t row_bytes, int rows, DecodedRows& dst,
                       uint8_t q8_flip) {
    const FormatInfo f = format_info(T);
    const __m128i low_nibbles = _mm_set1_epi8(0x0F);
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(q8_flip));
    for (int r = 0; r < rows; ++r) {
        const uint8_t* row = src + r * row_bytes;
        uint8_t* out_row = dst.vals + static_cast<int64_t>(r) * dst.K;
        uint16_t* d_row = dst.d + static_cast<int64_t>(r) * dst.nb;
        uint16_t* m_row = dst.m + static_cast<int64_t>(r) * dst.nb;
        for (int b = 0; b < dst.nb; ++b) {
            const uint8_t* blk = row + static_cast<int64_t>(b) * f.block_bytes;
            const uint8_t* qs = blk + f.header_bytes;
            // the thread's next chunk usually follows this one: fetch it while computing
            _mm_prefetch(reinterpret_cast<const char*>(blk + rows * row_bytes), _MM_HINT_T1);
            uint8_t* out = out_row + b * kBlock;
            d_row[b] = load_u16(blk);
            if (f.has_min) m_row[b] = load_u16(blk + 2);
            if (T == QType::Q8_0) {
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_xor_si256(v, flip));
            } else {
                const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(out), _mm_and_si128(v, low_nibbles));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(out + kBlock / 2),
                                 _mm_and_si128(_mm_srli_epi16(v, 4), low_nibbles));
            }
        }
    }
}

inline void decode_rows_impl(QType t, const uint8_t* src, int64_t row_bytes, int rows,
                             DecodedRows& dst, uint8_t q8_flip) {
    switch (t) {
        case QType::Q4_0: decode_rows_typed<QType::Q4_0>(src, row_bytes, rows, dst, q8_flip); break;
        case QType::Q4_1: decode_rows_typed<QType::Q4_1>(src, row_bytes, rows, dst, q8_flip); break;
        case QType::Q8_0: decode_rows_typed<QType::Q8_0>(src, row_bytes, rows, dst, q8_flip); break;
    }
}

// Q8_0 kept signed: without VNNI, u8 x s8 pairs of (w + 128) would saturate maddubs.
inline void decode_rows_signed_q8(QType t, const uint8_t* src, int64_t row_bytes, int rows,
                                  DecodedRows& dst) {
    decode_rows_impl(t, src, row_bytes, rows, dst, 0x00);
}

inline void decode_rows_unsigned_q8(QType t, const uint8_t* src, int64_t row_bytes, int rows,
                                    DecodedRows& dst) {
    decode_rows_impl(t, src, row_bytes, rows, dst, 0x80);
}

// sum of half[i] * y[i], i < n (half: fp16 bits)
inline float dot_f16_f32(const uint16_t* half, const float* y, int n) {
    __m256 acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8)
        acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(half + i))),
                              _mm256_loadu_ps(y + i), acc);
    float total = hsum8(acc);
    for (; i < n; ++i) total += _cvtsh_ss(half[i]) * y[i];
    return total;
}

// Q4 weights are nibbles (0..15): u8 x s8 maddubs cannot saturate. Signed Q8_0 weights use
// |w| x (x * sign(w)), which stays within int16 because |q_x| <= 127.
template <int ACTS, bool SIGNED_WEIGHTS, bool BIAS, bool MIN>
void tile_impl(const DecodedRows& w, int r0, int valid_rows, const QuantizedActs& a, int c0,
               float* out, int64_t ldo) {
    const int K = a.K, nb = a.nb;
    const __m256i ones16 = _mm256_set1_epi16(1);
    __m256 acc[kTileRows][ACTS];
    for (auto& row : acc)
        for (auto& v : row) v = _mm256_setzero_ps();
    for (int b = 0; b < nb; ++b) {
        __m256i wv[kTileRows], wabs[kTileRows];
        __m256 wd[kTileRows];
        for (int r = 0; r < kTileRows; ++r) {
            wv[r] = _mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(w.vals + static_cast<int64_t>(r0 + r) * K + b * kBlock));
            wabs[r] = SIGNED_WEIGHTS ? _mm256_abs_epi8(wv[r]) : wv[r];
            wd[r] = _mm256_set1_ps(_cvtsh_ss(w.d[static_cast<int64_t>(r0 + r) * nb + b]));
        }
        for (int c = 0; c < ACTS; ++c) {
            const int64_t arow = c0 + c;
            const __m256i xq = _mm256_loadu_si256(
                reinterpret_cast<const __m256i*>(a.q + arow * K + b * kBlock));
            const __m256 xd = _mm256_set1_ps(a.d[arow * nb + b]);
            __m256i bias = _mm256_setzero_si256();
            if (BIAS)
                bias = _mm256_loadu_si256(
                    reinterpret_cast<const __m256i*>(a.bias + (arow * K + b * kBlock) / kGroup));
            for (int r = 0; r < kTileRows; ++r) {
                const __m256i xs = SIGNED_WEIGHTS ? _mm256_sign_epi8(xq, wv[r]) : xq;
                __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs[r], xs), ones16);
                if (BIAS) dot = _mm256_add_epi32(dot, bias);
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(wd[r], xd), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < valid_rows; ++r)
        for (int c = 0; c < ACTS; ++c) {
            float total = hsum8(acc[r][c]);
            if (MIN)
                total += dot_f16_f32(w.m + static_cast<int64_t>(r0 + r) * nb,
                                 a.s + static_cast<int64_t>(c0 + c) * nb, nb);
            out[c * ldo + r] = total;
        }
}

constexpr int kMaxActs = 2;  // 4 x 2 accumulators + operands fit the 16 ymm registers

template <bool SIGNED_WEIGHTS, bool BIAS, bool MIN>
void tile_dispatch(const DecodedRows& w, int r0, int valid_rows, const QuantizedActs& a, int c0,
                   int acts, float* out, int64_t ldo) {
    if (acts == 1) tile_impl<1, SIGNED_WEIGHTS, BIAS, MIN>(w, r0, valid_rows, a, c0, out, ldo);
    else tile_impl<kMaxActs, SIGNED_WEIGHTS, BIAS, MIN>(w, r0, valid_rows, a, c0, out, ldo);
}

// Signed weights <=> Q8_0 (offset 0, no bias); otherwise Q4_0 has a bias and Q4_1 a min.
inline void tile(const DecodedRows& w, int r0, int valid_rows, const QuantizedActs& a, int c0,
                 int acts, bool has_min, float* out, int64_t ldo) {
    const bool has_bias = a.bias != nullptr;
    if (has_min) tile_dispatch<false, false, true>(w, r0, valid_rows, a, c0, acts, out, ldo);
    else if (has_bias) tile_dispatch<false, true, false>(w, r0, valid_rows, a, c0, acts, out, ldo);
    else tile_dispatch<true, false, false>(w, r0, valid_rows, a, c0, acts, out, ldo);
}

inline bool supported() {
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
}

inline const KernelSet kernels = {
    "avx2", quantize_acts, decode_rows_signed_q8, tile, nullptr, kMaxActs, /*q8_offset=*/0,
};

}  // namespace quant::avx2

#pragma GCC pop_options
