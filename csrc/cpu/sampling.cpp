// CPU kernel of the sampling family: one token per row of logits drawn from softmax(logits / T) restricted by
// top-k, top-p and min-p (Hugging Face's warpers, applied in that order), with its log-prob.
//
// Every filter keeps the entries at or above a threshold value, so the kept set is {x >= tau} with tau the
// largest of the three thresholds, and the draw is an inverse-CDF walk: one uniform u per row, the token is
// the first kept entry (in vocab order) at which the running sum of exp((x - max) / T) exceeds u * Z_kept.
// Per row: one read for the max and the full sum (online, rescaled per block) and the top-k heap (blocks whose
// max cannot enter it are skipped); with top-p a second read builds a histogram of probability mass over
// (max - x) / T, and only the bucket where the nucleus ends is sorted; the walk reads half the row on average.
// No (rows, V) temporary; bf16 / fp16 rows are widened a block at a time. Rows are spread over threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../logprobs_common.h"
#include "float_rows.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <queue>
#include <vector>

namespace rlhf_fast {
namespace {

using rows::kNegInf;

constexpr int64_t kBlock = 1024;
constexpr float kLog2e = 1.44269504f;
// top-p histogram: buckets of (max - x) / T, kBucketsPerNat per nat up to kHistNats; the last bucket takes
// everything further below the max.
constexpr int kBucketsPerNat = 32;
constexpr int kHistNats = 40;
constexpr int kBuckets = kBucketsPerNat * kHistNats + 1;

struct Filters {
  int64_t top_k;  // 0: off
  double top_p;   // 1: off
  double min_p;   // 0: off
};

// sum of 2^((x - m) * scale2) over the entries with x >= threshold
RLHF_FAST_SIMD_CLONES float sum_exp2_above(const float* x, int64_t n, float scale2, float m, float threshold) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i] >= threshold ? rows::exp2_approx((x[i] - m) * scale2) : 0.f;
  return s;
}

bool has_nan(const float* x, int64_t n) {
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) nan |= std::isnan(x[i]);
  return nan;
}

struct RowDraw {
  int64_t token;
  float logp_kept, logp_full;
};

template <typename scalar_t>
class RowSampler {
 public:
  RowSampler(int64_t vocab, float temperature, Filters filters)
      : vocab_(vocab),
        inv_t_(1.f / temperature),
        scale2_(kLog2e / temperature),
        temperature_(temperature),
        filters_(filters) {}

  RowDraw draw(const scalar_t* row, double u) {
    // 1. max, full sum (online: rescaled when a block raises the max), NaN check, top-k threshold
    float m = kNegInf, s = 0.f;
    bool nan = false;
    heap_ = {};
    for (int64_t j = 0; j < vocab_; j += kBlock) {
      const int64_t n = std::min(kBlock, vocab_ - j);
      const float* x = rows::as_float(row + j, n, buf_);
      const float block_max = rows::max_of(x, n);
      nan |= has_nan(x, n);
      if (block_max > m) {
        if (s > 0.f) s *= std::exp2((m - block_max) * scale2_);
        m = block_max;
      }
      if (m != kNegInf) s += sum_exp2_above(x, n, scale2_, m, kNegInf);
      if (filters_.top_k > 0) push_top_k(x, n, block_max);
    }
    if (nan || m == kNegInf)
      return {0, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::quiet_NaN()};

    // 2. thresholds: top-k, then top-p over the top-k set, then min-p (relative to the max, which all keep)
    float tau = kNegInf;
    double kept_mass = s;
    if (filters_.top_k > 0 && static_cast<int64_t>(heap_.size()) == filters_.top_k) {
      tau = heap_.top();
      kept_mass = sum_above(row, m, tau);
    }
    if (filters_.top_p < 1.0) {
      const auto [tau_p, mass_p] = top_p_threshold(row, m, tau, kept_mass);
      if (tau_p > tau) {
        tau = tau_p;
        kept_mass = mass_p;
      }
    }
    if (filters_.min_p > 0.0) {
      const float tau_min = m + static_cast<float>(temperature_ * std::log(filters_.min_p));
      if (tau_min > tau) {
        tau = tau_min;
        kept_mass = sum_above(row, m, tau);
      }
    }

    // 3. the inverse-CDF walk over the kept entries
    const double target = u * kept_mass;
    double cum = 0.0;
    int64_t token = -1;
    for (int64_t j = 0; j < vocab_ && token < 0; j += kBlock) {
      const int64_t n = std::min(kBlock, vocab_ - j);
      const float* x = rows::as_float(row + j, n, buf_);
      const float block_sum = sum_exp2_above(x, n, scale2_, m, tau);
      if (block_sum > 0.f) last_block_ = j;
      if (cum + block_sum <= target) {
        cum += block_sum;
        continue;
      }
      for (int64_t i = 0; i < n; ++i) {
        const float e = x[i] >= tau ? rows::exp2_approx((x[i] - m) * scale2_) : 0.f;
        cum += e;
        if (e > 0.f && cum > target) {
          token = j + i;
          break;
        }
      }
    }
    if (token < 0) token = last_kept(row, m, tau);  // the sums rounded below the target
    const float x_token = static_cast<float>(row[token]);
    const float z = (x_token - m) * inv_t_;
    return {token, z - static_cast<float>(std::log(kept_mass)), z - std::log(s)};
  }

