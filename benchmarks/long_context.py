"""Context extension with YaRN, side by side: needle retrieval and decoding speed at L, 4L and 16L.

DeepSeek-V3 (section 4.3) pretrains at 4K, extends to 32K and then 128K with YaRN, and checks the result with
Needle-in-a-Haystack. Here, from a model pretrained at L tokens (default: the demo's `pretrain/model`, L = 256):

0. `base`: the model taught passkey retrieval at lengths up to L (`--base-steps` of training on passkey problems
   that fit in L), so that what fails beyond L is the length, not the task; evaluated as is (plain RoPE read past
   L);
1. `extended`: two phases as V3's, YaRN written into the config (`nanoseek extend`): factor 4 at 4L, then factor 16
   at 16L, each on the three longest passkey levels that fit its length (document windows: every problem read
   whole);
2. `plain RoPE`, the control: the same two phases, data and steps with RoPE left as it was (`extend.rope: plain`),
   so that what YaRN adds is told apart from what training at the longer lengths does;
3. evaluated greedily on the same held-out passkey problems at the longest level that fits in L, 4L and 16L, five
   needle depths each: `base` as is, `base + YaRN` (the extended config, no training), `extended` and `plain RoPE`;
4. how each phase's training began and ended, YaRN against the control: the loss on its first batch, the first
   step under 0.2 nats, the last 50 steps' mean;
5. decoding speed of the extended model on the absorbed latent cache after a prompt of each length (prefill and
   decode tokens/s), and the cache's bytes per token against the per-head cache it replaces.

The last line is the verdict, e.g. `needle retrieval at 16x: extended 96.0%, base 0.0%, ...`. Writes --out (JSON)
and a NIAH heat map beside it.

    python benchmarks/long_context.py [--base runs/demo/pretrain/model] [--length 256] [--steps 200 400]
                                      [--work runs/long-context] [--out runs/long-context.json] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

from nanoseek import Transformer
from nanoseek.cost import kv_cache_bytes_per_token
from nanoseek.data import write_jsonl
from nanoseek.engine import Engine
from nanoseek.evaluate import evaluate
from nanoseek.report import niah_figure
from nanoseek.rundir import read_metrics
from nanoseek.sampling import SamplingParams
from nanoseek.tasks.passkey import Passkey
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import run
from nanoseek.train.lm import with_yarn
from nanoseek.train.lm_data import chat_document
from nanoseek.train.recipe import load_config

PASSKEY = Passkey()


def fitting_levels(tok: Tokenizer, length: int) -> list[int]:
    """The passkey levels whose problems (prompt and answer) fit in `length` tokens."""
    levels = []
    for level in range(1, PASSKEY.max_difficulty + 1):
        p = PASSKEY.generate(random.Random(level), level)
        if len(chat_document(tok, p.prompt, p.solution)[0]) + 1 > length:
            break
        levels.append(level)
    return levels


def train(out: Path, init: str, levels: list[int], seq_len: int, steps: int, batch: int, seed: int,
          held_out: set[str], reuse: bool, **keys) -> Path:
    """Train on 1,000 passkey problems of each of `levels` (none held out) from `init`; returns the model directory
    (with `reuse`, the one a former run left there)."""
    if reuse and (out / "model" / "config.json").exists():
        return out / "model"
    rng = random.Random(seed)
    data = out.with_suffix(".jsonl")
    problems = (PASSKEY.generate(rng, level) for level in levels for _ in range(1000))
    write_jsonl(data, [p for p in problems if p.prompt not in held_out])
    shutil.rmtree(out, ignore_errors=True)
    run(load_config(None, {}, init=init, data=[str(data)], seq_len=seq_len, batch_size=batch, windows="documents",
                    max_steps=steps, warmup_steps=10, lr=1e-3, save_every=100000, eval_n=0, out=str(out), **keys))
    return out / "model"


def adaptation(metrics: Path, below: float = 0.2) -> dict:
    """How a phase's training began and ended: the LM loss of its first batch (before any update), the first step
    whose loss is under `below`, and the mean loss of its last 50 steps."""
    rows = read_metrics(metrics)
    return {"first_loss": rows[0]["lm_loss"], f"first_step_below_{below:g}": next(
        (r["step"] for r in rows if r["lm_loss"] < below), None),
        "last_50_loss": sum(r["lm_loss"] for r in rows[-50:]) / len(rows[-50:])}


def speed(model: Transformer, tok: Tokenizer, prompt_len: int, new_tokens: int = 64, repeats: int = 3) -> dict:
    """Prefill and decode tokens/s of one request of `prompt_len` tokens on the engine's latent cache, each the best
    of `repeats`: the engine's first step (prefill and the first token) timed apart from the decode steps after it."""
    ids = (tok.encode("The grass is green. ") * (prompt_len // 4 + 1))[:prompt_len]
    engine = Engine(model, tok, max_batch=1, max_len=prompt_len + new_tokens + 1)
    prefill, decode = float("inf"), float("inf")
    for _ in range(repeats):
        engine.submit(ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
        t0 = time.perf_counter()
        engine.step()
        t1 = time.perf_counter()
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
        prefill, decode = min(prefill, t1 - t0), min(decode, (time.perf_counter() - t1) / steps)
    return {"prompt_tokens": prompt_len, "prefill_tokens_per_s": prompt_len / prefill,
            "decode_tokens_per_s": 1 / decode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default="runs/demo/pretrain/model", help="a model pretrained at --length tokens")
    ap.add_argument("--length", type=int, default=256, help="L, the length the base was pretrained at")
    ap.add_argument("--base-steps", type=int, default=900)
    ap.add_argument("--steps", type=int, nargs=2, default=[200, 400], help="steps of the 4L and 16L phases")
    ap.add_argument("--problems", type=int, default=10, help="held-out problems per length and depth")
    ap.add_argument("--work", default="runs/long-context", help="where the trained models go")
    ap.add_argument("--out", default="runs/long-context.json")
    ap.add_argument("--reuse", action="store_true", help="use the models a former run left in --work")
    args = ap.parse_args()
    work, L = Path(args.work), args.length
    tok = Tokenizer.load(args.base)
    lengths = {"1x": L, "4x": 4 * L, "16x": 16 * L}
    levels = {k: fitting_levels(tok, n) for k, n in lengths.items()}
    if not levels["1x"]:
        raise SystemExit(f"error: no passkey problem fits in --length {L} tokens with {args.base}'s tokenizer")
    rng = random.Random(1234)  # the held-out problems: the longest level that fits each length
    problems = {k: [PASSKEY.generate(rng, levels[k][-1]) for _ in range(args.problems * 5)] for k in lengths}
    held_out = {p.prompt for ps in problems.values() for p in ps}
    base = train(work / "base", args.base, levels["1x"], L, args.base_steps, 8, 1, held_out, args.reuse)
    # each phase trains on its three longest levels: long documents, as V3's extension phases do
    phase1 = train(work / "extend-4x", str(base), levels["4x"][-3:], 4 * L, args.steps[0], 4, 2, held_out,
                   args.reuse, stage="extend", extend={"factor": 4, "original_length": L})
    extended = train(work / "extend-16x", str(phase1), levels["16x"][-3:], 16 * L, args.steps[1], 1, 3, held_out,
                     args.reuse, stage="extend", extend={"factor": 16})
    # the control: the same phases, data and steps with RoPE left as it was (what training at the length does alone)
    plain1 = train(work / "plain-4x", str(base), levels["4x"][-3:], 4 * L, args.steps[0], 4, 2, held_out,
                   args.reuse, stage="extend", extend={"factor": 4, "original_length": L, "rope": "plain"})
    plain = train(work / "plain-16x", str(plain1), levels["16x"][-3:], 16 * L, args.steps[1], 1, 3, held_out,
                  args.reuse, stage="extend", extend={"factor": 16, "original_length": L, "rope": "plain"})
    train_seconds = sum(row.get("seconds", 0.0) for phase in ("base", "extend-4x", "extend-16x")
                        for row in read_metrics(work / phase / "metrics.jsonl"))  # the steps' own seconds

    pretrained = Transformer.from_pretrained(base)
    as_is = Transformer(pretrained.cfg.replace(max_position_embeddings=16 * L))  # plain RoPE, read past L
    as_is.load_state_dict(pretrained.state_dict())
    yarn_cfg = load_config(None, {}, stage="extend", init=str(base), data=["-"], seq_len=16 * L,
                           extend={"factor": 16, "original_length": L})
    extended_model = Transformer.from_pretrained(extended).eval()
    models = {"base": as_is.eval(), "base + YaRN": with_yarn(pretrained, yarn_cfg).eval(), "extended": extended_model,
              "plain RoPE": Transformer.from_pretrained(plain).eval()}
    evals, results = {}, {}
    for name, model in models.items():
        results[name] = {}
        for k, ps in problems.items():
            r = evaluate(model, tok, ps, params=SamplingParams(max_new_tokens=12), batch_size=8, desc=f"{name}, {k}")
            results[name][k] = {"pass@1": r["pass@1"], "pass@1_se": r["pass@1_se"], "prompt_tokens": r["prompt_tokens"]}
            evals.setdefault(name, {"by_depth": {}, "by_task": {}})
            evals[name]["by_depth"].update(r["by_depth"])
            evals[name]["by_task"].update(r["by_task"])
    phases = {phase: adaptation(work / phase / "metrics.jsonl")
              for phase in ("extend-4x", "plain-4x", "extend-16x", "plain-16x")}
    speeds = {k: speed(extended_model, tok, n - 80) for k, n in lengths.items()}  # room for the new tokens
    cache = kv_cache_bytes_per_token(extended_model.cfg, 4)
    out = {"base_model": args.base, "length": L, "levels": levels, "train_seconds": train_seconds, "phases": phases,
           "retrieval": results, "speed": speeds, "cache_bytes_per_token": cache}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    niah_figure(evals).savefig(Path(args.out).with_suffix(".png"), dpi=120)

    print(f"passkey retrieval, greedy pass@1 +- se ({args.problems * 5} problems per length, 5 depths), "
          f"L = {L}; training {train_seconds / 60:.1f} min")
    print(f"{'':<14}" + "".join(f"{k + ' (' + str(results['extended'][k]['prompt_tokens']) + ' tok)':>22}"
                                 for k in lengths))
    for name, row in results.items():
        print(f"{name:<14}" + "".join(f"{row[k]['pass@1']:>15.1%} +- {row[k]['pass@1_se'] * 100:.1f}"
                                      for k in lengths))
    for phase, a in phases.items():
        print(f"{phase:<11} LM loss on its first batch {a['first_loss']:.2f}, under 0.2 from step "
              f"{a['first_step_below_0.2']}, last 50 steps {a['last_50_loss']:.3f}")
    for k, s in speeds.items():
        print(f"extended, {s['prompt_tokens']:>5}-token prompt: prefill {s['prefill_tokens_per_s']:,.0f} tok/s, "
              f"decode {s['decode_tokens_per_s']:,.0f} tok/s")
    slowdown = speeds["1x"]["decode_tokens_per_s"] / speeds["16x"]["decode_tokens_per_s"]
    print(f"decode at 16x is {slowdown:.2f}x slower per token than at 1x; cache per token (fp32): absorbed latent "
          f"{cache['mla_bytes']:,} B, per-head equivalent {cache['mha_bytes']:,} B")
    print(f"needle retrieval at 16x: extended {results['extended']['16x']['pass@1']:.1%}, base "
          f"{results['base']['16x']['pass@1']:.1%}, base + YaRN {results['base + YaRN']['16x']['pass@1']:.1%}, "
          f"trained without YaRN {results['plain RoPE']['16x']['pass@1']:.1%}")


if __name__ == "__main__":
    main()
