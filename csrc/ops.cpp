// The trd_fast operator library: schemas, CPU implementations (csrc/cpu), and the Python module trd_fast._C.
//
//   divergence          student [B, L, Vs], teacher [Bt, Lt, Vt] logits (stride(2) == 1, any outer strides; each
//                       side its own [B, L] split of the same B * L rows), kind (cpu/constants.h) forward_kl |
//                       reverse_kl | jsd (0 < beta < 1), over the common columns
//                       -> value [B, L] fp32, stats [B, L, 3] fp64 = (logsumexp s/T, logsumexp t/T, K).
//                       `inplace_backward` is read by the op's autograd formula (registered in Python,
//                       trd_fast/ops/registry.py), not by the kernels: it picks divergence_backward_ for the
//                       backward. It is an op input so that torch.compile sees the choice in the graph.
//   divergence_backward grad_value [B, L] -> d loss / d student, a new [B, L, Vs] tensor in the student's dtype
//   divergence_backward_ the same gradient written over `student` (the autograd formula then bumps its version
//                       counter: this op writes through data pointers, which autograd cannot see)
//   token_logprobs      logits [B, L, V], token_ids [B, L] (-100 = ignore) -> log-probs [B, L] fp32, lse [B, L] fp64
//   token_logprobs_backward -> d loss / d logits, a new [B, L, V] tensor
//   prefix_scan         signal [B, L], lengths [B] -> cumsum [B, L], first [B] int64
#include "cpu/gradient_buffers.h"
#include "cpu/kernels.h"

#include <torch/extension.h>
#include <torch/library.h>

#ifndef TRD_FAST_CPU_ISA
#define TRD_FAST_CPU_ISA "default"
#endif

TORCH_LIBRARY(trd_fast, m) {
  m.def("divergence(Tensor student, Tensor teacher, int kind, float beta, float temperature, "
        "bool inplace_backward) -> (Tensor value, Tensor stats)");
  m.def("divergence_backward(Tensor grad_value, Tensor student, Tensor teacher, Tensor value, Tensor stats, "
        "int kind, float beta, float temperature) -> Tensor");
  m.def("divergence_backward_(Tensor grad_value, Tensor(a!) student, Tensor teacher, Tensor value, "
        "Tensor stats, int kind, float beta, float temperature) -> ()");
  m.def("token_logprobs(Tensor logits, Tensor token_ids, float temperature) -> (Tensor logprobs, Tensor lse)");
  m.def("token_logprobs_backward(Tensor grad_logprobs, Tensor logits, Tensor token_ids, Tensor lse, "
        "float temperature) -> Tensor");
  m.def("prefix_scan(Tensor signal, Tensor lengths, float threshold, int window) -> (Tensor cumsum, Tensor first)");
}

TORCH_LIBRARY_IMPL(trd_fast, CPU, m) {
  m.impl("divergence", &trd_fast::cpu::divergence);
  m.impl("divergence_backward", &trd_fast::cpu::divergence_backward);
  m.impl("divergence_backward_", &trd_fast::cpu::divergence_backward_);
  m.impl("token_logprobs", &trd_fast::cpu::token_logprobs);
  m.impl("token_logprobs_backward", &trd_fast::cpu::token_logprobs_backward);
  m.impl("prefix_scan", &trd_fast::cpu::prefix_scan);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cpu_isa", [] { return std::string(TRD_FAST_CPU_ISA); },
        "The SIMD level the CPU kernels were compiled for: avx512, avx2 or default.");
  m.def("release_gradient_buffers", &trd_fast::cpu::release_gradient_buffers,
        "Frees the large gradient buffers the CPU backward keeps for reuse; returns the bytes freed.");
}
