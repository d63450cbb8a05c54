"""Hostile model output: every verifier and reward returns a value in range, quickly, and never evaluates it."""

import ast
import random
import time
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nanoseek
from nanoseek.rewards import RewardConfig, combined_reward, format_reward
from nanoseek.tasks import families, get_family
from nanoseek.tasks.expr import evaluate

SECONDS = 2.0  # per call; generous for a noisy shared machine (0.5 failed once under load), still catches a hang
VERIFIERS = settings(max_examples=60, deadline=None, database=None,
                     suppress_health_check=[HealthCheck.too_slow])
FAMILIES = families() + ["rg:basic_arithmetic"]
PROBLEMS = [get_family(name).generate(random.Random(0), d) for name in FAMILIES
            for d in (1, get_family(name).max_difficulty)]
BUILTIN_PROBLEMS = [p for p in PROBLEMS if p.has_solution]
TOKENS = ["1", "7", "12", "0", "+", "-", "*", "/", "**", "^", "(", ")", "{", "}", "\\frac", "\\dfrac", "\\left(",
          "\\right)", "x", "=", "$", ".", " ", "nan", "inf", "e9", "٣", "３", "1/0", "9" * 40, "<answer>", "</answer>",
          "<think>", "</think>"]
ADVERSARIAL = [
    "9**9**9**9", "9^9^9^9", "2**2**2**2**2**2", "(" * 5000 + "1" + ")" * 5000, "((" * 40 + "))" * 40, "1/0",
    "1/(3-3)", "nan", "NaN", "inf", "-inf", "1e999999", "٣", "３", "x=٣", "१२", "\\frac{1}{0}",
    "\\frac{" * 30 + "1" + "}" * 30, "x=" + "{" * 30 + "}" * 30, "9" * 100_000, "1" + "0" * 5000, "1" + "+1" * 120,
    "-" * 200 + "1", "$" * 60, "x" * 60, "x=x=x=x", "\x00", "\u202e1", "1.5.5", "__import__('os')", "().__class__",
    "lambda: 0", "\\frac{\\frac{\\frac{1}{2}}{3}}{4}", "\\left(" * 10 + "1" + "\\right)" * 10, "\\sqrt{-1}",
    "\\infty", "10^{10^{10}}", "99999999999!",
]


@pytest.fixture(scope="module", autouse=True)
def _warm_math_verify():
    """The first math-verify call imports sympy's LaTeX parser (about half a second); time the rest."""
    lin = get_family("linear_equation")
    lin.score(lin.generate(random.Random(0), 1), "<answer>\\frac{1}{2}</answer>")


def timed(fn, *args):
    t0 = time.perf_counter()
    value = fn(*args)
    elapsed = time.perf_counter() - t0
    assert elapsed < SECONDS, f"{elapsed:.3f}s for {str(args)[:200]}"
    return value


def check_all(answer: str):
    for text in (f"<think> x </think> <answer>{answer}</answer>", f"<answer>{answer}</answer>", answer):
        for p in PROBLEMS:
            value = timed(get_family(p.family).score, p, text)
            assert 0.0 <= value <= 1.0, (p.family, text[:100], value)
        r = timed(combined_reward, PROBLEMS[0], text, RewardConfig(format_weight=1, overlong_weight=1))
        assert -1.0 <= r.value <= 2.0
        assert timed(format_reward, text).value in (0.0, 1.0)


@VERIFIERS
@given(st.text(max_size=400))
def test_random_text(answer):
    check_all(answer)


@VERIFIERS
@given(st.lists(st.sampled_from(TOKENS), max_size=60).map("".join))
def test_random_expressions(answer):
    check_all(answer)


@VERIFIERS
@given(st.text(alphabet=st.characters(categories=["Nd", "No", "Pd", "Sm"]), min_size=1, max_size=20))
def test_unicode_digits_are_not_numbers(answer):
    if answer.isascii():
        return
    for p in BUILTIN_PROBLEMS:
        assert get_family(p.family).score(p, f"<answer>{answer}</answer>") == 0.0


@pytest.mark.parametrize("answer", ADVERSARIAL, ids=lambda a: repr(a[:24]))
def test_adversarial_answers_score_zero(answer):
    check_all(answer)
    for p in BUILTIN_PROBLEMS:
        assert get_family(p.family).score(p, f"<answer>{answer}</answer>") == 0.0


@pytest.mark.parametrize("completion", [
    "x" * 2**20,
    "<answer>" * 2**17,
    "<think>" + "(" * 2**20 + "</think><answer>1</answer>",
    "<answer>" + "9" * 2**20 + "</answer>",
    "<answer>1</answer>" * 2**16,
    "<think>" * 2**16 + "</answer>" * 2**16,
])
def test_megabyte_completions_in_milliseconds(completion):
    for p in PROBLEMS:
        assert 0.0 <= timed(get_family(p.family).score, p, completion) <= 1.0
    assert -1.0 <= timed(combined_reward, PROBLEMS[0], completion, RewardConfig(overlong_weight=1)).value <= 1.0


def test_solutions_survive_the_same_checks():
    for p in BUILTIN_PROBLEMS:
        assert timed(get_family(p.family).score, p, p.solution) == 1.0


def test_restricted_parser():
    assert evaluate("(12*3)-7") == (29, [12, 3, 7])
    assert evaluate("1/3+1/6") == (Fraction(1, 2), [1, 3, 1, 6])
    assert evaluate("-(1.5)", unary_minus=True, decimals=True) == (Fraction(-3, 2), [Fraction(3, 2)])
    for bad in ("", "9**9", "2^3", "-1", "1.5", "1/0", "1/(2-2)", "(1", "1)", "1 2", "()", "٣", "３+1", "1e5",
                "nan", "(" * 33 + "1" + ")" * 33, "1" * 13, "1" * 257, "x", "abs(1)"):
        assert evaluate(bad) is None, bad
    assert evaluate("(" * 31 + "1" + ")" * 31) == (1, [1])
    assert evaluate("- " * 40 + "1", unary_minus=True) is None  # unary minus counts towards the depth limit


def test_no_eval_or_exec_in_verifiers():
    root = Path(nanoseek.__file__).parent
    for path in [root / "rewards.py", *sorted((root / "tasks").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("eval", "exec", "compile"), f"{path.name}:{node.lineno}"
