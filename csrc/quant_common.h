// Shared definitions for the quantized matmul kernels (csrc/quant.cpp), and the int8-
// activation path (opt-in; the default float32 path is in quant_f32.h).
//
// The int8 path computes y = x @ W^T in three stages:
//   1. activations x [M, K] are quantized per 32-block to int8 (scale = amax / 127),
//   2. a chunk of weight rows is decoded from its GGUF blocks into one byte per weight
//      plus float per-block scales (and mins for Q4_1), in a per-thread buffer,
//   3. an ISA-specific tile kernel multiplies 4 decoded weight rows by up to 4 activation
//      rows with integer dot products, applying the two scales once per block.
// Decoded weight bytes are unsigned (u8) so one u8 x s8 dot product serves every format:
// a format whose true value is (byte - offset) gets the correction -offset * sum(q_x)
// folded into the integer accumulator ("bias"), which keeps the dot product exact.
#pragma once

#include <cstdint>
#include <cstring>

namespace quant {

constexpr int kBlock = 32;           // weights per GGUF block (Q4_0, Q4_1, Q8_0)
constexpr int kGroup = 4;            // int8 products summed into one int32 lane
constexpr int kGroupsPerBlock = kBlock / kGroup;
constexpr float kInt8Max = 127.0f;   // symmetric int8 range of quantized activations
constexpr int kTileRows = 4;         // weight rows per tile kernel call
constexpr int kMaxTileActs = 4;      // activation rows per tile kernel call, at most
// Decode-sized matmuls stream each weight row from DRAM once, and the hardware prefetcher
// alone leaves much of the latency exposed (a SmolLM2 decode step's matmuls took 3.7 ms
// instead of 2.7 on 2 cores): tile kernels reading GGUF rows ask for the rows this far
// ahead of the tile into L1 and, further still, into L2.
constexpr int kPrefetchL1Rows = 8;
constexpr int kPrefetchL2Rows = 32;

enum class QType : int { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };

struct FormatInfo {
    int block_bytes;   // bytes per 32-weight block
    int header_bytes;  // fp16 scale (and fp16 min for Q4_1) in front of the quants
    bool has_min;      // Q4_1: w = d * q + m
};

constexpr FormatInfo format_info(QType t) {
    switch (t) {
        case QType::Q4_0: return {18, 2, false};
        case QType::Q4_1: return {20, 4, true};
        case QType::Q8_0: return {34, 2, false};
    }
    return {0, 0, false};
}

// IEEE half -> float, bit-exact for normals, subnormals, infinities and NaNs.
inline float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exponent = (h >> 10) & 0x1Fu;
    uint32_t mantissa = h & 0x3FFu;
    uint32_t bits;
    if (exponent == 0x1F) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {  // subnormal half: normalise into a float exponent
        int shift = 0;
        while ((mantissa & 0x400u) == 0) {
            mantissa <<= 1;
            ++shift;
        }
        bits = sign | ((113u - shift) << 23) | ((mantissa & 0x3FFu) << 13);
    }
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

inline uint16_t load_u16(const void* p) {
    uint16_t v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

inline uint32_t load_u32(const void* p) {
    uint32_t v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

// Activations quantized per 32-block: x ~= d[b] * q[b*32 + j].
struct QuantizedActs {
    const int8_t* q;      // [M][K]
    const int32_t* bias;  // [M][K/4]: -offset * (sum of each 4 consecutive q); null if offset 0
    const float* d;       // [M][nb] block scales
    const float* s;       // [M][nb] d * sum(q) over the block (for the Q4_1 min term)
    int K;
    int nb;               // K / 32
};

// Weight rows decoded to one byte per weight (layout chosen by the ISA's decoder). Scales
// stay fp16 bits: the tile kernels convert them with one vcvtph2ps per block pair, which is
// cheaper than converting every block's scale one by one while decoding.
struct DecodedRows {
    uint8_t* vals;  // [rows][K]
    uint16_t* d;    // [rows][nb] fp16 block scales
    uint16_t* m;    // [rows][nb] fp16 block mins, Q4_1 only
    int K;
    int nb;
};

// One instruction set's implementation of stages 1-3 (see the top of this file).
struct KernelSet {
    const char* name;
    // Quantize rows [row0, row1) of x; `offset` sets the bias (0: none is written).
    void (*quantize_acts)(const float* x, int row0, int row1, int offset, int8_t* q,
                          int32_t* bias, float* d, float* s, int K);
    // Decode `rows` GGUF rows (stride `row_bytes`) into dst rows [0, rows).
    void (*decode_rows)(QType t, const uint8_t* src, int64_t row_bytes, int rows,
                        DecodedRows& dst);
    // out[c * ldo + r] = row (r0 + r) of w . act row (c0 + c), for r < valid_rows, c < acts.
    void (*tile)(const DecodedRows& w, int r0, int valid_rows, const QuantizedActs& a,
                 int c0, int acts, bool has_min, float* out, int64_t ldo);
    // Optional (null: decode first): the tile kernel reading GGUF rows directly, for
    // M <= max_tile_acts where a decoded chunk would be used only once.
    void (*packed_tile)(QType t, const uint8_t* rows, int64_t row_bytes, int valid_rows,
                        const QuantizedActs& a, int c0, int acts, float* out, int64_t ldo);
    int max_tile_acts;   // activation rows one tile call can take
    int q8_offset;       // how this ISA's decoder stores Q8_0 bytes: 128 (w + 128) or 0
};

// Byte offset the decoder adds to a format's quants, i.e. the bias the dot must remove.
inline int weight_offset(QType t, const KernelSet& k) {
    switch (t) {
        case QType::Q4_0: return 8;
        case QType::Q4_1: return 0;
        case QType::Q8_0: return k.q8_offset;
    }
    return 0;
}

}  // namespace quant
