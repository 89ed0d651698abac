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


def train_command(args: argparse.Namespace) -> None:
    from trd_fast.trainer.run.config import load_config
    from trd_fast.trainer.run.loop import train

    config = load_config(args.config, args.set)
    records = train(config, resolve_task(config))
    if records:
        last = records[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}; metrics, checkpoint and curves in "
              f"{config.run.output_dir}")


def eval_command(args: argparse.Namespace) -> None:
    import dataclasses
    import json
    from pathlib import Path

    from trd_fast.trainer.run.config import load_config
    from trd_fast.trainer.rollout.generation import Runner
    from trd_fast.trainer.run.loop import EVAL_SEED, evaluate
    from trd_fast.trainer.run.examples_check import check_examples, context_length
    from trd_fast.trainer.run.loading import load_causal_lm, load_tokenizer
    from trd_fast.trainer.refine.batch import Tokenize

    config = load_config(args.config, args.set)
    student = args.student or str(Path(config.run.output_dir) / "student")
    tokenizer = load_tokenizer(student, role="student")
    model = load_causal_lm(student, role="student", device=config.model.device)
    task = resolve_task(config)
    count = args.problems or config.data.eval_examples
    examples = task.examples("eval", count, EVAL_SEED)
    check_examples(config, task, tokenizer, examples, split="eval", with_teacher=False,
                   student_context=context_length(model), teacher_context=None)
    result = evaluate(Runner(model, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, name="student",
                             vocab_size=len(tokenizer)),
                      task, Tokenize(tokenizer), examples, max_new_tokens=config.rollout.max_new_tokens,
                      progress=config.run.progress)
    result["student"] = student
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def resolve_task(config):
    """The cli wires tasks into the task-agnostic trainer: a shipped task by name, or a JSONL file."""
    if config.data.train_jsonl:
        from trd_fast.tasks.jsonl import JsonlTask
        return JsonlTask(config.data)
    from trd_fast.tasks import ChainTask
    tasks = {"chain": ChainTask}
    if config.data.task not in tasks:
        raise ValueError(f"config data.task: unknown task {config.data.task!r}; shipped: {sorted(tasks)}")
    return tasks[config.data.task]()


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

    for name, run, text in (("train", train_command, "train a student (opd | trd | trd_splice) from a YAML config"),
                            ("eval", eval_command, "greedy accuracy of a trained student on held-out problems")):
        command = commands.add_parser(name, help=text)
        command.add_argument("--config", help="YAML run config (sections as in trd_fast.trainer.run.config)")
        command.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                             help="override one config value (repeatable), e.g. --set distill.mode=trd_splice")
        if name == "eval":
            command.add_argument("--student", help="model directory to evaluate (default: OUTPUT_DIR/student)")
            command.add_argument("--problems", type=int, default=0, help="held-out problems (default: config)")
            command.add_argument("--output", help="also write the result as JSON here")
        command.set_defaults(run=run)

    from trd_fast.drivers.demo import add_demo_arguments, run_demo
    from trd_fast.drivers.pretrain import add_pretrain_arguments, run_pretrain
    pretrain = commands.add_parser("pretrain", help="train the shipped task's teacher and student from scratch")
    add_pretrain_arguments(pretrain)
    pretrain.set_defaults(run=run_pretrain)
    trd_demo = commands.add_parser("demo", help="opd vs trd vs trd_splice on the shipped task, several seeds")
    add_demo_arguments(trd_demo)
    trd_demo.set_defaults(run=run_demo)

    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: the message names it, no traceback
        parser.exit(2, f"trd-fast {args.command}: error: {error}\n")
    except FloatingPointError as error:  # the run diverged; the message says what was kept
        parser.exit(1, f"trd-fast {args.command}: error: {error}\n")


if __name__ == "__main__":
    main()
