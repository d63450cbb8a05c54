"""The report card: a run directory's metrics and evaluation reports -> `report.md` and PNG plots beside it.

    nanoseek report RUN_DIR   ->   RUN_DIR/report.md, RUN_DIR/plots/*.png

A run directory is one stage (it holds `metrics.jsonl`, as `nanoseek pretrain --out DIR` writes it) or a pipeline
whose stages are sub-directories holding `metrics.jsonl` (pretrain/, grpo/, distill/, ...), with evaluation reports
(the dict of `evaluate.evaluate`) in `evals/<label>.json` and in a stage's `eval.json`, and optionally `pipeline.json`
(stage order and wall times). The sections, one function each:

    summary      steps, time, tokens, final loss or reward, tokens/s, MFU per stage
    held-out     pass@1 and format rate of every evaluation, before/after deltas, per family and per task
    loss         loss, LM loss and MTP loss against the step
    expert load  MaxVio per MoE layer against the step (V3's measure of imbalance)
    GRPO         reward, accuracy, format rate, length, KL, entropy, clip fraction against the step
    MTP          speculative-decoding acceptance rate of the evaluations that measured it
    compute      tokens/s and MFU against the step; FLOPs and what the run would cost on rented GPUs (cost.py)
    examples     a few completions of the last evaluation

Every number is read from the run's files. A section whose data is missing is replaced by one line that says what is
missing, so an interrupted run (a stage with a few rows, no evaluations, no pipeline.json) still gets a report.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .config import ModelConfig
from .errors import ConfigError, DataError, NanoseekError
from .gains import summary
from .rundir import find_stages, read_json, read_metrics, read_state, write_text

GRPO_METRICS = (("reward", "reward"), ("accuracy", "accuracy"), ("format_rate", "format rate"),
                ("response_length", "response length (tokens)"), ("thinking_rate", "share with worked steps"),
                ("groups_no_signal", "groups with equal rewards"), ("kl", "KL to the reference (k3)"),
                ("entropy", "entropy (nats/token)"), ("clip_fraction", "clip fraction"), ("loss", "policy loss"))
DPI = 90


# ---- reading a run -------------------------------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    dir: Path
    rows: list[dict]  # metrics.jsonl, one per optimizer step
    wall_seconds: float | None = None  # from pipeline.json: the whole stage, evaluation and saving included
    config: ModelConfig | None = None  # the stage's model/config.json

    @property
    def is_grpo(self) -> bool:
        return any("reward" in r for r in self.rows)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of the rows where `key` is a finite number."""
        pairs = [(r["step"], r[key]) for r in self.rows if _finite(r.get(key))]
        return np.array([p[0] for p in pairs], dtype=float), np.array([p[1] for p in pairs], dtype=float)

    def total(self, key: str) -> float:
        return float(sum(r[key] for r in self.rows if _finite(r.get(key))))

    def last(self, key: str):
        return next((r[key] for r in reversed(self.rows) if _finite(r.get(key))), None)

    def maxvio_rows(self) -> list[dict]:
        return [r for r in self.rows if isinstance(r.get("maxvio"), list) and r["maxvio"]
                and all(_finite(v) for v in r["maxvio"])]


@dataclass
class Eval:
    label: str
    path: Path
    report: dict


@dataclass
class Run:
    dir: Path
    stages: list[Stage]
    evals: list[Eval]
    pipeline: dict | None
    notes: list[str] = field(default_factory=list)  # what could not be read, said once at the top


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _model_config(stage_dir: Path) -> ModelConfig | None:
    try:
        return ModelConfig.load(stage_dir / "model") if (stage_dir / "model" / "config.json").exists() else None
    except NanoseekError:
        return None


