// Per-position student/teacher divergences over rows of [B, L, V] logits: the forward (value and saved
// statistics) and the backward (the gradient w.r.t. the student, into a new tensor or in place).
//
// Maths. Per row: u = 1/T, a = u s and b = u t over the common columns j < Vc, A = logsumexp a,
// Bq = logsumexp b, log p = a - A, log q = b - Bq.
//   For a left row x (the weighting distribution) and a right row y, normalisers X = c_x + log S_x and
//   Y = c_y + log S_y (online_softmax.h), and each logit in its own row's frame, z_x = u x - c_x, z_y = u y - c_y:
//     KL(x || y) = sum_j e^(u x_j - X) (u x_j - X - u y_j + Y) = W / S_x + log S_y - log S_x,
//     W = sum_j e^(z_x,j) (z_x,j - z_y,j),  S_x = sum_j e^(z_x,j).
//   Nothing of the size of c is ever subtracted: a teacher row peaked at 1e4 costs no digits. forward_kl =
//   KL(q || p) (left = teacher), reverse_kl = KL(p || q) (left = student): one streaming pass keeps S_x, S_y and
//   W online. When a block raises c_x by dx and c_y by dy, every term's z_x - z_y moves by dy - dx, so
//   W <- e^(-dx) (W + (dy - dx) S_x), S_x the sum before this block (skipped while a row is still all -inf).
//   Zero-probability terms: a term with x_j = -inf is 0 (0 log 0 = 0); a term with y_j = -inf while
//   e^(u x_j - X) > 0 makes KL = +inf. Both make the product e (z_x - z_y) non-finite (0 * inf, e * inf), as
//   does a NaN or +inf logit, so the fast loop just accumulates the products; a block whose W is not finite is
//   summed again with guards: non-finite products dropped, the largest left logit facing a right -inf kept, NaN
//   and +inf logits rejected (the row's l is NaN). At the end KL = +inf iff e^(u that - X) > 0.
//   jsd (0 < beta < 1): M = (1-beta) p + beta q, l = beta KL(q || M) + (1-beta) KL(p || M). Pass 1 is the
//   pass above for A and Bq (its KL unused), pass 2 sums q (log q - log M) and p (log p - log M), each term 0
//   where its weight is 0.
//   Stats saved per row, in double whatever the logits: (A, Bq, K) with K = l for reverse_kl, KL(p || M) for
//   jsd, 0 for forward_kl. Every log p = u s - A and log q = u t - Bq is formed in two steps (LogNormaliser).
// Backward, g = upstream gradient of l: dl/ds_j = u g d_j with
//   forward_kl d_j = p_j - q_j
//   reverse_kl d_j = p_j ((log p_j - log q_j) - l)         (d/da_j sum p log(p / q), using sum_i dp_i = 0)
//   jsd        d_j = (1-beta) p_j (log p_j - log M_j - K)  (the log M derivatives cancel:
//                                                            sum_i (beta q_i + (1-beta) p_i) dM_i / M_i = 0)
//   and p_j (...) = 0 where p_j = 0. A row with g = 0 or an infinite l gets 0, a NaN l gets NaN on the common
//   columns; student columns j >= Vc get 0.
// Cost per element: forward_kl / reverse_kl 2 exps in one pass (the next block is prefetched during the exp
// loop, so the max pass reads it from cache); jsd 2 more exps and a log in pass 2; backward 1-2 exps (+ a log
// for jsd) in one sweep, a large new gradient written with non-temporal stores. Rows run in parallel.
#include "constants.h"
#include "gradient_buffers.h"
#include "kernels.h"
#include "online_softmax.h"
#include "tensor_rows.h"

#include <ATen/Parallel.h>

