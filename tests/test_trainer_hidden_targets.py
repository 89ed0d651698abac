"""Teacher targets as hidden states: the engine's fused linear step gives the loss and gradients of the dense
logits path (a fresh full teacher forward and the student's own logits) in every mode and teacher source, with
soft-capped and logit-scaled heads too; no tensor of B x M x V is formed in a step; an unfusable head is refused
by its config key."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import trd_fast
from tiny_models import make_model, make_tokenizer, write_jsonl
from trd_fast.tasks.jsonl import JsonlTask
from trd_fast.trainer.protocol import Tokenize
from trd_fast.trainer.refine.modes import build_batch
from trd_fast.trainer.refine.request import BatchRequest
from trd_fast.trainer.run import loop
from trd_fast.trainer.run.config import from_dict
from trd_fast.trainer.run.engine import build_engine
from trd_fast.trainer.train.step import loss_spec, train_on

MODES = ("opd", "trd", "trd_splice")
STUDENT_VOCAB, TEACHER_VOCAB = 77, 100  # both padded past the tokenizer's 56 ids, unlike any other dimension

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_head_model(directory, family: str, vocab: int, seed: int):
    """A tiny Cohere (logit_scale 0.5) or Gemma 3 (final_logit_softcapping 3, full attention) causal LM."""
    from transformers import CohereConfig, CohereForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if family == "cohere":
        model = CohereForCausalLM(CohereConfig(logit_scale=0.5, tie_word_embeddings=False, **common))
    else:
        model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=8, final_logit_softcapping=3.0,
                                                   layer_types=["full_attention"] * 2, **common))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    model.save_pretrained(directory)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """Model directories: a Qwen3 student and a wider Llama teacher, a Cohere student and a Gemma 3 teacher."""
    root = tmp_path_factory.mktemp("hidden_targets")
    paths = {}
    for name, build in (("qwen3", lambda d: make_model(d, "qwen3", STUDENT_VOCAB, seed=1)),
                        ("llama", lambda d: make_model(d, "llama", TEACHER_VOCAB, hidden=48, seed=2)),
                        ("cohere", lambda d: tiny_head_model(d, "cohere", STUDENT_VOCAB, seed=3)),
                        ("gemma3", lambda d: tiny_head_model(d, "gemma3", TEACHER_VOCAB, seed=4))):
        make_tokenizer(root / name)
        build(root / name)
        paths[name] = str(root / name)
    paths["data"] = str(write_jsonl(root / "train.jsonl", 16))
    return paths


def make_config(pairs, out, student="qwen3", teacher="llama", **sections):
    raw = {"model": {"student": pairs[student], "teacher": pairs[teacher]},
           "data": {"train_jsonl": pairs["data"], "eval_examples": 4},
           "rollout": {"max_new_tokens": 6, "temperature": 1.0},
           "distill": {"splice_threshold": 3.0, "splice_chunk": 2},
           "optim": {"steps": 1, "batch_size": 4, "lr": 1e-3},
           "run": {"output_dir": str(out), "progress": False, "save_student": False}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return from_dict(raw)


def batch_of(config, task, engine, count, seed):
    examples = list(task.examples("train", count, 0))
    request = BatchRequest(config, task, Tokenize(engine.tokenizer), engine.student, engine.teacher,
                           torch.Generator().manual_seed(seed), examples, list(range(count)))
    return examples, build_batch(request)[0]


def dense_loss(config, task, engine, examples, batch):
    """The loss of the dense logits path: the student's own [n, V_s] logits against [n, V_t] logits of one fresh
    teacher forward per row over the context the mode gives the teacher."""
    tokenize, privileged = Tokenize(engine.tokenizer), config.distill.teacher_source == "self"
    student_rows, teacher_rows = [], []
    for b, example in enumerate(examples):
        x, y = batch.contexts[b], batch.completions[b]
        logits = engine.student_model(input_ids=torch.cat([x, y])[None]).logits[0]
        student_rows.append(logits[len(x) - 1:len(x) + len(y) - 1])
        if config.distill.mode == "trd":
            context = tokenize(task.refine_prompt(example, tokenize.text(batch.originals[b]), privileged))
        else:
            context = tokenize(task.teacher_prompt(example, privileged))
        with torch.no_grad():
            logits = engine.teacher.model(input_ids=torch.cat([context, y])[None]).logits[0].float()
        teacher_rows.append(logits[len(context) - 1:len(context) + len(y) - 1])
    spec = loss_spec(config.distill)
    total = sum(len(y) for y in batch.completions)
    return trd_fast.distillation_loss(torch.cat(student_rows), torch.cat(teacher_rows), divergence=spec.divergence,
                                      beta=spec.beta, clip=spec.clip, top_k=spec.top_k,
                                      temperature=config.distill.temperature, weight=torch.cat(batch.weights),
                                      normalizer=float(total), backend="torch")


def gradients(model):
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("models", [("qwen3", "llama"), ("cohere", "gemma3")], ids=["plain", "scaled-softcapped"])
@pytest.mark.parametrize("source", ["external", "self"])
@pytest.mark.parametrize("mode", MODES)
def test_hidden_targets_give_the_dense_loss_and_gradients(pairs, tmp_path, mode, source, models):
    config = make_config(pairs, tmp_path, *models, distill={"mode": mode, "teacher_source": source,
                                                             "opd_loss": "jsd", "jsd_beta": 0.3})
    task = JsonlTask(config.data)
    engine = build_engine(config)
    examples, batch = batch_of(config, task, engine, 4, seed=5)
    assert isinstance(batch.targets[0], torch.Tensor)
    assert batch.targets[0].shape[-1] == engine.teacher.model.config.hidden_size  # hidden states, not logits
    model = engine.student_model
    model.zero_grad(set_to_none=True)
    result = train_on(model, batch, config.distill, micro_batches=2, epistemic_ids=torch.tensor([10]),
                      teacher_head=engine.teacher_head, budget_bytes=2048)
    fused = gradients(model)
    model.zero_grad(set_to_none=True)
    expected = dense_loss(config, task, engine, examples, batch)
    expected.backward()
    dense = gradients(model)
    assert result.loss == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
    assert fused.keys() == dense.keys() and fused
    for name in dense:
        torch.testing.assert_close(fused[name], dense[name], atol=1e-5, rtol=1e-4, msg=name)


class Allocations(TorchDispatchMode):
    """Records the shape of every tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.filterwarnings("ignore:run.memory_budget_mb")  # a budget below one row, on purpose
