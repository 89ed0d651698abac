"""The chain task in the trainer's protocol: prompt formats, the verifier, the example splits; and where a
failed solution first went wrong."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from trd_fast.tasks.generator import STEP_TOKENS, ChainConfig, problems, solution, values
from trd_fast.trainer.protocol import Example


@dataclass(frozen=True)
class ChainTask:
    """Chained modular arithmetic. Prompts end with `:`, right where the solution starts."""

    config: ChainConfig = field(default_factory=ChainConfig)

    def _header(self, example: Example) -> str:
        return f"Solve mod {self.config.modulus} : {example.prompt}"

    def _reference(self, example: Example) -> str:
        if example.solution is None:
            raise ValueError("example: a privileged prompt needs a reference solution")
        return f" Reference : {example.solution}"

    def student_prompt(self, example: Example) -> str:
        return f"{self._header(example)} Steps :"

    def teacher_prompt(self, example: Example, privileged: bool) -> str:
        ref = self._reference(example) if privileged else ""
        return f"{self._header(example)}{ref} Steps :"

    def refine_prompt(self, example: Example, attempt: str, privileged: bool) -> str:
        ref = self._reference(example) if privileged else ""
        attempt = " ".join(attempt.split())
        return f"{self._header(example)}{ref} Attempt : {attempt} Fix :"

    def verify(self, example: Example, completion: str) -> bool | None:
        """True iff the completion's first `answer` is followed by exactly one token, the right number."""
        if example.answer is None:
            return None
        words = completion.split()
        if "answer" not in words:
            return False
        tail = words[words.index("answer") + 1:]
        return len(tail) == 1 and tail[0] == example.answer

    def examples(self, split: str, count: int, seed: int) -> Sequence[Example]:
        m = self.config.modulus
        return [Example(prompt=p.text(), solution=solution(p, m), answer=str(values(p, m)[-1]))
                for p in problems(split, count, seed, self.config)]


def first_mistake_step(completion: str, reference: str) -> int | None:
    """Index of the step holding the first token that differs from the reference; None if identical."""
    got, ref = completion.split(), reference.split()
    for t, (g, r) in enumerate(zip(got, ref)):
        if g != r:
            return t // STEP_TOKENS
    return None if len(got) == len(ref) else min(len(got), len(ref)) // STEP_TOKENS


def first_mistakes(examples: Sequence[Example], completions: Sequence[str],
                   verdicts: Sequence[bool | None]) -> Counter:
    """Over the completions the verifier did not pass: how many first went wrong at each step."""
    return Counter(first_mistake_step(c, e.solution) for e, c, ok in zip(examples, completions, verdicts) if not ok)
