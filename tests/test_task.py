"""The shipped chain task: generator, verifier, tokenizer, prompt formats and the pretrained checkpoints."""

import random

import pytest
import torch

from trd_fast.tasks import ChainTask, checkpoint_dir
from trd_fast.tasks.generator import flawed_attempt, parse_problem, problems, solution, values
from trd_fast.tasks.tokenizer import EPISTEMIC_WORDS, build_tokenizer
from trd_fast.trainer.protocol import Example

TASK = ChainTask()
M = TASK.config.modulus


def test_generator_is_deterministic():
    assert TASK.examples("train", 50, seed=3) == TASK.examples("train", 50, seed=3)
    assert TASK.examples("eval", 50, seed=3) == TASK.examples("eval", 50, seed=3)
    assert TASK.examples("train", 50, seed=3) != TASK.examples("train", 50, seed=4)


def test_splits_are_disjoint():
    train = {e.prompt for s in range(3) for e in TASK.examples("train", 2000, seed=s)}
    evals = {e.prompt for s in range(3) for e in TASK.examples("eval", 500, seed=s)}
    assert len(evals) > 500 and not train & evals
    with pytest.raises(ValueError, match="split"):
        TASK.examples("test", 1, seed=0)


def test_solution_values_by_hand():
    p = parse_problem("7 + 5 * 4 - 9")
    assert values(p, 11) == [1, 4, 6]
    assert solution(p, 11) == "7 + 5 = 1 ; 1 * 4 = 4 ; 4 - 9 = 6 ; answer 6"


def test_every_intermediate_mistake_changes_the_answer():
    # Operations are bijections mod a prime: a wrong value carried forward always gives a wrong answer.
    for p in problems("train", 200, seed=0, cfg=TASK.config):
        for k in range(len(p.ops)):
            a = values(p, M)[k - 1] if k else p.start
            wrong = (a + 1) % M
            for op, b in p.ops[k:]:
                from trd_fast.tasks.generator import apply
                wrong = apply(op, wrong, b, M)
            assert wrong != values(p, M)[-1]


EX = Example(prompt="7 + 5 * 4 - 9", solution="7 + 5 = 1 ; 1 * 4 = 4 ; 4 - 9 = 6 ; answer 6", answer="6")


@pytest.mark.parametrize("completion, expected", [
    ("7 + 5 = 1 ; 1 * 4 = 4 ; 4 - 9 = 6 ; answer 6", True),
    ("  7 + 5 = 1 ; 1 * 4 = 4 ; 4 - 9 = 6 ; answer 6 ", True),
    ("7 + 5 = 2 ; 2 * 4 = 8 ; 8 - 9 = 10 ; answer 10", False),   # wrong first step, carried forward
    ("7 + 5 = 1 ; 1 * 4 = 4 ; 4 - 9 = 6 ;", False),              # no answer
    ("7 + 5 = 1 ; 1 * 4 = 4 ; 4 - 9 = 6 ; answer", False),       # answer without a number
    ("answer 5 answer 6", False),                                 # the first answer counts
    ("answer 6 7", False),                                        # trailing tokens after the answer
    ("answer 06", False),
    ("Wait Actually ; ; = <unk>", False),
    ("", False),
])
def test_verifier(completion, expected):
    assert TASK.verify(EX, completion) is expected


def test_verifier_without_answer_is_none():
    assert TASK.verify(Example(prompt="1 + 1"), "answer 2") is None


def test_prompt_formats():
    assert TASK.student_prompt(EX) == "Solve mod 11 : 7 + 5 * 4 - 9 Steps :"
    assert TASK.teacher_prompt(EX, privileged=False) == TASK.student_prompt(EX)
    priv = TASK.teacher_prompt(EX, privileged=True)
    assert EX.solution in priv and priv.endswith("Steps :")
    ref = TASK.refine_prompt(EX, "7 + 5 = 2 ;\n 2 * 4", privileged=False)
    assert ref == "Solve mod 11 : 7 + 5 * 4 - 9 Attempt : 7 + 5 = 2 ; 2 * 4 Fix :"
    assert EX.solution in TASK.refine_prompt(EX, "x", privileged=True)
    with pytest.raises(ValueError, match="reference"):
        TASK.teacher_prompt(Example(prompt="1 + 1"), privileged=True)