namespace trd_fast::cpu {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// Both log-normalisers of a row pair and KL(left || right); all NaN for a NaN or +inf logit or an all -inf side.
struct PairStats {
  double lse_left = kNaN;
  double lse_right = kNaN;
  double kl = kNaN;
};

// The guarded sum of W over one block (see above): returns false on a NaN or +inf logit, else sets w and
// raises `banned` to the largest left logit whose right logit is -inf.
template <typename acc_t, typename l_t, typename r_t>
bool guarded_cross(const l_t* x, const r_t* y, int64_t n, acc_t inv_t, acc_t x_neg_shift, acc_t y_neg_shift,
                   double& w, acc_t& banned) {
  using Vec = Vectorized<acc_t>;
  const Vec u(inv_t), ox(x_neg_shift), oy(y_neg_shift), inf(kInf<acc_t>), minus_inf(-kInf<acc_t>);
  Vec acc(0), ban(-kInf<acc_t>);
  for (int64_t i = 0; i < n; i += Vec::size()) {
    const int64_t count = std::min<int64_t>(Vec::size(), n - i);
    const Vec xv = count == Vec::size() ? load<acc_t>(x + i) : load<acc_t>(x + i, count, -kInf<acc_t>);
    const Vec yv = count == Vec::size() ? load<acc_t>(y + i) : load<acc_t>(y + i, count, -kInf<acc_t>);
    if (any_nan_or_pos_inf(xv) || any_nan_or_pos_inf(yv)) return false;
    const Vec zx = at::vec::fmadd(xv, u, ox);
    const Vec d = zx - at::vec::fmadd(yv, u, oy);  // non-finite exactly where a side is -inf (both: NaN)
    acc = acc + ((vexp(zx) * d) & (d.abs() < inf));
    ban = at::vec::clamp_min(ban, Vec::blendv(minus_inf, xv, d == inf));
  }
  w = reduce_sum(acc);
  banned = std::max(banned, reduce_max(ban));
  return true;
}

// One streaming pass over a left row x and a right row y of n columns.
template <typename acc_t, typename l_t, typename r_t>
PairStats pair_pass(const l_t* x, const r_t* y, int64_t n, acc_t inv_t) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const Vec u(inv_t), zero(0);
  OnlineSoftmax<acc_t> left, right;
  double cross = 0;                    // W, in the current frames of both rows
  acc_t banned = -kInf<acc_t>;         // largest left logit facing a right -inf
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const l_t* xb = x + start;
    const r_t* yb = y + start;
    const bool framed = left.max > -kInf<acc_t> && right.max > -kInf<acc_t>;  // both shifts finite
    const double old_left = left.shift, old_right = right.shift;
    const double factor = left.advance(block_max<acc_t>(xb, len), inv_t);
    right.advance(block_max<acc_t>(yb, len), inv_t);
    cross = factor > 0 ? cross * factor : 0.0;  // an overflowed W must not become inf * 0
    if (framed && factor > 0) cross += ((right.shift - old_right) - (left.shift - old_left)) * left.sum;
    const Vec ox(left.neg_shift()), oy(right.neg_shift());
    Vec sx(0), sy(0), w(0);
    int64_t i = 0;
    for (; i + kVec <= len; i += kVec) {
      __builtin_prefetch(xb + i + kBlock);  // the next block, so that its max pass finds it in cache
      __builtin_prefetch(yb + i + kBlock);
      const Vec zx = at::vec::fmadd(load<acc_t>(xb + i), u, ox), zy = at::vec::fmadd(load<acc_t>(yb + i), u, oy);
      const Vec ex = vexp(zx);
      sx = sx + ex;
      sy = sy + vexp(zy);
      w = at::vec::fmadd(ex, zx - zy, w);
    }
    if (i < len) {  // row tail: the -inf padding has e = 0 and its difference is replaced by 0
      const Vec zx = at::vec::fmadd(load<acc_t>(xb + i, len - i, -kInf<acc_t>), u, ox);
      const Vec zy = at::vec::fmadd(load<acc_t>(yb + i, len - i, -kInf<acc_t>), u, oy);
      const Vec ex = vexp(zx);
      sx = sx + ex;
      sy = sy + vexp(zy);
      w = at::vec::fmadd(ex, Vec::set(zero, zx - zy, len - i), w);
    }
    left.sum += reduce_sum(sx);
    right.sum += reduce_sum(sy);
    double block_cross = reduce_sum(w);
    if (!std::isfinite(block_cross) &&
        !guarded_cross(xb, yb, len, inv_t, left.neg_shift(), right.neg_shift(), block_cross, banned)) {
      return {};
    }
    cross += block_cross;
  }
  PairStats out;
  out.lse_left = left.lse();
  out.lse_right = right.lse();
  if (!(out.lse_left > -kInf<double> && out.lse_right > -kInf<double>)) return {};  // an all -inf side
  out.kl = cross / left.sum + (std::log(right.sum) - std::log(left.sum));
  if (banned > -kInf<acc_t> && acc_t(std::exp(double(banned) * inv_t - out.lse_left)) > 0) {
    out.kl = kInf<double>;
  }
  return out;
}

