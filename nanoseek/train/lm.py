"""Pretraining and SFT: the language-model objective of DeepSeek-V3 on packed token shards.

    L = CE(main) + lambda / D * sum_k CE(MTP depth k) + alpha * sum_layers sum_i f_i P_i

The main head predicts token t+1, MTP depth k predicts token t+k+1 (V3 eq. 21-25); the balance term is the
sequence-wise auxiliary loss (eq. 17-20), tiny by design because the gate biases do the balancing. SFT is the same
objective with the loss counted only on the assistant's tokens (the shards carry that mask).

On several processes each takes its slice of every global batch (`batch_size` sequences in all); where a loss mask
makes the count of positions vary, each process divides by the global count, so the mean of the processes' losses
(what DDP and FSDP differentiate) is the single-process loss of the whole batch.

Data preparation: task problems (a task recipe, or JSONL with prompt/solution) become chat documents
`<bos><User>prompt<Assistant>solution<eos>`; JSONL rows with `text` and .txt / .parquet files become plain documents.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from .. import distributed
from ..checkpoint import load_model
from ..config import ModelConfig
from ..cost import flops_per_token
from ..data import build_corpus, held_out_path, read_jsonl, write_jsonl
from ..errors import DataError, TrainError
from ..model import Transformer
from ..rundir import check_writable
from ..shards import INDEX, Batch, BatchLoader, TokenShards, write_shards
from ..tasks import Mixture, Problem
from ..tokenizer import Tokenizer, train_tokenizer
from .trainer import StepOutput, Trainer
from .recipe import TrainConfig


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


# ---- data ----------------------------------------------------------------------------------------------------------
def chat_document(tok: Tokenizer, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Ids of a one-turn chat without its final end-of-sentence (the shards add it), and the mask of the reply."""
    prefix = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    if ids[:len(prefix)] != prefix:
        raise DataError("the chat template does not extend the generation prompt; cannot mask the prompt")
    if ids and ids[-1] == tok.eos_id:
        ids = ids[:-1]
    return ids, [0] * len(prefix) + [1] * (len(ids) - len(prefix))


def read_texts(path: Path) -> Iterator[dict]:
    """Rows of a data file: JSONL objects, a .txt file as one `text`, or a .parquet file's rows."""
    if not path.exists():
        raise DataError(f"{path}: no such data file")
    if path.suffix == ".jsonl":
        with open(path) as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
    elif path.suffix == ".txt":
        yield {"text": path.read_text()}
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        yield from pq.read_table(path).to_pylist()
    else:
        raise DataError(f"{path}: unknown data format (expected .jsonl, .txt or .parquet)")


def row_text(row: dict, where: str) -> tuple[str, str | None]:
    """(prompt or text, response or None) of a data row."""
    if "prompt" in row and row.get("solution"):
        return row["prompt"], row["solution"]
    if isinstance(row.get("text"), str):
        return row["text"], None
    raise DataError(f"{where}: a row needs `prompt` + `solution` or `text`, got keys {sorted(row)}")


def documents(files: list[Path], tok: Tokenizer, sft: bool) -> Iterator[tuple[list[int], list[int] | None]]:
    for path in files:
        for i, row in enumerate(read_texts(path)):
            text, response = row_text(row, f"{path} row {i}")
            if response is None:
                if sft:
                    raise DataError(f"{path} row {i}: SFT needs prompt + solution rows")
                yield tok.encode(text), None
            else:
                ids, mask = chat_document(tok, text, response)
                yield ids, mask if sft else None