def find_evals(run_dir: Path, stages: list[Stage], pipeline: dict | None, notes: list[str]) -> list[Eval]:
    """evals/*.json, then each stage's eval.json (labelled with the stage, unless evals/ has that label), ordered
    as pipeline.json's "evals" lists them, else by stage order, then alphabetically."""
    evals: dict[str, Eval] = {}
    paths = sorted((run_dir / "evals").glob("*.json")) if (run_dir / "evals").is_dir() else []
    for path in paths:
        report = read_json(path, notes)
        if report is not None:
            label = str(report.get("label") or path.stem)
            evals[label] = Eval(label, path, report)
    for stage in stages:
        path = stage.dir / "eval.json"
        if stage.name not in evals and path.is_file():
            report = read_json(path, notes)
            if report is not None:
                evals[stage.name] = Eval(stage.name, path, report)
    for label, e in list(evals.items()):
        if not _finite(e.report.get("pass@1")):
            notes.append(f"`{e.path}` has no pass@1 (not an evaluation report?); left out")
            del evals[label]
    listed = pipeline.get("evals") if pipeline else None
    listed = [x.get("label") if isinstance(x, dict) else x for x in listed] if isinstance(listed, list) else []
    stage_names = [s.name for s in stages]

    def rank(label: str) -> tuple:
        if label in listed:
            return (0, listed.index(label), "")
        if label in stage_names:
            return (1, stage_names.index(label), "")
        return (2, 0, label)
    return sorted(evals.values(), key=lambda e: rank(e.label))


def load_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    notes: list[str] = []
    pipeline = read_state(run_dir, notes)
    found = find_stages(run_dir, notes)
    if not found:
        raise DataError(f"{run_dir}: no metrics.jsonl in it or in its sub-directories (not a run directory)")
    stages = []
    for name, d, seconds in found:
        rows = read_metrics(d / "metrics.jsonl", notes)
        if rows:
            stages.append(Stage(name, d, rows, seconds, _model_config(d)))
        else:
            notes.append(f"stage `{name}`: `{d / 'metrics.jsonl'}` has no rows yet; left out")
    return Run(run_dir, stages, find_evals(run_dir, stages, pipeline, notes), pipeline, notes)


# ---- formatting and plotting helpers ---------------------------------------------------------------------------------
def _pct(x) -> str:
    return f"{x:.1%}" if _finite(x) else "—"


def _num(x, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if _finite(x) else "—"


def _si(x) -> str:
    if not _finite(x):
        return "—"
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f}{unit}"
    return f"{x:.0f}"


def _duration(seconds) -> str:
    if not _finite(seconds):
        return "—"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.2f} h"


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header)))
             + "|"]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]


def _missing(what: str, why: str) -> list[str]:
    return [f"_{what}: left out, {why}._", ""]


