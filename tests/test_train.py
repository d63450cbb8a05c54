"""The shared training loop on the tiny preset: learning, bit-exact resume (also after SIGKILL mid-save), balancing,
NaN handling, recipes and bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from nanoseek.cli import main
from nanoseek.errors import TrainError
from nanoseek.tasks import Mixture
from nanoseek.train.lm import masked_ce, run
from nanoseek.train.trainer import learning_rate
from nanoseek.train.recipe import load_config, parse_overrides

from .conftest import crash_after, settings

ROOT = Path(__file__).resolve().parents[1]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_everything_is_logged(corpus, tmp_path):
    summary = run(settings(corpus, tmp_path, max_steps=40, save_every=20, eval_n=4))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    first, last = rows[0]["lm_loss"], sum(r["lm_loss"] for r in rows[-5:]) / 5
    assert last < first - 1.0, (first, last)
    assert {"loss", "lm_loss", "mtp_loss", "balance", "lr", "grad_norm", "maxvio", "tokens_per_s", "mfu"} <= set(rows[0])
    assert len(rows[0]["maxvio"]) == 2  # the tiny preset's MoE layer and its MTP layer
    assert (tmp_path / "model" / "tokenizer.json").exists() and (tmp_path / "model" / "config.json").exists()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000020", "step_000040"]
    assert 0 <= summary["held_out"]["accuracy"] <= 1 and summary["held_out"]["n"] == 4


def test_bf16_precision_autocasts_the_forward_on_cpu(corpus, tmp_path):
    """`precision: bf16` trains under BF16 autocast (fp32 master weights) where the CPU default is fp32."""
    run(settings(corpus, tmp_path / "fp32", max_steps=3))
    run(settings(corpus, tmp_path / "bf16", max_steps=3, precision="bf16"))
    fp32, bf16 = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert fp32 != bf16 and all(abs(a / b - 1) < 0.02 for a, b in zip(fp32, bf16)), (fp32, bf16)


def test_resume_is_bit_exact(corpus, tmp_path, monkeypatch):
    run(settings(corpus, tmp_path / "straight"))
    crash_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        run(settings(corpus, tmp_path / "resumed"))
    assert len(losses(tmp_path / "resumed")) == 6
    run(settings(corpus, tmp_path / "resumed", resume=True))  # back to the step-4 checkpoint, then on to 8
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_killed_before_its_first_checkpoint_logs_each_step_once(corpus, tmp_path, monkeypatch):
    """A resume with no checkpoint to go back to starts over, and its metrics.jsonl starts over with it."""
    run(settings(corpus, tmp_path / "straight"))
    crash_after(monkeypatch, 3)  # the first checkpoint comes at step 4
    with pytest.raises(KeyboardInterrupt):
        run(settings(corpus, tmp_path / "resumed"))
    with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # and a row cut short by the kill
    run(settings(corpus, tmp_path / "resumed", resume=True))
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_a_time_budget_stops_training_and_survives_a_resume(corpus, tmp_path, monkeypatch):
    first = run(settings(corpus, tmp_path / "timed", max_steps=1000, max_seconds=1e-9))
    assert first["steps"] == 1  # the first step already spends the budget
    rows = [json.loads(line) for line in (tmp_path / "timed" / "metrics.jsonl").read_text().splitlines()]
    assert first["seconds"] == pytest.approx(rows[0]["seconds"])
    crash_after(monkeypatch, 6)
    with pytest.raises(KeyboardInterrupt):
        run(settings(corpus, tmp_path / "budget", max_steps=1000, max_seconds=1e6))
    spent = sum(json.loads(line)["seconds"] for line in
                (tmp_path / "budget" / "metrics.jsonl").read_text().splitlines()[:4])  # the step-4 checkpoint
    budget = spent + 1e-9  # one step more than the checkpoint's four
    summary = run(settings(corpus, tmp_path / "budget", max_steps=1000, max_seconds=budget, resume=True))
    assert summary["steps"] == 5 and len(losses(tmp_path / "budget")) == 5
    with pytest.raises(TrainError, match="max_seconds"):
        load_config(None, {"data": [str(corpus)], "max_seconds": -1})


KILL_MID_SAVE = """
import os, signal, sys
real_replace = os.replace
def replace(src, dst):
    if str(src).endswith("step_000008.tmp"):  # the checkpoint is written but not yet in place
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
os.replace = replace
from nanoseek.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_save_then_resume(corpus, tmp_path):
    common = ["--preset", "tiny", "--data", str(corpus), "--vocab-size", "400", "--seq-len", "64", "--batch-size",
              "4", "--max-steps", "10", "--warmup-steps", "2", "--save-every", "4", "--eval-n", "0"]
    assert main(["pretrain", "--out", str(tmp_path / "straight"), *common]) == 0
    killed = subprocess.run([sys.executable, "-c", KILL_MID_SAVE, "pretrain", "--out", str(tmp_path / "killed"),
                             *common], capture_output=True, text=True)
    assert killed.returncode == -9
    ckpts = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert ckpts == ["step_000004", "step_000008.tmp"]
    assert main(["pretrain", "--out", str(tmp_path / "killed"), *common, "--resume", "true"]) == 0
    assert losses(tmp_path / "killed") == losses(tmp_path / "straight")
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir()) == ["step_000008", "step_000010"]


