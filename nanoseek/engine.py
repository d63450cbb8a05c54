"""The one generation engine (evaluation, GRPO rollouts, chat, the server): continuous batching on MLA's latent cache.

Every sequence owns a row ("slot") of a preallocated absorbed-MLA cache holding only c^KV and k^R per token per
layer. Requests admitted together are prefilled in one forward (right-padded: causal attention keeps the padding
out of every real position, and decoding overwrites the padded cache entries before any query can see them), in
chunks of `prefill_chunk` tokens so a long prompt never materialises a T x T score matrix; a prompt submitted
several times (GRPO's G samples of one prompt) is prefilled once and its cache rows copied. Then all active
sequences decode together, one token per step, each at its own position (rows of different lengths share one
forward). Finished sequences free their slot at once (the last active row moves into it), so requests join and
leave between decode steps.

The decode step is one fixed-shape function (`decode_step`): the tokens, positions and per-row sampling settings
go in as tensors, the model runs its fixed-shape path (`Transformer.forward(cache_len=...)`), and the sampled
tokens and their log-probs come out; nothing in it depends on the values of the batch. With `compile=True` it
(and speculation's draft and verify steps) run through `torch.compile` (inductor: fused C++ kernels on the CPU,
Triton on a GPU), two graphs per step (one row, any other number), whatever the positions, through inductor's C++
wrapper on a CPU. On a GPU the compiled step's kernels are replayed as CUDA graphs (see `compiled`). The seconds
spent compiling are counted in `warmup_seconds`, and where compilation fails the engine warns once and decodes
eagerly.

With `speculative=True` the MTP module drafts one token per step and the main model checks it in the same forward
(two tokens per row): greedy output is identical to plain greedy, sampled output keeps its distribution
(`sampling.speculative_accept`), and the acceptance rate is counted.

A request may ask for the model's own log-probs of its generated and prompt tokens with their most likely
alternatives (`SamplingParams.logprobs`, `prompt_logprobs`), and for text that a grammar accepts
(`SamplingParams.grammar`, grammar.py): the step then takes a mask of the allowed tokens, and a batch holding such
a request has its drafts checked against the grammar too (the mask after each draft is computed ahead).
"""

from __future__ import annotations

import functools
import itertools
import time
import warnings
from collections import deque
from dataclasses import dataclass, field, replace
from typing import NamedTuple
from unittest import mock

import torch
from torch._dynamo import config as dynamo_config
from torch._dynamo.utils import counters
from torch._inductor.fx_passes import decompose_mem_bound_mm
from torch.fx.experimental import _config as fx_config

from .grammar import Grammars
from .model import Transformer
from .model.attention import LatentCache, positions_of
from .sampling import (RowSettings, SamplingError, SamplingParams, TokenLogprob, draw_rows, log_probs, probabilities,
                       sample, speculative_accept, token_logprobs)
from .tokenizer import Tokenizer


@dataclass
class Completion:
    id: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)  # generated, the stop token included
    logprobs: list[float] = field(default_factory=list)  # one per generated token, see sampling.log_probs
    # with `params.logprobs` / `params.prompt_logprobs`: the model's own log-probs (sampling.TokenLogprob) of each
    # generated token / each prompt token (None for the first)
    token_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    text: str = ""  # decoded, without the stop token or stop string
    finish_reason: str | None = None  # "stop" | "length" | "cancelled"


@dataclass
class Event:
    """What one engine step produced for one request."""
    completion: Completion
    new_text: str  # text safe to show now (a possible start of a stop string is held back)
    new_token_ids: list[int]  # recorded in this step
    finished: bool
    logprobs: list[TokenLogprob] = field(default_factory=list)  # of the tokens recorded in this step (when asked)


