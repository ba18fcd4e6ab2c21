// Float32-activation kernels written once for any vector width. Included (deliberately
// without #pragma once) inside each ISA namespace of quant_f32.h, right after that
// namespace defines `struct V` (vector traits) under the matching #pragma GCC target, so
// every instantiation is compiled for its own instruction set.
//
// V provides: F (float vector), I (int32 vector), kLanes, zero, set1, load, store, mul,
// fma, reduce, to_float, sub_i32, and widen<SIGNED>(16 bytes, I* out) writing
// 16 / kLanes int32 vectors.

constexpr int kVecsPerBlock = kBlock / V::kLanes;
constexpr int kVecsPer16Bytes = 16 / V::kLanes;

// One block -> its 32 float32 weights: d * q exactly as quant.dequantize computes it; for
// Q4_1 d * q + m in one FMA (a single rounding: within half an ulp of the reference's
// mul-then-add, and one instruction fewer).
template <QType T>
inline void block_to_f32(const uint8_t* blk, typename V::F* w) {
    constexpr FormatInfo f = format_info(T);
    const uint8_t* qs = blk + f.header_bytes;
    typename V::I q[kVecsPerBlock];
    if (T == QType::Q8_0) {
        V::template widen<true>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs)), q);
        V::template widen<true>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16)),
                                q + kVecsPer16Bytes);
    } else {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
        const __m128i nibble_mask = _mm_set1_epi8(0x0F);
        V::template widen<false>(_mm_and_si128(bytes, nibble_mask), q);
        V::template widen<false>(_mm_and_si128(_mm_srli_epi16(bytes, 4), nibble_mask),
                                 q + kVecsPer16Bytes);
    }
    const typename V::F d = V::set1(_cvtsh_ss(load_u16(blk)));
    const typename V::F m = V::set1(f.has_min ? _cvtsh_ss(load_u16(blk + 2)) : 0.0f);
    for (int i = 0; i < kVecsPerBlock; ++i) {
        const typename V::I qi = T == QType::Q4_0 ? V::sub_i32(q[i], 8) : q[i];
        w[i] = f.has_min ? V::fma(d, V::to_float(qi), m) : V::mul(d, V::to_float(qi));
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
            // rows stream from memory once: fetch the next tile's rows meanwhile
            _mm_prefetch(reinterpret_cast<const char*>(blk + kTileRows * row_bytes), _MM_HINT_T0);
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
