import json
import re
from pathlib import Path

import pytest

from nanoseek import ModelConfig
from nanoseek.cli import main
from nanoseek.cost import format_run_cost, run_cost
from nanoseek.errors import DataError
from nanoseek.report import write_report

PNG = b"\x89PNG\r\n\x1a\n"


def pretrain_rows(n: int = 20) -> list[dict]:
    """Rows as the training loop writes them; the last has loss 2.345678 and MaxVio worst in its second layer."""
    rows = []
    for i in range(1, n + 1):
        lm = 7.0 - 0.2 * i
        rows.append({"step": i, "lm_loss": lm, "mtp_loss": lm + 0.1, "mtp_lambda": 0.3, "balance": 4.0,
                     "loss": lm + 0.3 * (lm + 0.1), "lr": 1e-3, "grad_norm": 1.0, "bias_gamma": 0.01,
                     "maxvio": [1.0 / i, 2.0 / i], "maxvio_mean": 1.5 / i, "tokens": 1000, "seconds": 0.5,
                     "tokens_per_s": 2000.0, "mfu": 0.25, "flops_per_token": 1e6, "peak_flops": 8e9})
    rows[-1]["loss"] = 2.345678
    return rows


def grpo_rows(n: int = 10) -> list[dict]:
    return [{"step": i, "reward": 0.1 * i, "accuracy": 0.05 * i, "format_rate": 0.9, "response_length": 30.0 + i,
             "truncated": 0.0, "groups_kept": 1.0, "kl": 0.001 * i, "clip_fraction": 0.01, "entropy": 1.5,
             "loss": 0.01, "lr": 1e-4, "grad_norm": 0.5, "bias_gamma": 0.0, "maxvio": [0.2, 0.3],
             "maxvio_mean": 0.25, "tokens": 500, "seconds": 2.0, "tokens_per_s": 250.0, "mfu": 0.03125,
             "flops_per_token": 1e6, "peak_flops": 8e9} for i in range(1, n + 1)]


def eval_report(pass1: float, label: str, **extra) -> dict:
    """The structure evaluate.evaluate() returns, plus the demo's label, model and problems."""
    task = {"n": 4, "accuracy": pass1, "pass@1": pass1, "maj@1": pass1, "format_rate": 0.75, "answer_rate": 1.0,
            "mean_tokens": 30.0}
    return {"label": label, "model": f"runs/demo/{label}/model", "problems": "held-out: 8 problems",
            "n": 8, "accuracy": pass1, "pass@1": pass1, "maj@1": pass1, "format_rate": 0.75, "answer_rate": 1.0,
            "mean_tokens": 30.0, "samples": 1, "seed": 0, "sampling": {"temperature": 0.0, "max_new_tokens": 64},
            "by_family": {"addition": dict(task), "sorting": dict(task)},
            "by_task": {"addition/1": dict(task), "sorting/2": dict(task)},
            "examples": [{"prompt": "What is 12+30?", "completion": "<think> 2+0=2 </think> <answer>42</answer>",
                          "answer": "42"}], **extra}


def write_stage(d: Path, rows: list[dict], truncated: bool = False) -> None:
    (d / "model").mkdir(parents=True)
    ModelConfig.from_preset("tiny").save(d / "model" / "config.json")
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (d / "metrics.jsonl").write_text(text + ('{"step": 21, "lm_lo' if truncated else ""))


@pytest.fixture
def run(tmp_path) -> Path:
    write_stage(tmp_path / "pretrain", pretrain_rows())
    write_stage(tmp_path / "grpo", grpo_rows())
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "pretrain.json").write_text(json.dumps(eval_report(0.125, "pretrain")))
    grpo = eval_report(0.375, "grpo", seeds=[0.35, 0.375, 0.4], acceptance_rate=0.875)
    grpo.update({"pass@1_mean": 0.375, "pass@1_std": 0.025})
    (tmp_path / "evals" / "grpo.json").write_text(json.dumps(grpo))
    stages = [{"name": "pretrain", "dir": "pretrain", "seconds": 201.3},
              {"name": "grpo", "dir": "grpo", "seconds": 95.0}]
    (tmp_path / "pipeline.json").write_text(json.dumps({"stages": stages}))
    return tmp_path


