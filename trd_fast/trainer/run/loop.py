"""The training loop: rollout -> refine -> fused-loss step, with metrics, checkpoints and evaluation."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tqdm.auto import tqdm

from trd_fast.trainer.protocol import Task, Tokenize
from trd_fast.trainer.refine.modes import build_batch
from trd_fast.trainer.refine.request import BatchRequest
from trd_fast.trainer.run.checkpoint import CHECKPOINT, checkpoint_config, discard_checkpoint, has_checkpoint, \
    load_checkpoint, save_checkpoint, save_model_directory
from trd_fast.trainer.run.config import CONFIG, TrainConfig, check_resumable, config_yaml
from trd_fast.trainer.run.engine import Engine, build_engine
from trd_fast.trainer.run.evaluate import EVAL_SEED, accuracy, evaluate
from trd_fast.trainer.run.examples_check import check_examples, context_length
from trd_fast.trainer.run.metrics import CURVES, METRICS, MetricsLog, merge_records, plot_curves, read_metrics
from trd_fast.trainer.run.schedule import cosine_schedule
from trd_fast.trainer.run.sharded_checkpoint import CHECKPOINTS, discard_sharded, has_sharded, load_sharded, \
    save_sharded, sharded_config
from trd_fast.trainer.run.sharding import full_value, shard, unsharded
from trd_fast.trainer.run.world import World, distributed, run_world
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
    """Run (or resume) training as configured; returns the metrics records of the whole run. Under torchrun every
    rank runs it on its share of each step's global batch; rank 0 alone writes files, logs and returns the
    records (the other ranks return [])."""
    check_resume(config, sharded=distributed())  # before a process group or any model, on every rank alike
    o = config.optim
    with run_world(config.model.device, batch_size=o.batch_size, micro_batches=o.micro_batches,
                   timeout_s=config.run.collective_timeout_s) as world:
        return _train(config, task, engine, world)


def check_resume(config: TrainConfig, *, sharded: bool) -> None:
    """With run.resume, what the run would resume is checked: ResumeConflict when its checkpoint was trained with
    another recipe (check_resumable), ValueError when output_dir holds only the other kind of checkpoint (`sharded`:
    this run writes torchrun's checkpoints/, else checkpoint.pt), which it would not see and would start over beside."""
    if not config.run.resume:
        return
    out = Path(config.run.output_dir)
    own = has_sharded(out) if sharded else has_checkpoint(out)
    if not own and (has_checkpoint(out) if sharded else has_sharded(out)):
        other, how = (out / CHECKPOINT, "in one process") if sharded else (out / CHECKPOINTS, "under torchrun")
        raise ValueError(f"{other} was written by a run {how}: resume it the same way, or set run.resume=false")
    check_resumable(config, *(sharded_config(out) if sharded else checkpoint_config(out)))


def _train(config: TrainConfig, task: Task, engine: Engine | None, world: World) -> list[dict]:
    torch.manual_seed(config.run.seed)
    if world.distributed:
        if config.model.lora_rank:
            raise ValueError("config model.lora_rank: LoRA runs in a single process only (not under torchrun)")
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, device=str(world.device)),
                                     run=dataclasses.replace(config.run, progress=config.run.progress and world.main))
        if not world.main:  # rank 0 alone shows progress, transformers' loading bars included
            from transformers.utils import logging as transformers_logging
            transformers_logging.disable_progress_bar()
    engine = engine or build_engine(config)
    if world.distributed:
        shard(engine.student_model, trains=True)
        if config.model.teacher_placement == "shard":
            shard(engine.teacher.model, trains=False)
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
    if world.main:
        out.mkdir(parents=True, exist_ok=True)
        if not config.run.resume:  # starting over: the previous run's checkpoints go with its metrics, so that none
            discard_checkpoint(out)  # is resumed later under this run's config and metrics
            discard_sharded(out)
        (out / CONFIG).write_text(config_yaml(config.to_dict()), encoding="utf-8")
    model, o = engine.student_model, config.optim
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=o.lr, weight_decay=o.weight_decay)
    scheduler = cosine_schedule(optimizer, o.warmup_steps, o.steps, o.min_lr_ratio)
    # Each rank samples from its own stream; rank 0's is the single-process run's (seeds are below 2**32).
    generator = torch.Generator().manual_seed(config.run.seed + (world.rank << 32))
    saved = dict(model=model, optimizer=optimizer, scheduler=scheduler, generator=generator)
    start = 0
    if config.run.resume:
        start = (load_sharded(out, world=world, **saved) if world.distributed else load_checkpoint(out, **saved)) or 0
        if start and world.main:
            tqdm.write(f"{out}: resuming after step {start} of {o.steps} from its checkpoint "
                       f"(run.resume: false starts over)")
    log = MetricsLog(out, start) if world.main else None
    tokenize = Tokenize(engine.tokenizer)
    epistemic = _token_ids(engine.tokenizer, config.distill.epistemic_tokens)

    for step in tqdm(range(start, o.steps), desc=f"train {config.distill.mode}", initial=start, total=o.steps,
                     disable=not config.run.progress):
        record = _one_step(config, task, engine, tokenize, train_examples, step, generator, optimizer, scheduler,
                           epistemic, world)
        if config.run.eval_every and (step + 1) % config.run.eval_every == 0:
            eval_accuracy = _evaluate_shared(engine, task, tokenize, eval_examples, config, world)
            if world.main:
                record["eval_accuracy"] = eval_accuracy
        if world.main:
            log.write(record)
        last = step + 1 == o.steps
        if last or (config.run.checkpoint_every and (step + 1) % config.run.checkpoint_every == 0):
            if world.distributed:
                save_sharded(out, step=step + 1, config=config.to_dict(), world=world, **saved)
            else:
                save_checkpoint(out, step=step + 1, config=config.to_dict(), **saved)

    state = _student_state(model, world) if config.run.save_student else None  # the run's last collective
    # Rank 0's own work from here on (the curves, the student's files) follows the last collective, so no rank waits
    # for it in one and no collective timeout applies to it, however large the model or slow the disk.
    if not world.main:
        return []
    records = read_metrics(out / METRICS)
    plot_curves(records, out / CURVES, f"{config.distill.mode} ({config.distill.teacher_source} teacher)")
    if config.run.save_student:
        _save_student(model, engine.tokenizer, out / "student", state)
    return records


