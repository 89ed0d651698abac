"""The models of a run: the trained student (full or LoRA), the teacher (an external model, or the frozen
initial student for self-distillation: a copy, or with LoRA the adapter-disabled base, which shares the
student's weights, LM head included), their LM heads and their runners."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from trd_fast.dependencies import check_version
from trd_fast.heads import LMHead, check_lm_head
from trd_fast.trainer.rollout.capture import Capture
from trd_fast.trainer.rollout.generation import Runner
from trd_fast.trainer.run.config import TrainConfig
from trd_fast.trainer.run.loading import check_tokenizers_agree, load_causal_lm, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Engine:
    student_model: torch.nn.Module   # the model that trains (a peft model with LoRA)
    tokenizer: object                # the student's tokenizer (its shared ids agree with the teacher's)
    student: Runner                  # every student forward of rollouts goes through it
    teacher: Runner                  # every teacher forward goes through it

    @property
    def teacher_head(self) -> LMHead:
        """The teacher's LM head (frozen; with LoRA self-distillation the student's own, adapters off), read now."""
        return self.teacher.head


class AdapterDisabled:
    """A peft model seen with its adapters off: the frozen base, sharing the weights of the trained student."""

    def __init__(self, peft_model):
        self._peft_model = peft_model

    def __call__(self, *args, **kwargs):
        with self._peft_model.disable_adapter():
            return self._peft_model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._peft_model, name)


def build_engine(config: TrainConfig) -> Engine:
    m = config.model
    dtype = DTYPES[m.dtype]
    external = config.distill.teacher_source == "external"
    tokenizer = load_tokenizer(m.student, role="student")
    if external:  # both paths and the tokenizers' agreement are checked before any weights load
        check_tokenizers_agree(tokenizer, load_tokenizer(m.teacher, role="teacher"), m.student, m.teacher)
    student = load_causal_lm(m.student, role="student", device=m.device, dtype=dtype)
    if external:
        teacher = load_causal_lm(m.teacher, role="teacher", device=m.device, dtype=dtype)
    elif m.lora_rank == 0:
        teacher = copy.deepcopy(student)
    else:
        teacher = None  # the adapter-disabled student, below
    if m.lora_rank > 0:
        student = _with_lora(student, m.lora_rank, m.lora_alpha, m.lora_targets)
    if teacher is None:
        teacher = AdapterDisabled(student)
    else:
        teacher.requires_grad_(False)
    student_runner = Runner.with_tokenizer(student, tokenizer, name="student")
    d, budget = config.distill, config.budget_bytes
    capture = Capture(top_k=d.teacher_top_k if d.teacher_targets == "top_k" else 0,
                      columns=student_runner.head.weight.shape[0], budget_bytes=budget)
    teacher_runner = Runner.with_tokenizer(teacher, tokenizer, name="teacher", capture=capture)
    probe = {"input_ids": torch.arange(min(4, len(tokenizer)), device=m.device)[None]}
    for runner in (student_runner, teacher_runner):  # logits the heads imply are the models' own
        check_lm_head(runner.model, runner.head, probe, runner.name)
    return Engine(student_model=student, tokenizer=tokenizer, student=student_runner, teacher=teacher_runner)


def _with_lora(model, rank: int, alpha: float, targets: tuple[str, ...]):
    try:
        import peft
    except ImportError:
        raise ImportError("model.lora_rank > 0 needs peft: pip install 'trd_fast[lora]'") from None
    check_version("peft", peft.__version__, "model.lora_rank > 0")
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"model.lora_targets: the student has no module named {missing}")
    head = next(name for name, module in model.named_modules() if module is model.get_output_embeddings())
    if head.rsplit(".", 1)[-1] in targets:
        raise ValueError(f"model.lora_targets: {head!r} is the LM head, which the fused loss reads as a plain "
                         f"weight; adapt the other modules")
    lora = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=0.0,
                           task_type="CAUSAL_LM")
    return peft.get_peft_model(model, lora)
