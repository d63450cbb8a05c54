"""Sampling settings and the per-token decision: greedy, temperature, top-k, top-p, and the speculative test.

`speculative_accept` is the standard rejection step of speculative sampling (Leviathan et al. 2023, Chen et al.
2023): a draft token d from q is kept with probability min(1, p(d) / q(d)); otherwise a token is drawn from
norm(max(0, p - q)). The kept tokens are distributed exactly as p. With greedy settings it reduces to "keep d iff
d = argmax p", so speculative greedy output is identical to plain greedy output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .errors import NanoseekError


MAX_LOGPROBS = 20  # the most alternatives a token's log-prob report lists (OpenAI's limit)


class SamplingError(NanoseekError):
    pass


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no limit
    seed: int | None = None  # per request: the same seed gives the same tokens whatever else is in the batch
    stop: list[str] = field(default_factory=list)  # strings that end the text (not included in it)
    stop_token_ids: list[int] = field(default_factory=list)  # besides end-of-sentence
    ignore_eos: bool = False
    logprobs: int | None = None  # report every generated token's log-prob and this many alternatives (None: none)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    grammar: str | None = None  # only text this grammar accepts (grammar.py: e.g. JSON matching a schema)

    def __post_init__(self):
        rules = [("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an int >= 1"),
                 ("temperature", 0 <= self.temperature <= 100, "in [0, 100]"),
                 ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                 ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an int >= 0"),
                 ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings"),
                 *((name, getattr(self, name) is None or isinstance(getattr(self, name), int)
                    and 0 <= getattr(self, name) <= MAX_LOGPROBS, f"None or an int in [0, {MAX_LOGPROBS}]")
                   for name in ("logprobs", "prompt_logprobs"))]
        for name, ok, rule in rules:
            if not ok:
                raise SamplingError(f"{name} = {getattr(self, name)!r}: must be {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class TokenLogprob(NamedTuple):
    """A token's log-probability under the model's own distribution (log softmax of its logits: before temperature,
    top-k and top-p, as OpenAI and vLLM report it) and the most likely tokens at that place, with theirs."""
    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """logits (N, V) and the tokens that came next (N,) -> N TokenLogprobs with the k most likely tokens each."""
    raw = logits.float().log_softmax(-1)
    chosen = raw.gather(-1, tokens[:, None])[:, 0].tolist()
    values, ids = raw.topk(k, dim=-1) if k else (raw[:, :0], raw[:, :0].long())
    return [TokenLogprob(t, lp, list(zip(i, v))) for t, lp, i, v in
            zip(tokens.tolist(), chosen, ids.tolist(), values.tolist())]


class RowSettings(NamedTuple):
    """Each row's sampling settings as tensors (B,), so one batch of rows is sampled in one pass, and the cheaper
    of two ways to sample them all: "plain" (no row cuts its distribution) or "truncated" (some row has a top-k or
    top-p: the distributions are sorted, which costs more than the rest of the sampling)."""
    temperature: torch.Tensor  # 0: greedy
    top_k: torch.Tensor  # 0: no limit
    top_p: torch.Tensor
    mode: str

    @classmethod
    def of(cls, params: list[SamplingParams], device=None) -> "RowSettings":
        mode = "truncated" if any(p.top_k or p.top_p < 1 for p in params if not p.greedy) else "plain"
        return cls(torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device),
                   torch.tensor([p.top_k for p in params], dtype=torch.long, device=device),
                   torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device), mode)

    def repeat_interleave(self, n: int) -> "RowSettings":
        """Each row's settings n times in a row (n positions per row)."""
        return RowSettings(*(t.repeat_interleave(n) for t in self[:3]), self.mode)


def probabilities(logits: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """logits (B, V) -> the distribution each row's token is drawn from (B, V): softmax(logits / T) cut to the
    top-k and the top-p nucleus and renormalised; one-hot on the (first) argmax when greedy. Fixed shapes, no
    branches on values: the compiled decode step runs it."""
    argmax = F.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    greedy = rows.temperature == 0
    scaled = logits.float() / torch.where(greedy, 1.0, rows.temperature)[:, None]
    if rows.mode == "plain":
        return torch.where(greedy[:, None], argmax, scaled.softmax(-1))
    ranked, order = scaled.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(logits.shape[-1], device=logits.device)
    beyond_k = (rows.top_k[:, None] > 0) & (rank >= rows.top_k[:, None])
    probs = ranked.masked_fill(beyond_k, float("-inf")).softmax(-1)
    beyond_p = probs.cumsum(-1) - probs >= rows.top_p[:, None]  # tokens after the nucleus is full
    probs = probs.masked_fill(beyond_p, 0.0)
    probs = torch.zeros_like(probs).scatter(-1, order, probs / probs.sum(-1, keepdim=True))
    return torch.where(greedy[:, None], argmax, probs)


def log_probs(logits: torch.Tensor, rows: RowSettings) -> torch.Tensor:
    """The log-probabilities reported with each token (B, V): log softmax(logits / T), or of the raw logits when
    greedy (before top-k / top-p, as policy-gradient methods need them)."""
    temperature = torch.where(rows.temperature == 0, 1.0, rows.temperature)
    return (logits.float() / temperature[:, None]).log_softmax(-1)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One token per row of probs (B, V), the CDF inverted at each row's uniform number u (B,) in [0, 1): the first
    token whose CDF exceeds u times the total, so a token of probability 0 is never drawn."""
    cdf = probs.cumsum(-1)
    token = (cdf <= u[:, None] * cdf[:, -1:]).sum(-1)
    last_possible = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(-1)  # u * total rounded up to the total
    return torch.minimum(token, last_possible)


def draw_rows(probs: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
    """One token from each row of probs (n, V), with the next uniform number of that row's generator."""
    u = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])
    return draw(probs, u).tolist()


def sample(logits: torch.Tensor, rows: RowSettings, u: torch.Tensor,
           allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V), uniforms u (B,), the tokens each row may take (B, V) bool or None (any) -> each row's token
    (B,) and its reported log-prob (B,)."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    token = draw(probabilities(logits, rows), u)
    return token, log_probs(logits, rows).gather(-1, token[:, None])[:, 0]


def speculative_accept(p: torch.Tensor, q: torch.Tensor, drafts: list[int], generators: list[torch.Generator | None]
                       ) -> tuple[list[bool], list[int]]:
    """Targets p (n, V), draft distributions q (n, V), each row's draft token and generator -> for each row, whether
    its draft is kept and the token to emit. A row draws a uniform number only where p(d) < q(d), and one more where
    its draft is rejected, so its tokens do not depend on the other rows."""
    at = torch.tensor(drafts, device=p.device)[:, None]
    ratios = [a / max(b, 1e-30) for a, b in zip(p.gather(1, at)[:, 0].tolist(), q.gather(1, at)[:, 0].tolist())]
    kept = [r >= 1 or float(torch.rand((), generator=g, device=p.device)) < r for r, g in zip(ratios, generators)]
    tokens = list(drafts)
    rejected = [i for i, k in enumerate(kept) if not k]
    if rejected:
        residual = (p[rejected] - q[rejected]).clamp(min=0)
        total = residual.sum(-1, keepdim=True)
        redraw = draw_rows(torch.where(total > 0, residual / total, p[rejected]), [generators[i] for i in rejected])
        for i, token in zip(rejected, redraw):
            tokens[i] = token
    return kept, tokens
