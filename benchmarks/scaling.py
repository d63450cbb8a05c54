"""Scaling out: training tokens/s on one process and on several, and the scaling efficiency, for each layout.

Each measurement is a real `torchrun --standalone` launch of this script (the same path as `torchrun -m nanoseek
pretrain`): the shared Trainer, the model of `--preset`, random token batches, `--batch` sequences of `--seq`
tokens per process (weak scaling: the global batch grows with the processes), `--warmup` untimed steps, then
`--steps` timed ones; tokens/s counts every process's tokens.

    efficiency = tokens/s on N processes / (N x tokens/s on one)

Layouts: dp (DistributedDataParallel), fsdp (FSDP2 fully_shard), ep (dp with the routed experts split over the N
processes, tokens moved by all_to_all). On CPU each process gets `--threads` threads (default 1) and gloo; on a
machine with GPUs, one process per GPU and NCCL, N = the number of GPUs.

    python benchmarks/scaling.py [--preset small] [--procs 2] [--layouts dp,ep] [--out runs/bench-scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


class RandomBatches:
    """An endless source of random token batches, different on every rank, with the loader interface."""

    def __init__(self, batch: int, seq: int, vocab: int, seed: int):
        self.batch, self.seq, self.vocab = batch, seq, vocab
        self.gen = torch.Generator().manual_seed(seed)

    def next(self):
        from nanoseek.shards import Batch
        t = torch.randint(0, self.vocab, (self.batch, self.seq + 1), generator=self.gen)
        return Batch(t[:, :-1], t[:, 1:], None)

    def state_dict(self) -> dict:
        return {}


def worker(args) -> None:
    """One process of a launch: time the training steps, rank 0 writes the result."""
    from nanoseek import ModelConfig, Transformer, distributed
    from nanoseek.cost import flops_per_token
    from nanoseek.train.lm import lm_loss
    from nanoseek.train.trainer import Trainer
    from nanoseek.train.recipe import load_config

    device = distributed.init(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    world, layout = distributed.world(), args.layout
    mcfg = ModelConfig.from_preset(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, {}, preset=args.preset, data=["random"], seq_len=args.seq, batch_size=args.batch * world,
                          max_steps=10**6, warmup_steps=1, out=tmp, device=device.type,
                          parallel="fsdp" if layout == "fsdp" else "dp",
                          expert_parallel=world if layout == "ep" else 1)
        torch.manual_seed(0)
        with torch.device(device):
            model = Transformer(mcfg)
        loader = RandomBatches(args.batch, args.seq, mcfg.vocab_size, seed=distributed.rank())
        f = flops_per_token(mcfg, args.seq)
        trainer = Trainer(cfg, model, loader, lm_loss(cfg), f["training"] + f["mtp_training"])
        trainer.peak = 1.0
        for _ in range(args.warmup):
            trainer.train_step()
        distributed.barrier()
        t0 = time.perf_counter()
        tokens = sum(trainer.train_step()["tokens"] for _ in range(args.steps))
        distributed.barrier()
        seconds = time.perf_counter() - t0
    if distributed.is_main():
        Path(args.result).write_text(json.dumps({"layout": layout, "processes": world, "tokens": tokens,
                                                 "seconds": round(seconds, 3),
                                                 "tokens_per_s": round(tokens / seconds, 1)}))


def launch(args, layout: str, procs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               __file__, "--worker", "--layout", layout, "--result", str(result), "--preset", args.preset,
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--device", args.device]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"{layout} on {procs} processes failed:\n{done.stderr[-4000:]}")
        return json.loads(result.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=4, help="sequences per process per step")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    ap.add_argument("--procs", type=int, default=None, help="processes to scale to (default: the GPUs, else 2)")
    ap.add_argument("--layouts", default="dp,ep")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", default="runs/bench-scaling.json")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout", default="dp", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    procs = args.procs or (torch.cuda.device_count() if cuda else 2)
    where = (f"{procs} x {torch.cuda.get_device_name()}" if cuda else
             f"CPU, {os.cpu_count()} cores, {args.threads} thread(s) per process")
    print(f"scaling: {args.preset} preset, {args.batch} x {args.seq} tokens per process per step, {args.steps} "
          f"timed steps; {where}")
    one = launch(args, "dp", 1)  # one process: every layout is the same
    results = {"device": where, "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "layout",
                                                                                              "result")},
               "one_process": one, "layouts": {}}
    print(f"{'layout':<8}{'processes':>10}{'tokens/s':>12}{'efficiency':>12}")
    print(f"{'-':<8}{1:>10}{one['tokens_per_s']:>12,.0f}{'1.00':>12}")
    for layout in args.layouts.split(","):
        if procs < 2:
            print(f"{layout:<8}: needs 2 or more processes (one device here)")
            continue
        many = launch(args, layout, procs)
        many["efficiency"] = round(many["tokens_per_s"] / (procs * one["tokens_per_s"]), 3)
        results["layouts"][layout] = many
        print(f"{layout:<8}{procs:>10}{many['tokens_per_s']:>12,.0f}{many['efficiency']:>12.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
