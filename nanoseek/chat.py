"""Talking to a model from the terminal: a streaming multi-turn chat, and one-shot generation for a list of prompts.

The chat keeps the whole conversation (reasoning included, as the chat template does) and streams each answer as the
engine produces it, the `<think>` part apart from the rest: dimmed on a terminal, labelled `[thinking]` / `[answer]`
otherwise. Ctrl-C while the model writes stops that answer; `/exit`, Ctrl-D or Ctrl-C at the prompt end the chat.
"""

from __future__ import annotations

import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from .engine import Engine
from .errors import DataError
from .evaluate import run_engine
from .sampling import SamplingError, SamplingParams
from .tokenizer import ReasoningSplitter, split_reasoning

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ReasoningPrinter:
    """Writes streamed text with the reasoning (the `<think>` part, split as the API splits it, see
    `ReasoningSplitter`) set apart: ANSI dim when `color`, else labelled `[thinking]` / `[answer]`."""

    def __init__(self, out: TextIO, color: bool):
        self.out, self.color = out, color
        self.splitter, self.mode = ReasoningSplitter(), None  # mode: None, "reasoning" or "content"

    def write(self, text: str, final: bool = False) -> None:
        reasoning, content = self.splitter.feed(text, final)
        for mode, piece in (("reasoning", reasoning), ("content", content)):
            if piece:
                self._switch(mode)
                self._emit(piece)

    def close(self, note: str = "") -> None:
        """Flush what was held back, end the reasoning style, add `note` and a newline."""
        self.write("", final=True)
        self._emit((RESET if self.color and self.mode == "reasoning" else "") + note + "\n")
        self.splitter, self.mode = ReasoningSplitter(), None

    def _switch(self, mode: str) -> None:
        if mode == "reasoning" and self.mode != mode:
            self._emit(DIM if self.color else "[thinking] ")
        elif mode == "content" and self.mode == "reasoning":
            self._emit(RESET + " " if self.color else "\n[answer] ")
        self.mode = mode

    def _emit(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


@contextlib.contextmanager
def interrupt_flag() -> Iterator[Callable[[], bool]]:
    """While inside, Ctrl-C sets a flag (read by calling what this yields) instead of raising KeyboardInterrupt, so
    that an engine step is never cut in half. Outside the main thread signals are not ours and nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hit = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: hit.append(signum))
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


def chat(engine: Engine, params: SamplingParams, system: str | None = None, out: TextIO | None = None,
         color: bool | None = None) -> list[dict]:
    """Read user turns with input() until `/exit` or end of input, stream each answer to `out` (stdout; coloured
    when it is a terminal unless `color` says otherwise); `/reset` clears the conversation. Returns the messages."""
    out = out or sys.stdout
    color = out.isatty() if color is None else color
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return messages
        if line == "/exit":
            return messages
        if line == "/reset":
            messages = list(start)
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        try:
            completion = engine.submit(engine.tok.apply_chat_template(messages, add_generation_prompt=True), params)
        except SamplingError as e:
            messages.pop()
            out.write(f"error: {e}; /reset starts a new conversation\n")
            continue
        printer = ReasoningPrinter(out, color)
        with interrupt_flag() as interrupted:
            while engine.has_work():
                if interrupted():
                    engine.cancel(completion)
                for event in engine.step():
                    printer.write(event.new_text)
        printer.close({"cancelled": " [stopped]", "length": " [max tokens]"}.get(completion.finish_reason, ""))
        messages.append({"role": "assistant", "content": completion.text})


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file: one per non-empty line, or for a `.jsonl` file one object with a "prompt" per line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
    prompts = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix != ".jsonl":
            prompts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {i}: not JSON ({e.msg})") from None
        if not (isinstance(row, dict) and isinstance(row.get("prompt"), str)):
            raise DataError(f"{path} line {i}: expected an object with a string \"prompt\"")
        prompts.append(row["prompt"])
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts


def generate(model, tok, prompts: list[str], params: SamplingParams, chat_format: bool = True,
             speculative: bool = False, batch_size: int = 16, progress: bool = True,
             compile: bool = False) -> list[dict]:
    """One completion per prompt, batched through the engine (prompt i sampled with seed `params.seed + i`).
    With `chat_format` a prompt is a user turn, else raw text after bos. Returns one record per prompt."""
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True) if chat_format
           else tok.encode(p, add_bos=True) for p in prompts]
    max_len = min(model.cfg.max_position_embeddings, max(map(len, ids)) + params.max_new_tokens + 1)
    engine = Engine(model, tok, max_batch=min(batch_size, len(ids)), max_len=max_len, speculative=speculative,
                    compile=compile)
    completions = [engine.submit(x, replace(params, seed=None if params.seed is None else params.seed + i))
                   for i, x in enumerate(ids)]
    run_engine(engine, len(completions), "generate", progress)
    records = []
    for prompt, c in zip(prompts, completions):
        reasoning, content = split_reasoning(c.text)
        records.append({"prompt": prompt, "completion": c.text, "reasoning": reasoning, "content": content,
                        "finish_reason": c.finish_reason, "tokens": len(c.token_ids)})
    return records
