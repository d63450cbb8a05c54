"""GRPO's effect over several seeds: held-out pass@1 before and after, mean and spread.

Takes a finished pipeline run (`nanoseek demo` writes one under runs/demo) and repeats its GRPO stage from the same
pretrained model with other seeds (the seed draws the prompts and the samples), each scored on the run's held-out
problems exactly as the pipeline scores its stages (same samples per problem, temperature, token limit):

    .venv/bin/python benchmarks/grpo_seeds.py runs/demo --seeds 3

It prints pass@1 per seed and the gain's mean and standard deviation, overall and on the problems one level harder
than anything trained on, and writes RUN_DIR/evals/grpo-seeds.json (the report shows it). Seed runs live in
RUN_DIR/grpo-seeds/seed-N and are reused when present, so an interrupted measurement continues.
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
from nanoseek.pipeline import STATE, PipelineConfig, score, write_json
from nanoseek.train import grpo

KEYS = ("pass@1", "pass@1_trained", "pass@1_harder")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a finished pipeline run (with pipeline.json, pretrain/, data/)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--stage", default="grpo", help="the GRPO stage of the pipeline to repeat")
    args = ap.parse_args()
    state_path = args.run_dir / STATE
    if not state_path.exists():
        sys.exit(f"error: {state_path}: not a pipeline run (run `nanoseek demo` first)")
    cfg = PipelineConfig(**json.loads(state_path.read_text())["settings"])
    names = [e["name"] for e in cfg.stages]
    if args.stage not in names or cfg.stages[names.index(args.stage)]["stage"] != "grpo":
        sys.exit(f"error: --stage {args.stage!r} is not a GRPO stage of {state_path} ({', '.join(names)})")
    entry = cfg.stages[names.index(args.stage)]
    problems = read_jsonl(args.run_dir / "data" / "eval.jsonl")
    torch.manual_seed(0)
    base_eval = args.run_dir / "evals" / f"{entry['init']}.json"  # the pipeline's own score of the start model
    start = args.run_dir / entry["init"] / "model" if entry["init"] in names else Path(entry["init"])
    before = json.loads(base_eval.read_text()) if base_eval.exists() else score(cfg, start, problems)
    print(f"{entry['init']}: " + ", ".join(f"{k} {before[k]:.1%}" for k in KEYS))
    rows = []
    for seed in range(args.seeds):
        train = cfg.stage_config(entry, args.run_dir, names[:names.index(args.stage)])
        out = args.run_dir / "grpo-seeds" / f"seed-{seed}"
        train = replace(train, seed=seed, out=str(out), resume=(out / "checkpoints").is_dir())
        if not (out / "model" / "config.json").exists():
            grpo.run(train)
        after = score(cfg, out / "model", problems)
        rows.append({k: after[k] for k in KEYS})
        print(f"seed {seed}: " + ", ".join(f"{k} {after[k]:.1%} ({after[k] - before[k]:+.1%})" for k in KEYS))

    gains = {}
    for k in KEYS:
        diffs = [r[k] - before[k] for r in rows]
        gains[k] = (statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0)
    print(f"\nGRPO gain over {len(rows)} seeds (mean ± std): " + ", ".join(
        f"{k} {m:+.1%} ± {sd:.1%}" for k, (m, sd) in gains.items())
        + f"; goal +20 points pass@1: {'met' if gains['pass@1'][0] >= 0.2 else 'not met'}")
    after = [r["pass@1"] for r in rows]
    write_json(args.run_dir / "evals" / "grpo-seeds.json", {
        "label": "grpo-seeds", "model": str(args.run_dir / "grpo-seeds"), "problems": "data/eval.jsonl (held-out)",
        "pass@1": statistics.mean(after), "seeds": after, "pass@1_mean": statistics.mean(after),
        "pass@1_std": statistics.stdev(after) if len(after) > 1 else 0.0,
        "before": {"label": entry["init"], **{k: before[k] for k in KEYS}},
        "after": rows, "gain": {k: {"mean": m, "std": sd} for k, (m, sd) in gains.items()},
        "samples": cfg.eval_samples, "sampling": {"temperature": cfg.eval_temperature, "top_p": cfg.eval_top_p}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
