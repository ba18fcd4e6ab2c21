// NF4 (QLoRA NormalFloat4, double-quantized as bitsandbytes) rows as laid out by
// llama_engine.quant.quantize_nf4:
//   codes u8[K/2] (block b's byte j: code j low nibble, code j + 32 high nibble),
//   absmax u8[K/64] (index into kAbsmaxMap), then float32: offset, phase, and the scales of
//   the groups of 256 blocks the row touches (block b's is slot (phase + b) / 256).
// Weight = kLevels[code] * (kAbsmaxMap[q] * scale + offset). Only the float32-activation
// path exists: rows are decoded to float32 and multiplied by the dense tile kernels of
// quant_f32.h.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "quant_common.h"

namespace quant::nf4 {

constexpr int kBlock = 64;
constexpr int kGroupBlocks = 256;
constexpr int kHeaderFloats = 2;  // offset, phase
constexpr float kLevels[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// bitsandbytes' signed 8-bit dynamic map (llama_engine.quant.dynamic_map), float32 exact.
constexpr float kAbsmaxMap[256] = {
    -0.992968738f, -0.978906274f, -0.96484375f, -0.950781226f, -0.936718762f, -0.922656238f,
    -0.908593774f, -0.89453125f, -0.880468726f, -0.866406262f, -0.852343738f, -0.838281274f,
    -0.82421875f, -0.810156226f, -0.796093762f, -0.782031238f, -0.767968774f, -0.75390625f,
    -0.739843726f, -0.725781262f, -0.711718798f, -0.697656274f, -0.68359375f, -0.669531226f,
    -0.655468762f, -0.641406298f, -0.627343774f, -0.61328125f, -0.599218726f, -0.585156262f,
    -0.571093798f, -0.557031274f, -0.54296875f, -0.528906226f, -0.514843702f, -0.500781238f,
    -0.486718714f, -0.47265625f, -0.458593726f, -0.444531262f, -0.430468738f, -0.416406244f,
    -0.40234375f, -0.388281226f, -0.374218762f, -0.360156238f, -0.346093744f, -0.33203125f,
    -0.317968726f, -0.303906262f, -0.289843738f, -0.275781274f, -0.26171875f, -0.247656241f,
    -0.233593747f, -0.219531253f, -0.205468744f, -0.19140625f, -0.177343756f, -0.163281247f,
    -0.149218753f, -0.135156244f, -0.12109375f, -0.107031256f, -0.0985937491f, -0.0957812592f,
    -0.0929687545f, -0.0901562497f, -0.0873437524f, -0.0845312476f, -0.0817187577f, -0.078906253f,
    -0.0760937482f, -0.0732812509f, -0.0704687461f, -0.0676562563f, -0.0648437515f, -0.0620312504f,
    -0.0592187531f, -0.0564062484f, -0.053593751f, -0.05078125f, -0.047968749f, -0.0451562516f,
    -0.0423437469f, -0.0395312496f, -0.0367187522f, -0.0339062512f, -0.0310937501f, -0.028281251f,
    -0.0254687499f, -0.0226562507f, -0.0198437516f, -0.0170312505f, -0.0142187504f, -0.0114062503f,
    -0.00971874967f, -0.00915624946f, -0.00859375019f, -0.00803124998f, -0.00746874977f, -0.00690625003f,
    -0.00634374982f, -0.00578125007f, -0.00521875033f, -0.00465624966f, -0.00409374991f, -0.00353124971f,
    -0.00296874996f, -0.00240624999f, -0.00184375001f, -0.00128124992f, -0.000943750085f, -0.000831249985f,
    -0.00071875006f, -0.000606250076f, -0.000493750034f, -0.000381250022f, -0.000268750038f, -0.000156250011f,
    -8.87499991e-05f, -6.62500024e-05f, -4.37499984e-05f, -2.12499981e-05f, -7.7499999e-06f, -3.25000019e-06f,
    -5.50000038e-07f, 0.0f, 5.50000038e-07f, 3.25000019e-06f, 7.7499999e-06f, 2.12499981e-05f,
    4.37499984e-05f, 6.62500024e-05f, 8.87499991e-05f, 0.000156250011f, 0.000268750038f, 0.000381250022f,
    0.000493750034f, 0.000606250076f, 0.00071875006f, 0.000831249985f, 0.000943750085f, 0.00128124992f,
    0.00184375001f, 0.00240624999f, 0.00296874996f, 0.00353124971f, 0.00409374991f, 0.00465624966f,
    0.00521875033f, 0.00578125007f, 0.00634374982f, 0.00690625003f, 0.00746874977f, 0.00803124998f,
    0.00859375019f, 0.00915624946f, 0.00971874967f, 0.0114062503f, 0.0142187504f, 0.0170312505f,
    0.0198437516f, 0.0226562507f, 0.0254687499f, 0.028281251f, 0.0310937501f, 0.0339062512f,
    0.0367187522f, 0.0395312496f, 0.0423437469f, 0.0451562516f, 0.047968749f, 0.05078125f,
    0.053593751f, 0.0564062484f, 0.0592187531f, 0.0620312504f, 0.0648437515f, 0.0676562563f,
    0.0704687461f, 0.0732812509f, 0.0760937482f, 0.078906253f, 0.0817187577f, 0.0845312476f,
    0.0873437524f, 0.0901562497f, 0.0929687545f, 0.0957812592f, 0.0985937491f, 0.107031256f,
    0.12109375f, 0.135156244f, 0.149218753f, 0.163281247f, 0.177343756f, 0.19140625f,
    0.205468744f, 0.219531253f, 0.233593747f, 0.247656241f, 0.26171875f, 0.275781274f,
    0.289843738f, 0.303906262f, 0.317968726f, 0.33203125f, 0.346093744f, 0.360156238f,
    0.374218762f, 0.388281226f, 0.40234375f, 0.416406244f, 0.430468738f, 0.444531262f,
    0.458593726f, 0.47265625f, 0.486718714f, 0.500781238f, 0.514843702f, 0.528906226f,
    0.54296875f, 0.557031274f, 0.571093798f, 0.585156262f, 0.599218726f, 0.61328125f,
    0.627343774f, 0.641406298f, 0.655468762f, 0.669531226f, 0.68359375f, 0.697656274f,
    0.711718798f, 0.725781262f, 0.739843726f, 0.75390625f, 0.767968774f, 0.782031238f,
    0.796093762f, 0.810156226f, 0.82421875f, 0.838281274f, 0.852343738f, 0.866406262f,
    0.880468726f, 0.89453125f, 0.908593774f, 0.922656238f, 0.936718762f, 0.950781226f,
    0.96484375f, 0.978906274f, 0.992968738f, 1.0f,
};

// Group scales a row stores: enough for any phase (llama_engine.quant._nf4_slots).
inline int slots(int blocks) { return (blocks + kGroupBlocks - 2) / kGroupBlocks + 1; }

inline int64_t row_bytes(int K) {
    const int blocks = K / kBlock;
    return K / 2 + blocks + static_cast<int64_t>(sizeof(float)) * (kHeaderFloats + slots(blocks));
}

// Block b's absmax: map[q] * scale + offset, rounded twice like the torch reference. The
// product goes through a volatile so that no compiler contracts the two roundings into one
// FMA (half an ulp apart) where it is inlined into FMA-enabled code (the AVX-512 decoder).
inline float block_absmax(const uint8_t* row, int K, int b) {
    const uint8_t* absmax_codes = row + K / 2;
    const uint8_t* floats = absmax_codes + K / kBlock;
    float offset, phase, scale;
    std::memcpy(&offset, floats, sizeof(float));
    std::memcpy(&phase, floats + sizeof(float), sizeof(float));
    const int slot = (static_cast<int>(phase) + b) / kGroupBlocks;
    std::memcpy(&scale, floats + (kHeaderFloats + slot) * sizeof(float), sizeof(float));
    volatile float scaled = kAbsmaxMap[absmax_codes[b]] * scale;
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
