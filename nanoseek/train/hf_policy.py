"""Any `transformers` causal LM (Llama, Qwen2, ...) as the policy GRPO trains (the interface is in policy.py).

Rollouts come from the model's own `generate` (left-padded batches, stop at end of sentence), where a logits
processor draws each row's token with that row's generator, seeded per sample as the Engine seeds its requests, so a
rollout does not depend on the rest of the batch or on the global RNG; prompts use the tokenizer's own chat template
when it has one, else the plain text. A dense model reports no expert loads, so the Trainer moves no bias and logs
no MaxVio.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..engine import Completion
from ..errors import TrainError
from ..evaluate import grade
from ..sampling import RowSettings, SamplingParams, draw, probabilities
from ..tasks import Problem
from .policy import token_logprobs


class RowSampler:
    """A `transformers` logits processor that draws each row's next token itself, as the Engine does
    (`sampling.probabilities`: temperature, top-k, top-p, the argmax when greedy; `sampling.draw` with the row's own
    generator), and leaves only that token possible, so `generate` in greedy mode emits it."""

    def __init__(self, params: list[SamplingParams], device: torch.device):
        self.rows = RowSettings.of(params, device)
        self.generators = []
        for p in params:
            g = torch.Generator(device=device)
            g.manual_seed(p.seed if p.seed is not None else int(torch.randint(2**62, ())))
            self.generators.append(g)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.cat([torch.rand(1, generator=g, device=scores.device) for g in self.generators])
        chosen = draw(probabilities(scores, self.rows), u)
        out = torch.full_like(scores, float("-inf"))
        out.scatter_(1, chosen[:, None], 0.0)
        return out


class HFPolicy:
    """A `transformers` causal LM with its tokenizer; rollouts from its own `generate`."""

    def __init__(self, model, tokenizer, max_batch: int, max_len: int):
        self.model, self.tok, self.max_batch = model, tokenizer, max_batch
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_len = min(limit, max_len) if limit else max_len
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        eos += gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        self.eos_ids = sorted(set(eos))
        if not self.eos_ids:
            raise TrainError("the tokenizer and generation_config name no end-of-sentence token; rollouts could "
                             "never stop")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    @classmethod
    def from_pretrained(cls, init: str | Path, tokenizer: str | Path | None, device, max_batch: int, max_len: int):
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise TrainError(f"{init}: not a DeepseekV3 directory; other models load through transformers "
                             "(pip install 'nanoseek[hf]')") from None
        tok = AutoTokenizer.from_pretrained(str(tokenizer or init))
        model = AutoModelForCausalLM.from_pretrained(str(init), dtype=torch.float32).to(device)
        return cls(model, tok, max_batch, max_len)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self, text: str) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                tokenize=False)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(text)["input_ids"]

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        training = self.model.training
        self.model.eval()
        try:
            out = []
            for start in range(0, len(prompts), self.max_batch):
                out += self._generate(prompts[start:start + self.max_batch], params[start:start + self.max_batch],
                                      first_id=start)
            return out
        finally:
            self.model.train(training)

    def _generate(self, prompts: list[list[int]], params: list[SamplingParams], first_id: int) -> list[Completion]:
        from transformers import GenerationConfig, LogitsProcessorList

        device = self.device
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, p in enumerate(prompts):  # left padding: every row's last prompt token is at the same column
            ids[row, width - len(p):] = torch.tensor(p)
            attention[row, width - len(p):] = 1
        n = min(max(p.max_new_tokens for p in params), self.max_len - width)
        if n < 1:
            raise TrainError(f"a prompt of {width} tokens leaves no room to generate in a context of {self.max_len}")
        config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=self.eos_ids,
                                  pad_token_id=self.pad_id)
        saved = self.model.generation_config  # `generate` would fill unset fields from it (repetition penalty, ...)
        self.model.generation_config = config
        try:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                seqs = self.model.generate(input_ids=ids.to(device), attention_mask=attention.to(device),
                                           generation_config=config,
                                           logits_processor=LogitsProcessorList([RowSampler(params, device)]))
        finally:
            self.model.generation_config = saved
        completions = []
        for row, (prompt, p) in enumerate(zip(prompts, params)):
            tokens = seqs[row, width:].tolist()[:p.max_new_tokens]
            stop = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
            c = Completion(first_id + row, list(prompt))
            if stop is None:
                c.token_ids, c.finish_reason = tokens, "length"
            else:  # the stop token is kept in token_ids and left out of the text, as the Engine does
                c.token_ids, c.finish_reason = tokens[:stop + 1], "stop"
            c.text = self.tok.decode(tokens[:stop] if stop is not None else tokens)
            completions.append(c)
        return completions

    def logprobs(self, ids: torch.Tensor, temperature: float, model: torch.nn.Module | None = None,
                 token_mask: torch.Tensor | None = None, targets: torch.Tensor | None = None):
        logits = (model if model is not None else self.model)(input_ids=ids, use_cache=False).logits
        chosen, entropy = token_logprobs(logits[:, :-1], ids[:, 1:], temperature)
        if targets is not None:  # zero where not wanted, as NanoseekPolicy's
            chosen, entropy = chosen * targets, entropy * targets
        return chosen, entropy, []

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, estimated: 3 x (2 x the matmul weights + attention over (seq_len + 1) / 2 keys
        of width hidden_size in every layer)."""
        embedding = self.model.get_input_embeddings().weight
        head = self.model.get_output_embeddings()
        weights = sum(p.numel() for p in self.model.parameters() if p.ndim >= 2) - embedding.numel()
        if head is not None and head.weight is embedding:  # tied: the head's matmul still counts
            weights += embedding.numel()
        cfg = self.model.config
        attention = 4 * getattr(cfg, "num_hidden_layers", 0) * getattr(cfg, "hidden_size", 0) * (seq_len + 1) / 2
        return 3 * (2 * weights + attention)

    def save_tokenizer(self, path: Path) -> None:
        self.tok.save_pretrained(str(path))

    def save(self, path: str | Path) -> None:
        self.model.save_pretrained(str(path))
        self.save_tokenizer(Path(path))

    def load(self, path: str | Path):
        from transformers import AutoModelForCausalLM
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(self.device)

    def greedy_accuracy(self, problems: list[Problem], max_new_tokens: int) -> dict:
        """The report of `evaluate.greedy_accuracy`, from this model's greedy completions."""
        params = [SamplingParams(max_new_tokens=max_new_tokens) for _ in problems]
        completions = self.generate([self.prompt(p.prompt) for p in problems], params)
        return grade(problems, [[c] for c in completions], samples=1)
