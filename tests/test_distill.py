"""Rejection sampling keeps only verified-correct, well-formed, finished, distinct traces; distillation trains a
student on them."""

import json
import random

import pytest

import nanoseek.train.distill as distill
from nanoseek.engine import Completion
from nanoseek.errors import TrainError
from nanoseek.sampling import SamplingParams
from nanoseek.tasks import get_family
from nanoseek.train.recipe import load_config



def fake_sampler(completions_for):
    """Stands in for the model: each problem gets the completions `completions_for(problem)` returns."""
    def sample(model, tok, problems, samples, params, seed=0, progress=True, desc="", compile=False):
        return None, [[Completion(0, [1], token_ids=[1] * 5, text=text, finish_reason=reason)
                       for text, reason in completions_for(p)] for p in problems]
    return sample


def test_rejection_filter(monkeypatch):
    p = get_family("addition").generate(random.Random(0), 1)
    wrong = p.solution.replace(f"<answer>{p.answer}</answer>", f"<answer>{int(p.answer) + 1}</answer>")
    unformatted = f"<answer>{p.answer}</answer>"
    monkeypatch.setattr(distill, "sample_completions", fake_sampler(lambda _: [
        (p.solution, "stop"), (p.solution + " ", "stop"),  # a duplicate once stripped
        (wrong, "stop"), (unformatted, "stop"), (p.solution, "length")]))
    kept, stats = distill.rejection_sample(None, None, [p], 5, SamplingParams())
    assert [k.solution for k in kept] == [p.solution] and kept[0].prompt == p.prompt
    assert stats == {"problems": 1, "samples": 5, "kept": 1, "problems_solved": 1}


def distill_settings(corpus, base, out, **kw):
    return load_config(None, {}, **{**dict(stage="distill", teacher=str(base), tasks="tasks-cpu-demo", tasks_n=12,
                                           group_size=2, preset="tiny", data=[str(corpus.with_name(
                                               "tasks-held-out.jsonl"))], seq_len=64, batch_size=2, max_steps=3,
                                           save_every=3, eval_n=3, max_new_tokens=24, out=str(out)), **kw})


def test_distillation_trains_a_student_on_the_kept_traces(corpus, base, tmp_path, monkeypatch):
    monkeypatch.setattr(distill, "sample_completions", fake_sampler(lambda p: [(p.solution, "stop")] * 2))
    summary = distill.run(distill_settings(corpus, base, tmp_path))
    traces = [json.loads(line) for line in (tmp_path / "data" / "traces.jsonl").read_text().splitlines()]
    held_out = {json.loads(line)["prompt"] for line in
                corpus.with_name("tasks-held-out.jsonl").read_text().splitlines()}
    assert len(traces) == 12 and not {t["prompt"] for t in traces} & held_out
    assert summary["steps"] == 3 and summary["held_out"]["n"] == 3
    assert (tmp_path / "model" / "config.json").exists()
    index = json.loads((tmp_path / "data" / "shards" / "index.json").read_text())
    assert index["masked"]  # SFT: the loss counts the traces' replies only


def test_a_teacher_that_solves_nothing_is_an_error(corpus, base, tmp_path, monkeypatch):
    monkeypatch.setattr(distill, "sample_completions", fake_sampler(lambda p: [("no idea", "stop")]))
    with pytest.raises(TrainError, match="solved none"):
        distill.run(distill_settings(corpus, base, tmp_path))