def test_report_holds_the_runs_numbers_and_plots(run):
    path = write_report(run)
    assert path == run / "report.md"
    md = path.read_text()
    assert "| `pretrain` | 20 | 20.00K | 10.0 s | 3.4 min | loss 2.3457 | 2.00K | 25.0% |" in md
    assert "| `grpo` | 10 | 5.00K | 20.0 s | 95.0 s | reward 1.0000 |" in md
    assert "12.5%" in md and "37.5% ± 2.5% (3 seeds)" in md  # held-out pass@1, mean ± std over the seeds
    assert "pass@1 12.5% → 37.5% (+25.0 points)" in md
    assert "| addition/1 | 4 | 12.5% | 37.5% |" in md  # per task, one column per evaluation
    assert "| `pretrain` | 2 | 1.500 | 0.075 |" in md and "MTP 1 (0.100)" in md  # tiny: layer 1 + MTP; 2 / 20
    assert "| `grpo` | reward | 0.1000 | 1.0000 |" in md
    assert "87.5%" in md  # MTP acceptance
    assert format_run_cost(run_cost(run, mfu=0.4)).strip() in md  # cost.py's table, from the same files
    assert "<answer>42</answer>" in md
    links = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", md)
    assert {Path(link).stem for link in links} == {"heldout", "loss", "maxvio", "grpo", "throughput"}
    for link in links:
        data = (run / link).read_bytes()
        assert data.startswith(PNG) and len(data) < 200_000
    assert "left out" not in md
    assert not list(run.glob(".report.md*"))  # written under a temporary name, then renamed


def test_each_stage_is_compared_with_the_model_it_started_from(run):
    (run / "evals" / "distill.json").write_text(json.dumps(eval_report(0.25, "distill")))
    (run / "evals" / "seeds.json").write_text(json.dumps({
        "label": "seeds", "pass@1": 0.5, "seeds": [0.5, 0.5], "pass@1_mean": 0.5, "pass@1_std": 0.0,
        "before": {"label": "pretrain", "pass@1": 0.125}}))
    stages = [{"name": "pretrain", "stage": "pretrain"}, {"name": "grpo", "stage": "grpo", "init": "pretrain"},
              {"name": "distill", "stage": "distill", "teacher": "grpo"}]
    state = json.loads((run / "pipeline.json").read_text())
    (run / "pipeline.json").write_text(json.dumps({**state, "settings": {"stages": stages}}))
    md = write_report(run).read_text()
    assert "`pretrain` → `grpo`: pass@1 12.5% → 37.5% (+25.0 points)" in md
    assert "`grpo` → `distill` (teacher → student): pass@1 37.5% → 25.0% (-12.5 points)" in md
    assert "`pretrain` → `seeds` (mean over seeds): pass@1 12.5% → 50.0% (+37.5 points)" in md
    assert "`distill` → `seeds`" not in md


def test_a_seed_study_along_the_steps_gets_a_table_and_a_plot(run):
    def gain(mean, std):
        return {k: {"mean": mean, "std": std} for k in ("pass@1", "pass@1_trained", "pass@1_harder")}

    (run / "evals" / "curve.json").write_text(json.dumps({
        "label": "curve", "pass@1": 0.2, "seeds": [0.19, 0.21], "pass@1_mean": 0.2, "pass@1_std": 0.014,
        "before": {"label": "pretrain", "pass@1": 0.125},
        "by_steps": {"100": {"gain": gain(0.01, 0.02)}, "200": {"gain": gain(0.075, 0.014)}}}))
    md = write_report(run).read_text()
    assert "| `curve` | 2 | 100 | +1.0 ± 2.0 |" in md and "| `curve` | 2 | 200 | +7.5 ± 1.4 |" in md
    assert "(plots/gain_by_steps.png)" in md and (run / "plots" / "gain_by_steps.png").read_bytes().startswith(PNG)


def test_partial_run_says_what_is_missing(tmp_path):
    write_stage(tmp_path / "pretrain", pretrain_rows(5), truncated=True)  # killed mid-write, no evals
    (tmp_path / "pipeline.json").write_text(json.dumps({"stages": [{"name": "pretrain", "dir": "pretrain"}, {"name": "grpo", "dir": "grpo"}]}))
    md = write_report(tmp_path).read_text()
    assert "stage `grpo` is listed in pipeline.json but" in md
    assert "loss 6.0000" not in md and "| `pretrain` | 5 |" in md
    assert "Held-out accuracy: left out, no evaluation reports" in md
    assert "GRPO: left out" in md and "MTP acceptance: left out" in md and "Example completions: left out" in md
    assert "1 malformed line(s) skipped" in md
    assert (tmp_path / "plots" / "loss.png").exists() and not (tmp_path / "plots" / "grpo.png").exists()


def test_single_stage_directory(tmp_path):
    rows = pretrain_rows(3)
    for r in rows:  # a run from before the loop logged FLOPs: the report goes on without the cost table
        del r["flops_per_token"], r["peak_flops"]
    write_stage(tmp_path, rows)
    (tmp_path / "eval.json").write_text(json.dumps(eval_report(0.0625, "x")))
    md = write_report(tmp_path).read_text()
    assert "6.2%" in md and "FLOPs and rented-GPU cost: left out" in md


def test_cli(run, tmp_path, capsys):
    assert main(["report", str(run), "--mfu", "0.5"]) == 0
    assert str(run / "report.md") in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    for bad in (empty, tmp_path / "nowhere"):
        assert main(["report", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and str(bad) in err and "Traceback" not in err
    with pytest.raises(DataError, match="no metrics.jsonl"):
        write_report(empty)
