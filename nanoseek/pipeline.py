"""Multi-stage runs: the end-to-end demo, R1-Zero and R1 are recipes of stages run by this one runner.

A pipeline recipe (`nanoseek/recipes/demo.yaml`, `r1-zero.yaml`, `r1.yaml`) names the task mixture, the evaluation
set and a list of training stages. Each stage is a TrainConfig (its keys, optionally on top of a training recipe); `init`
and `teacher` may name an earlier stage, meaning that stage's model. The runner builds the data and the tokenizer
once, runs the stages in order, evaluates each stage's model on the same held-out problems, exports one model and
writes the report:

    RUN_DIR/pipeline.json          settings and finished stages (a rerun skips them)
    RUN_DIR/data/corpus.jsonl      training problems (worked solutions; `worked_fraction` < 1 cuts the rest to answers)
    RUN_DIR/data/eval.jsonl        held-out problems: never trained on, at the trained levels and one level harder
    RUN_DIR/tokenizer/
    RUN_DIR/<stage>/               the stage's run: metrics.jsonl, checkpoints/, model/
    RUN_DIR/evals/<stage>.json     pass@1 (and pass@k, maj@k, format) of the stage's model on data/eval.jsonl
    RUN_DIR/model/                 the exported model (Hugging Face directory with its tokenizer)
    RUN_DIR/data/tools-eval.jsonl  with `tool_tasks`: held-out tool problems (their conversations joined the corpus)
    RUN_DIR/tool_use.json          ... answered by the exported model through a tool loop, with the tools and without
    RUN_DIR/report.md, plots/

A stage with `match: NAME` is a control: it trains for as many seconds as stage NAME's steps took (distillation's
include the teacher's sampling), so two ways of spending the same time can be compared from the same start.

Interrupted runs resume: finished stages are skipped and a stage with checkpoints continues from the last one.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import yaml

from .data import build_corpus, cut_steps, read_jsonl, write_jsonl
from .errors import TrainError
from .rundir import PIPELINE_STATE, STAGES, TOOL_USE, atomic_dir, read_state, write_json
from .tasks import Mixture, get_family, resolve_recipe
from .tasks.base import answer_only
from .train import run as run_stage
from .train.recipe import load_config
from .gains import level_scores

ACCEPTANCE_N = 100  # held-out problems decoded speculatively to measure the MTP module's acceptance rate


@dataclass
class PipelineConfig:
    tasks: str  # the task recipe every stage draws problems from
    stages: list  # [{name, stage, recipe?, TrainConfig keys...}, ...]
    description: str = ""
    tasks_n: int = 20000  # training problems with worked solutions (pretraining / SFT corpus) ...
    worked_fraction: float = 1.0  # ... of which this share keeps its steps; the others show the answer alone
    eval_n: int = 128  # held-out problems at the trained levels ...
    eval_harder_n: int = 64  # ... and one level above the hardest trained level of each family
    eval_samples: int = 4  # completions per problem: pass@1 is their mean (R1's definition) ...
    eval_temperature: float = 0.6  # ... sampled at R1's evaluation temperature and top-p
    eval_top_p: float = 0.95
    eval_max_new_tokens: int = 160
    tool_tasks: str | None = None  # a task recipe of tool-using families (the calculator): their conversations ...
    tool_tasks_n: int = 0  # ... join the corpus, this many, and ...
    tool_eval_n: int = 0  # ... this many held out test the exported model's tool use, with the tools and without
    vocab_size: int = 2048
    tokenizer_digits: int = 3
    seed: int = 0
    device: str = "auto"
    export: str | None = None  # the stage whose model becomes RUN_DIR/model (default: the last stage)

    @classmethod
    def load(cls, recipe: str | Path, **overrides) -> "PipelineConfig":
        path = resolve_recipe(recipe)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainError(f"recipe {path}: not valid YAML ({e})") from None
        known = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or (unknown := set(data) - known):
            raise TrainError(f"recipe {path}: expected a mapping with keys from {sorted(known)}"
                             + (f"; unknown: {sorted(unknown)}" if isinstance(data, dict) else ""))
        for key in ("tasks", "stages"):
            if key not in data:
                raise TrainError(f"recipe {path}: '{key}' is required")
        cfg = cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})
        cfg.check(str(path))
        return cfg

    def check(self, source: str) -> None:
        kinds = {"str": str, "list": list, "int": int, "float": (int, float), "str | None": (str, type(None))}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, kinds[f.type]):
                raise TrainError(f"{source}: '{f.name}' = {value!r}: expected {f.type}")
        for key, low in (("tasks_n", 1), ("eval_n", 0), ("eval_harder_n", 0), ("eval_samples", 1),
                         ("eval_max_new_tokens", 1), ("tool_tasks_n", 0), ("tool_eval_n", 0)):
            if getattr(self, key) < low:
                raise TrainError(f"{source}: '{key}' = {getattr(self, key)}: must be >= {low}")
        if not 0 <= self.worked_fraction <= 1:
            raise TrainError(f"{source}: 'worked_fraction' = {self.worked_fraction}: must be in [0, 1]")
        names = []
        for i, entry in enumerate(self.stages):
            where = f"{source}: stages[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                raise TrainError(f"{where}: expected a mapping with a 'name'")
            if entry.get("stage") not in STAGES:
                raise TrainError(f"{where} ({entry['name']}): 'stage' must be one of {', '.join(STAGES)}")
            if entry["name"] in names or entry["name"] in ("data", "tokenizer", "evals", "model", "plots"):
                raise TrainError(f"{where}: the name {entry['name']!r} is taken")
            if "match" in entry and entry["match"] not in names:
                raise TrainError(f"{where} ({entry['name']}): match: {entry['match']!r} is not an earlier stage")
            names.append(entry["name"])
            # unknown keys and bad values fail here, before anything runs
            self.stage_config(entry, Path("RUN_DIR"), names[:-1])
        if self.tool_tasks is not None:
            tools = Mixture.from_recipe(self.tool_tasks)
            if without := [e.family for e in tools.entries if not get_family(e.family).tool_functions]:
                raise TrainError(f"{source}: tool_tasks: {', '.join(without)} offer no tools")
        if self.export is not None and self.export not in names:
            raise TrainError(f"{source}: export: {self.export!r} is not a stage ({', '.join(names)})")

    def stage_config(self, entry: dict, run_dir: Path, earlier: list[str]):
        """The TrainConfig of one stage: its recipe, its keys, then what the pipeline fixes (paths, data)."""
        keys = {k: v for k, v in entry.items() if k not in ("name", "recipe", "match")}
        for ref in ("init", "teacher"):
            if isinstance(keys.get(ref), str) and keys[ref] in earlier:
                keys[ref] = str(run_dir / keys[ref] / "model")
        data = run_dir / "data"
        fixed = {"out": str(run_dir / entry["name"]), "tokenizer": str(run_dir / "tokenizer"), "eval_n": 0,
                 "device": self.device, "seed": keys.get("seed", self.seed)}
        if entry["stage"] in ("pretrain", "extend", "sft"):
            fixed.update(data=[str(data / "corpus.jsonl")], tasks=None)
        else:  # the prompts come from the mixture; the held-out problems are excluded from them
            fixed.update(data=[str(data / "eval.jsonl")], tasks=self.tasks)
        return load_config(entry.get("recipe"), {**keys, **fixed})


def harder(mixture: Mixture) -> Mixture:
    """The mixture one level above each family's hardest trained level (families already at their top drop out)."""
    entries = [replace(e, difficulty=(e.difficulty[1] + 1, e.difficulty[1] + 1)) for e in mixture.entries
               if e.difficulty[1] < get_family(e.family).max_difficulty]
    return Mixture(entries, f"{mixture.source}, one level harder")


