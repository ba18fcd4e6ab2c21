// Batched LoRA tile kernels written once for any vector width. Included (deliberately
// without #pragma once) inside each ISA namespace of lora_simd.h, right after that namespace
// defines `struct V` (vector traits, as quant_f32_kernels.h takes them, plus a bfloat16
// load, add and prefetch) under the matching #pragma GCC target.
//
// Both kernels work on a run of at most kMaxRunTokens tokens of one adapter slot, given as
// row pointers (a run's tokens are scattered over the step), and keep their sums in
// registers: shrink a tile of kShrinkRows weight rows x up to kMaxTokens tokens, expand a
// tile of kExpandVectors column vectors x up to kMaxTokens tokens. Weights are float32 or
// bfloat16 (widened exactly to float32 on load); all arithmetic is float32.

// Token rows per register tile: kShrinkRows x kMaxTokens accumulators plus the operands
// must fit the register file (32 zmm; 16 ymm for AVX2).
constexpr int kMaxTokens = V::kRegisters >= 32 ? 4 : 2;
constexpr int kShrinkRows = 4;
constexpr int kExpandVectors = 4;
// The weights stream from memory once per step (16 adapters: ~5 MB a decoder layer) with a
// few hundred cycles of latency; a tile's FMAs take under a hundred, so the tiles prefetch
// the weights this many tiles ahead.
constexpr int kPrefetchTiles = 4;
constexpr int kCacheLine = 64;

// h[t][r0 + i] = x[t] . w[i] for i < valid_rows (w: kShrinkRows rows, k apart; rows past
// valid_rows re-read the last valid one).
template <int TOKENS, class W>
inline void shrink_tile(const float* const* x, const W* a, int valid_rows, int64_t k,
                        int64_t r0, float* const* h) {
    const W* w[kShrinkRows];
    for (int i = 0; i < kShrinkRows; ++i) w[i] = a + std::min(i, valid_rows - 1) * k;
    typename V::F acc[kShrinkRows][TOKENS];
    for (auto& row : acc)
        for (auto& v : row) v = V::zero();
    int64_t j = 0;
    for (; j + V::kLanes <= k; j += V::kLanes) {
        typename V::F wv[kShrinkRows];
        for (int i = 0; i < kShrinkRows; ++i) {
            V::prefetch(w[i] + j + kPrefetchTiles * kShrinkRows * k);
            wv[i] = V::load(w[i] + j);
        }
        for (int t = 0; t < TOKENS; ++t) {
            const typename V::F xv = V::load(x[t] + j);
            for (int i = 0; i < kShrinkRows; ++i) acc[i][t] = V::fma(wv[i], xv, acc[i][t]);
        }
    }
    float tail[kShrinkRows][TOKENS] = {};
    for (; j < k; ++j) {
        for (int i = 0; i < kShrinkRows; ++i)
            for (int t = 0; t < TOKENS; ++t) tail[i][t] += to_float(w[i][j]) * x[t][j];
    }
    for (int i = 0; i < valid_rows; ++i)
        for (int t = 0; t < TOKENS; ++t) h[t][r0 + i] = V::reduce(acc[i][t]) + tail[i][t];
}

template <int TOKENS, class W>
inline void shrink_tokens(const float* const* x, const W* a, int64_t rows, int64_t k,
                          float* const* h) {
    for (int64_t r = 0; r < rows; r += kShrinkRows) {
        const int valid_rows = static_cast<int>(std::min<int64_t>(kShrinkRows, rows - r));
        shrink_tile<TOKENS>(x, a + r * k, valid_rows, k, r, h);
    }
}

// h[t][:rows] = x[t] @ a^T for `count` tokens (a: [rows, k] of one slot).
template <class W>
void shrink_run(const float* const* x, int64_t count, const W* a, int64_t rows, int64_t k,
                float* const* h) {
    for (int64_t t = 0; t < count; t += kMaxTokens) {
        switch (std::min<int64_t>(kMaxTokens, count - t)) {
            case 1: shrink_tokens<1>(x + t, a, rows, k, h + t); break;
            case 2: shrink_tokens<2>(x + t, a, rows, k, h + t); break;
            case 3: shrink_tokens<std::min(3, kMaxTokens)>(x + t, a, rows, k, h + t); break;
            default: shrink_tokens<kMaxTokens>(x + t, a, rows, k, h + t); break;
        }
    }
}

