"""Long context: the passkey (needle-in-a-haystack) family, evaluation by length and depth, and the context-extension
stage that writes YaRN into a model's config."""

import json
import random

import numpy as np
import pytest

from nanoseek import ModelConfig, Transformer
from nanoseek.data import write_jsonl
from nanoseek.errors import TaskError, TrainError
from nanoseek.evaluate import evaluate, greedy_accuracy
from nanoseek.report import niah_grid, write_report
from nanoseek.rundir import write_json
from nanoseek.sampling import SamplingParams
from nanoseek.tasks import get_family
from nanoseek.tasks.passkey import DEPTHS, FILLER, sentences
from nanoseek.tokenizer import Tokenizer
from nanoseek.train import run
from nanoseek.train.recipe import load_config

from .conftest import settings

PASSKEY = get_family("passkey")


@pytest.mark.parametrize("level", [1, 3, 8])
def test_a_passkey_problem_hides_its_key_at_its_depth(level):
    rng = random.Random(level)
    for _ in range(20):
        p = PASSKEY.generate(rng, level)
        needle = f"The pass key is {p.answer}."
        before, _, after = p.prompt.partition(needle)
        assert before.count(".") + after.count(".") == sentences(level) and after.endswith("What is the pass key?")
        assert before.count(".") == round(p.meta["depth"] * sentences(level)) and p.meta["depth"] in DEPTHS
        assert set(before.replace(".", ".|").split("|")[:-1]) <= {f" {s}" for s in FILLER} | set(FILLER)
        assert len(p.answer) == 5 and PASSKEY.score(p, p.solution) == 1.0
        assert PASSKEY.score(p, f"<think> </think> <answer>{int(p.answer) + 1}</answer>") == 0.0


def test_a_passkey_problem_can_fill_a_length_between_levels():
    rng = random.Random(0)
    for n, level in ((1, 1), (5, 3), (100, 7), (128, 8), (1000, 10)):
        p = PASSKEY.with_sentences(rng, n)
        assert p.prompt.count(".") == n + 1 and p.meta["difficulty"] == level  # the needle's sentence besides
    assert PASSKEY.with_sentences(random.Random(3), 2 ** 7).prompt == PASSKEY.generate(random.Random(3), 8).prompt
    with pytest.raises(TaskError, match="filler sentences must be a positive integer, got 0"):
        PASSKEY.with_sentences(rng, 0)


