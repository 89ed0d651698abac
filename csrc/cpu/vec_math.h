// The vector maths shared by the kernels: exp, log, horizontal reductions, the NaN / +inf test.
#pragma once

#include "vec_load.h"

namespace trd_fast::cpu {

// e^x for fp32, 0 at -inf, within 1 ulp over the normal range (measured: 0.92 ulp max, 0.30 rms).
//   e^x = 2^n e^r, n = round(x log2(e)), r = x - n ln(2) with ln(2) split in two parts (Cody-Waite) so that r is
//   exact to fp32; |r| <= ln(2)/2, where the degree-7 Taylor polynomial of e^r is within 5e-9 relative (degree 6,
//   one fma fewer, is off by up to 1 ulp more, and the gradients' p - q keeps that error);
//   vscalefps multiplies by 2^n and gives 0, denormals and inf correctly for every n. x is first raised to -104
//   (e^-104 is below the smallest denormal) so that -inf gives 0 rather than -inf - (-inf) = NaN; a NaN stays NaN.
// Other ISAs use ATen's exp_u20 (a polynomial with clamps; it returns a finite value for NaN).
inline Vectorized<float> vexp(const Vectorized<float>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 x = _mm512_max_ps(_mm512_set1_ps(-104.0f), v);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  // ln(2) = 0.693359375 - 2.12194440e-4
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.0f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
#else
  return v.exp_u20();
#endif
}
// fp64: Sleef, 1 ulp.
inline Vectorized<double> vexp(const Vectorized<double>& x) { return x.exp(); }

// log x. fp32: Sleef's 3.5-ulp log, a third cheaper than the 1-ulp one behind Vectorized::log(). fp64: 1 ulp.
inline Vectorized<float> vlog(const Vectorized<float>& x) {
#if defined(CPU_CAPABILITY_AVX512)
  return Sleef_logf16_u35(x);
#elif defined(CPU_CAPABILITY_AVX2)
  return Sleef_logf8_u35(x);
#else
  return x.log();
#endif
}
inline Vectorized<double> vlog(const Vectorized<double>& x) { return x.log(); }

template <typename acc_t>
inline double reduce_sum(const Vectorized<acc_t>& v) {
  return at::vec::vec_reduce_all<acc_t>([](const auto& a, const auto& b) { return a + b; }, v);
}

// Largest lane; NaN lanes are skipped (callers detect NaN separately).
template <typename acc_t>
inline acc_t reduce_max(const Vectorized<acc_t>& v) {
  acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t m = -kInf<acc_t>;
  for (acc_t x : lanes) m = x > m ? x : m;
  return m;
}

// True when some lane of v is not below +inf, i.e. is NaN or +inf.
template <typename acc_t>
inline bool any_nan_or_pos_inf(const Vectorized<acc_t>& v) {
  return (v < Vectorized<acc_t>(kInf<acc_t>)).zero_mask() != 0;
}

}  // namespace trd_fast::cpu
