"""Pretraining and SFT: the language-model objective of DeepSeek-V3 on packed token shards.

    L = CE(main) + lambda / D * sum_k CE(MTP depth k) + alpha * sum_layers sum_i f_i P_i

The main head predicts token t+1, MTP depth k predicts token t+k+1 (V3 eq. 21-25); the balance term is the
sequence-wise auxiliary loss (eq. 17-20), tiny by design because the gate biases do the balancing. SFT is the same
objective with the loss counted only on the assistant's tokens (the shards carry that mask).

On several processes each takes its slice of every global batch (`batch_size` sequences in all); where a loss mask
makes the count of positions vary, each process divides by the global count, so the mean of the processes' losses
(what DDP and FSDP differentiate) is the single-process loss of the whole batch.

Context extension (stage extend, V3 section 4.3) is this objective from a pretrained model, its config given YaRN
scaling (`with_yarn`), at a longer seq_len. The data (task problems or text files -> tokenizer -> packed shards) is
prepared by lm_data.py.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed
from ..checkpoint import load_model
from ..config import ModelConfig
from ..cost import flops_per_token
from ..errors import TrainError
from ..evaluate import greedy_accuracy
from ..fp8 import convert_to_fp8
from ..model import Transformer
from ..rundir import check_writable, write_json
from ..shards import Batch, BatchLoader
from ..tokenizer import Tokenizer
from .lm_data import prepare
from .recipe import TrainConfig
from .trainer import StepOutput, Trainer


def run(cfg: TrainConfig) -> dict:
    """Train as the config says; returns a summary (paths, final loss, held-out accuracy)."""
    out = Path(cfg.out)
    device = distributed.init(cfg.device)
    check_writable(out)
    torch.manual_seed(cfg.seed)
    if distributed.is_main():  # rank 0 builds the corpus, tokenizer and shards; the others then read them
        tok, shards, held_out = prepare(cfg, out)
    distributed.barrier()
    if not distributed.is_main():
        tok, shards, held_out = prepare(dataclasses.replace(cfg, resume=True), out)
    model = build_model(cfg, tok, device)
    tok.model_max_length = model.cfg.max_position_embeddings
    if cfg.fp8:
        convert_to_fp8(model, cfg.fp8_gemm)
    loader = BatchLoader(shards, distributed.share(cfg.batch_size, "batch_size"), cfg.seq_len, seed=cfg.seed,
                         rank=distributed.rank(), world=distributed.world(), documents=cfg.windows == "documents")
    f = flops_per_token(model.cfg, cfg.seq_len)
    flops = f["training"] + (f["mtp_training"] if cfg.moe.mtp_lambda > 0 else 0.0)
    no_mtp = min(cfg.moe.mtp_lambda, cfg.moe.mtp_lambda_final) == 0  # the MTP module then gets no gradient
    trainer = Trainer(cfg, model, loader, lm_loss(cfg), flops, save_extra=tok.save, unused_parameters=no_mtp)
    summary = trainer.fit()
    if cfg.eval_n and held_out:
        model = trainer.parallel.export(model)  # rank 0: the whole model; the others: None
    if cfg.eval_n and held_out and distributed.is_main():
        summary["held_out"] = greedy_accuracy(model, tok, held_out[:cfg.eval_n])
        write_json(out / "eval.json", summary["held_out"])
    return summary


def build_model(cfg: TrainConfig, tok: Tokenizer, device: torch.device) -> Transformer:
    if cfg.init is not None:
        model = load_model(cfg.init, device=device)
        if tok.vocab_size > model.cfg.vocab_size:
            raise TrainError(f"{cfg.init}: vocab_size {model.cfg.vocab_size} < the tokenizer's {tok.vocab_size}")
        return with_yarn(model, cfg) if cfg.stage == "extend" else model
    mcfg = ModelConfig.from_preset(cfg.preset, **{"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id,
                                                  "eos_token_id": tok.eos_id, **cfg.model_overrides})
    with torch.device(device):
        return Transformer(mcfg)


def with_yarn(model: Transformer, cfg: TrainConfig) -> Transformer:
    """The same weights under YaRN scaling of the rope dims, as DeepSeek-V3's config.json writes it (mscale =
    mscale_all_dim = 1: the softmax scale grows by (0.1 ln s + 1)^2), for a context of factor x original_length;
    with `extend.rope: plain`, the same context with RoPE as it was (the control that shows what YaRN adds)."""
    e = model.cfg.yarn or {}
    original = cfg.extend.original_length or e.get("original_max_position_embeddings")
    if not original:
        raise TrainError(f"extend.original_length: {cfg.init} has no YaRN settings to extend; give the length it was "
                         f"pretrained at")
    context = int(cfg.extend.factor * original)
    if cfg.seq_len > context:
        raise TrainError(f"seq_len {cfg.seq_len}: longer than the extended context {context} (extend.factor "
                         f"{cfg.extend.factor} x {original})")
    yarn = {"type": "yarn", "factor": cfg.extend.factor, "original_max_position_embeddings": original,
            "beta_fast": cfg.extend.beta_fast, "beta_slow": cfg.extend.beta_slow, "mscale": 1.0, "mscale_all_dim": 1.0}
    scaling = yarn if cfg.extend.rope == "yarn" else model.cfg.rope_scaling
    with torch.device(next(model.parameters()).device):
        extended = Transformer(model.cfg.replace(rope_scaling=scaling, max_position_embeddings=context))
    extended.load_state_dict(model.state_dict())
    return extended


# ---- the objective ---------------------------------------------------------------------------------------------------
def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None,
              count: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the positions the mask counts (all when None). logits (B, T, V), targets (B, T).
    `count` replaces the mask's own count as the divisor (several processes: the global count / processes)."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none")
    if mask is None:
        return ce.mean()
    mask = mask.flatten()
    return (ce * mask).sum() / (mask.sum().clamp(min=1) if count is None else count)


def mask_counts(mask: torch.Tensor | None, depths: int) -> list[torch.Tensor | None]:
    """The divisor of each head's masked mean (main, then MTP depth 1..depths): None on one process or without a
    mask; else the count over all processes, divided by their number."""
    if mask is None or distributed.world() == 1:
        return [None] * (depths + 1)
    counts = torch.stack([mask[:, k:].sum() for k in range(depths + 1)])
    return list(distributed.all_reduce_sum(counts).clamp(min=1) / distributed.world())


def lm_loss(cfg: TrainConfig):
    def loss_fn(model, batch: Batch, step: int):
        device = next(model.parameters()).device
        x, y = batch.x.to(device), batch.y.to(device)
        mask = batch.mask.to(device) if batch.mask is not None else None
        moe = cfg.moe
        mtp_lambda = moe.mtp_lambda if step < moe.mtp_lambda_switch * cfg.max_steps else moe.mtp_lambda_final
        out = model(x, return_mtp=mtp_lambda > 0)
        counts = mask_counts(mask, len(out.mtp_logits))
        main = masked_ce(out.logits, y, mask, counts[0])
        loss, metrics = main, {"lm_loss": main.item()}
        if out.mtp_logits:
            mtp = torch.stack([masked_ce(logits, y[:, k:], mask[:, k:] if mask is not None else None, counts[k])
                               for k, logits in enumerate(out.mtp_logits, start=1)])
            loss = loss + mtp_lambda * mtp.mean()
            metrics["mtp_loss"] = mtp.mean().item()
            metrics["mtp_lambda"] = mtp_lambda
        if out.balance is not None:
            loss = loss + cfg.moe.balance_alpha * out.balance
            metrics["balance"] = out.balance.item()
        metrics["loss"] = loss.item()
        return StepOutput(loss, metrics, [c.detach() for c in out.router], x.numel())
    return loss_fn
