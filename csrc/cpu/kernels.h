// Entry points of the C++ CPU kernels, registered by csrc/ops.cpp (schemas and semantics there).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace trd_fast::cpu {

// divergence.cpp
std::tuple<at::Tensor, at::Tensor> divergence(const at::Tensor& student, const at::Tensor& teacher, int64_t kind,
                                              double beta, double temperature, bool inplace_backward);
at::Tensor divergence_backward(const at::Tensor& grad_value, const at::Tensor& student, const at::Tensor& teacher,
                               const at::Tensor& value, const at::Tensor& stats, int64_t kind, double beta,
                               double temperature);
void divergence_backward_(const at::Tensor& grad_value, at::Tensor& student, const at::Tensor& teacher,
                          const at::Tensor& value, const at::Tensor& stats, int64_t kind, double beta,
                          double temperature);

// token_logprobs.cpp
std::tuple<at::Tensor, at::Tensor> token_logprobs(const at::Tensor& logits, const at::Tensor& token_ids,
                                                  double temperature);
at::Tensor token_logprobs_backward(const at::Tensor& grad_logprobs, const at::Tensor& logits,
                                   const at::Tensor& token_ids, const at::Tensor& lse, double temperature);

// prefix_scan.cpp
std::tuple<at::Tensor, at::Tensor> prefix_scan(const at::Tensor& signal, const at::Tensor& lengths, double threshold,
                                               int64_t window);

}  // namespace trd_fast::cpu
