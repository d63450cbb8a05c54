"""Passkey retrieval (needle in a haystack): a number hidden at a chosen depth of a long filler text, asked for last.

The test of Mohtashami & Jaggi (2023) that long-context work (YaRN, DeepSeek-V3 section 4.3) reports: the filler
repeats "The grass is green. The sky is blue. ...", the needle is "The pass key is 73913.", and the model must
answer the number. Level d holds 2^(d-1) filler sentences (levels 1..12: 1 to 2,048); the needle's depth (0 = at
the start, 1 = at the end) is drawn from DEPTHS and kept in `meta["depth"]`, so an evaluation can be read by length
and depth (`evaluate`'s `by_depth`). `Passkey.with_sentences` makes a problem of any number of sentences, for
lengths between the levels.
"""

from __future__ import annotations

import random

from ..errors import TaskError
from .base import TaskFamily, answer_only

FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def sentences(level: int) -> int:
    """How many filler sentences a problem of this level holds."""
    return 2 ** (level - 1)


class Passkey(TaskFamily):
    name = "passkey"
    description = "the pass key hidden in a filler text; level d: 2^(d-1) filler sentences, depths 0-100%"
    max_difficulty = 12

    def make(self, rng: random.Random, difficulty: int):
        return self.with_sentences(rng, sentences(difficulty))

    def with_sentences(self, rng: random.Random, n: int):
        """A problem of n >= 1 filler sentences; its difficulty is the level whose range holds n (2^(d-1) <= n <
        2^d)."""
        if type(n) is not int or n < 1:
            raise TaskError(f"{self.name}: the number of filler sentences must be a positive integer, got {n!r}")
        key = rng.randint(10000, 99999)
        depth = rng.choice(DEPTHS)
        filler = [FILLER[i % len(FILLER)] for i in range(n)]
        at = round(depth * n)
        text = " ".join([*filler[:at], f"The pass key is {key}.", *filler[at:], "What is the pass key?"])
        return self.problem(text, key, answer_only(key), n.bit_length(), depth=depth)
