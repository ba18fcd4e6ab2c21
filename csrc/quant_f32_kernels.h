// Float32-activation kernels written once for any vector width. Included (deliberately
// without #pragma once) inside each ISA namespace of quant_f32.h, right after that
// namespace defines `struct V` (vector traits) under the matching #pragma GCC target, so
// every instantiation is compiled for its own instruction set.
//
// V provides: F (float vector), I (int32 vector), kLanes, zero, set1, load, store, mul,
// fma, reduce, to_float, widen<SIGNED>(16 bytes, I* out) writing 16 / kLanes int32
// vectors, fp16_pair(two fp16 in 32 bits) -> lanes a, b, a, b, ..., even_lanes / odd_lanes
// (a or b everywhere), and nibbles_to_f32(16 bytes, scale, offset, F* w): the 32 nibbles
// (low nibbles first) as fma(scale, nibble, offset).

constexpr int kVecsPerBlock = kBlock / V::kLanes;
constexpr int kVecsPer16Bytes = 16 / V::kLanes;

// One block -> its 32 float32 weights, equal to quant.dequantize's: Q8_0 d * q; Q4_0
// d * (q - 8), computed as fma(d, q, -8d) (the same real number, rounded once); Q4_1
// d * q + m in one FMA (a single rounding: within half an ulp of the reference's
// mul-then-add). V::nibbles_to_f32 turns the 32 nibbles into fma(scale, nibble, offset).
template <QType T>
inline void block_to_f32(const uint8_t* blk, typename V::F* w) {
    constexpr FormatInfo f = format_info(T);
    const uint8_t* qs = blk + f.header_bytes;
    // fp16 d (and m) -> float lanes d, m, d, m, ...: one broadcast and one conversion
    const typename V::F dm = V::fp16_pair(load_u32(blk));
    const typename V::F d = V::even_lanes(dm);
    if (T == QType::Q8_0) {
        typename V::I q[kVecsPerBlock];
        V::template widen<true>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)), q);
        V::template widen<true>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16)),
                                q + kVecsPer16Bytes);
        for (int i = 0; i < kVecsPerBlock; ++i) w[i] = V::mul(d, V::to_float(q[i]));
    } else {
        const typename V::F offset = f.has_min ? V::odd_lanes(dm) : V::mul(d, V::set1(-8.0f));
        V::nibbles_to_f32(qs, d, offset, w);
    }
}

template <QType T>
void decode_rows_typed(const uint8_t* src, int64_t row_bytes, int rows, int K, float* out) {
    constexpr int kBytes = format_info(T).block_bytes;
    const int64_t next_chunk = rows * row_bytes;
    for (int r = 0; r < rows; ++r)
        for (int b = 0; b < K / kBlock; ++b) {
            const uint8_t* blk = src + r * row_bytes + static_cast<int64_t>(b) * kBytes;
            // the thread's next chunk usually follows this one: fetch it while computing
            _mm_prefetch(reinterpret_cast<const char*>(blk + next_chunk), _MM_HINT_T1);
            typename V::F w[kVecsPerBlock];
            block_to_f32<T>(blk, w);
            float* dst = out + static_cast<int64_t>(r) * K + b * kBlock;
            for (int i = 0; i < kVecsPerBlock; ++i) V::store(dst + i * V::kLanes, w[i]);
        }
}

inline void decode_rows(QType t, const uint8_t* src, int64_t row_bytes, int rows, int K,
                        float* out) {
    switch (t) {
        case QType::Q4_0: decode_rows_typed<QType::Q4_0>(src, row_bytes, rows, K, out); break;
        case QType::Q4_1: decode_rows_typed<QType::Q4_1>(src, row_bytes, rows, K, out); break;
        case QType::Q8_0: decode_rows_typed<QType::Q8_0>(src, row_bytes, rows, K, out); break;
    }
}

template <int ACTS>
inline void store_tile(typename V::F (&acc)[kTileRows][ACTS], int valid_rows, float* out,
                       int64_t ldo) {
    for (int r = 0; r < valid_rows; ++r)
        for (int c = 0; c < ACTS; ++c) out[c * ldo + r] = V::reduce(acc[r][c]);
}