def smooth(values: np.ndarray, window: int | None = None) -> np.ndarray:
    """Trailing moving average over `window` steps (default: a twentieth of the run, at least 1)."""
    n = len(values)
    window = window or max(1, n // 20)
    c = np.concatenate([[0.0], np.cumsum(values)])
    i = np.arange(1, n + 1)
    lo = np.maximum(0, i - window)
    return (c[i] - c[lo]) / (i - lo)


def _tail_mean(values: np.ndarray) -> float:
    """The mean of the last tenth of a series (at least one value): a final value with less step-to-step noise."""
    return float(values[-max(1, len(values) // 10):].mean()) if len(values) else float("nan")


def _curve(ax, steps: np.ndarray, values: np.ndarray, label: str, color=None) -> None:
    """A faint line of the raw values (at most ~600 points, to keep the PNG small) and a solid line of their
    moving average."""
    line, = ax.plot(steps, smooth(values), label=label, color=color, linewidth=1.6)
    if len(values) > 1:
        every = max(1, len(values) // 600)
        ax.plot(steps[::every], values[::every], color=line.get_color(), alpha=0.25, linewidth=0.8)
    else:
        ax.plot(steps, values, "o", color=line.get_color())


def _figure(rows: int, cols: int, width: float = 10.0, height: float = 3.0) -> Figure:
    fig = Figure(figsize=(width, height * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, plots: Path, name: str) -> str:
    """Write plots/<name>.png (atomically) and return the relative link for report.md."""
    plots.mkdir(parents=True, exist_ok=True)
    tmp = plots / f".{name}.tmp.png"  # the suffix tells matplotlib the format
    fig.savefig(tmp, dpi=DPI)
    os.replace(tmp, plots / f"{name}.png")
    return f"plots/{name}.png"


def _layer_names(stage: Stage, n: int) -> list[str]:
    """Names of the n MoE layers in a maxvio list: main layers by index, then the MTP modules' (when the stage's
    model config accounts for exactly n; GRPO runs no MTP module, so its list holds the main layers alone)."""
    cfg = stage.config
    if cfg is not None:
        main = [f"layer {i}" for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
        mtp = [f"MTP {k + 1}" for k in range(cfg.num_nextn_predict_layers)
               if cfg.is_moe_layer(cfg.num_hidden_layers + k)]
        for names in (main + mtp, main):
            if len(names) == n:
                return names
    return [f"MoE layer {i}" for i in range(n)]


# ---- sections --------------------------------------------------------------------------------------------------------
def section_summary(run: Run) -> list[str]:
    from .cost import param_counts
    lines = ["## Summary", ""]
    rows = []
    for s in run.stages:
        tokens, seconds = s.total("tokens"), s.total("seconds")
        weighted = [r["mfu"] * r["seconds"] for r in s.rows if _finite(r.get("mfu")) and _finite(r.get("seconds"))]
        mean_mfu = sum(weighted) / seconds if weighted and seconds > 0 else None
        final = f"reward {_num(s.last('reward'))}" if s.is_grpo else f"loss {_num(s.last('loss'))}"
        rows.append([f"`{s.name}`", s.rows[-1]["step"], _si(tokens), _duration(seconds),
                     _duration(s.wall_seconds), final, _si(tokens / seconds) if seconds > 0 else "—",
                     _pct(mean_mfu)])
    lines += _table(["stage", "steps", "tokens", "step time", "wall time", "final", "tokens/s", "mean MFU"], rows)
    lines += ["", "Step time is the sum of the optimizer steps' times; wall time (from pipeline.json, when present) "
              "adds data preparation, evaluation and saving. MFU is the model's training FLOPs per second over this "
              "device's best dense matmul rate, averaged with the step times as weights.", ""]
    configs: dict[str, list[str]] = {}  # stages sharing a model config are listed together
    for s in run.stages:
        if s.config is not None:
            configs.setdefault(json.dumps(s.config.to_dict(), sort_keys=True, default=str), []).append(s.name)
    models = []
    for key, names in configs.items():
        cfg = next(s.config for s in run.stages if s.name == names[0])
        p, moe = param_counts(cfg), cfg.n_moe_layers
        models.append(f"- {', '.join(f'`{n}`' for n in names)}: {_si(p.total)} parameters, {_si(p.activated)} "
                      "activated per token" + (f", + {_si(p.mtp_total)} in the MTP module" if p.mtp_total else "")
                      + (f" ({cfg.num_hidden_layers} layers, {moe} of them MoE with {cfg.n_routed_experts} routed "
                         f"experts, top-{cfg.num_experts_per_tok})" if moe
                         else f" ({cfg.num_hidden_layers} dense layers)"))
    if models:
        lines += ["Models (from each stage's `model/config.json`):", "", *models, ""]
    settings = run.pipeline.get("settings") if run.pipeline else None
    if isinstance(settings, dict) and settings:
        lines += ["<details><summary>Settings (pipeline.json)</summary>", "", "```json",
                  json.dumps(settings, indent=2, ensure_ascii=False), "```", "", "</details>", ""]
    return lines


def _pass1(report: dict) -> str:
    """pass@1, as mean ± std over seeds when the report has several, else ± its standard error when known."""
    seeds = report.get("seeds")
    if _finite(report.get("pass@1_mean")) and isinstance(seeds, list) and len(seeds) > 1:
        return f"{_pct(report['pass@1_mean'])} ± {_pct(report.get('pass@1_std'))} ({len(seeds)} seeds)"
    if _finite(report.get("pass@1_se")):
        return f"{_pct(report.get('pass@1'))} ± {_pct(report['pass@1_se'])}"
    return _pct(report.get("pass@1"))


def _pass1_value(report: dict) -> float:
    return report["pass@1_mean"] if _finite(report.get("pass@1_mean")) else report["pass@1"]


def _comparisons(run: Run) -> list[tuple[tuple[str, float], dict, str]]:
    """((label, pass@1) of the model an evaluated model started from, its report, how they relate): a pipeline
    stage against the stage its `init` (or its `teacher`) names, a seed study against its own `before`; without a
    pipeline.json, each evaluation against the one before it."""
    by_label = {e.label: e.report for e in run.evals}
    settings = run.pipeline.get("settings") if run.pipeline else None
    stages = {s.get("name"): s for s in settings.get("stages", []) if isinstance(s, dict)} \
        if isinstance(settings, dict) else {}
    out = []
    for i, e in enumerate(run.evals):
        r = {**e.report, "label": e.label}
        stage = stages.get(e.label, {})
        if isinstance(r.get("before"), dict) and _finite(r["before"].get("pass@1")):
            out.append(((str(r["before"].get("label", "start")), r["before"]["pass@1"]), r, " (mean over seeds)"))
        elif stage.get("init") in by_label:
            out.append(((stage["init"], _pass1_value(by_label[stage["init"]])), r, ""))
        elif stage.get("teacher") in by_label:
            out.append(((stage["teacher"], _pass1_value(by_label[stage["teacher"]])), r, " (teacher → student)"))
        elif not stages and i > 0:
            before = run.evals[i - 1]
            out.append(((before.label, _pass1_value(before.report)), r, ""))
    return out


def section_evals(run: Run, plots: Path) -> list[str]:
    if not run.evals:
        return _missing("Held-out accuracy", "no evaluation reports (evals/*.json or a stage's eval.json)")
    lines = ["## Held-out accuracy", ""]
    summarised = run.pipeline is not None and (run.dir / "data" / "eval.jsonl").exists()  # a pipeline run
    if summarised:
        lines += ["```", *summary(run.dir), "```", "",
                  "pass@1 ± its standard error over the problems; a gain is the mean of the per-problem differences "
                  "± their standard error (both models answer the same problems). `same time`: the second stage "
                  "trained for as many seconds as the first.", ""]
    voted = any(isinstance(e.report.get("samples"), int) and e.report["samples"] > 1 for e in run.evals)
    header = ["evaluation", "problems", "n", "samples", "temperature", "pass@1",
              *(["pass@k", "maj@k"] if voted else []),
              "thinking", "format rate", "answer rate", "mean tokens"]
    rows = []
    for e in run.evals:
        r, k = e.report, e.report.get("samples")
        sampling = r.get("sampling") if isinstance(r.get("sampling"), dict) else {}
        row = [f"`{e.label}`", f"`{r['problems']}`" if r.get("problems") else "—", r.get("n", "—"), k or "—",
               sampling.get("temperature", "—"), _pass1(r)]
        if voted:
            many = isinstance(k, int) and k > 1
            row += [_pct(r.get(f"pass@{k}")), _pct(r.get(f"maj@{k}"))] if many else ["—", "—"]
        rows.append(row + [_pct(r.get("thinking_rate")), _pct(r.get("format_rate")), _pct(r.get("answer_rate")),
                           _num(r.get("mean_tokens"), 1)])
    lines += _table(header, rows) + [""]
    for start, after, how in _comparisons(run):
        if summarised and not isinstance(after.get("before"), dict):  # the summary above holds the stages' gains
            continue
        delta = _pass1_value(after) - start[1]
        lines.append(f"- `{start[0]}` → `{after['label'] if after.get('label') else '?'}`{how}: pass@1 "
                     f"{_pct(start[1])} → {_pct(_pass1_value(after))} ({delta * 100:+.1f} points)")
    if len(run.evals) > 1:
        lines.append("")
    lines += _gain_by_steps(run, plots)

    families = sorted({f for e in run.evals for f in (e.report.get("by_family") or {})})
    groups = ["all", *families]
    fig = _figure(1, 1, width=max(6.0, 1.2 * len(groups) + 3))
    ax = fig.add_subplot()
    width = 0.8 / len(run.evals)
    for i, e in enumerate(run.evals):
        by_family = e.report.get("by_family") or {}
        values = [_pass1_value(e.report)] + [by_family.get(f, {}).get("pass@1", np.nan) for f in families]
        x = np.arange(len(groups)) + (i - (len(run.evals) - 1) / 2) * width
        bars = ax.bar(x, values, width, label=e.label)
        if _finite(e.report.get("pass@1_std")):  # over seeds: overall only
            ax.errorbar(x[0], values[0], yerr=e.report["pass@1_std"], color="black", capsize=3)
        else:  # one standard error over the problems, where the evaluation has it
            errors = [e.report.get("pass@1_se")] + [by_family.get(f, {}).get("pass@1_se") for f in families]
            ax.errorbar(x, values, yerr=[v if _finite(v) else 0.0 for v in errors], fmt="none", ecolor="black",
                        capsize=2, linewidth=0.8)
        if len(groups) * len(run.evals) <= 24:
            ax.bar_label(bars, [f"{v:.0%}" if _finite(v) else "" for v in values], fontsize="small", padding=2)
    ax.set_xticks(np.arange(len(groups)), groups, rotation=20 if len(groups) > 6 else 0)
    ax.set_ylabel("pass@1")
    ax.set_ylim(0, 1)
    ax.set_title("held-out pass@1, overall and per task family (± one standard error)")
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    lines += [f"![held-out pass@1]({_save(fig, plots, 'heldout')})", ""]

    tasks = sorted({t for e in run.evals for t in (e.report.get("by_task") or {})},
                   key=lambda t: (t.rpartition("/")[0], int(t.rpartition("/")[2]) if t.rpartition("/")[2].isdigit()
                                  else 0, t))
    if tasks:
        rows = []
        for t in tasks:
            cells = [(e.report.get("by_task") or {}).get(t) for e in run.evals]
            n = next((c.get("n") for c in reversed(cells) if isinstance(c, dict) and "n" in c), "—")
            rows.append([t, n, *[_pct(c.get("pass@1")) if isinstance(c, dict) else "—" for c in cells]])
        lines += ["pass@1 per task family and difficulty:", ""]
        lines += _table(["task", "n", *[f"`{e.label}`" for e in run.evals]], rows) + [""]
    return lines


def _gain_by_steps(run: Run, plots: Path) -> list[str]:
    """Seed studies scored along their steps (benchmarks/grpo_seeds.py --every): the gain's mean ± std per step
    count, as a table and a plot."""
    studies = []
    for e in run.evals:
        by_steps = e.report.get("by_steps")
        if isinstance(by_steps, dict) and len(by_steps) > 1:
            points = sorted((int(k), v["gain"]) for k, v in by_steps.items()
                            if k.isdigit() and isinstance(v, dict) and isinstance(v.get("gain"), dict))
            if points:
                studies.append((e.label, len(e.report.get("seeds") or []), points))
    if not studies:
        return []
    keys = ("pass@1", "pass@1_trained", "pass@1_harder")
    lines = ["Held-out gain over the starting model along the steps (mean ± std over seeds, points):", ""]
    rows = [[f"`{label}`", seeds, steps, *[f"{g[k]['mean'] * 100:+.1f} ± {g[k]['std'] * 100:.1f}"
                                             if isinstance(g.get(k), dict) else "—" for k in keys]]
            for label, seeds, points in studies for steps, g in points]
    lines += _table(["study", "seeds", "steps", *keys], rows) + [""]
    fig = _figure(1, 1, width=7.0, height=3.5)
    ax = fig.add_subplot()
    for label, _, points in studies:
        for k in keys:
            got = [(steps, g[k]["mean"] * 100, g[k]["std"] * 100) for steps, g in points if isinstance(g.get(k), dict)]
            if got:
                x, y, err = zip(*got)
                ax.errorbar(x, y, yerr=err, capsize=3, marker="o", label=f"{label}: {k}")
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel("GRPO steps")
    ax.set_ylabel("gain in pass@1, points")
    ax.set_title("GRPO's held-out gain along the steps (mean ± std over seeds)")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    return lines + [f"![gain along the steps]({_save(fig, plots, 'gain_by_steps')})", ""]


def niah_grid(report: dict, family: str = "passkey") -> tuple[list[int], list[float], np.ndarray, list[float]]:
    """An evaluation's needle-in-a-haystack grid: (levels, depths, pass@1 (depths x levels, NaN where no problem),
    mean prompt tokens per level), from its `by_depth` cells."""
    cells = {tuple(k.split("/")[1:]): v for k, v in (report.get("by_depth") or {}).items() if k.split("/")[0] == family}
    levels = sorted({int(level) for level, _ in cells})
    depths = sorted({float(depth) for _, depth in cells})
    grid = np.full((len(depths), len(levels)), np.nan)
    for (level, depth), v in cells.items():
        grid[depths.index(float(depth)), levels.index(int(level))] = v["pass@1"]
    by_task = report.get("by_task") or {}
    tokens = [by_task.get(f"{family}/{level}", {}).get("prompt_tokens", np.nan) for level in levels]
    return levels, depths, grid, tokens


def niah_figure(reports: dict[str, dict]) -> Figure:
    """The usual NIAH heat maps, one per evaluation: prompt length across, needle depth down, pass@1 as colour."""
    fig = _figure(1, len(reports), width=4.2 * len(reports), height=3.4)
    for i, (label, report) in enumerate(reports.items(), 1):
        levels, depths, grid, tokens = niah_grid(report)
        ax = fig.add_subplot(1, len(reports), i)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(levels)), [f"{t:,.0f}" for t in tokens], rotation=45)
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(label)
        for (r, c), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(c, r, f"{v:.0%}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=fig.axes, label="pass@1")
    return fig


def section_niah(run: Run, plots: Path) -> list[str]:
    """Passkey retrieval by length and depth, for the evaluations that hold such problems."""
    reports = {e.label: e.report for e in run.evals if niah_grid(e.report)[0]}
    if not reports:
        return []
    return ["## Needle in a haystack", "", "Passkey retrieval (pass@1) by prompt length and the needle's depth.", "",
            f"![NIAH]({_save(niah_figure(reports), plots, 'niah')})", ""]


def section_loss(run: Run, plots: Path) -> list[str]:
    stages = [s for s in run.stages if not s.is_grpo and len(s.series("loss")[0])]
    if not stages:
        return _missing("Loss curves", "no stage logged a language-modelling loss")
    lines = ["## Loss", ""]
    fig = _figure(len(stages), 1)
    rows = []
    for i, s in enumerate(stages):
        ax = fig.add_subplot(len(stages), 1, i + 1)
        positive = True
        for key, label in (("loss", "loss (total)"), ("lm_loss", "LM loss"), ("mtp_loss", "MTP loss")):
            steps, values = s.series(key)
            if len(values):
                positive = positive and bool((values > 0).all())
                _curve(ax, steps, values, label)
                rows.append([f"`{s.name}`", key, _num(values[0]), _num(values[-1]), _num(_tail_mean(values)),
                             _num(values.min())])
        ax.set_title(f"{s.name}: loss against the step (solid: moving average, faint: every step)")
        ax.set_xlabel("step")
        ax.set_yscale("log" if positive else "linear")
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    lines += [f"![loss]({_save(fig, plots, 'loss')})", ""]
    lines += _table(["stage", "metric", "first", "final", "mean, last tenth", "min"], rows) + [""]
    lam = [s.last("mtp_lambda") for s in stages if s.last("mtp_lambda") is not None]
    if lam:
        lines += ["The total loss is the LM loss + λ × the MTP loss (λ at the end: "
                  + ", ".join(f"`{s.name}` {s.last('mtp_lambda')}" for s in stages if s.last("mtp_lambda") is not None)
                  + ") + the sequence-wise balance loss.", ""]
    return lines


def section_expert_load(run: Run, plots: Path) -> list[str]:
    stages = [s for s in run.stages if s.maxvio_rows()]
    if not stages:
        return _missing("Expert load", "no stage logged MaxVio (per-layer `maxvio` in metrics.jsonl)")
    lines = ["## Expert load (MaxVio)", "",
             "MaxVio = (max load − mean load) / mean load of a MoE layer's routed experts over one step's batch; "
             "0 is perfect balance. The gate biases of auxiliary-loss-free balancing move to drive it down.", ""]
    fig = _figure(len(stages), 1)
    rows = []
    for i, s in enumerate(stages):
        vio = s.maxvio_rows()
        n = max(len(r["maxvio"]) for r in vio)
        names = _layer_names(s, n)
        ax = fig.add_subplot(len(stages), 1, i + 1)
        for layer in range(n):
            pts = [(r["step"], r["maxvio"][layer]) for r in vio if len(r["maxvio"]) > layer]
            _curve(ax, np.array([p[0] for p in pts], float), np.array([p[1] for p in pts], float), names[layer])
        ax.set_title(f"{s.name}: MaxVio per MoE layer")
        ax.set_xlabel("step")
        ax.set_ylabel("MaxVio")
        ax.legend(fontsize="small", ncol=min(n, 6))
        ax.grid(alpha=0.3)
        final = vio[-1]["maxvio"]
        worst = int(np.argmax(final))
        means = np.array([float(np.mean(r["maxvio"])) for r in vio])
        rows.append([f"`{s.name}`", n, _num(means[0], 3), _num(means[-1], 3), _num(_tail_mean(means), 3),
                     f"{names[worst]} ({_num(final[worst], 3)})"])
    lines += [f"![MaxVio]({_save(fig, plots, 'maxvio')})", ""]
    lines += _table(["stage", "MoE layers", "first step mean", "final mean", "mean, last tenth",
                     "worst layer at the end"], rows) + [""]
    return lines


def section_grpo(run: Run, plots: Path) -> list[str]:
    stages = [s for s in run.stages if s.is_grpo]
    if not stages:
        return _missing("GRPO", "no stage logged rewards (no GRPO stage)")
    lines = ["## GRPO", ""]
    metrics = [(k, label) for k, label in GRPO_METRICS if any(len(s.series(k)[0]) for s in stages)]
    cols = 4 if len(metrics) > 4 else len(metrics)
    grid = (len(metrics) + cols - 1) // cols
    fig = _figure(grid, cols, width=3.2 * cols, height=2.6)
    rows = []
    for i, (key, label) in enumerate(metrics):
        ax = fig.add_subplot(grid, cols, i + 1)
        for s in stages:
            steps, values = s.series(key)
            if len(values):
                _curve(ax, steps, values, s.name)
                rows.append([f"`{s.name}`", key, _num(values[0]), _num(values[-1]), _num(_tail_mean(values))])
        ax.set_title(label, fontsize="medium")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(stages) > 1 and i == 0:
            ax.legend(fontsize="small")
    lines += [f"![GRPO]({_save(fig, plots, 'grpo')})", ""]
    lines += _table(["stage", "metric", "first", "final", "mean, last tenth"], rows) + [""]
    lines += ["Reward, accuracy, format rate and length are over the step's sampled completions (training prompts, "
              "not held out); KL and the clip fraction are per completion token.", ""]
    return lines


def section_mtp(run: Run) -> list[str]:
    measured = [e for e in run.evals if _finite(e.report.get("acceptance_rate"))]
    if not measured:
        return _missing("MTP acceptance", "no evaluation ran with MTP speculative decoding (no `acceptance_rate`)")
    lines = ["## MTP speculative decoding", ""]
    lines += _table(["evaluation", "draft tokens accepted"],
                    [[f"`{e.label}`", _pct(e.report["acceptance_rate"])] for e in measured])
    return lines + ["", "DeepSeek-V3 reports 85-90% acceptance of the second token its MTP module drafts.", ""]


def section_compute(run: Run, plots: Path, mfu: float) -> list[str]:
    from .cost import format_run_cost, run_cost
    lines = ["## Compute and cost", ""]
    stages = [s for s in run.stages if len(s.series("tokens_per_s")[0]) or len(s.series("mfu")[0])]
    if stages:
        fig = _figure(2, 1)
        ax_tps, ax_mfu = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2)
        for s in stages:
            for ax, key in ((ax_tps, "tokens_per_s"), (ax_mfu, "mfu")):
                steps, values = s.series(key)
                if len(values):
                    _curve(ax, steps, values, s.name)
        ax_tps.set_title("training throughput (tokens/s)")
        ax_mfu.set_title("MFU (model FLOPs / this device's best dense matmul rate)")
        for ax in (ax_tps, ax_mfu):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        lines += [f"![throughput and MFU]({_save(fig, plots, 'throughput')})", ""]
    try:
        lines += [format_run_cost(run_cost(run.dir, mfu=mfu)).rstrip(), ""]
    except NanoseekError as e:
        lines += _missing("FLOPs and rented-GPU cost", f"the run's FLOPs could not be counted ({e})")
    return lines


def section_examples(run: Run) -> list[str]:
    last = next((e for e in reversed(run.evals) if e.report.get("examples")), None)
    if last is None:
        return _missing("Example completions", "no evaluation report holds examples")
    lines = [f"## Example completions (`{last.label}`)", ""]
    for ex in last.report["examples"][:3]:
        if not isinstance(ex, dict):
            continue
        completion = str(ex.get("completion", ""))
        fence = "`" * max(3, 1 + max((len(m) for m in re.findall(r"`+", completion)), default=0))
        lines += [f"**Prompt:** {_cell(ex.get('prompt', ''))}  ",
                  f"**Expected answer:** `{_cell(ex.get('answer', ''))}`",
                  "", fence, completion, fence, ""]
    return lines


def section_notes(run: Run) -> list[str]:
    return ["## Notes on the files", "", *[f"- {n}" for n in run.notes], ""] if run.notes else []


# ---- the report ------------------------------------------------------------------------------------------------------
def write_report(run_dir: Path, mfu: float = 0.4) -> Path:
    """Read RUN_DIR, write RUN_DIR/plots/*.png and RUN_DIR/report.md (atomically); return the report's path.
    `mfu` is the utilisation assumed for the rented-GPU estimates of the cost section."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu = {mfu}: must be in (0, 1]")
    run = load_run(Path(run_dir))
    plots = run.dir / "plots"
    lines = [f"# nanoseek report: `{run.dir.resolve().name}`", "",
             f"Stages: {', '.join(f'`{s.name}`' for s in run.stages) or 'none with metrics yet'}; evaluations: "
             f"{', '.join(f'`{e.label}`' for e in run.evals) or 'none'}. Every number below is read from the run's "
             "metrics.jsonl files and evaluation reports.", ""]
    if run.stages:
        lines += section_summary(run)
    else:
        lines += _missing("Summary", "no stage has logged a step yet")
    lines += section_notes(run)
    lines += section_evals(run, plots)
    lines += section_niah(run, plots)
    lines += section_loss(run, plots)
    lines += section_expert_load(run, plots)
    lines += section_grpo(run, plots)
    lines += section_mtp(run)
    lines += section_compute(run, plots, mfu)
    lines += section_examples(run)
    return write_text(run.dir / "report.md", "\n".join(lines).rstrip() + "\n")