// log M = log(wp p + wq q) for probabilities p, q, with M raised to the smallest normal number: the fast fp32 log
// is not meant for denormals, and a denormal M only weights terms with a denormal p or q (contributions < 1e-37).
template <typename acc_t>
Vectorized<acc_t> log_mixture(const Vectorized<acc_t>& p, const Vectorized<acc_t>& q, acc_t wp, acc_t wq) {
  const Vectorized<acc_t> m = at::vec::fmadd(Vectorized<acc_t>(wp), p, Vectorized<acc_t>(wq) * q);
  return vlog(at::vec::clamp_min(m, Vectorized<acc_t>(std::numeric_limits<acc_t>::min())));
}

// jsd pass 2 over one row: (KL(q || M), KL(p || M)) given A and Bq.
template <typename acc_t, typename s_t, typename t_t>
std::pair<double, double> jsd_pass(const s_t* s, const t_t* t, int64_t n, acc_t inv_t, double lse_s, double lse_t,
                                   acc_t beta) {
  using Vec = Vectorized<acc_t>;
  const Vec u(inv_t), zero(0);
  const LogNormaliser<acc_t> a(lse_s), b(lse_t);
  double kl_q = 0, kl_p = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    Vec acc_q(0), acc_p(0);
    for (int64_t i = start; i < start + len; i += Vec::size()) {
      const int64_t count = std::min<int64_t>(Vec::size(), start + len - i);
      const Vec xs = count == Vec::size() ? load<acc_t>(s + i) : load<acc_t>(s + i, count, -kInf<acc_t>);
      const Vec xt = count == Vec::size() ? load<acc_t>(t + i) : load<acc_t>(t + i, count, -kInf<acc_t>);
      const Vec zs = a.shifted(xs, u), zt = b.shifted(xt, u);
      const Vec lp = a.log_prob(zs), lq = b.log_prob(zt);
      const Vec p = a.prob(zs), q = b.prob(zt);
      const Vec lm = log_mixture(p, q, acc_t(1 - beta), beta);
      acc_q = acc_q + ((q * (lq - lm)) & (q != zero));
      acc_p = acc_p + ((p * (lp - lm)) & (p != zero));
    }
    kl_q += reduce_sum(acc_q);
    kl_p += reduce_sum(acc_p);
  }
  return {kl_q, kl_p};
}

// value [N] and stats [N, 3] for every row.
template <typename s_t, typename t_t>
void forward_rows(const at::Tensor& student, const at::Tensor& teacher, int64_t kind, double beta, double temperature,
                  float* value, double* stats) {
  using acc_t = acc_t_of<s_t>;
  const Rows<const s_t> s_rows(student);
  const Rows<const t_t> t_rows(teacher);
  const int64_t n_rows = student.size(0) * student.size(1);
  const int64_t vc = std::min(student.size(2), teacher.size(2));
  const acc_t inv_t = acc_t(1.0 / temperature);
  at::parallel_for(0, n_rows, grain_rows(vc), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const s_t* s = s_rows[r];
      const t_t* t = t_rows[r];
      double lse_s, lse_t, l, k;
      if (kind == kForwardKL) {
        const PairStats ps = pair_pass<acc_t>(t, s, vc, inv_t);
        lse_s = ps.lse_right, lse_t = ps.lse_left, l = ps.kl, k = 0;
      } else {
        const PairStats ps = pair_pass<acc_t>(s, t, vc, inv_t);
        lse_s = ps.lse_left, lse_t = ps.lse_right, l = ps.kl, k = ps.kl;
        if (kind == kJSD && !std::isnan(ps.kl)) {
          const auto [kl_q, kl_p] = jsd_pass<acc_t>(s, t, vc, inv_t, lse_s, lse_t, acc_t(beta));
          l = beta * kl_q + (1 - beta) * kl_p;
          k = kl_p;
        }
      }
      value[r] = float(l);
      stats[3 * r] = lse_s;
      stats[3 * r + 1] = lse_t;
      stats[3 * r + 2] = k;
    }
  });
}

