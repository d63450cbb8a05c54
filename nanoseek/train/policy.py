"""The policy GRPO trains, behind one small interface, so the algorithm is written once for every kind of model.

    prompt(text)                       -> prompt ids (the chat-formatted user turn)
    generate(prompts, params)          -> completions (`engine.Completion`: token ids, text, finish reason)
    logprobs(ids, temperature, model,  -> log pi(ids[:, t+1] | ids[:, :t+1]) (N, L-1), entropies (N, L-1),
             token_mask, targets)         tokens per expert per MoE layer, counting the tokens token_mask (N, L)
                                          marks (padding excluded); empty for a dense model. targets (N, L-1):
                                          the log-probs wanted (zero elsewhere); default all
    save(dir), load(dir)               -> a Hugging Face directory (model + tokenizer), and the model read back
    greedy_accuracy(problems, n)       -> held-out greedy accuracy (`evaluate.greedy_accuracy`'s report)

`NanoseekPolicy` (here) is nanoseek's Transformer (any DeepseekV3 directory): rollouts come from the Engine on MLA's
latent cache; the router's expert loads drive the aux-loss-free bias update; prompts use nanoseek's chat format.
`HFPolicy` (hf_policy.py) is any other `transformers` causal LM. `grpo.load_policy(dir)` picks the kind from
`config.json`'s `model_type`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load_model
from ..cost import flops_per_token
from ..engine import Completion, Engine
from ..evaluate import greedy_accuracy
from ..model import Transformer
from ..sampling import SamplingParams
from ..tasks import Problem
from ..tokenizer import Tokenizer


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (..., V) and the ids they predict (...) -> those ids' log-probs at the sampling temperature (...) and
    the entropy of each distribution (...), the entropies without a gradient (a statistic)."""
    logp = (logits.float() / temperature).log_softmax(-1)
    chosen = logp.gather(-1, targets[..., None]).squeeze(-1)
    with torch.no_grad():
        entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


class NanoseekPolicy:
    """nanoseek's Transformer with its tokenizer; rollouts from the one Engine."""

    def __init__(self, model: Transformer, tok: Tokenizer, max_batch: int, max_len: int, compile: bool = False):
        self.model, self.tok, self.pad_id = model, tok, tok.pad_id
        self.engine = Engine(model, tok, max_batch=max_batch, max_len=min(model.cfg.max_position_embeddings, max_len),
                             compile=compile)

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    def prompt(self, text: str) -> list[int]:
        return self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)

    @contextlib.contextmanager
    def _engine_mode(self):
        """The engine sets eval mode; the model's own mode comes back after."""
        training = self.model.training
        try:
            yield
        finally:
            self.model.train(training)

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        with self._engine_mode():
            return self.engine.generate(prompts, params)

    def warmup(self, temperature: float) -> float:
        """With a compiled engine: build its decode graphs for rollouts at `temperature` (and greedy answers) before
        the first step, so that no step's time holds a compile. Returns the seconds."""
        with self._engine_mode():
            return self.engine.warmup([SamplingParams(temperature=temperature)])

    def logprobs(self, ids: torch.Tensor, temperature: float, model: torch.nn.Module | None = None,
                 token_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None):
        model = model if model is not None else self.model
        # with targets, the head and the softmax run only where a log-prob is wanted (GRPO: the completions)
        at = None if targets is None else F.pad(targets, (0, 1))
        out = model(ids, return_mtp=False, token_mask=token_mask, logits_at=at)
        loads = [c.detach() for c in out.router]
        if targets is None:
            return (*token_logprobs(out.logits[:, :-1], ids[:, 1:], temperature), loads)
        chosen, entropy = token_logprobs(out.logits, ids[:, 1:][targets], temperature)
        zeros = torch.zeros(targets.shape, dtype=chosen.dtype, device=chosen.device)
        return zeros.masked_scatter(targets, chosen), zeros.masked_scatter(targets, entropy), loads

    def flops_per_token(self, seq_len: int) -> float:
        return flops_per_token(self.model.cfg, seq_len)["training"]

    def save_tokenizer(self, path: Path) -> None:
        self.tok.save(path)

    def save(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.save_tokenizer(Path(path))

    def load(self, path: str | Path) -> Transformer:
        return load_model(path, device=self.device)

    def greedy_accuracy(self, problems: list[Problem], max_new_tokens: int) -> dict:
        return greedy_accuracy(self.model, self.tok, problems, max_new_tokens)
