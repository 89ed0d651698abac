"""Chained modular arithmetic problems: a start value and a list of operations, evaluated left to right
modulo a prime. The solution writes every step as `a op b = c ;`, carrying c forward as the next a, then
`answer c`. Every operation is a bijection of the running value (prime modulus, non-zero operands), so a
single wrong intermediate value always makes the final answer wrong."""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass

OPS = ("+", "-", "*")
STEP_TOKENS = 6  # `a op b = c ;`


@dataclass(frozen=True)
class ChainConfig:
    modulus: int = 11        # prime; values are 0..modulus-1, operands 1..modulus-1
    min_ops: int = 3         # fewest operations in a problem
    max_ops: int = 5         # most operations in a problem
    eval_buckets: int = 8    # one problem in `eval_buckets` (by hash of its text) belongs to the eval split


@dataclass(frozen=True)
class Problem:
    start: int
    ops: tuple[tuple[str, int], ...]  # (operator, operand) in order

    def text(self) -> str:
        return " ".join([str(self.start)] + [f"{op} {b}" for op, b in self.ops])


def apply(op: str, a: int, b: int, modulus: int) -> int:
    if op == "+":
        return (a + b) % modulus
    if op == "-":
        return (a - b) % modulus
    if op == "*":
        return (a * b) % modulus
    raise ValueError(f"op: unknown operator {op!r}")


def values(problem: Problem, modulus: int) -> list[int]:
    """The running value after each operation (the intermediate results; the last is the answer)."""
    out, a = [], problem.start
    for op, b in problem.ops:
        a = apply(op, a, b, modulus)
        out.append(a)
    return out


def format_steps(steps: list[tuple[int, str, int, int]], answer: int | None) -> str:
    """Steps (a, op, b, c) -> `a op b = c ; ... answer c` (no answer when `answer` is None)."""
    parts = [f"{a} {op} {b} = {c} ;" for a, op, b, c in steps]
    if answer is not None:
        parts.append(f"answer {answer}")
    return " ".join(parts)


def solution(problem: Problem, modulus: int) -> str:
    steps, a = [], problem.start
    for (op, b), c in zip(problem.ops, values(problem, modulus)):
        steps.append((a, op, b, c))
        a = c
    return format_steps(steps, steps[-1][3])


def split_of(problem: Problem, cfg: ChainConfig) -> str:
    """Hash-based split: a problem is in exactly one split whatever seed produced it."""
    bucket = zlib.crc32(problem.text().encode()) % cfg.eval_buckets
    return "eval" if bucket == 0 else "train"


def random_problem(rng: random.Random, cfg: ChainConfig) -> Problem:
    n = rng.randint(cfg.min_ops, cfg.max_ops)
    ops = tuple((rng.choice(OPS), rng.randint(1, cfg.modulus - 1)) for _ in range(n))
    return Problem(rng.randint(0, cfg.modulus - 1), ops)


def problems(split: str, count: int, seed: int, cfg: ChainConfig, unique: bool = True) -> list[Problem]:
    """`count` problems of `split`, deterministic in (split, seed); distinct when `unique`."""
    if split not in ("train", "eval"):
        raise ValueError(f"split: expected 'train' or 'eval', got {split!r}")
    rng = random.Random(f"chain-{split}-{seed}")
    out, seen = [], set()
    while len(out) < count:
        p = random_problem(rng, cfg)
        if split_of(p, cfg) != split or (unique and p in seen):
            continue
        seen.add(p)
        out.append(p)
    return out


def _other(rng: random.Random, value: int, modulus: int) -> int:
    return (value + rng.randint(1, modulus - 1)) % modulus


def flawed_attempt(problem: Problem, rng: random.Random, modulus: int) -> tuple[str, int | None]:
    """A plausible wrong (or sometimes right) attempt and the step index of its first mistake (None when
    correct). Mistakes hit early steps more often; later steps mostly carry the wrong value forward."""
    n = len(problem.ops)
    kind = rng.choices(["result", "copy", "operand", "noisy", "truncate", "correct"],
                       weights=[35, 12, 10, 13, 15, 15])[0]
    if kind == "correct":
        return solution(problem, modulus), None
    k = rng.choices(range(n), weights=[0.6 ** i for i in range(n)])[0]
    steps, a, first = [], problem.start, None
    for i, (op, b) in enumerate(problem.ops):
        shown_a, shown_b = a, b
        if i == k and kind == "copy" and i > 0:
            shown_a = _other(rng, a, modulus)
        if i == k and kind == "operand":
            shown_b = 1 + (b - 1 + rng.randint(1, modulus - 2)) % (modulus - 1)
        c = apply(op, shown_a, shown_b, modulus)
        if (i == k and kind in ("result", "noisy", "truncate")) or (i == k and kind == "copy" and i == 0):
            c = _other(rng, c, modulus)
        elif i > k and kind == "noisy" and rng.random() < 0.5:
            c = rng.randint(0, modulus - 1)
        if first is None and (shown_a, shown_b, c) != (a, b, apply(op, a, b, modulus)):
            first = i
        steps.append((shown_a, op, shown_b, c))
        a = c
    text = format_steps(steps, steps[-1][3])
    if kind == "truncate":
        words = text.split()
        text = " ".join(words[: rng.randint(1, len(words) - 1)])
        cut_step = (len(text.split()) - 1) // STEP_TOKENS
        first = first if first is not None and first <= cut_step else min(cut_step, n - 1)
    return text, first


def parse_problem(text: str) -> Problem:
    """The inverse of `Problem.text`."""
    w = text.split()
    return Problem(int(w[0]), tuple((w[i], int(w[i + 1])) for i in range(1, len(w), 2)))
