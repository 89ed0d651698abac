"""Teacher forwards a drafting policy needs for trd's rewrite, replayed on recorded rewrites of the shipped task.

A greedy teacher writes the same y_r whatever draft it verifies (up to the rounding of a multi-token forward), so
once (context, y_o, y_r) of a step are recorded, the forwards of any policy follow without the teacher: each
forward accepts the longest prefix of the row's draft equal to y_r's next tokens (never y_r's last token), then
writes one token of its own. A step takes as many forwards as its slowest row. Replayed policies:

  rollout        the shipped Drafter (rollout/draft.py): y_o at an aligned pointer, then a lookup in the context;
  student        a draft model: the student's greedy tokens after its own prompt and y_r so far. A greedy
                 student's draft equals its teacher-forced argmax up to the first disagreement, so one forward of
                 the student over (x, y_r) per row gives every draft. Counted as D student forwards per round in
                 which some row drafts from the student, whatever its room (the first of them would also feed
                 the tokens written since the row's last draft), plus nothing for the student's prefill;
  rollout+student  y_o while the row is still copying it (Drafter.aligned: no substitution guess pending), the
                 student otherwise;
                 the drafter follows the student-drafted tokens as tokens of the row's own.

Beside them, a bound for every drafter that copies (copy_bound): the fewest forwards when each forward's draft is
any run copied from y_o (or also from the refine prompt and the output so far), aligned perfectly. Counts are per
step (the slowest row) and summed over rows, each also over plain decoding's (a forward per token and row).

    .venv/bin/python -m bench.draft_replay            # 8 batches of 64 -> bench/results/draft-replay-cpu.json
    .venv/bin/python -m bench.draft_replay --smoke    # 2 batches of 4 (JSON to the temp dir)

Counts, not times: what a student draft saves in time depends on what its D forwards per round cost against the
teacher forwards it removes.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import torch

from bench import harness
from bench.engine_step import step_config
from trd_fast.drivers import positive_int
from trd_fast.tasks import ChainTask
from trd_fast.trainer.protocol import Tokenize
from trd_fast.trainer.refine.request import BatchRequest
from trd_fast.trainer.refine.rewrite import refine_prompts, rewrite_batch
from trd_fast.trainer.rollout.draft import DraftConfig, Drafter
from trd_fast.trainer.run.config import TrainConfig
from trd_fast.trainer.run.engine import Engine, build_engine
from trd_fast.trainer.run.loop import batch_positions

DRAFTS = (2, 3, 4, 8)
BATCHES = 8

Policy = Callable[[int, int], list[int]]   # (position in y_r, room) -> a row's draft tokens
POLICIES = ("rollout", "student", "rollout+student")
BOUND_SOURCES = ("y_o", "y_o+context+output")


def record(engine: Engine, config: TrainConfig, batches: int, batch_size: int) -> list[dict]:
    """Per batch (seed 0, 1, ...: other problems and rollouts), each row's refine context, y_o, y_r and student
    context x (token id lists), and the token budget, from one plain-decoding trd rewrite: the batches whose
    forwards bench.engine_step counts (`forwards_over_batches`), so the replayed rollout policy can be checked
    against them."""
    if config.rollout.teacher_temperature != 0:
        raise ValueError("rollout.teacher_temperature: the replay needs a greedy teacher (0), got "
                         f"{config.rollout.teacher_temperature}")
    task, tokenize = ChainTask(), Tokenize(engine.tokenizer)
    engine.student_model.eval()
    steps = []
    for seed in range(batches):         # the batch and sampling stream of bench.engine_step's step with this seed
        rows = batch_positions(0, batch_size, batch_size, seed)
        pool = task.examples("train", batch_size, seed)
        examples = [pool[r] for r in rows]
        request = BatchRequest(config, task, tokenize, engine.student, engine.teacher,
                               torch.Generator().manual_seed(seed), examples, rows)
        batch, _ = rewrite_batch(request)
        steps.append({
            "x": [x.tolist() for x in batch.contexts], "y_o": [y.tolist() for y in batch.originals],
            "y_r": [y.tolist() for y in batch.completions],
            "refine": [x.tolist() for x in refine_prompts(request, batch.originals)],
            "budget": config.rollout.max_new_tokens})
    return steps


def recorded(batches: int, batch_size: int) -> tuple[list[dict], list[list[list[int]]], int]:
    """The shipped models' recorded batches (record), the student's picks on them (student_picks) and the EOS id."""
    with tempfile.TemporaryDirectory() as out:
        config = step_config("trd", Path(out), batch_size, chunk=0, draft=0)
        engine = build_engine(config)
        steps = record(engine, config, batches, batch_size)
    return steps, student_picks(engine.student_model, steps), engine.teacher.eos_id


def student_picks(student: torch.nn.Module, steps: list[dict]) -> list[list[list[int]]]:
    """Per batch and row, the student's argmax at each position of y_r after (x, y_r before it)."""
    picks = []
    with torch.no_grad():
        for step in steps:
            rows = []
            for x, y in zip(step["x"], step["y_r"]):
                logits = student(torch.tensor([x + y])).logits[0]                      # [len(x) + len(y), V]
                rows.append(logits[len(x) - 1:len(x) - 1 + len(y)].argmax(-1).tolist())
            picks.append(rows)
    return picks