def test_no_step_tensor_grows_with_rows_times_vocabulary(pairs, tmp_path, mode):
    """8 rows of up to 20 tokens: every tensor with a vocabulary-sized dimension holds at most 48 (the widest
    hidden size) rows of it; the old dense path held all B x M (> 100) rows. The fused loss's own tiles are
    inside its op, bounded by its own budget; drafts are 2 tokens (the verified logits are B x 3 rows)."""
    config = make_config(pairs, tmp_path, rollout={"max_new_tokens": 20}, optim={"batch_size": 8},
                         distill={"mode": mode, "draft_tokens": 2, "splice_signal": "log_ratio"},
                         run={"memory_budget_mb": 0.01})
    task = JsonlTask(config.data)
    engine = build_engine(config)
    with Allocations() as seen:
        _, batch = batch_of(config, task, engine, 8, seed=1)
        train_on(engine.student_model, batch, config.distill, micro_batches=1, epistemic_ids=torch.tensor([10]),
                 teacher_head=engine.teacher_head,
                 budget_bytes=config.budget_bytes)
    positions = sum(len(y) for y in batch.completions)
    assert positions > 100
    offenders = [(func, shape) for func, shape in seen.shapes
                 if any(v in shape and torch.Size(shape).numel() // v > 48 for v in (STUDENT_VOCAB, TEACHER_VOCAB))]
    assert not offenders, offenders[:5]
    assert any(STUDENT_VOCAB in shape or TEACHER_VOCAB in shape for _, shape in seen.shapes)  # logits were formed


def test_softcapped_and_scaled_models_train(pairs, tmp_path):
    config = make_config(pairs, tmp_path, "cohere", "gemma3", distill={"mode": "trd_splice"}, optim={"steps": 2})
    records = loop.train(config, JsonlTask(config.data))
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] > 0 and r["trained_tokens"] > 0 for r in records)


