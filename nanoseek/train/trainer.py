"""The training loop every stage shares: AdamW, schedule, clipping, accumulation, balancing, checkpoints, metrics.

A stage hands the Trainer a model, a loader with `next()` and `state_dict()` / `load_state_dict()`, and a loss
function `loss_fn(model, batch, step) -> StepOutput`; the Trainer knows no stage and does the rest:

  for each step: lr and balancing speed from the schedule -> grad_accum micro-batches (the stage's forward,
  backward) -> clip to 1.0 -> AdamW -> move the gate biases by the step's expert loads -> log a metrics.jsonl row
  -> every `save_every` steps an atomic checkpoint, keeping the last `keep_last`; until `max_steps`, or until the
  steps' summed seconds reach `max_seconds` (an equal-time control; the sum is checkpointed, so a resume keeps it).

MFU is measured against the best dense-matmul rate of this device timed in the same run (at the start and at
every checkpoint), with the model FLOPs of `cost.flops_per_token`; every metrics row carries both (`flops_per_token`,
`peak_flops`), so `nanoseek cost --run` can account for the run afterwards.

Checkpoints are `OUT/checkpoints/step_NNNNNN/{model/ (a Hugging Face directory), trainer_state/state.pt}`, built in a
staging directory and renamed into place (rundir.py), so a kill at any moment leaves the previous checkpoint intact.
`resume` restores weights, optimiser, data position and RNG, and cuts metrics.jsonl back to the checkpoint's step
(to nothing without a checkpoint), so a resumed run logs every step once, with the losses an uninterrupted run
would.

On many processes (`torchrun`, see distributed.py) the same loop runs on each: the model is wrapped or sharded by
`distributed.Parallel` (DDP, FSDP2, expert parallelism), gradients are reduced with the last micro-batch, the
expert loads that move the gate biases are summed over all processes (so every rank keeps the same biases) and the
logged metrics are means over them. Rank 0 alone logs, shows progress and writes model directories. The trainer
state of such a run is a `torch.distributed.checkpoint` directory (`trainer_state/optimizer/`, the optimizer state
keyed by parameter name and resharded on load), so it resumes on any number of processes, one included; the weights
come from the checkpoint's ordinary model directory, gathered on rank 0.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from .. import distributed
from ..cost import matmul_peak
from ..errors import TrainError
from ..model import Transformer
from ..rundir import MetricsLog, commit, remove_dir, staging, sweep
from .balance import max_violation, update_bias
from .recipe import TrainConfig


class StepOutput(NamedTuple):
    """What a stage's loss function returns for one micro-batch."""
    loss: torch.Tensor  # to minimise
    metrics: dict  # floats to log (means over the micro-batches)
    loads: list[torch.Tensor]  # tokens per expert (E,) of each MoE layer, for the bias update; [] for a dense model
    tokens: int  # tokens processed (for tokens/s and MFU)


LossFn = Callable[[torch.nn.Module, object, int], StepOutput]


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine to min_lr_ratio * lr, or warmup-stable-decay (linear decay over the last
    `decay_fraction` of the steps)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    low = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = int(cfg.max_steps * (1 - cfg.decay_fraction))
        if step < decay_start:
            return cfg.lr
        return cfg.lr + (low - cfg.lr) * (step - decay_start) / max(1, cfg.max_steps - decay_start)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return low + (cfg.lr - low) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (embeddings, projections, stacked experts) only; none on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def model_config(model: torch.nn.Module) -> dict:
    """The architecture settings of a nanoseek model (`cfg`) or a `transformers` one (`config`, less the fields that
    record where and by which version it was saved)."""
    if hasattr(model, "cfg"):
        return model.cfg.to_dict()
    skip = ("_name_or_path", "transformers_version", "dtype", "torch_dtype")
    return {k: v for k, v in model.config.to_dict().items() if k not in skip}


