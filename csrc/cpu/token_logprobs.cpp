// Log-probabilities of chosen tokens under softmax(logits / T), and their gradient.
//
// Maths. Per row of [B, L, V] logits x, u = 1/T, a = u x:
//   lse = logsumexp a, one streaming pass (online_softmax.h); logprob = a_id - lse (0 where id == -100).
//   d logprob / d x_j = u (1[j == id] - e^(a_j - lse)): one more sweep, written into a new [B, L, V] tensor.
//   lse is saved in double and subtracted in two steps (LogNormaliser), so that e^(a_j - lse) keeps fp32's
//   relative precision at any logit magnitude.
// NaN and +inf logits make the row's lse NaN (a row of -inf has lse = -inf and logprob NaN). An exp may hide a
// NaN (ATen's exp_u20 clamps), so the pass also accumulates sum e x, which is not finite when a block holds a NaN
// or an infinity; only then is the block searched for NaN or +inf.
#include "constants.h"
#include "gradient_buffers.h"
#include "kernels.h"
#include "online_softmax.h"
#include "tensor_rows.h"

#include <ATen/Parallel.h>

namespace trd_fast::cpu {
namespace {

template <typename acc_t, typename scalar_t>
bool has_nan_or_pos_inf(const scalar_t* x, int64_t n) {
  using Vec = Vectorized<acc_t>;
  int64_t i = 0;
  for (; i + Vec::size() <= n; i += Vec::size()) {
    if (any_nan_or_pos_inf(load<acc_t>(x + i))) return true;
  }
  return i < n && any_nan_or_pos_inf(load<acc_t>(x + i, n - i, acc_t(0)));
}

// logsumexp(u x) over one row of n logits; NaN if the row holds a NaN or +inf.
template <typename acc_t, typename scalar_t>
double row_lse(const scalar_t* x, int64_t n, acc_t inv_t) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t kVec = Vec::size();
  const Vec u(inv_t), zero(0);
  OnlineSoftmax<acc_t> row;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(kBlock, n - start);
    const scalar_t* xb = x + start;
    row.advance(block_max<acc_t>(xb, len), inv_t);
    const Vec ox(row.neg_shift());
    Vec sum(0), probe(0);
    int64_t i = 0;
    for (; i + kVec <= len; i += kVec) {
      __builtin_prefetch(xb + i + kBlock);  // the next block, for its max pass
      const Vec xv = load<acc_t>(xb + i);
      const Vec e = vexp(at::vec::fmadd(xv, u, ox));
      sum = sum + e;
      probe = at::vec::fmadd(e, xv, probe);
    }
    if (i < len) {  // row tail: the -inf padding has e = 0; its probe term is made 0 too
      const Vec xv = load<acc_t>(xb + i, len - i, -kInf<acc_t>);
      const Vec e = vexp(at::vec::fmadd(xv, u, ox));
      sum = sum + e;
      probe = at::vec::fmadd(e, Vec::set(zero, xv, len - i), probe);
    }
    row.sum += reduce_sum(sum);
    if (!std::isfinite(reduce_sum(probe)) && has_nan_or_pos_inf<acc_t>(xb, len)) {
      return std::numeric_limits<double>::quiet_NaN();
    }
  }
  return row.lse();
}

// out[j] = scale (1[j == id] - e^(u x_j - lse)) over one row of n logits.
template <typename acc_t, typename scalar_t>
void gradient_row(scalar_t* out, const scalar_t* x, int64_t n, int64_t id, acc_t inv_t, double lse, acc_t scale,
                  bool streaming) {
  using Vec = Vectorized<acc_t>;
  const Vec u(inv_t), minus_scale(-scale);
  const LogNormaliser<acc_t> norm(lse);
  const auto sweep = [&](const auto& store_vec) {
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) {
      __builtin_prefetch(x + j + 1024);
      store_vec(out + j, minus_scale * norm.prob(norm.shifted(load<acc_t>(x + j), u)));
    }
    return j;
  };
  const int64_t j = streaming && reinterpret_cast<uintptr_t>(out) % 64 == 0
                        ? sweep([](scalar_t* p, const Vec& v) { store_streaming(p, v); })
                        : sweep([](scalar_t* p, const Vec& v) { store(p, v); });
  if (j < n) {
    const int64_t count = n - j;
    store(out + j, minus_scale * norm.prob(norm.shifted(load<acc_t>(x + j, count, -kInf<acc_t>), u)), count);
  }
  streaming_fence();  // the streamed lanes are in memory before out[id] is overwritten
  out[id] = scalar_t(scale * (1 - std::exp(double(x[id]) * inv_t - lse)));
}