def score(cfg: PipelineConfig, model_dir: Path, problems: list) -> dict:
    """A model's evaluation report on held-out problems as every pipeline stage is scored: `eval_samples` samples
    per problem at `eval_temperature`, pass@1 also split into trained levels and harder ones. With an MTP module,
    its drafts' acceptance rate is measured by speculative decoding of the first ACCEPTANCE_N problems (only
    there: at the evaluation's batch sizes a CPU is compute-bound and speculation costs more than it saves)."""
    from .evaluate import evaluate
    from .model import Transformer
    from .sampling import SamplingParams
    from .tokenizer import Tokenizer
    model, tok = Transformer.from_pretrained(model_dir).eval(), Tokenizer.load(model_dir)
    params = SamplingParams(max_new_tokens=cfg.eval_max_new_tokens, temperature=cfg.eval_temperature,
                            top_p=cfg.eval_top_p)
    report = evaluate(model, tok, problems, cfg.eval_samples, params, seed=cfg.seed)
    if model.mtp:
        drafts = evaluate(model, tok, problems[:ACCEPTANCE_N], 1, params, seed=cfg.seed, speculative=True)
        report["acceptance_rate"] = drafts["acceptance_rate"]
    return {**report, **level_scores(report, problems, Mixture.from_recipe(cfg.tasks))}


