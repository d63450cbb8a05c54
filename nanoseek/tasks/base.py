"""What every task family shares: the `Problem`, the `TaskFamily` interface and answer extraction.

A prompt states the task only. The completion is everything the model writes after it, and a
well-formed completion is `<think> steps </think> <answer> final </answer>`: the model opens the
`<think>` itself (R1's format), so a problem's worked `solution` is exactly such a completion.
Verifiers read the content of the last `<answer>...</answer>` block and nothing else.

Model output is hostile input: nothing here calls eval/exec, answers longer than
`max_answer_chars` score 0 unparsed, tags are found with `str.rfind` (linear time, no regex
backtracking), and numbers must be plain ASCII digits (`int("٣")` is 3 in Python; we reject it).
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from ..errors import TaskError

MAX_ANSWER_CHARS = 256  # longer answers score 0 without being parsed
MAX_INT_DIGITS = 64


@dataclass
class Problem:
    """One generated task. `meta` holds `family`, `difficulty` and whatever the verifier needs (JSON-safe)."""

    prompt: str
    answer: str  # the reference final answer, as the `<answer>` block would hold it
    solution: str | None  # a worked completion that scores 1.0; None where the source has none (RL/eval only)
    meta: dict

    @property
    def family(self) -> str:
        return self.meta["family"]

    @property
    def difficulty(self) -> int:
        return self.meta["difficulty"]

    @property
    def has_solution(self) -> bool:
        return bool(self.solution)

    def to_dict(self) -> dict:
        return {"prompt": self.prompt, "solution": self.solution, "answer": self.answer, "family": self.family,
                "difficulty": self.difficulty, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict) -> Problem:
        return cls(prompt=d["prompt"], answer=d["answer"], solution=d.get("solution"), meta=d["meta"])


def worked(steps: str, answer: object) -> str:
    """The completion format every built-in solution uses."""
    return f"<think> {steps} </think> <answer>{answer}</answer>"


def answer_only(answer: object) -> str:
    """A completion with the final answer and no worked steps (an empty `<think>`)."""
    return f"<think> </think> <answer>{answer}</answer>"


def extract_answer(completion: str) -> str | None:
    """The stripped content of the last `<answer>...</answer>` block, or None if there is none."""
    end = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, end) if end >= 0 else -1
    if start < 0:
        return None
    return completion[start + len("<answer>"):end].strip()


def parse_int(text: str) -> int | None:
    """An optionally negative integer of ASCII digits, at most MAX_INT_DIGITS of them; else None."""
    digits = text[1:] if text.startswith("-") else text
    if not (0 < len(digits) <= MAX_INT_DIGITS and digits.isascii() and digits.isdigit()):
        return None
    return int(text)


class TaskFamily(ABC):
    """A generator and a verifier. Difficulty runs 1..max_difficulty; higher levels are larger problems."""

    name: str
    description: str  # one line, with what the levels change
    max_difficulty: int
    max_answer_chars = MAX_ANSWER_CHARS
    has_solutions = True  # False: problems come without worked solutions (RL and evaluation only)
    tool_functions: Mapping[str, Callable[[str], str]] = {}  # the tools its problems offer: name -> f(JSON arguments)

    def run_tool(self, name: str, arguments: str) -> str:
        """A call's result as the model reads it back; an unknown tool is an error message, not an exception."""
        tool = self.tool_functions.get(name)
        return tool(arguments) if tool else f"error: no tool named {name!r}"

    def generate(self, rng: random.Random, difficulty: int) -> Problem:
        """A problem drawn with `rng` only, so a seed gives the same problems on every machine."""
        if type(difficulty) is not int or not 1 <= difficulty <= self.max_difficulty:  # bool and float refused
            raise TaskError(f"{self.name}: difficulty must be an integer in 1..{self.max_difficulty}, "
                            f"got {difficulty!r}")
        return self.make(rng, difficulty)

    def score(self, problem: Problem, completion: str) -> float:
        """The verifier: a value in [0, 1] for the completion's final answer."""
        return self.judge(problem, completion)[0]

    def judge(self, problem: Problem, completion: str) -> tuple[float, str]:
        """`score` with a reason label: correct, partial, wrong, no-answer or too-long."""
        answer = extract_answer(completion)
        if answer is None:
            return 0.0, "no-answer"
        if len(answer) > self.max_answer_chars:
            return 0.0, "too-long"
        value = self.score_answer(problem, answer)
        return value, "correct" if value == 1.0 else "partial" if value > 0 else "wrong"

    @abstractmethod
    def make(self, rng: random.Random, difficulty: int) -> Problem:
        """Draw one problem of a valid difficulty."""

    def score_answer(self, problem: Problem, answer: str) -> float:
        """Score the extracted answer (at most max_answer_chars). Default: an exact integer."""
        return float(parse_int(answer) == int(problem.answer))

    def problem(self, prompt: str, answer: object, solution: str | None, difficulty: int, **data) -> Problem:
        return Problem(prompt, str(answer), solution, {"family": self.name, "difficulty": difficulty, **data})
