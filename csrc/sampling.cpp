// Fused sampling: temperature, top-k, top-p and min-p with one uniform number per row, and
// greedy rows, reproducing kernels/reference.py::sample token for token.
//
// The reference ranks the whole vocabulary; here only as much of the ranking is built as the
// walk needs: the kept set is always a prefix of the ranking, so the ranked prefix grows in
// doubling chunks (nth_element + sort) until the walk stops. Probabilities are computed in
// double precision as in the reference, so the picks agree except at floating-point ties.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops_common.h"
#include "registry.h"
#include "views.h"

namespace py = pybind11;
using namespace llama_ops;

namespace {

constexpr int64_t kFirstRankChunk = 64;  // typical top-p sets fit in the first chunk or two
// Heap selection (partial_sort) beats nth_element + sort while the ranks wanted are fewer
// than 1/kHeapSelectRatio of the ids left.
constexpr int64_t kHeapSelectRatio = 16;
// Candidates with exp(logit/T - max) at least this (probability >= 1e-4 of the top one) are
// ranked first; the rest only when a walk gets past all of them.
constexpr double kHotFraction = 1e-4;
constexpr int64_t kArgmaxChunk = 256;  // logits per vector max before the scalar scan

struct RowParams {
    double temperature;
    int64_t top_k;
    double top_p, min_p, uniform;
};

LLAMA_SIMD_CLONES
float row_max(const float* logits, int64_t vocab) {
    float best = logits[0];
#pragma omp simd reduction(max : best)
    for (int64_t i = 0; i < vocab; ++i) best = greater_of(best, logits[i]);
    return best;
}

// Lowest id among the largest logits. Chunk maxima are vector reductions; only the first
// chunk holding the overall maximum is then scanned element by element.
LLAMA_SIMD_CLONES
int64_t argmax_row(const float* logits, int64_t vocab) {
    float best = -INFINITY;
    int64_t best_chunk = 0;
    for (int64_t start = 0; start < vocab; start += kArgmaxChunk) {
        const int64_t end = std::min(vocab, start + kArgmaxChunk);
        float chunk_max = -INFINITY;
#pragma omp simd reduction(max : chunk_max)
        for (int64_t i = start; i < end; ++i) chunk_max = greater_of(chunk_max, logits[i]);
        if (chunk_max > best) {
            best = chunk_max;
            best_chunk = start;
        }
    }
    for (int64_t i = best_chunk; i < vocab; ++i) {
        if (logits[i] == best) return i;
    }
    return 0;  // only reachable when the row holds NaNs
}

// e[i] = exp(logits[i] / temperature - scaled_max); returns the sum of e (the softmax
// denominator). Mirrors the reference's double-precision softmax of logits / temperature.
LLAMA_SIMD_CLONES
double row_exponentials(const float* logits, int64_t vocab, double temperature,
                        double scaled_max, double* e) {
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < vocab; ++i) {
        e[i] = exp_f64(static_cast<double>(logits[i]) / temperature - scaled_max);
        sum += e[i];
    }
    return sum;
}

// Candidate ids ranked lazily. ids[0, hot) hold the "hot" candidates, whose e reaches
// kHotFraction of the top one, and therefore all rank before ids[hot, size); most walks end
// inside the hot part, so the cold tail is never ranked. ids[0, sorted) are final
// (probability descending, lower id first on ties).
class LazyRanking {
  public:
    LazyRanking(std::vector<int32_t>& ids, int64_t hot, int64_t size, const double* e)
        : ids_(ids), hot_(hot), size_(size), e_(e) {}

    int32_t at(int64_t rank) {
        if (rank >= sorted_) extend(std::max({rank + 1, 2 * sorted_, kFirstRankChunk}));
        return ids_[rank];
    }

  private:
    void extend(int64_t n) {
        n = std::min(n, size_);
        if (sorted_ < hot_) select_sorted(sorted_, std::min(n, hot_), hot_);
        if (n > hot_) select_sorted(std::max(sorted_, hot_), n, size_);
        sorted_ = std::max(sorted_, n);
    }

    // Puts the best (to - from) ids of [from, end) in rank order at [from, to).
    void select_sorted(int64_t from, int64_t to, int64_t end) {
        if (to <= from) return;
        auto ranks_before = [this](int32_t a, int32_t b) {
            return e_[a] > e_[b] || (e_[a] == e_[b] && a < b);
        };
        auto first = ids_.begin() + from, nth = ids_.begin() + to, last = ids_.begin() + end;
        if ((to - from) * kHeapSelectRatio < end - from) {
            // Few ranks out of many ids: a bounded heap rejects most ids with one compare.
            std::partial_sort(first, nth, last, ranks_before);
        } else {
            std::nth_element(first, nth - 1, last, ranks_before);
            std::sort(first, nth, ranks_before);
        }
    }

    std::vector<int32_t>& ids_;
    int64_t hot_, size_;
    const double* e_;
    int64_t sorted_ = 0;
};

struct Candidates {
    int64_t hot, count;
};

