"""FP8 training against full precision where the loss has flattened (V3 section 3.3 and appendix B.1: FP8's loss
stays within 0.25% of BF16's).

1. The cpu-demo recipe (preset `mini`, the demo's model, by default) trained to the end of its cosine schedule,
   which decays to `--min-lr-ratio` (default 0) of the peak so that the run ends flat, with the same seeds in fp32,
   in FP8 (V3's fine-grained recipe: 1x128 activation tiles, 128x128 weight blocks, E4M3; emulated exactly on a
   CPU) and in BF16 (autocast, fp32 master weights: V3's baseline) where this machine runs BF16 matmuls at no more
   than 3x fp32's time (CPUs without BF16 instructions run them hundreds of times slower; the time the BF16 runs
   would take is printed instead). A seed sets the initial weights and the order of the batches; the data are the
   same for every run. A run's final loss is its mean training loss over the last 5% of steps; it has flattened
   when that differs by less than 1% from the mean over the 5% of steps before the last tenth. fp32's
   seed-to-seed spread (largest minus smallest final loss, relative) is the noise floor; FP8's gap is paired by
   seed (same weights, same batches: only the rounding differs). The last line is the verdict.
2. Real FP8 GEMMs on this machine: `--gemm-steps` steps of the FP8 run with `fp8_gemm: scaled_mm` (E4M3 operands
   through torch's row-wise `torch._scaled_mm`, one call per 128-wide K slice, fp32 sums) against the emulation
   (dequantised operands, one fp32 GEMM): the largest loss difference step by step and the seconds per step.
3. Checkpoint bytes: fp32, BF16 and FP8 (E4M3 weights with their block scales).

    python benchmarks/fp8_vs_fp32.py [--preset mini] [--steps 2000] [--seeds 2] [--gemm-steps 20]
                                     [--out runs/bench-fp8] [--resume]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer
from nanoseek.fp8 import E4M3
from nanoseek.rundir import write_json

from variants import train_variants

FLAT = 0.01  # the loss has flattened: the last tenth of the run moved it by less than 1%
AFFORDABLE = 3.0  # BF16 runs are trained where a BF16 step takes at most this many fp32 steps


def final_loss(rows: list[dict], key: str = "loss") -> tuple[float, float]:
    """The mean loss over the last 5% of steps, and its relative change from the 5% before the last tenth."""
    w = max(1, len(rows) // 20)
    last = sum(r[key] for r in rows[-w:]) / w
    before = rows[len(rows) - len(rows) // 10 - w:len(rows) - len(rows) // 10]
    return last, abs(last - sum(r[key] for r in before) / len(before)) / last


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def bf16_step_ratio(preset: str, repeats: int = 2) -> float:
    """Seconds of one forward and backward (8 x 256 tokens) under BF16 autocast over those in fp32, best of
    `repeats` each, on a fresh model of the preset."""
    model = Transformer(ModelConfig.from_preset(preset))
    ids = torch.randint(0, model.cfg.vocab_size, (8, 257))
    best = {}
    for bf16 in (False, True) * repeats:
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids[:, :-1]).logits
        F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        best[bf16] = min(best.get(bf16, float("inf")), time.perf_counter() - t0)
    return best[True] / best[False]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mini")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--min-lr-ratio", type=float, default=0.0)
    ap.add_argument("--tasks-n", type=int, default=40000)
    ap.add_argument("--gemm-steps", type=int, default=20)
    ap.add_argument("--out", default="runs/bench-fp8")
    ap.add_argument("--resume", action="store_true", help="continue the runs that --out holds (a killed benchmark)")
    args = ap.parse_args()

    out = Path(args.out)
    settings = dict(preset=args.preset, max_steps=args.steps, min_lr_ratio=args.min_lr_ratio, tasks_n=args.tasks_n,
                    save_every=max(1, args.steps // 5), keep_last=1)
    bf16_ratio = bf16_step_ratio(args.preset)
    kinds = {"fp32": dict(precision="fp32"), "fp8": dict(precision="fp32", fp8=True)}
    if bf16_ratio <= AFFORDABLE:
        kinds["bf16"] = dict(precision="bf16")
    variants = {f"{k} seed {s}": dict(seed=s, **change) for s in range(args.seeds) for k, change in kinds.items()}
    runs = train_variants(variants, out / "runs", resume=args.resume, **settings)
    results = {}
    for name, (_, rows) in runs.items():
        loss, change = final_loss(rows)
        results[name] = {"loss": loss, "lm_loss": final_loss(rows, "lm_loss")[0], "last_tenth_change": change,
                         "seconds_per_step": sorted(r["seconds"] for r in rows)[len(rows) // 2]}

    def gaps(kind: str, base: str) -> list[float]:
        """kind's relative loss difference from base, seed by seed."""
        return [results[f"{kind} seed {s}"]["loss"] / results[f"{base} seed {s}"]["loss"] - 1
                for s in range(args.seeds)]

    fp32 = [results[f"fp32 seed {s}"]["loss"] for s in range(args.seeds)]
    spread = (max(fp32) - min(fp32)) / (sum(fp32) / len(fp32))
    by_seed = {f"{k}_vs_{b}": gaps(k, b) for k, b in (("fp8", "fp32"), ("fp8", "bf16"), ("bf16", "fp32"))
               if b in kinds and k in kinds}
    gap = sum(by_seed["fp8_vs_fp32"]) / args.seeds
    gap_se = statistics.stdev(by_seed["fp8_vs_fp32"]) / math.sqrt(args.seeds) if args.seeds > 1 else float("nan")
    flat = all(r["last_tenth_change"] < FLAT for r in results.values())

    # 2. real FP8 GEMMs (torch._scaled_mm) against the emulation, from the same seed on the same data
    first = runs["fp32 seed 0"][0]
    gemm_runs = train_variants({g: dict(fp8=True, fp8_gemm=g) for g in ("emulated", "scaled_mm")}, out / "gemm",
                               data_from=first, **{**settings, "max_steps": args.gemm_steps,
                                                   "save_every": args.gemm_steps})
    (_, emulated), (_, real) = gemm_runs.values()
    gemm = {"steps": args.gemm_steps,
            "max_loss_difference": max(abs(a["loss"] - b["loss"]) for a, b in zip(emulated, real)),
            "seconds_per_step": {g: sorted(r["seconds"] for r in rows)[len(rows) // 2]
                                 for g, (_, rows) in gemm_runs.items()}}

    fp32_minutes = sum(r["seconds"] for r in runs["fp32 seed 0"][1]) / 60
    model = Transformer.from_pretrained(first / "model")

    # 3. checkpoint bytes
    model.save_pretrained(out / "fp8-checkpoint", dtype=E4M3)
    model.save_pretrained(out / "bf16-checkpoint", dtype=torch.bfloat16)
    sizes = {"fp32": checkpoint_bytes(first / "model"), "bf16": checkpoint_bytes(out / "bf16-checkpoint"),
             "fp8": checkpoint_bytes(out / "fp8-checkpoint")}

    summary = {"preset": args.preset, "steps": args.steps, "min_lr_ratio": args.min_lr_ratio, "runs": results,
               "relative_loss_difference": gap, "relative_loss_difference_se": gap_se,
               "relative_loss_difference_by_seed": by_seed,
               "fp32_seed_spread": spread, "flattened": flat, "scaled_mm_vs_emulated": gemm,
               "bf16_step_time_ratio": bf16_ratio, "checkpoint_bytes": sizes}
    write_json(out / "fp8.json", summary)
    print(f"\n{args.preset} preset, {args.steps} steps (cosine to {args.min_lr_ratio:g} of the peak lr); final loss = "
          f"mean of the last 5% of steps; last tenth = its change from the 5% before the last tenth")
    for name, r in results.items():
        print(f"  {name:<12} loss {r['loss']:.4f} (LM {r['lm_loss']:.4f})  last tenth {r['last_tenth_change']:.2%}  "
              f"median {r['seconds_per_step']:.3f} s/step")
    for pair, values in by_seed.items():
        print(f"  {pair.replace('_', ' ')} by seed: {', '.join(f'{g:+.3%}' for g in values)}")
    print(f"  fp32 seed-to-seed spread: {spread:.3%}")
    if "bf16" not in kinds:
        print(f"  BF16: a step takes {bf16_ratio:.0f}x fp32's on this CPU, so each run would take "
              f"{fp32_minutes * bf16_ratio / 60:.1f} h instead of {fp32_minutes:.0f} min: not run here")
    sec = gemm["seconds_per_step"]
    print(f"  real FP8 GEMMs (torch._scaled_mm by K slice) vs emulation, {args.gemm_steps} steps: largest loss "
          f"difference {gemm['max_loss_difference']:.2e}; {sec['scaled_mm']:.3f} vs {sec['emulated']:.3f} s/step "
          f"({sec['scaled_mm'] / sec['emulated']:.2f}x)")
    print(f"  checkpoint bytes: fp32 {sizes['fp32']:,}  bf16 {sizes['bf16']:,}  fp8 {sizes['fp8']:,} "
          f"({sizes['fp8'] / sizes['fp32']:.2f}x fp32; embedding, heads, gates and norms stay high precision)")
    yes = {True: "yes", False: "no"}
    within = max(map(abs, by_seed["fp8_vs_fp32"])) <= spread
    print(f"FP8 vs fp32 after {args.steps} steps: {gap:+.3%} +- {gap_se:.3%} (fp32 seed spread {spread:.3%}); "
          f"within V3's 0.25%: {yes[abs(gap) <= 0.0025]}; within the spread: {yes[within]}; flattened: {yes[flat]}")

if __name__ == "__main__":
    main()
