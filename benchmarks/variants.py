"""Shared by the training benchmarks: the cpu-demo recipe run once per variant on identical data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nanoseek.train.lm import run
from nanoseek.train.recipe import load_config


def shared_data(run_dir: Path) -> dict:
    """Settings that train on the corpus and tokenizer a run built."""
    return dict(tasks=None, data=[str(run_dir / "data" / "corpus.jsonl")], tokenizer=str(run_dir / "tokenizer"))


def train_variants(variants: dict[str, dict], out: Path, resume: bool = False, data_from: Path | None = None,
                   **settings) -> dict[str, tuple[Path, list[dict]]]:
    """Each variant's settings on top of `settings`; the first run builds the corpus and tokenizer (unless
    `data_from`, a run directory, gives them), the others read them. Returns each variant's run directory and
    metrics rows. `resume`: keep what `out` holds and continue each run from its last checkpoint (a finished run
    is read as it is); else start afresh."""
    if not resume:
        shutil.rmtree(out, ignore_errors=True)
    results, shared = {}, shared_data(data_from) if data_from else {}
    for i, (name, change) in enumerate(variants.items()):
        run_dir = out / f"variant{i}"
        run(load_config("cpu-demo", {**settings, "eval_n": 0, "out": str(run_dir), "resume": resume, **shared,
                                     **change}))
        shared = shared or shared_data(run_dir)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        results[name] = (run_dir, rows)
    return results
