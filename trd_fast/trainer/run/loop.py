"""The training loop: rollout -> refine -> fused-loss step, with metrics, checkpoints and evaluation."""

from __future__ import annotations

import copy
import math
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
import yaml
from tqdm.auto import tqdm

from trd_fast.trainer.protocol import Task, Tokenize
from trd_fast.trainer.refine.modes import build_batch
from trd_fast.trainer.refine.request import BatchRequest
from trd_fast.trainer.run.checkpoint import load_checkpoint, save_checkpoint, save_model_directory
from trd_fast.trainer.run.config import TrainConfig
from trd_fast.trainer.run.engine import Engine, build_engine
from trd_fast.trainer.run.evaluate import EVAL_SEED, evaluate
from trd_fast.trainer.run.examples_check import check_examples, context_length
from trd_fast.trainer.run.metrics import CURVES, METRICS, MetricsLog, plot_curves, read_metrics
from trd_fast.trainer.run.schedule import cosine_schedule
from trd_fast.trainer.train.step import train_on


class NonFiniteLoss(FloatingPointError):
    pass


def epoch_order(epoch: int, count: int, seed: int) -> torch.Tensor:
    """The order in which epoch `epoch` visits `count` examples: [count] int64, seeded."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed * 100003 + epoch))


def batch_positions(step: int, batch_size: int, count: int, seed: int) -> list[int]:
    """Dataset indices of the step's rows: epochs of `count` examples, each in its own seeded order."""
    positions = range(step * batch_size, (step + 1) * batch_size)
    orders: dict[int, torch.Tensor] = {}
    rows = []
    for p in positions:
        epoch = p // count
        if epoch not in orders:
            orders[epoch] = epoch_order(epoch, count, seed)
        rows.append(int(orders[epoch][p % count]))
    return rows


def rows_fed(steps: int, batch_size: int, count: int, seed: int) -> list[int]:
    """The distinct dataset indices that `steps` steps of `batch_positions` visit, in increasing order."""
    total = steps * batch_size
    return list(range(count)) if total >= count else sorted(epoch_order(0, count, seed)[:total].tolist())


def train(config: TrainConfig, task: Task, engine: Engine | None = None) -> list[dict]:
    """Run (or resume) training as configured; returns the metrics records of the whole run."""
    torch.manual_seed(config.run.seed)
    engine = engine or build_engine(config)
    train_examples = task.examples("train", config.data.train_examples, config.run.seed)
    eval_examples = task.examples("eval", config.data.eval_examples, EVAL_SEED)
    contexts = dict(student_context=context_length(engine.student_model),
                    teacher_context=context_length(engine.teacher.model))
    check_examples(config, task, engine.tokenizer, train_examples, split="train", with_teacher=True,
                   rows=rows_fed(config.optim.steps, config.optim.batch_size, len(train_examples), config.run.seed),
                   **contexts)
    if config.run.eval_every:
        check_examples(config, task, engine.tokenizer, eval_examples, split="eval", with_teacher=False, **contexts)
    out = Path(config.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True),
                                     encoding="utf-8")
    model, o = engine.student_model, config.optim
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=o.lr, weight_decay=o.weight_decay)
    scheduler = cosine_schedule(optimizer, o.warmup_steps, o.steps, o.min_lr_ratio)
    generator = torch.Generator().manual_seed(config.run.seed)
    start = 0
    if config.run.resume:
        start = load_checkpoint(out, model=model, optimizer=optimizer, scheduler=scheduler, generator=generator) or 0
    log = MetricsLog(out, start)
    tokenize = Tokenize(engine.tokenizer)
    epistemic = _token_ids(engine.tokenizer, config.distill.epistemic_tokens)

    for step in tqdm(range(start, o.steps), desc=f"train {config.distill.mode}", initial=start, total=o.steps,
                     disable=not config.run.progress):
        record = _one_step(config, task, engine, tokenize, train_examples, step, generator, optimizer, scheduler,
                           epistemic)
        if config.run.eval_every and (step + 1) % config.run.eval_every == 0:
            record["eval_accuracy"] = evaluate(engine.student, task, tokenize, eval_examples,
                                               max_new_tokens=config.rollout.max_new_tokens).accuracy
        log.write(record)
        last = step + 1 == o.steps
        if last or (config.run.checkpoint_every and (step + 1) % config.run.checkpoint_every == 0):
            save_checkpoint(out, step=step + 1, model=model, optimizer=optimizer, scheduler=scheduler,
                            generator=generator)

    records = read_metrics(out / METRICS)
    plot_curves(records, out / CURVES, f"{config.distill.mode} ({config.distill.teacher_source} teacher)")
    if config.run.save_student:
        _save_student(model, engine.tokenizer, out / "student")
    return records


