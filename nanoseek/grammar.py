"""Structured output: a grammar limits every step's choice to the tokens that keep the text valid.

A JSON schema (or "any JSON object") becomes an llguidance grammar; each request with one gets a matcher that
follows its tokens and gives, before every step, the set of tokens the grammar allows next, as a mask the
sampler applies to the logits (so greedy and sampled decoding alike only ever pick allowed tokens, and the
end-of-sentence token only where the text is complete). llguidance (a Rust engine, from PyPI as an abi3 wheel)
reads the `tokenizers` vocabulary as it is and computes a mask in tens of microseconds on a CPU.
"""

from __future__ import annotations

import json

import llguidance
import llguidance.torch as llguidance_torch
import torch

from .sampling import SamplingError
from .tokenizer import CALL_BEGIN, CALL_END, CALL_SEP, CALLS_BEGIN, CALLS_END, Tokenizer

COMPACT = {"whitespace_flexible": False}  # JSON without free whitespace: no room to wander between tokens


def json_grammar(schema: dict | None = None) -> str:
    """The grammar of JSON text matching `schema` (None: any JSON object)."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema or {"type": "object"}, defaults=COMPACT)
    except ValueError as e:
        raise SamplingError(f"the JSON schema is not usable: {e}") from None
    return _checked(grammar, "the JSON schema is not usable")


def tool_call_grammar(functions: list[dict], name: str | None = None, several: bool = True) -> str:
    """The grammar of a reply that calls tools in DeepSeek-V3's format (tokenizer.py): calls to any of `functions`
    ({name, parameters}; one or, if `several`, more), or exactly one to `name`; each call's arguments match its
    parameters schema."""
    chosen = [f for f in functions if name is None or f["name"] == name]
    if not chosen:
        raise SamplingError(f"no function named {name!r} among the tools")
    rules = [f'call: "{CALL_BEGIN}function{CALL_SEP}" (' + " | ".join(f"call_{i}" for i in range(len(chosen))) + ")"]
    for i, f in enumerate(chosen):  # names are \w+ (schemas.FunctionDefinition): safe inside a lark string
        schema = {**(f.get("parameters") or {"type": "object"}), "x-guidance": COMPACT}
        rules += [f'call_{i}: "{f["name"]}\\n```json\\n" args_{i} "\\n```{CALL_END}"',
                  f"args_{i}: %json {json.dumps(schema)}"]
    more = ' ("\\n" call)*' if several and name is None else ""
    lark = "\n".join([f'start: "{CALLS_BEGIN}" call{more} "{CALLS_END}"', *rules])
    return _checked(llguidance.LLMatcher.grammar_from_lark(lark), "the tools' parameters are not usable")


def _checked(grammar: str, problem: str) -> str:
    """The grammar, if llguidance accepts it; else a SamplingError: `problem`: its reason."""
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise SamplingError(f"{problem}: {error}")
    return grammar


class Grammars:
    """One model's vocabulary in llguidance's form, and matchers on it."""

    def __init__(self, tok: Tokenizer, vocab_size: int):
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tok.to_json(), n_vocab=vocab_size, eos_token=tok.eos_id)

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        m = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if m.is_error():
            raise SamplingError(f"grammar: {m.get_error()}")
        return m

    def allowed(self, matchers: list[llguidance.LLMatcher | None]) -> torch.Tensor:
        """The tokens each row may take next (n, V) bool; a row without a grammar may take any."""
        bits = llguidance_torch.allocate_token_bitmask(len(matchers), self.vocab_size)
        for row, m in enumerate(matchers):
            if m is not None:
                llguidance_torch.fill_next_token_bitmask(m, bits, row)
        shifts = torch.arange(32, dtype=torch.int32)
        return ((bits[:, :, None] >> shifts) & 1).flatten(1)[:, :self.vocab_size].bool()
