"""nanoseek's GRPO vs TRL's `GRPOTrainer`: the same model, prompts, reward and settings, one after the other in one
process. Reports seconds per step, completion tokens/s, reward per step, total wall time, and how long each takes to
first reach a reward both reach. The goals: a quarter of TRL's seconds per step, and that reward in at most a
quarter of TRL's wall time on CPU (loading, and with --compile-decode the decode graphs' warm-up, included).

    python benchmarks/grpo_vs_trl.py [--base DIR] [--steps 10] [--group-size 8] [--prompts-per-step 4] \\
        [--max-new-tokens 64] [--lr 3e-4] [--threads 1] [--compile-decode] [--out FILE.json]

The model is a nanoseek directory (Hugging Face DeepseekV3: TRL loads it with `AutoModelForCausalLM`, its tokenizer
with `AutoTokenizer`). `--base DIR` takes DIR (or DIR/model) if it holds one, e.g. a pipeline run's
`runs/demo/pretrain/model`; otherwise the `cpu-demo` recipe pretrains one into DIR first (`--pretrain-steps`,
a few minutes) and later runs reuse it. Nothing is downloaded.

Both sides get: the prompts of the `--tasks` mixture drawn with `--seed` (nanoseek's rollout order), chat-formatted
by the model's template (checked to tokenize identically); the reward `nanoseek.rewards.combined_reward` with
the default RewardConfig (TinyZero's: 1 if right, 0.1 if well-formed); G samples for each of P prompts per step,
temperature sampling (no top-k/top-p), at most `--max-new-tokens`; one policy update per batch (num_iterations 1,
so the ratio is 1 in value), beta 0 (no reference model), clip 0.2, loss "grpo" on both sides (per-sequence token
mean, then the mean over sequences; TRL `loss_type="grpo"`, rewards scaled by the group's std, `scale_rewards=
"group"`), truncated completions masked (TRL `mask_truncated_completions=True`); AdamW (0.9, 0.95), eps 1e-8,
weight decay 0.1, gradient clip 1.0, constant learning rate without warmup. The gate-bias update is off on the
nanoseek side (TRL has none), fp32 on the CPU, no gradient checkpointing, `--threads` threads for both.

Times: "wall" runs from loading the model to the saved result (nanoseek: `grpo.run`, which also times the matmul
peak for MFU and writes a checkpoint; TRL: building the `GRPOTrainer`, `train()`, `save_model`). Seconds per step are
the gaps between consecutive step ends, the first step left out. The threshold is the lower of the two final
rewards (each the mean of the last `--last` steps); a run reaches it at the first step whose mean reward over the
last `--last` steps is at least that; the time is counted from the start of its wall time.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from nanoseek import Transformer
from nanoseek.rewards import RewardConfig, combined_reward
from nanoseek.tasks import Mixture, Problem
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import grpo, trainer
from nanoseek.train.trainer import Trainer
from nanoseek.train.recipe import load_config


def base_model(path: Path, preset: str, steps: int, tasks_n: int, seed: int) -> Path:
    """DIR or DIR/model if it is a model directory; else pretrain one there with the cpu-demo recipe."""
    for d in (path, path / "model"):
        if (d / "config.json").is_file():
            return d
    from nanoseek.train.lm import run
    print(f"no model in {path}: pretraining one ({preset} preset, {steps} steps of the cpu-demo recipe)")
    run(load_config("cpu-demo", {"preset": preset, "max_steps": steps, "tasks_n": tasks_n, "eval_n": 0,
                                 "save_every": steps, "out": str(path), "seed": seed}))
    return path / "model"


def problems_in_order(tasks: str, n: int, seed: int) -> list[Problem]:
    """The prompts nanoseek's RolloutSource draws, in its order (no held-out set, no dynamic sampling)."""
    mixture, rng = Mixture.from_recipe(tasks), random.Random(seed)
    return [mixture.sample(rng) for _ in range(n)]


