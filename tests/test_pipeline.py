"""The multi-stage runner behind `nanoseek demo`: a tiny pipeline end to end, resume after a kill, clear errors."""

import json

import pytest
import yaml

import nanoseek.train.distill as distill
from nanoseek.cli import main
from nanoseek.data import read_jsonl
from nanoseek.errors import TrainError
from nanoseek.pipeline import Pipeline, PipelineConfig
from nanoseek.tasks import Mixture, resolve_recipe
from nanoseek.train.trainer import Trainer

from .conftest import crash_after
from .test_distill import fake_sampler

TINY = dict(preset="tiny", seq_len=64, batch_size=2, save_every=2, mtp_lambda=0.3)
RECIPE = {
    "tasks": "tasks-cpu-demo", "tasks_n": 300, "eval_n": 6, "eval_harder_n": 4, "eval_samples": 2,
    "eval_max_new_tokens": 12, "vocab_size": 300, "tokenizer_digits": 1, "export": "grpo",
    "tool_tasks": "tasks-tools", "tool_tasks_n": 10, "tool_eval_n": 3,
    "stages": [
        {"name": "pretrain", "stage": "pretrain", "max_steps": 4, "warmup_steps": 1, **TINY},
        {"name": "grpo", "stage": "grpo", "init": "pretrain", "max_steps": 4, "group_size": 2, "prompts_per_step": 2,
         "max_new_tokens": 12, "save_every": 2, "lr": 1e-4},
        {"name": "distill", "stage": "distill", "teacher": "grpo", "tasks_n": 4, "group_size": 2, "max_steps": 2,
         "max_new_tokens": 12, **TINY}]}


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(distill, "sample_completions", fake_sampler(lambda p: [(p.solution, "stop")] * 2))
    path = tmp_path / "tiny-pipeline.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return path


