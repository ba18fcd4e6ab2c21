// NF4 (QLoRA NormalFloat4) rows as laid out by llama_engine.quant.quantize_nf4:
//   codes u8[K/2] (block b's byte j: code j low nibble, code j + 32 high nibble),
//   absmax i8[K/64], then per group of 256 blocks float32 (scale, offset).
// Weight = kLevels[code] * (q * scale + offset). Only the float32-activation path exists:
// rows are decoded to float32 and multiplied by the dense tile kernels of quant_f32.h.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "quant_common.h"

namespace quant::nf4 {

constexpr int kBlock = 64;
constexpr int kGroupBlocks = 256;
constexpr int kGroupBytes = 8;  // float32 scale + float32 offset
constexpr float kLevels[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

inline int64_t row_bytes(int K) {
    const int blocks = K / kBlock;
    const int groups = (blocks + kGroupBlocks - 1) / kGroupBlocks;
    return K / 2 + blocks + static_cast<int64_t>(kGroupBytes) * groups;
}

// Block b's absmax: q * scale + offset, rounded twice like the torch reference in baseline
// x86-64 code (no FMA); inlined into SIMD code it may become one FMA (half an ulp apart).
inline float block_absmax(const uint8_t* row, int K, int b) {
    const uint8_t* absmax_codes = row + K / 2;
    const uint8_t* group = absmax_codes + K / kBlock + (b / kGroupBlocks) * kGroupBytes;
    float scale, offset;
    std::memcpy(&scale, group, sizeof(float));
    std::memcpy(&offset, group + sizeof(float), sizeof(float));
    const float scaled = static_cast<float>(static_cast<int8_t>(absmax_codes[b])) * scale;
    return scaled + offset;
}

inline void decode_rows_scalar(const uint8_t* src, int64_t stride, int rows, int K, float* out) {
    for (int r = 0; r < rows; ++r) {
        const uint8_t* row = src + r * stride;
        for (int b = 0; b < K / kBlock; ++b) {
            const float absmax = block_absmax(row, K, b);
            const uint8_t* codes = row + b * (kBlock / 2);
            float* dst = out + static_cast<int64_t>(r) * K + b * kBlock;
            for (int j = 0; j < kBlock / 2; ++j) {
                dst[j] = kLevels[codes[j] & 0x0F] * absmax;
                dst[j + kBlock / 2] = kLevels[codes[j] >> 4] * absmax;
            }
        }
    }
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")

// Same values as decode_rows_scalar: the level lookup is one vpermps per 16 codes.
inline void decode_rows_avx512(const uint8_t* src, int64_t stride, int rows, int K, float* out) {
    const __m512 levels = _mm512_loadu_ps(kLevels);
    const __m256i nibble_mask = _mm256_set1_epi8(0x0F);
    for (int r = 0; r < rows; ++r) {
        const uint8_t* row = src + r * stride;
        for (int b = 0; b < K / kBlock; ++b) {
            const __m512 absmax = _mm512_set1_ps(block_absmax(row, K, b));
            const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * (kBlock / 2)));
            const __m256i halves[2] = {_mm256_and_si256(bytes, nibble_mask),
                                       _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble_mask)};
            float* dst = out + static_cast<int64_t>(r) * K + b * kBlock;
            for (int i = 0; i < 4; ++i) {  // codes 16i .. 16i + 15
                const __m128i codes = i % 2 ? _mm256_extracti128_si256(halves[i / 2], 1)
                                            : _mm256_castsi256_si128(halves[i / 2]);
                const __m512 values = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), levels);
                _mm512_storeu_ps(dst + 16 * i, _mm512_mul_ps(values, absmax));
            }
        }
    }
}

#pragma GCC pop_options

}  // namespace quant::nf4
