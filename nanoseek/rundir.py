"""A run directory: its layout, the order of its stages, its metrics and how anything in it is written.

    RUN/pipeline.json            a pipeline's settings and finished steps (pipeline.py; a single stage has none)
    RUN/data/, RUN/tokenizer/    the corpus, held-out problems and tokenizer the stages share
    RUN/STAGE/metrics.jsonl      one row per optimiser step of a training stage (`MetricsLog`)
    RUN/STAGE/checkpoints/step_NNNNNN/{model/, trainer_state/}
    RUN/STAGE/model/             the stage's final model (a Hugging Face directory)
    RUN/evals/NAME.json          held-out evaluations
    RUN/model/                   the exported model
    RUN/report.md, RUN/plots/

A single stage run (`nanoseek pretrain --out DIR`) is a stage directory on its own. Every file and directory is
written under a temporary sibling name and renamed into place, so a kill at any moment leaves either the old
version or the new one, never half of one.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple

from .errors import DataError, TrainError

STAGES = ("pretrain", "extend", "sft", "grpo", "distill")  # the training stages, in pipeline order
PIPELINE_STATE = "pipeline.json"
TOOL_USE = "tool_use.json"  # a pipeline's tool-use evaluation of its exported model (with `tool_tasks`)
METRICS = "metrics.jsonl"


def check_writable(out: str | Path) -> None:
    """Create `out` and write a probe file in it: a run learns that it cannot save before it trains, not after."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"out: cannot write to {out} ({e.strerror})") from None


# ---- atomic writes ------------------------------------------------------------------------------------------------
@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary sibling of `path` to write; renamed into place when the block ends without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` through a temporary sibling renamed into place."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, data) -> Path:
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def staging(path: str | Path, make: bool = True) -> Path:
    """An empty temporary sibling directory to build `path` in. What a killed `commit` left is put right first: a
    stale temporary removed, a directory moved aside but not yet replaced moved back. make=False: only its name
    (the other processes of a run that write into it)."""
    path = Path(path)
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    if not make:
        return tmp
    if old.exists() and not path.exists():
        os.replace(old, path)
    for stale in (tmp, old):
        if stale.exists():
            shutil.rmtree(stale)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, path: str | Path) -> Path:
    """Put the directory `tmp` (from `staging`) in place of `path`: the old one is moved aside, then removed."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)
    return path


def remove_dir(path: str | Path) -> None:
    """Delete a directory so that a kill half-way leaves nothing of it under its own name: it is renamed to a `.del`
    sibling in one step, then deleted (`sweep` removes what a kill left of that)."""
    path = Path(path)
    trash = path.with_name(path.name + ".del")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(path, trash)
    shutil.rmtree(trash)


def sweep(folder: str | Path, pattern: str = "*") -> None:
    """Remove the `.tmp` and `.del` leftovers of killed writes and deletions among `folder`'s entries `pattern`."""
    for stale in [*Path(folder).glob(f"{pattern}.tmp"), *Path(folder).glob(f"{pattern}.del")]:
        shutil.rmtree(stale)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """`with atomic_dir(p) as tmp:` write into tmp; on leaving the block tmp becomes p (on an error p is untouched)."""
    tmp = staging(path)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    commit(tmp, path)


# ---- metrics ------------------------------------------------------------------------------------------------------
def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = row.get("step") if isinstance(row, dict) else None
    ok = isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step)
    return row if ok else None


def read_metrics(path: str | Path, notes: list[str] | None = None) -> list[dict]:
    """The rows of a metrics.jsonl. A last line cut short (a kill mid-write) is left out; any other line that is
    not a JSON row with a `step` is an error naming it or, given `notes`, skipped and counted there."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    lines = [(i, line) for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    rows, bad = [], 0
    for i, line in lines:
        row = _row(line)
        if row is not None:
            rows.append(row)
        elif notes is not None:
            bad += 1
        elif i != lines[-1][0]:
            raise DataError(f"{path}:{i}: not valid JSON (or no step)")
    if bad:
        notes.append(f"`{path}`: {bad} malformed line(s) skipped")
    return rows


class MetricsLog:
    """A stage's metrics.jsonl, written by one process: one row per step, appended as the step finishes."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled

    def restart(self, step: int) -> None:
        """Keep the rows of steps up to `step` (the checkpoint a run resumes from; 0 for a fresh start), so a
        resumed run logs every later step exactly once."""
        if not self.enabled or not self.path.exists():
            return
        rows = [r for r in read_metrics(self.path, notes=[]) if r["step"] <= step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def append(self, row: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


# ---- stages -------------------------------------------------------------------------------------------------------
class StageDir(NamedTuple):
    name: str
    dir: Path
    seconds: float | None  # the wall seconds pipeline.json recorded for it


def stage_rank(name: str) -> tuple[int, str]:
    """Sort key: the training stages in pipeline order, then other names alphabetically."""
    return (STAGES.index(name) if name in STAGES else len(STAGES), name)


def read_json(path: str | Path, notes: list[str] | None = None) -> dict | None:
    """A file holding one JSON object. One that cannot be read is an error naming it or, given `notes`, None and a
    note."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        if notes is None:
            raise DataError(f"{path}: cannot be read ({e})") from None
        notes.append(f"`{path.name}` in `{path.parent}` could not be read ({type(e).__name__}); left out")
        return None
    if not isinstance(data, dict):
        if notes is None:
            raise DataError(f"{path}: not a JSON object")
        notes.append(f"`{path}` is not a JSON object; left out")
        return None
    return data


def read_state(run_dir: str | Path, notes: list[str] | None = None) -> dict | None:
    """pipeline.json of a run directory, or None when it has none (see `read_json` for one that cannot be read)."""
    path = Path(run_dir) / PIPELINE_STATE
    return read_json(path, notes) if path.exists() else None


def find_stages(run_dir: str | Path, notes: list[str] | None = None) -> list[StageDir]:
    """The training stages of a run directory (one that holds metrics.jsonl itself is one stage): in pipeline.json's
    order, then any others by `stage_rank`. Listed stages with no metrics yet are left out, with a note."""
    run_dir = Path(run_dir)
    if (run_dir / METRICS).is_file():
        return [StageDir(run_dir.resolve().name or "run", run_dir, None)]
    state = read_state(run_dir, notes)
    found, seen = [], set()
    listed = state.get("stages") if state else None
    for s in listed if isinstance(listed, list) else []:
        if not isinstance(s, dict) or not isinstance(s.get("name"), str) or "dir" not in s:
            continue  # data, tokenizer, eval, export steps: not a training stage
        d = run_dir / str(s["dir"])
        if not (d / METRICS).is_file():
            if notes is not None:
                notes.append(f"stage `{s['name']}` is listed in pipeline.json but `{d}` has no metrics.jsonl "
                             "(not run yet?)")
            continue
        seconds = s.get("seconds")
        ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and math.isfinite(seconds)
        found.append(StageDir(s["name"], d, seconds if ok else None))
        seen.add(d.resolve())
    rest = sorted((d for d in run_dir.iterdir() if d.is_dir() and (d / METRICS).is_file() and d.resolve() not in seen),
                  key=lambda d: stage_rank(d.name)) if run_dir.is_dir() else []
    return found + [StageDir(d.name, d, None) for d in rest]
