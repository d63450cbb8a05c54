import json

import pytest

from nanoseek.cli import main
from nanoseek.data import build_corpus, cut_steps, held_out_path, read_jsonl, write_jsonl
from nanoseek.errors import TaskError
from nanoseek.tasks import Mixture, MixtureEntry, get_family

MIXTURE = Mixture([MixtureEntry("addition", (1, 2), 2.0), MixtureEntry("countdown", (1, 1)),
                   MixtureEntry("rg:leg_counting", (1, 2), 0.5)])
FIELDS = {"prompt", "solution", "answer", "family", "difficulty", "meta"}


def test_corpus_is_deduplicated_split_and_deterministic():
    corpus = build_corpus(MIXTURE, 400, held_out=50, seed=1, progress=False)
    train, held = [p.prompt for p in corpus.train], [p.prompt for p in corpus.held_out]
    assert len(set(train)) == len(train) and len(set(held)) == len(held) == 50
    assert not set(train) & set(held)
    assert len(train) + len(held) + corpus.no_solution == 400 and corpus.no_solution > 0
    assert all(p.has_solution for p in corpus.train)  # reasoning-gym problems: held-out (evaluation) only
    assert any(p.family == "rg:leg_counting" for p in corpus.held_out)
    assert sum(c["train"] for c in corpus.per_family.values()) == len(train)
    again = build_corpus(MIXTURE, 400, held_out=50, seed=1, progress=False)
    assert again.train == corpus.train and again.held_out == corpus.held_out
    assert build_corpus(MIXTURE, 400, held_out=50, seed=2, progress=False).train != corpus.train


def test_cut_steps_keeps_a_share_of_worked_solutions():
    corpus = build_corpus(Mixture([MixtureEntry("addition", (2, 3))]), 1000, held_out=0, seed=0, progress=False)
    cut = cut_steps(corpus.train, 0.3, seed=0)
    answers = [p for p in cut if p.solution == f"<think> </think> <answer>{p.answer}</answer>"]
    assert 0.6 < len(answers) / len(cut) < 0.8
    assert all(p.solution == q.solution for p, q in zip(cut, corpus.train) if p not in answers)
    assert [p.prompt for p in cut] == [p.prompt for p in corpus.train] and cut == cut_steps(corpus.train, 0.3, seed=0)
    assert all(get_family("addition").score(p, p.solution) == 1.0 for p in answers)  # still right, just unworked
    assert cut_steps(corpus.train, 1.0) == corpus.train
    with pytest.raises(TaskError, match="worked_fraction"):
        cut_steps(corpus.train, 1.5)


def test_a_small_mixture_runs_out_instead_of_spinning():
    parity = Mixture([MixtureEntry("parity", (1, 1))])  # 2**6 distinct problems
    corpus = build_corpus(parity, 1000, held_out=10, progress=False)
    assert len(corpus.train) + len(corpus.held_out) == 64
    with pytest.raises(TaskError, match="held_out"):
        build_corpus(parity, 10, held_out=11, progress=False)


def test_jsonl_is_written_atomically_and_reads_back(tmp_path):
    corpus = build_corpus(MIXTURE, 60, held_out=10, progress=False)
    path = tmp_path / "sub" / "corpus.jsonl"
    path.parent.mkdir()
    path.write_text("old contents\n")
    assert write_jsonl(path, corpus.train) == path
    assert [p.name for p in path.parent.iterdir()] == ["corpus.jsonl"]  # no temporary file left behind
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(r) == FIELDS for r in records) and records[0]["prompt"] == corpus.train[0].prompt
    for p in read_jsonl(path):  # records carry what the verifier needs (Countdown's numbers and target)
        assert get_family(p.family).score(p, p.solution) == 1.0
    assert held_out_path(path) == tmp_path / "sub" / "corpus-held-out.jsonl"


def test_cli_data_build(tmp_path, capsys):
    out = tmp_path / "corpus.jsonl"
    assert main(["data", "build", "--recipe", "tasks-cpu-demo", "--out", str(out), "--n", "300",
                 "--held-out-fraction", "0.1", "--seed", "3"]) == 0
    captured = capsys.readouterr()
    train, held = read_jsonl(out), read_jsonl(tmp_path / "corpus-held-out.jsonl")
    assert len(train) == 270 and len(held) == 30
    assert not {p.prompt for p in train} & {p.prompt for p in held}
    assert "countdown" in captured.out and str(out) in captured.out and "held-out: 30 problems" in captured.out
    assert "300/300" in captured.err  # the progress bar
    assert main(["data", "build", "--recipe", "tasks-cpu-demo", "--out", str(out), "--n", "50",
                 "--held-out-n", "7"]) == 0
    assert len(read_jsonl(tmp_path / "corpus-held-out.jsonl")) == 7


@pytest.mark.parametrize("extra,match", [
    (["--recipe", "no-such-recipe"], "no shipped recipe"),
    (["--recipe", "tasks-cpu-demo", "--held-out-fraction", "1.5"], "--held-out-fraction"),
    (["--recipe", "tasks-cpu-demo", "--held-out-n", "500"], "held_out"),
    (["--recipe", "tasks-cpu-demo", "--worked-fraction", "-0.1"], "--worked-fraction"),
])
def test_cli_data_build_bad_input_exits_2(tmp_path, capsys, extra, match):
    assert main(["data", "build", "--out", str(tmp_path / "c.jsonl"), "--n", "100", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and match in err and not (tmp_path / "c.jsonl").exists()
