"""The data of the language-model stages: documents -> tokenizer -> packed token shards.

Task problems (a task recipe, or JSONL with prompt/solution) become chat documents
`<bos><User>prompt<Assistant>solution<eos>` (SFT counts the loss on the solution alone); a problem whose `meta`
holds `tools` and `turns` (tool calls and their results before the final reply) becomes that conversation, the tools
described in its system prompt. JSONL rows with `text` and .txt / .parquet files become plain documents. `prepare` builds what a run needs under OUT/data and OUT/tokenizer,
reusing what a resumed run already built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..data import build_corpus, held_out_path, read_jsonl, write_jsonl
from ..errors import DataError
from ..shards import INDEX, TokenShards, write_shards
from ..tasks import Mixture, Problem
from ..tokenizer import Tokenizer, render_chat, train_tokenizer
from .recipe import TrainConfig


def chat_document(tok: Tokenizer, prompt: str, response: str, tools: list[dict] | None = None,
                  turns: list[dict] = ()) -> tuple[list[int], list[int]]:
    """Ids of a chat without its final end-of-sentence (the shards add it), and the mask of what follows the prompt
    (with `turns`, the tool results too: they are text the reply copies, not the model's to predict, but a token
    mask cannot split them off where the plain-text tool markers merge across a boundary)."""
    user = [{"role": "user", "content": prompt}]
    prefix = tok.apply_chat_template(user, add_generation_prompt=True, tools=tools)
    ids = tok.apply_chat_template(user + list(turns) + [{"role": "assistant", "content": response}], tools=tools)
    if ids[:len(prefix)] != prefix:
        raise DataError("the chat template does not extend the generation prompt; cannot mask the prompt")
    if ids and ids[-1] == tok.eos_id:
        ids = ids[:-1]
    return ids, [0] * len(prefix) + [1] * (len(ids) - len(prefix))


def conversation(row: dict) -> tuple[list[dict] | None, list[dict]]:
    """(tools, turns) of a task row: what a tool-using family keeps in its `meta`; (None, []) for the others."""
    meta = row.get("meta") or {}
    return meta.get("tools"), meta.get("turns") or []


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
                ids, mask = chat_document(tok, text, response, *conversation(row))
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
            tools, turns = conversation(row)
            if tools or turns:  # the tool descriptions and markers, as the documents will hold them
                text = render_chat([{"role": "user", "content": text}, *turns,
                                    {"role": "assistant", "content": response}], tools=tools)
            elif response is not None:
                text = f"{text}\n{response}"
            if text.strip():
                n += 1
                yield text
        if n == 0:
            raise DataError(f"{path}: no text to train a tokenizer on")