// Columns [c, c + VECTORS * kLanes) of y[t] (t < TOKENS): the rank sum is accumulated in
// registers, then y = (y + sum) * ratio (ratio null: 1).
template <int TOKENS, int VECTORS, class W>
inline void expand_tile(const float* const* h, int64_t h_offset, const W* b, int64_t n,
                        int64_t rank, float scale, const float* ratio, int64_t c,
                        float* const* y) {
    typename V::F acc[TOKENS][VECTORS];
    for (auto& row : acc)
        for (auto& v : row) v = V::zero();
    constexpr int64_t kWidth = VECTORS * V::kLanes;
    for (int64_t r = 0; r < rank; ++r) {
        const char* ahead = reinterpret_cast<const char*>(b + r * n + c + kPrefetchTiles * kWidth);
        for (int64_t line = 0; line < kWidth * int64_t(sizeof(W)); line += kCacheLine)
            V::prefetch(ahead + line);
        typename V::F bv[VECTORS];
        for (int v = 0; v < VECTORS; ++v) bv[v] = V::load(b + r * n + c + v * V::kLanes);
        for (int t = 0; t < TOKENS; ++t) {
            const typename V::F hv = V::set1(scale * h[t][h_offset + r]);
            for (int v = 0; v < VECTORS; ++v) acc[t][v] = V::fma(hv, bv[v], acc[t][v]);
        }
    }
    for (int t = 0; t < TOKENS; ++t) {
        for (int v = 0; v < VECTORS; ++v) {
            float* out = y[t] + c + v * V::kLanes;
            typename V::F sum = V::add(V::load(out), acc[t][v]);
            if (ratio != nullptr) sum = V::mul(sum, V::load(ratio + c + v * V::kLanes));
            V::store(out, sum);
        }
    }
}

template <int TOKENS, class W>
inline void expand_tokens(const float* const* h, int64_t h_offset, const W* b, int64_t n,
                          int64_t rank, float scale, const float* ratio, int64_t c0,
                          int64_t c1, float* const* y) {
    constexpr int64_t kWide = kExpandVectors * V::kLanes;
    int64_t c = c0;
    for (; c + kWide <= c1; c += kWide)
        expand_tile<TOKENS, kExpandVectors>(h, h_offset, b, n, rank, scale, ratio, c, y);
    for (; c + V::kLanes <= c1; c += V::kLanes)
        expand_tile<TOKENS, 1>(h, h_offset, b, n, rank, scale, ratio, c, y);
    for (; c < c1; ++c) {  // columns left over from whole vectors
        for (int t = 0; t < TOKENS; ++t) {
            float sum = 0.0f;
            for (int64_t r = 0; r < rank; ++r)
                sum += scale * h[t][h_offset + r] * to_float(b[r * n + c]);
            const float out = y[t][c] + sum;
            y[t][c] = ratio != nullptr ? out * ratio[c] : out;
        }
    }
}

// For `count` tokens and the columns [c0, c1) of one output slice:
//   y[t][c] = ratio[c] * (y[t][c] + scale * sum_r h[t][h_offset + r] * b[r * n + c])
// (b: the slot's B^T [rank, n]; ratio: the slot's [n] DoRA ratio, or null for 1).
template <class W>
void expand_run(const float* const* h, int64_t h_offset, int64_t count, const W* b, int64_t n,
                int64_t rank, float scale, const float* ratio, int64_t c0, int64_t c1,
                float* const* y) {
    for (int64_t t = 0; t < count; t += kMaxTokens) {
        switch (std::min<int64_t>(kMaxTokens, count - t)) {
            case 1: expand_tokens<1>(h + t, h_offset, b, n, rank, scale, ratio, c0, c1, y + t);
                break;
            case 2: expand_tokens<2>(h + t, h_offset, b, n, rank, scale, ratio, c0, c1, y + t);
                break;
            case 3:
                expand_tokens<std::min(3, kMaxTokens)>(h + t, h_offset, b, n, rank, scale, ratio,
                                                       c0, c1, y + t);
                break;
            default:
                expand_tokens<kMaxTokens>(h + t, h_offset, b, n, rank, scale, ratio, c0, c1,
                                          y + t);
                break;
        }
    }
}

inline const KernelSet kernels = {name, shrink_run<float>, shrink_run<uint16_t>,
                                  expand_run<float>, expand_run<uint16_t>};
