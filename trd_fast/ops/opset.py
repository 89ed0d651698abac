"""A backend's set of kernel ops and the autograd wiring they share.

Every kernel backend ("cpp": trd_fast::<name>, "triton": trd_fast::<name>_triton) provides the same six ops
with the same schemas and semantics:

  divergence(student [B,L,Vs], teacher [B,L,Vt], kind, beta, temperature, inplace_backward)
      -> value [B,L] fp32, stats [B,L,3] fp64 (A, B, K: student and teacher log-normalizers, K as the kernel needs)
  divergence_backward(grad_value [B,L], student, teacher, value, stats, kind, beta, temperature) -> [B,L,Vs]
  divergence_backward_(...same...) -> ()  writes the gradient over `student`
  token_logprobs(logits [B,L,V], token_ids [B,L], temperature) -> logprobs [B,L] fp32, lse [B,L] fp64
  token_logprobs_backward(grad [B,L], logits, token_ids, lse, temperature) -> [B,L,V]
  prefix_scan(signal [B,L], lengths [B], threshold, window) -> cumsum [B,L], first [B] int64
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OpSet:
    suffix: str  # op names are trd_fast::<name><suffix>

    def op(self, name: str):
        return getattr(torch.ops.trd_fast, name + self.suffix)

    def qualname(self, name: str) -> str:
        return f"trd_fast::{name}{self.suffix}"


# Row statistics saved for a backward sweep (log-normalizers): fp64 for every logit dtype, so that the sweep can
# subtract them from logits as large as 1e4 without losing fp32 digits.
STATS_DTYPE = torch.float64


def register_fakes(ops: OpSet) -> None:
    """Shape-only implementations, for torch.compile and opcheck."""

    @torch.library.register_fake(ops.qualname("divergence"))
    def _(student, teacher, kind, beta, temperature, inplace_backward):
        lead = student.shape[:-1]
        return (student.new_empty(lead, dtype=torch.float32),
                student.new_empty((*lead, 3), dtype=STATS_DTYPE))

    @torch.library.register_fake(ops.qualname("divergence_backward"))
    def _(grad_value, student, teacher, value, stats, kind, beta, temperature):
        return student.new_empty(student.shape)

    @torch.library.register_fake(ops.qualname("divergence_backward_"))
    def _(grad_value, student, teacher, value, stats, kind, beta, temperature):
        return None

    @torch.library.register_fake(ops.qualname("token_logprobs"))
    def _(logits, token_ids, temperature):
        lead = logits.shape[:-1]
        return logits.new_empty(lead, dtype=torch.float32), logits.new_empty(lead, dtype=STATS_DTYPE)

    @torch.library.register_fake(ops.qualname("token_logprobs_backward"))
    def _(grad_logprobs, logits, token_ids, lse, temperature):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake(ops.qualname("prefix_scan"))
    def _(signal, lengths, threshold, window):
        return signal.new_empty(signal.shape), lengths.new_empty(signal.shape[:1], dtype=torch.int64)


def register_autograd(ops: OpSet) -> None:
    """Backward of divergence and token_logprobs: one sweep recomputing the gradient from saved row stats."""

    def divergence_setup(ctx, inputs, output):
        student, teacher, kind, beta, temperature, inplace_backward = inputs
        value, stats = output
        ctx.save_for_backward(student, teacher, value, stats)
        ctx.scalars = (kind, beta, temperature)
        ctx.inplace_backward = inplace_backward

    def divergence_backward(ctx, grad_value, grad_stats):
        student, teacher, value, stats = ctx.saved_tensors
        if grad_value is None or not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        grad_value = grad_value.to(torch.float32).contiguous()
        if ctx.inplace_backward:
            ops.op("divergence_backward_")(grad_value, student, teacher, value, stats, *ctx.scalars)
            grad = student
        else:
            grad = ops.op("divergence_backward")(grad_value, student, teacher, value, stats, *ctx.scalars)
        return grad, None, None, None, None, None

    torch.library.register_autograd(ops.qualname("divergence"), divergence_backward,
                                    setup_context=divergence_setup)

    def token_logprobs_setup(ctx, inputs, output):
        logits, token_ids, temperature = inputs
        ctx.save_for_backward(logits, token_ids, output[1])
        ctx.temperature = temperature

    def token_logprobs_backward(ctx, grad_logprobs, grad_lse):
        logits, token_ids, lse = ctx.saved_tensors
        if grad_logprobs is None or not ctx.needs_input_grad[0]:
            return None, None, None
        grad_logprobs = grad_logprobs.to(torch.float32).contiguous()
        return ops.op("token_logprobs_backward")(grad_logprobs, logits, token_ids, lse, ctx.temperature), None, None

    torch.library.register_autograd(ops.qualname("token_logprobs"), token_logprobs_backward,
                                    setup_context=token_logprobs_setup)