// Checks the shapes of logits [B, L, V] and token_ids [B, L] and that every id is in [0, V) or -100;
// returns the ids, contiguous.
at::Tensor checked_ids(const at::Tensor& logits, const at::Tensor& token_ids) {
  check_logits(logits, "logits");
  check_cpu(token_ids, "token_ids");
  TORCH_CHECK(token_ids.scalar_type() == at::kLong, "token_ids must be int64, got ", token_ids.scalar_type());
  TORCH_CHECK(token_ids.dim() == 2 && token_ids.size(0) == logits.size(0) && token_ids.size(1) == logits.size(1),
              "token_ids must be [B, L] = ", logits.sizes().slice(0, 2), ", got ", token_ids.sizes());
  at::Tensor ids = token_ids.contiguous();
  const int64_t* p = ids.data_ptr<int64_t>();
  const int64_t v = logits.size(2);
  for (int64_t r = 0; r < ids.numel(); ++r) {
    TORCH_CHECK((p[r] >= 0 && p[r] < v) || p[r] == kIgnoreIndex, "token id ", p[r], " at position ", r,
                " is outside [0, ", v, ") and not ", kIgnoreIndex);
  }
  return ids;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> token_logprobs(const at::Tensor& logits, const at::Tensor& token_ids,
                                                  double temperature) {
  const at::Tensor ids = checked_ids(logits, token_ids);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  at::Tensor logprobs = at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(at::kDouble));
  dispatch_logits(logits.scalar_type(), "logits", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_t_of<scalar_t>;
    const Rows<const scalar_t> rows(logits);
    const int64_t* id = ids.data_ptr<int64_t>();
    float* out = logprobs.data_ptr<float>();
    double* out_lse = lse.data_ptr<double>();
    const int64_t v = logits.size(2);
    const acc_t inv_t = acc_t(1.0 / temperature);
    at::parallel_for(0, ids.numel(), grain_rows(v), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* x = rows[r];
        const double l = row_lse<acc_t>(x, v, inv_t);
        out_lse[r] = l;
        if (id[r] == kIgnoreIndex) {
          out[r] = 0;
        } else {
          out[r] = l > -kInf<double> ? float(double(acc_t(x[id[r]])) * inv_t - l)
                                     : std::numeric_limits<float>::quiet_NaN();
        }
      }
    });
  });
  return {logprobs, lse};
}

at::Tensor token_logprobs_backward(const at::Tensor& grad_logprobs, const at::Tensor& logits,
                                   const at::Tensor& token_ids, const at::Tensor& lse, double temperature) {
  const at::Tensor ids = checked_ids(logits, token_ids);
  TORCH_CHECK(temperature > 0, "temperature must be > 0, got ", temperature);
  check_cpu(grad_logprobs, "grad_logprobs");
  check_cpu(lse, "lse");
  TORCH_CHECK(grad_logprobs.numel() == ids.numel() && lse.numel() == ids.numel(),
              "grad_logprobs and lse must be [B, L]");
  at::Tensor grad = empty_gradient(logits.sizes(), logits.scalar_type());
  dispatch_logits(logits.scalar_type(), "logits", [&](auto tag) {
    using scalar_t = decltype(tag);
    using acc_t = acc_t_of<scalar_t>;
    const Rows<const scalar_t> rows(logits);
    const at::Tensor g = grad_logprobs.to(at::kDouble).contiguous();
    const at::Tensor l = lse.to(at::kDouble).contiguous();
    const double* g_ptr = g.data_ptr<double>();
    const double* l_ptr = l.data_ptr<double>();
    const int64_t* id = ids.data_ptr<int64_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    const bool streaming = grad.nbytes() >= kStreamingBytes;
    const int64_t v = logits.size(2);
    const acc_t inv_t = acc_t(1.0 / temperature);
    at::parallel_for(0, ids.numel(), grain_rows(v), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* o = out + r * v;
        if (id[r] == kIgnoreIndex || g_ptr[r] == 0) {
          std::fill(o, o + v, scalar_t(0));
        } else if (!std::isfinite(l_ptr[r])) {
          std::fill(o, o + v, scalar_t(std::numeric_limits<float>::quiet_NaN()));
        } else {
          gradient_row<acc_t>(o, rows[r], v, id[r], inv_t, l_ptr[r], acc_t(g_ptr[r] * inv_t), streaming);
        }
      }
    });
  });
  return grad;
}

}  // namespace trd_fast::cpu
