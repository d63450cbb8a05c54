"""Byte-level BPE (Hugging Face `tokenizers`) with DeepSeek-V3/R1's special tokens and chat format.

Reserved tokens, ids fixed at the start of every vocabulary we train, so they do not move with the corpus. The
strings are DeepSeek's own (fullwidth bar U+FF5C, lower one eighth block U+2581), as in DeepSeek-V3/R1's
tokenizer_config.json, so their tokenizers and ours share the chat format:

    0 <｜begin▁of▁sentence｜>  bos          special: decode(..., skip_special_tokens=True) drops them
    1 <｜end▁of▁sentence｜>    eos
    2 <｜▁pad▁｜>              pad
    3 <｜User｜>               user turn
    4 <｜Assistant｜>          assistant turn
    5-8 <think> </think> <answer> </answer>   added, never split, but kept by skip_special_tokens (rewards read them)

Text is split as DeepSeek-V3 splits it (numbers in runs of at most 3 digits, or of 1 if asked, CJK runs, words
with their leading punctuation, whitespace), then mapped to bytes, so any string encodes and decodes back exactly.

Chat format (DeepSeek-R1's template, without tools and without dropping earlier reasoning):

    {bos}{system messages joined by a blank line}<｜User｜>{user}<｜Assistant｜>{assistant}{eos}<｜User｜>...

and `add_generation_prompt` appends `<｜Assistant｜>`. `CHAT_TEMPLATE` is the same as Jinja, saved in
tokenizer_config.json for transformers, vLLM and SGLang; `Tokenizer.apply_chat_template` renders it in Python.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

from .errors import NanoseekError
from .rundir import write_text

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
RESERVED = (BOS, EOS, PAD, USER, ASSISTANT, *TAGS)  # ids 0..8, in this order
MODEL_MAX_LENGTH = 131072  # DeepSeek-V3's context; set `Tokenizer.model_max_length` to the model's before saving

# DeepSeek-V3's pre-tokenizer: three isolating splits (numbers in runs of at most `digits`, 3 in V3), then the
# byte-level map (its own regex off).
_SPLITS = ("[一-龥\u3040-ゟ゠-ヿ]+",
           r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
           r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
_RESERVED_RE = re.compile("|".join(map(re.escape, RESERVED)))
# DeepSeek-V3's tool-call format (special tokens in its vocabulary; plain text in ours):
#   <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGUMENTS\n```<｜tool▁call▁end｜>
#   (\n<｜tool▁call▁begin｜>... for more) <｜tool▁calls▁end｜>, and the results back as
#   <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>RESULT<｜tool▁output▁end｜> (\n<｜tool▁output▁begin｜>...)
#   <｜tool▁outputs▁end｜>
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_SEP, CALL_END = "<｜tool▁call▁begin｜>", "<｜tool▁sep｜>", "<｜tool▁call▁end｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
TOOLS_HEADER = "## Tools\n\nYou can call these functions (one or more, in the tool-call format):\n"
_CALL_RE = re.compile(re.escape(CALL_BEGIN) + r"(\w+)" + re.escape(CALL_SEP) + r"(.*?)\n```json\n(.*?)\n```"
                      + re.escape(CALL_END), re.DOTALL)

NO_THINKING = "<think> </think>"  # the reply's start when thinking is off: an empty think, as answer-only solutions


def thinking_prefill(thinking: bool | None) -> str:
    """What the generation prompt ends with: `<think>` (thinking on), an empty think (off), nothing (the model's
    choice). V3.1's hybrid template does the same with its `thinking` switch."""
    return "" if thinking is None else "<think>" if thinking else NO_THINKING


CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% set system = messages | selectattr('role', 'equalto', 'system') | map(attribute='content') | join('\\n\\n') %}"
    "{{ system }}"
    "{% if tools %}{{ ('\\n\\n' if system else '') + '" + TOOLS_HEADER.replace("\n", "\\n") + "' }}"
    "{% for tool in tools %}{{ '\\n```json\\n' + (tool['function'] | tojson) + '\\n```' }}{% endfor %}{% endif %}"
    "{% set ns = namespace(is_tool=false) %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set ns.is_tool = false %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '" + OUTPUTS_END + "' if ns.is_tool else '<｜Assistant｜>' }}{% set ns.is_tool = false %}"
    "{{ message['content'] or '' }}"
    "{% if message['tool_calls'] %}{{ '" + CALLS_BEGIN + "' }}"
    "{% for call in message['tool_calls'] %}{{ ('\\n' if not loop.first else '') + '" + CALL_BEGIN + "function"
    + CALL_SEP + "' + call['function']['name'] + '\\n```json\\n' + call['function']['arguments'] + '\\n```"
    + CALL_END + "' }}{% endfor %}{{ '" + CALLS_END + "' }}{% endif %}"
    "{{ eos_token }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ ('\\n' if ns.is_tool else '" + OUTPUTS_BEGIN + "') + '" + OUTPUT_BEGIN + "' + message['content'] + '"
    + OUTPUT_END + "' }}{% set ns.is_tool = true %}"
    "{% elif message['role'] != 'system' %}{{ raise_exception('unknown role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if ns.is_tool %}{{ '" + OUTPUTS_END + "' }}{% elif add_generation_prompt %}{{ '<｜Assistant｜>' }}"
    "{% if thinking is defined and thinking is not none %}{{ '<think>' if thinking else '" + NO_THINKING + "' }}"
    "{% endif %}{% endif %}"
)


class TokenizerError(NanoseekError):
    """A missing or malformed tokenizer file, a token not in the vocabulary, or a bad chat message."""


class TokenStream:
    """Token-by-token decoding: `step(id)` returns the text completed by that token, "" while a multi-byte
    character is still split across tokens. The pieces join to `decode(ids)` (up to a trailing incomplete
    character, which `decode` shows as U+FFFD)."""

    def __init__(self, tok: tokenizers.Tokenizer, skip_special_tokens: bool):
        self._tok, self._stream = tok, decoders.DecodeStream(skip_special_tokens=skip_special_tokens)

    def step(self, token_id: int) -> str:
        return self._stream.step(self._tok, token_id) or ""


