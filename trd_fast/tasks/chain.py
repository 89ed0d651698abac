"""The chain task in the trainer's protocol: prompt formats, the verifier, the example splits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from trd_fast.trainer.protocol import Example

from trd_fast.tasks.generator import ChainConfig, problems, solution, values


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