def rolling_first(rewards: list[float], k: int, threshold: float) -> int | None:
    """The first step index at which the mean of the last k rewards (fewer at the start) reaches the threshold."""
    for i in range(len(rewards)):
        window = rewards[max(0, i - k + 1):i + 1]
        if sum(window) / len(window) >= threshold - 1e-12:
            return i
    return None


def run_nanoseek(args, base: Path, out: Path) -> dict:
    cfg = load_config(None, {}, stage="grpo", init=str(base), tasks=args.tasks, data=[], eval_n=0, device="cpu",
                      group_size=args.group_size, prompts_per_step=args.prompts_per_step, max_steps=args.steps,
                      lr=args.lr, warmup_steps=0, schedule="wsd", decay_fraction=0.0, weight_decay=0.1,
                      grad_clip=1.0, max_new_tokens=args.max_new_tokens, temperature=args.temperature, beta=0.0,
                      num_iterations=1, loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2, mask_truncated=True,
                      bias_gamma=0.0, save_every=args.steps, keep_last=1, seed=args.seed, out=str(out),
                      compile_decode=args.compile_decode)
    ends, prompts = [], []
    original_step, original_problems = Trainer.train_step, grpo.RolloutSource.problems

    def timed_step(self):
        row = original_step(self)
        ends.append(time.perf_counter())
        return row

    def recorded_problems(self, n):
        drawn = original_problems(self, n)
        prompts.extend(p.prompt for p in drawn)
        return drawn

    peak_seconds = []
    original_peak = trainer.matmul_peak

    def timed_peak(device):
        t0 = time.perf_counter()
        try:
            return original_peak(device)
        finally:
            peak_seconds.append(time.perf_counter() - t0)

    Trainer.train_step, grpo.RolloutSource.problems, trainer.matmul_peak = timed_step, recorded_problems, timed_peak
    try:
        start = time.perf_counter()
        grpo.run(cfg)
        wall = time.perf_counter() - start
    finally:
        Trainer.train_step, grpo.RolloutSource.problems = original_step, original_problems
        trainer.matmul_peak = original_peak
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"start": start, "ends": ends, "wall": wall, "peak_seconds": sum(peak_seconds), "prompts": prompts,
            "rewards": [r["reward"] for r in rows], "accuracy": [r["accuracy"] for r in rows],
            "completion_tokens": [r["response_length"] * args.prompts_per_step * args.group_size for r in rows]}


def run_trl(args, base: Path, problems: list[Problem], out: Path) -> dict:
    import datasets
    import transformers
    from trl import GRPOConfig, GRPOTrainer

    tok = Tokenizer.load(base)  # decodes completions exactly as the Engine does (special tokens kept)
    rewards_config = RewardConfig()
    steps: list[dict] = []
    seen: list[str] = []

    def reward(prompts, completions, completion_ids, problem, **kwargs):
        seen.extend(json.loads(p)["prompt"] for p in problem[::args.group_size])
        texts = [tok.decode(ids[:-1] if ids and ids[-1] == tok.eos_id else ids) for ids in completion_ids]
        results = [combined_reward(Problem.from_dict(json.loads(p)), t, rewards_config)
                   for p, t in zip(problem, texts)]
        steps.append({"reward": sum(r.value for r in results) / len(results),
                      "accuracy": sum(r.components["accuracy"].value == 1.0 for r in results) / len(results),
                      "completion_tokens": sum(map(len, completion_ids))})
        return [r.value for r in results]

    class StepEnds(transformers.TrainerCallback):
        def __init__(self):
            self.ends = []

        def on_step_end(self, *a, **kw):
            self.ends.append(time.perf_counter())

    renamed = "activation_checkpointing" in GRPOConfig.__dataclass_fields__  # transformers' new name
    no_checkpointing = {"activation_checkpointing" if renamed else "gradient_checkpointing": False}  # TRL: on
    dataset = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": p.prompt}],
                                           "problem": json.dumps(p.to_dict())} for p in problems])
    config = GRPOConfig(
        output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.prompts_per_step * args.group_size,
        gradient_accumulation_steps=1, num_generations=args.group_size, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        beta=0.0, num_iterations=1, epsilon=0.2, loss_type="grpo", scale_rewards="group",
        mask_truncated_completions=True, shuffle_dataset=False, use_vllm=False, use_cpu=True, bf16=False, fp16=False,
        report_to="none", logging_steps=1, save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        seed=args.seed, data_seed=args.seed, **no_checkpointing)
    callback = StepEnds()
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    processing = transformers.AutoTokenizer.from_pretrained(str(base))
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=processing, callbacks=[callback])
    trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # its per-step dicts; we print a table
    trainer.train()
    trainer.save_model(str(out / "model"))
    wall = time.perf_counter() - start
    return {"start": start, "ends": callback.ends, "wall": wall, "prompts": seen,
            "rewards": [s["reward"] for s in steps],
            "accuracy": [s["accuracy"] for s in steps], "completion_tokens": [s["completion_tokens"] for s in steps]}


