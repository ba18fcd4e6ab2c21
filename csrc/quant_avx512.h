// int8-activation path, AVX-512 VNNI tile kernel: one 512-bit vpdpbusd covers two 32-weight
// blocks, so the scale vector holds block b's d_w * d_x in lanes 0-7 and block b+1's in
// lanes 8-15.
// Activation quantization and weight decoding come from quant_avx2.h (they are memory
// bound; 256-bit is enough there).
#pragma once

#include <immintrin.h>

#include <algorithm>

#include "quant_avx2.h"
#include "quant_common.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")

namespace quant::avx512 {

constexpr int kBlocksPerStep = 2;

// [s[0] x 8, s[1] x 8] from two floats (activation scales) or two fp16s (weight scales);
// for the odd last block only s[0] matters (its upper dot lanes are 0).
inline __m512 spread_pair(__m128 pair) {
    const __m512i lanes = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm512_permutexvar_ps(lanes, _mm512_zextps128_ps512(pair));
}

template <bool TAIL>
inline __m512 pair_scale(const float* s) {
    if (TAIL) return _mm512_set1_ps(s[0]);
    return spread_pair(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s))));
}

template <bool TAIL>
inline __m512 pair_scale(const uint16_t* half) {
    if (TAIL) return _mm512_set1_ps(_cvtsh_ss(half[0]));
    return spread_pair(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(load_u32(half)))));
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

// Weight sources: where a tile reads its 4 rows' bytes (as u8 values plus the format's
// offset, see quant_common.h) and per-block scales.

// Rows decoded into a per-thread buffer (prefill: each decoded chunk serves many rows of x).
// The Q4_1 min term is added after the block loop, as one float dot product per output.
struct DecodedSource {
    static constexpr bool kMinInLoop = false;
    const DecodedRows& w;
    int r0;

    template <bool TAIL>
    __m512i vals(int r, int b) const { return load_bytes<TAIL>(w.vals + row(r) * w.K + b * kBlock); }
    template <bool TAIL>
    __m512 scale(int r, int b) const { return pair_scale<TAIL>(w.d + row(r) * w.nb + b); }
    template <bool TAIL>
    __m512 min(int, int) const { return _mm512_setzero_ps(); }
    void prefetch(int, int) const {}  // decoded chunks sit in L1 already
    int64_t row(int r) const { return r0 + r; }
};

// Rows read straight from their GGUF blocks (decode, few rows of x: nothing to amortize a
// decode pass over). Q4_1 mins are spread like the scales and accumulated in the loop.
template <QType T>
struct PackedSource {
    static constexpr bool kMinInLoop = true;
    static constexpr FormatInfo kFormat = format_info(T);
    const uint8_t* rows[kTileRows];
    int64_t row_bytes;

    const uint8_t* block(int r, int b) const { return rows[r] + static_cast<int64_t>(b) * kFormat.block_bytes; }

    // Rows are streamed from memory once: while this tile works, fetch the same blocks of
    // later tiles' rows (prefetch never faults, so running past the last row is fine).
    void prefetch(int r, int b) const {
        _mm_prefetch(reinterpret_cast<const char*>(block(r, b) + kPrefetchL1Rows * row_bytes), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(block(r, b) + kPrefetchL2Rows * row_bytes), _MM_HINT_T1);
    }

    template <bool TAIL>
    __m512i vals(int r, int b) const {
        const uint8_t* q0 = block(r, b) + kFormat.header_bytes;
        if (T == QType::Q8_0) {
            const __m512i both = TAIL ? _mm512_maskz_loadu_epi8(0xFFFFFFFFull, q0)
                                      : _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256(
                                            reinterpret_cast<const __m256i*>(q0))),
                                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                                q0 + kFormat.block_bytes)), 1);
            return _mm512_xor_si512(both, _mm512_set1_epi8(static_cast<char>(0x80)));
        }
        // [qs0, qs0, qs1, qs1] per 128 bits; shifting the odd quarters by 4 gives
        // [low nibbles 0, high nibbles 0, low 1, high 1] = weights in block order
        __m512i quads = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q0)));
        if (!TAIL)
            quads = _mm512_mask_broadcast_i32x4(
                quads, 0xFF00, _mm_loadu_si128(reinterpret_cast<const __m128i*>(q0 + kFormat.block_bytes)));
        const __m512i shifted = _mm512_srlv_epi64(quads, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4));
        return _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F));
    }
    template <bool TAIL>
    __m512 scale(int r, int b) const { return header_pair<TAIL>(r, b, 0); }
    template <bool TAIL>
    __m512 min(int r, int b) const { return header_pair<TAIL>(r, b, 2); }

    // fp16 at byte `at` of blocks b and b + 1, spread like pair_scale
    template <bool TAIL>
    __m512 header_pair(int r, int b, int at) const {
        const uint8_t* h = block(r, b) + at;
        if (TAIL) return _mm512_set1_ps(_cvtsh_ss(load_u16(h)));
        const uint32_t both = load_u16(h) | (static_cast<uint32_t>(load_u16(h + kFormat.block_bytes)) << 16);
        return spread_pair(_mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(both))));
    }
};