def test_flawed_attempts_are_mostly_wrong_and_early():
    rng = random.Random(0)
    firsts, lucky = [], 0
    for p in problems("train", 400, seed=1, cfg=TASK.config):
        text, first = flawed_attempt(p, rng, M)
        ex = Example(prompt=p.text(), solution=solution(p, M), answer=str(values(p, M)[-1]))
        assert first is not None or text == ex.solution
        lucky += first is not None and TASK.verify(ex, text)  # random later values may land on the answer
        firsts.append(first)
    wrong = [f for f in firsts if f is not None]
    assert lucky < 0.05 * len(wrong)
    assert 0.7 < len(wrong) / len(firsts) < 0.95
    assert sum(f == 0 for f in wrong) > sum(f == 2 for f in wrong) > 0


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_tokenizer_vocab_and_specials(tokenizer):
    assert len(tokenizer) >= 512
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3
    for w in EPISTEMIC_WORDS:
        assert tokenizer.convert_tokens_to_ids(w) != tokenizer.unk_token_id


def test_tokenizer_round_trip_and_numbers_are_single_tokens(tokenizer):
    rng = random.Random(0)
    for e in TASK.examples("eval", 50, seed=0):
        p = parse_problem(e.prompt)
        for text in (TASK.student_prompt(e), e.solution, TASK.teacher_prompt(e, True),
                     TASK.refine_prompt(e, flawed_attempt(p, rng, M)[0], privileged=True)):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert len(ids) == len(text.split())             # one token per word, numbers included
            assert tokenizer.unk_token_id not in ids
            assert tokenizer.decode(ids) == text
        assert len(tokenizer(TASK.student_prompt(e) + " " + e.solution)["input_ids"]) < 80
    assert len(tokenizer("499", add_special_tokens=False)["input_ids"]) == 1
    ids = tokenizer(EX.solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == EX.solution


@pytest.fixture(scope="module")
def shipped():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    out = {}
    for name in ("teacher", "student"):
        d = checkpoint_dir(name)
        out[name] = (AutoModelForCausalLM.from_pretrained(d, local_files_only=True),
                     AutoTokenizer.from_pretrained(d, local_files_only=True))
    return out


def test_checkpoint_dir():
    assert checkpoint_dir("teacher").name == "teacher"
    with pytest.raises(ValueError, match="name"):
        checkpoint_dir("oracle")


def test_shipped_size_and_tokenizer(shipped):
    total = sum(f.stat().st_size for n in ("teacher", "student") for f in checkpoint_dir(n).iterdir())
    assert total <= 20 * 2 ** 20
    tok = shipped["teacher"][1]
    assert len(tok) >= 512 and tok.decode(tok(EX.solution)["input_ids"]) == EX.solution
    fresh = build_tokenizer()
    assert tok("7", add_special_tokens=False)["input_ids"] == fresh("7", add_special_tokens=False)["input_ids"]


def test_teacher_solves_and_refines_student_is_weaker(shipped):
    from trd_fast.tasks.chain import first_mistakes
    from trd_fast.trainer.protocol import Tokenize
    from trd_fast.trainer.rollout.generation import Runner
    from trd_fast.trainer.run.evaluate import evaluate

    def greedy(name, prompt_of=None):
        model, tok = shipped[name]
        return evaluate(Runner.with_tokenizer(model.eval(), tok, name=name), TASK, Tokenize(tok), exs,
                        max_new_tokens=40, prompt_of=prompt_of)

    exs = TASK.examples("eval", 100, seed=0)
    t_acc = greedy("teacher").accuracy
    rng = random.Random(0)
    attempts = {e.prompt: flawed_attempt(parse_problem(e.prompt), rng, M)[0] for e in exs}
    r_acc = greedy("teacher", prompt_of=lambda e: TASK.refine_prompt(e, attempts[e.prompt], privileged=False)).accuracy
    student = greedy("student")
    s_acc, hist = student.accuracy, first_mistakes(exs, student.completions, student.verdicts)
    # Measured on these 100 problems at release: teacher solve 1.00, refine 0.99 (500 others: 1.00 / 0.998);
    # student 0.44 (500 others: 0.44).
    assert t_acc >= 0.95 and r_acc >= 0.9
    assert 0.15 <= s_acc <= t_acc - 0.25
    assert sum(hist.values()) == round((1 - s_acc) * len(exs))
