"""Run configuration: frozen dataclasses, loaded from YAML with `key=value` overrides."""

from __future__ import annotations

import dataclasses
import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from trd_fast.text_files import read_utf8

MODES = ("opd", "trd", "trd_splice")
TEACHER_SOURCES = ("external", "self")
OPD_LOSSES = ("reverse_kl", "forward_kl", "clipped_forward_kl", "top_k_reverse_kl", "jsd")
SPLICE_SIGNALS = ("nll", "log_ratio", "divergence")
TEACHER_TARGETS = ("hidden", "top_k")
TEACHER_PLACEMENTS = ("replicate", "shard")


@dataclass(frozen=True)
class ModelConfig:
    student: str = ""                  # local Hugging Face model directory of the student (trained)
    teacher: str = ""                  # local model directory of the external teacher; unused with teacher_source=self
    device: str = "cpu"                # where both models run
    dtype: str = "float32"             # parameter dtype of both models: float32 | bfloat16 | float16
    lora_rank: int = 0                 # 0: full fine-tuning; > 0: LoRA adapters of this rank (needs peft)
    lora_alpha: float = 16.0           # LoRA scaling numerator
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # module names that get adapters
    teacher_placement: str = "replicate"  # under torchrun: replicate (a full teacher per rank) | shard (FSDP2)


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
    teacher_targets: str = "hidden"    # hidden: the teacher's final hidden states, the loss applies its LM head
                                       # (full vocabulary, no [tokens, V] tensor); top_k: its top-k log-probs
    teacher_top_k: int = 64            # teacher_targets=top_k: the k of the SparseTeacher targets
    splice_signal: str = "nll"         # trd_splice: nll (teacher NLL of y_o's token) | log_ratio (log p_s - log p_T)
                                       # | divergence (reverse KL of student and teacher at the position)
    splice_threshold: float = 2.0      # trd_splice: a trailing mean of the signal above this marks the failure point
    splice_window: int = 1             # trd_splice: positions in that trailing mean
    splice_chunk: int = 4              # trd_splice: score y_o this many tokens at a time, a row stopping at its
                                       # failure point; 0: one pass over all of y_o
    prefix_weight: float = 1.0         # trd_splice: loss weight of y_r tokens kept from y_o
    suffix_weight: float = 1.0         # trd_splice: loss weight of the teacher's continuation
    draft_tokens: int = 3              # trd, trd_splice: y_o tokens the teacher verifies as a draft per forward
                                       # (exactly the same output, fewer forwards); 0: plain decoding
    draft_match: int = 3               # generated tokens matched in y_o to re-align the draft after a mismatch,
                                       # and the longest run of them looked up in the prompt once y_o is used up
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


CPU_BUDGET_MB = 1024    # run.memory_budget_mb's default on CPU
GPU_BUDGET_SHARE = 8    # ... and on a GPU: this fraction of its memory


@dataclass(frozen=True)
class RunConfig:
    output_dir: str = "runs/trd"       # config, metrics.jsonl, checkpoint.pt, curves.png and the final student
    seed: int = 0                      # data order, sampling and initialisation
    checkpoint_every: int = 50         # steps between checkpoints (and one at the end); 0: only at the end
    eval_every: int = 0                # steps between evaluations on eval_examples; 0: none during training
    resume: bool = True                # continue from output_dir/checkpoint.pt (torchrun: checkpoints/) when it
                                       # exists; false starts over, removing them once the models are loaded
    progress: bool = True              # tqdm bars for steps and rollouts
    save_student: bool = True          # save the trained student with save_pretrained at the end
    memory_budget_mb: float = 0.0      # MiB the engine may hold at once in each part of a step: the rollout and
                                       # refinement of a row block (KV caches, logits rows; estimated per row),
                                       # logit blocks formed from hidden states (scoring signals, top-k targets,
                                       # metrics) and each micro-batch's activations; 0: CPU_BUDGET_MB on CPU,
                                       # 1/GPU_BUDGET_SHARE of the device's memory on a GPU
    collective_timeout_s: float = 600.0  # under torchrun: a rank waiting this long in a collective fails the run


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

    @property
    def budget_bytes(self) -> int:
        """run.memory_budget_mb in bytes, or its default for model.device when 0."""
        if self.run.memory_budget_mb > 0:
            return int(self.run.memory_budget_mb * 2**20)
        device = torch.device(self.model.device)
        if device.type == "cpu":
            return CPU_BUDGET_MB * 2**20
        return torch.get_device_module(device.type).get_device_properties(device).total_memory // GPU_BUDGET_SHARE


