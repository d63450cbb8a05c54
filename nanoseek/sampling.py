"""Sampling settings and the per-token decision: greedy, temperature, top-k, top-p, and the speculative test.

`speculative_accept` is the standard rejection step of speculative sampling (Leviathan et al. 2023, Chen et al.
2023): a draft token d from q is kept with probability min(1, p(d) / q(d)); otherwise a token is drawn from
norm(max(0, p - q)). The kept tokens are distributed exactly as p. With greedy settings it reduces to "keep d iff
d = argmax p", so speculative greedy output is identical to plain greedy output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import NanoseekError


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

    def __post_init__(self):
        rules = [("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "an int >= 1"),
                 ("temperature", 0 <= self.temperature <= 100, "in [0, 100]"),
                 ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                 ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "an int >= 0"),
                 ("stop", all(isinstance(s, str) and s for s in self.stop), "non-empty strings")]
        for name, ok, rule in rules:
            if not ok:
                raise SamplingError(f"{name} = {getattr(self, name)!r}: must be {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits (..., V) -> the distribution a token is drawn from: softmax(logits / T) cut to the top-k and the
    top-p nucleus and renormalised; one-hot on the argmax when greedy."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p >= params.top_p  # tokens after the nucleus is full
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def log_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The log-probabilities reported with each token: log softmax(logits / T), or of the raw logits when greedy
    (before top-k / top-p, as policy-gradient methods need them)."""
    return (logits.float() / (params.temperature or 1.0)).log_softmax(-1)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a (V,) distribution: the CDF inverted at one uniform number (a few times faster than
    `torch.multinomial` over a vocabulary, which dominated the sampling loop)."""
    if (probs == 1).any():
        return int(probs.argmax())
    cdf = probs.cumsum(-1)
    u = torch.rand((), generator=generator, device=probs.device, dtype=cdf.dtype) * cdf[-1]
    token = int(torch.searchsorted(cdf, u, right=True))  # the first token whose CDF exceeds u: p(token) > 0
    return token if token < len(probs) else int(probs.nonzero()[-1])  # u * total rounded up to the total


def speculative_accept(p: torch.Tensor, q: torch.Tensor, draft: int,
                       generator: torch.Generator | None) -> tuple[bool, int]:
    """Target p (V,), draft distribution q (V,), draft token -> (kept?, the token to emit)."""
    ratio = float(p[draft]) / max(float(q[draft]), 1e-30)
    if ratio >= 1 or float(torch.rand((), generator=generator, device=p.device)) < ratio:
        return True, draft
    residual = (p - q).clamp(min=0)
    total = residual.sum()
    return False, draw(residual / total if total > 0 else p, generator)
