"""GRPO's effect over several seeds (and along the steps): held-out pass@1 before and after, mean and spread.

Takes a finished pipeline run (`nanoseek demo` writes one under runs/demo) and repeats its GRPO stage from the same
pretrained model with other seeds (the seed draws the prompts and the samples), each scored on the run's held-out
problems exactly as the pipeline scores its stages (same samples per problem, temperature, token limit):

    .venv/bin/python benchmarks/grpo_seeds.py runs/demo --seeds 3
    .venv/bin/python benchmarks/grpo_seeds.py runs/demo --seeds 3 --steps 300 --every 100   # the gain along steps

When the pipeline has an equal-time control of that stage (a stage with `match: grpo`), it is repeated too, with the
same seed and for as many seconds as that seed's GRPO steps took, so GRPO's gain over its control also comes with
a spread over seeds.

It prints pass@1 per seed and the gain's mean and standard deviation, overall and on the problems one level harder
than anything trained on, at every `--every` steps up to `--steps` (default: the stage's own), and writes
RUN_DIR/evals/grpo-seeds.json (with other `--steps`: grpo-seeds-STEPS.json; the report shows both). Seed runs live
in RUN_DIR/grpo-seeds/seed-N (grpo-seeds/steps-STEPS/seed-N) and are reused when present, so an interrupted
measurement continues.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

from nanoseek.data import read_jsonl
from nanoseek.pipeline import PipelineConfig, score
from nanoseek.rundir import PIPELINE_STATE, write_json
from nanoseek.train import grpo
from nanoseek.train import run as run_stage

KEYS = ("pass@1", "pass@1_trained", "pass@1_harder")


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_control(cfg: PipelineConfig, entry: dict, run_dir: Path, names: list[str], seed: int, grpo_out: Path,
                problems: list) -> dict:
    """The pipeline's control stage with `seed`, for the seconds the GRPO run in grpo_out took; its scores."""
    seconds = sum(json.loads(line)["seconds"] for line in (grpo_out / "metrics.jsonl").read_text().splitlines())
    out = grpo_out.with_name(f"{grpo_out.name}-{entry['name']}")
    train = replace(cfg.stage_config(entry, run_dir, names[:names.index(entry["name"])]), seed=seed, out=str(out),
                    max_seconds=seconds, resume=(out / "checkpoints").is_dir())
    if not (out / "model" / "config.json").exists():
        run_stage(train)
    after = score(cfg, out / "model", problems)
    return {k: after[k] for k in KEYS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a finished pipeline run (with pipeline.json, pretrain/, data/)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--stage", default="grpo", help="the GRPO stage of the pipeline to repeat")
    ap.add_argument("--steps", type=int, help="GRPO steps per seed (default: the stage's max_steps)")
    ap.add_argument("--every", type=int, help="also score the checkpoints every this many steps")
    args = ap.parse_args()
    state_path = args.run_dir / PIPELINE_STATE
    if not state_path.exists():
        sys.exit(f"error: {state_path}: not a pipeline run (run `nanoseek demo` first)")
    cfg = PipelineConfig(**json.loads(state_path.read_text())["settings"])
    names = [e["name"] for e in cfg.stages]
    if args.stage not in names or cfg.stages[names.index(args.stage)]["stage"] != "grpo":
        sys.exit(f"error: --stage {args.stage!r} is not a GRPO stage of {state_path} ({', '.join(names)})")
    entry = cfg.stages[names.index(args.stage)]
    stage_steps = cfg.stage_config(entry, args.run_dir, names[:names.index(args.stage)]).max_steps
    steps = args.steps or stage_steps
    if steps < 1 or (args.every is not None and not 1 <= args.every <= steps):
        sys.exit(f"error: --steps {steps} / --every {args.every}: need 1 <= every <= steps")
    marks = sorted({*range(args.every, steps + 1, args.every), steps} if args.every else {steps})
    own = steps == stage_steps
    runs = args.run_dir / "grpo-seeds" if own else args.run_dir / "grpo-seeds" / f"steps-{steps}"
    problems = read_jsonl(args.run_dir / "data" / "eval.jsonl")
    torch.manual_seed(0)
    base_eval = args.run_dir / "evals" / f"{entry['init']}.json"  # the pipeline's own score of the start model
    start = args.run_dir / entry["init"] / "model" if entry["init"] in names else Path(entry["init"])
    before = json.loads(base_eval.read_text()) if base_eval.exists() else score(cfg, start, problems)
    print(f"{entry['init']}: " + ", ".join(f"{k} {before[k]:.1%}" for k in KEYS))
    rows: dict[int, list[dict]] = {m: [] for m in marks}  # steps -> one score per seed
    control = next((e for e in cfg.stages if e.get("match") == args.stage), None)
    controls: list[dict] = []  # one score per seed
    for seed in range(args.seeds):
        train = cfg.stage_config(entry, args.run_dir, names[:names.index(args.stage)])
        out = runs / f"seed-{seed}"
        train = replace(train, seed=seed, out=str(out), resume=(out / "checkpoints").is_dir(), max_steps=steps,
                        save_every=args.every or train.save_every, keep_last=max(train.keep_last, len(marks)))
        if not (out / "model" / "config.json").exists():
            grpo.run(train)
        for m in marks:
            model = out / "model" if m == steps else out / "checkpoints" / f"step_{m:06d}" / "model"
            after = score(cfg, model, problems)
            rows[m].append({k: after[k] for k in KEYS})
            print(f"seed {seed}, {m} steps: " + ", ".join(f"{k} {after[k]:.1%} ({after[k] - before[k]:+.1%})"
                                                        for k in KEYS))
        if control is not None:
            controls.append(run_control(cfg, control, args.run_dir, names, seed, out, problems))
            print(f"seed {seed}, {control['name']}: " + ", ".join(
                f"{k} {controls[-1][k]:.1%} ({controls[-1][k] - before[k]:+.1%})" for k in KEYS))

    print(f"\nGRPO gain over {args.seeds} seeds (mean ± std):")
    curve = {}
    for m in marks:
        gains = {k: spread([r[k] - before[k] for r in rows[m]]) for k in KEYS}
        curve[m] = gains
        print(f"  {m:>5} steps: " + ", ".join(f"{k} {g:+.1%} ± {sd:.1%}" for k, (g, sd) in gains.items()))
    trained = [r["pass@1_trained"] - before["pass@1_trained"] for r in rows[steps]]
    met = statistics.mean(trained) >= 0.15 and min(trained) >= 0.10
    print(f"goal, trained levels: mean gain >= +15 points and every seed >= +10: {'met' if met else 'not met'} "
          f"(mean {statistics.mean(trained):+.1%}, lowest seed {min(trained):+.1%})")
    if controls:
        over = [r["pass@1_trained"] - c["pass@1_trained"] for r, c in zip(rows[steps], controls)]
        print(f"GRPO over {control['name']} (same seconds, same seed), trained levels: "
              f"{statistics.mean(over):+.1%} ± {spread(over)[1]:.1%}; goal >= +10 points: "
              f"{'met' if statistics.mean(over) >= 0.10 else 'not met'}")
    after = [r["pass@1"] for r in rows[steps]]
    label = "grpo-seeds" if own else f"grpo-seeds-{steps}"
    write_json(args.run_dir / "evals" / f"{label}.json", {
        "label": label, "model": str(runs), "problems": "data/eval.jsonl (held-out)", "steps": steps,
        "pass@1": statistics.mean(after), "seeds": after, "pass@1_mean": statistics.mean(after),
        "pass@1_std": spread(after)[1], "before": {"label": entry["init"], **{k: before[k] for k in KEYS}},
        "after": rows[steps], "control": controls,
        "gain": {k: {"mean": m, "std": sd} for k, (m, sd) in curve[steps].items()},
        "by_steps": {str(m): {"after": rows[m], "gain": {k: {"mean": g, "std": sd} for k, (g, sd) in c.items()}}
                     for m, c in curve.items()},
        "samples": cfg.eval_samples, "sampling": {"temperature": cfg.eval_temperature, "top_p": cfg.eval_top_p}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