def test_pipeline_runs_every_stage_and_keeps_the_held_out_problems_unseen(recipe, tmp_path, capsys):
    extend = {"name": "extend", "stage": "extend", "init": "pretrain", "max_steps": 2, "warmup_steps": 1, **TINY,
              "seq_len": 128, "extend": {"factor": 8, "original_length": 64}}  # YaRN, context 64 -> 512
    pretrain, grpo, distill = RECIPE["stages"]
    recipe.write_text(yaml.safe_dump({**RECIPE, "stages": [pretrain, extend, {**grpo, "init": "extend"}, distill]}))
    out = tmp_path / "run"
    assert main(["demo", "--recipe", str(recipe), "--out", str(out)]) == 0
    state = json.loads((out / "pipeline.json").read_text())
    assert [s["name"] for s in state["stages"]] == [
        "data", "tokenizer", "pretrain", "eval pretrain", "extend", "eval extend", "grpo", "eval grpo", "distill",
        "eval distill", "export", "eval tools", "report"]
    extended = json.loads((out / "grpo" / "model" / "config.json").read_text())  # GRPO trained the extended model
    assert extended["rope_scaling"]["factor"] == 8.0 and extended["max_position_embeddings"] == 512
    corpus = read_jsonl(out / "data" / "corpus.jsonl")
    train = {p.prompt for p in corpus}
    tool_problems = read_jsonl(out / "data" / "tools-eval.jsonl")
    assert sum(p.family == "calculator" for p in corpus) == 10 and len(tool_problems) == 3
    assert not train & {p.prompt for p in tool_problems}
    tool_use = json.loads((out / "tool_use.json").read_text())
    assert tool_use["with_tools"]["n"] == tool_use["without_tools"]["n"] == 3
    held_out = read_jsonl(out / "data" / "eval.jsonl")
    assert held_out and not train & {p.prompt for p in held_out}
    trained_max = {e.family: e.difficulty[1] for e in Mixture.from_recipe("tasks-cpu-demo").entries}
    harder = [p for p in held_out if p.difficulty > trained_max[p.family]]
    assert len(harder) == state["stages"][0]["eval_harder"] > 0
    traces = {p.prompt for p in read_jsonl(out / "distill" / "data" / "traces.jsonl")}
    assert traces and not traces & {p.prompt for p in held_out}
    for name in ("pretrain", "grpo", "distill"):
        report = json.loads((out / "evals" / f"{name}.json").read_text())
        assert report["n"] == len(held_out) and report["samples"] == 2 and 0 <= report["pass@1"] <= 1
    assert [json.loads(r)["step"] for r in (out / "grpo" / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (out / "model" / "config.json").exists() and (out / "model" / "tokenizer.json").exists()
    assert "## Held-out accuracy" in (out / "report.md").read_text()
    printed = capsys.readouterr().out
    assert f"model:  {out / 'model'}" in printed and "nanoseek chat --model" in printed
    assert "Tool use of the exported model (3 held-out products" in printed


def test_an_equal_time_control_and_a_corpus_with_answers_only(recipe, tmp_path, capsys):
    stages = [*RECIPE["stages"][:2],
              {"name": "control", "stage": "sft", "init": "pretrain", "match": "grpo", "max_steps": 1000,
               "seq_len": 64, "batch_size": 2, "save_every": 1000},
              {**RECIPE["stages"][2], "init": "pretrain"},
              {"name": "student-grpo", "stage": "grpo", "init": "pretrain", "match": "distill", "max_steps": 1000,
               "group_size": 2, "prompts_per_step": 2, "max_new_tokens": 12, "save_every": 1000}]
    recipe.write_text(yaml.safe_dump({**RECIPE, "stages": stages, "worked_fraction": 0.5}))
    out = tmp_path / "run"
    assert main(["pipeline", "--recipe", str(recipe), "--out", str(out)]) == 0
    corpus = read_jsonl(out / "data" / "corpus.jsonl")
    answers_only = sum(p.solution == f"<think> </think> <answer>{p.answer}</answer>" for p in corpus)
    assert 0.4 < answers_only / len(corpus) < 0.6
    state = {s["name"]: s for s in json.loads((out / "pipeline.json").read_text())["stages"]}
    for control, matched in (("control", "grpo"), ("student-grpo", "distill")):
        rows = [json.loads(r) for r in (out / control / "metrics.jsonl").read_text().splitlines()]
        budget = state[matched]["compute_seconds"]
        # it stops at the first step that reaches the other stage's seconds
        assert sum(r["seconds"] for r in rows[:-1]) < budget <= sum(r["seconds"] for r in rows) + 0.1
        assert len(rows) < 1000
    trace_seconds = json.loads((out / "distill" / "data" / "traces.json").read_text())["seconds"]
    distill_steps = [json.loads(r)["seconds"] for r in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert state["distill"]["compute_seconds"] == pytest.approx(trace_seconds + sum(distill_steps), abs=0.1)
    printed = capsys.readouterr().out
    assert "  grpo - control (same time)" in printed and "  grpo - pretrain (from its start)" in printed
    assert "  distill - student-grpo (same time)" in printed and "of its teacher grpo's" in printed
    report = json.loads((out / "evals" / "control.json").read_text())
    assert len(report["per_problem"]) == report["n"] and 0 <= report["thinking_rate"] <= 1


def test_a_control_killed_mid_way_resumes_with_the_seconds_it_spent(recipe, tmp_path, monkeypatch):
    grpo = {**RECIPE["stages"][1], "max_steps": 8, "save_every": 8}
    control = {"name": "control", "stage": "sft", "init": "pretrain", "match": "grpo", "max_steps": 1000,
               "seq_len": 64, "batch_size": 2, "save_every": 2}
    recipe.write_text(yaml.safe_dump({**RECIPE, "stages": [RECIPE["stages"][0], grpo, control], "export": None}))
    original = Trainer.train_step

    def killed_in_the_control(self):  # a kill after the control's checkpoint at step 2, once
        if self.out.name == "control" and self.step == 4:
            monkeypatch.setattr(Trainer, "train_step", original)
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", killed_in_the_control)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        main(["pipeline", "--recipe", str(recipe), "--out", str(out)])
    assert main(["pipeline", "--recipe", str(recipe), "--out", str(out)]) == 0
    rows = [json.loads(r) for r in (out / "control" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))  # one row per step after the resume
    budget = {s["name"]: s for s in json.loads((out / "pipeline.json").read_text())["stages"]}["grpo"]
    assert sum(r["seconds"] for r in rows[:-1]) < budget["compute_seconds"] <= sum(r["seconds"] for r in rows) + 1e-3


def test_a_killed_pipeline_resumes_where_it_stopped(recipe, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    crash_after(monkeypatch, 2)  # the pretrain stage is killed after its checkpoint at step 2
    with pytest.raises(KeyboardInterrupt):
        main(["pipeline", "--recipe", str(recipe), "--out", str(out)])
    assert [s["name"] for s in json.loads((out / "pipeline.json").read_text())["stages"]] == ["data", "tokenizer"]
    corpus = (out / "data" / "corpus.jsonl").read_bytes()
    capsys.readouterr()
    assert main(["pipeline", "--recipe", str(recipe), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "[1/11] data: done earlier, skipped" in printed and "resumed from" in printed
    assert (out / "data" / "corpus.jsonl").read_bytes() == corpus
    steps = [json.loads(r)["step"] for r in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert main(["pipeline", "--recipe", str(recipe), "--out", str(out)]) == 0  # all done: only the report again
    assert capsys.readouterr().out.count("done earlier, skipped") == 10


def test_r1_stages_cold_start_sft_then_rejection_sampling_into_the_same_model(recipe, tmp_path):
    stages = [RECIPE["stages"][0],
              {"name": "cold-start", "stage": "sft", "init": "pretrain", "max_steps": 2, "seq_len": 64,
               "batch_size": 2, "save_every": 2},
              {"name": "rejection-sft", "stage": "distill", "teacher": "cold-start", "init": "cold-start",
               "tasks_n": 4, "group_size": 2, "max_steps": 2, "max_new_tokens": 12, "seq_len": 64, "batch_size": 2,
               "save_every": 2}]
    recipe.write_text(yaml.safe_dump({**RECIPE, "stages": stages, "export": None}))
    out = tmp_path / "run"
    assert main(["pipeline", "--recipe", str(recipe), "--out", str(out)]) == 0
    index = json.loads((out / "cold-start" / "data" / "shards" / "index.json").read_text())
    assert index["masked"]  # SFT: the loss counts the replies only
    pretrained = json.loads((out / "pretrain" / "model" / "config.json").read_text())
    student = json.loads((out / "rejection-sft" / "model" / "config.json").read_text())
    assert student == pretrained  # rejection sampling trained the model itself, not a fresh student
    assert json.loads((out / "evals" / "rejection-sft.json").read_text())["label"] == "rejection-sft"
    assert (out / "model" / "config.json").exists()  # the last stage is exported


def test_other_settings_in_the_same_directory_are_refused(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    Pipeline(PipelineConfig.load(recipe), out).record("data", 1.0)
    changed = recipe.with_name("changed.yaml")
    changed.write_text(yaml.safe_dump({**RECIPE, "tasks_n": 200}))
    assert main(["pipeline", "--recipe", str(changed), "--out", str(out)]) == 2
    assert "other settings (tasks_n)" in capsys.readouterr().err


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["stages"].append({"name": "x", "stage": "rl"}), "'stage' must be one of"),
    (lambda r: r["stages"].append({"name": "pretrain", "stage": "sft"}), "'pretrain' is taken"),
    (lambda r: r["stages"][0].update(learning_rate=1.0), "unknown key 'learning_rate'"),
    (lambda r: r.update(export="nothing"), "export: 'nothing' is not a stage"),
    (lambda r: r.pop("tasks"), "'tasks' is required"),
    (lambda r: r.update(eval_samples="four"), "'eval_samples' = 'four': expected int"),
    (lambda r: r.update(eval_samples=0), "'eval_samples' = 0: must be >= 1"),
    (lambda r: r.update(worked_fraction=1.5), "'worked_fraction' = 1.5: must be in [0, 1]"),
    (lambda r: r["stages"][1].update(match="later"), "match: 'later' is not an earlier stage"),
    (lambda r: r.update(tool_tasks="tasks-cpu-demo"), "tool_tasks: addition, subtraction, chain_sum"),
])
def test_recipe_mistakes_are_named_before_anything_runs(recipe, tmp_path, capsys, edit, message):
    bad = json.loads(json.dumps(RECIPE))
    edit(bad)
    recipe.write_text(yaml.safe_dump(bad))
    assert main(["pipeline", "--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["demo", "demo-gpu", "r1-zero", "r1", "distill-vs-rl"])
def test_shipped_pipeline_recipes_are_valid(name):
    cfg = PipelineConfig.load(resolve_recipe(name))
    assert cfg.stages and cfg.eval_n > 0


def test_a_stage_of_a_missing_model_is_a_clear_error(recipe, tmp_path):
    cfg = PipelineConfig.load(recipe)
    with pytest.raises(TrainError, match="init"):
        cfg.stage_config({"name": "g", "stage": "grpo"}, tmp_path, [])