def test_top_k_targets_are_a_sparse_teacher_from_each_logits_row(pairs, tmp_path):
    config = make_config(pairs, tmp_path, distill={"mode": "trd", "teacher_targets": "top_k", "teacher_top_k": 5})
    task = JsonlTask(config.data)
    engine = build_engine(config)
    examples, batch = batch_of(config, task, engine, 4, seed=2)
    tokenize = Tokenize(engine.tokenizer)
    for b, example in enumerate(examples):
        target, y = batch.targets[b], batch.completions[b]
        assert isinstance(target, trd_fast.SparseTeacher) and target.shape == (len(y), 5)
        context = tokenize(task.refine_prompt(example, tokenize.text(batch.originals[b]), False))
        with torch.no_grad():
            logits = engine.teacher.model(input_ids=torch.cat([context, y])[None]).logits[0].float()
        logprobs = torch.log_softmax(logits[len(context) - 1:len(context) + len(y) - 1], -1)[:, :STUDENT_VOCAB]
        values, ids = logprobs.topk(5, dim=-1)
        assert torch.equal(target.ids, ids)
        torch.testing.assert_close(target.logprobs, values, atol=1e-5, rtol=0)


def test_an_unfusable_head_is_refused_by_its_config_key(pairs, tmp_path):
    from transformers import AutoConfig

    directory = tmp_path / "minicpm_like"
    make_tokenizer(directory)
    model = make_model(directory, "llama", STUDENT_VOCAB)
    model.config.dim_model_base = 16  # MiniCPM's head input rescaling, which this head reader does not apply
    model.config.save_pretrained(directory)
    assert AutoConfig.from_pretrained(directory).dim_model_base == 16
    config = make_config({**pairs, "odd": str(directory)}, tmp_path, student="odd")
    with pytest.raises(ValueError, match="student: config.dim_model_base = 16"):
        build_engine(config)


def test_lora_on_the_lm_head_is_refused(pairs, tmp_path):
    pytest.importorskip("peft")
    config = make_config(pairs, tmp_path, model={"lora_rank": 2, "lora_targets": ["q_proj", "lm_head"]})
    with pytest.raises(ValueError, match="model.lora_targets: 'lm_head' is the LM head"):
        build_engine(config)


