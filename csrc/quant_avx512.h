// AVX-512 VNNI tile kernel: one 512-bit vpdpbusd covers two 32-weight blocks, so the
// scale vector holds block b's d_w * d_x in lanes 0-7 and block b+1's in lanes 8-15.
// Activation quantization and weight decoding come from quant_avx2.h (they are memory
// bound; 256-bit is enough there).
#pragma once

#include <immintrin.h>

#include "quant_avx2.h"
#include "quant_common.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")

namespace quant::avx512 {

constexpr int kBlocksPerStep = 2;
constexpr int kStepBytes = kBlocksPerStep * kBlock;
constexpr int kStepGroups = kStepBytes / kGroup;

// [s[0] x 8, s[1] x 8]; for the odd last block only s[0] matters (its upper dot lanes are 0).
template <bool TAIL>
inline __m512 pair_scale(const float* s) {
    if (TAIL) return _mm512_set1_ps(s[0]);
    const __m512 both = _mm512_castps128_ps512(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s))));
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1), both);
}

template <bool TAIL>
inline __m512i load_bytes(const void* p) {
    if (TAIL) return _mm512_maskz_loadu_epi8(0xFFFFFFFFull, p);  // one block, upper half zero
    return _mm512_loadu_si512(p);
}

template <bool TAIL>
inline __m512i load_bias(const int32_t* p) {
    if (TAIL) return _mm512_maskz_loadu_epi32(0x00FF, p);
    return _mm512_loadu_si512(p);
}

template <int ACTS, bool BIAS, bool TAIL>
inline void step(const DecodedRows& w, int r0, const QuantizedActs& a, int c0, int b,
                 __m512 (&acc)[kTileRows][ACTS]) {
    __m512i wv[kTileRows];
    __m512 wd[kTileRows];
    for (int r = 0; r < kTileRows; ++r) {
        const int64_t row = r0 + r;
        wv[r] = load_bytes<TAIL>(w.vals + row * a.K + b * kBlock);
        wd[r] = pair_scale<TAIL>(w.d + row * a.nb + b);
    }
    for (int c = 0; c < ACTS; ++c) {
        const int64_t arow = c0 + c;
        const __m512i xq = load_bytes<TAIL>(a.q + arow * a.K + b * kBlock);
        const __m512 xd = pair_scale<TAIL>(a.d + arow * a.nb + b);
        const __m512i bias = BIAS ? load_bias<TAIL>(a.bias + (arow * a.K + b * kBlock) / kGroup)
                                  : _mm512_setzero_si512();
        for (int r = 0; r < kTileRows; ++r) {
            const __m512i dot = _mm512_dpbusd_epi32(bias, wv[r], xq);
            acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wd[r], xd), acc[r][c]);
        }
    }
}

template <int ACTS, bool BIAS, bool MIN>
void tile_impl(const DecodedRows& w, int r0, int valid_rows, const QuantizedActs& a, int c0,
               float* out, int64_t ldo) {
    __m512 acc[kTileRows][ACTS];
    for (auto& row : acc)
        for (auto& v : row) v = _mm512_setzero_ps();
    int b = 0;
    for (; b + kBlocksPerStep <= a.nb; b += kBlocksPerStep) step<ACTS, BIAS, false>(w, r0, a, c0, b, acc);
    if (b < a.nb) step<ACTS, BIAS, true>(w, r0, a, c0, b, acc);
    for (int r = 0; r < valid_rows; ++r)
        for (int c = 0; c < ACTS; ++c) {
            float total = _mm512_reduce_add_ps(acc[r][c]);
            if (MIN)
                total += avx2::dot_f32(w.m + static_cast<int64_t>(r0 + r) * a.nb,
                                       a.s + static_cast<int64_t>(c0 + c) * a.nb, a.nb);
            out[c * ldo + r] = total;
        }
}

template <bool BIAS, bool MIN>
void tile_dispatch(const DecodedRows& w, int r0, int valid_rows, const QuantizedActs& a, int c0,
                   int acts, float* out, int64_t ldo) {
    switch (acts) {
        case 1: tile_impl<1, BIAS, MIN>(w, r0, valid_rows, a, c0, out, ldo); break;
        case 2: tile_impl<2, BIAS, MIN>(w, r0, valid_rows, a, c0, out, ldo); break;
        case 3: tile_impl<3, BIAS, MIN>(w, r0, valid_rows, a, c0, out, ldo); break;
        default: tile_impl<4, BIAS, MIN>(w, r0, valid_rows, a, c0, out, ldo); break;
    }
}

inline void tile(const DecodedRows& w, int r0, int valid_rows, const QuantizedActs& a, int c0,
                 int acts, bool has_min, float* out, int64_t ldo) {
    if (has_min) tile_dispatch<false, true>(w, r0, valid_rows, a, c0, acts, out, ldo);
    else tile_dispatch<true, false>(w, r0, valid_rows, a, c0, acts, out, ldo);
}

inline bool supported() {
    return avx2::supported() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
}

inline const KernelSet kernels = {
    "avx512_vnni", avx2::quantize_acts, avx2::decode_rows_unsigned_q8, tile, kMaxTileActs,
    /*q8_offset=*/128,
};

}  // namespace quant::avx512

#pragma GCC pop_options