def forwards(y: Sequence[int], policy: Policy, advance: Callable[[list[int], int], None], eos: int,
             budget: int) -> int:
    """Forwards the greedy teacher needs to write y (EOS last, or cut at `budget` tokens) verifying policy's
    drafts: each accepts the draft's longest prefix equal to y's next tokens, but never y's last token, which is
    always the teacher's own draw; advance(tokens, accepted) learns what each forward wrote."""
    position, count = 0, 0
    while position < len(y):
        draft = policy(position, budget - position - 1)
        draft = draft[:draft.index(eos)] if eos in draft else draft
        accepted, most = 0, min(len(draft), len(y) - 1 - position)      # the last token is the teacher's own
        while accepted < most and draft[accepted] == y[position + accepted]:
            accepted += 1
        advance(y[position:position + accepted + 1], accepted)
        position, count = position + accepted + 1, count + 1
    return count


def longest_copy(y: Sequence[int], position: int, text: Sequence[int], most: int) -> int:
    """The length of the longest run of y's tokens from `position`, at most `most`, that occurs in `text`."""
    best = 0
    for start in range(len(text)):
        length = 0
        while length < most and start + length < len(text) and text[start + length] == y[position + length]:
            length += 1
        best = max(best, length)
        if best == most:
            break
    return best


def fewest_copy_forwards(y: Sequence[int], source: Sequence[int], tokens: int, *, output: bool) -> int:
    """The fewest forwards a greedy teacher needs to write y (EOS last) when every forward's draft, at most `tokens`
    long, is a run of tokens copied from `source`, and with `output` also from y's tokens written before the
    forward, wherever the drafter aligns: a bound for every drafter that copies runs (prompt lookup in y_o, the
    refine prompt or the output), not for one that edits them (the shipped drafter's carried substitutions). Taking
    the longest run at each forward (`forwards` with y as the policy's hindsight) is optimal: the fewest forwards
    from a later position are never more (a cover from an earlier one, cut there, is still of runs)."""
    def longest_run(position: int, room: int) -> list[int]:
        text = list(source) + ([-1] + list(y[:position]) if output else [])   # -1: no run spans the join
        return list(y[position:position + longest_copy(y, position, text, min(tokens, room))])

    # ids are >= 0, so eos=-1 cuts nothing; a budget of len(y) leaves every forward the room y still needs
    return forwards(y, longest_run, lambda generated, accepted: None, eos=-1, budget=len(y))


def copy_bound(step: dict, tokens: int, sources: str) -> dict:
    """fewest_copy_forwards of every row of one batch: per step (the slowest row) and summed over rows. `sources`:
    "y_o" (runs of the rollout), or "y_o+context+output" (also of the refine prompt and the output so far)."""
    if sources not in BOUND_SOURCES:
        raise ValueError(f"sources: one of {BOUND_SOURCES}, got {sources!r}")
    wide = sources != "y_o"
    per_row = [fewest_copy_forwards(y, list(y_o) + ([-1] + list(refine) if wide else []), tokens, output=wide)
               for y, y_o, refine in zip(step["y_r"], step["y_o"], step["refine"])]
    return {"forwards": max(per_row), "row_forwards": sum(per_row)}


