from pathlib import Path

import pytest
import torch

from nanoseek import ModelConfig
from nanoseek.data import build_corpus, held_out_path, write_jsonl
from nanoseek.tasks import Mixture
from nanoseek.train.trainer import Trainer
from nanoseek.train.recipe import TrainConfig, load_config
from nanoseek.tokenizer import train_tokenizer

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


def tiny_config(**overrides) -> ModelConfig:
    """The tiny preset with YaRN on (context 32 -> 128) unless overridden."""
    return ModelConfig.from_preset("tiny", **{"rope_scaling": YARN, "max_position_embeddings": 128, **overrides})


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Every test starts from seed 0 and the process's thread count (`nanoseek serve` lowers it in-process; a run
    in a subprocess with another count takes other reduction orders)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


TEXTS = ["What is 12+30? <think> 2+0=2, 1+3=4 </think> <answer>42</answer>", "Sort: 3, 1, 2", "hello world " * 5]


@pytest.fixture(scope="session")
def tok():
    """A small byte-level BPE (300 ids, one token per digit) trained on a few lines."""
    return train_tokenizer(TEXTS * 20, 300, digits=1)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """700 task problems of the CPU demo mixture, 20 of them held out (tasks-held-out.jsonl beside it)."""
    path = tmp_path_factory.mktemp("corpus") / "tasks.jsonl"
    c = build_corpus(Mixture.from_recipe("tasks-cpu-demo"), 700, 20, seed=0, progress=False)
    write_jsonl(held_out_path(path), c.held_out)
    write_jsonl(path, c.train)
    return path


def settings(corpus: Path, out: Path, **kw) -> TrainConfig:
    """A tiny pretraining run on the corpus: 8 steps of 4 x 64 tokens, a checkpoint every 4."""
    base = dict(preset="tiny", data=[str(corpus)], vocab_size=400, seq_len=64, batch_size=4, max_steps=8,
                warmup_steps=2, lr=3e-3, save_every=4, eval_n=0, out=str(out))
    return load_config(None, {}, **{**base, **kw})


@pytest.fixture(scope="session")
def base(corpus, tmp_path_factory) -> Path:
    """A tiny model pretrained for 20 steps on the corpus: a teacher / GRPO starting point."""
    from nanoseek.train.lm import run
    out = tmp_path_factory.mktemp("base")
    run(settings(corpus, out, max_steps=20))
    return out / "model"


def crash_after(monkeypatch, step: int) -> None:
    """Make the next training run stop with KeyboardInterrupt once `step` steps are done (a kill, in-process)."""
    original = Trainer.train_step

    def train_step(self):
        if self.step == step:
            monkeypatch.setattr(Trainer, "train_step", original)
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def memorised(tok, turns: list[tuple[list[int], str]], steps: int = 300, **config):
    """A tiny model (no MTP) trained until its greedy reply to each prompt (ids) is the given text: a model that
    does something known (reasons, calls a tool) for tests of what sits around it."""
    from nanoseek import ModelConfig, Transformer
    from nanoseek.engine import Engine
    from nanoseek.sampling import SamplingParams

    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=0,
                                                **config))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = [(prompt, torch.tensor([prompt + tok.encode(reply) + [tok.eos_id]])) for prompt, reply in turns]
    for _ in range(steps):
        loss = sum(torch.nn.functional.cross_entropy(model(ids).logits[0, len(prompt) - 1:-1], ids[0, len(prompt):])
                   for prompt, ids in rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    got = Engine(model, tok).generate([p for p, _ in turns], SamplingParams(max_new_tokens=200))
    assert [c.text for c in got] == [reply for _, reply in turns], "the model did not learn its replies"
    return model