def _one_step(config, task, engine, tokenize, examples, step, generator, optimizer, scheduler, epistemic,
              world: World) -> dict | None:
    """One optimizer step on this rank's share of the step's batch; the step's record on rank 0, else None."""
    clock = time.perf_counter
    began = clock()
    rows = world.share(batch_positions(step, config.optim.batch_size, len(examples), config.run.seed))
    engine.student.new_step()
    engine.teacher.new_step()
    engine.student_model.eval()
    with unsharded(engine.student_model, engine.teacher.model):
        batch, times = build_batch(BatchRequest(config, task, tokenize, engine.student, engine.teacher, generator,
                                                [examples[r] for r in rows], rows))

    started = clock()
    engine.student_model.train()
    optimizer.zero_grad(set_to_none=True)
    tokens = int(world.sum([float(sum(len(y) for y in batch.completions))])[0])   # the global normaliser
    teacher_head = engine.teacher_head
    if config.distill.teacher_targets != "top_k":  # a sharded teacher's head gathered whole (a collective) for the
        teacher_head = dataclasses.replace(                # loss; top-k targets read only its size
            teacher_head, weight=full_value(teacher_head.weight),
            bias=None if teacher_head.bias is None else full_value(teacher_head.bias))
    result = train_on(engine.student_model, batch, config.distill, micro_batches=config.optim.micro_batches,
                      epistemic_ids=epistemic, teacher_head=teacher_head,
                      budget_bytes=config.budget_bytes, total_tokens=tokens, agree=world.most)
    # Each rank's loss terms are its share of the global batch's: summed, they are the global values.
    result.loss, result.divergence, result.entropy, result.epistemic_mass, sparse = world.sum(
        [result.loss, result.divergence, result.entropy, result.epistemic_mass, float(result.sparse_targets)])
    result.sparse_targets = bool(sparse)
    if not math.isfinite(result.loss):  # the same sum on every rank: all stop here, before the optimizer step
        kept = CHECKPOINTS if world.distributed else CHECKPOINT
        raise NonFiniteLoss(f"non-finite loss ({result.loss}) at step {step + 1}; the run stops here and "
                            f"{config.run.output_dir}/{kept} keeps the last good state")
    grad_norm = (full_value(torch.nn.utils.clip_grad_norm_(engine.student_model.parameters(),
                                                           config.optim.max_grad_norm))
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
    gathered = world.gather(record)
    if not world.main:
        return None
    record = merge_records(gathered)
    if result.sparse_targets and config.distill.mode == "trd" and step == 0:
        warnings.warn(f"teacher targets are kept as top-{config.distill.teacher_top_k} (distill.teacher_targets="
                      f"top_k): trd then departs from the paper's full-vocabulary forward KL (recorded as "
                      f"sparse_targets in metrics.jsonl)", stacklevel=2)
    return record


def _evaluate_shared(engine, task, tokenize, examples, config, world: World) -> float:
    """The student's greedy accuracy on `examples`, data parallel: each rank evaluates its contiguous share with the
    unsharded student (no collective inside, so shares of different lengths are fine) and the verified counts are
    summed over ranks. Greedy decoding makes it the accuracy one process finds on all of `examples`."""
    with unsharded(engine.student_model):
        counts = evaluate(engine.student, task, tokenize, world.share(examples),
                          max_new_tokens=config.rollout.max_new_tokens).verified
    return accuracy(*world.sum([float(c) for c in counts]))


def _token_ids(tokenizer, words: Sequence[str]) -> torch.Tensor:
    """Ids of the single-token spellings of `words` (with and without a leading space)."""
    ids = set()
    for word in words:
        for spelling in (word, " " + word):
            encoded = tokenizer(spelling, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                ids.add(encoded[0])
    return torch.tensor(sorted(ids), dtype=torch.int64)


def _student_state(model, world: World) -> dict[str, torch.Tensor] | None:
    """A sharded student's full state dict, gathered tensor by tensor into rank 0's CPU memory (a collective: every
    rank calls it; the others get an empty dict); None for a model in one process, which saves itself."""
    if not world.distributed:
        return None
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _save_student(model, tokenizer, directory: Path, state: dict[str, torch.Tensor] | None) -> None:
    """The trained student as a plain model directory: a sharded student's gathered `state`, or (state None) the
    model's own weights, LoRA adapters merged into a copy of them."""
    if state is None and hasattr(model, "merge_and_unload"):
        model = copy.deepcopy(model).merge_and_unload()
    save_model_directory(model, tokenizer, directory, state_dict=state)
