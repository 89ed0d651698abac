"""Pretrain the chain task's teacher and student from scratch with next-token cross-entropy on solutions.

The teacher (larger, long run) learns to solve, to rewrite flawed attempts into correct solutions of the
same structure, and to use a reference solution (privileged prompts). The student (small, short run) only
gets a brief training so it still fails often, mostly by a wrong intermediate value.

Resumable: the training state is written atomically every `--save-every` steps and a rerun continues from
it; the data of step t depends only on (seed, model, t), so a resumed run sees the same batches.

    python -m trd_fast.drivers.pretrain --models teacher student
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import torch

from trd_fast.tasks.chain import ChainTask, first_mistakes
from trd_fast.tasks.generator import (ChainConfig, flawed_attempt, parse_problem, random_problem, solution,
                                      split_of, values)
from trd_fast.tasks.model_specs import SPECS, build_config
from trd_fast.tasks.paths import CHECKPOINTS
from trd_fast.tasks.tokenizer import build_tokenizer
from trd_fast.trainer.protocol import Example, Tokenize
from trd_fast.trainer.rollout.generation import Runner
from trd_fast.trainer.run.checkpoint import atomic_save, save_model_directory
from trd_fast.trainer.run.evaluate import Evaluation, evaluate
from trd_fast.trainer.run.schedule import cosine_lr

# Share of each prompt kind in a model's training batches: (solve, refine, privileged solve, privileged refine).
MIXES = {"teacher": (0.70, 0.20, 0.05, 0.05), "student": (0.80, 0.06, 0.10, 0.04)}
DEFAULT_STEPS = {"teacher": 1200, "student": 1500}
DEFAULT_LR = {"teacher": 1e-3, "student": 3e-3}
WARMUP_STEPS, MIN_LR_RATIO = 100, 0.1  # the schedule: linear warmup, cosine decay to a tenth of the peak
EVAL_TOKENS, EVAL_BATCH = 40, 128      # greedy evaluation: tokens per completion, prompts per batch


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--output-dir", type=Path, default=CHECKPOINTS,
                        help="where <model>/ checkpoints are written (default: the package's shipped ones)")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="resumable training state (default: ~/.cache/trd_fast/pretrain)")
    parser.add_argument("--models", nargs="+", choices=sorted(SPECS), default=["teacher", "student"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-steps", type=int, default=DEFAULT_STEPS["teacher"])
    parser.add_argument("--student-steps", type=int, default=DEFAULT_STEPS["student"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--teacher-lr", type=float, default=DEFAULT_LR["teacher"], help="peak learning rate")
    parser.add_argument("--student-lr", type=float, default=DEFAULT_LR["student"], help="peak learning rate")
    parser.add_argument("--save-every", type=int, default=200, help="steps between training-state saves")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between greedy evaluations")
    parser.add_argument("--eval-count", type=int, default=200, help="held-out problems per evaluation")
    parser.add_argument("--student-stop-accuracy", type=float, default=0.3,
                        help="stop the student once its greedy accuracy on held-out selection problems reaches "
                             "this (keeps it weak); <= 0 disables")
    parser.add_argument("--stop-check-every", type=int, default=25, help="steps between those checks")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser


def training_pair(task: ChainTask, rng: random.Random, mix) -> tuple[str, str]:
    """One (context, target) pair from the train split; the target is a correct solution."""
    cfg = task.config
    p = random_problem(rng, cfg)
    while split_of(p, cfg) != "train":
        p = random_problem(rng, cfg)
    ex = Example(prompt=p.text(), solution=solution(p, cfg.modulus), answer=str(values(p, cfg.modulus)[-1]))
    kind = rng.choices(range(4), weights=mix)[0]
    if kind in (0, 2):
        return task.teacher_prompt(ex, privileged=kind == 2), ex.solution
    attempt, _ = flawed_attempt(p, rng, cfg.modulus)
    return task.refine_prompt(ex, attempt, privileged=kind == 3), ex.solution


def make_batch(tokenizer, pairs):
    """Right-padded ids with labels only on target tokens and the closing eos. -> ids, mask, labels [B, L]"""
    seqs, labels = [], []
    for ctx, tgt in pairs:
        c = tokenizer(ctx, add_special_tokens=False)["input_ids"]
        t = tokenizer(tgt, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(c + t)
        labels.append([-100] * len(c) + t)
    width = max(map(len, seqs))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    lab = torch.tensor([l + [-100] * (width - len(l)) for l in labels])
    return ids, mask, lab


def learning_rate(step: int, total: int, peak: float) -> float:
    """The rate of 0-based step `step` of `total`: the trainer's cosine schedule with this warmup and floor."""
    return cosine_lr(step, peak=peak, warmup=WARMUP_STEPS, total=total, min_ratio=MIN_LR_RATIO)


