"""Rule-based rewards for RL on generated tasks (R1): accuracy, format, DAPO's soft overlong penalty, combined.

Every reward is a `RewardResult(value, reason)` so rollouts can be inspected. The combined reward is

    total = accuracy_weight * (1 if correct, else format_partial if the format is right, else 0)
          + format_weight * format + overlong_weight * overlong

TinyZero's reward is the default (format_partial = 0.1, no separate format term); R1's adds a
format reward (format_weight = 1). The total lies in [-overlong_weight, accuracy_weight + format_weight].
All of it runs in linear time on the completion (`str.find`/`count`, no regex), so megabytes are fine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

from .errors import TaskError
from .tasks import Problem, get_family
from .tokenizer import TAGS

@dataclass(frozen=True)
class RewardResult:
    value: float
    reason: str  # a short label: correct, wrong, no-answer, missing </think>, overlong, ...
    components: dict[str, RewardResult] = field(default_factory=dict)  # filled by `combined_reward`


@dataclass(frozen=True)
class RewardConfig:
    """The weights of the combined reward; lengths are in the unit the caller passes (tokens, or characters)."""

    accuracy_weight: float = 1.0
    format_weight: float = 0.0
    format_partial: float = 0.1  # TinyZero: a well-formed completion with a wrong answer
    overlong_weight: float = 0.0  # DAPO's soft overlong punishment; 0 turns it off
    max_length: int = 1024  # DAPO's L_max
    overlong_cache: int = 256  # DAPO's L_cache: the penalty ramps over the last L_cache before L_max

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise TaskError(f"RewardConfig.{f.name}: must be a finite number >= 0, got {v!r}")
        if self.format_partial > 1:
            raise TaskError(f"RewardConfig.format_partial: must be in [0, 1], got {self.format_partial}")
        if not 0 < self.overlong_cache <= self.max_length:
            raise TaskError(f"RewardConfig.overlong_cache: must be in 1..max_length ({self.max_length}), "
                            f"got {self.overlong_cache}")


def accuracy_reward(problem: Problem, completion: str) -> RewardResult:
    """The family's verifier on the completion's last `<answer>`: a value in [0, 1]."""
    return RewardResult(*get_family(problem.family).judge(problem, completion))


def format_reward(completion: str) -> RewardResult:
    """1 for `<think> ... </think> <answer> ... </answer>`: each tag once, in order, nothing outside; else 0."""
    for tag in TAGS:
        n = completion.count(tag)
        if n != 1:
            return RewardResult(0.0, f"missing {tag}" if n == 0 else f"repeated {tag}")
    think, end_think, answer, end_answer = (completion.find(tag) for tag in TAGS)
    if not think < end_think < answer < end_answer:
        return RewardResult(0.0, "tags out of order")
    if completion[:think].strip() or completion[end_think + len("</think>"):answer].strip() \
            or completion[end_answer + len("</answer>"):].strip():
        return RewardResult(0.0, "text outside the tags")
    return RewardResult(1.0, "ok")


def thinks(completion: str) -> bool:
    """Whether a completion shows worked steps: a `<think>` block with something in it."""
    start, end = completion.find("<think>"), completion.find("</think>")
    return 0 <= start < end and bool(completion[start + len("<think>"):end].strip())


def overlong_penalty(length: int, max_length: int, cache: int) -> RewardResult:
    """DAPO's soft overlong punishment: 0 up to L_max - L_cache, then linear down to -1 at L_max, -1 beyond."""
    if length <= max_length - cache:
        return RewardResult(0.0, "ok")
    if length <= max_length:
        return RewardResult((max_length - cache - length) / cache, "soft-overlong")
    return RewardResult(-1.0, "overlong")


def combined_reward(problem: Problem, completion: str, config: RewardConfig = RewardConfig(),
                    length: int | None = None) -> RewardResult:
    """The weighted total; `components` holds each part and `reason` lists their labels.

    `length` is the completion's length in the unit of `config.max_length` (tokens for RL); it
    defaults to the number of characters.
    """
    accuracy, form = accuracy_reward(problem, completion), format_reward(completion)
    overlong = overlong_penalty(len(completion) if length is None else length, config.max_length, config.overlong_cache)
    correctness = accuracy.value if accuracy.value > 0 else config.format_partial * form.value
    total = (config.accuracy_weight * correctness + config.format_weight * form.value
             + config.overlong_weight * overlong.value)
    components = {"accuracy": accuracy, "format": form, "overlong": overlong}
    return RewardResult(total, " ".join(f"{k}:{v.reason}" for k, v in components.items()), components)