// Per-row constants of the gradient.
template <typename acc_t>
struct RowGrad {
  acc_t scale;                   // u g
  LogNormaliser<acc_t> student;  // A
  LogNormaliser<acc_t> teacher;  // Bq
  acc_t k;                       // K
};

// Where the gradient goes: a new contiguous tensor or the student's own rows.
template <typename s_t>
struct GradientOut {
  Rows<s_t> rows;
  bool streaming;  // non-temporal stores (a new gradient larger than the caches)
};

// out[j] = u g d_j for j < vc, 0 for vc <= j < vs. `out` may be `s` itself (in place).
template <int64_t kKind, typename acc_t, typename s_t, typename t_t>
void gradient_row(s_t* out, const s_t* s, const t_t* t, int64_t vc, int64_t vs, acc_t inv_t, acc_t beta,
                  const RowGrad<acc_t>& row, bool streaming) {
  using Vec = Vectorized<acc_t>;
  const Vec u(inv_t), scale(row.scale), zero(0), k(row.k), wp(1 - beta);
  const auto d = [&](const Vec& xs, const Vec& xt) {
    const Vec zs = row.student.shifted(xs, u), zt = row.teacher.shifted(xt, u);
    const Vec p = row.student.prob(zs);
    if constexpr (kKind == kForwardKL) {
      return p - row.teacher.prob(zt);
    } else if constexpr (kKind == kReverseKL) {
      return (p * ((row.student.log_prob(zs) - row.teacher.log_prob(zt)) - k)) & (p != zero);
    } else {
      const Vec lm = log_mixture(p, row.teacher.prob(zt), acc_t(1 - beta), beta);
      return wp * ((p * ((row.student.log_prob(zs) - lm) - k)) & (p != zero));
    }
  };
  const auto sweep = [&](const auto& store_vec) {
    int64_t j = 0;
    for (; j + Vec::size() <= vc; j += Vec::size()) {
      __builtin_prefetch(s + j + 1024);
      __builtin_prefetch(t + j + 1024);
      store_vec(out + j, scale * d(load<acc_t>(s + j), load<acc_t>(t + j)));
    }
    return j;
  };
  const int64_t j = streaming && reinterpret_cast<uintptr_t>(out) % 64 == 0
                        ? sweep([](s_t* p, const Vec& v) { store_streaming(p, v); })
                        : sweep([](s_t* p, const Vec& v) { store(p, v); });
  if (j < vc) {
    const int64_t count = vc - j;
    store(out + j, scale * d(load<acc_t>(s + j, count, -kInf<acc_t>), load<acc_t>(t + j, count, -kInf<acc_t>)),
          count);
  }
  std::fill(out + vc, out + vs, s_t(0));
}

// The gradient of every row.
template <int64_t kKind, typename s_t, typename t_t>
void backward_rows(const GradientOut<s_t>& out, const at::Tensor& student, const at::Tensor& teacher,
                   const double* grad, const float* value, const double* stats, double beta, double temperature) {
  using acc_t = acc_t_of<s_t>;
  const Rows<const s_t> s_rows(student);
  const Rows<const t_t> t_rows(teacher);
  const int64_t n_rows = student.size(0) * student.size(1);
  const int64_t vs = student.size(2);
  const int64_t vc = std::min(vs, teacher.size(2));
  const acc_t inv_t = acc_t(1.0 / temperature);
  at::parallel_for(0, n_rows, grain_rows(vs), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      s_t* o = out.rows[r];
      const double g = grad[r];
      const float l = value[r];
      if (g == 0 || std::isinf(l)) {
        std::fill(o, o + vs, s_t(0));
      } else if (std::isnan(l)) {
        std::fill(o, o + vc, s_t(std::numeric_limits<float>::quiet_NaN()));
        std::fill(o + vc, o + vs, s_t(0));
      } else {
        const double* st = stats + 3 * r;
        const RowGrad<acc_t> row{acc_t(g * inv_t), LogNormaliser<acc_t>(st[0]), LogNormaliser<acc_t>(st[1]),
                                 acc_t(st[2])};
        gradient_row<kKind>(o, s_rows[r], t_rows[r], vc, vs, inv_t, acc_t(beta), row, out.streaming);
      }
    }
    streaming_fence();
  });
}