// One block pair (one block when TAIL) of a kTileRows x ACTS tile.
template <int ACTS, bool BIAS, bool MIN, bool TAIL, class Source>
inline void step(const Source& w, const QuantizedActs& a, int c0, int b,
                 __m512 (&acc)[kTileRows][ACTS]) {
    constexpr bool kMinHere = MIN && Source::kMinInLoop;
    __m512i wv[kTileRows];
    __m512 wd[kTileRows], wm[kTileRows];
    for (int r = 0; r < kTileRows; ++r) {
        w.prefetch(r, b);
        wv[r] = w.template vals<TAIL>(r, b);
        wd[r] = w.template scale<TAIL>(r, b);
        if (kMinHere) wm[r] = w.template min<TAIL>(r, b);
    }
    for (int c = 0; c < ACTS; ++c) {
        const int64_t arow = c0 + c;
        const __m512i xq = load_bytes<TAIL>(a.q + arow * a.K + b * kBlock);
        const __m512 xd = pair_scale<TAIL>(a.d + arow * a.nb + b);
        const __m512i bias = BIAS ? load_bias<TAIL>(a.bias + (arow * a.K + b * kBlock) / kGroup)
                                  : _mm512_setzero_si512();
        // each of a block's 8 lanes adds m * s / 8 (exact: a power-of-two scaling)
        __m512 xs = _mm512_setzero_ps();
        if (kMinHere) {
            const float* s = a.s + arow * a.nb + b;
            xs = _mm512_mul_ps(TAIL ? _mm512_maskz_mov_ps(0x00FF, _mm512_set1_ps(s[0])) : pair_scale<false>(s),
                               _mm512_set1_ps(1.0f / kGroupsPerBlock));
        }
        for (int r = 0; r < kTileRows; ++r) {
            const __m512i dot = _mm512_dpbusd_epi32(bias, wv[r], xq);
            acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wd[r], xd), acc[r][c]);
            if (kMinHere) acc[r][c] = _mm512_fmadd_ps(wm[r], xs, acc[r][c]);
        }
    }
}

template <int ACTS, bool BIAS, bool MIN, class Source>
void tile_impl(const Source& w, int valid_rows, const QuantizedActs& a, int c0, float* out,
               int64_t ldo) {
    __m512 acc[kTileRows][ACTS];
    for (auto& row : acc)
        for (auto& v : row) v = _mm512_setzero_ps();
    int b = 0;
    for (; b + kBlocksPerStep <= a.nb; b += kBlocksPerStep) step<ACTS, BIAS, MIN, false>(w, a, c0, b, acc);
    if (b < a.nb) step<ACTS, BIAS, MIN, true>(w, a, c0, b, acc);
    for (int r = 0; r < valid_rows; ++r)
        for (int c = 0; c < ACTS; ++c) {
            float total = _mm512_reduce_add_ps(acc[r][c]);
            if constexpr (MIN && !Source::kMinInLoop)
                total += avx2::dot_f16_f32(w.w.m + w.row(r) * a.nb,
                                           a.s + static_cast<int64_t>(c0 + c) * a.nb, a.nb);
            out[c * ldo + r] = total;
        }
}

template <bool BIAS, bool MIN, class Source>
void tile_dispatch(const Source& w, int valid_rows, const QuantizedActs& a, int c0, int acts,
                   float* out, int64_t ldo) {
    switch (acts) {
        case 1: tile_impl<1, BIAS, MIN>(w, valid_rows, a, c0, out, ldo); break;
        case 2: tile_impl<2, BIAS, MIN>(w, valid_rows, a, c0, out, ldo); break;
        case 3: tile_impl<3, BIAS, MIN>(w, valid_rows, a, c0, out, ldo); break;
        default: tile_impl<4, BIAS, MIN>(w, valid_rows, a, c0, out, ldo); break;
    }
}

// Q4_1 has a min and no offset; Q4_0 and Q8_0 (stored as w + 128) have an offset.
inline void tile(const DecodedRows& w, int r0, int valid_rows, const QuantizedActs& a, int c0,
                 int acts, bool has_min, float* out, int64_t ldo) {
    const DecodedSource source{w, r0};
    if (has_min) tile_dispatch<false, true>(source, valid_rows, a, c0, acts, out, ldo);
    else tile_dispatch<true, false>(source, valid_rows, a, c0, acts, out, ldo);
}

template <QType T>
void packed_tile_typed(const uint8_t* rows, int64_t row_bytes, int valid_rows,
                       const QuantizedActs& a, int c0, int acts, float* out, int64_t ldo) {
    PackedSource<T> source;
    source.row_bytes = row_bytes;
    for (int r = 0; r < kTileRows; ++r)  // rows past the end re-read the last valid one
        source.rows[r] = rows + std::min(r, valid_rows - 1) * row_bytes;
    constexpr bool kHasMin = T == QType::Q4_1;
    tile_dispatch<!kHasMin, kHasMin>(source, valid_rows, a, c0, acts, out, ldo);
}

inline void packed_tile(QType t, const uint8_t* rows, int64_t row_bytes, int valid_rows,
                        const QuantizedActs& a, int c0, int acts, float* out, int64_t ldo) {
    switch (t) {
        case QType::Q4_0: packed_tile_typed<QType::Q4_0>(rows, row_bytes, valid_rows, a, c0, acts, out, ldo); break;
        case QType::Q4_1: packed_tile_typed<QType::Q4_1>(rows, row_bytes, valid_rows, a, c0, acts, out, ldo); break;
        case QType::Q8_0: packed_tile_typed<QType::Q8_0>(rows, row_bytes, valid_rows, a, c0, acts, out, ldo); break;
    }
}

inline bool supported() {
    return avx2::supported() && __builtin_cpu_supports("avx512f") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni");
}

inline const KernelSet kernels = {
    "avx512_vnni", avx2::quantize_acts, avx2::decode_rows_unsigned_q8, tile, packed_tile,
    kMaxTileActs, /*q8_offset=*/128,
};

}  // namespace quant::avx512

#pragma GCC pop_options
