"""Run configuration: frozen dataclasses, loaded from YAML with `key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MODES = ("opd", "trd", "trd_splice")
TEACHER_SOURCES = ("external", "self")
OPD_LOSSES = ("reverse_kl", "forward_kl", "clipped_forward_kl", "top_k_reverse_kl", "jsd")
SPLICE_SIGNALS = ("nll", "log_ratio", "divergence")


@dataclass(frozen=True)
class ModelConfig:
    student: str = ""                  # local Hugging Face model directory of the student (trained)
    teacher: str = ""                  # local model directory of the external teacher; unused with teacher_source=self
    device: str = "cpu"                # where both models run
    dtype: str = "float32"             # parameter dtype of both models: float32 | bfloat16 | float16
    lora_rank: int = 0                 # 0: full fine-tuning; > 0: LoRA adapters of this rank (needs peft)
    lora_alpha: float = 16.0           # LoRA scaling numerator
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # module names that get adapters


@dataclass(frozen=True)
class DataConfig:
    task: str = ""                     # a shipped task by name (tasks/registry.py); or use train_jsonl
    train_jsonl: str = ""              # JSONL of {"prompt", optional "solution", optional "answer"} to train on
    eval_jsonl: str = ""               # JSONL to evaluate on (default: train_jsonl)
    prompt_template: str = "{prompt}\n"                # JSONL tasks: the student's context x
    teacher_template: str = "{prompt}\n"               # JSONL tasks: the teacher's context for scoring y_o
    privileged_template: str = "{prompt}\nReference solution: {solution}\nNow solve it yourself.\n"  # self-teacher
    refine_template: str = (           # JSONL tasks: the teacher's context for rewriting y_o (trd)
        "{prompt}\nHere is an attempt:\n{attempt}\nRewrite it: preserve the structure of the original solution, "
        "fix its errors.\n")
    answer_pattern: str = r"answer\W*(\S+)"  # JSONL tasks: regex whose last match's group 1 is the final answer
    train_examples: int = 2048         # training problems (cycled through in a seeded order)
    eval_examples: int = 256           # held-out problems for `trd-fast eval` and periodic evaluation


@dataclass(frozen=True)
class RolloutConfig:
    temperature: float = 1.0           # student sampling temperature (0: greedy)
    top_p: float = 1.0                 # nucleus sampling mass
    top_k: int = 0                     # sample among the top-k tokens; 0: off
    max_new_tokens: int = 128          # length cap of y_o and of the teacher's y_r
    teacher_temperature: float = 0.0   # the teacher's sampling temperature when it writes y_r (0: greedy)


@dataclass(frozen=True)
class DistillConfig:
    mode: str = "trd"                  # opd | trd | trd_splice
    teacher_source: str = "external"   # external: the teacher model; self: the frozen initial student + privileged info
    opd_loss: str = "reverse_kl"       # opd only: reverse_kl | forward_kl | clipped_forward_kl | top_k_reverse_kl | jsd
    clip: float = 0.1                  # clipped_forward_kl: per-position cap on the divergence
    loss_top_k: int = 32               # top_k_reverse_kl: the teacher's top-k ids, renormalized
    jsd_beta: float = 0.5              # jsd: interpolation weight of the teacher
    temperature: float = 1.0           # temperature of both distributions in the loss
    teacher_top_k: int = 64            # teacher targets kept as top-k SparseTeacher when dense ones exceed the budget
    dense_target_mb: float = 2048.0    # budget for dense teacher targets per micro-batch, in MiB
    splice_signal: str = "nll"         # trd_splice: nll (teacher NLL of y_o's token) | log_ratio (log p_s - log p_T)
                                       # | divergence (reverse KL of student and teacher at the position)
    splice_threshold: float = 2.0      # trd_splice: a trailing mean of the signal above this marks the failure point
    splice_window: int = 1             # trd_splice: positions in that trailing mean
    splice_chunk: int = 4              # trd_splice: score y_o this many tokens at a time, a row stopping at its
                                       # failure point; 0: one pass over all of y_o
    prefix_weight: float = 1.0         # trd_splice: loss weight of y_r tokens kept from y_o
    suffix_weight: float = 1.0         # trd_splice: loss weight of the teacher's continuation
    draft_tokens: int = 16             # trd, trd_splice: y_o tokens the teacher verifies as a draft per forward
                                       # (exactly the same output, fewer forwards); 0: plain decoding
    draft_match: int = 3               # generated tokens matched in y_o to re-align the draft after a mismatch
    epistemic_tokens: tuple[str, ...] = ("Wait", "Actually")  # words whose teacher probability mass is logged


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 100                   # optimizer steps
    batch_size: int = 16               # prompts per step (the global batch)
    micro_batches: int = 1             # gradient accumulation: the batch's training forward in this many pieces
    lr: float = 1e-4                   # peak AdamW learning rate
    weight_decay: float = 0.0          # AdamW weight decay
    warmup_steps: int = 0              # linear warmup steps before the cosine decay
    min_lr_ratio: float = 0.1          # the cosine decays to lr * min_lr_ratio
    max_grad_norm: float = 1.0         # gradient clipping; 0 disables it


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/trd"       # config, metrics.jsonl, checkpoint.pt, curves.png and the final student
    seed: int = 0                      # data order, sampling and initialisation
    checkpoint_every: int = 50         # steps between checkpoints (and one at the end); 0: only at the end
    eval_every: int = 0                # steps between evaluations on eval_examples; 0: none during training
    resume: bool = True                # continue from output_dir/checkpoint.pt when it exists
    progress: bool = True              # tqdm bars for steps and rollouts
    save_student: bool = True          # save the trained student with save_pretrained at the end


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        _validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _validate(c: TrainConfig) -> None:
    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ValueError(f"config {key}: {message}")

    d, o, r = c.distill, c.optim, c.rollout
    need(d.mode in MODES, "distill.mode", f"expected one of {MODES}, got {d.mode!r}")
    need(d.teacher_source in TEACHER_SOURCES, "distill.teacher_source",
         f"expected one of {TEACHER_SOURCES}, got {d.teacher_source!r}")
    need(d.opd_loss in OPD_LOSSES, "distill.opd_loss", f"expected one of {OPD_LOSSES}, got {d.opd_loss!r}")
    need(d.splice_signal in SPLICE_SIGNALS, "distill.splice_signal",
         f"expected one of {SPLICE_SIGNALS}, got {d.splice_signal!r}")
    need(d.clip >= 0, "distill.clip", "must be >= 0")
    need(d.loss_top_k >= 1 and d.teacher_top_k >= 1, "distill.loss_top_k / teacher_top_k", "must be >= 1")
    need(0.0 <= d.jsd_beta <= 1.0, "distill.jsd_beta", "must be in [0, 1]")
    need(d.temperature > 0, "distill.temperature", "must be > 0")
    need(d.splice_window >= 1, "distill.splice_window", "must be >= 1")
    need(d.splice_chunk >= 0, "distill.splice_chunk", "must be >= 0")
    need(math.isfinite(d.splice_threshold), "distill.splice_threshold", "must be finite")
    need(d.prefix_weight >= 0 and d.suffix_weight >= 0, "distill.prefix_weight / suffix_weight", "must be >= 0")
    need(d.draft_tokens >= 0, "distill.draft_tokens", "must be >= 0")
    need(d.draft_match >= 1, "distill.draft_match", "must be >= 1")
    need(o.steps >= 0 and o.batch_size >= 1, "optim.steps / batch_size", "steps >= 0 and batch_size >= 1")
    need(1 <= o.micro_batches <= o.batch_size, "optim.micro_batches", "must be in [1, batch_size]")
    need(o.lr > 0 and o.warmup_steps >= 0 and o.max_grad_norm >= 0, "optim", "lr > 0, warmup_steps >= 0, "
         "max_grad_norm >= 0")
    need(r.temperature >= 0 and r.teacher_temperature >= 0, "rollout.temperature", "must be >= 0")
    need(0.0 < r.top_p <= 1.0, "rollout.top_p", "must be in (0, 1]")
    need(r.top_k >= 0 and r.max_new_tokens >= 1, "rollout.top_k / max_new_tokens", "top_k >= 0, max_new_tokens >= 1")
    need(c.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"unknown dtype {c.model.dtype!r}")
    need(c.model.lora_rank >= 0, "model.lora_rank", "must be >= 0")
    need(bool(c.model.student), "model.student", "a student model directory is required")
    need(bool(c.model.teacher) or d.teacher_source == "self", "model.teacher",
         "an external teacher model directory is required (or set distill.teacher_source=self)")
    need(bool(c.data.task) != bool(c.data.train_jsonl), "data.task / data.train_jsonl", "set exactly one of them")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A TrainConfig from a YAML file (nested sections as in TrainConfig) and `section.key=value` overrides
    (values parsed as YAML scalars). Unknown sections or keys raise ValueError naming them."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {str(path)!r}: expected a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = yaml.safe_load(value)
    return from_dict(raw)


def from_dict(raw: dict[str, Any]) -> TrainConfig:
    sections = {}
    for f in dataclasses.fields(TrainConfig):
        values = raw.get(f.name) or {}
        if not isinstance(values, dict):
            raise ValueError(f"config section {f.name!r}: expected a mapping")
        sections[f.name] = _build(f.default_factory, f.name, values)
    unknown = set(raw) - set(sections)
    if unknown:
        raise ValueError(f"config: unknown section(s) {sorted(unknown)}; known: {sorted(sections)}")
    return TrainConfig(**sections)


def _build(cls, section: str, values: dict[str, Any]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"config section {section!r}: unknown key(s) {sorted(unknown)}; known: {sorted(fields)}")
    converted = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        converted[name] = _convert(value, default, f"{section}.{name}")
    return cls(**converted)


def _convert(value: Any, default: Any, key: str) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"config {key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config {key}: expected a list, got {value!r}")
        return tuple(str(v) for v in value)
    if isinstance(default, (int, float)):
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"config {key}: expected a number, got {value!r}")
        if isinstance(default, int) and not float(value).is_integer():
            raise ValueError(f"config {key}: expected an integer, got {value!r}")
        return type(default)(value)
    if not isinstance(value, str):
        raise ValueError(f"config {key}: expected a string, got {value!r}")
    return value
