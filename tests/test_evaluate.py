"""Evaluation: the unbiased pass@k, majority voting, per-problem metrics and `nanoseek eval` end to end."""

import itertools
import json
import math
import random
from fractions import Fraction

import pytest
import torch

from nanoseek import Transformer
from nanoseek.cli import main
from nanoseek.data import write_jsonl
from nanoseek.evaluate import (ks, majority_index, paired_gain, pass_at_k, problem_metrics, standard_error,
                               task_problems)
from nanoseek.tasks import get_family
from nanoseek.tokenizer import train_tokenizer

from .conftest import tiny_config


def save_tiny_model(path):
    """A random tiny V3 (with MTP) and a small tokenizer of addition and sorting text, saved as a model directory."""
    rng = random.Random(0)
    problems = [get_family(f).generate(rng, d) for f in ("addition", "sorting") for d in (1, 2) for _ in range(20)]
    tok = train_tokenizer([t for p in problems for t in (p.prompt, p.solution)], 320, digits=1)
    torch.manual_seed(0)
    Transformer(tiny_config(vocab_size=tok.vocab_size)).save_pretrained(path)
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


def test_pass_at_k_equals_enumeration_over_subsets():
    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(outcomes, k))
                brute = sum(any(s) for s in subsets) / len(subsets)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_for_large_n():
    exact = 1 - Fraction(math.comb(190, 100), math.comb(200, 100))
    assert pass_at_k(200, 10, 100) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(1000, 0, 500) == 0.0 and pass_at_k(1000, 600, 500) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_majority_vote_over_normalised_answers():
    assert majority_index(["7", " 42", "42 ", None, "7", "42"]) == 1
    assert majority_index(["1,2, 3", "3,2,1", "1 , 2,3"]) == 0  # "1, 2, 3" twice
    assert majority_index(["b", "a", "a", "b"]) == 0  # a tie goes to the answer seen first
    assert majority_index([None, None]) is None


def test_problem_metrics_of_known_completions():
    problem = get_family("addition").generate(random.Random(0), 1)
    right, wrong = problem.answer, str(int(problem.answer) + 1)
    texts = [f"<think> ok </think> <answer>{right}</answer>", f"<answer>{wrong}</answer>",
             f"<think> x </think> <answer> {wrong} </answer>", "no answer at all"]
    m = problem_metrics(problem, texts, [10, 4, 6, 8])
    assert m["pass@1"] == 0.25 and m["pass@4"] == 1.0 and m["maj@4"] == 0.0  # the wrong answer wins the vote
    assert m["format_rate"] == 0.5 and m["answer_rate"] == 0.75 and m["mean_tokens"] == 7.0
    assert m["pass@2"] == 0.5 and m["thinking_rate"] == 0.5  # 1 - C(3,2)/C(4,2); two non-empty <think> blocks
    assert problem_metrics(problem, texts[:2] + texts[:1], [1, 1, 1])["maj@3"] == 1.0


def test_the_pass_at_k_curve_and_standard_errors():
    assert ks(1) == [1] and ks(4) == [1, 2, 4] and ks(6) == [1, 2, 4, 6] and ks(32) == [1, 2, 4, 8, 16, 32]
    assert standard_error([1.0]) == 0.0
    assert standard_error([0.0, 1.0, 0.0, 1.0]) == pytest.approx(math.sqrt(1 / 3 / 4))
    before = {"per_problem": [0.0, 0.5, 1.0, 0.0]}
    after = {"per_problem": [1.0, 0.5, 1.0, 0.5]}
    mean, se = paired_gain(after, before)
    assert mean == pytest.approx(0.375) and se == pytest.approx(standard_error([1.0, 0.0, 0.0, 0.5]))
    assert paired_gain(after, {"per_problem": [0.0]}) is None and paired_gain(after, {}) is None


def test_task_problems_are_distinct_seeded_and_within_the_levels():
    a = task_problems("addition,sorting", 12, seed=3, difficulty=(2, 2))
    assert [p.prompt for p in a] == [p.prompt for p in task_problems("addition,sorting", 12, seed=3,
                                                                      difficulty=(2, 2))]
    assert len({p.prompt for p in a}) == 12 and {p.difficulty for p in a} == {2}
    assert {p.family for p in task_problems("tasks-cpu-demo", 30, seed=0)} > {"addition", "sorting"}


def test_eval_end_to_end_writes_a_deterministic_report(model_dir, tmp_path, capsys):
    args = ["eval", "--model", str(model_dir), "--tasks", "addition,sorting", "--difficulty", "1-2", "--n", "4",
            "--samples", "3", "--max-tokens", "8", "--seed", "5"]
    assert main(args + ["--out", str(tmp_path / "a.json")]) == 0
    table = capsys.readouterr().out
    assert "pass@3" in table and "maj@3" in table and "all" in table
    report = json.loads((tmp_path / "a.json").read_text())
    for key in ("n", "pass@1", "pass@3", "maj@3", "accuracy", "format_rate", "answer_rate", "mean_tokens",
                "by_family", "by_task", "examples", "sampling"):
        assert key in report
    assert report["n"] == 4 and report["samples"] == 3 and report["sampling"]["temperature"] == 0.6
    assert set(report["by_family"]) <= {"addition", "sorting"} and sum(r["n"] for r in report["by_task"].values()) == 4
    assert 0 < report["mean_tokens"] <= 8
    assert main(args + ["--out", str(tmp_path / "b.json")]) == 0
    assert (tmp_path / "b.json").read_text() == (tmp_path / "a.json").read_text()


def test_eval_from_a_held_out_file_with_speculation(model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "held-out.jsonl", task_problems("addition", 3, seed=1, difficulty=(1, 1)))
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(model_dir), "--data", str(data), "--max-tokens", "6", "--speculative",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 3 and report["sampling"]["temperature"] == 0.0 and list(report["by_task"]) == ["addition/1"]
    assert 0 <= report["acceptance_rate"] <= 1 and "drafts accepted" in capsys.readouterr().out


def test_eval_bad_input_exits_2(model_dir, tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "missing"), "--tasks", "addition"]) == 2
    assert "not a model directory" in capsys.readouterr().err
    assert main(["eval", "--model", str(model_dir), "--tasks", "addition,juggling"]) == 2
    assert "unknown task family 'juggling'" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1", "answer": "2"\n')
    assert main(["eval", "--model", str(model_dir), "--data", str(bad)]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    bad.write_text('{"prompt": "1+1", "answer": "2", "meta": {"family": "juggling", "difficulty": 1}}\n')
    assert main(["eval", "--model", str(model_dir), "--data", str(bad)]) == 2
    assert "problem 0" in capsys.readouterr().err