def test_bias_balancing_lowers_maxvio(corpus, tmp_path):
    def late_maxvio(gamma):
        out = tmp_path / f"gamma{gamma}"
        run(settings(corpus, out, max_steps=30, save_every=30, bias_gamma=gamma, bias_gamma_stop=1.0,
                     balance_alpha=0.0, mtp_lambda=0.0, mtp_lambda_final=0.0))
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return sum(r["maxvio_mean"] for r in rows[-10:]) / 10
    balanced, free = late_maxvio(0.01), late_maxvio(0.0)
    assert balanced < 0.7 * free, (balanced, free)


def test_non_finite_loss_stops_without_touching_checkpoints(corpus, tmp_path, monkeypatch):
    import nanoseek.train.lm as lm
    real = lm.lm_loss

    def poisoned(cfg):
        inner = real(cfg)

        def loss_fn(model, batch, step):
            loss, metrics, loads, n = inner(model, batch, step)
            return (loss * float("nan") if step == 5 else loss), metrics, loads, n
        return loss_fn

    monkeypatch.setattr(lm, "lm_loss", poisoned)
    with pytest.raises(TrainError, match="non-finite loss .* at step 5.*step_000004"):
        run(settings(corpus, tmp_path))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000004"]


def test_sft_counts_only_the_reply(corpus, tmp_path):
    logits, targets = torch.randn(1, 6, 10), torch.randint(0, 10, (1, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0.0]])
    changed = logits.clone()
    changed[0, [0, 1, 5]] += 5.0
    assert masked_ce(logits, targets, mask) == masked_ce(changed, targets, mask)
    run(settings(corpus, tmp_path / "base", max_steps=4))
    summary = run(settings(corpus, tmp_path / "sft", stage="sft", init=str(tmp_path / "base" / "model"), max_steps=4,
                           lr=1e-3))
    assert summary["steps"] == 4
    index = json.loads((tmp_path / "sft" / "data" / "shards" / "index.json").read_text())
    assert index["masked"]


