// The streaming (online) softmax normaliser shared by the row kernels, and how a saved one is subtracted.
//
// For a row of raw logits x and inverse temperature u = 1/T: logsumexp(u x) = c + log S, with m the running
// max of x, c = u m (rounded to the math type) and S = sum_j e^(u x_j - c). Rows are read in blocks of kBlock
// elements (a block of each input stays in L1 between its two reads): first the block max (no exp); if it
// raised m, S and every sum kept in the same frame are multiplied once by e^(c_old - c_new); then one exp
// per element.
// A log-normaliser A = c + log S is saved in double and split into two values of the math type, A = hi + lo.
// A log-probability u x - A is formed in two steps, z - lo with z = fma(x, u, -hi) (rounded relative to |z|,
// not to |A|: a single fp32 A near 1e4 is off by up to 5e-4, and so would be every log p), and a probability as
// e^z e^-lo, so that it carries no rounding of log p either (that of |log p| ~ 10 would be ~4 ulp of p).
#pragma once

#include "vec_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace trd_fast::cpu {

inline constexpr int64_t kBlock = 2048;  // elements per block: 8 KB of fp32 per input

template <typename acc_t>
struct OnlineSoftmax {
  acc_t max = -kInf<acc_t>;    // running max of the raw logits (-inf until a finite one is seen)
  acc_t shift = -kInf<acc_t>;  // c = u max
  double sum = 0;              // S = sum e^(u x - c)

  // Moves to max(max, block_max); returns the factor that rescales sums kept in the old frame (S included).
  double advance(acc_t block_max, acc_t inv_t) {
    if (!(block_max > max)) return 1;  // also for a NaN block max
    const acc_t new_shift = block_max * inv_t;
    const double factor = max == -kInf<acc_t> ? 0.0 : std::exp(double(shift) - double(new_shift));
    sum *= factor;
    max = block_max;
    shift = new_shift;
    return factor;
  }

  // -c, the addend of the exponent u x - c; -inf while every logit seen is -inf, so that the exponent is -inf
  // (e^... = 0) instead of -inf + inf = NaN.
  acc_t neg_shift() const { return max == -kInf<acc_t> ? -kInf<acc_t> : -shift; }

  // logsumexp(u x) of the row so far; -inf for a row of -inf.
  double lse() const { return double(shift) + std::log(sum); }
};

// A row's saved log-normaliser A = hi + lo (lo = 0 in double), for log p = z - lo and p = e^z e^-lo with
// z = fma(x, u, -hi).
template <typename acc_t>
struct LogNormaliser {
  Vectorized<acc_t> neg_hi;      // -hi
  Vectorized<acc_t> neg_lo;      // -lo
  Vectorized<acc_t> exp_neg_lo;  // e^-lo

  explicit LogNormaliser(double lse)
      : LogNormaliser(acc_t(lse), std::isfinite(lse) ? double(acc_t(lse)) - lse : 0.0) {}

  Vectorized<acc_t> shifted(const Vectorized<acc_t>& x, const Vectorized<acc_t>& u) const {
    return at::vec::fmadd(x, u, neg_hi);
  }
  Vectorized<acc_t> log_prob(const Vectorized<acc_t>& z) const { return z + neg_lo; }
  Vectorized<acc_t> prob(const Vectorized<acc_t>& z) const { return vexp(z) * exp_neg_lo; }

 private:
  LogNormaliser(acc_t hi, double neg_lo_value)
      : neg_hi(-hi), neg_lo(acc_t(neg_lo_value)), exp_neg_lo(acc_t(std::exp(neg_lo_value))) {}
};

// Largest element of x[0, n), n >= 1. A NaN element may or may not be skipped: callers detect NaN themselves.
template <typename acc_t, typename scalar_t>
inline acc_t block_max(const scalar_t* x, int64_t n) {
  using Vec = Vectorized<acc_t>;
  Vec m(-kInf<acc_t>);
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) m = at::vec::clamp_min(m, load<acc_t>(x + i));
  if (i < n) m = at::vec::clamp_min(m, load<acc_t>(x + i, n - i, -kInf<acc_t>));
  return reduce_max(m);
}

}  // namespace trd_fast::cpu
