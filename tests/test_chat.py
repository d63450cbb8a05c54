"""`nanoseek chat` (streaming, history, Ctrl-C) and `nanoseek generate`, driven through the CLI."""

import io
import json
import signal

import pytest

from nanoseek.chat import DIM, RESET, ReasoningPrinter
from nanoseek.cli import main
from nanoseek.engine import Engine

from .test_evaluate import save_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"))


class Terminal(io.StringIO):
    """stdout that remembers how many engine steps had run at each write."""

    def __init__(self, steps: list):
        super().__init__()
        self.steps, self.writes = steps, []

    def write(self, text):
        self.writes.append((len(self.steps), text))
        return super().write(text)


@pytest.fixture
def spied(monkeypatch):
    """Records every prompt the engine is given and counts its steps."""
    prompts, steps = [], []
    submit, step = Engine.submit, Engine.step

    def spy_submit(self, prompt_ids, params=None):
        prompts.append(list(prompt_ids))
        return submit(self, prompt_ids, params)

    def spy_step(self):
        steps.append(len(prompts))
        return step(self)

    monkeypatch.setattr(Engine, "submit", spy_submit)
    monkeypatch.setattr(Engine, "step", spy_step)
    return prompts, steps


def test_chat_streams_two_turns_and_keeps_the_history(model_dir, monkeypatch, spied):
    prompts, steps = spied
    out = Terminal(steps)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nand again\n"))
    monkeypatch.setattr("sys.stdout", out)
    assert main(["chat", "--model", str(model_dir), "--max-tokens", "12", "--temperature", "0", "--no-compile"]) == 0
    assert len(prompts) == 2 and len(prompts[1]) > len(prompts[0]) + 12  # turn 2 holds turn 1 and its answer
    assert prompts[1][:len(prompts[0])] == prompts[0]
    first_turn = {n for n, text in out.writes if text.strip() and 0 < n < steps.count(1)}
    assert len(first_turn) > 3  # the answer was written piece by piece while the engine stepped
    assert out.getvalue().count("> ") == 3 and "[max tokens]" in out.getvalue()


def test_ctrl_c_stops_the_answer_not_the_chat(model_dir, monkeypatch, spied, capsys):
    prompts, steps = spied
    step = Engine.step

    def interrupted_step(self):
        if len(steps) == 3:
            signal.raise_signal(signal.SIGINT)
        return step(self)

    monkeypatch.setattr(Engine, "step", interrupted_step)
    monkeypatch.setattr("sys.stdin", io.StringIO("first\nsecond\n/exit\nnever read\n"))
    assert main(["chat", "--model", str(model_dir), "--max-tokens", "40", "--temperature", "0", "--no-compile",
                 "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    assert out.count("[stopped]") == 1 and out.count("[max tokens]") == 1 and len(prompts) == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_reasoning_is_set_apart_even_when_tags_are_split():
    pieces = ["<th", "ink> let me", " think</thi", "nk> <answer>4</answer>"]
    plain, color = io.StringIO(), io.StringIO()
    for out, colored in ((plain, False), (color, True)):
        printer = ReasoningPrinter(out, colored)
        for piece in pieces:
            printer.write(piece)
        printer.close()
    assert plain.getvalue() == "[thinking] let me think\n[answer] <answer>4</answer>\n"
    assert color.getvalue() == f"{DIM}let me think{RESET} <answer>4</answer>\n"
    unfinished = io.StringIO()
    printer = ReasoningPrinter(unfinished, True)
    printer.write("<think> still going <")
    printer.close(" [stopped]")
    assert unfinished.getvalue() == f"{DIM}still going <{RESET} [stopped]\n"


def test_generate_json_from_a_file(model_dir, tmp_path, capsys):
    file = tmp_path / "prompts.jsonl"
    file.write_text('{"prompt": "What is 2+3?"}\n\n{"prompt": "Sort ascending: 3, 1, 2"}\n')
    args = ["generate", "--model", str(model_dir), "--file", str(file), "--json", "--max-tokens", "6",
            "--temperature", "0.8", "--seed", "1"]
    assert main(args) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["What is 2+3?", "Sort ascending: 3, 1, 2"]
    for r in rows:
        assert set(r) == {"prompt", "completion", "reasoning", "content", "finish_reason", "tokens"}
        assert 1 <= r["tokens"] <= 6 and r["finish_reason"] in ("stop", "length")
    assert main(args) == 0  # seeded: the same completions again
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == rows


def test_generate_raw_prompts_and_bad_files(model_dir, tmp_path, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "1+1=", "--prompt", "2+2=", "--raw",
                 "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("== ") == 2 and "== 2+2=" in out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt key"}\n')
    assert main(["generate", "--model", str(model_dir), "--file", str(bad)]) == 2
    assert "bad.jsonl line 1" in capsys.readouterr().err
