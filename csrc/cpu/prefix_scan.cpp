// Prefix scans of a per-token signal along each trajectory: the inclusive cumulative sum and the first
// position whose trailing mean exceeds a threshold (the splice point of TRD-splice).
//
// Maths. Row b of signal [B, L], length n = lengths[b] in [0, L], window w >= 1:
//   cumsum[b, t] = sum_{i <= t} signal[b, i] for t < n, 0 for t >= n (accumulated in double);
//   first[b] = min { t < n : S_t / min(t + 1, w) > threshold }, n if there is none,
//   S_t = sum_{i = max(0, t - w + 1)}^{t} signal[b, i].
// S_t is kept as counts of the NaN, +inf and -inf values in the window plus a compensated (Neumaier) running
// sum of its finite values: the entering value is added and the leaving one, signal[b, t - w], subtracted.
// A NaN or infinity therefore affects exactly the windows that contain it (unlike a difference of cumsums).
// One pass per row, rows in parallel.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

namespace trd_fast::cpu {
namespace {

// Sum of the values in a sliding window.
class WindowSum {
 public:
  void add(double x) { update(x, 1); }
  void remove(double x) { update(x, -1); }

  double value() const {
    if (nan_ > 0 || (pos_inf_ > 0 && neg_inf_ > 0)) return std::numeric_limits<double>::quiet_NaN();
    if (pos_inf_ > 0) return std::numeric_limits<double>::infinity();
    if (neg_inf_ > 0) return -std::numeric_limits<double>::infinity();
    return sum_ + compensation_;
  }

 private:
  void update(double x, int64_t sign) {
    if (std::isnan(x)) {
      nan_ += sign;
    } else if (std::isinf(x)) {
      (x > 0 ? pos_inf_ : neg_inf_) += sign;
    } else {
      const double y = sign > 0 ? x : -x;
      const double t = sum_ + y;
      compensation_ += std::abs(sum_) >= std::abs(y) ? (sum_ - t) + y : (y - t) + sum_;
      sum_ = t;
    }
  }

  double sum_ = 0;           // finite values, with compensation_ the rounding error lost so far
  double compensation_ = 0;
  int64_t nan_ = 0;          // NaN values in the window
  int64_t pos_inf_ = 0;      // +inf values
  int64_t neg_inf_ = 0;      // -inf values
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> prefix_scan(const at::Tensor& signal, const at::Tensor& lengths, double threshold,
                                               int64_t window) {
  TORCH_CHECK(signal.device().is_cpu() && lengths.device().is_cpu(), "prefix_scan: CPU tensors expected");
  TORCH_CHECK(signal.dim() == 2, "signal must be [B, L], got ", signal.sizes());
  TORCH_CHECK(at::isFloatingType(signal.scalar_type()), "signal must be floating point, got ", signal.scalar_type());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == signal.size(0), "lengths must be [B] = [", signal.size(0),
              "], got ", lengths.sizes());
  TORCH_CHECK(lengths.scalar_type() == at::kLong, "lengths must be int64, got ", lengths.scalar_type());
  TORCH_CHECK(window >= 1, "window must be >= 1, got ", window);
  const int64_t batch = signal.size(0), length = signal.size(1);
  const at::Tensor lens = lengths.contiguous();
  const int64_t* len_ptr = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(len_ptr[b] >= 0 && len_ptr[b] <= length, "lengths[", b, "] = ", len_ptr[b], " is outside [0, ",
                length, "]");
  }
  at::Tensor cumsum = at::empty({batch, length}, signal.options());
  at::Tensor first = at::empty({batch}, lengths.options());
  int64_t* first_ptr = first.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, signal.scalar_type(), "prefix_scan", [&] {
    const scalar_t* in = signal.data_ptr<scalar_t>();
    scalar_t* out = cumsum.data_ptr<scalar_t>();
    const int64_t s0 = signal.stride(0), s1 = signal.stride(1);
    at::parallel_for(0, batch, std::max<int64_t>(1, 4096 / std::max<int64_t>(length, 1)), [&](int64_t begin,
                                                                                              int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* x = in + b * s0;
        scalar_t* c = out + b * length;
        const int64_t n = len_ptr[b];
        double running = 0;
        WindowSum trailing;
        int64_t hit = n;
        for (int64_t t = 0; t < n; ++t) {
          const double v = double(x[t * s1]);
          running += v;
          c[t] = scalar_t(running);
          trailing.add(v);
          if (t >= window) trailing.remove(double(x[(t - window) * s1]));
          if (hit == n && trailing.value() / double(std::min(t + 1, window)) > threshold) hit = t;
        }
        std::fill(c + n, c + length, scalar_t(0));
        first_ptr[b] = hit;
      }
    });
  });
  return {cumsum, first};
}

}  // namespace trd_fast::cpu
