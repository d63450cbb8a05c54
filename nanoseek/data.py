"""Corpus building: problems of a task mixture, deduplicated by prompt, split into train and held-out JSONL.

A record is `{"prompt", "solution", "answer", "family", "difficulty", "meta"}` (meta: what the
verifier needs, e.g. Countdown's numbers). The held-out problems are drawn from the deduplicated
set, so none of their prompts is in train. Problems without a worked solution (reasoning-gym) stay
in held-out, for evaluation, but are left out of train, which is text to learn from.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from .errors import TaskError
from .rundir import write_text
from .tasks import Mixture, Problem
from .tasks.base import answer_only

MAX_DRAWS_PER_PROBLEM = 20  # a mixture with fewer distinct problems than asked for stops after this many draws each


@dataclass
class Corpus:
    train: list[Problem]
    held_out: list[Problem]
    no_solution: int = 0  # problems left out of train for want of a worked solution
    per_family: dict[str, Counter] = field(default_factory=dict)  # family -> Counter(train=..., held_out=...)


def build_corpus(mixture: Mixture, n: int, held_out: int, seed: int = 0, progress: bool = True) -> Corpus:
    """n distinct problems (fewer if the mixture runs out), `held_out` of them set aside at random."""
    if n < 1 or not 0 <= held_out <= n:
        raise TaskError(f"corpus: need n >= 1 and 0 <= held_out <= n, got n={n}, held_out={held_out}")
    rng = random.Random(seed)
    problems: dict[str, Problem] = {}
    with tqdm(total=n, desc="tasks", unit="problem", disable=not progress) as bar:
        for _ in range(n * MAX_DRAWS_PER_PROBLEM):
            if len(problems) == n:
                break
            p = mixture.sample(rng)
            if p.prompt not in problems:
                problems[p.prompt] = p
                bar.update()
    unique = list(problems.values())
    held = set(rng.sample(range(len(unique)), min(held_out, len(unique))))
    corpus = Corpus([], [])
    for i, p in enumerate(unique):
        split = "held_out" if i in held else "train"
        if split == "train" and not p.has_solution:
            corpus.no_solution += 1
            continue
        getattr(corpus, split).append(p)
        corpus.per_family.setdefault(p.family, Counter())[split] += 1
    return corpus


def cut_steps(problems: list[Problem], worked_fraction: float, seed: int = 0) -> list[Problem]:
    """The problems with all but a `worked_fraction` share of them (drawn with `seed`) reduced to the final answer,
    as in much real pretraining text: answers without the working that led to them. A model trained on such a
    corpus sometimes writes its steps and sometimes guesses; reinforcement learning can find out which pays."""
    if not 0 <= worked_fraction <= 1:
        raise TaskError(f"worked_fraction must be in [0, 1], got {worked_fraction}")
    rng = random.Random(seed)
    return [p if not p.has_solution or rng.random() < worked_fraction else
            Problem(p.prompt, p.answer, answer_only(p.answer), p.meta) for p in problems]


def write_jsonl(path: str | Path, problems: list[Problem]) -> Path:
    """Write one JSON record per problem, atomically."""
    return write_text(path, "".join(json.dumps(p.to_dict(), ensure_ascii=False) + "\n" for p in problems))


def read_jsonl(path: str | Path) -> list[Problem]:
    with open(path) as f:
        return [Problem.from_dict(json.loads(line)) for line in f if line.strip()]


def held_out_path(train_path: str | Path) -> Path:
    """`corpus.jsonl` -> `corpus-held-out.jsonl`."""
    path = Path(train_path)
    return path.with_name(f"{path.stem}-held-out{path.suffix or '.jsonl'}")