def greedy(model, tokenizer, task: ChainTask, examples, prompt_of=None) -> Evaluation:
    """The model's greedy completions of `examples` (student prompts by default), judged by the task."""
    model.eval()
    return evaluate(Runner.with_tokenizer(model, tokenizer, name="model"), task, Tokenize(tokenizer), examples,
                    max_new_tokens=EVAL_TOKENS, prompt_of=prompt_of, batch_size=EVAL_BATCH)


def report(name, model, tokenizer, task, count: int) -> str:
    exs = task.examples("eval", count, seed=0)
    solved = greedy(model, tokenizer, task, exs)
    hist = first_mistakes(exs, solved.completions, solved.verdicts)
    line = f"{name}: solve {solved.accuracy:.3f} first-mistake steps {dict(sorted(hist.items(), key=str))}"
    if name == "teacher":
        rng = random.Random("refine-eval")
        attempts = {e.prompt: flawed_attempt(parse_problem(e.prompt), rng, task.config.modulus)[0] for e in exs}
        refine_prompt = lambda e: task.refine_prompt(e, attempts[e.prompt], privileged=False)
        line += f" | refine {greedy(model, tokenizer, task, exs, prompt_of=refine_prompt).accuracy:.3f}"
    return line


def _selection_accuracy(model, tokenizer, task, count: int = 200) -> float:
    """Accuracy on eval-split problems of a seed the reports and tests do not use."""
    return greedy(model, tokenizer, task, task.examples("eval", count, seed=9999)).accuracy


def train_one(name: str, steps: int, lr: float, args, tokenizer, task: ChainTask) -> None:
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    state_path = (args.state_dir or Path.home() / ".cache" / "trd_fast" / "pretrain") / f"{name}-seed{args.seed}.pt"
    state_path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed * 1000 + sorted(SPECS).index(name))
    model = LlamaForCausalLM(build_config(SPECS[name], tokenizer))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    start = 0
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        start = steps if state.get("stopped") else int(state["step"])
    n_params = sum(p.numel() for p in model.parameters())
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"{name} ({n_params / 1e6:.2f}M)")
    t0, loss_avg = time.time(), None
    for step in bar:
        model.train()
        rng = random.Random(f"pretrain-{args.seed}-{name}-{step}")
        pairs = [training_pair(task, rng, MIXES[name]) for _ in range(args.batch_size)]
        ids, mask, labels = make_batch(tokenizer, pairs)
        for g in opt.param_groups:
            g["lr"] = learning_rate(step, steps, lr)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_avg = loss.item() if loss_avg is None else 0.95 * loss_avg + 0.05 * loss.item()
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        done = step + 1
        stop = name == "student" and args.student_stop_accuracy > 0 and done % args.stop_check_every == 0 \
            and _selection_accuracy(model, tokenizer, task) >= args.student_stop_accuracy
        if done % args.save_every == 0 or done == steps or stop:
            atomic_save({"model": model.state_dict(), "optim": opt.state_dict(), "step": done, "stopped": stop},
                        state_path)
        if stop:
            tqdm.write(f"{name}: stopped at step {done}, selection accuracy >= {args.student_stop_accuracy}")
            break
        if done % args.eval_every == 0 and done < steps:
            tqdm.write(f"step {done}: {report(name, model, tokenizer, task, args.eval_count)}")
    save_model_directory(model, build_tokenizer(), args.output_dir / name)  # a fresh tokenizer: no padding state
    print(f"{name}: saved to {args.output_dir / name} ({time.time() - t0:.0f}s this run)")
    print(report(name, model, tokenizer, task, args.eval_count))


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    tokenizer = build_tokenizer()
    task = ChainTask(ChainConfig())
    steps = {"teacher": args.teacher_steps, "student": args.student_steps}
    lrs = {"teacher": args.teacher_lr, "student": args.student_lr}
    for name in ("teacher", "student"):
        if name in args.models:
            train_one(name, steps[name], lrs[name], args, tokenizer, task)


def main(argv=None) -> None:
    parser = add_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