def prepare(cfg: TrainConfig, out: Path) -> tuple[Tokenizer, TokenShards, list[Problem]]:
    """The tokenizer, the token shards and held-out problems (for the final evaluation) of a run."""
    data = out / "data"
    sources, held_out = [], []
    for item in cfg.data:
        p = Path(item)
        if (p / INDEX).exists():
            sources.append(p)
        elif not p.exists():
            raise DataError(f"data: {p}: no such file or directory")
        else:
            sources.append(p)
            if p.suffix == ".jsonl" and held_out_path(p).exists():
                held_out += read_jsonl(held_out_path(p))
    if cfg.tasks is not None:
        corpus_path = data / "corpus.jsonl"
        if not (cfg.resume and corpus_path.exists()):
            corpus = build_corpus(Mixture.from_recipe(cfg.tasks), cfg.tasks_n, max(cfg.eval_n, 1), seed=cfg.seed)
            write_jsonl(held_out_path(corpus_path), corpus.held_out)
            write_jsonl(corpus_path, corpus.train)
        sources.append(corpus_path)
        held_out += read_jsonl(held_out_path(corpus_path))
    files = [p for p in sources if not (p / INDEX).exists()]
    tok = load_or_train_tokenizer(cfg, files, out)
    shard_dirs = [p for p in sources if (p / INDEX).exists()]
    if files:
        shards_path = data / "shards"
        if not (cfg.resume and (shards_path / INDEX).exists()):
            write_shards(documents(files, tok, cfg.stage == "sft"), shards_path, tok.vocab_size, tok.eos_id)
        shard_dirs.append(shards_path)
    if len(shard_dirs) != 1:
        raise DataError(f"data: give either files or one token-shard directory, got {len(shard_dirs)} shard dirs")
    shards = TokenShards(shard_dirs[0])
    if shards.vocab_size > tok.vocab_size:
        raise DataError(f"{shards.path}: ids up to {shards.vocab_size}, the tokenizer has {tok.vocab_size}")
    return tok, shards, held_out


def load_or_train_tokenizer(cfg: TrainConfig, files: list[Path], out: Path) -> Tokenizer:
    if cfg.tokenizer is not None:
        return Tokenizer.load(cfg.tokenizer)
    if cfg.init is not None:
        return Tokenizer.load(cfg.init)
    path = out / "tokenizer"
    if cfg.resume and (path / "tokenizer.json").exists():
        return Tokenizer.load(path)
    if not files:
        raise DataError("data: a tokenizer is trained on data files; with token shards give `tokenizer`")
    tok = train_tokenizer(tokenizer_texts(files), cfg.vocab_size, digits=cfg.tokenizer_digits)
    tok.save(path)
    return tok


def tokenizer_texts(files: list[Path]) -> Iterator[str]:
    """Every non-empty row of the data files as one text (prompt and solution joined), to train a tokenizer on."""
    for path in files:
        n = 0
        for i, row in enumerate(read_texts(path)):
            text, response = row_text(row, f"{path} row {i}")
            text = text if response is None else f"{text}\n{response}"
            if text.strip():
                n += 1
                yield text
        if n == 0:
            raise DataError(f"{path}: no text to train a tokenizer on")


def build_model(cfg: TrainConfig, tok: Tokenizer, device: torch.device) -> Transformer:
    if cfg.init is not None:
        model = load_model(cfg.init, device=device)
        if tok.vocab_size > model.cfg.vocab_size:
            raise TrainError(f"{cfg.init}: vocab_size {model.cfg.vocab_size} < the tokenizer's {tok.vocab_size}")
        return model
    mcfg = ModelConfig.from_preset(cfg.preset, **{"vocab_size": tok.vocab_size, "bos_token_id": tok.bos_id,
                                                  "eos_token_id": tok.eos_id, **cfg.model_overrides})
    with torch.device(device):
        return Transformer(mcfg)


def run(cfg: TrainConfig) -> dict:
    """Train as the config says; returns a summary (paths, final loss, held-out accuracy)."""
    from ..evaluate import greedy_accuracy

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
        from ..fp8 import convert_to_fp8
        convert_to_fp8(model)
    loader = BatchLoader(shards, distributed.share(cfg.batch_size, "batch_size"), cfg.seq_len, seed=cfg.seed,
                         rank=distributed.rank(), world=distributed.world())
    f = flops_per_token(model.cfg, cfg.seq_len)
    flops = f["training"] + (f["mtp_training"] if cfg.moe.mtp_lambda > 0 else 0.0)
    no_mtp = min(cfg.moe.mtp_lambda, cfg.moe.mtp_lambda_final) == 0  # the MTP module then gets no gradient
    trainer = Trainer(cfg, model, loader, lm_loss(cfg), flops, save_extra=tok.save, unused_parameters=no_mtp)
    summary = trainer.fit()
    if cfg.eval_n and held_out:
        model = trainer.parallel.export(model)  # rank 0: the whole model; the others: None
    if cfg.eval_n and held_out and distributed.is_main():
        summary["held_out"] = greedy_accuracy(model, tok, held_out[:cfg.eval_n])
        (out / "eval.json").write_text(json.dumps(summary["held_out"], indent=2))
    return summary

