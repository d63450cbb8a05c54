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
from nanoseek.evaluate import evaluate
from nanoseek.model import Transformer
from nanoseek.pipeline import STATE, PipelineConfig, level_scores, write_json
from nanoseek.sampling import SamplingParams
from nanoseek.tasks import Mixture
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import grpo


def score(cfg: PipelineConfig, model_dir: Path, problems, mixture: Mixture) -> dict:
    """pass@1 as the pipeline measures it, overall and on the harder-than-trained problems."""
    model, tok = Transformer.from_pretrained(model_dir).eval(), Tokenizer.load(model_dir)
    params = SamplingParams(max_new_tokens=cfg.eval_max_new_tokens, temperature=cfg.eval_temperature)
    report = evaluate(model, tok, problems, cfg.eval_samples, params, seed=cfg.seed, progress=False)
    return {"pass@1": report["pass@1"], "harder": level_scores(report, mixture)["pass@1_harder"]}


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
    base = args.run_dir / entry["init"] / "model"
    problems = read_jsonl(args.run_dir / "data" / "eval.jsonl")
    mixture = Mixture.from_recipe(cfg.tasks)
    torch.manual_seed(0)

    before = score(cfg, base, problems, mixture)
    print(f"{base}: pass@1 {before['pass@1']:.1%} (harder {before['harder']:.1%})")
    rows = []
    for seed in range(args.seeds):
        train = cfg.stage_config(entry, args.run_dir, names[:names.index(args.stage)])
        out = args.run_dir / "grpo-seeds" / f"seed-{seed}"
        train = replace(train, seed=seed, out=str(out), resume=(out / "checkpoints").is_dir())
        if not (out / "model" / "config.json").exists():
            grpo.run(train)
        after = score(cfg, out / "model", problems, mixture)
        rows.append(after)
        print(f"seed {seed}: pass@1 {after['pass@1']:.1%} ({after['pass@1'] - before['pass@1']:+.1%}), harder "
              f"{after['harder']:.1%} ({after['harder'] - before['harder']:+.1%})")

    def spread(key: str) -> tuple[float, float]:
        gains = [r[key] - before[key] for r in rows]
        return statistics.mean(gains), statistics.stdev(gains) if len(gains) > 1 else 0.0
    gain, gain_std = spread("pass@1")
    hard, hard_std = spread("harder")
    print(f"\nGRPO gain over {len(rows)} seeds: pass@1 {gain:+.1%} ± {gain_std:.1%} (from {before['pass@1']:.1%}); "
          f"one level harder {hard:+.1%} ± {hard_std:.1%}; goal +20 points: {'met' if gain >= 0.2 else 'not met'}")
    after = [r["pass@1"] for r in rows]
    write_json(args.run_dir / "evals" / "grpo-seeds.json", {
        "label": "grpo-seeds", "model": str(args.run_dir / "grpo-seeds"), "problems": "data/eval.jsonl (held-out)",
        "pass@1": statistics.mean(after), "seeds": after, "pass@1_mean": statistics.mean(after),
        "pass@1_std": statistics.stdev(after) if len(after) > 1 else 0.0, "before": before, "after": rows,
        "gain_mean": gain, "gain_std": gain_std, "harder_gain_mean": hard, "harder_gain_std": hard_std,
        "samples": cfg.eval_samples, "sampling": {"temperature": cfg.eval_temperature}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