 private:
  void push_top_k(const float* x, int64_t n, float block_max) {
    const auto k = static_cast<size_t>(filters_.top_k);
    if (heap_.size() == k && !(block_max > heap_.top())) return;  // nothing here enters the k largest
    for (int64_t i = 0; i < n; ++i) {
      if (heap_.size() < k) {
        heap_.push(x[i]);
      } else if (x[i] > heap_.top()) {  // equal values leave the k-th largest (with multiplicity) unchanged
        heap_.pop();
        heap_.push(x[i]);
      }
    }
  }

  double sum_above(const scalar_t* row, float m, float threshold) {
    double total = 0.0;
    for (int64_t j = 0; j < vocab_; j += kBlock) {
      const int64_t n = std::min(kBlock, vocab_ - j);
      total += sum_exp2_above(rows::as_float(row + j, n, buf_), n, scale2_, m, threshold);
    }
    return total;
  }

  // Hugging Face's top-p: over the entries x >= floor (mass Z), an entry is removed when the mass of the
  // entries at or below it is <= (1 - p) Z (equal values are kept or removed together). Returns the smallest
  // kept value and the kept mass.
  std::pair<float, double> top_p_threshold(const scalar_t* row, float m, float floor, double mass) {
    std::fill(hist_, hist_ + kBuckets, 0.0);
    for (int64_t j = 0; j < vocab_; j += kBlock) {
      const int64_t n = std::min(kBlock, vocab_ - j);
      const float* x = rows::as_float(row + j, n, buf_);
      for (int64_t i = 0; i < n; ++i) {
        if (!(x[i] >= floor)) continue;
        const float e = rows::exp2_approx((x[i] - m) * scale2_);
        hist_[bucket((m - x[i]) * inv_t_)] += e;
      }
    }
    // buckets run from the max (0) down; the removed mass is a prefix counted from the far end
    const double removable = (1.0 - filters_.top_p) * mass;
    double below = 0.0;  // mass of the buckets past the current one
    int b = kBuckets - 1;
    for (; b > 0 && below + hist_[b] <= removable; --b) below += hist_[b];
    // the boundary bucket b: sort its entries ascending and find the first one that stays
    edge_.clear();
    for (int64_t j = 0; j < vocab_; j += kBlock) {
      const int64_t n = std::min(kBlock, vocab_ - j);
      const float* x = rows::as_float(row + j, n, buf_);
      for (int64_t i = 0; i < n; ++i)
        if (x[i] >= floor && bucket((m - x[i]) * inv_t_) == b) edge_.push_back(x[i]);
    }
    std::sort(edge_.begin(), edge_.end());
    // the kept mass is summed from the kept side (positive terms only: no cancellation against the total)
    double kept_above = 0.0;
    for (int a = 0; a < b; ++a) kept_above += hist_[a];
    std::vector<std::pair<float, double>>& groups = groups_;  // (value, mass of the entries equal to it)
    groups.clear();
    for (size_t i = 0; i < edge_.size();) {
      size_t tie_end = i;
      double group = 0.0;
      for (; tie_end < edge_.size() && edge_[tie_end] == edge_[i]; ++tie_end)
        group += rows::exp2_approx((edge_[tie_end] - m) * scale2_);
      groups.emplace_back(edge_[i], group);
      i = tie_end;
    }
    double cum = below;
    size_t first_kept = groups.size();
    for (size_t g = 0; g < groups.size(); ++g) {
      if (cum + groups[g].second > removable) {
        first_kept = g;
        break;
      }
      cum += groups[g].second;
    }
    if (first_kept == groups.size()) first_kept = groups.empty() ? 0 : groups.size() - 1;  // rounding
    if (groups.empty()) return {m, kept_above};
    for (size_t g = first_kept; g < groups.size(); ++g) kept_above += groups[g].second;
    return {groups[first_kept].first, kept_above};
  }

