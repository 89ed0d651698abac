// SIMD access to logit rows: load fp32 / bf16 / fp16 as Vectorized<float> and fp64 as Vectorized<double>, store
// back in the row's dtype (plainly or with non-temporal stores), with partial vectors at row tails.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <cstring>
#include <limits>
#include <type_traits>

namespace trd_fast::cpu {

using at::vec::Vectorized;

// The math type of a logit dtype: double for double, float for float, bfloat16 and half.
template <typename scalar_t>
using acc_t_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

template <typename acc_t>
inline constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();

// Vectorized<acc_t>::size() elements from p.
template <typename acc_t, typename scalar_t>
inline Vectorized<acc_t> load(const scalar_t* p) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return Vectorized<acc_t>::loadu(p);
  } else {
    Vectorized<float> v;
    at::vec::load_to_float(p, v);
    return v;
  }
}

// The first `count` (< size) lanes from p, the others set to `fill`.
template <typename acc_t, typename scalar_t>
inline Vectorized<acc_t> load(const scalar_t* p, int64_t count, acc_t fill) {
  Vectorized<acc_t> v;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v = Vectorized<acc_t>::loadu(p, count);
  } else {
    v = std::get<0>(at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, count)));
  }
  return Vectorized<acc_t>::set(Vectorized<acc_t>(fill), v, count);
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The lanes of a float vector rounded to bf16 / fp16, packed in a vector of half the width.
template <typename scalar_t>
inline auto to_half_width(const Vectorized<float>& v) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return at::vec::cvtfp32_bf16(v);
  } else {
    return at::vec::cvtfp32_fp16(v);
  }
}
#endif

// All lanes of v to p, converted to scalar_t. bf16 / fp16 go out in one half-width store: a masked full-width
// store makes the next load from the same cache line (an in-place sweep) wait for it.
template <typename scalar_t, typename acc_t>
inline void store(scalar_t* p, const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p);
  } else {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    const auto half = to_half_width<scalar_t>(v);
    std::memcpy(p, &half, sizeof(half));
#else
    at::vec::convert_from_float<scalar_t>(v, v).store(p, Vectorized<float>::size());
#endif
  }
}

// The first `count` lanes of v to p, converted to scalar_t.
template <typename scalar_t, typename acc_t>
inline void store(scalar_t* p, const Vectorized<acc_t>& v, int64_t count) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    v.store(p, count);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, count);
  }
}

// Non-temporal stores, for a fresh gradient much larger than the caches: its lines are written whole and read
// back only by a later op, so they need not be read in before being overwritten (plain stores without AVX).
#if defined(CPU_CAPABILITY_AVX512)
inline void stream(float* p, __m512 v) { _mm512_stream_ps(p, v); }
inline void stream(double* p, __m512d v) { _mm512_stream_pd(p, v); }
inline void stream(void* p, __m256i v) { _mm256_stream_si256(static_cast<__m256i*>(p), v); }
#elif defined(CPU_CAPABILITY_AVX2)
inline void stream(float* p, __m256 v) { _mm256_stream_ps(p, v); }
inline void stream(double* p, __m256d v) { _mm256_stream_pd(p, v); }
inline void stream(void* p, __m128i v) { _mm_stream_si128(static_cast<__m128i*>(p), v); }
#endif

// store(p, v) as a non-temporal store; p must be aligned to the width stored (a full vector of scalar_t).
template <typename scalar_t, typename acc_t>
inline void store_streaming(scalar_t* p, const Vectorized<acc_t>& v) {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    stream(p, v);
  } else {
    stream(p, to_half_width<scalar_t>(v));
  }
#else
  store(p, v);
#endif
}

// Orders this thread's non-temporal stores before whatever it does next (e.g. leaving a parallel region).
inline void streaming_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// Gradients of at least this many bytes are written with non-temporal stores.
inline constexpr int64_t kStreamingBytes = int64_t(64) << 20;

}  // namespace trd_fast::cpu