def test_schedules():
    cfg = load_config(None, {}, data=["x"], max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert learning_rate(cfg, 0) == pytest.approx(0.1) and learning_rate(cfg, 9) == pytest.approx(1.0)
    assert learning_rate(cfg, 99) == pytest.approx(0.1, abs=1e-3)
    wsd = load_config(None, {}, data=["x"], max_steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1,
                      schedule="wsd", decay_fraction=0.2)
    assert learning_rate(wsd, 79) == 1.0 and learning_rate(wsd, 90) == pytest.approx(0.55)


@pytest.mark.parametrize("args, message", [
    (["--lrr", "1"], "unknown key 'lrr'"),
    (["--max-steps", "many"], "'max_steps' = 'many': expected int"),
    (["--schedule", "linear"], "'schedule' = 'linear'"),
    (["--precision", "fp16"], "'precision' = 'fp16': must be auto, bf16 or fp32"),
    (["--fp8-gemm", "fast"], "'fp8_gemm' = 'fast': must be auto, emulated or scaled_mm"),
    (["--data", "/no/such/file.jsonl"], "/no/such/file.jsonl"),
    (["--out", "/proc/nanoseek-cannot-write"], "cannot write"),
    (["--max-steps"], "expected --key value"),
])
def test_bad_settings_fail_before_training(args, message, capsys):
    assert main(["pretrain", "--recipe", "cpu-demo", *args]) == 2
    assert message in capsys.readouterr().err


def test_settings_sections_flat_nested_and_dotted(tmp_path):
    """Each stage's settings live in its section; a flat key goes to the section of the stage that has it (old
    recipes), a nested mapping or a dotted flag names the section itself."""
    flags = parse_overrides(["--grpo.epsilon-high", "0.28", "--temperature", "0.7"])
    grpo = load_config(None, flags, stage="grpo", init="m", tasks="t", group_size=4)
    assert (grpo.grpo.group_size, grpo.grpo.epsilon_high, grpo.grpo.temperature) == (4, 0.28, 0.7)
    assert grpo.distill.samples == 8  # untouched: group_size is GRPO's here
    recipe = tmp_path / "student.yaml"
    recipe.write_text("stage: distill\nteacher: t\ntasks: x\ngroup_size: 4\ntemperature: 0.6\n"
                      "moe: {mtp_lambda: 0.0}\n")
    student = load_config(str(recipe), {})
    assert (student.distill.samples, student.distill.temperature, student.distill.teacher) == (4, 0.6, "t")
    assert student.grpo.group_size == 8 and student.moe.mtp_lambda == 0.0
    with pytest.raises(TrainError, match=r"'grpo.group_size' = 1: must be >= 2"):
        load_config(None, {"group_size": "1"}, stage="grpo", init="m", tasks="t")
    with pytest.raises(TrainError, match=r"'distill.teacher' = None: must be set for distillation"):
        load_config(None, {}, stage="distill", tasks="t")
    with pytest.raises(TrainError, match=r"unknown key 'grpo.beat'"):
        load_config(None, {"grpo.beat": "0.1"}, data=["x"])
    assert load_config(None, {"group_size": "1"}, data=["x"]).grpo.group_size == 1  # not validated outside GRPO


def test_numbers_in_every_spelling():
    cfg = load_config(None, {"lr": "6e-3", "max_steps": "12", "fp8": "true", "data": "a.jsonl"})
    assert (cfg.lr, cfg.max_steps, cfg.fp8, cfg.data) == (6e-3, 12, True, ["a.jsonl"])


def test_recipe_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2]\n")
    assert main(["pretrain", "--recipe", str(bad)]) == 2
    assert "'lr' = [1, 2]: expected float" in capsys.readouterr().err
    assert main(["pretrain", "--recipe", "no-such-recipe"]) == 2


def test_incompatible_checkpoint_and_existing_run(corpus, tmp_path):
    run(settings(corpus, tmp_path, max_steps=4))
    with pytest.raises(TrainError, match="already holds checkpoints"):
        run(settings(corpus, tmp_path, max_steps=4))
    with pytest.raises(TrainError, match="config differs"):
        run(settings(corpus, tmp_path, max_steps=8, resume=True, model_overrides={"hidden_size": 32}))


def test_shipped_recipes_are_valid():
    for recipe in sorted((ROOT / "nanoseek" / "recipes").glob("*.yaml")):
        if recipe.name.startswith("tasks-"):
            Mixture.from_recipe(recipe)
        elif "stages" not in yaml.safe_load(recipe.read_text()):  # pipelines: tests/test_pipeline.py
            assert load_config(str(recipe), {}).max_steps > 0
    assert os.path.exists(ROOT / "nanoseek" / "recipes" / "cpu-demo.yaml")