void check_arguments(const at::Tensor& student, const at::Tensor& teacher, int64_t kind, double beta,
                     double temperature) {
  check_logits(student, "student");
  check_logits(teacher, "teacher");
  TORCH_CHECK(student.size(0) * student.size(1) == teacher.size(0) * teacher.size(1),
              "student and teacher must have the same number of rows B * L, got ", student.sizes(), " and ",
              teacher.sizes());
  TORCH_CHECK(kind == kForwardKL || kind == kReverseKL || kind == kJSD, "kind must be ", kForwardKL, ", ",
              kReverseKL, " or ", kJSD, ", got ", kind);
  TORCH_CHECK(kind != kJSD || (beta > 0 && beta < 1), "jsd needs 0 < beta < 1, got ", beta);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
}

// Checks the backward's per-row tensors and writes the gradient into `out`.
template <typename s_t, typename t_t>
void run_backward(const GradientOut<s_t>& out, const at::Tensor& grad_value, const at::Tensor& student,
                  const at::Tensor& teacher, const at::Tensor& value, const at::Tensor& stats, int64_t kind,
                  double beta, double temperature) {
  const int64_t n_rows = student.size(0) * student.size(1);
  check_cpu(grad_value, "grad_value");
  check_cpu(value, "value");
  check_cpu(stats, "stats");
  TORCH_CHECK(grad_value.numel() == n_rows && value.numel() == n_rows, "grad_value and value must be [B, L]");
  TORCH_CHECK(stats.numel() == 3 * n_rows, "stats must be [B, L, 3], got ", stats.sizes());
  const at::Tensor grad = grad_value.to(at::kDouble).contiguous();
  const at::Tensor val = value.to(at::kFloat).contiguous();
  const at::Tensor st = stats.to(at::kDouble).contiguous();
  const auto run = [&]<int64_t kKind>() {
    backward_rows<kKind, s_t, t_t>(out, student, teacher, grad.data_ptr<double>(), val.data_ptr<float>(),
                                   st.data_ptr<double>(), beta, temperature);
  };
  if (kind == kForwardKL) run.template operator()<kForwardKL>();
  else if (kind == kReverseKL) run.template operator()<kReverseKL>();
  else run.template operator()<kJSD>();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> divergence(const at::Tensor& student, const at::Tensor& teacher, int64_t kind,
                                              double beta, double temperature, bool /*inplace_backward*/) {
  check_arguments(student, teacher, kind, beta, temperature);
  at::Tensor value = at::empty({student.size(0), student.size(1)}, student.options().dtype(at::kFloat));
  at::Tensor stats = at::empty({student.size(0), student.size(1), 3}, student.options().dtype(at::kDouble));
  dispatch_logit_pair(student.scalar_type(), teacher.scalar_type(), [&](auto s, auto t) {
    forward_rows<decltype(s), decltype(t)>(student, teacher, kind, beta, temperature, value.data_ptr<float>(),
                                           stats.data_ptr<double>());
  });
  return {value, stats};
}

at::Tensor divergence_backward(const at::Tensor& grad_value, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& value, const at::Tensor& stats, int64_t kind, double beta,
                               double temperature) {
  check_arguments(student, teacher, kind, beta, temperature);
  at::Tensor grad = empty_gradient(student.sizes(), student.scalar_type());
  dispatch_logit_pair(student.scalar_type(), teacher.scalar_type(), [&](auto s, auto t) {
    using s_t = decltype(s);
    const GradientOut<s_t> out{Rows<s_t>(grad), grad.nbytes() >= kStreamingBytes};
    run_backward<s_t, decltype(t)>(out, grad_value, student, teacher, value, stats, kind, beta, temperature);
  });
  return grad;
}

void divergence_backward_(const at::Tensor& grad_value, at::Tensor& student, const at::Tensor& teacher,
                          const at::Tensor& value, const at::Tensor& stats, int64_t kind, double beta,
                          double temperature) {
  check_arguments(student, teacher, kind, beta, temperature);
  dispatch_logit_pair(student.scalar_type(), teacher.scalar_type(), [&](auto s, auto t) {
    using s_t = decltype(s);
    const GradientOut<s_t> out{Rows<s_t>(student), false};
    run_backward<s_t, decltype(t)>(out, grad_value, student, teacher, value, stats, kind, beta, temperature);
  });
}

}  // namespace trd_fast::cpu