  static int bucket(float nats_below_max) {
    const float b = nats_below_max * kBucketsPerNat;
    return b >= kBuckets - 1 ? kBuckets - 1 : static_cast<int>(b);
  }

  // the last kept entry with a nonzero weight (in the last block that had one)
  int64_t last_kept(const scalar_t* row, float m, float tau) {
    const int64_t n = std::min(kBlock, vocab_ - last_block_);
    const float* x = rows::as_float(row + last_block_, n, buf_);
    for (int64_t i = n - 1; i > 0; --i)
      if (x[i] >= tau && rows::exp2_approx((x[i] - m) * scale2_) > 0.f) return last_block_ + i;
    return last_block_;
  }

  int64_t vocab_;
  float inv_t_, scale2_, temperature_;
  Filters filters_;
  float buf_[kBlock];
  double hist_[kBuckets];
  std::priority_queue<float, std::vector<float>, std::greater<float>> heap_;
  std::vector<float> edge_;
  std::vector<std::pair<float, double>> groups_;
  int64_t last_block_ = 0;
};

// logits (A, B, V) with a contiguous last dim; uniforms (A, B) float64 in [0, 1).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits, const at::Tensor& uniforms,
                                                          double temperature, int64_t top_k, double top_p,
                                                          double min_p) {
  const char* op = "sample";
  const auto layout = logprobs::row_layout(logits, op);
  logprobs::check_per_row(uniforms, logits, at::kDouble, "uniforms", op);
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0 (greedy decoding is an argmax)");
  TORCH_CHECK(top_k >= 0 && top_p > 0 && top_p <= 1 && min_p >= 0 && min_p <= 1, op, ": bad filter values");
  const auto shape = logits.sizes().slice(0, 2);
  auto tokens = at::empty(shape, logits.options().dtype(at::kLong));
  auto logp_kept = at::empty(shape, logits.options().dtype(at::kFloat));
  auto logp_full = at::empty_like(logp_kept);
  const Filters filters{top_k, top_p, min_p};
  const double* u = uniforms.data_ptr<double>();
  int64_t* token_out = tokens.data_ptr<int64_t>();
  float* kept_out = logp_kept.data_ptr<float>();
  float* full_out = logp_full.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "sample_cpu", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    at::parallel_for(0, layout.rows, rows::grain_rows(layout.vocab), [&](int64_t begin, int64_t end) {
      auto sampler = std::make_unique<RowSampler<scalar_t>>(layout.vocab, static_cast<float>(temperature), filters);
      for (int64_t r = begin; r < end; ++r) {
        const RowDraw d = sampler->draw(x + layout.offset(r), u[r]);
        token_out[r] = d.token;
        kept_out[r] = d.logp_kept;
        full_out[r] = d.logp_full;
      }
    });
  });
  return {tokens, logp_kept, logp_full};
}

}  // namespace

TORCH_LIBRARY_IMPL(rlhf_fast, CPU, m) { m.impl("sample", &sample_cpu); }

}  // namespace rlhf_fast
