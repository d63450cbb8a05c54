"""SIGKILL a real `nanoseek pretrain` process 20 times at random moments, resuming it each time, and check that the run
it finally finishes is the uninterrupted one, bit for bit.

The moments are drawn with a seeded random.Random, of three kinds: a random delay after the start (scaled by how long
the uninterrupted run took to log its first step, so they fall in interpreter and torch start-up, data preparation,
resuming, the first matmul timing or the first steps on a fast machine and a slow one alike); the moment the k-th
checkpoint staging directory (checkpoints/step_NNNNNN.tmp) of the process appears, i.e. while a checkpoint is being
written; and a few milliseconds after the j-th metrics row the process logs (mid-step, mid-append, mid-save, during
the pruning of old checkpoints). The first two kills target the data preparation of the fresh run directory: the
tokenizer directory appearing, then the token shards' staging directory appearing. Each kill is then classed by what
the process left: data not yet prepared, a staging directory it had made still there, or neither. Both runs train
their own tokenizer, so a kill during the data preparation is covered too.

A second test kills the process at one chosen moment the random kills rarely hit: half-way through the removal of
the oldest checkpoint after the last one is written.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanoseek.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY, KILLS, SEED = 36, 3, 20, 20240
DETERMINISTIC = ("step", "loss", "lm_loss", "mtp_loss", "balance", "lr", "grad_norm", "maxvio")  # not the timings
CHECKPOINT = re.compile(r"step_\d{6}")
# One intra-op thread: on a small shared machine two OpenMP threads spin against each other (a run takes 5x longer).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(corpus: Path, out: Path, resume: bool, steps: int = STEPS, save_every: int = SAVE_EVERY) -> list[str]:
    return [sys.executable, "-m", "nanoseek", "pretrain", "--preset", "tiny", "--data", str(corpus),
            "--vocab-size", "400", "--seq-len", "32", "--batch-size", "2", "--max-steps", str(steps),
            "--warmup-steps", "2", "--save-every", str(save_every), "--eval-n", "0", "--device", "cpu",
            "--out", str(out), "--resume", "true" if resume else "false"]


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=f, stderr=subprocess.STDOUT)


def committed(out: Path) -> list[Path]:
    """The checkpoints a resume may pick (what Trainer.checkpoints lists), oldest first."""
    ckpts = out / "checkpoints"
    return sorted(p for p in ckpts.iterdir() if CHECKPOINT.fullmatch(p.name)
                  and (p / "trainer_state" / "state.pt").exists()) if ckpts.is_dir() else []


def staging_dirs(out: Path, since_ns: int = 0) -> set[str]:
    """The checkpoint staging (and moved-aside) directories changed since `since_ns` (a time.time_ns())."""
    ckpts, found = out / "checkpoints", set()
    for p in ckpts.iterdir() if ckpts.is_dir() else []:
        try:
            if p.name.endswith((".tmp", ".old")) and p.stat().st_ctime_ns >= since_ns:
                found.add(p.name)
        except FileNotFoundError:  # removed while we looked
            pass
    return found


def last_step(metrics: Path) -> tuple[int | None, int]:
    """(inode, step of the last complete row) of metrics.jsonl; (None, 0) when there is none."""
    try:
        inode, text = os.stat(metrics).st_ino, metrics.read_bytes()
    except FileNotFoundError:
        return None, 0
    lines = text.split(b"\n")[:-1]  # a last line without its newline is still being written
    return inode, json.loads(lines[-1])["step"] if lines else 0


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def check_loads(ckpt: Path) -> None:
    state = torch.load(ckpt / "trainer_state" / "state.pt", weights_only=False)
    assert state["step"] == int(ckpt.name[5:]), ckpt
    load_model(ckpt / "model")


def kill_plan(rng: random.Random, first_row: float) -> list[tuple]:
    """What fires each kill: ("path", p) when OUT/p appears; ("staging", k) when the k-th checkpoint staging
    directory of the process appears; ("row", j, s) s seconds after the process logs its j-th metrics row;
    ("delay", s) s seconds after the start. `first_row`: seconds from the start to the first row of a fresh run."""
    plan = [("path", "tokenizer"), ("path", "data/shards.tmp")]
    for _ in range(KILLS - len(plan)):
        kind = rng.choices(["delay", "staging", "row"], [3, 4, 3])[0]
        if kind == "delay":
            plan.append(("delay", round(rng.uniform(0.02, 1.2) * first_row, 3)))
        elif kind == "staging":
            plan.append(("staging", rng.choice([1, 2])))  # the first: no progress; the second: one checkpoint more
        else:
            plan.append(("row", rng.randint(1, 4), round(rng.uniform(0.0, 0.01), 4)))
    return plan


def run_until(proc: subprocess.Popen, out: Path, trigger: tuple | None, start: float, deadline: float = 60.0):
    """Poll until the trigger fires, then SIGKILL the process: the seconds from the start to the kill; None when the
    process ended by itself first. trigger None: wait for the end, and return when the first row was logged."""
    seen, metrics = staging_dirs(out), out / "metrics.jsonl"  # left by the last kill: the resume removes them
    inode0 = last_step(metrics)[0]
    resumed_from = int(committed(out)[-1].name[5:]) if committed(out) else 0
    fired_at, appeared, first_row = None, 0, None
    while proc.poll() is None:
        now = time.monotonic()
        if trigger is None:
            if first_row is None and last_step(metrics)[1] > 0:
                first_row = now - start
        elif fired_at is None:
            kind = trigger[0]
            if kind == "delay":
                fire = now - start >= trigger[1]
            elif kind == "path":
                fire = (out / trigger[1]).exists()
            elif kind == "staging":
                current = {n for n in staging_dirs(out) if n.endswith(".tmp")}
                new = current - seen
                seen = (seen & current) | new  # a name counts again once it has gone (the resume removed it)
                appeared += len(new)
                fire = appeared >= trigger[1]
            else:
                inode, step = last_step(metrics)  # the resume rewrites the file (a new inode), then rows follow
                fire = inode is not None and inode != inode0 and step >= resumed_from + trigger[1]
            if fire or now - start > deadline:
                fired_at = now
        if fired_at is not None and now - fired_at >= (trigger[2] if trigger[0] == "row" else 0.0):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return now - start
        time.sleep(0.002)
    return first_row


@pytest.mark.slow
def test_twenty_sigkills_then_resume_is_bit_exact(corpus, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = launch(command(corpus, straight, False), tmp_path / "straight.log")
    first_row = run_until(proc, straight, None, time.monotonic())
    assert proc.returncode == 0 and first_row, (tmp_path / "straight.log").read_text()[-3000:]

    rng = random.Random(SEED)
    landed = []  # (trigger, what the kill interrupted, the latest checkpoint's step after it)
    launches = 0
    for trigger in kill_plan(rng, first_row):
        if trigger == ("path", "data/shards.tmp") and (killed / "data" / "shards" / "index.json").exists():
            trigger = ("delay", round(rng.uniform(0.02, 1.2) * first_row, 3))  # the shards are already written
        log, started_ns = tmp_path / f"launch{launches}.log", time.time_ns()
        proc = launch(command(corpus, killed, resume=launches > 0), log)
        launches += 1
        if run_until(proc, killed, trigger, time.monotonic()) is None:
            assert proc.returncode == 0, log.read_text()[-3000:]
            break  # finished before this kill
        prepared = (killed / "tokenizer" / "tokenizer.json").exists() and \
            (killed / "data" / "shards" / "index.json").exists()
        phase = ("data preparation" if not prepared else
                 "checkpoint write" if staging_dirs(killed, started_ns) else "other")
        ckpts = committed(killed)
        if ckpts:  # the checkpoint the next resume starts from loads, whatever the moment of the kill
            check_loads(ckpts[-1])
        landed.append((trigger, phase, int(ckpts[-1].name[5:]) if ckpts else 0))
    else:
        log = tmp_path / f"launch{launches}.log"
        proc = launch(command(corpus, killed, resume=True), log)
        launches += 1
        assert proc.wait() == 0, log.read_text()[-3000:]

    during_save = sum(phase == "checkpoint write" for _, phase, _ in landed)
    during_data = sum(phase == "data preparation" for _, phase, _ in landed)
    summary = (f"{len(landed)} of {KILLS} kills landed ({during_save} during a checkpoint write, {during_data} during "
               f"the data preparation) over {launches} launches: {landed}")
    print(summary)

    # every checkpoint left loads and is the uninterrupted run's, and nothing half-written or half-removed is left
    names = sorted(p.name for p in (killed / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (straight / "checkpoints").iterdir()), (names, summary)
    for name in names:
        check_loads(killed / "checkpoints" / name)
        ours, theirs = (load_file(d / "checkpoints" / name / "model" / "model.safetensors")
                        for d in (killed, straight))
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), (name, summary)

    # one metrics row per step, in order, with the uninterrupted run's losses
    ours, theirs = rows(killed), rows(straight)
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1)), summary
    assert [{k: r.get(k) for k in DETERMINISTIC} for r in ours] == \
           [{k: r.get(k) for k in DETERMINISTIC} for r in theirs], summary

    # the same data, and bit-identical final weights
    for f in ("tokenizer/tokenizer.json", "data/shards/index.json", "data/shards/00000.tokens.bin"):
        assert (killed / f).read_bytes() == (straight / f).read_bytes(), (f, summary)
    ours, theirs = (load_file(d / "model" / "model.safetensors") for d in (killed, straight))
    assert ours.keys() == theirs.keys(), summary
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), (k, summary)
    assert len(landed) >= KILLS // 2, summary  # the plan is meant to land most of its kills


KILL_MID_PRUNE = """
import os, shutil, signal, sys
real_rmtree = shutil.rmtree
def rmtree(path, *args, **kwargs):
    if "checkpoints/step_000002" in str(path):  # pruned after the last checkpoint (step 6, keep_last 2)
        real_rmtree(os.path.join(path, "model"))  # rmtree goes entry by entry: killed half-way through
        os.kill(os.getpid(), signal.SIGKILL)
    real_rmtree(path, *args, **kwargs)
shutil.rmtree = rmtree
from nanoseek.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_sigkill_while_pruning_the_last_old_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = command(corpus, out, False, steps=6, save_every=2)
    killed = subprocess.run([sys.executable, "-c", KILL_MID_PRUNE, *cmd[3:]], cwd=ROOT, env=ENV, capture_output=True,
                            text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    done = subprocess.run(command(corpus, out, True, steps=6, save_every=2), cwd=ROOT, env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    for name in names:  # every checkpoint directory left is a whole one
        check_loads(out / "checkpoints" / name)
    assert names == ["step_000004", "step_000006"]