def check_prompts(base: Path, problems: list[Problem]) -> None:
    """TRL renders conversational prompts with the tokenizer's chat template; nanoseek with its own Tokenizer."""
    import transformers
    ours, theirs = Tokenizer.load(base), transformers.AutoTokenizer.from_pretrained(str(base))
    for p in problems:
        messages = [{"role": "user", "content": p.prompt}]
        a = ours.apply_chat_template(messages, add_generation_prompt=True)
        b = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        if a != list(b["input_ids"]):
            raise SystemExit(f"the two tokenizers disagree on the prompt {p.prompt!r}: {a} vs {list(b['input_ids'])}")


def summarise(r: dict, k: int) -> dict:
    gaps = [b - a for a, b in zip(r["ends"], r["ends"][1:])]
    first = r["ends"][0] - r["start"] if r["ends"] else float("nan")
    per_step = statistics.mean(gaps) if gaps else first
    tokens = r["completion_tokens"][1:] if gaps else r["completion_tokens"]
    return {"seconds_per_step": per_step, "first_step_seconds": first,
            "completion_tokens_per_s": sum(tokens) / sum(gaps) if gaps else tokens[0] / first,
            "final_reward": statistics.mean(r["rewards"][-k:]), "final_accuracy": statistics.mean(r["accuracy"][-k:]),
            "rewards": [round(x, 4) for x in r["rewards"]], "wall_seconds": r["wall"],
            "matmul_peak_seconds": r.get("peak_seconds")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/bench/grpo-base", help="model directory, or where to pretrain one")
    ap.add_argument("--preset", default="small", help="architecture of a model pretrained here")
    ap.add_argument("--pretrain-steps", type=int, default=200)
    ap.add_argument("--pretrain-tasks-n", type=int, default=6000)
    ap.add_argument("--tasks", default="tasks-cpu-demo")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--last", type=int, default=3, help="final reward: the mean over this many last steps")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile-decode", action="store_true", help="nanoseek's rollouts through the compiled decode "
                    "step (compiled before the first step: counted in the wall time and in `load + first step`)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import datasets
    import transformers
    import trl

    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renames, met inside TRL
    transformers.logging.set_verbosity_error()  # it ignores nanoseek's MTP layer by design; no load report
    datasets.disable_progress_bars()
    base = base_model(Path(args.base), args.preset, args.pretrain_steps, args.pretrain_tasks_n, args.seed)
    problems = problems_in_order(args.tasks, args.steps * args.prompts_per_step, args.seed)
    check_prompts(base, problems)
    transformers.AutoModelForCausalLM.from_pretrained(str(base))  # warm-up: lazy imports, file cache
    Transformer.from_pretrained(base)

    with tempfile.TemporaryDirectory() as tmp:
        print(f"nanoseek GRPO: {args.steps} steps")
        ours = run_nanoseek(args, base, Path(tmp) / "nanoseek")
        print(f"TRL {trl.__version__} GRPOTrainer: {args.steps} steps")
        theirs = run_trl(args, base, problems, Path(tmp) / "trl")

    if not ours["prompts"] == theirs["prompts"] == [p.prompt for p in problems]:
        raise SystemExit("the two runs saw different prompts")
    k = min(args.last, args.steps)
    res = {"nanoseek": summarise(ours, k), "trl": summarise(theirs, k)}
    threshold = min(res["nanoseek"]["final_reward"], res["trl"]["final_reward"])
    for name, r in (("nanoseek", ours), ("trl", theirs)):
        i = rolling_first(r["rewards"], k, threshold)
        res[name]["seconds_to_threshold"] = r["ends"][i] - r["start"] if i is not None else None
        res[name]["steps_to_threshold"] = i + 1 if i is not None else None
    wall_ratio = res["trl"]["wall_seconds"] / res["nanoseek"]["wall_seconds"]
    to_threshold = (res["trl"]["seconds_to_threshold"] / res["nanoseek"]["seconds_to_threshold"]
                    if res["trl"]["seconds_to_threshold"] and res["nanoseek"]["seconds_to_threshold"] else None)
    step_ratio = res["trl"]["seconds_per_step"] / res["nanoseek"]["seconds_per_step"]

    params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(str(base)).parameters())
    print(f"\nGRPO on {base} ({params / 1e6:.1f}M parameters without MTP), tasks {args.tasks}: {args.steps} steps of "
          f"{args.prompts_per_step} prompts x {args.group_size} samples, <= {args.max_new_tokens} new tokens, "
          f"T {args.temperature}, lr {args.lr}, beta 0, loss grpo (TRL {trl.__version__}: loss_type='grpo', "
          f"scale_rewards='group'), {args.threads} thread(s), CPU fp32; both saw the same prompts in the same order")
    rows = [("seconds per step (mean, steps 2+)", "seconds_per_step", "{:.2f}"),
            ("load + first step, s", "first_step_seconds", "{:.2f}"),
            ("completion tokens/s (steps 2+)", "completion_tokens_per_s", "{:.0f}"),
            (f"reward, mean of last {k} steps", "final_reward", "{:.3f}"),
            (f"accuracy, mean of last {k} steps", "final_accuracy", "{:.3f}"),
            ("total wall time, s (load to saved)", "wall_seconds", "{:.1f}"),
            ("  of which timing the matmul peak (MFU)", "matmul_peak_seconds", "{:.1f}"),
            (f"time to reward >= {threshold:.3f}, s", "seconds_to_threshold", "{:.1f}"),
            (f"steps to reward >= {threshold:.3f}", "steps_to_threshold", "{}")]
    print(f"{'':<40}{'nanoseek':>12}{'TRL':>12}")
    for label, key, fmt in rows:
        cells = [fmt.format(res[n][key]) if res[n][key] is not None else "-" for n in ("nanoseek", "trl")]
        print(f"{label:<40}{cells[0]:>12}{cells[1]:>12}")
    for n, label in (("nanoseek", "nanoseek"), ("trl", "TRL")):
        print(f"reward per step, {label:<9} " + " ".join(f"{x:.3f}" for x in res[n]["rewards"]))
    print(f"TRL / nanoseek: wall time {wall_ratio:.2f}x, seconds per step {step_ratio:.2f}x, time to the threshold "
          + (f"{to_threshold:.2f}x" if to_threshold else "-"))
    ratio = to_threshold or wall_ratio

    def verdict(x: float) -> str:
        return "meets the 4x goal" if x >= 4 else "short of the 4x goal"
    print(f"verdict: seconds per step 1/{step_ratio:.2f} of TRL's ({verdict(step_ratio)}); reward {threshold:.3f} "
          f"in 1/{ratio:.2f} of TRL's wall time, loading and compiling included ({verdict(ratio)})")
    if args.out:
        result = {**vars(args), "base": str(base), "parameters": params, "trl_version": trl.__version__,
                  "threshold": threshold, "wall_ratio": wall_ratio, "step_ratio": step_ratio,
                  "threshold_time_ratio": to_threshold, "results": res}
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
