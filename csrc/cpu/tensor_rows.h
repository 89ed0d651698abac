// How the CPU kernels see their tensors: rows of [B, L, V] logits with arbitrary strides on B and L, and dtype
// dispatch.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace trd_fast::cpu {

// Row r = (b, l) of a [B, L, V] tensor with stride(2) == 1 starts at b * stride(0) + l * stride(1).
template <typename scalar_t>
struct Rows {
  scalar_t* data;
  int64_t len1;     // L
  int64_t stride0;  // elements
  int64_t stride1;  // elements

  explicit Rows(const at::Tensor& t)
      : data(static_cast<scalar_t*>(t.data_ptr())), len1(t.size(1)), stride0(t.stride(0)), stride1(t.stride(1)) {}
  scalar_t* operator[](int64_t r) const { return data + (r / len1) * stride0 + (r % len1) * stride1; }
};

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
}

// Checks that `t` is a CPU [B, L, V] logit tensor readable as strided rows.
inline void check_logits(const at::Tensor& t, const char* name) {
  check_cpu(t, name);
  TORCH_CHECK(t.dim() == 3, name, " must be [B, L, V], got ", t.sizes());
  TORCH_CHECK(t.size(2) >= 1, name, " needs at least one column");
  TORCH_CHECK(t.stride(2) == 1 || t.size(2) == 1, name, " must have stride(2) == 1, got ", t.strides());
}

// Calls f(scalar_t{}) for a float32, bfloat16 or float16 dtype.
template <typename F>
inline void dispatch_reduced(at::ScalarType dtype, const char* name, const F& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);
  }
}

// Calls f(scalar_t{}) for a logit dtype: float32, bfloat16, float16 or float64.
template <typename F>
inline void dispatch_logits(at::ScalarType dtype, const char* name, const F& f) {
  if (dtype == at::kDouble) return f(double{});
  dispatch_reduced(dtype, name, f);
}

// Calls f(student_t{}, teacher_t{}): each of float32 / bfloat16 / float16, or both float64.
template <typename F>
inline void dispatch_logit_pair(at::ScalarType student, at::ScalarType teacher, const F& f) {
  if (student == at::kDouble || teacher == at::kDouble) {
    TORCH_CHECK(student == teacher, "student and teacher must both be float64 or both in {float32, bfloat16, "
                "float16}, got ", student, " and ", teacher);
    return f(double{}, double{});
  }
  dispatch_reduced(student, "student", [&](auto s) { dispatch_reduced(teacher, "teacher", [&](auto t) { f(s, t); }); });
}

// Rows per parallel_for task: about 64K logits, so that small problems are not split across threads.
inline int64_t grain_rows(int64_t width) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(width, 1)); }

}  // namespace trd_fast::cpu
