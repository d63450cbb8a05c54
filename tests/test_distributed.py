"""Two processes on gloo (CPU) against one: data parallel and FSDP steps, expert parallelism (forward, backward, the
gate biases), distributed GRPO, and a checkpoint written by two processes (torchrun) resumed by one.

The two-process work runs once per module (`two_ranks`, torch.multiprocessing.spawn) and each test checks one part
of what it wrote against the same work done here on one process."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanoseek import ModelConfig, Transformer
from nanoseek.model.moe import Experts
from nanoseek.model.transformer import moe_layers
from nanoseek.rewards import RewardResult, combined_reward
from nanoseek.shards import BatchLoader, TokenShards, write_shards
from nanoseek.train.lm import lm_loss
from nanoseek.train.trainer import Trainer
from nanoseek.train.recipe import load_config

from .conftest import settings

WORLD = 2
LAYOUTS = {"dp": ("dp", 1), "fsdp": ("fsdp", 1), "dp+ep": ("dp", 2), "fsdp+ep": ("fsdp", 2)}
STEPS = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_config() -> ModelConfig:
    return ModelConfig.from_preset("tiny", vocab_size=64, max_position_embeddings=64)


def make_shards(path: Path) -> TokenShards:
    """Random documents with SFT loss masks (so the count of positions differs between processes)."""
    rng = np.random.default_rng(0)
    docs = []
    for _ in range(40):
        n = int(rng.integers(8, 40))
        docs.append((rng.integers(3, 64, n).tolist(), (rng.random(n) < 0.6).astype(int).tolist()))
    write_shards(docs, path, 64, eos_id=1)
    return TokenShards(path)


def train_config(out: Path, parallel: str = "dp", expert_parallel: int = 1):
    return load_config(None, {}, preset="tiny", data=["x"], seq_len=16, batch_size=4, grad_accum=2, max_steps=10,
                       warmup_steps=1, lr=1e-3, bias_gamma=0.01, bias_gamma_stop=1.0, out=str(out),
                       parallel=parallel, expert_parallel=expert_parallel)


def train_steps(shards: TokenShards, out: Path, parallel: str = "dp", expert_parallel: int = 1):
    """STEPS steps of the shared loop on the tiny model; returns the trainer and the metrics rows."""
    from nanoseek import distributed
    torch.manual_seed(0)
    model = Transformer(model_config())
    cfg = train_config(out, parallel, expert_parallel)
    loader = BatchLoader(shards, distributed.share(cfg.batch_size, "batch_size"), cfg.seq_len, seed=0,
                         rank=distributed.rank(), world=distributed.world())
    trainer = Trainer(cfg, model, loader, lm_loss(cfg), 1.0)
    trainer.peak = 1.0
    rows = [trainer.train_step() for _ in range(STEPS)]
    return trainer, rows


def batch() -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def ep_loss(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = model(ids)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + out.balance
    (mtp,) = out.mtp_logits  # (B, T - 1, V): position t predicts t + 2
    return loss + F.cross_entropy(mtp[:, :-1].flatten(0, 1), ids[:, 2:].flatten()), out.logits


def shaped_reward(problem, completion, config, length=None):
    """The task reward plus a bonus a random model earns too (by the completion's length), so advantages differ."""
    r = combined_reward(problem, completion, config, length)
    return RewardResult(r.value + len(completion) % 3 / 4, r.reason, r.components)


def grpo_config(corpus: Path, base: Path, out: Path, parallel: str = "dp"):
    return load_config(None, {}, stage="grpo", init=str(base), tasks="tasks-cpu-demo", data=[], eval_n=0,
                       group_size=4, prompts_per_step=2, max_new_tokens=8, max_steps=2, save_every=2, lr=1e-3,
                       warmup_steps=1, mask_truncated=False, beta=0.01, out=str(out), parallel=parallel)


# ---- the two processes ---------------------------------------------------------------------------------------------
def worker(rank: int, port: int, tmp: str, corpus: str, base: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from nanoseek import distributed
    from nanoseek.train import grpo
    distributed.init("cpu")
    tmp = Path(tmp)
    shards = TokenShards(tmp / "shards")
    for name, (parallel, ep) in LAYOUTS.items():  # the shared loop under each layout
        trainer, rows = train_steps(shards, tmp / name, parallel, ep)
        full = trainer.parallel.full_state_dict(trainer.model)
        biases = [m.gate.e_score_correction_bias.clone() for m in moe_layers(trainer.model)]
        torch.save({"state": full, "rows": rows, "biases": biases}, tmp / f"{name}.rank{rank}.pt")
    # expert parallelism alone: forward and backward of this rank's half of the batch
    torch.manual_seed(0)
    model = Transformer(model_config()).train()
    parallel = distributed.Parallel("dp", 2)
    wrapped = parallel.wrap(model)
    loss, logits = ep_loss(wrapped, batch()[rank * 2:(rank + 1) * 2])
    loss.backward()
    parallel.finish_gradients()
    grads = {}
    for name, p in model.named_parameters():
        g = p.grad
        if name in parallel.experts:
            parts = [torch.empty_like(g) for _ in range(WORLD)]
            torch.distributed.all_gather(parts, g)
            g = torch.cat(parts)
        grads[name] = g
    torch.save({"logits": logits.detach(), "grads": grads, "loss": loss.item()}, tmp / f"ep.rank{rank}.pt")
    # GRPO, each rank with its share of the prompts
    grpo.combined_reward = shaped_reward
    for parallel in ("dp", "fsdp"):
        grpo.run(grpo_config(Path(corpus), Path(base), tmp / f"grpo-{parallel}", parallel))
    distributed.barrier()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, corpus, base) -> Path:
    tmp = tmp_path_factory.mktemp("two-ranks")
    make_shards(tmp / "shards")
    ctx = torch.multiprocessing.spawn(worker, args=(free_port(), str(tmp), str(corpus), str(base)), nprocs=WORLD,
                                      join=False)
    deadline = time.time() + 240
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two processes did not finish in 240 s")
    return tmp


def load(tmp: Path, name: str, rank: int = 0) -> dict:
    return torch.load(tmp / f"{name}.rank{rank}.pt", weights_only=False)


@pytest.fixture(scope="module")
def single(two_ranks, tmp_path_factory) -> dict:
    """The same steps on one process."""
    trainer, rows = train_steps(TokenShards(two_ranks / "shards"), tmp_path_factory.mktemp("single"))
    return {"state": trainer.model.state_dict(), "rows": rows,
            "biases": [m.gate.e_score_correction_bias.clone() for m in moe_layers(trainer.model)]}


# ---- the checks ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_step_on_two_processes_equals_one(two_ranks, single, layout):
    """Same global batch (SFT masks, 2 micro-batches), same parameters after the steps, same logged metrics."""
    got = load(two_ranks, layout)
    assert got["state"].keys() == single["state"].keys()
    for name, want in single["state"].items():
        torch.testing.assert_close(got["state"][name], want, atol=1e-5, rtol=0, msg=f"{layout}: {name}")
    for mine, theirs in zip(got["rows"], single["rows"]):
        for key in ("loss", "lm_loss", "mtp_loss", "balance", "grad_norm", "maxvio", "tokens"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4, abs=1e-5), (layout, key)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gate_biases_move_by_the_global_load(two_ranks, single, layout):
    assert any((b != 0).any() for b in single["biases"])
    for rank in range(WORLD):
        for mine, want in zip(load(two_ranks, layout, rank)["biases"], single["biases"]):
            assert torch.equal(mine, want), (layout, rank)


def test_expert_parallel_forward_and_backward_equal_one_process(two_ranks):
    torch.manual_seed(0)
    model = Transformer(model_config()).train()
    ids = batch()
    loss, logits = ep_loss(model, ids)
    # the two ranks' losses are means over half the batch each: their mean is what one process differentiates
    halves = [ep_loss(model, ids[r * 2:(r + 1) * 2])[0] for r in range(WORLD)]
    (sum(halves) / WORLD).backward()
    for rank in range(WORLD):
        got = load(two_ranks, "ep", rank)
        torch.testing.assert_close(got["logits"], logits[rank * 2:(rank + 1) * 2].detach(), atol=1e-5, rtol=0)
        assert got["loss"] == pytest.approx(halves[rank].item(), abs=1e-6)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, atol=1e-5, rtol=0, msg=name)
    experts = [m for m in model.modules() if isinstance(m, Experts)]
    assert experts and all(m.gate_proj.shape[0] == 8 for m in experts)


