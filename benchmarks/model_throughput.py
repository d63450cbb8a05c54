"""nanoseek vs transformers' DeepseekV3 on one machine, in one run: training-step tokens/s and MFU.

Both models are built from the same config and the same weights (nanoseek's, loaded into transformers through an
HF directory), see the same batches, and take turns step by step so that machine noise hits both alike. MFU is
measured against this machine's fp32 matmul peak, timed in the same run. The training step is forward + backward +
AdamW on the next-token loss (MTP off on both sides, since transformers has no MTP; a last row adds our MTP loss).
Transformers runs twice: with its default grouped_mm experts and with its per-expert loop (`experts_implementation`
"eager"). A second copy of nanoseek's model runs through `torch.compile` (the `compile: true` training setting);
its first step, where it compiles, is timed apart and reported as warm-up. Decoding is compared in
benchmarks/decode.py.

    python benchmarks/model_throughput.py [--preset small] [--batch 8] [--seq 256] [--steps 6] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time

import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer
from nanoseek.cost import flops_per_token, matmul_peak


def lm_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


def nanoseek_step(model, opt, ids, mtp: bool):
    out = model(ids, return_mtp=mtp)
    loss = lm_loss(out.logits, ids)
    for k, logits in enumerate(out.mtp_logits, start=1):  # depth k predicts token i + k + 1
        loss = loss + 0.3 / len(out.mtp_logits) * F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, k + 1:].flatten())
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def hf_step(model, opt, ids):
    lm_loss(model(ids).logits, ids).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def timed_interleaved(runs: dict, steps: int) -> dict[str, float]:
    """Median seconds per call for each named callable, calling them in turn `steps` times after one warm-up each."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(steps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()  # it ignores our MTP layer by design; no load report

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    ours = Transformer(cfg)
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32)  # grouped_mm experts
        hf_loop = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32,
                                                                     experts_implementation="eager")
    compiled = copy.deepcopy(ours)
    models = (ours, compiled, hf, hf_loop)
    for m in models:
        m.train()
    opts = {m: torch.optim.AdamW(m.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1) for m in models}
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))

    compiled_forward = torch.compile(compiled)
    t0 = time.perf_counter()
    nanoseek_step(compiled_forward, opts[compiled], ids, mtp=False)
    warmup = time.perf_counter() - t0

    peak = matmul_peak()
    flops = flops_per_token(cfg, args.seq)
    train_flops = {"nanoseek": flops["training"], "nanoseek, compiled": flops["training"],
                   "transformers": flops["training"],
                   "transformers, expert loop": flops["training"], "nanoseek+MTP": flops["training"] + flops["mtp_training"]}
    secs = timed_interleaved({
        "nanoseek": lambda: nanoseek_step(ours, opts[ours], ids, mtp=False),
        "nanoseek, compiled": lambda: nanoseek_step(compiled_forward, opts[compiled], ids, mtp=False),
        "transformers": lambda: hf_step(hf, opts[hf], ids),
        "transformers, expert loop": lambda: hf_step(hf_loop, opts[hf_loop], ids),
        "nanoseek+MTP": lambda: nanoseek_step(ours, opts[ours], ids, mtp=True),
    }, args.steps)
    tokens = args.batch * args.seq
    train = {name: {"seconds_per_step": s, "tokens_per_s": tokens / s,
                    "mfu": tokens / s * train_flops[name] / peak} for name, s in secs.items()}

    result = {"preset": args.preset, "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
              "fp32_matmul_peak_gflops": peak / 1e9, "train": train, "compile_warmup_seconds": warmup,
              "train_speedup_vs_transformers": train["nanoseek"]["tokens_per_s"] / train["transformers"]["tokens_per_s"]}
    print(f"{args.preset} preset, batch {args.batch} x {args.seq} tokens, {torch.get_num_threads()} threads; "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'training step (fwd+bwd+AdamW)':<32}{'s/step':>9}{'tokens/s':>11}{'MFU':>8}")
    for name, r in train.items():
        print(f"  {name:<30}{r['seconds_per_step']:>9.3f}{r['tokens_per_s']:>11.0f}{r['mfu']:>8.1%}")
    print(f"  nanoseek / transformers: {result['train_speedup_vs_transformers']:.2f}x; nanoseek / transformers with its "
          f"per-expert loop: {train['nanoseek']['tokens_per_s'] / train['transformers, expert loop']['tokens_per_s']:.2f}x")
    print(f"  compiled / eager nanoseek: {train['nanoseek, compiled']['tokens_per_s'] / train['nanoseek']['tokens_per_s']:.2f}x"
          f", after {warmup:.1f} s of warm-up (compiling)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