class _Sequence:
    def __init__(self, completion: Completion, params: SamplingParams, tok: Tokenizer):
        self.c, self.params = completion, params
        self.generator = torch.Generator()
        self.generator.manual_seed(params.seed if params.seed is not None else torch.randint(2**62, ()).item())
        self.stream = tok.decode_stream()
        self.raw_text, self.shown = "", 0  # decoded so far; how much of it was handed out
        self.pending: int | None = None  # sampled, not yet fed to the model
        self.pos = len(completion.prompt_ids)  # where `pending` goes in the cache
        self.hidden: torch.Tensor | None = None  # (2, D): the main model's h_{pos-2}, h_{pos-1} (speculation)
        self.prev = completion.prompt_ids[-1]  # t_{pos-1}, the token before `pending`
        self.cancelled = False
        self.matcher = None  # with a grammar: follows the tokens and says which may come next
        eos = [] if params.ignore_eos else [tok.eos_id]
        self.stop_ids = set(eos + list(params.stop_token_ids))

    def uniform(self) -> float:
        """The next uniform number of this request's own generator (none is used when greedy)."""
        return 0.0 if self.params.greedy else float(torch.rand((), generator=self.generator))


class _StepInputs(NamedTuple):
    """A plain decode step's inputs, carried to the next step while the same rows decode: the sampled tokens go
    back in as they came out and the positions move up by one, so a step builds no tensors of its own."""
    rows: list[_Sequence]
    tokens: torch.Tensor  # (n, 1): each row's pending token
    pos: torch.Tensor  # (n,): where it goes
    settings: RowSettings
    cache: list[LatentCache]  # views of the main layers' rows 0..n-1
    cache_len: int  # no row reaches past this position - 1
    greedy_u: torch.Tensor | None  # (n,) zeros when every row is greedy (no uniform number is drawn), else None


def uniforms(rows: list[_Sequence], device) -> torch.Tensor:
    """Each row's next uniform number (n,)."""
    return torch.tensor([s.uniform() for s in rows], device=device)


def shared_prefix(prompts: list[list[int]]) -> int:
    """How many leading tokens all the prompts share, leaving each at least one of its own."""
    n = min(len(p) for p in prompts) - 1
    for i in range(n):
        if any(p[i] != prompts[0][i] for p in prompts):
            return i
    return max(n, 0)


# ---- the fixed-shape steps (compiled with `compile=True`) ---------------------------------------------------------
def eager_on_gpu(fn):
    """`fn(logits, ...)` traced into the compiled step on a CPU, and run eagerly between the step's CUDA graphs on a
    GPU: there inductor (torch 2.11) cannot generate the sampler's cumulative sum over the vocabulary (a split scan)
    fused with a reduction ("NYI TritonSplitDimKernel reductions")."""
    eager = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def call(logits: torch.Tensor, *args):
        return (eager if logits.is_cuda else fn)(logits, *args)
    return call


step_sample, step_probabilities, step_log_probs = map(eager_on_gpu, (sample, probabilities, log_probs))