@pytest.mark.parametrize("parallel", ["dp", "fsdp"])
def test_grpo_on_two_processes_equals_one(two_ranks, corpus, base, tmp_path, monkeypatch, parallel):
    """Each rank samples the groups of its share of the prompts with the seeds one process would use; the loss is
    normalised by the global counts, so the step is the single-process one."""
    from nanoseek.train import grpo
    monkeypatch.setattr(grpo, "combined_reward", shaped_reward)
    grpo.run(grpo_config(corpus, base, tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    two = two_ranks / f"grpo-{parallel}"
    got = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(got) == len(rows) == 2 and any(r["loss"] != 0 for r in rows)
    for mine, theirs in zip(got, rows):
        for key in ("loss", "reward", "grad_norm", "response_length"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-5), key
    want = Transformer.from_pretrained(tmp_path / "model").state_dict()
    for name, t in Transformer.from_pretrained(two / "model").state_dict().items():
        # each rank pads its own rows: float noise of ~1e-7 in a gradient, which Adam turns into up to a few % of
        # one lr (1e-3) step where an expert saw few tokens; a wrong split or normalisation moves whole steps
        torch.testing.assert_close(t, want[name], atol=5e-5, rtol=0, msg=name)


def test_saved_by_two_processes_resumed_by_one(corpus, tmp_path):
    """`torchrun -m nanoseek pretrain` (FSDP + EP) writes a DCP trainer state; one process resumes it and logs the
    losses the two would have."""
    from nanoseek.train.lm import run
    out = tmp_path / "run"
    args = ["--preset", "tiny", "--data", str(corpus), "--vocab-size", "400", "--seq-len", "64", "--batch-size", "4",
            "--max-steps", "6", "--warmup-steps", "2", "--save-every", "3", "--eval-n", "0", "--out", str(out),
            "--parallel", "fsdp", "--expert-parallel", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "nanoseek", "pretrain", *args], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "nanoseek pretrain: 6 steps" in done.stdout and done.stdout.count("nanoseek pretrain") == 1  # rank 0 only
    state = out / "checkpoints" / "step_000003" / "trainer_state"
    assert (state / "optimizer" / ".metadata").exists()
    assert json.loads((state / "state.json").read_text())["processes"] == 2
    two = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert (out / "model" / "model.safetensors").exists()
    Transformer.from_pretrained(out / "model")  # the ordinary HF directory, every expert in it
    shutil.rmtree(out / "checkpoints" / "step_000006")
    run(settings(corpus, out, max_steps=6, save_every=3, resume=True))
    one = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in one] == list(range(1, 7))
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])


def test_layout_errors_name_the_field():
    from nanoseek.distributed import Parallel
    from nanoseek.errors import TrainError
    with pytest.raises(TrainError, match="'parallel' = 'zero3'"):
        load_config(None, {}, data=["x"], parallel="zero3")
    with pytest.raises(TrainError, match="'expert_parallel' = 0"):
        load_config(None, {}, data=["x"], expert_parallel=0)
    with pytest.raises(TrainError, match="'expert_parallel' = 2: must be 1 for GRPO"):
        load_config(None, {}, data=["x"], stage="grpo", init="m", tasks="t", expert_parallel=2)
    with pytest.raises(TrainError, match="'expert_parallel' = 2: must divide the number of processes \\(1\\)"):
        Parallel("dp", 2)