def test_an_evaluation_of_passkeys_reads_by_length_and_depth_and_draws_the_heat_map(tok, tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=tok.vocab_size)).eval()
    problems = [PASSKEY.generate(random.Random(i), 1 + i % 2) for i in range(12)]
    report = evaluate(model, tok, problems, params=SamplingParams(max_new_tokens=4), progress=False)
    cells = {f"passkey/{p.difficulty}/{p.meta['depth']:g}" for p in problems}
    assert set(report["by_depth"]) == cells
    assert sum(r["n"] for r in report["by_depth"].values()) == len(problems)
    lengths = {k: r["prompt_tokens"] for k, r in report["by_task"].items()}
    assert lengths["passkey/2"] > lengths["passkey/1"] > 0
    levels, depths, grid, tokens = niah_grid(report)
    assert levels == [1, 2] and tokens == [lengths["passkey/1"], lengths["passkey/2"]]
    assert np.isfinite(grid).sum() == len(cells) and depths == sorted({p.meta["depth"] for p in problems})
    write_json(tmp_path / "evals" / "tiny.json", report)
    (tmp_path / "pretrain").mkdir()
    (tmp_path / "pretrain" / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')  # a run directory
    text = write_report(tmp_path).read_text()
    assert "## Needle in a haystack" in text and (tmp_path / "plots" / "niah.png").stat().st_size > 0


@pytest.mark.slow
def test_a_tiny_model_extended_4x_retrieves_needles_it_missed(tmp_path):
    """V3's extension at test scale. A tiny model pretrained on passkey problems that fit in L = 64 tokens (1-6
    filler sentences; the shortest passkey chat takes 37 tokens, so L = 32 holds none) misses every needle in problems
    four times as long; 300 steps of `nanoseek extend` (YaRN, factor 4) at 4L find the needles next to the question.
    Those steps reliably reach that much; whether the copy from deeper in the haystack comes back within them
    depends on the run's last bits (it took ~1,000 steps where it did)."""
    def problems(rng, lo, hi, n):
        return [PASSKEY.with_sentences(rng, rng.randint(lo, hi)) for _ in range(n)]

    rng = random.Random(0)
    write_jsonl(tmp_path / "short.jsonl", problems(rng, 1, 6, 3000))
    write_jsonl(tmp_path / "long.jsonl", problems(rng, 1, 28, 3000))
    short, long = problems(random.Random(9), 6, 6, 40), problems(random.Random(9), 20, 28, 40)  # ~60, 130-190 tokens
    near = [p for p in long if p.meta["depth"] == 1.0]  # the needle just before the question
    common = dict(preset="tiny", vocab_size=400, tokenizer_digits=1, windows="documents", warmup_steps=20,
                  save_every=10_000, eval_n=0)
    run(load_config(None, {}, **common, data=[str(tmp_path / "short.jsonl")], seq_len=64, batch_size=32, lr=3e-3,
                    max_steps=2000, model_overrides={"num_nextn_predict_layers": 0}, out=str(tmp_path / "base")))
    run(load_config(None, {}, **common, stage="extend", init=str(tmp_path / "base" / "model"),
                    data=[str(tmp_path / "long.jsonl")], seq_len=256, batch_size=8, lr=1e-3, max_steps=300,
                    extend={"factor": 4, "original_length": 64}, out=str(tmp_path / "extended")))
    tok = Tokenizer.load(tmp_path / "base" / "model")
    base, extended = (Transformer.from_pretrained(tmp_path / name / "model").eval() for name in ("base", "extended"))
    accuracy = {(name, length): greedy_accuracy(model, tok, ps, max_new_tokens=16)["pass@1"]
                for name, model in (("base", base), ("extended", extended))
                for length, ps in (("L", short), ("4L", long), ("4L near", near))}
    assert len(near) >= 8, len(near)
    assert accuracy["base", "L"] >= 0.6 and accuracy["base", "4L"] <= 0.1, accuracy  # it retrieves, within L only
    assert accuracy["base", "4L near"] <= 0.1 and accuracy["extended", "4L near"] >= 0.9, accuracy
    assert accuracy["extended", "4L"] >= accuracy["base", "4L"] + 0.2, accuracy


def test_extension_writes_yarn_into_the_config_and_keeps_the_weights(base, corpus, tmp_path):
    cfg = settings(corpus, tmp_path / "extended", stage="extend", init=str(base), seq_len=256, max_steps=1, lr=1e-12,
                   warmup_steps=0, extend={"factor": 4, "original_length": 64})
    run(cfg)
    config = json.loads((tmp_path / "extended" / "model" / "config.json").read_text())
    assert config["rope_scaling"] == {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                      "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert config["max_position_embeddings"] == 256
    before, after = Transformer.from_pretrained(base), Transformer.from_pretrained(tmp_path / "extended" / "model")
    assert after.cfg.yarn is not None and after.layers[0].self_attn.scale > before.layers[0].self_attn.scale
    moved = max((a - b).abs().max().item() for (_, a), (_, b) in zip(after.named_parameters(),
                                                                       before.named_parameters()))
    assert moved < 1e-6  # one step at lr 1e-12: the weights are the pretrained ones
    # a second phase extends the extended model further: the original length carries over
    run(settings(corpus, tmp_path / "phase2", stage="extend", init=str(tmp_path / "extended" / "model"), seq_len=128,
                 max_steps=1, extend={"factor": 16}))
    config = json.loads((tmp_path / "phase2" / "model" / "config.json").read_text())
    assert config["rope_scaling"]["factor"] == 16.0 and config["rope_scaling"]["original_max_position_embeddings"] == 64
    assert config["max_position_embeddings"] == 1024


def test_a_plain_extension_grows_the_context_and_leaves_rope_as_it_was(base, corpus, tmp_path):
    run(settings(corpus, tmp_path / "plain", stage="extend", init=str(base), seq_len=128, max_steps=1, lr=1e-12,
                 warmup_steps=0, extend={"factor": 4, "original_length": 64, "rope": "plain"}))
    config = json.loads((tmp_path / "plain" / "model" / "config.json").read_text())
    assert config["rope_scaling"] is None and config["max_position_embeddings"] == 256
    before, after = Transformer.from_pretrained(base), Transformer.from_pretrained(tmp_path / "plain" / "model")
    assert after.layers[0].self_attn.scale == before.layers[0].self_attn.scale


@pytest.mark.parametrize("keys, message", [
    ({"extend": {"factor": 4}}, "extend.original_length: .* has no YaRN settings"),
    ({"seq_len": 512, "extend": {"factor": 4, "original_length": 64}}, "seq_len 512: longer than the extended context"),
])
def test_extension_mistakes_are_named(base, corpus, tmp_path, keys, message):
    with pytest.raises(TrainError, match=message):
        run(settings(corpus, tmp_path / "x", stage="extend", init=str(base), max_steps=1, **keys))


def test_extension_settings_are_checked():
    with pytest.raises(TrainError, match="'extend.factor' = 1.0: must be > 1"):
        load_config(None, {}, stage="extend", init="m", data=["x"], extend={"factor": 1.0})
    with pytest.raises(TrainError, match="'extend.rope' = 'ntk': must be yarn or plain"):
        load_config(None, {}, stage="extend", init="m", data=["x"], extend={"rope": "ntk"})
    with pytest.raises(TrainError, match="'init' = None: must be set for GRPO and context extension"):
        load_config(None, {}, stage="extend", data=["x"])
