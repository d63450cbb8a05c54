"""The policy GRPO trains, behind one small interface, so the algorithm is written once for every kind of model.

    prompt(text)                       -> prompt ids (the chat-formatted user turn)
    generate(prompts, params)          -> completions (`engine.Completion`: token ids, text, finish reason)
    logprobs(ids, temperature, model,  -> log pi(ids[:, t+1] | ids[:, :t+1]) (N, L-1), entropies (N, L-1),
             token_mask)                  tokens per expert per MoE layer, counting the tokens token_mask (N, L)
                                          marks (padding excluded); empty for a dense model
    save(dir), load(dir)               -> a Hugging Face directory (model + tokenizer), and the model read back
    greedy_accuracy(problems, n)       -> held-out greedy accuracy (`evaluate.greedy_accuracy`'s report)

Two kinds implement it:

* `NanoseekPolicy`: nanoseek's Transformer (any DeepseekV3 directory). Rollouts come from the Engine on MLA's
  latent cache; the router's expert loads drive the aux-loss-free bias update; prompts use nanoseek's chat format.
* `HFPolicy`: any other `transformers` causal LM (Llama, Qwen2, ...), loaded with `AutoModelForCausalLM`. Rollouts
  come from its own `generate` (left-padded batches, stop at end of sentence), where a logits processor draws
  each row's token with that row's generator, seeded per sample as the Engine seeds its requests, so a rollout does
  not depend on the rest of the batch or on the global RNG; prompts use the tokenizer's own chat template when it
  has one, else the plain text. A dense model reports no expert loads, so the Trainer moves no bias and logs no
  MaxVio.

`load_policy(dir)` picks the kind from `config.json`'s `model_type`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from ..cost import flops_per_token
from ..engine import Completion, Engine
from ..errors import TrainError
from ..model import Transformer
from ..sampling import RowSettings, SamplingParams, draw, probabilities
from ..tasks import Problem
from ..tokenizer import Tokenizer

NANOSEEK_MODEL_TYPES = ("deepseek_v3",)


def load_policy(init: str | Path, tokenizer: str | Path | None = None, device: torch.device | str = "cpu",
                max_batch: int = 16, max_len: int = 2048, compile: bool = False):
    """The policy for the model directory `init` (tokenizer from `tokenizer`, else from `init`): nanoseek's own for
    a DeepseekV3 directory, a `transformers` one for any other causal LM. Rollouts run in batches of `max_batch`,
    prompt + completion at most `max_len` tokens; `compile`: nanoseek's Engine runs its compiled decode step."""
    config = Path(init) / "config.json"
    model_type = None
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError) as e:
            raise TrainError(f"{config}: not a JSON object ({e})") from None
    if model_type is None or model_type in NANOSEEK_MODEL_TYPES:  # nanoseek's loader names what is wrong
        tok = Tokenizer.load(tokenizer or init)
        return NanoseekPolicy(Transformer.from_pretrained(init, device=device), tok, max_batch, max_len, compile)
    return HFPolicy.from_pretrained(init, tokenizer, device, max_batch, max_len)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, L, V) of ids (N, L) -> log-probs of ids[:, 1:] at the sampling temperature (N, L-1) and the
    entropy of each of those distributions (N, L-1)."""
    logp = (logits[:, :-1].float() / temperature).log_softmax(-1)
    chosen = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    return chosen, entropy


def sequence_logprobs(policy, ids: torch.Tensor, real: torch.Tensor, temperature: float, max_tokens: int,
                      model: torch.nn.Module | None = None):
    """`policy.logprobs` of right-padded rows ids (N, L) whose real tokens `real` (N, L) marks, run shortest first
    in micro-batches of at most `max_tokens` padded tokens (a longer row goes alone), each cut to its own longest
    row: the padding that one long rollout would force on every row is not computed. Returns log-probs and
    entropies (N, L-1) in the rows' order, zero past each micro-batch's width, and the expert loads summed."""
    lengths = real.sum(1).tolist()
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    chunks, current = [], []
    for i in order:  # lengths ascend, so a chunk's width is its last row's length
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            chunks.append(current)
            current = []
        current.append(i)
    chunks.append(current)
    width = ids.shape[1] - 1
    logps, entropies, loads = [], [], None
    for rows in chunks:
        n = max(2, lengths[rows[-1]])
        index = torch.tensor(rows, device=ids.device)
        logp, entropy, counts = policy.logprobs(ids[index, :n], temperature, model, token_mask=real[index, :n])
        logps.append(torch.nn.functional.pad(logp, (0, width - logp.shape[1])))
        entropies.append(torch.nn.functional.pad(entropy, (0, width - entropy.shape[1])))
        loads = counts if loads is None else [a + b for a, b in zip(loads, counts)]
    back = torch.tensor(order, device=ids.device).argsort()  # from length order to the rows' order
    return torch.cat(logps)[back], torch.cat(entropies)[back], loads


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

    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        training = self.model.training
        try:
            return self.engine.generate(prompts, params)  # (sets eval mode)
        finally:
            self.model.train(training)

    def logprobs(self, ids: torch.Tensor, temperature: float, model: torch.nn.Module | None = None,
                 token_mask: torch.Tensor | None = None):
        out = (model if model is not None else self.model)(ids, return_mtp=False, token_mask=token_mask)
        return (*token_logprobs(out.logits, ids, temperature), [c.detach() for c in out.router])

    def flops_per_token(self, seq_len: int) -> float:
        return flops_per_token(self.model.cfg, seq_len)["training"]

    def save_tokenizer(self, path: Path) -> None:
        self.tok.save(path)

    def save(self, path: str | Path) -> None:
        self.model.save_pretrained(path)
        self.save_tokenizer(Path(path))

    def load(self, path: str | Path) -> Transformer:
        return Transformer.from_pretrained(path, device=self.device)

    def greedy_accuracy(self, problems: list[Problem], max_new_tokens: int) -> dict:
        from ..evaluate import greedy_accuracy
        return greedy_accuracy(self.model, self.tok, problems, max_new_tokens)


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
                 token_mask: torch.Tensor | None = None):
        logits = (model if model is not None else self.model)(input_ids=ids, use_cache=False).logits
        return (*token_logprobs(logits, ids, temperature), [])

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
        from ..evaluate import _mean, problem_metrics
        params = [SamplingParams(max_new_tokens=max_new_tokens) for _ in problems]
        completions = self.generate([self.prompt(p.prompt) for p in problems], params)
        rows, by_family, by_task = [], defaultdict(list), defaultdict(list)
        for p, c in zip(problems, completions):
            metrics = problem_metrics(p, [c.text], [len(c.token_ids)])
            rows.append(metrics)
            by_family[p.family].append(metrics)
            by_task[f"{p.family}/{p.difficulty}"].append(metrics)
        return {**_mean(rows), "samples": 1, "by_family": {k: _mean(v) for k, v in sorted(by_family.items())},
                "by_task": {k: _mean(v) for k, v in sorted(by_task.items())},
                "examples": [{"prompt": p.prompt, "completion": c.text, "answer": p.answer}
                             for p, c in list(zip(problems, completions))[:3]]}
