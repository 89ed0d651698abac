"""Metrics over padded vocabularies: the logged entropy and epistemic mass use the loss's own support (the
common columns, or the teacher's top-k among them), so columns a padded vocabulary adds never count."""

from __future__ import annotations

import pytest
import torch

from tiny_models import make_model, make_tokenizer, write_jsonl
from trd_fast.heads import LMHead
from trd_fast.trainer.rollout.capture import Capture
from trd_fast.tasks.jsonl import JsonlTask
from trd_fast.trainer.train.batch import Batch
from trd_fast.trainer.run import loop
from trd_fast.trainer.run.config import DistillConfig, from_dict
from trd_fast.trainer.run.loading import load_causal_lm
from trd_fast.trainer.train.step import train_on

EPISTEMIC = torch.tensor([10, 11])  # "Wait" and "Actually" in the tiny tokenizer


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("padded")
    tokenizer = make_tokenizer(root / "student")
    vocab = len(tokenizer)
    make_model(root / "student", "qwen3", vocab, seed=1)
    make_model(root / "student_padded", "qwen3", vocab + 24, seed=1)
    tokenizer.save_pretrained(root / "student_padded")
    teacher = make_model(root / "teacher", "llama", vocab, hidden=48, seed=2)
    tokenizer.save_pretrained(root / "teacher")
    # the same teacher with its vocabulary padded by 40 columns that copy real ones (as a resized head can)
    teacher.resize_token_embeddings(vocab + 40, mean_resizing=False)
    with torch.no_grad():
        head = teacher.get_output_embeddings().weight
        head[vocab:] = head[4:44]
    teacher.save_pretrained(root / "teacher_padded")
    tokenizer.save_pretrained(root / "teacher_padded")
    write_jsonl(root / "train.jsonl", 16)
    return root


def expected_stats(student, teacher, *, top_k):
    """float64 entropy of the student and teacher mass on EPISTEMIC, over the common columns or the teacher's
    top-k among them, averaged over tokens."""
    common = min(student.shape[-1], teacher.shape[-1])
    s, t = student[:, :common].double(), teacher[:, :common].double()                # [n, common]
    columns = torch.arange(common).expand_as(s)
    if top_k is not None:
        columns = t.topk(top_k, dim=-1).indices
        s, t = s.gather(-1, columns), t.gather(-1, columns)
    p = torch.softmax(s, -1)
    entropy = -(p * torch.log_softmax(s, -1)).sum(-1)
    mass = (torch.softmax(t, -1) * torch.isin(columns, EPISTEMIC)).sum(-1)
    return float(entropy.mean()), float(mass.mean())


def student_logits(model, batch: Batch) -> torch.Tensor:
    rows = []
    with torch.no_grad():
        for x, y in zip(batch.contexts, batch.completions):
            logits = model(input_ids=torch.cat([x, y])[None]).logits[0]
            rows.append(logits[len(x) - 1:len(x) + len(y) - 1])
    return torch.cat(rows)                                                              # [n, V_s]


def random_batch(vocab: int, teacher_vocab: int, sparse_k: int | None) -> tuple[Batch, LMHead]:
    """Random rows whose targets are random teacher hidden states through a random teacher head (as hidden
    states, or as its top-`sparse_k` log-probs among the student's ids), and that head."""
    generator = torch.Generator().manual_seed(0)
    contexts = [torch.randint(4, vocab, (n,), generator=generator) for n in (3, 5, 4)]
    completions = [torch.randint(4, vocab, (n,), generator=generator) for n in (4, 6, 5)]
    bias = torch.zeros(teacher_vocab)
    bias[EPISTEMIC] += 3.0
    bias[vocab:] += 25.0  # padded columns that would swamp every probability if they counted
    head = LMHead(torch.randn(teacher_vocab, 16, generator=generator), bias, 1.0, None)
    capture = Capture(top_k=sparse_k or 0, columns=vocab)
    targets = [capture.target(capture.parts(torch.randn(len(y), 16, generator=generator), None, head))
               for y in completions]
    return Batch(contexts=contexts, completions=completions, targets=targets,
                 weights=[torch.ones(len(y)) for y in completions], originals=completions, cut=None), head


@pytest.mark.parametrize("padded", ["teacher", "student"])
@pytest.mark.parametrize("loss, sparse", [("forward_kl", False), ("top_k_reverse_kl", False),
                                          ("reverse_kl", True)])
def test_step_metrics_use_the_loss_support(root, padded, loss, sparse):
    student = load_causal_lm(root / ("student_padded" if padded == "student" else "student"), role="student")
    vocab = 56  # the tokenizer's size
    teacher_vocab = vocab + 40 if padded == "teacher" else vocab
    batch, teacher_head = random_batch(vocab, teacher_vocab, 7 if sparse else None)
    dense_targets = random_batch(vocab, teacher_vocab, None)[0].targets
    d = DistillConfig(mode="opd", opd_loss=loss, loss_top_k=5, teacher_top_k=7,
                      teacher_targets="top_k" if sparse else "hidden")
    logits = student_logits(student, batch)
    result = train_on(student, batch, d, micro_batches=2, epistemic_ids=EPISTEMIC, teacher_head=teacher_head,
                      budget_bytes=4096)  # a few rows per logit block
    assert result.sparse_targets is sparse
    top_k = 7 if sparse else (5 if loss == "top_k_reverse_kl" else None)
    entropy, mass = expected_stats(logits, teacher_head.logits(torch.cat(dense_targets)), top_k=top_k)
    assert result.entropy == pytest.approx(entropy, rel=1e-5)
    assert result.epistemic_mass == pytest.approx(mass, rel=1e-5)
    assert 1e-3 < mass < 1  # the epistemic tokens hold real mass on the support


def test_a_padded_teacher_logs_the_same_epistemic_mass_as_the_unpadded_one(root, tmp_path):
    records = {}
    for name in ("teacher", "teacher_padded"):
        config = from_dict({"model": {"student": str(root / "student"), "teacher": str(root / name)},
                            "data": {"train_jsonl": str(root / "train.jsonl"), "eval_examples": 4},
                            "rollout": {"max_new_tokens": 6}, "distill": {"mode": "trd"},
                            "optim": {"steps": 1, "batch_size": 4, "lr": 1e-3},
                            "run": {"output_dir": str(tmp_path / name), "progress": False, "save_student": False}})
        records[name] = loop.train(config, JsonlTask(config.data))[0]
    plain, padded = records["teacher"], records["teacher_padded"]
    assert padded["trained_tokens"] == plain["trained_tokens"]
    for key in ("loss", "divergence", "entropy", "epistemic_mass"):
        assert padded[key] == pytest.approx(plain[key], rel=1e-5), key
    assert plain["epistemic_mass"] > 0