// Ids whose probability reaches min_p times the largest one (all ids when min_p is 0),
// the hot ones first (see LazyRanking).
Candidates gather_candidates(const double* e, int64_t vocab, double inv_sum, double min_p,
                             std::vector<int32_t>& ids) {
    const double p_max = inv_sum;  // the top token's e is exp(0) = 1
    const double threshold = min_p * p_max;
    int64_t hot = 0, cold_start = vocab;  // cold ids fill the buffer from the back
    for (int64_t i = 0; i < vocab; ++i) {
        if (min_p > 0.0 && e[i] * inv_sum < threshold) continue;
        if (e[i] >= kHotFraction) {
            ids[hot++] = static_cast<int32_t>(i);
        } else {
            ids[--cold_start] = static_cast<int32_t>(i);
        }
    }
    const int64_t cold = vocab - cold_start;
    std::copy(ids.begin() + cold_start, ids.end(), ids.begin() + hot);
    return {hot, hot + cold};
}

// Number of leading ranks kept by top-p: rank r stays while the probability ranked before
// it sums to less than top_p (computed as cumsum - p, as the reference does).
int64_t top_p_prefix(LazyRanking& ranking, const double* e, double inv_sum, double top_p,
                     int64_t limit) {
    double cumulative = 0.0;
    for (int64_t r = 0; r < limit; ++r) {
        const double p = e[ranking.at(r)] * inv_sum;
        cumulative += p;
        if (cumulative - p >= top_p) return r;
    }
    return limit;
}

int64_t sample_row(const float* logits, int64_t vocab, const RowParams& row, double* e,
                   std::vector<int32_t>& ids) {
    if (row.temperature == 0.0) return argmax_row(logits, vocab);
    const float max_logit = row_max(logits, vocab);
    const double scaled_max = static_cast<double>(max_logit) / row.temperature;
    const double inv_sum = 1.0 / row_exponentials(logits, vocab, row.temperature, scaled_max, e);
    const Candidates gathered = gather_candidates(e, vocab, inv_sum, row.min_p, ids);
    const int64_t candidates = gathered.count;
    const int64_t limit = row.top_k > 0 ? std::min(row.top_k, candidates) : candidates;
    LazyRanking ranking(ids, gathered.hot, candidates, e);
    const int64_t kept = row.top_p < 1.0 ? top_p_prefix(ranking, e, inv_sum, row.top_p, limit)
                                         : limit;
    double total = 0.0;
    if (kept == candidates) {
        for (int64_t i = 0; i < candidates; ++i) total += e[ids[i]] * inv_sum;
    } else {
        for (int64_t r = 0; r < kept; ++r) total += e[ranking.at(r)] * inv_sum;
    }
    const double target = row.uniform * total;
    double running = 0.0;
    for (int64_t r = 0; r < kept; ++r) {
        const int32_t id = ranking.at(r);
        running += e[id] * inv_sum;
        if (running > target) return id;
    }
    return ranking.at(kept - 1);  // uniform == 1 (or rounding): the last kept rank
}

// top_k needs no check: any value <= 0 means no limit.
void check_params(const double* temperature, const double* top_p, const double* min_p,
                  const double* uniform, int64_t rows) {
    for (int64_t i = 0; i < rows; ++i) {
        if (!(temperature[i] >= 0.0)) fail("temperature: must be >= 0");
        if (!(top_p[i] > 0.0)) fail("top_p: must be > 0");
        if (!(min_p[i] >= 0.0 && min_p[i] <= 1.0)) fail("min_p: must lie in [0, 1]");
        if (!(uniform[i] >= 0.0 && uniform[i] <= 1.0)) fail("uniform: must lie in [0, 1]");
    }
}

void sample(const TensorView& logits, const TensorView& temperature, const TensorView& top_k,
            const TensorView& top_p, const TensorView& min_p, const TensorView& uniform,
            const TensorView& out) {
    const float* logit_data = dense<float>(logits, "logits", 2);
    const int64_t rows = logits.sizes[0], vocab = logits.sizes[1];
    const double* temp = dense<double>(temperature, "temperature", {rows});
    const int64_t* k = dense<int64_t>(top_k, "top_k", {rows});
    const double* p = dense<double>(top_p, "top_p", {rows});
    const double* mp = dense<double>(min_p, "min_p", {rows});
    const double* u = dense<double>(uniform, "uniform", {rows});
    int64_t* picks = dense<int64_t>(out, "out", {rows});
    if (vocab <= 0 || vocab > INT32_MAX) fail("logits: vocabulary size out of range");
    check_params(temp, p, mp, u, rows);
    py::gil_scoped_release release;
#pragma omp parallel if (rows > 1)
    {
        std::vector<double> e(vocab);
        std::vector<int32_t> ids(vocab);
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < rows; ++i) {
            const RowParams row{temp[i], k[i], p[i], mp[i], u[i]};
            picks[i] = sample_row(logit_data + i * vocab, vocab, row, e.data(), ids);
        }
    }
}

}  // namespace

void register_sampling(py::module_& m) {
    using namespace pybind11::literals;
    m.def("sample", &sample, "logits"_a, "temperature"_a, "top_k"_a, "top_p"_a, "min_p"_a,
          "uniform"_a, "out"_a,
          "One token per row of logits [B, V] float32; temperature/top_p/min_p/uniform "
          "float64 [B], top_k int64 [B]; writes int64 ids to out [B]. All C-contiguous CPU "
          "tensors.");
}
