// The batched LoRA tile kernels (lora_kernels.h) compiled for AVX-512, AVX2+FMA and baseline
// x86-64, picked once from the CPU's features, as the float32 quant kernels are
// (quant_f32.h, whose vector traits these extend with a bfloat16 load).
//
// bfloat16 weights are widened to float32 (a 16-bit shift: exact) rather than multiplied
// by AVX512_BF16's vdpbf16ps, which would round the float32 activations to bfloat16 too
// and move h by ~1e-3 relative: the kernels are bound by streaming the weights, not by
// the multiply-adds, so the float32 arithmetic costs nothing measurable.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "quant_f32.h"

namespace lora::simd {

// bfloat16 is the top half of a float32.
inline float to_float(float w) { return w; }
inline float to_float(uint16_t w) {
    const uint32_t bits = static_cast<uint32_t>(w) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
}

struct KernelSet {
    const char* name;
    // h[t][:rows] = x[t] @ a^T for `count` token rows x[t] (k floats each), a [rows, k]
    void (*shrink_f32)(const float* const* x, int64_t count, const float* a, int64_t rows,
                       int64_t k, float* const* h);
    void (*shrink_bf16)(const float* const* x, int64_t count, const uint16_t* a, int64_t rows,
                        int64_t k, float* const* h);
    // y[t][c] = ratio[c] * (y[t][c] + scale * h[t][h_offset:h_offset + rank] . b[:, c]) for
    // c in [c0, c1), b [rank, n] (ratio null: 1)
    void (*expand_f32)(const float* const* h, int64_t h_offset, int64_t count, const float* b,
                       int64_t n, int64_t rank, float scale, const float* ratio, int64_t c0,
                       int64_t c1, float* const* y);
    void (*expand_bf16)(const float* const* h, int64_t h_offset, int64_t count,
                        const uint16_t* b, int64_t n, int64_t rank, float scale,
                        const float* ratio, int64_t c0, int64_t c1, float* const* y);
};

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")

namespace avx512 {

struct V : quant::f32::avx512::V {
    using quant::f32::avx512::V::load;
    static constexpr int kRegisters = 32;
    static constexpr __mmask16 kAllLanes = 0xFFFF;
    static F load(const uint16_t* p) {
        // the zero-masking forms: GCC 12 warns that the plain ones' undefined lanes may be
        // read uninitialized (they never are)
        const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m512i wide = _mm512_maskz_cvtepu16_epi32(kAllLanes, bits);
        return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(kAllLanes, wide, 16));
    }
    static F add(F a, F b) { return _mm512_add_ps(a, b); }
    static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};

constexpr const char* name = "avx512";

#include "lora_kernels.h"

inline bool supported() { return quant::f32::avx512::supported(); }

}  // namespace avx512

#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace avx2 {

struct V : quant::f32::avx2::V {
    using quant::f32::avx2::V::load;
    static constexpr int kRegisters = 16;
    static F load(const uint16_t* p) {
        const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        const __m256i wide = _mm256_cvtepu16_epi32(bits);
        return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
    static F add(F a, F b) { return _mm256_add_ps(a, b); }
    static void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};

constexpr const char* name = "avx2";

#include "lora_kernels.h"

inline bool supported() { return quant::f32::avx2::supported(); }

}  // namespace avx2

#pragma GCC pop_options

namespace scalar {

// One lane: the same tiles as plain float arithmetic (the compiler may still vectorise).
struct V {
    using F = float;
    static constexpr int kLanes = 1;
    static constexpr int kRegisters = 32;
    static F zero() { return 0.0f; }
    static F set1(float v) { return v; }
    static F load(const float* p) { return *p; }
    static F load(const uint16_t* p) { return to_float(*p); }
    static void store(float* p, F v) { *p = v; }
    static F add(F a, F b) { return a + b; }
    static F mul(F a, F b) { return a * b; }
    static F fma(F a, F b, F c) { return a * b + c; }
    static float reduce(F v) { return v; }
    static void prefetch(const void*) {}
};

constexpr const char* name = "scalar";

#include "lora_kernels.h"

}  // namespace scalar

// The best kernel set this CPU runs.
inline const KernelSet& kernels() {
    static const KernelSet& best = avx512::supported() ? avx512::kernels
                                   : avx2::supported() ? avx2::kernels
                                                       : scalar::kernels;
    return best;
}

}  // namespace lora::simd
