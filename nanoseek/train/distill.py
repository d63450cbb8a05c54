"""Rejection sampling and distillation (R1 sections 2.3.3 and 2.4).

Rejection sampling: a model answers each problem K times; only completions that the task verifier scores 1.0, in
the `<think> ... </think> <answer> ... </answer>` format and finished on their own (not cut at max tokens) are
kept, deduplicated per prompt. The kept traces are SFT data: for the model itself (R1's second SFT round) or for a
smaller student (distillation), which is then trained on them with the SFT objective. The seconds the sampling took
count as the stage's compute beside the student's steps.

On several processes each rank answers a contiguous share of the problems (request seeds drawn from seed + rank),
rank 0 gathers the kept traces in problem order and writes them, and the student trains data-parallel (lm.run).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from pathlib import Path

import torch

from .. import distributed
from ..data import held_out_path, read_jsonl, write_jsonl
from ..errors import TrainError
from ..evaluate import sample_completions
from ..checkpoint import load_model
from ..rewards import format_reward
from ..rundir import check_writable, write_json
from ..sampling import SamplingParams
from ..tasks import Mixture, Problem, get_family
from ..tokenizer import Tokenizer
from . import lm
from .recipe import TrainConfig


def rejection_sample(model, tok: Tokenizer, problems: list[Problem], samples: int, params: SamplingParams,
                     seed: int = 0, progress: bool = True, compile: bool = False) -> tuple[list[Problem], dict]:
    """The verified-correct, well-formed, distinct completions as problems whose `solution` is the completion."""
    _, groups = sample_completions(model, tok, problems, samples, params, seed, progress=progress, desc="traces",
                                   compile=compile)
    kept, solved = [], 0
    for problem, completions in zip(problems, groups):
        texts = []
        for c in completions:
            text = c.text.strip()
            if (c.finish_reason == "stop" and text not in texts and format_reward(text).value == 1.0
                    and get_family(problem.family).score(problem, text) == 1.0):
                texts.append(text)
        kept += [dataclasses.replace(problem, solution=text) for text in texts]
        solved += bool(texts)
    return kept, {"problems": len(problems), "samples": len(problems) * samples, "kept": len(kept),
                  "problems_solved": solved}


def distinct_problems(mixture: Mixture, n: int, seed: int, excluded: set[str]) -> list[Problem]:
    """n problems of the mixture with distinct prompts, none of them in `excluded` (held-out prompts)."""
    rng, out, seen = random.Random(seed), [], set(excluded)
    for _ in range(n * 20):
        if len(out) == n:
            break
        p = mixture.sample(rng)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


def run(cfg: TrainConfig) -> dict:
    """Teacher traces on `cfg.tasks` problems -> verified-correct ones -> SFT of the student (`cfg.init`, or a
    fresh `cfg.preset` model with the teacher's tokenizer); held-out problems in `cfg.data` stay unseen."""
    d = cfg.distill
    out = Path(cfg.out)
    check_writable(out)
    traces_path = out / "data" / "traces.jsonl"
    stats_path = out / "data" / "traces.json"  # the counts and the seconds the teacher's sampling took
    held_out = [p for path in cfg.data for p in read_jsonl(path)]
    device = distributed.init(cfg.device)
    if not (cfg.resume and traces_path.exists() and stats_path.exists()):
        t0 = time.perf_counter()
        teacher = load_model(d.teacher, device=device)
        tok = Tokenizer.load(d.teacher)
        problems = distinct_problems(Mixture.from_recipe(cfg.tasks), cfg.tasks_n, cfg.seed,
                                     {p.prompt for p in held_out})
        params = SamplingParams(max_new_tokens=d.max_new_tokens, temperature=d.temperature)
        rank, world = distributed.rank(), distributed.world()
        mine = problems[len(problems) * rank // world:len(problems) * (rank + 1) // world]
        traces, stats = (rejection_sample(teacher, tok, mine, d.samples, params, cfg.seed + rank,
                                          progress=distributed.is_main(), compile=cfg.compile_decode) if mine else
                         ([], {"problems": 0, "samples": 0, "kept": 0, "problems_solved": 0}))
        if world > 1:  # every rank's traces, in problem order, and the summed counts
            everyone = [None] * world
            torch.distributed.all_gather_object(everyone, (traces, stats))
            traces = [t for part, _ in everyone for t in part]
            stats = {k: sum(s[k] for _, s in everyone) for k in stats}
        if not traces:
            raise TrainError(f"distill: the teacher {d.teacher} solved none of {len(problems)} problems "
                             f"in {d.samples} tries each; nothing to distill")
        stats["seconds"] = round(time.perf_counter() - t0, 2)
        if distributed.is_main():
            write_jsonl(held_out_path(traces_path), held_out)
            write_jsonl(traces_path, traces)
            write_json(stats_path, stats)
        distributed.barrier()
        print(f"distill: kept {stats['kept']} traces of {stats['samples']} samples "
              f"({stats['problems_solved']} of {stats['problems']} problems solved) -> {traces_path}")
    student = dataclasses.replace(cfg, stage="sft", data=[str(traces_path)], tasks=None,
                                  tokenizer=cfg.tokenizer or d.teacher)
    summary = lm.run(student)
    trace_seconds = json.loads(stats_path.read_text())["seconds"]
    return {**summary, "trace_seconds": trace_seconds, "seconds": summary["seconds"] + trace_seconds}
