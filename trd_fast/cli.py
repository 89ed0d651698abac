"""The `trd-fast` command."""

from __future__ import annotations

import argparse
import sys
import time

import torch


def loss_demo(args: argparse.Namespace) -> None:
    """Distil a linear student head into a fixed teacher head with the fused loss, then time one step
    of the fused loss against the idiomatic torch computation on the same inputs."""
    import trd_fast

    torch.manual_seed(args.seed)
    hidden, vocab = 64, args.vocab
    features = torch.randn(args.rows, hidden)
    teacher_head = torch.randn(hidden, vocab) / hidden**0.5 * 4
    student_head = torch.nn.Parameter(torch.randn(hidden, vocab) / hidden**0.5)
    optimizer = torch.optim.Adam([student_head], lr=args.lr)
    teacher_logits = features @ teacher_head
    mask = torch.rand(args.rows) < 0.9  # e.g. prompt and padding positions carry no loss
    print(f"distilling a [{hidden} x {vocab}] student head over {args.rows} positions "
          f"({args.divergence}, backend={args.backend or 'auto'})")
    for step in range(args.steps + 1):
        loss, per_token = trd_fast.distillation_loss(features @ student_head, teacher_logits,
                                                     divergence=args.divergence, weight=mask,
                                                     return_per_token=True, backend=args.backend)
        if step % max(1, args.steps // 5) == 0:
            print(f"  step {step:4d}  loss {loss.item():.4f}  max per-token {per_token.max().item():.3f}")
        if step < args.steps:
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    student_logits = (features @ student_head).detach().requires_grad_()
    fused = _median_seconds(lambda: trd_fast.distillation_loss(student_logits, teacher_logits, weight=mask,
                                                               backend=args.backend).backward())
    eager = _median_seconds(lambda: _eager_forward_kl(student_logits, teacher_logits, mask).backward())
    print(f"forward+backward of forward_kl on [{args.rows}, {vocab}] fp32: trd_fast ({args.backend or 'auto'}) "
          f"{fused * 1e3:.1f} ms, "
          f"eager torch {eager * 1e3:.1f} ms ({eager / fused:.1f}x)")


def _eager_forward_kl(student_logits, teacher_logits, mask):
    log_p = torch.log_softmax(student_logits, -1)
    log_q = torch.log_softmax(teacher_logits, -1)
    per_token = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    return (per_token * mask).sum() / mask.sum()


def _median_seconds(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trd-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("loss-demo", help="a short end-to-end example of the fused distillation loss")
    demo.add_argument("--rows", type=int, default=1024, help="positions per batch")
    demo.add_argument("--vocab", type=int, default=32768, help="vocabulary size")
    demo.add_argument("--steps", type=int, default=50, help="optimizer steps")
    demo.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    demo.add_argument("--divergence", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"))
    demo.add_argument("--backend", default=None, choices=("auto", "cpp", "triton", "torch"))
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=loss_demo)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
