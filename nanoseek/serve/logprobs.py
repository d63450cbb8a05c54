"""Log-probs in the two shapes of OpenAI's API (what lm-eval, vLLM's clients and the `openai` SDK read).

    chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}]}
    completions  {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: logprob}, ...],
                  "text_offset": [...]}   (with echo the prompt's tokens come first; the very first has no log-prob)

Values are the model's own log-probs (`sampling.TokenLogprob`); a token is shown as its decoded text.
"""

from __future__ import annotations

from collections.abc import Callable

from ..sampling import TokenLogprob


def _entry(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob], text_of: Callable[[int], str]) -> dict:
    return {"content": [{**_entry(text_of(e.token), e.logprob),
                         "top_logprobs": [_entry(text_of(t), lp) for t, lp in e.top]} for e in entries]}


def completion_logprobs(ids: list[int], entries: list[TokenLogprob | None], text_of: Callable[[int], str],
                        offset: int = 0) -> dict:
    """ids and their entries (None: no log-prob, the first prompt token); `offset`: where the first token's text
    starts in the choice's text. Each token's alternatives include the token itself, as OpenAI's did."""
    texts = [text_of(t) for t in ids]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else _by_text([*e.top, (e.token, e.logprob)], text_of) for e in entries],
            "text_offset": offsets}


def _by_text(pairs: list[tuple[int, float]], text_of: Callable[[int], str]) -> dict[str, float]:
    """{text: log-prob}; tokens that decode alike (pieces of one UTF-8 character) keep the larger."""
    out: dict[str, float] = {}
    for token, logprob in pairs:
        text = text_of(token)
        out[text] = max(logprob, out.get(text, logprob))
    return out