class Tokenizer:
    """A `tokenizers.Tokenizer` with its bos/eos/pad tokens, DeepSeek's chat format and HF-directory save/load."""

    def __init__(self, tok: tokenizers.Tokenizer, bos_token: str = BOS, eos_token: str = EOS, pad_token: str = PAD,
                 model_max_length: int = MODEL_MAX_LENGTH, source: str = "tokenizer"):
        """`source` names where the token strings came from, for error messages."""
        self._tok = tok
        self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
        self.model_max_length = model_max_length
        ids = {}
        for role, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token)):
            ids[role] = tok.token_to_id(token)
            if ids[role] is None:
                raise TokenizerError(f"{source}: {role} token {token!r} is not in the vocabulary")
        self.bos_id, self.eos_id, self.pad_id = ids["bos"], ids["eos"], ids["pad"]

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (may be below the size asked for when the corpus was small)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int:
        """The id of a single token, e.g. token_id("<think>")."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{token!r} is not a token of this vocabulary")
        return i

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else ids

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """encode() of each text, in parallel."""
        prefix = [self.bos_id] if add_bos else []
        return [prefix + e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The whole tokenizer as `tokenizers` serialises it (tokenizer.json)."""
        return self._tok.to_str()

    def decode_stream(self, skip_special_tokens: bool = False) -> TokenStream:
        """A decoder to feed one token at a time (one per sequence being generated)."""
        return TokenStream(self._tok, skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping], add_generation_prompt: bool = False,
                            tokenize: bool = True, tools: Sequence[Mapping] | None = None,
                            thinking: bool | None = None) -> list[int] | str:
        """CHAT_TEMPLATE rendered in Python (`render_chat`): the ids (or with tokenize=False the text) transformers
        gives."""
        for token in (USER, ASSISTANT):  # a vocabulary without the turn tokens cannot hold this format
            self.token_id(token)
        text = render_chat(messages, add_generation_prompt, tools, thinking, self.bos_token, self.eos_token)
        return self.encode(text) if tokenize else text

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into `path`, each atomically; other files stay."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "pad_token": self.pad_token, "unk_token": None,
                  "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
                  "model_max_length": self.model_max_length, "chat_template": CHAT_TEMPLATE}
        write_text(path / "tokenizer.json", self._tok.to_str(pretty=True))
        write_text(path / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Ours or any HF tokenizer directory (a real DeepSeek one included): bos/eos/pad come from
        tokenizer_config.json when it names them, as strings or {"content": ...}; pad falls back to eos."""
        path = Path(path)
        file, config_file = path / "tokenizer.json", path / "tokenizer_config.json"
        if not file.is_file():
            raise TokenizerError(f"{file}: no such file; a tokenizer directory needs tokenizer.json")
        try:
            tok = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception for any malformed file
            raise TokenizerError(f"{file}: not a valid tokenizer.json ({e})") from None
        config = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{config_file}: not valid JSON ({e.msg}, line {e.lineno})") from None
            if not isinstance(config, dict):
                raise TokenizerError(f"{config_file}: expected a JSON object")

        def token(key: str) -> str | None:
            value = config.get(key)
            return value.get("content") if isinstance(value, dict) else value

        bos, eos = token("bos_token") or BOS, token("eos_token") or EOS
        pad = token("pad_token") or (PAD if tok.token_to_id(PAD) is not None else eos)
        source = str(config_file if config else file)
        return cls(tok, bos, eos, pad, int(config.get("model_max_length", MODEL_MAX_LENGTH)), source)


def _pieces(texts: Iterable[str]) -> Iterator[str]:
    """The texts cut around reserved tokens, as encode() sees them, so BPE learns no merges inside them."""
    for text in texts:
        yield from (p for p in _RESERVED_RE.split(text) if p)


def split_patterns(digits: int = 3) -> list[str]:
    """The regexes of the pre-tokenizer's isolating splits: DeepSeek-V3's with digits=3."""
    return [rf"\p{{N}}{{1,{digits}}}", *_SPLITS]


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = False, digits: int = 3) -> Tokenizer:
    """A byte-level BPE of `vocab_size` ids (the 9 reserved ones and 256 bytes included) trained on `texts`.
    Numbers split into runs of at most `digits` (DeepSeek-V3: 3; 1 gives one token per digit, which small models
    learn arithmetic from far faster). Deterministic: the same texts and settings give the same ids."""
    minimum = len(RESERVED) + 256
    if vocab_size < minimum:
        raise TokenizerError(f"vocab_size {vocab_size} is too small: the {len(RESERVED)} reserved tokens and "
                             f"256 bytes need {minimum}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), "isolated") for p in split_patterns(digits)]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(  # transformers' encode(text) starts with bos, as DeepSeek's
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    n_texts = 0

    def counted():
        nonlocal n_texts
        for piece in _pieces(texts):
            n_texts += 1
            yield piece

    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(RESERVED), show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(counted(), trainer)
    if n_texts == 0:
        raise TokenizerError("no text to train a tokenizer on")
    # The trainer adds every reserved token as special; the tags are plain added tokens (kept by skip_special_tokens).
    spec = json.loads(tok.to_str())
    for added in spec["added_tokens"]:
        added["special"] = added["content"] not in TAGS
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(spec)))


def render_chat(messages: Sequence[Mapping], add_generation_prompt: bool = False,
                tools: Sequence[Mapping] | None = None, thinking: bool | None = None, bos_token: str = BOS,
                eos_token: str = EOS) -> str:
    """CHAT_TEMPLATE's text. `tools` ({"type": "function", "function": {name, description, parameters}}) are
    described after the system prompt; an assistant message may carry `tool_calls` ({"function": {name, arguments
    (a JSON string)}}), and `tool` messages bring their results back. `thinking` (True / False) opens the reply with
    `<think>` or an empty think after the generation prompt (see `thinking_prefill`)."""
    _check_messages(messages)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    parts, is_tool = [bos_token, system], False
    if tools:
        parts.append(("\n\n" if system else "") + TOOLS_HEADER + "".join(
            f"\n```json\n{json.dumps(t['function'], ensure_ascii=False)}\n```" for t in tools))
    for m in messages:
        if m["role"] == "user":
            parts.append(USER + m["content"])
            is_tool = False
        elif m["role"] == "assistant":
            calls = m.get("tool_calls") or []
            parts.append((OUTPUTS_END if is_tool else ASSISTANT) + (m.get("content") or "")
                         + (CALLS_BEGIN + "\n".join(_render_call(c) for c in calls) + CALLS_END if calls else "")
                         + eos_token)
            is_tool = False
        elif m["role"] == "tool":
            parts.append(("\n" if is_tool else OUTPUTS_BEGIN) + OUTPUT_BEGIN + m["content"] + OUTPUT_END)
            is_tool = True
    if is_tool:
        parts.append(OUTPUTS_END)
    elif add_generation_prompt:
        parts.append(ASSISTANT + thinking_prefill(thinking))
    return "".join(parts)


def _check_messages(messages: Sequence[Mapping]) -> None:
    for i, m in enumerate(messages):
        if not (isinstance(m, Mapping) and isinstance(m.get("role"), str)):
            raise TokenizerError(f"chat message {i}: needs a string `role`, got {m!r}")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise TokenizerError(f"chat message {i}: unknown role {m['role']!r} (system, user, assistant or tool)")
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        if not (isinstance(m.get("content"), str) or calls and m.get("content") is None):
            raise TokenizerError(f"chat message {i}: needs a string `content` (or, from the assistant, tool_calls)")
        for call in calls or []:
            f = call.get("function") if isinstance(call, Mapping) else None
            if not (isinstance(f, Mapping) and isinstance(f.get("name"), str) and isinstance(f.get("arguments"), str)):
                raise TokenizerError(f"chat message {i}: a tool call needs function.name and function.arguments "
                                     f"(a JSON string), got {call!r}")


def _render_call(call: Mapping) -> str:
    f = call["function"]
    return f"{CALL_BEGIN}function{CALL_SEP}{f['name']}\n```json\n{f['arguments']}\n```{CALL_END}"


def parse_tool_calls(text: str) -> tuple[str, list[tuple[str, str]]]:
    """A reply in the tool-call format -> (the text before the calls, [(name, arguments), ...]); a reply without
    calls -> (text, [])."""
    start = text.find(CALLS_BEGIN)
    if start < 0:
        return text, []
    return text[:start], [(name, arguments) for _, name, arguments in _CALL_RE.findall(text[start:])]


class ToolCallStream:
    """`parse_tool_calls` for a stream: text passes until the calls begin (a possible start of their marker held
    back); the calls come out, parsed, with the final piece."""

    def __init__(self):
        self.buffer, self.calling = "", False

    def feed(self, text: str, final: bool = False) -> tuple[str, list[tuple[str, str]]]:
        self.buffer += text
        out = ""
        if not self.calling:
            at = self.buffer.find(CALLS_BEGIN)
            cut = at if at >= 0 else len(self.buffer) - (0 if final else _tag_start(self.buffer, CALLS_BEGIN))
            out, self.buffer, self.calling = self.buffer[:cut], self.buffer[cut:], at >= 0
        return out, parse_tool_calls(self.buffer)[1] if final and self.calling else []


def split_reasoning(text: str) -> tuple[str | None, str]:
    """A completion -> (reasoning, content) as DeepSeek's API returns them: the text inside the first
    `<think>...</think>` (None if there is none) and the rest, stripped. An unclosed `<think>` is all reasoning."""
    start = text.find("<think>")
    if start < 0:
        return None, text.strip()
    end = text.find("</think>", start)
    if end < 0:
        return text[start + len("<think>"):].strip(), text[:start].strip()
    return text[start + len("<think>"):end].strip(), (text[:start] + text[end + len("</think>"):]).strip()


class _Trimmed:
    """A text stream stripped at both ends: leading whitespace dropped, trailing whitespace held until more follows."""

    def __init__(self):
        self.started, self.held = False, ""

    def push(self, text: str, final: bool) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        text = self.held + text
        body = text.rstrip()
        self.held = "" if final else text[len(body):]
        return body


class ReasoningSplitter:
    """`split_reasoning` for a stream: `feed` text pieces as they come, get (reasoning, content) pieces whose
    concatenations equal split_reasoning(whole text) (with "" for None). A piece ending in what may be the start of
    the tag awaited next is held back until the next piece (or `final`) settles it."""

    TAGS = ("<think>", "</think>")

    def __init__(self):
        self.state = 0  # 0: before <think> (content), 1: inside (reasoning), 2: after </think> (content)
        self.buffer = ""
        self.reasoning, self.content = _Trimmed(), _Trimmed()

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buffer += text
        pieces = ["", ""]  # reasoning, content
        while True:
            channel = 0 if self.state == 1 else 1
            tag = self.TAGS[self.state] if self.state < 2 else ""
            at = self.buffer.find(tag) if tag else -1
            if at < 0:
                hold = 0 if final else _tag_start(self.buffer, tag)
                pieces[channel] += self.buffer[:len(self.buffer) - hold]
                self.buffer = self.buffer[len(self.buffer) - hold:]
                return self.reasoning.push(pieces[0], final), self.content.push(pieces[1], final)
            pieces[channel] += self.buffer[:at]
            self.buffer = self.buffer[at + len(tag):]
            self.state += 1


def _tag_start(text: str, tag: str) -> int:
    """The length of the longest proper prefix of `tag` that `text` ends with."""
    return next((k for k in range(len(tag) - 1, 0, -1) if text.endswith(tag[:k])), 0)