class Trainer:
    def __init__(self, cfg: TrainConfig, model: Transformer, loader, loss_fn: LossFn, flops_per_token: float,
                 save_extra: Callable[[Path], None] | None = None,
                 load_model: Callable[[Path], torch.nn.Module] | None = None,
                 unused_parameters: bool = False, shown: str = "maxvio_mean"):
        """save_extra(model_dir) adds files (e.g. the tokenizer) to every saved model directory; load_model(model_dir)
        reads a saved model back for resuming (default: `Transformer.from_pretrained`; another kind of model, e.g.
        a `transformers` one, brings its own). `model.save_pretrained(dir)` writes it. unused_parameters: some
        parameters get no gradient (the MTP module when its loss is off), which DDP must be told; shown: the metric
        the progress bar shows beside loss and tokens/s."""
        self.cfg, self.model, self.loader, self.loss_fn = cfg, model, loader, loss_fn
        self.flops_per_token, self.save_extra, self.shown = flops_per_token, save_extra, shown
        self.load_model = load_model or (lambda path: Transformer.from_pretrained(path, device=self.device))
        self.out = Path(cfg.out)
        self.ckpt_dir = self.out / "checkpoints"
        self.device = next(model.parameters()).device
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")  # autocast
        distributed.init(self.device.type)  # under torchrun: join the process group (a no-op once joined)
        self.parallel = distributed.Parallel(cfg.parallel, cfg.expert_parallel)
        self.main = distributed.is_main()
        self.metrics = MetricsLog(self.out / "metrics.jsonl", enabled=self.main)  # rank 0 alone logs
        wrapped = self.parallel.wrap(model, unused_parameters=unused_parameters)  # one process: the model itself
        self.optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95),
                                           eps=1e-8, fused=self.device.type == "cuda")
        self.forward_model = torch.compile(wrapped) if cfg.compile else wrapped
        self.step, self.spent = 0, 0.0  # steps taken; their summed seconds (what `max_seconds` limits)

    # ---- checkpoints ----------------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        done = [p for p in self.ckpt_dir.glob("step_*") if p.name[5:].isdigit()
                and (p / "trainer_state" / "state.pt").exists()]
        return sorted(done)

    def save_checkpoint(self) -> Path:
        final = self.ckpt_dir / f"step_{self.step:06d}"
        tmp = staging(final, make=self.main)
        distributed.barrier()
        self.save_model(tmp / "model")
        state = {"step": self.step, "seconds": self.spent, "loader": self.loader.state_dict(),
                 "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                         "numpy": np.random.get_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                 "config": self.cfg.to_dict()}
        if self.parallel.active:  # every rank writes its part; resumable on any number of processes
            self.parallel.save_optimizer(self.model, self.optimizer, tmp / "trainer_state" / "optimizer")
        else:
            state = {"step": self.step, "optimizer": self.optimizer.state_dict(), **state}
        if self.main:
            (tmp / "trainer_state").mkdir(parents=True, exist_ok=True)
            torch.save(state, tmp / "trainer_state" / "state.pt")
            (tmp / "trainer_state" / "state.json").write_text(json.dumps(
                {"step": self.step, "loader": self.loader.state_dict(), "processes": self.parallel.world,
                 "config": self.cfg.to_dict()}, indent=2))
            commit(tmp, final)
            for old in self.checkpoints()[:-self.cfg.keep_last]:
                remove_dir(old)
        distributed.barrier()
        return final

    def save_model(self, path: Path) -> None:
        """A Hugging Face directory of the whole model, written by rank 0 (collective when the model is sharded)."""
        model = self.parallel.export(self.model)
        if model is not None:
            model.save_pretrained(path)
            if self.save_extra is not None:
                self.save_extra(path)
        distributed.barrier()

    def resume(self) -> None:
        if self.main and self.ckpt_dir.is_dir():  # what a kill left of a save or of a pruned checkpoint
            sweep(self.ckpt_dir, "step_*")
        distributed.barrier()
        ckpts = self.checkpoints()
        if not ckpts:  # killed before its first checkpoint: a fresh start
            self.metrics.restart(0)
            return
        path = ckpts[-1]
        state = torch.load(path / "trainer_state" / "state.pt", weights_only=False)
        saved = self.load_model(path / "model")
        if model_config(saved) != model_config(self.model):
            raise TrainError(f"{path / 'model' / 'config.json'}: the checkpoint's model config differs from this "
                             "run's; resume with the recipe that wrote it or choose another --out")
        self.parallel.load_full_state_dict(self.model, saved.state_dict())
        if "optimizer" not in state:  # written by several processes
            self.parallel.load_optimizer(self.model, self.optimizer, path / "trainer_state" / "optimizer")
        elif self.parallel.active:  # written by one process, resumed on several
            self.parallel.load_full_optimizer(self.model, self.optimizer, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.loader.load_state_dict(state["loader"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.spent = state["step"], state.get("seconds", 0.0)
        self.metrics.restart(self.step)  # the rows logged after this checkpoint will be logged again
        distributed.barrier()
        if self.main:
            print(f"resumed from {path} (step {self.step})")

    # ---- the loop -------------------------------------------------------------------------------------------------
    def train_step(self) -> dict:
        cfg, model = self.cfg, self.model
        lr = learning_rate(cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        model.train()
        t0 = time.perf_counter()
        totals, loads, tokens, bad = {}, None, 0, None
        for i in range(cfg.grad_accum):
            batch = self.loader.next()
            with self.parallel.accumulating(self.forward_model, last=i == cfg.grad_accum - 1):
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss, metrics, layer_loads, n = self.loss_fn(self.forward_model, batch, self.step)
                if not torch.isfinite(loss):
                    bad = loss.item()
                    if not self.parallel.active:  # on several processes every rank must stop together, below
                        self.non_finite(bad)
                (loss / cfg.grad_accum).backward()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / cfg.grad_accum
            loads = layer_loads if loads is None else [a + b for a, b in zip(loads, layer_loads)]
            tokens += n
        if self.parallel.active:
            if distributed.any_true(bad is not None):
                self.non_finite(bad if bad is not None else "on another process")
            self.parallel.finish_gradients()
            totals = distributed.mean_metrics(totals)
            tokens = int(distributed.all_reduce_sum(torch.tensor(tokens)))
            if loads:  # the global expert loads: every rank moves its biases the same way
                loads = list(distributed.all_reduce_sum(torch.stack(loads)).unbind(0))
        grad_norm = self.parallel.clip_grad_norm(model, cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        gamma = cfg.moe.bias_gamma if self.step < cfg.moe.bias_gamma_stop * cfg.max_steps else 0.0
        update_bias(model, loads, gamma)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        self.step += 1
        maxvio = [round(max_violation(load), 4) for load in loads]
        return {"step": self.step, **{k: round(v, 6) for k, v in totals.items()}, "lr": lr,
                "grad_norm": round(float(grad_norm), 5), "bias_gamma": gamma,
                "maxvio": maxvio, "maxvio_mean": round(sum(maxvio) / len(maxvio), 4) if maxvio else 0.0,
                "tokens": tokens, "seconds": round(seconds, 4), "tokens_per_s": round(tokens / seconds, 1),
                "mfu": round(tokens / seconds * self.flops_per_token / (self.peak * self.parallel.world), 4),
                "flops_per_token": self.flops_per_token, "peak_flops": round(self.peak)}

    def non_finite(self, value) -> None:
        last = self.checkpoints()
        raise TrainError(f"non-finite loss ({value}) at step {self.step}; stopped without saving. "
                         f"Last good checkpoint: {last[-1] if last else 'none'}. Lower lr or check the data.")

    def finished(self) -> bool:
        """max_steps taken, or the `max_seconds` budget spent (every process stops at the same step)."""
        if self.step >= self.cfg.max_steps:
            return True
        return self.cfg.max_seconds is not None and distributed.any_true(self.spent >= self.cfg.max_seconds)

    def fit(self) -> dict:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self.resume()
        elif self.checkpoints():
            raise TrainError(f"{self.ckpt_dir} already holds checkpoints; pass --resume true to continue that run "
                             "or choose another --out")
        else:
            self.metrics.restart(0)
        distributed.barrier()
        self.peak = matmul_peak(self.device) if self.main else 1.0  # only rank 0's rows are written
        bar = tqdm(total=None if cfg.max_seconds is not None else cfg.max_steps, initial=self.step,
                   desc=f"{cfg.stage} {self.out}", unit="step", dynamic_ncols=True, disable=not self.main)
        row = None
        while not self.finished():
            row = self.train_step()
            self.spent += row["seconds"]
            self.metrics.append(row)
            bar.update(1)
            shown = {"loss": f"{row['loss']:.3f}", "tok_s": f"{row['tokens_per_s']:.0f}",
                     self.shown.removesuffix("_mean"): f"{row[self.shown]:.3f}"}
            if cfg.max_seconds is not None:
                shown["seconds"] = f"{self.spent:.0f}/{cfg.max_seconds:.0f}"
            bar.set_postfix(shown)
            if self.step % cfg.save_every == 0 or self.finished():
                self.save_checkpoint()
                if self.main:  # a busy machine reads low: keep the best
                    self.peak = max(self.peak, matmul_peak(self.device))
        bar.close()
        final = self.out / "model"
        self.save_model(final)
        return {"steps": self.step, "seconds": self.spent, "model": str(final), "metrics": str(self.metrics.path),
                "final_loss": row["loss"] if row else None, "peak_flops": self.peak}