CONFIG = "config.yaml"  # the file that records a config: in run.output_dir, and with each sharded checkpoint


def config_yaml(settings: dict) -> str:
    """The YAML text recording a config (TrainConfig.to_dict()), sections and keys in their order."""
    return yaml.safe_dump(settings, sort_keys=False, allow_unicode=True)

# What a resumed run may set differently from the run whose checkpoint it continues: the run's length and its split
# into micro-batches, evaluation and logging, where the models run, how the teacher is drafted and scored (the same
# tokens, targets and cut from a greedy teacher; the same distribution from a sampled one), and the run section's
# bookkeeping (its seed excepted). Any other change would go on training the checkpoint with another recipe than
# the one it was trained with.
RESUMABLE_KEYS = frozenset({"optim.steps", "optim.micro_batches", "data.eval_examples", "data.eval_jsonl",
                            "model.device", "model.teacher_placement", "distill.draft_tokens", "distill.draft_match",
                            "distill.splice_chunk", "distill.epistemic_tokens"})
RESUMABLE_SECTIONS = frozenset({"run"})
NOT_RESUMABLE = frozenset({"run.seed"})


class ResumeConflict(ValueError):
    """A resumed run's config differs at `key` from the one that trained its checkpoint (recorded at `checkpoint`)."""

    def __init__(self, key: str, here: Any, recorded: Any, checkpoint: Path):
        self.key, self.here, self.recorded, self.checkpoint = key, here, recorded, checkpoint
        super().__init__(f"{self.difference}; set it back, or run.resume: false to start over")

    @property
    def difference(self) -> str:
        return (f"config {self.key}: {self.here!r} here but {self.recorded!r} in the config that trained the "
                f"checkpoint ({self.checkpoint})")

    def __reduce__(self):  # rebuilt from its fields (an error raised in a worker process reaches its parent)
        return ResumeConflict, (self.key, self.here, self.recorded, self.checkpoint)


def check_resumable(config: TrainConfig, saved: dict | None, checkpoint: Path) -> None:
    """ResumeConflict naming the first key whose value differs between `config` and `saved`, the config that trained a
    checkpoint (TrainConfig.to_dict(), or its YAML; recorded at `checkpoint`), outside what a resume may change
    (RESUMABLE_KEYS, and RESUMABLE_SECTIONS but NOT_RESUMABLE). Keys that `saved` does not hold (an older
    version's) are not compared; `saved` None (no record) checks nothing."""
    if saved is None:
        return
    before, now = (yaml.safe_load(config_yaml(d)) for d in (saved, config.to_dict()))  # as the YAML record reads
    for section, values in now.items():
        for key, value in values.items():
            name = f"{section}.{key}"
            if name in RESUMABLE_KEYS or (section in RESUMABLE_SECTIONS and name not in NOT_RESUMABLE):
                continue
            recorded = before.get(section, {})
            if not isinstance(recorded, dict):
                raise ValueError(f"the config recorded at {checkpoint} is damaged (its {section} section is not a "
                                 f"mapping); remove the checkpoint, or set run.resume=false")
            old = recorded.get(key, value)
            if old != value:
                raise ResumeConflict(name, value, old, checkpoint)


