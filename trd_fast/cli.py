"""The `trd-fast` command."""

from __future__ import annotations

import argparse
import importlib
import sys

from trd_fast.drivers import positive_int

# The commands run by a driver module with add_arguments(parser) and run(args); a driver loads transformers and
# the models' code, so it is imported only when its command is given.
DRIVERS = {"pretrain": ("trd_fast.drivers.pretrain", "train the shipped task's teacher and student from scratch"),
           "demo": ("trd_fast.drivers.demo", "opd vs trd vs trd_splice on the shipped task, several seeds")}


def loss_demo(args: argparse.Namespace) -> None:
    """Distil a linear student head into a fixed teacher head with the fused loss."""
    import torch

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


def torchrun_command(argv: list[str], processes: int) -> list[str]:
    """The command that runs `trd-fast train` (its arguments `argv`, without --nproc) in `processes` processes on
    this machine under torchrun."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "trd_fast.cli", "train", *argv]


def train_command(args: argparse.Namespace) -> None:
    from trd_fast.trainer.run.config import load_config

    config = load_config(args.config, args.set)  # bad input: one line and exit 2 here, before any process starts
    if args.nproc:
        import os

        from trd_fast.trainer.run.world import check_batch_split, launched
        if launched():
            raise ValueError("--nproc: this process was already started by torchrun")
        check_batch_split(config.optim.batch_size, config.optim.micro_batches, args.nproc)
        from trd_fast.trainer.run.loop import check_resume
        check_resume(config, sharded=True)  # a refused resume: one line here, not one per process
        command = torchrun_command(args.train_argv, args.nproc)
        os.execv(command[0], command)
    from trd_fast.tasks.registry import resolve_task
    from trd_fast.trainer.run.loop import train

    records = train(config, resolve_task(config.data))
    if records:  # rank 0's (the only one under torchrun)
        last = records[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}; metrics, checkpoint and curves in "
              f"{config.run.output_dir}")


def eval_command(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from trd_fast.tasks.registry import resolve_task
    from trd_fast.trainer.run.config import load_config
    from trd_fast.trainer.run.evaluate import EVAL_SEED, evaluate_saved

    config = load_config(args.config, args.set)
    student = args.student or str(Path(config.run.output_dir) / "student")
    task = resolve_task(config.data)
    examples = task.examples("eval", args.problems or config.data.eval_examples, EVAL_SEED)
    result = evaluate_saved(student, task, examples, device=config.model.device,
                            max_new_tokens=config.rollout.max_new_tokens, progress=config.run.progress).summary()
    result["student"] = student
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The command line; a driver's own arguments are added only when `command` is that driver's."""
    parser = argparse.ArgumentParser(prog="trd-fast", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    loss = commands.add_parser("loss-demo", help="a short end-to-end example of the fused distillation loss")
    loss.add_argument("--rows", type=int, default=1024, help="positions per batch")
    loss.add_argument("--vocab", type=int, default=32768, help="vocabulary size")
    loss.add_argument("--steps", type=int, default=50, help="optimizer steps")
    loss.add_argument("--lr", type=float, default=0.05, help="Adam learning rate")
    loss.add_argument("--divergence", default="forward_kl", choices=("forward_kl", "reverse_kl", "jsd"))
    loss.add_argument("--backend", default=None, choices=("auto", "cpp", "triton", "torch"))
    loss.add_argument("--seed", type=int, default=0)
    loss.set_defaults(run=loss_demo)

    for name, run, text in (("train", train_command, "train a student (opd | trd | trd_splice) from a YAML config"),
                            ("eval", eval_command, "greedy accuracy of a trained student on held-out problems")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--config", help="YAML run config (sections as in trd_fast.trainer.run.config)")
        sub.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one config value (repeatable), e.g. --set distill.mode=trd_splice")
        if name == "train":
            sub.add_argument("--nproc", type=positive_int, default=0, metavar="N",
                             help="train in N processes under torchrun (one device each: CUDA if model.device is, "
                                  "else CPU); the same as torchrun --standalone --nproc_per_node=N -m trd_fast.cli "
                                  "train ...")
        if name == "eval":
            sub.add_argument("--student", help="model directory to evaluate (default: OUTPUT_DIR/student)")
            sub.add_argument("--problems", type=int, default=0, help="held-out problems (default: config)")
            sub.add_argument("--output", help="also write the result as JSON here")
        sub.set_defaults(run=run)

    for name, (module, text) in DRIVERS.items():
        sub = commands.add_parser(name, help=text)
        if name == command:
            driver = importlib.import_module(module)
            driver.add_arguments(sub)
            sub.set_defaults(run=driver.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    args.train_argv = _without_nproc(argv[argv.index("train") + 1:]) if args.command == "train" else []
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: the message names it, no traceback
        parser.exit(2, f"trd-fast {args.command}: error: {error}\n")
    except FloatingPointError as error:  # the run diverged; the message says what was kept
        parser.exit(1, f"trd-fast {args.command}: error: {error}\n")


def _without_nproc(argv: list[str]) -> list[str]:
    """`train`'s arguments with --nproc N (or --nproc=N) taken out."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            kept.append(a)
    return kept


if __name__ == "__main__":
    main()
