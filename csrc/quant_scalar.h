// Portable scalar kernels: the fallback on CPUs without AVX2, and the baseline the SIMD
// paths share their integer semantics with (same rounding, same exact int32 block dots).
#pragma once

#include <cmath>

#include "quant_common.h"

namespace quant::scalar {

// Per-block activation scale and its reciprocal; an all-zero block gets d = 0, q = 0.
inline void block_scale(float amax, float& d, float& inv_d) {
    d = amax / kInt8Max;
    inv_d = d > 0.0f ? 1.0f / d : 0.0f;
}

inline void quantize_acts(const float* x, int row0, int row1, int offset, int8_t* q,
                          int32_t* bias, float* d, float* s, int K) {
    const int nb = K / kBlock;
    for (int row = row0; row < row1; ++row) {
        for (int b = 0; b < nb; ++b) {
            const int64_t base = static_cast<int64_t>(row) * K + b * kBlock;
            const float* xb = x + base;
            float amax = 0.0f;
            for (int j = 0; j < kBlock; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
            float scale, inv_scale;
            block_scale(amax, scale, inv_scale);
            int block_sum = 0;
            for (int j = 0; j < kBlock; ++j) {
                // nearbyint rounds half to even, like the SIMD paths' round instruction
                const int v = static_cast<int>(std::nearbyint(xb[j] * inv_scale));
                q[base + j] = static_cast<int8_t>(v);
                block_sum += v;
            }
            d[static_cast<int64_t>(row) * nb + b] = scale;
            s[static_cast<int64_t>(row) * nb + b] = scale * static_cast<float>(block_sum);
            if (offset == 0) continue;
            for (int g = 0; g < kGroupsPerBlock; ++g) {
                int group_sum = 0;
                for (int j = 0; j < kGroup; ++j) group_sum += q[base + g * kGroup + j];
                bias[base / kGroup + g] = -offset * group_sum;
            }
        }
    }
}

// Decoded layout: byte j of block b is weight j of the block, plus `offset` (see weight_offset).
inline void decode_rows(QType t, const uint8_t* src, int64_t row_bytes, int rows,
                        DecodedRows& dst) {
    const FormatInfo f = format_info(t);
    for (int r = 0; r < rows; ++r) {
        for (int b = 0; b < dst.nb; ++b) {
            const uint8_t* blk = src + r * row_bytes + static_cast<int64_t>(b) * f.block_bytes;
            const uint8_t* qs = blk + f.header_bytes;
            uint8_t* out = dst.vals + static_cast<int64_t>(r) * dst.K + b * kBlock;
            const int64_t scale_index = static_cast<int64_t>(r) * dst.nb + b;
            dst.d[scale_index] = load_u16(blk);
            if (f.has_min) dst.m[scale_index] = load_u16(blk + 2);
            if (t == QType::Q8_0) {
                for (int j = 0; j < kBlock; ++j) out[j] = static_cast<uint8_t>(qs[j] ^ 0x80u);
            } else {
                for (int j = 0; j < kBlock / 2; ++j) {
                    out[j] = qs[j] & 0x0F;
                    out[j + kBlock / 2] = qs[j] >> 4;
                }
            }
        }
    }
}

inline void tile(const DecodedRows& w, int r0, int valid_rows, const QuantizedActs& a, int c0,
                 int acts, bool has_min, float* out, int64_t ldo) {
    const bool has_bias = a.bias != nullptr;
    for (int r = 0; r < valid_rows; ++r) {
        const int64_t wrow = r0 + r;
        for (int c = 0; c < acts; ++c) {
            const int64_t arow = c0 + c;
            float acc = 0.0f;
            for (int b = 0; b < a.nb; ++b) {
                const uint8_t* wv = w.vals + wrow * a.K + b * kBlock;
                const int8_t* xq = a.q + arow * a.K + b * kBlock;
                int32_t dot = 0;
                for (int j = 0; j < kBlock; ++j) dot += static_cast<int32_t>(wv[j]) * xq[j];
                if (has_bias) {
                    const int32_t* bias = a.bias + (arow * a.K + b * kBlock) / kGroup;
                    for (int g = 0; g < kGroupsPerBlock; ++g) dot += bias[g];
                }
                const float dw = fp16_to_fp32(w.d[wrow * a.nb + b]);
                const float dx = a.d[arow * a.nb + b];
                acc += dw * dx * static_cast<float>(dot);
                if (has_min) acc += fp16_to_fp32(w.m[wrow * a.nb + b]) * a.s[arow * a.nb + b];
            }
            out[c * ldo + r] = acc;
        }
    }
}

inline const KernelSet kernels = {
    "scalar", quantize_acts, decode_rows, tile, nullptr, kMaxTileActs, /*q8_offset=*/128,
};

}  // namespace quant::scalar
