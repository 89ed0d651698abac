"""Loading the student and teacher (local Hugging Face directories, offline), checking that their tokenizers
agree, and the student's training forward over many rows at once."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor


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


def packed_logits(model, rows: Sequence[Tensor], keep: Sequence[Tensor]) -> Tensor:
    """One differentiable forward over all rows (1-D int64 tokens each, no padding): [sum len(keep[i]), V]
    logits at positions keep[i] of row i (strictly increasing), rows in order.

    With flash attention the rows are packed into one [1, T] sequence whose position ids restart at 0 per row
    (varlen attention: no pad token costs anything). Other attention implementations see packed rows through a
    dense [T, T] mask, quadratic in the whole batch, so they get a right-padded [B, L] batch instead, whose head
    computes the logits at every position any row keeps ([B, U, V], U the union of keep) before the gather."""
    if len(rows) != len(keep) or not rows:
        raise ValueError(f"rows and keep must be non-empty and of one length, got {len(rows)} and {len(keep)}")
    for i, (row, k) in enumerate(zip(rows, keep)):
        if row.ndim != 1 or len(row) == 0 or row.dtype != torch.int64:
            raise ValueError(f"rows[{i}] must be a non-empty 1-D int64 tensor, got {tuple(row.shape)} {row.dtype}")
        if k.ndim != 1 or k.dtype != torch.int64:
            raise ValueError(f"keep[{i}] must be a 1-D int64 tensor, got {tuple(k.shape)} {k.dtype}")
    bad = torch.stack([((k < 0) | (k >= len(r))).any() | (k.diff() <= 0).any() for r, k in zip(rows, keep)])
    if bad.any():
        raise ValueError(f"keep[{int(bad.int().argmax())}] must hold strictly increasing positions inside its row")
    if model.config._attn_implementation.startswith("flash_attention"):
        return _packed(model, rows, keep)
    return _padded(model, rows, keep)


def _packed(model, rows: Sequence[Tensor], keep: Sequence[Tensor]) -> Tensor:
    device = model.device
    starts = torch.tensor([0] + [len(r) for r in rows[:-1]]).cumsum(0).tolist()
    ids = torch.cat(list(rows)).to(device)[None]                                          # [1, T]
    positions = torch.cat([torch.arange(len(r)) for r in rows]).to(device)[None]         # [1, T]
    index = torch.cat([k.to(device) + s for k, s in zip(keep, starts)])                  # [N]
    return model(input_ids=ids, position_ids=positions, use_cache=False, logits_to_keep=index).logits[0]


def _padded(model, rows: Sequence[Tensor], keep: Sequence[Tensor]) -> Tensor:
    device, width = model.device, max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.int64, device=device)                 # [B, L]
    mask = torch.zeros(len(rows), width, dtype=torch.int64, device=device)                # [B, L]
    for b, row in enumerate(rows):
        ids[b, :len(row)] = row
        mask[b, :len(row)] = 1
    positions = torch.cat(list(keep)).to(device)                                          # [N]
    union = positions.unique()                                                            # [U] sorted
    batch_rows = torch.repeat_interleave(torch.tensor([len(k) for k in keep], device=device))  # [N]
    # A 1-D index tensor keeps the same positions of every row in every transformers version (a 2-D one does not).
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=union).logits  # [B, U, V]
    return logits[batch_rows, torch.searchsorted(union, positions)]                       # [N, V]


def _directory(path: str | Path, role: str, what: str) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise FileNotFoundError(f"{role} {what} path {directory} does not exist")
    if not directory.is_dir():
        raise ValueError(f"{role} {what} path {directory} is not a directory")
    return directory
