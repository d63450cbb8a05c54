"""Evaluation on task problems: K samples per prompt from the engine, scored by each family's verifier.

Per problem, with n samples of which c score full credit:

    pass@1   c / n
    pass@k   the unbiased estimator of Chen et al. 2021, 1 - C(n - c, k) / C(n, k), for k = 2, 4, 8, ... up to n:
             how far sampling reaches, the headroom reinforcement learning can turn into pass@1
    maj@k    1 if the most frequent (normalised) <answer> among the samples scores full credit
    accuracy the mean verifier score (partial credit counted)
    format   the share of samples in the `<think> ... </think> <answer> ... </answer>` format (R1's format reward)
    thinking the share of samples whose `<think>` block holds worked steps (not empty)

and the mean completion and prompt lengths in tokens; each metric is then averaged over the problems of a task
family, of a `family/difficulty` pair, and of the whole set; problems with a needle's `depth` (passkey retrieval)
also per `family/difficulty/depth` (`by_depth`, the NIAH grid). `pass@1_se` is the standard error of pass@1 over the
problems (the spread of per-problem pass@1 / sqrt(problems)), and the report keeps every problem's pass@1
(`per_problem`, in order) so two evaluations on the same problems can be compared pairwise (`paired_gain`).
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import asdict, replace
from pathlib import Path

from tqdm import tqdm

from .data import build_corpus, read_jsonl
from .engine import Completion, Engine
from .errors import DataError, TaskError
from .rewards import format_reward, thinks
from .sampling import SamplingParams
from .tasks import Mixture, MixtureEntry, Problem, extract_answer, get_family, resolve_recipe
from .tokenizer import Tokenizer

N_EXAMPLES = 3  # completions kept in the report


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) as a product (no huge binomials)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def normalize_answer(answer: str) -> str:
    """The form answers are compared in for majority voting: case-folded, whitespace collapsed, none around commas."""
    return ", ".join(" ".join(part.split()) for part in answer.casefold().split(","))


def majority_index(answers: list[str | None]) -> int | None:
    """The index of the first sample holding the most frequent normalised answer (ties: the one seen first);
    None when no sample has an answer."""
    keys = [None if a is None else normalize_answer(a) for a in answers]
    votes = Counter(k for k in keys if k is not None)
    return keys.index(votes.most_common(1)[0][0]) if votes else None


def task_problems(tasks: str, n: int, seed: int = 0, difficulty: tuple[int, int] | None = None) -> list[Problem]:
    """n distinct problems, drawn with `seed`, from a recipe (file or shipped name) or comma-separated families
    (all their levels unless `difficulty` (low, high) is given; it also overrides a recipe's levels)."""
    try:
        recipe = resolve_recipe(tasks)
    except TaskError:
        recipe = None
    if recipe is not None:
        entries = Mixture.from_recipe(recipe).entries
    else:
        try:
            entries = [MixtureEntry(name, (1, get_family(name).max_difficulty)) for name in tasks.split(",")]
        except TaskError as e:
            raise TaskError(f"--tasks {tasks!r}: no recipe of that name, and {e}") from None
    if difficulty is not None:
        entries = [replace(e, difficulty=difficulty) for e in entries]
    # every problem goes to the held-out side, which keeps those without worked solutions
    return build_corpus(Mixture(entries, f"--tasks {tasks}"), n, n, seed=seed, progress=False).held_out


def load_problems(path: str | Path) -> list[Problem]:
    """Problems of a JSONL corpus (e.g. a run's `corpus-held-out.jsonl`), their families checked."""
    try:
        problems = read_jsonl(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
        raise DataError(f"{path}: not a problem JSONL (one object per line with prompt, answer and meta "
                        f"holding family and difficulty): {type(e).__name__}: {e}") from None
    if not problems:
        raise DataError(f"{path}: no problems")
    for i, p in enumerate(problems):
        meta = p.meta if isinstance(p.meta, dict) else {}
        if not (isinstance(meta.get("family"), str) and isinstance(meta.get("difficulty"), int)):
            raise DataError(f"{path}: problem {i}: meta needs a family name and an integer difficulty")
        try:
            get_family(p.family)
        except TaskError as e:
            raise DataError(f"{path}: problem {i}: {e}") from None
    return problems


def ks(n: int) -> list[int]:
    """The k of the pass@k curve for n samples: 1, 2, 4, ... and n itself."""
    return sorted({2 ** i for i in range(n.bit_length()) if 2 ** i <= n} | {n})


def problem_metrics(problem: Problem, texts: list[str], lengths: list[int]) -> dict[str, float]:
    """The metrics above for one problem's n completions (texts) and their lengths in tokens."""
    n = len(texts)
    judged = [get_family(problem.family).judge(problem, t) for t in texts]
    correct = sum(score == 1.0 for score, _ in judged)
    vote = majority_index([extract_answer(t) for t in texts])
    return {"accuracy": sum(score for score, _ in judged) / n,
            **{f"pass@{k}": pass_at_k(n, correct, k) for k in ks(n)},
            f"maj@{n}": float(vote is not None and judged[vote][0] == 1.0),
            "format_rate": sum(format_reward(t).value for t in texts) / n,
            "thinking_rate": sum(map(thinks, texts)) / n,
            "answer_rate": sum(reason != "no-answer" for _, reason in judged) / n,
            "mean_tokens": sum(lengths) / n}


def standard_error(values: list[float]) -> float:
    """The standard error of the mean of `values` (0 for fewer than two)."""
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def paired_gain(after: dict, before: dict) -> tuple[float, float] | None:
    """pass@1 of `after` minus `before` and its paired standard error, from their `per_problem` scores on the same
    problems (None when either lacks them or they differ in number)."""
    a, b = after.get("per_problem"), before.get("per_problem")
    if not (isinstance(a, list) and isinstance(b, list) and a and len(a) == len(b)):
        return None
    diffs = [x - y for x, y in zip(a, b)]
    return sum(diffs) / len(diffs), standard_error(diffs)


def evaluate(model, tok: Tokenizer, problems: list[Problem], samples: int = 1, params: SamplingParams | None = None,
             seed: int = 0, speculative: bool = False, batch_size: int = 128, progress: bool = True,
             compile: bool = False, desc: str = "eval") -> dict:
    """Sample `samples` completions per problem (request seeds drawn from `seed`) and score them: the metrics
    above overall (top level), `by_family` and `by_task` (`family/difficulty`), plus a few examples."""
    params = params or SamplingParams()
    engine, groups = sample_completions(model, tok, problems, samples, params, seed, speculative, batch_size, progress,
                                        desc, compile)
    report = grade(problems, groups, samples=samples, seed=seed, sampling=asdict(params))
    if speculative:
        report["acceptance_rate"] = engine.acceptance_rate
    if compile:
        report["compile_seconds"] = engine.warmup_seconds
    return report


def grade(problems: list[Problem], groups: list[list[Completion]], **info) -> dict:
    """Each problem's completions scored: the metrics above overall (top level, then `info`), `per_problem` pass@1,
    `by_family` and `by_task` (`family/difficulty`), plus a few examples."""
    per_problem, by_family, by_task, by_depth = [], defaultdict(list), defaultdict(list), defaultdict(list)
    for p, completions in zip(problems, groups):
        metrics = problem_metrics(p, [c.text for c in completions], [len(c.token_ids) for c in completions])
        metrics["prompt_tokens"] = len(completions[0].prompt_ids)
        per_problem.append(metrics)
        by_family[p.family].append(metrics)
        by_task[f"{p.family}/{p.difficulty}"].append(metrics)
        if "depth" in p.meta:  # needle-in-a-haystack problems: read by length and depth
            by_depth[f"{p.family}/{p.difficulty}/{p.meta['depth']:g}"].append(metrics)
    return {**_mean(per_problem), **info, "per_problem": [round(m["pass@1"], 4) for m in per_problem],
            "by_family": {k: _mean(v) for k, v in sorted(by_family.items())},
            "by_task": {k: _mean(v) for k, v in sorted(by_task.items())},
            **({"by_depth": {k: _mean(v) for k, v in by_depth.items()}} if by_depth else {}),
            "examples": [{"prompt": problems[i].prompt, "completion": groups[i][0].text,
                          "answer": problems[i].answer} for i in range(min(N_EXAMPLES, len(problems)))]}


def sample_completions(model, tok: Tokenizer, problems: list[Problem], samples: int, params: SamplingParams,
                       seed: int = 0, speculative: bool = False, batch_size: int = 128, progress: bool = True,
                       desc: str = "eval", compile: bool = False) -> tuple[Engine, list[list[Completion]]]:
    """`samples` completions of each problem's chat prompt, request seeds drawn from `seed`; grouped per problem.
    `compile`: the Engine's compiled decode step (its warm-up seconds in `engine.warmup_seconds`)."""
    if samples < 1 or not problems:
        raise TaskError(f"{desc}: needs problems and samples >= 1, got {len(problems)} and {samples}")
    prompts = [tok.apply_chat_template([{"role": "user", "content": p.prompt}], add_generation_prompt=True)
               for p in problems]
    max_len = min(model.cfg.max_position_embeddings, max(map(len, prompts)) + params.max_new_tokens + 1)
    engine = Engine(model, tok, max_batch=batch_size, max_len=max_len, speculative=speculative, compile=compile)
    rng = random.Random(seed)
    requests = [engine.submit(ids, replace(params, seed=rng.getrandbits(62))) for ids in prompts
                for _ in range(samples)]
    run_engine(engine, len(requests), desc, progress)
    return engine, [requests[i * samples:(i + 1) * samples] for i in range(len(problems))]


def run_engine(engine: Engine, total: int, desc: str, progress: bool = True) -> None:
    """Step the engine until every submitted request is done, with a progress bar of finished requests."""
    with tqdm(total=total, desc=desc, unit="completion", disable=not progress) as bar:
        while engine.has_work():
            bar.update(sum(e.finished for e in engine.step()))


def greedy_accuracy(model, tok: Tokenizer, problems: list[Problem], max_new_tokens: int = 160,
                    batch_size: int = 32) -> dict:
    """Greedy pass@1 (one sample per problem), as a training run's final evaluation reports it."""
    return evaluate(model, tok, problems, params=SamplingParams(max_new_tokens=max_new_tokens),
                    batch_size=batch_size, progress=False)


def _mean(rows: list[dict]) -> dict:
    return {"n": len(rows), **{key: sum(r[key] for r in rows) / len(rows) for key in rows[0]},
            "pass@1_se": standard_error([r["pass@1"] for r in rows])}


def format_table(report: dict) -> str:
    """The report as a text table: one row per family/difficulty, then the whole set."""
    n = report["samples"]
    voted = [*(f"pass@{k}" for k in ks(n)[1:]), f"maj@{n}"] if n > 1 else []
    columns = {"n": "n", "pass@1": "pass@1", "pass@1_se": "± se", **{c: c for c in voted},
               "thinking_rate": "thinking", "format_rate": "format", "mean_tokens": "tokens"}
    rows = [*report["by_task"].items(), ("all", report)]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'task':<{width}}" + "".join(f"{label:>9}" for label in columns.values())]
    for name, r in rows:
        cells = [f"{'-':>9}" if r.get(c) is None else f"{r[c]:>9,}" if c == "n" else
                 f"{r[c]:>9.1f}" if c == "mean_tokens" else f"{r[c]:>9.1%}" for c in columns]
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)