def _one_step(config, task, engine, tokenize, examples, step, generator, optimizer, scheduler, epistemic) -> dict:
    clock = time.perf_counter
    began = clock()
    rows = batch_positions(step, config.optim.batch_size, len(examples), config.run.seed)
    engine.student.new_step()
    engine.teacher.new_step()
    engine.student_model.eval()
    batch, times = build_batch(BatchRequest(config, task, tokenize, engine.student, engine.teacher, generator,
                                            [examples[r] for r in rows], rows))

    started = clock()
    engine.student_model.train()
    optimizer.zero_grad(set_to_none=True)
    result = train_on(engine.student_model, batch, config.distill, micro_batches=config.optim.micro_batches,
                      epistemic_ids=epistemic, inplace_backward=engine.inplace_backward)
    if not math.isfinite(result.loss):
        raise NonFiniteLoss(f"non-finite loss ({result.loss}) at step {step + 1}; the run stops here and "
                            f"{config.run.output_dir}/checkpoint.pt keeps the last good state")
    grad_norm = (torch.nn.utils.clip_grad_norm_(engine.student_model.parameters(), config.optim.max_grad_norm)
                 if config.optim.max_grad_norm > 0 else torch.tensor(float("nan")))
    lr = scheduler.get_last_lr()[0]  # the rate this step used
    optimizer.step()
    scheduler.step()
    train_s = clock() - started
    wall = clock() - began

    s, t = engine.student.counters, engine.teacher.counters
    record = {"step": step + 1, "loss": result.loss, "divergence": result.divergence, "entropy": result.entropy,
              "epistemic_mass": result.epistemic_mass, "trained_tokens": result.tokens,
              "grad_norm": float(grad_norm), "lr": lr,
              "sparse_targets": result.sparse_targets, "step_s": wall,
              "trained_tokens_per_s": result.tokens / wall,
              "rollout_s": times.rollout, "refine_s": times.refine, "train_s": train_s,
              "student_prefill_tokens": s.prefill_tokens, "student_decode_tokens": s.decode_tokens,
              "teacher_prefill_tokens": t.prefill_tokens, "teacher_decode_tokens": t.decode_tokens,
              "teacher_draft_tokens": t.draft_tokens, "teacher_accepted_tokens": t.accepted_tokens,
              "teacher_acceptance": t.acceptance,
              "teacher_tokens": t.prefill_tokens + t.decode_tokens + t.draft_tokens,
              "teacher_forwards": t.forwards, "teacher_rescore_forwards": t.rescore_forwards,
              "teacher_rescore_tokens": t.rescore_tokens, **batch.stats}
    if result.sparse_targets and config.distill.mode == "trd" and step == 0:
        warnings.warn(f"teacher targets exceed distill.dense_target_mb and are kept as top-"
                      f"{config.distill.teacher_top_k}: trd then departs from the paper's full-vocabulary "
                      f"forward KL (recorded as sparse_targets in metrics.jsonl)", stacklevel=2)
    return record


def _token_ids(tokenizer, words: Sequence[str]) -> torch.Tensor:
    """Ids of the single-token spellings of `words` (with and without a leading space)."""
    ids = set()
    for word in words:
        for spelling in (word, " " + word):
            encoded = tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                ids.add(encoded[0])
    return torch.tensor(sorted(ids), dtype=torch.int64)


def _save_student(model, tokenizer, directory: Path) -> None:
    """The trained student as a plain model directory (LoRA adapters merged into a copy of the weights)."""
    if hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    save_model_directory(model, tokenizer, directory)
