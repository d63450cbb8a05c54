"""A weighted mixture of task families and difficulty ranges, read from a recipe file.

A recipe (YAML, or JSON, which YAML reads too):

    description: what the mixture is for        # optional
    tasks:
      - {family: addition, difficulty: [1, 2], weight: 2}   # an inclusive range of levels
      - {family: countdown, difficulty: 1}                  # one level; weight defaults to 1

`--recipe NAME` without a path finds the shipped `nanoseek/recipes/NAME.yaml` (package data: an installed wheel has
them too).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import TaskError
from .base import Problem
from .registry import get_family

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
_TOP_KEYS = {"description", "tasks"}
_ENTRY_KEYS = {"family", "difficulty", "weight"}


@dataclass(frozen=True)
class MixtureEntry:
    family: str
    difficulty: tuple[int, int]  # inclusive range of levels
    weight: float = 1.0


class Mixture:
    """Draws a family by weight, a level uniformly from its range, then a problem; all from one rng."""

    def __init__(self, entries: list[MixtureEntry], source: str = "mixture"):
        if not entries:
            raise TaskError(f"{source}: tasks: the mixture needs at least one entry")
        for i, e in enumerate(entries):
            where = f"{source}: tasks[{i}]"
            try:
                family = get_family(e.family)
            except TaskError as err:
                raise TaskError(f"{where}.family: {err}") from None
            lo, hi = e.difficulty
            if not 1 <= lo <= hi <= family.max_difficulty:
                raise TaskError(f"{where}.difficulty: {list(e.difficulty)} is not a range within "
                                f"1..{family.max_difficulty} for {e.family}")
            if not (math.isfinite(e.weight) and e.weight > 0):
                raise TaskError(f"{where}.weight: must be a positive number, got {e.weight}")
        self.entries, self.source = list(entries), source

    def sample(self, rng: random.Random) -> Problem:
        entry = rng.choices(self.entries, weights=[e.weight for e in self.entries])[0]
        return get_family(entry.family).generate(rng, rng.randint(*entry.difficulty))

    @classmethod
    def from_recipe(cls, recipe: str | Path) -> Mixture:
        """The mixture of a recipe file, or of a shipped recipe by name (`tasks-cpu-demo`)."""
        path = resolve_recipe(recipe)
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise TaskError(f"{path}: cannot read the recipe: {e}") from None
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), list):
            raise TaskError(f"{path}: a recipe is a mapping with a 'tasks' list")
        if unknown := set(data) - _TOP_KEYS:
            raise TaskError(f"{path}: unknown key(s) {sorted(unknown)}; expected {sorted(_TOP_KEYS)}")
        return cls([_entry(item, f"{path}: tasks[{i}]") for i, item in enumerate(data["tasks"])], str(path))


def resolve_recipe(recipe: str | Path) -> Path:
    """A path as given if it exists, else the shipped `recipes/<name>.yaml`."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = RECIPES_DIR / f"{recipe}.yaml"
    if path.suffix == "" and shipped.is_file():
        return shipped
    raise TaskError(f"recipe {str(recipe)!r}: no such file, and no shipped recipe {shipped}")


def _entry(item: object, where: str) -> MixtureEntry:
    if not isinstance(item, dict):
        raise TaskError(f"{where}: expected a mapping with {sorted(_ENTRY_KEYS)}, got {item!r}")
    if unknown := set(item) - _ENTRY_KEYS:
        raise TaskError(f"{where}: unknown key(s) {sorted(unknown)}; expected {sorted(_ENTRY_KEYS)}")
    family, difficulty, weight = item.get("family"), item.get("difficulty"), item.get("weight", 1)
    if not isinstance(family, str):
        raise TaskError(f"{where}.family: expected a family name, got {family!r}")
    levels = [difficulty] if _is_int(difficulty) else difficulty
    if not (isinstance(levels, list) and len(levels) in (1, 2) and all(_is_int(d) for d in levels)):
        raise TaskError(f"{where}.difficulty: expected a level or a [low, high] range, got {difficulty!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise TaskError(f"{where}.weight: expected a number, got {weight!r}")
    return MixtureEntry(family, (levels[0], levels[-1]), float(weight))


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
