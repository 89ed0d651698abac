"""Loading the student and teacher (local Hugging Face directories, offline) and checking that their tokenizers
agree."""

from __future__ import annotations

from pathlib import Path

import torch


def attention_implementation(device: torch.device | str) -> str:
    """"flash_attention_2" when flash_attn imports and the device is CUDA, else "sdpa"."""
    if torch.device(device).type != "cuda":
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


def load_causal_lm(path: str | Path, *, role: str, device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32):
    """The causal LM saved in directory `path` (any architecture transformers knows), in eval mode on `device`."""
    from transformers import AutoModelForCausalLM

    directory = _directory(path, role, "model")
    if not (directory / "config.json").is_file():
        raise ValueError(f"{role} model path {directory} has no config.json: not a Hugging Face model directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype,
                                                     attn_implementation=attention_implementation(device))
    except (OSError, ValueError) as err:
        raise ValueError(f"{role} model path {directory}: cannot load a causal LM ({err})") from err
    return model.to(device).eval()


def load_tokenizer(path: str | Path, *, role: str):
    """The tokenizer saved in directory `path`, with a pad id (the eos id when it has none)."""
    from transformers import AutoTokenizer

    directory = _directory(path, role, "tokenizer")
    if not any((directory / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
        raise ValueError(f"{role} tokenizer path {directory} has no tokenizer_config.json or tokenizer.json")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"{role} tokenizer path {directory}: cannot load a tokenizer ({err})") from err
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{role} tokenizer path {directory}: the tokenizer has no eos token")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_tokenizers_agree(student_tok, teacher_tok, student_path: str | Path, teacher_path: str | Path) -> None:
    """The ids both tokenizers know (below the smaller size: padded vocabularies may differ) must be the same
    token strings, and eos the same id; else ValueError naming both models and the first differing id."""
    shared = min(len(student_tok), len(teacher_tok))
    student_tokens = student_tok.convert_ids_to_tokens(list(range(shared)))
    teacher_tokens = teacher_tok.convert_ids_to_tokens(list(range(shared)))
    differ = next((i for i, (s, t) in enumerate(zip(student_tokens, teacher_tokens)) if s != t), None)
    if differ is not None:
        raise ValueError(f"the tokenizers of student {student_path} and teacher {teacher_path} differ: id {differ} "
                         f"is {student_tokens[differ]!r} vs {teacher_tokens[differ]!r}")
    if student_tok.eos_token_id != teacher_tok.eos_token_id:
        raise ValueError(f"the tokenizers of student {student_path} and teacher {teacher_path} differ: eos id "
                         f"{student_tok.eos_token_id} vs {teacher_tok.eos_token_id}")


def _directory(path: str | Path, role: str, what: str) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"{role} {what} path {directory} does not exist")
    if not directory.is_dir():
        raise ValueError(f"{role} {what} path {directory} is not a directory")
    return directory