def decode_step(model: Transformer, tokens: torch.Tensor, pos: torch.Tensor, cache: list[LatentCache],
                cache_len: int, rows: RowSettings, u: torch.Tensor, allowed: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens (B, 1) at positions pos (B,), each row's sampling settings, uniform number u (B,) and allowed tokens
    (B, V) or None -> the next token of every row (B,), its reported log-prob (B,), the final hidden state (B, D)
    and the logits (B, V)."""
    out = model(tokens, cache=cache, start_pos=pos, cache_len=cache_len)
    token, logprob = step_sample(out.logits[:, -1], rows, u, allowed)
    return token, logprob, out.hidden[:, -1], out.logits[:, -1]


def verify_step(model: Transformer, tokens: torch.Tensor, pos: torch.Tensor, cache: list[LatentCache],
                cache_len: int, rows: RowSettings, allowed: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speculation's check: tokens (B, 2) = [t_p, draft] at [p, p + 1] and the tokens allowed after each (B, 2, V) or
    None -> the main model's sampling distributions (B, 2, V) and reported log-probs (B, 2, V) after each, its hidden
    states (B, 2, D) and logits (B, 2, V)."""
    out = model(tokens, cache=cache, start_pos=pos, cache_len=cache_len)
    twice = rows.repeat_interleave(2)
    logits = out.logits.flatten(0, 1)
    if allowed is not None:
        logits = logits.masked_fill(~allowed.flatten(0, 1), float("-inf"))
    return (step_probabilities(logits, twice).view_as(out.logits),
            step_log_probs(logits, twice).view_as(out.logits), out.hidden, out.logits)


def draft_step(model: Transformer, h: torch.Tensor, next_ids: torch.Tensor, pos: torch.Tensor,
               cache: list[LatentCache], cache_len: int, rows: RowSettings,
               allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Speculation's draft: h (B, 2, D) = h_{p-2}, h_{p-1}, next_ids (B, 2) = t_{p-1}, t_p, the tokens allowed next
    (B, V) or None -> the distributions (B, V) the draft for t_{p+1} is drawn from."""
    logits = mtp_logits(model, h, next_ids, cache, pos - 2, cache_len)[:, -1]
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    return step_probabilities(logits, rows)


def mtp_logits(model: Transformer, h: torch.Tensor, next_ids: torch.Tensor, cache: list[LatentCache],
               start_pos: int | torch.Tensor, cache_len: int | None = None) -> torch.Tensor:
    """MTP depth 1 on the latent cache: h (B, T, D) main hidden states at positions p, next_ids (B, T) the tokens
    at p + 1 -> draft logits (B, T, V) for the tokens at p + 2."""
    rope = model.rope(positions_of(start_pos, h.shape[0], h.shape[1], h.device))
    hk, _ = model.mtp[0](h, model.embed_tokens(next_ids), rope, cache[0], start_pos, cache_len)
    return model.lm_head(hk)


_COMPILED: dict = {}
# Products of at most this many rows become fused reductions in the CPU graphs (see `compiled`). Inductor reads the
# threshold once, when it loads: `Engine._run` sets it around each compiled call, and `compiled` names it in the
# options so that it is part of the graphs' cache key.
MM_AS_REDUCTION_ROWS = 2


def compiled(fn, cuda: bool = False):
    """`fn` through torch.compile, once per process: on a CPU the whole step one graph, shapes dynamic (one graph
    for one row, one for up to `MM_AS_REDUCTION_ROWS`, one for more; `Engine._run` turns off duck sizing, which
    would tie a batch of 16 to the 16 experts and compile it apart), its kernels called by inductor's C++ wrapper (a
    small step up to 1.6x faster than through its Python wrapper). Floats the step reads (norm epsilons, scales) are
    constants of the graph (`specialize_float`, set in `Engine._run`), not inputs turned into tensors on every call:
    +17-30% tokens/s at batch 1, +9-12% at 16 on `small`. On a CPU products of at most `MM_AS_REDUCTION_ROWS` rows
    (the one-row step; speculation's check and draft of one row, two tokens each) become fused reductions
    (inductor's `decompose_mm_pass`): on `small` 1.4x the one-row step, 1.7x the check, 1.4x the draft, and no gain
    at 4 rows or more. On a GPU (`cuda`) the step's Triton kernels are replayed as CUDA graphs
    (`mode="reduce-overhead"`), recorded per batch size and cache bound, with the sampler run eagerly between them
    (`eager_on_gpu`)."""
    if (fn, cuda) not in _COMPILED:
        options = {"triton.cudagraphs": True} if cuda else {  # "reduce-overhead" mode on a GPU
            "cpp_wrapper": True, "post_grad_fusion_options": {"decompose_mm_pass": {
                "cpu_max_first_dimension_decomposition": MM_AS_REDUCTION_ROWS}}}
        _COMPILED[fn, cuda] = torch.compile(fn, dynamic=True, fullgraph=not cuda, options=options)
    return _COMPILED[fn, cuda]


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch: int = 16, max_len: int | None = None,
                 speculative: bool = False, compile: bool = False, prefill_chunk: int = 512):
        self.model, self.tok = model.eval(), tokenizer
        self.max_len = max_len or model.cfg.max_position_embeddings
        self.max_batch = max_batch
        if speculative and not model.mtp:
            raise SamplingError("speculative decoding needs the model's MTP module (num_nextn_predict_layers >= 1)")
        self.speculative, self.compile, self.prefill_chunk = speculative, compile, prefill_chunk
        # the compiled step as CUDA graphs: one is recorded per bound on the cached positions, so bounds go in steps
        # of 64 there (exact elsewhere), and the graphs write the cache in place, so its addresses are fixed
        self.cuda_graphs = compile and self.device.type == "cuda"
        self.cache_block = 64 if self.cuda_graphs else 1
        self.cache = model.new_cache(max_batch, self.max_len, mtp=speculative)
        self.active: list[_Sequence] = []
        self.waiting: deque[_Sequence] = deque()
        self.ids = itertools.count()
        self.drafted = self.accepted = 0
        self.grammars: Grammars | None = None  # built with the first request that has a grammar
        self.reused_prompt_tokens = 0  # not computed again: copies of a repeated prompt, a prefix shared at prefill
        self.warmup_seconds = 0.0  # spent compiling (calls that built a new graph)
        self._next: _StepInputs | None = None  # the next plain step's tensors while the batch stays the same

    def warmup(self, params: list[SamplingParams] | None = None) -> float:
        """With `compile`: build the steps' graphs (for one row, for `MM_AS_REDUCTION_ROWS` and for more, for each way
        of sampling that `params` need; default both: plain and truncated) before a request waits on them (a server's
        batch takes every size). Returns the seconds. The graph for more rows is built at `max_batch` rows: inductor
        tunes its kernels for the sizes it sees first."""
        spent = self.warmup_seconds
        if self.compile:
            for p in params or [SamplingParams(), SamplingParams(temperature=1.0, top_p=0.9)]:
                few = replace(p, max_new_tokens=4, ignore_eos=True, stop=[], seed=0)
                for rows in sorted({self.max_batch, min(self.max_batch, MM_AS_REDUCTION_ROWS), 1}, reverse=True):
                    self.generate([[0, 1]] * rows, few)
            self.drafted = self.accepted = 0
        return self.warmup_seconds - spent

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    # ---- requests ------------------------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None) -> Completion:
        params = params or SamplingParams()
        if not prompt_ids:
            raise SamplingError("prompt: at least one token is needed")
        if self.speculative and len(prompt_ids) < 2:
            raise SamplingError("prompt: speculative decoding needs at least 2 prompt tokens")
        if len(prompt_ids) >= self.max_len:
            raise SamplingError(f"prompt: {len(prompt_ids)} tokens, the context holds {self.max_len}")
        seq = _Sequence(Completion(next(self.ids), list(prompt_ids)), params, self.tok)
        if params.grammar is not None:
            if not isinstance(self.tok, Tokenizer):
                raise SamplingError("grammar: needs the engine's tokenizer")
            self.grammars = self.grammars or Grammars(self.tok, self.model.cfg.vocab_size)
            seq.matcher = self.grammars.matcher(params.grammar)
        self.waiting.append(seq)
        return seq.c

    def cancel(self, completion: Completion) -> None:
        for seq in itertools.chain(self.active, self.waiting):
            if seq.c is completion:
                seq.cancelled = True

    def has_work(self) -> bool:
        return bool(self.active or self.waiting)

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Run prompts to completion (in batches of max_batch, joining as slots free up); results in prompt order."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        self.model.eval()
        out = [self.submit(p, sp) for p, sp in zip(prompts, plist)]
        while self.has_work():
            self.step()
        return out

    # ---- one step ------------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Event]:
        """Admit waiting requests into free slots (prefill), then decode one token (or a speculative pair) for
        every active sequence. Returns what each request got."""
        events = []
        for seq in [s for s in itertools.chain(self.active, self.waiting) if s.cancelled]:
            events.append(self._finish(seq, "cancelled"))
        admitted = []
        while self.waiting and len(self.active) + len(admitted) < self.max_batch:
            admitted.append(self.waiting.popleft())
        if admitted:
            events += self._prefill(admitted)
        self._free_finished()  # e.g. a first token that already stops
        if self.active:
            events += self._decode_speculative() if self.speculative else self._decode()
        self._free_finished()
        return events

    def _run(self, step, *args):
        """One fixed-shape step, compiled when asked (its compile seconds counted), eager where compiling fails."""
        if not self.compile:
            return step(*args)
        graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
        try:
            # the model's float settings (norm epsilons, scales) as constants, not inputs made into tensors per call
            with fx_config.patch(use_duck_shape=False), dynamo_config.patch(specialize_float=True), mock.patch.object(
                    decompose_mem_bound_mm, "cpu_max_first_dimension_decomposition", MM_AS_REDUCTION_ROWS):
                if self.cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                out = compiled(step, self.cuda_graphs)(*args)
        except Exception as e:  # no C++ compiler, an operator inductor cannot lower, ...
            warnings.warn(f"compiling {step.__name__} failed, decoding eagerly: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}", stacklevel=3)
            self.compile = False
            return step(*args)
        if counters["stats"]["unique_graphs"] > graphs:
            self.warmup_seconds += time.perf_counter() - t0
        if self.cuda_graphs:  # a CUDA graph's outputs are overwritten by its next replay
            out = torch.utils._pytree.tree_map(torch.clone, out)
        return out

    def _bound(self, reach: int) -> int:
        """The cache bound a step is given: `reach` rounded up to a multiple of `cache_block` (within the cache)."""
        return min(self.max_len, -(-reach // self.cache_block) * self.cache_block)

    def _free_finished(self) -> None:
        """Drop finished rows; the last active row moves into each freed slot, so active rows stay 0..n-1."""
        slot = 0
        while slot < len(self.active):
            if self.active[slot].c.finish_reason is None:
                slot += 1
                continue
            last = len(self.active) - 1
            if slot != last:
                for c in self.cache:
                    c.kv[slot].copy_(c.kv[last])
                    c.pe[slot].copy_(c.pe[last])
                self.active[slot] = self.active[last]
            self.active.pop()

    def _prefill(self, admitted: list[_Sequence]) -> list[Event]:
        """Prefill the admitted sequences into the next free slots: each distinct prompt once, in right-padded
        forwards of `prefill_chunk` tokens, into the slots of its first sequence; its other sequences get copies
        of those cache rows. A prefix all the distinct prompts share (a system prompt) is computed once, in the
        first row, and copied to the others before their remainders are prefilled."""
        by_prompt: dict[tuple[int, ...], list[_Sequence]] = {}
        for seq in admitted:
            by_prompt.setdefault(tuple(seq.c.prompt_ids), []).append(seq)
        firsts = [group[0] for group in by_prompt.values()]
        first_slot = len(self.active)
        self.active += firsts + [seq for group in by_prompt.values() for seq in group[1:]]
        lengths = [len(seq.c.prompt_ids) for seq in firsts]
        ids = torch.zeros(len(firsts), max(lengths), dtype=torch.long)
        for row, seq in enumerate(firsts):
            ids[row, :lengths[row]] = torch.tensor(seq.c.prompt_ids)
        ids = ids.to(self.device)
        main, mtp = self._rows(first_slot, first_slot + len(firsts))
        shared = shared_prefix([seq.c.prompt_ids for seq in firsts]) if len(firsts) > 1 else 0
        self.reused_prompt_tokens += shared * (len(firsts) - 1) + sum(
            len(group[0].c.prompt_ids) * (len(group) - 1) for group in by_prompt.values())
        parts = []  # hidden states of every prompt position
        if shared:  # once, in the first row; the other rows get copies of its cache entries
            parts.append(self._forward_chunks(ids[:1, :shared], [c[:1] for c in main], 0).expand(len(firsts), -1, -1))
            for c in main:
                c.kv[1:, :shared], c.pe[1:, :shared] = c.kv[:1, :shared], c.pe[:1, :shared]
        h = torch.cat(parts + [self._forward_chunks(ids[:, shared:], main, shared)], dim=1)  # (U, L, D)
        if self.speculative:  # MTP entries (h_i, t_{i+1}) for i <= L-3; the draft does the rest
            for s in range(0, ids.shape[1] - 2, self.prefill_chunk):
                e = min(s + self.prefill_chunk, ids.shape[1] - 2)
                mtp_logits(self.model, h[:, s:e], ids[:, s + 1:e + 1], mtp, s)
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model.lm_head(h[torch.arange(len(firsts), device=self.device), last])  # (U, V)
        events, copy_slot = [], first_slot + len(firsts)
        for row, (group, n) in enumerate(zip(by_prompt.values(), lengths)):
            for seq in group:
                seq.hidden = h[row, max(0, n - 2):n]
                if seq.params.prompt_logprobs is not None:  # what the model gave each prompt token after the first
                    seq.c.prompt_logprobs = [None, *token_logprobs(self.model.lm_head(h[row, :n - 1]), ids[row, 1:n],
                                                                   seq.params.prompt_logprobs)]
            for _ in group[1:]:
                for c in self.cache:
                    c.kv[copy_slot, :n] = c.kv[first_slot + row, :n]
                    c.pe[copy_slot, :n] = c.pe[first_slot + row, :n]
                copy_slot += 1
            events += self._sample_rows(group, logits[row].expand(len(group), -1))
        return events

    def _forward_chunks(self, ids: torch.Tensor, cache: list[LatentCache], start: int) -> torch.Tensor:
        """ids (U, T) at positions start.. through the model into the cache, `prefill_chunk` tokens at a time ->
        the hidden states (U, T, D)."""
        return torch.cat([self.model(ids[:, s:s + self.prefill_chunk], cache=cache, start_pos=start + s).hidden
                          for s in range(0, ids.shape[1], self.prefill_chunk)], dim=1)

    def _rows(self, start: int, end: int) -> tuple[list[LatentCache], list[LatentCache]]:
        """Views of the cache rows start..end-1: the main layers', the MTP layers'."""
        views = [LatentCache(c.kv[start:end], c.pe[start:end]) for c in self.cache]
        if self.cuda_graphs:
            for t in (t for v in views for t in (v.kv, v.pe)):
                torch._dynamo.mark_static_address(t)
        return views[:len(self.model.layers)], views[len(self.model.layers):]

    def _sample_rows(self, rows: list[_Sequence], logits: torch.Tensor) -> list[Event]:
        """Draw each row's next token from its logits (n, V) with the row's own settings and generator."""
        u = uniforms(rows, self.device)
        tokens, logprobs = sample(logits, RowSettings.of([s.params for s in rows], self.device), u, self._allowed(rows))
        return [e for seq, t, lp, report in zip(rows, tokens.tolist(), logprobs.tolist(),
                                                 self._reports(rows, tokens, logits))
                for e in self._record(seq, t, lp, report)]

    def _reports(self, rows: list[_Sequence], tokens: torch.Tensor, logits: torch.Tensor) -> list[TokenLogprob | None]:
        """The model's own log-probs of the tokens (n,) the rows took from their logits (n, V), with each row's
        `params.logprobs` alternatives, for the rows that ask (in one pass); None for the others."""
        asking = [i for i, s in enumerate(rows) if s.params.logprobs is not None]
        reports: list[TokenLogprob | None] = [None] * len(rows)
        if asking:
            at = torch.tensor(asking, device=logits.device)
            k = max(rows[i].params.logprobs for i in asking)
            for i, report in zip(asking, token_logprobs(logits[at], tokens[at], k)):
                reports[i] = report._replace(top=report.top[:rows[i].params.logprobs])
        return reports

    def _allowed(self, rows: list[_Sequence]) -> torch.Tensor | None:
        """The tokens each row's grammar allows next (n, V) bool, or None when no row has a grammar."""
        if all(s.matcher is None for s in rows):
            return None
        return self.grammars.allowed([s.matcher for s in rows]).to(self.device)

    def _allowed_after(self, rows: list[_Sequence], drafts: list[int]) -> torch.Tensor:
        """The tokens each row's grammar would allow after its draft (n, V), the matchers left as they were (a row
        whose grammar ends with its draft may take any: it stops there)."""
        for s, d in zip(rows, drafts):
            if s.matcher is not None:
                s.matcher.consume_token(d)
        allowed = self._allowed(rows)
        for s in rows:
            if s.matcher is not None:
                s.matcher.rollback(1)
        return allowed | ~allowed.any(-1, keepdim=True)

    def _inputs(self, rows: list[_Sequence], tokens: list[list[int]]):
        """The step's tensors: tokens (n, T), positions (n,), and each row's sampling settings."""
        return (torch.tensor(tokens, device=self.device), torch.tensor([s.pos for s in rows], device=self.device),
                RowSettings.of([s.params for s in rows], self.device))

    def _decode(self) -> list[Event]:
        rows = list(self.active)
        if self._next is None or self._next.rows != rows:  # the batch changed since the last plain step
            tokens, pos, settings = self._inputs(rows, [[s.pending] for s in rows])
            zeros = torch.zeros(len(rows), device=self.device) if all(s.params.greedy for s in rows) else None
            self._next = _StepInputs(rows, tokens, pos, settings, self._rows(0, len(rows))[0],
                                     max(s.pos for s in rows) + 1, zeros)
        n = self._next
        u = n.greedy_u if n.greedy_u is not None else uniforms(rows, self.device)
        token, logprob, hidden, logits = self._run(decode_step, self.model, n.tokens, n.pos, n.cache,
                                                   self._bound(n.cache_len), n.settings, u, self._allowed(rows))
        self._next = n._replace(tokens=token[:, None], pos=n.pos + 1, cache_len=n.cache_len + 1)
        events = []
        reports = self._reports(rows, token, logits)
        for i, (seq, t, lp) in enumerate(zip(rows, token.tolist(), logprob.tolist())):
            seq.pos += 1
            seq.prev = seq.pending
            if self.speculative:  # the MTP draft reads the last two hidden states
                seq.hidden = torch.stack([seq.hidden[-1], hidden[i]])
            events += self._record(seq, t, lp, reports[i])
        return events

    def _decode_speculative(self) -> list[Event]:
        """MTP drafts t_{p+1} from (h_{p-1}, pending t_p); the main model takes [t_p, draft] at [p, p + 1] and its
        two distributions check the draft and give the token after it. At the start of a step a row holds main
        entries 0..p-1 and MTP entries (h_i, t_{i+1}) for i <= p-3; the draft call writes entries p-2 and p-1 (p-2
        is new after an accepted draft, else rewritten unchanged), so every model call covers the whole batch."""
        rows = list(self.active)
        self._next = None  # positions move by one or two tokens a row here
        main, mtp = self._rows(0, len(rows))
        pending, pos, settings = self._inputs(rows, [[s.prev, s.pending] for s in rows])
        h = torch.stack([s.hidden for s in rows])  # (n, 2, D): h_{p-2}, h_{p-1}
        for two in (pending, h):  # 2 positions a row, a constant of the compiled graph (so one row gathers experts)
            torch._dynamo.mark_static(two, 1)
        reach = max(s.pos for s in rows)
        allowed = self._allowed(rows)  # with grammars: what may follow t_p
        q = self._run(draft_step, self.model, h, pending, pos, mtp, self._bound(reach), settings, allowed).cpu()
        if not all(s.pos + 1 < self.max_len and len(s.c.token_ids) + 1 < s.params.max_new_tokens for s in rows):
            return self._decode()  # a row has room for one more token only
        drafts = draw_rows(q, [s.generator for s in rows])
        tokens = torch.tensor([[s.pending, d] for s, d in zip(rows, drafts)], device=self.device)
        torch._dynamo.mark_static(tokens, 1)
        if allowed is not None:  # and what may follow each draft: the drafts are checked against the grammar too
            allowed = torch.stack([allowed, self._allowed_after(rows, drafts)], dim=1)
        p, logp, hidden, logits = self._run(verify_step, self.model, tokens, pos, main, self._bound(reach + 2),
                                            settings, allowed)
        p, logp = p.cpu(), logp.cpu()
        kept, emitted = speculative_accept(p[:, 0], q, drafts, [s.generator for s in rows])
        self.drafted += len(rows)
        events = []
        for i, (seq, token) in enumerate(zip(rows, emitted)):
            seq.pos += 1
            seq.hidden, seq.prev = torch.stack([seq.hidden[-1], hidden[i, 0]]), seq.pending
            events += self._record(seq, token, float(logp[i, 0, token]), self._report(seq, token, logits[i, 0]))
        more = [i for i, seq in enumerate(rows) if kept[i] and seq.c.finish_reason is None]  # the draft stands
        self.accepted += len(more)
        for i, after in zip(more, draw_rows(p[more, 1], [rows[i].generator for i in more]) if more else []):
            seq = rows[i]
            seq.pos += 1
            seq.hidden, seq.prev = hidden[i, :2], emitted[i]
            events += self._record(seq, after, float(logp[i, 1, after]), self._report(seq, after, logits[i, 1]))
        return events

    # ---- tokens in, events out -----------------------------------------------------------------------------------
    def _report(self, seq: _Sequence, token: int, logits: torch.Tensor) -> TokenLogprob | None:
        """`_reports` for one row and the logits (V,) its token came from."""
        if seq.params.logprobs is None:
            return None
        return self._reports([seq], torch.tensor([token], device=logits.device), logits[None])[0]

    def _record(self, seq: _Sequence, token: int, logprob: float, report: TokenLogprob | None) -> list[Event]:
        """Append a token, its log-prob (see sampling.log_probs) and, with `params.logprobs`, the model's own
        (`_reports`), and check the stop conditions."""
        if seq.c.finish_reason is not None:
            return []
        seq.c.token_ids.append(token)
        seq.c.logprobs.append(logprob)
        if seq.matcher is not None:
            seq.matcher.consume_token(token)
        reported = [] if report is None else [report]
        seq.c.token_logprobs += reported
        if token in seq.stop_ids:
            return [self._finish(seq, "stop", token, reported)]
        seq.raw_text += seq.stream.step(token)
        seq.pending = token
        if seq.matcher is not None and seq.matcher.is_stopped():  # the grammar's text is complete
            return [self._finish(seq, "stop", token, reported)]
        for stop in seq.params.stop:
            at = seq.raw_text.find(stop, max(0, seq.shown - len(stop)))
            if at >= 0:
                seq.raw_text = seq.raw_text[:at]
                return [self._finish(seq, "stop", token, reported)]
        if len(seq.c.token_ids) >= seq.params.max_new_tokens or seq.pos + 1 >= self.max_len:
            return [self._finish(seq, "length", token, reported)]
        hold = max((k for s in seq.params.stop for k in range(len(s), 0, -1)
                    if seq.raw_text.endswith(s[:k])), default=0)  # a stop string may be starting
        new = seq.raw_text[seq.shown:len(seq.raw_text) - hold]
        seq.shown += len(new)
        return [Event(seq.c, new, [token], False, reported)]

    def _finish(self, seq: _Sequence, reason: str, token: int | None = None,
                reported: list[TokenLogprob] | None = None) -> Event:
        """End a sequence; `token`: the one recorded in this step, if any (it goes out with the event)."""
        seq.c.finish_reason = reason
        seq.c.text = seq.raw_text
        new = seq.raw_text[seq.shown:]
        if seq in self.waiting:
            self.waiting.remove(seq)
        return Event(seq.c, new, [] if token is None else [token], True, reported or [])


def greedy_generate(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int,
                    eos_token_id: int | None = None) -> torch.Tensor:
    """input_ids (B, T) of equal-length prompts -> (B, T + n) with n <= max_new_tokens greedy tokens, finished
    rows padded with eos. A thin wrapper over the Engine for tensors in, tensors out."""
    engine = Engine(model, IdsOnly(eos_token_id), max_batch=max(1, input_ids.shape[0]),
                    max_len=input_ids.shape[1] + max_new_tokens + 1)
    params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=eos_token_id is None)
    outs = engine.generate(input_ids.tolist(), params)
    n = max(len(o.token_ids) for o in outs)
    pad = eos_token_id if eos_token_id is not None else 0
    rows = [o.token_ids + [pad] * (n - len(o.token_ids)) for o in outs]
    return torch.cat([input_ids, torch.tensor(rows, dtype=input_ids.dtype, device=input_ids.device)], dim=1)


class IdsOnly:
    """Stands in for a tokenizer where only token ids matter (no text is decoded)."""

    def __init__(self, eos_id: int | None = None):
        self.eos_id = -1 if eos_id is None else eos_id

    def decode_stream(self):
        return IdsOnly.Stream()

    class Stream:
        def step(self, token_id: int) -> str:
            return ""