def replay(step: dict, picks: list[list[int]], tokens: int, drafts: str, eos: int) -> dict:
    """Forwards per step (the slowest row), summed over rows, and the student forwards per step (see the module
    docstring) of one policy (`drafts`, one of POLICIES) with drafts of `tokens` on one batch."""
    if drafts not in POLICIES:
        raise ValueError(f"drafts: one of {POLICIES}, got {drafts!r}")
    drafter = Drafter(DraftConfig(tokens=tokens), [torch.tensor(y) for y in step["y_o"]], eos,
                      contexts=[torch.tensor(c) for c in step["refine"]])
    per_row, student_rounds = [], []
    for row, y in enumerate(step["y_r"]):
        asked: list[bool] = []          # per round: the row drafted from the student

        def policy(position: int, room: int) -> list[int]:
            asked.append(drafts == "student" or (drafts == "rollout+student" and not drafter.aligned(row)))
            if not asked[-1]:
                return drafter.propose(row, room)
            draft = []
            for want, pick in zip(y[position:position + min(tokens, room)], picks[row][position:]):
                draft.append(pick)
                if pick != want:    # the student's later tokens follow its own pick: not y_r's, never accepted
                    break
            return draft

        def advance(generated: list[int], accepted: int) -> None:
            if not asked[-1]:
                drafter.advance(row, generated, accepted)
            else:                   # the drafter did not propose them: to it they are the row's own tokens
                for token in generated:
                    drafter.advance(row, [token], 0)

        per_row.append(forwards(y, policy, advance, eos, step["budget"]))
        student_rounds.append(asked)
    rounds = max(per_row)
    drafting_rounds = sum(any(asked[r] for asked in student_rounds if r < len(asked)) for r in range(rounds))
    return {"forwards": rounds, "row_forwards": sum(per_row), "student_forwards": tokens * drafting_rounds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 batches of 4, JSON to the temp dir (else it "
                        "overwrites bench/results/draft-replay-cpu.json)")
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches, batch_size = (2, 4) if args.smoke else (BATCHES, 64)
    steps, picks, eos = recorded(batches, batch_size)
    plain = [max(len(y) for y in step["y_r"]) for step in steps]
    plain_rows = sum(len(y) for step in steps for y in step["y_r"])     # plain decoding: a forward per token and row

    def summary(runs: list[dict]) -> dict:
        return {"forwards": [r["forwards"] for r in runs], "row_forwards": [r["row_forwards"] for r in runs],
                "forwards_over_plain_mean": statistics.mean(r["forwards"] / p for r, p in zip(runs, plain)),
                "row_forwards_over_plain": sum(r["row_forwards"] for r in runs) / plain_rows}

    policies, bounds = {}, {}
    for tokens in DRAFTS + (None,):                       # None: drafts as long as the budget, runs of any length
        for sources in BOUND_SOURCES:
            runs = [copy_bound(s, tokens or s["budget"], sources) for s in steps]
            bounds[f"copies of {sources}, drafts of {tokens or 'any length'}"] = summary(runs)
        if tokens is None:
            continue
        for drafts in POLICIES:
            runs = [replay(step, p, tokens, drafts, eos) for step, p in zip(steps, picks)]
            policies[f"{drafts}, drafts of {tokens}"] = {**summary(runs),
                                                        "student_forwards": [r["student_forwards"] for r in runs]}
    pairs = [(a, b) for step, p in zip(steps, picks) for pick, y in zip(p, step["y_r"]) for a, b in zip(pick, y)]
    document = {"machine": harness.machine("cpu"),
                "setup": {"task": "chain", "models": "shipped teacher and student", "batches": batches,
                          "batch_size": batch_size, "max_new_tokens": steps[0]["budget"], "teacher_temperature": 0.0},
                "plain_forwards": plain,
                "student_teacher_forced_agreement": sum(a == b for a, b in pairs) / len(pairs),
                "policies": policies, "copy_bounds": bounds}
    path = (Path(tempfile.gettempdir()) if args.smoke else harness.RESULTS_DIR) / "draft-replay-cpu.json"
    harness.write_json(path, document)
    print(f"plain decoding: forwards per batch {plain}; the student's teacher-forced agreement with y_r "
          f"{document['student_teacher_forced_agreement']:.3f}")
    for name, p in policies.items():
        print(f"{name}: forwards {p['forwards']} (mean {p['forwards_over_plain_mean']:.2f} of plain), summed over "
              f"rows {sum(p['row_forwards'])} ({p['row_forwards_over_plain']:.2f} of plain), student forwards "
              f"{p['student_forwards']}")
    for name, p in bounds.items():
        print(f"bound, {name}: forwards {p['forwards']} (mean {p['forwards_over_plain_mean']:.2f} of plain), summed "
              f"over rows {sum(p['row_forwards'])} ({p['row_forwards_over_plain']:.2f} of plain)")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
