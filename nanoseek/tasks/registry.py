"""The task families by name: the built-in ones, and `rg:<dataset>` for any reasoning-gym dataset."""

from __future__ import annotations

import functools

from ..errors import TaskError
from .arithmetic import Addition, Multiplication, Subtraction
from .base import TaskFamily
from .calculator import Calculator
from .chain_sum import ChainSum
from .countdown import Countdown
from .counting import Counting, Parity
from .linear import LinearEquation
from .passkey import Passkey
from .reasoning_gym import PREFIX, ReasoningGymFamily, dataset_names
from .sorting import Sorting

BUILTIN: dict[str, TaskFamily] = {f.name: f for f in (Addition(), Subtraction(), Multiplication(), ChainSum(),
                                                       Countdown(), LinearEquation(), Sorting(), Counting(), Parity(),
                                                       Calculator(), Passkey())}


def families(reasoning_gym: bool = False) -> list[str]:
    """The family names: the built-in ones, then (when asked and installed) every `rg:<dataset>`."""
    return list(BUILTIN) + ([PREFIX + name for name in dataset_names()] if reasoning_gym else [])


@functools.cache
def get_family(name: str) -> TaskFamily:
    """The family called `name`; TaskError naming the known ones if there is none."""
    if name.startswith(PREFIX):
        return ReasoningGymFamily(name[len(PREFIX):])
    if name not in BUILTIN:
        raise TaskError(f"unknown task family {name!r}; known: {', '.join(BUILTIN)}, or rg:<reasoning-gym dataset>")
    return BUILTIN[name]
