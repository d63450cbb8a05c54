"""Long context: the passkey (needle-in-a-haystack) family, evaluation by length and depth, and the context-extension
stage that writes YaRN into a model's config."""

import json
import random

import numpy as np
import pytest

from nanoseek import ModelConfig, Transformer
from nanoseek.errors import TrainError
from nanoseek.evaluate import evaluate
from nanoseek.report import niah_grid, write_report
from nanoseek.rundir import write_json
from nanoseek.sampling import SamplingParams
from nanoseek.tasks import get_family
from nanoseek.tasks.passkey import DEPTHS, FILLER, sentences
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
