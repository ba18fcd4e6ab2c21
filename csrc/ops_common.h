// Shared helpers for the CPU kernels: threading, argument errors, the multi-ISA attribute
// and vectorisable exp(). (Tensors cross the boundary as views, views.h.)
#pragma once

#include <pybind11/pybind11.h>

#include <omp.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <cstring>
#include <stdexcept>
#include <string>

namespace llama_ops {

namespace py = pybind11;

// Hot leaf functions are compiled three times (AVX-512, AVX2+FMA, baseline x86-64) and the
// loader picks one from the CPU's features (GCC emits the __builtin_cpu_supports resolver).
// Keep OpenMP regions out of these functions: outlined parallel bodies are not cloned.
// Defining LLAMA_SIMD_CLONES on the command line pins one ISA, which lets the tests run the
// AVX2 or baseline code on an AVX-512 machine (e.g. -DLLAMA_SIMD_CLONES= for baseline).
#if defined(LLAMA_SIMD_CLONES)
#elif defined(__x86_64__) && defined(__GNUC__)
#define LLAMA_SIMD_CLONES \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LLAMA_SIMD_CLONES
#endif

// For helpers of a LLAMA_SIMD_CLONES function: inlined, they are compiled for each clone's ISA.
#define ALWAYS_INLINE inline __attribute__((always_inline))

// bfloat16 travels as its bits (uint16_t): the top half of a float32, so widening is exact;
// narrowing rounds to nearest even. For kernels templated on float / bfloat16 elements.
ALWAYS_INLINE float widen(float x) { return x; }
ALWAYS_INLINE float widen(uint16_t b) {
    const uint32_t bits = static_cast<uint32_t>(b) << 16;
    float x;
    std::memcpy(&x, &bits, sizeof x);
    return x;
}
ALWAYS_INLINE void narrow(float x, float* out) { *out = x; }
ALWAYS_INLINE void narrow(float x, uint16_t* out) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    *out = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// Below this much work (about 40 us on one core for the element-wise ops) an op stays on
// one thread: waking the team, and waiting at its barrier on a busy machine, costs more.
constexpr int64_t kMinParallelElements = 1 << 17;

inline bool worth_threading(int64_t elements) { return elements >= kMinParallelElements; }

// body(i) for i in [0, n), split statically over the OpenMP team only when `threaded`. A
// parallel region whose if() clause is false still goes through libgomp's region start
// and end, measured at ~0.35 us a call: more than a decode-sized rms_norm kernel.
template <class Body>
void parallel_for(int64_t n, bool threaded, Body&& body) {
    if (!threaded) {
        for (int64_t i = 0; i < n; ++i) body(i);
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) body(i);
}

// For each thread of the OpenMP team, state = make_state(); then body(state, item) for
// every item in [0, n), each exactly once. Items are cut into one contiguous run per thread
// (streaming neighbouring rows keeps the prefetchers ahead), and a thread that finishes its
// run takes the items still waiting in the others' runs. A plain static split makes every
// call wait for its slowest thread: in the HTTP server, where the event loop and the
// clients share the cores, one-stream decode took 10 ms per token instead of 6.
template <class MakeState, class Body>
void for_each_in_runs(int64_t n, MakeState&& make_state, Body&& body) {
    const int runs = omp_get_max_threads();
    // each run's next item: owner and helpers draw from the same counter
    std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[runs]);
    for (int r = 0; r < runs; ++r) next[r].store(n * r / runs, std::memory_order_relaxed);
#pragma omp parallel num_threads(runs)
    {
        auto state = make_state();
        const int self = omp_get_thread_num();
        for (int k = 0; k < runs; ++k) {  // all runs, even if the team came up smaller
            const int r = (self + k) % runs;
            const int64_t end = n * (r + 1) / runs;
            for (int64_t item; (item = next[r].fetch_add(1, std::memory_order_relaxed)) < end;)
                body(state, item);
        }
    }
}

// max() that GCC vectorises inside `omp simd reduction(max : ...)` loops (std::max, which
// returns a reference, keeps such loops scalar).
inline float greater_of(float a, float b) { return a > b ? a : b; }

[[noreturn]] inline void fail(const std::string& what) { throw std::invalid_argument(what); }

// A [tokens, ...] tensor whose dim 0 may have any stride (a slice of a fused projection)
// while each token's remaining dims form one dense block of `width` elements.
template <class T>
struct TokenRows {
    T* data;
    int64_t tokens;
    int64_t stride;  // elements between consecutive tokens
    int64_t width;   // dense elements per token

    T* row(int64_t t) const { return data + t * stride; }
};

// exp() written with plain arithmetic so that loops calling it vectorise: Cody-Waite range
// reduction x = n*ln2 + r (|r| <= ln2/2), a Taylor polynomial in r, and 2^n built directly
// in the exponent bits. Relative error stays within a few ulp over the clamped range.
inline float exp_f32(float x) {
    constexpr float kMaxArg = 88.0f;    // exp(88) < FLT_MAX
    constexpr float kMinArg = -87.0f;   // exp(-87) > FLT_MIN: the 2^n trick needs a normal
    constexpr float kLog2e = 1.44269504088896341f;
    constexpr float kLn2Hi = 0.693359375f;  // few mantissa bits: n * kLn2Hi is exact
    constexpr float kLn2Lo = -2.12194440e-4f;
    constexpr float kRoundShift = 12582912.0f;  // 1.5 * 2^23: adding it rounds to integer
    x = x > kMaxArg ? kMaxArg : x;
    x = x < kMinArg ? kMinArg : x;
    const float shifted = x * kLog2e + kRoundShift;
    const float n = shifted - kRoundShift;
    const float r = (x - n * kLn2Hi) - n * kLn2Lo;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits;
    std::memcpy(&bits, &shifted, sizeof(bits));
    const int32_t scale_bits = (bits - 0x4B400000 + 127) << 23;  // 2^n as a float
    float scale;
    std::memcpy(&scale, &scale_bits, sizeof(scale));
    return p * scale;
}

// Double-precision variant; arguments below kMinArg return exactly 0 (the true value would be
// subnormal, far below anything a probability walk can resolve).
inline double exp_f64(double x) {
    constexpr double kMaxArg = 709.0;
    constexpr double kMinArg = -708.0;
    constexpr double kLog2e = 1.4426950408889634;
    constexpr double kLn2Hi = 6.93147180369123816490e-01;  // trailing zeros: n * kLn2Hi exact
    constexpr double kLn2Lo = 1.90821492927058770002e-10;
    constexpr double kRoundShift = 6755399441055744.0;  // 1.5 * 2^52
    const bool underflow = x < kMinArg;
    x = x > kMaxArg ? kMaxArg : x;
    x = underflow ? kMinArg : x;
    const double shifted = x * kLog2e + kRoundShift;
    const double n = shifted - kRoundShift;
    const double r = (x - n * kLn2Hi) - n * kLn2Lo;
    // Taylor terms 1/k! for k = 13 .. 2; truncation error r^14/14! < 1e-17 at |r| <= ln2/2.
    double p = 1.0 / 6227020800.0;
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    int64_t bits;
    std::memcpy(&bits, &shifted, sizeof(bits));
    const int64_t scale_bits = (bits - 0x4338000000000000LL + 1023) << 52;
    double scale;
    std::memcpy(&scale, &scale_bits, sizeof(scale));
    return underflow ? 0.0 : p * scale;
}

}  // namespace llama_ops