def test_a_small_budget_splits_the_step_without_changing_it(pairs, tmp_path, monkeypatch):
    import trd_fast.trainer.train.step as step

    config = make_config(pairs, tmp_path, distill={"mode": "trd"})
    task = JsonlTask(config.data)
    engine = build_engine(config)
    _, batch = batch_of(config, task, engine, 4, seed=3)
    model = engine.student_model
    lengths = [len(x) + len(y) for x, y in zip(batch.contexts, batch.completions)]
    assert step.pieces(lengths, 1, 10**9) == [(0, 4)] and step.pieces(lengths, 2, 10**9) == [(0, 2), (2, 4)]
    assert step.pieces(lengths, 1, 1) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert step.pieces(lengths, 1, 10**9, at_least=3) == [(0, 1), (1, 2), (2, 4)]  # as many as another rank's
    with pytest.raises(ValueError, match="4 rows cannot make 5 pieces"):
        step.pieces(lengths, 1, 10**9, at_least=5)
    results, grads, forwards = [], [], []
    real = step.packed_hidden
    monkeypatch.setattr(step, "packed_hidden", lambda *a: forwards.append(1) or real(*a))
    one_row = step.activation_bytes(model) * (max(lengths) + 1)
    for budget, agree, expected in ((1 << 30, int, 1), (one_row, int, 4), (1 << 30, lambda n: 3, 3)):
        model.zero_grad(set_to_none=True)
        forwards.clear()
        results.append(train_on(model, batch, config.distill, micro_batches=1, epistemic_ids=torch.tensor([10]),
                                teacher_head=engine.teacher_head, budget_bytes=budget, agree=agree))
        grads.append(gradients(model))
        assert len(forwards) == expected
    for result, grad in zip(results[1:], grads[1:]):
        assert result.loss == pytest.approx(results[0].loss, rel=1e-6)
        assert result.entropy == pytest.approx(results[0].entropy, rel=1e-6)
        for name in grads[0]:
            torch.testing.assert_close(grad[name], grads[0][name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.filterwarnings("ignore:run.memory_budget_mb")  # the build below one row's budget, on purpose
def test_rollout_and_refinement_in_row_blocks_give_the_batch_of_one_block(pairs, tmp_path, mode):
    """A greedy student and teacher: the batch built one row per block (a budget smaller than a row) is the batch
    built whole, up to the rounding of a differently padded forward; the statistics are over all rows."""
    from trd_fast.trainer.refine import blocks

    batches = []
    for budget in (1024.0, 1e-3):
        config = make_config(pairs, tmp_path, rollout={"temperature": 0.0, "max_new_tokens": 8},
                             distill={"mode": mode, "splice_signal": "nll", "splice_threshold": 4.0},
                             optim={"batch_size": 6}, run={"memory_budget_mb": budget})
        task = JsonlTask(config.data)
        engine = build_engine(config)
        examples = list(task.examples("train", 6, 0))
        request = BatchRequest(config, task, Tokenize(engine.tokenizer), engine.student, engine.teacher,
                               torch.Generator().manual_seed(4), examples, list(range(6)))
        if budget > 1:
            assert len(blocks.split_rows(request)) == 1
        else:
            with pytest.warns(UserWarning, match="run.memory_budget_mb .* is below one row's estimated"):
                assert len(blocks.split_rows(request)) == 6
        batches.append(build_batch(request)[0])
    whole, split = batches
    assert [y.tolist() for y in whole.completions] == [y.tolist() for y in split.completions]
    assert [y.tolist() for y in whole.originals] == [y.tolist() for y in split.originals]
    for a, b in zip(whole.targets, split.targets):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    if mode == "trd_splice":
        assert torch.equal(whole.cut, split.cut)
    assert whole.stats.keys() == split.stats.keys()
    for key, value in whole.stats.items():
        assert split.stats[key] == pytest.approx(value, rel=1e-6, nan_ok=True), key  # fp32 means


def test_combined_statistics_are_those_of_all_rows():
    from trd_fast.trainer.refine.stats import combine_stats

    parts = [{"y_o_len": 4.0, "failure_rate": 0.5, "splice_position": 3.0, "teacher_scored_tokens": 10.0},
             {"y_o_len": 10.0, "failure_rate": 0.0, "splice_position": float("nan"), "teacher_scored_tokens": 5.0},
             {"y_o_len": 1.0, "failure_rate": 1.0, "splice_position": 6.0, "teacher_scored_tokens": 1.0}]
    # rows: 2 (one failed, at 3), 1 (none failed), 3 (all failed, mean 6)
    out = combine_stats(parts, [2, 1, 3])
    assert out["y_o_len"] == pytest.approx((4 * 2 + 10 + 3) / 6)
    assert out["failure_rate"] == pytest.approx(4 / 6)
    assert out["splice_position"] == pytest.approx((3 + 6 * 3) / 4)
    assert out["teacher_scored_tokens"] == 16.0


def test_a_training_step_leaves_no_loss_tiles_behind(pairs, tmp_path):
    """The fused loss keeps its CPU tile buffer between its calls; a step hands it back before the next rollouts."""
    from trd_fast.ops.fused_linear_tiles import kept_tile_bytes

    config = make_config(pairs, tmp_path, distill={"mode": "trd"})
    task = JsonlTask(config.data)
    engine = build_engine(config)
    _, batch = batch_of(config, task, engine, 4, seed=5)
    train_on(engine.student_model, batch, config.distill, micro_batches=2, epistemic_ids=torch.tensor([10]),
             teacher_head=engine.teacher_head, budget_bytes=config.budget_bytes)
    assert kept_tile_bytes() == 0


def test_top_k_capture_of_no_positions_is_empty():
    """A splice cut at position 0 keeps no positions of its scoring hidden states: top-k targets of none."""
    from trd_fast.heads import LMHead
    from trd_fast.trainer.rollout.capture import Capture

    head = LMHead(torch.randn(STUDENT_VOCAB, 8), None, 1.0, None)
    ids, logprobs = Capture(top_k=3, budget_bytes=1 << 20).parts(torch.randn(0, 8), None, head)
    assert ids.shape == (0, 3) and logprobs.shape == (0, 3)