class Pipeline:
    def __init__(self, cfg: PipelineConfig, run_dir: Path):
        self.cfg, self.dir = cfg, Path(run_dir)
        self.state_path = self.dir / PIPELINE_STATE
        self.state = {"settings": asdict(cfg), "stages": []}
        saved = read_state(self.dir)
        if saved is not None:
            if saved.get("settings") != self.state["settings"]:
                ours, theirs = self.state["settings"], saved["settings"]
                changed = sorted(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
                raise TrainError(f"{self.dir} holds a run with other settings ({', '.join(changed)}); choose "
                                 "another --out, or --fresh to start it over")
            self.state = saved

    def done(self, name: str) -> dict | None:
        return next((s for s in self.state["stages"] if s["name"] == name), None)

    def record(self, name: str, seconds: float, **info) -> None:
        self.state["stages"] = [s for s in self.state["stages"] if s["name"] != name]
        self.state["stages"].append({"name": name, "seconds": round(seconds, 1), **info})
        write_json(self.state_path, self.state)

    def run(self) -> dict:
        steps = [("data", self.build_data), ("tokenizer", self.build_tokenizer)]
        for entry in self.cfg.stages:
            steps.append((entry["name"], lambda e=entry: self.train(e)))
            steps.append((f"eval {entry['name']}", lambda e=entry: self.evaluate(e["name"])))
        steps.append(("export", self.export))
        if self.cfg.tool_tasks and self.cfg.tool_eval_n:
            steps.append(("eval tools", self.evaluate_tools))
        steps.append(("report", self.report))
        t_start = time.perf_counter()
        for i, (name, fn) in enumerate(steps, 1):
            if self.done(name) and name != "report":
                print(f"== [{i}/{len(steps)}] {name}: done earlier, skipped")
                continue
            print(f"== [{i}/{len(steps)}] {name}", flush=True)
            t0 = time.perf_counter()
            info = fn() or {}
            self.record(name, time.perf_counter() - t0, **info)
        return {"seconds": time.perf_counter() - t_start, "model": self.dir / "model",
                "report": self.dir / "report.md", "evals": self.evals()}

    # ---- the steps ------------------------------------------------------------------------------------------------
    def build_data(self) -> dict:
        cfg, data = self.cfg, self.dir / "data"
        mixture = Mixture.from_recipe(cfg.tasks)
        corpus = build_corpus(mixture, cfg.tasks_n, cfg.eval_n, seed=cfg.seed)
        corpus.train = cut_steps(corpus.train, cfg.worked_fraction, seed=cfg.seed)
        seen = {p.prompt for p in corpus.train}
        hard = [p for p in build_corpus(harder(mixture), cfg.eval_harder_n, cfg.eval_harder_n, seed=cfg.seed + 1,
                                        progress=False).held_out if p.prompt not in seen]
        held_out = corpus.held_out + hard
        worked = sum(p.solution != answer_only(p.answer) for p in corpus.train)
        tools = build_corpus(Mixture.from_recipe(cfg.tool_tasks), cfg.tool_tasks_n + cfg.tool_eval_n,
                             cfg.tool_eval_n, seed=cfg.seed + 2, progress=False) if cfg.tool_tasks else None
        if tools is not None:  # the windows are shuffled when training: appended is as good as interleaved
            corpus.train += tools.train
            write_jsonl(data / "tools-eval.jsonl", tools.held_out)
        write_jsonl(data / "eval.jsonl", held_out)
        write_jsonl(data / "corpus.jsonl", corpus.train)
        print(f"  {len(corpus.train):,} training problems ({worked:,} with worked steps"
              + (f", {len(tools.train):,} tool conversations" if tools else "") + f"); {len(corpus.held_out)} "
              f"held-out at the trained levels and {len(hard)} one level harder -> {data}")
        return {"train": len(corpus.train), "eval": len(held_out), "eval_harder": len(hard),
                **({"tools": len(tools.train), "tools_eval": len(tools.held_out)} if tools else {})}

    def build_tokenizer(self) -> dict:
        from .tokenizer import train_tokenizer
        from .train.lm_data import tokenizer_texts
        tok = train_tokenizer(tokenizer_texts([self.dir / "data" / "corpus.jsonl"]), self.cfg.vocab_size,
                              digits=self.cfg.tokenizer_digits)
        with atomic_dir(self.dir / "tokenizer") as tmp:
            tok.save(tmp)
        print(f"  {tok.vocab_size:,} tokens -> {self.dir / 'tokenizer'}")
        return {"vocab_size": tok.vocab_size}

    def train(self, entry: dict) -> dict:
        earlier = [e["name"] for e in self.cfg.stages[:self.cfg.stages.index(entry)]]
        cfg = self.cfg.stage_config(entry, self.dir, earlier)
        cfg = replace(cfg, resume=(Path(cfg.out) / "checkpoints").is_dir())
        if "match" in entry:
            matched = self.done(entry["match"]) or {}
            if "compute_seconds" not in matched:  # a run directory written before stages recorded their seconds
                raise TrainError(f"{self.state_path}: stage {entry['match']!r} has no recorded seconds for "
                                 f"{entry['name']!r} to match; rerun it (--fresh)")
            cfg = replace(cfg, max_seconds=matched["compute_seconds"])
            print(f"  {cfg.max_seconds:.0f} s of training, as long as {entry['match']}'s")
        summary = run_stage(cfg)
        return {"stage": cfg.stage, "dir": entry["name"], "steps": summary["steps"],
                "final_loss": summary["final_loss"], "compute_seconds": round(summary["seconds"], 4)}

    def evaluate(self, name: str) -> dict:
        from .evaluate import format_table
        model_dir = self.dir / name / "model"
        report = score(self.cfg, model_dir, read_jsonl(self.dir / "data" / "eval.jsonl"))
        report = {"label": name, "model": str(model_dir), "problems": "data/eval.jsonl (held-out)", **report}
        write_json(self.dir / "evals" / f"{name}.json", report)
        print(format_table(report))
        return {key: report[key] for key in ("pass@1", "pass@1_se", "pass@1_trained", "pass@1_harder",
                                             "thinking_rate")}

    def evaluate_tools(self) -> dict:
        """The exported model on the held-out tool problems, offered the tools and not (the control)."""
        from .model import Transformer
        from .tokenizer import Tokenizer
        from .tool_use import tool_use
        model, tok = Transformer.from_pretrained(self.dir / "model").eval(), Tokenizer.load(self.dir / "model")
        problems = read_jsonl(self.dir / "data" / "tools-eval.jsonl")
        report = {"model": str(self.dir / "model"), "problems": "data/tools-eval.jsonl (held-out)",
                  **{key: tool_use(model, tok, problems, offered, self.cfg.eval_max_new_tokens)
                     for key, offered in (("with_tools", True), ("without_tools", False))}}
        write_json(self.dir / TOOL_USE, report)
        summary = {f"pass@1_{key}": report[key]["pass@1"] for key in ("with_tools", "without_tools")}
        summary.update({f"pass@1_se_{key}": report[key]["pass@1_se"] for key in ("with_tools", "without_tools")})
        print("  tool use: " + ", ".join(f"{key.replace('_', ' ')} {r['pass@1']:.1%} ± {r['pass@1_se']:.1%} "
                                         f"(called a tool: {r['tool_call_rate']:.0%})"
                                         for key, r in report.items() if isinstance(r, dict)))
        return {**summary, "tool_call_rate": report["with_tools"]["tool_call_rate"]}

    def export(self) -> dict:
        source = self.dir / (self.cfg.export or self.cfg.stages[-1]["name"]) / "model"
        final = self.dir / "model"
        with atomic_dir(final) as tmp:
            shutil.copytree(source, tmp, dirs_exist_ok=True)
        print(f"  {source} -> {final}")
        return {"source": str(source)}

    def report(self) -> dict:
        from .report import write_report
        path = write_report(self.dir)
        print(f"  {path}")
        return {}

    def evals(self) -> dict[str, dict]:
        """Each evaluated stage's pass@1: overall, at the trained levels and one level harder."""
        return {s["name"].removeprefix("eval "): s for s in self.state["stages"] if "pass@1" in s}
