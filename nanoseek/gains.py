"""The held-out results of a pipeline run: pass@1 at the trained levels and one level harder, and the paired gains
of the comparisons its recipe sets up (a stage against its start, a control against the stage whose time it
matched), each with its standard error. `summary` prints them after `nanoseek demo` and in the report."""

from __future__ import annotations

import json
from pathlib import Path

from .data import read_jsonl
from .evaluate import paired_gain, standard_error
from .rundir import TOOL_USE, read_state
from .tasks import Mixture


def level_sides(problems: list, mixture: Mixture) -> list[str]:
    """Per problem, 'trained' at a level the mixture trains on, 'harder' above its family's top level."""
    top = {e.family: e.difficulty[1] for e in mixture.entries}
    return ["harder" if p.difficulty > top.get(p.family, 0) else "trained" for p in problems]


def level_scores(report: dict, problems: list, mixture: Mixture) -> dict[str, float | None]:
    """pass@1 and its standard error on the problems at the mixture's trained levels and on those above them, from
    the report's per-problem scores (in the order of `problems`)."""
    out, sides = {}, level_sides(problems, mixture)
    for side in ("trained", "harder"):
        values = [v for s, v in zip(sides, report["per_problem"]) if s == side]
        out[f"pass@1_{side}"] = sum(values) / len(values) if values else None
        out[f"pass@1_{side}_se"] = standard_error(values) if values else None
    return out


def gain(after: dict, before: dict, problems: list, mixture: Mixture) -> dict[str, tuple[float, float] | None]:
    """after's pass@1 minus before's, with its paired standard error, overall and per side ('all', 'trained',
    'harder'): both evaluated on the same `problems`."""
    sides = level_sides(problems, mixture)

    def on(report: dict, side: str) -> dict:  # the report's per-problem scores on one side only
        return {"per_problem": [v for v, s in zip(report.get("per_problem") or [], sides) if s == side]}
    return {"all": paired_gain(after, before),
            **{side: paired_gain(on(after, side), on(before, side)) if side in sides else None
               for side in ("trained", "harder")}}


def comparisons(stages: list[dict]) -> list[tuple[str, str, str]]:
    """(after, before, how) for every comparison a recipe sets up: a stage against the stage it starts from (`init`),
    and a stage that `match`es another's time against it (the other minus the control)."""
    names = [e["name"] for e in stages]
    out = []
    for e in stages:
        if e.get("init") in names:
            out.append((e["name"], e["init"], "from its start"))
        if e.get("match") in names:
            out.append((e["match"], e["name"], "same time"))
    return out


def summary(run_dir: Path) -> list[str]:
    """A finished (or partial) run's held-out results as text lines: each evaluated stage's pass@1 ± standard error,
    overall, at the trained levels and one level harder, with its share of completions that show worked steps; then
    each comparison of the recipe as a paired gain ± standard error; then each distilled student against its
    teacher."""
    cfg = read_state(run_dir)["settings"]
    problems, mixture = read_jsonl(run_dir / "data" / "eval.jsonl"), Mixture.from_recipe(cfg["tasks"])
    evals = {e["name"]: json.loads(path.read_text()) for e in cfg["stages"]
             if (path := run_dir / "evals" / f"{e['name']}.json").exists()}
    sides = [level_sides(problems, mixture).count(side) for side in ("trained", "harder")]
    lines = [f"Held-out pass@1 ± standard error ({sides[0]} problems at the trained levels, {sides[1]} one level "
             f"harder; {cfg['eval_samples']} samples each at temperature {cfg['eval_temperature']}, "
             f"top-p {cfg['eval_top_p']}):",
             f"  {'stage':<18}{'all':>15}{'trained':>15}{'harder':>15}{'thinking':>10}"]
    def cell(value, se) -> str:
        return "-" if value is None else f"{value:.1%}" + ("" if se is None else f" ± {se * 100:.1f}")

    def points(g: tuple[float, float] | None) -> str:
        return "-" if g is None else f"{g[0] * 100:+.1f} ± {g[1] * 100:.1f}"

    for name, r in evals.items():
        if "per_problem" in r:
            levels, se = level_scores(r, problems, mixture), standard_error(r["per_problem"])
        else:  # written before evaluations kept per-problem scores: no standard errors
            levels, se = {k: r.get(k) for k in ("pass@1_trained", "pass@1_harder")}, None
        lines.append(f"  {name:<18}{cell(r['pass@1'], se):>15}"
                     + "".join(f"{cell(levels[f'pass@1_{s}'], levels.get(f'pass@1_{s}_se')):>15}"
                               for s in ("trained", "harder")) + f"{r.get('thinking_rate', 0):>10.0%}")
    pairs = [(a, b, how) for a, b, how in comparisons(cfg["stages"]) if a in evals and b in evals]
    labels = [f"{a} - {b} ({how})" for a, b, how in pairs]
    width = max(map(len, labels), default=0) + 2
    if pairs:
        lines.append("Gains in points ± paired standard error:".ljust(width + 2)
                     + "".join(f"{s:>15}" for s in ("all", "trained", "harder")))
        for (after, before, _), label in zip(pairs, labels):
            g = gain(evals[after], evals[before], problems, mixture)
            lines.append(f"  {label:<{width}}" + "".join(f"{points(g[s]):>15}" for s in ("all", "trained", "harder")))
    for e in cfg["stages"]:
        if e.get("teacher") in evals and e["name"] in evals:
            student, teacher = evals[e["name"]]["pass@1"], evals[e["teacher"]]["pass@1"]
            share = f"{student / teacher:.0%}" if teacher > 0 else "-"
            lines.append(f"  {e['name']}: {student:.1%}, {share} of its teacher {e['teacher']}'s {teacher:.1%}")
    if (path := run_dir / TOOL_USE).exists():
        tools = json.loads(path.read_text())
        with_, without = tools["with_tools"], tools["without_tools"]
        lines.append(f"Tool use of the exported model ({with_['n']} held-out products, greedy): with the calculator "
                     f"{cell(with_['pass@1'], with_['pass@1_se'])} (called it in {with_['tool_call_rate']:.0%}), "
                     f"without {cell(without['pass@1'], without['pass@1_se'])}")
    return lines