template <int ACTS>
void tile_impl(const float* w, int valid_rows, const float* x, int K, float* out, int64_t ldo) {
    typename V::F acc[kTileRows][ACTS];
    for (auto& row : acc)
        for (auto& v : row) v = V::zero();
    for (int k = 0; k < K; k += V::kLanes) {
        typename V::F wv[kTileRows];
        for (int r = 0; r < kTileRows; ++r) wv[r] = V::load(w + static_cast<int64_t>(r) * K + k);
        for (int c = 0; c < ACTS; ++c) {
            const typename V::F xv = V::load(x + static_cast<int64_t>(c) * K + k);
            for (int r = 0; r < kTileRows; ++r) acc[r][c] = V::fma(wv[r], xv, acc[r][c]);
        }
    }
    store_tile(acc, valid_rows, out, ldo);
}

template <QType T, int ACTS>
void packed_tile_impl(const uint8_t* const (&rows)[kTileRows], int64_t row_bytes, int valid_rows,
                      const float* x, int K, float* out, int64_t ldo) {
    constexpr int kBytes = format_info(T).block_bytes;
    typename V::F acc[kTileRows][ACTS];
    for (auto& row : acc)
        for (auto& v : row) v = V::zero();
    for (int b = 0; b < K / kBlock; ++b) {
        typename V::F w[kTileRows][kVecsPerBlock];
        for (int r = 0; r < kTileRows; ++r) {
            const uint8_t* blk = rows[r] + static_cast<int64_t>(b) * kBytes;
            // rows stream from memory once: fetch later tiles' rows meanwhile
            _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchL1Rows * row_bytes), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchL2Rows * row_bytes), _MM_HINT_T1);
            block_to_f32<T>(blk, w[r]);
        }
        for (int c = 0; c < ACTS; ++c) {
            const float* xb = x + static_cast<int64_t>(c) * K + b * kBlock;
            for (int i = 0; i < kVecsPerBlock; ++i) {
                const typename V::F xv = V::load(xb + i * V::kLanes);
                for (int r = 0; r < kTileRows; ++r) acc[r][c] = V::fma(w[r][i], xv, acc[r][c]);
            }
        }
    }
    store_tile(acc, valid_rows, out, ldo);
}

inline void tile(const float* w, int valid_rows, const float* x, int acts, int K, float* out,
                 int64_t ldo) {
    switch (std::min(acts, kMaxActs)) {
        case 1: tile_impl<1>(w, valid_rows, x, K, out, ldo); break;
        case 2: tile_impl<2>(w, valid_rows, x, K, out, ldo); break;
        case 3: tile_impl<std::min(3, kMaxActs)>(w, valid_rows, x, K, out, ldo); break;
        default: tile_impl<kMaxActs>(w, valid_rows, x, K, out, ldo); break;
    }
}

template <QType T>
void packed_tile_typed(const uint8_t* base, int64_t row_bytes, int valid_rows, const float* x,
                       int acts, int K, float* out, int64_t ldo) {
    const uint8_t* rows[kTileRows];
    for (int r = 0; r < kTileRows; ++r)  // rows past the end re-read the last valid one
        rows[r] = base + std::min(r, valid_rows - 1) * row_bytes;
    switch (std::min(acts, kMaxActs)) {
        case 1: packed_tile_impl<T, 1>(rows, row_bytes, valid_rows, x, K, out, ldo); break;
        case 2: packed_tile_impl<T, 2>(rows, row_bytes, valid_rows, x, K, out, ldo); break;
        case 3: packed_tile_impl<T, std::min(3, kMaxActs)>(rows, row_bytes, valid_rows, x, K, out, ldo); break;
        default: packed_tile_impl<T, kMaxActs>(rows, row_bytes, valid_rows, x, K, out, ldo); break;
    }
}

inline void packed_tile(QType t, const uint8_t* rows, int64_t row_bytes, int valid_rows,
                        const float* x, int acts, int K, float* out, int64_t ldo) {
    switch (t) {
        case QType::Q4_0: packed_tile_typed<QType::Q4_0>(rows, row_bytes, valid_rows, x, acts, K, out, ldo); break;
        case QType::Q4_1: packed_tile_typed<QType::Q4_1>(rows, row_bytes, valid_rows, x, acts, K, out, ldo); break;
        case QType::Q8_0: packed_tile_typed<QType::Q8_0>(rows, row_bytes, valid_rows, x, acts, K, out, ldo); break;
    }
}