@dataclass(frozen=True)
class Bounds:
    """The interval a numeric config value must lie in (every float must also be finite)."""
    low: float = -math.inf             # smallest allowed value
    high: float = math.inf             # largest allowed value
    low_open: bool = False             # the low end itself is excluded
    high_open: bool = False            # the high end itself is excluded

    def holds(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        low, high = (str(int(v)) if float(v).is_integer() else f"{v:g}" for v in (self.low, self.high))
        if self.high == math.inf:
            return f"must be {'>' if self.low_open else '>='} {low}"
        return f"must be in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


FP32_MAX = torch.finfo(torch.float32).max
ANY, POSITIVE, AT_LEAST_0, AT_LEAST_1, UNIT = Bounds(), Bounds(0, low_open=True), Bounds(0), Bounds(1), Bounds(0, 1)

# Every numeric field of every section ("section.key"); a field missing here fails every config's validation.
NUMERIC_BOUNDS = {
    "model.lora_rank": AT_LEAST_0,
    "model.lora_alpha": POSITIVE,
    "data.train_examples": AT_LEAST_1,
    "data.eval_examples": AT_LEAST_1,
    "rollout.temperature": AT_LEAST_0,
    "rollout.top_p": Bounds(0, 1, low_open=True),
    "rollout.top_k": AT_LEAST_0,
    "rollout.max_new_tokens": AT_LEAST_1,
    "rollout.teacher_temperature": AT_LEAST_0,
    "distill.clip": AT_LEAST_0,
    "distill.loss_top_k": AT_LEAST_1,
    "distill.jsd_beta": UNIT,
    "distill.temperature": POSITIVE,
    "distill.teacher_top_k": AT_LEAST_1,
    "distill.splice_threshold": ANY,
    "distill.splice_window": AT_LEAST_1,
    "distill.splice_chunk": AT_LEAST_0,
    "distill.prefix_weight": AT_LEAST_0,
    "distill.suffix_weight": AT_LEAST_0,
    "distill.draft_tokens": AT_LEAST_0,
    "distill.draft_match": AT_LEAST_1,
    "optim.steps": AT_LEAST_0,
    "optim.batch_size": AT_LEAST_1,
    "optim.micro_batches": AT_LEAST_1,            # and at most batch_size
    "optim.lr": Bounds(0, 1, low_open=True),   # AdamW's step is about lr per weight: above 1 it diverges
    "optim.weight_decay": AT_LEAST_0,
    "optim.warmup_steps": AT_LEAST_0,
    "optim.min_lr_ratio": UNIT,
    "optim.max_grad_norm": AT_LEAST_0,
    "run.seed": Bounds(0, 2**32, high_open=True),  # seeds torch generators, numpy and the data order
    "run.checkpoint_every": AT_LEAST_0,
    "run.eval_every": AT_LEAST_0,
    "run.memory_budget_mb": AT_LEAST_0,
    "run.collective_timeout_s": POSITIVE,
}

# The placeholders each JSONL template may use.
TEMPLATE_FIELDS = {"prompt_template": {"prompt"}, "teacher_template": {"prompt"},
                   "privileged_template": {"prompt", "solution"}, "refine_template": {"prompt", "attempt"}}


def _validate(c: TrainConfig) -> None:
    def need(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise ValueError(f"config {key}: {message}")

    for section in dataclasses.fields(c):
        values = getattr(c, section.name)
        for f in dataclasses.fields(values):
            value, key = getattr(values, f.name), f"{section.name}.{f.name}"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                need(math.isfinite(value), key, f"must be finite, got {value}")
                need(not isinstance(value, float) or abs(value) <= FP32_MAX, key,  # the optimizer and kernels use fp32
                     f"must be within fp32's range (|x| <= {FP32_MAX:.4g}), got {value}")
                need(NUMERIC_BOUNDS[key].holds(value), key, f"{NUMERIC_BOUNDS[key]}, got {value}")
    d, o = c.distill, c.optim
    need(d.mode in MODES, "distill.mode", f"expected one of {MODES}, got {d.mode!r}")
    need(d.teacher_source in TEACHER_SOURCES, "distill.teacher_source",
         f"expected one of {TEACHER_SOURCES}, got {d.teacher_source!r}")
    need(d.opd_loss in OPD_LOSSES, "distill.opd_loss", f"expected one of {OPD_LOSSES}, got {d.opd_loss!r}")
    need(d.splice_signal in SPLICE_SIGNALS, "distill.splice_signal",
         f"expected one of {SPLICE_SIGNALS}, got {d.splice_signal!r}")
    need(d.teacher_targets in TEACHER_TARGETS, "distill.teacher_targets",
         f"expected one of {TEACHER_TARGETS}, got {d.teacher_targets!r}")
    need(o.micro_batches <= o.batch_size, "optim.micro_batches",
         f"must be in [1, batch_size={o.batch_size}], got {o.micro_batches}")
    need(c.model.teacher_placement in TEACHER_PLACEMENTS, "model.teacher_placement",
         f"expected one of {TEACHER_PLACEMENTS}, got {c.model.teacher_placement!r}")
    need(c.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype", f"unknown dtype {c.model.dtype!r}")
    need(c.model.lora_rank == 0 or bool(c.model.lora_targets), "model.lora_targets",
         "LoRA (model.lora_rank > 0) needs at least one target module")
    problem = _device_problem(c.model.device)
    need(problem is None, "model.device", f"{c.model.device!r}: {problem}")
    need(bool(c.model.student), "model.student", "a student model directory is required")
    need(bool(c.model.teacher) or d.teacher_source == "self", "model.teacher",
         "an external teacher model directory is required (or set distill.teacher_source=self)")
    need(bool(c.data.task) != bool(c.data.train_jsonl), "data.task / data.train_jsonl",
         "set exactly one of them (from a config naming a task: --set data.task=null --set data.train_jsonl=FILE)")
    for name, allowed in TEMPLATE_FIELDS.items():
        problem = _template_problem(getattr(c.data, name), allowed)
        need(problem is None, f"data.{name}", str(problem))
    try:
        re.compile(c.data.answer_pattern)
    except re.error as error:
        need(False, "data.answer_pattern", f"not a regular expression ({error})")
    need(bool(c.run.output_dir), "run.output_dir", "an output directory is required")


def _device_problem(name: str) -> str | None:
    """Why `name` is not a device this machine can run on, or None when it is (cpu, or the available
    accelerator's type with an index below its device count)."""
    try:
        device = torch.device(name)
    except RuntimeError as error:
        return f"not a device ({str(error).splitlines()[0]})"
    if device.type == "cpu":
        return None
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    if accelerator is None or accelerator.type != device.type:
        available = "cpu" + (f", {accelerator.type}" if accelerator is not None else "")
        return f"no {device.type} device on this machine (available: {available})"
    count = torch.accelerator.device_count()
    if device.index is not None and device.index >= count:
        return f"this machine has {count} {device.type} device(s)"
    return None


def _template_problem(template: str, allowed: set[str]) -> str | None:
    """Why `template` cannot be filled by str.format with the `allowed` names, or None."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        return f"not a format template ({error})"
    unknown = sorted({re.split(r"[.\[]", name)[0] for name in names} - allowed)
    if unknown:
        return f"unknown placeholder(s) {unknown}; allowed: {sorted(allowed)} (write {{{{ and }}}} for braces)"
    return None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """A TrainConfig from a YAML file (nested sections as in TrainConfig) and `section.key=value` overrides
    (values parsed as YAML scalars). Unknown sections or keys raise ValueError naming them."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config file {str(path)!r} does not exist")
        raw = _parse_yaml(read_utf8(path), f"config file {str(path)!r}", lines=True) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {str(path)!r}: expected a mapping of sections")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"--set {item!r}: expected section.key=value")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})[name] = _parse_yaml(value, f"--set {item!r}", lines=False)
    return from_dict(raw)


def _parse_yaml(text: str, where: str, *, lines: bool) -> Any:
    """yaml.safe_load, its errors as a ValueError naming `where` (and the line, with `lines`)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" line {mark.line + 1}" if lines and mark is not None else ""
        raise ValueError(f"{where}{at}: not valid YAML ({getattr(error, 'problem', None) or error})") from None


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


# Keys of earlier releases, and what took their place (named in the error an old config gets).
REMOVED = {"distill.dense_target_mb": "teacher targets are the teacher's final hidden states now, never dense "
                                      "logits; distill.teacher_targets: top_k keeps top-k log-probs instead, and "
                                      "run.memory_budget_mb bounds a step's memory"}


def _build(cls, section: str, values: dict[str, Any]):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in values:
        if f"{section}.{key}" in REMOVED:
            raise ValueError(f"config {section}.{key}: removed ({REMOVED[f'{section}.{key}']})")
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
    if value is None:  # `key: null` (or `--set key=null`) unsets a text field
        return ""
    if not isinstance(value, str):
        raise ValueError(f"config {key}: expected a string, got {value!r}")
    return value
