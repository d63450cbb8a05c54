"""GRPO with verifiable rewards (DeepSeekMath, R1), and its Dr. GRPO and DAPO variants.

One step, in the order this file reads:

  1. sample    `prompts_per_step` task problems (never a held-out one), G completions of each from the current policy
               (nanoseek's Engine, or a `transformers` model's `generate`: policy.py, hf_policy.py);
  2. score     each completion with its task's verifier (rewards.py);
  3. advantage within each group:  A_i = (r_i - mean(r)) / (std(r) + 1e-4)        (Dr. GRPO: r_i - mean(r))
  4. loss      the clipped ratio objective per completion token, minus beta times the k3 estimate of KL(pi || pi_ref):

                 L_t = -[min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) - beta (pi_ref/pi - log(pi_ref/pi) - 1)]

               averaged per completion then over completions (grpo), over all tokens of the batch (dapo), or summed
               and divided by completions x max_new_tokens (dr_grpo);
  5. update    AdamW, the gate-bias update and checkpoints: the shared Trainer.

`num_iterations` updates reuse one batch of rollouts (rho = pi / pi_old with pi_old frozen at sampling time); with one
update rho = 1 in value but not in gradient. DAPO's dynamic sampling drops groups whose rewards are all equal (they
carry no signal); truncated completions can be masked out.

On several processes every rank draws the same `prompts_per_step` problems and samples the groups of its own
contiguous share of them (seeded by the prompt's place in the whole batch, as on one process), so each group lives
on one rank and its advantages are computed there. The loss divides by the global counts (completions, tokens), so
the mean of the ranks' losses, which DDP / FSDP differentiate, is the single-process loss of the whole batch. An
FSDP-sharded policy generates with its full weights gathered (`distributed.full_weights`), so ranks may decode for
different numbers of steps; experts cannot be split (expert_parallel = 1) for the same reason.
"""

from __future__ import annotations

import copy
import json
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import distributed
from ..data import read_jsonl
from ..errors import TrainError
from ..rundir import check_writable
from ..rewards import RewardConfig, combined_reward, format_reward, thinks
from ..sampling import SamplingParams
from ..tasks import Mixture, Problem
from ..tokenizer import Tokenizer
from .hf_policy import HFPolicy
from .policy import NanoseekPolicy
from .recipe import GRPOSettings, TrainConfig
from .trainer import StepOutput, Trainer

NANOSEEK_MODEL_TYPES = ("deepseek_v3",)


def run(cfg: TrainConfig) -> dict:
    """GRPO from `cfg.init` (a nanoseek / DeepseekV3 directory, or any `transformers` causal LM) on prompts of the
    `cfg.tasks` mixture; held-out problems (the JSONL files in `cfg.data`) are excluded from the prompts and the
    first `cfg.eval_n` of them answered greedily before and after."""
    g = cfg.grpo
    device = distributed.init(cfg.device)
    check_writable(Path(cfg.out))
    distributed.share(g.prompts_per_step, "prompts_per_step")
    torch.manual_seed(cfg.seed)
    policy = load_policy(cfg.init, cfg.tokenizer, device, max_batch=g.prompts_per_step * g.group_size,
                         max_len=cfg.seq_len + g.max_new_tokens, compile=cfg.compile_decode)
    model = policy.model
    compiling = cfg.compile_decode and isinstance(policy, NanoseekPolicy)
    warmup_seconds = policy.warmup(g.temperature) if compiling else 0.0  # before the steps, not inside their times
    excluded = [p for path in cfg.data for p in read_jsonl(path)]
    if cfg.data and not excluded:
        raise TrainError(f"data: {cfg.data}: no held-out problems to evaluate on")
    held_out = excluded[:cfg.eval_n]
    reference = copy.deepcopy(model).eval().requires_grad_(False) if g.beta > 0 else None
    source = RolloutSource(cfg, policy, Mixture.from_recipe(cfg.tasks), {p.prompt for p in excluded}, reference)
    main = distributed.is_main()  # held-out answers: rank 0 alone
    before = policy.greedy_accuracy(held_out, g.max_new_tokens) if held_out and not cfg.resume and main else None
    flops = policy.flops_per_token(cfg.seq_len + g.max_new_tokens)
    summary = Trainer(cfg, model, source, grpo_loss_fn(g, policy), flops, save_extra=policy.save_tokenizer,
                      load_model=policy.load, unused_parameters=True, shown="reward").fit()  # MTP never runs
    summary["decode_warmup_seconds"] = warmup_seconds
    if held_out:
        with distributed.full_weights(model):
            if main:
                summary["held_out_before"] = before
                summary["held_out"] = policy.greedy_accuracy(held_out, g.max_new_tokens)
    return summary


def load_policy(init: str | Path, tokenizer: str | Path | None = None, device: torch.device | str = "cpu",
                max_batch: int = 16, max_len: int = 2048, compile: bool = False):
    """The policy for the model directory `init` (tokenizer from `tokenizer`, else from `init`): nanoseek's own for
    a DeepseekV3 directory, a `transformers` one for any other causal LM. Rollouts run in batches of `max_batch`,
    prompt + completion at most `max_len` tokens; `compile`: nanoseek's Engine runs its compiled decode step."""
    from ..checkpoint import load_model
    config = Path(init) / "config.json"
    model_type = None
    if config.is_file():
        try:
            model_type = json.loads(config.read_text()).get("model_type")
        except (json.JSONDecodeError, AttributeError) as e:
            raise TrainError(f"{config}: not a JSON object ({e})") from None
    if model_type is None or model_type in NANOSEEK_MODEL_TYPES:  # nanoseek's loader names what is wrong
        tok = Tokenizer.load(tokenizer or init)
        return NanoseekPolicy(load_model(init, device=device), tok, max_batch, max_len, compile)
    return HFPolicy.from_pretrained(init, tokenizer, device, max_batch, max_len)


# ---- 1-4. sample, score, advantages, and the batch the loss reads ----------------------------------------------------
@dataclass
class Rollouts:
    ids: torch.Tensor  # (N, L) prompt + completion, right-padded
    real: torch.Tensor  # (N, L) True on the prompt and completion tokens, False on the padding
    mask: torch.Tensor  # (N, L-1) 1 where the target ids[:, t+1] is a completion token that counts
    advantages: torch.Tensor  # (N,)
    old_logp: torch.Tensor | None  # (N, L-1) at sampling time (num_iterations > 1)
    ref_logp: torch.Tensor | None  # (N, L-1) of the reference model (beta > 0)
    metrics: dict


class RolloutSource:
    """The GRPO 'data loader': every `num_iterations` calls a fresh batch of rollouts from the current policy."""

    def __init__(self, cfg: TrainConfig, policy, mixture: Mixture, excluded: set[str],
                 reference: torch.nn.Module | None):
        """policy: see policy.py; reference: a frozen copy of the initial model (beta > 0) or None."""
        self.cfg, self.g, self.policy, self.mixture = cfg, cfg.grpo, policy, mixture
        self.excluded, self.reference = excluded, reference
        self.rng = random.Random(cfg.seed)
        self.batches, self.calls, self.current = 0, 0, None
        self.rewards = RewardConfig(format_weight=self.g.format_weight, format_partial=self.g.format_partial)

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate(), "batches": self.batches, "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.rng.setstate(state["rng"])
        self.batches, self.calls = state["batches"], state["calls"]

    def next(self) -> Rollouts:
        seconds = 0.0  # spent sampling, scoring and packing rollouts for this update (0 when a batch is reused)
        if self.calls % self.g.num_iterations == 0 or self.current is None:
            t0 = time.perf_counter()
            self.current = self.sample()
            seconds = time.perf_counter() - t0
        self.calls += 1
        return replace(self.current, metrics={**self.current.metrics, "rollout_seconds": round(seconds, 4)})

    def problems(self, n: int) -> list[Problem]:
        out = []
        while len(out) < n:
            p = self.mixture.sample(self.rng)
            if p.prompt not in self.excluded:  # held-out problems stay unseen
                out.append(p)
        return out

    @torch.no_grad()
    def sample(self) -> Rollouts:
        """1. sample G completions of each of this rank's prompts; 2. score them; keep the groups with signal."""
        g, G = self.g, self.g.group_size
        kept_prompts, kept_groups, draws, stats, flat = [], [], 0, [], 0
        share = distributed.share(g.prompts_per_step, "prompts_per_step")
        first = distributed.rank() * share  # this rank's prompts of the batch every rank draws
        # dynamic sampling may drop every group (on every rank): draw again
        while draws < 4 and (draws == 0 or not distributed.any_true(bool(kept_groups))):
            draws += 1
            problems = self.problems(g.prompts_per_step)[first:first + share]
            prompts = [self.policy.prompt(p.prompt)[-self.cfg.seq_len:] for p in problems]
            base = (self.cfg.seed * 1_000_003 + self.batches) * 4096
            params = [SamplingParams(max_new_tokens=g.max_new_tokens, temperature=g.temperature,
                                     seed=base + (first + i) * G + j) for i in range(len(prompts)) for j in range(G)]
            with distributed.full_weights(self.policy.model):
                completions = self.policy.generate([p for p in prompts for _ in range(G)], params)
            self.batches += 1
            for i, problem in enumerate(problems):
                group = completions[i * G:(i + 1) * G]
                results = [combined_reward(problem, c.text, self.rewards) for c in group]
                rewards = [r.value for r in results]
                stats += [(r, c) for r, c in zip(results, group)]
                flat += len(set(rewards)) == 1
                if not (g.dynamic_sampling and len(set(rewards)) == 1):
                    kept_prompts.append(prompts[i])
                    kept_groups.append((group, rewards))
        return self.pack(kept_prompts, kept_groups, stats, flat)

    def pack(self, prompts, groups, stats, flat: int) -> Rollouts:
        """3. advantages of the kept groups, and their rows as the loss reads them (with pi_old and pi_ref's
        log-probs where needed). flat: how many sampled groups had all-equal rewards (zero advantages: no signal)."""
        g = self.g
        n_groups = max(1, len(stats) // g.group_size)
        metrics = {"reward": sum(r.value for r, _ in stats) / len(stats),
                   "accuracy": sum(r.components["accuracy"].value == 1.0 for r, _ in stats) / len(stats),
                   "format_rate": sum(format_reward(c.text).value == 1.0 for _, c in stats) / len(stats),
                   "thinking_rate": sum(thinks(c.text) for _, c in stats) / len(stats),
                   "response_length": sum(len(c.token_ids) for _, c in stats) / len(stats),
                   "truncated": sum(c.finish_reason == "length" for _, c in stats) / len(stats),
                   "groups_kept": len(groups) / n_groups, "groups_no_signal": flat / n_groups}
        if not groups:  # every group had equal rewards: nothing to learn from this batch
            empty = torch.zeros(0, 2, dtype=torch.long)
            return Rollouts(empty, empty.bool(), torch.zeros(0, 1), torch.zeros(0), None, None, metrics)
        rewards = torch.tensor([r for _, rs in groups for r in rs]).view(len(groups), g.group_size)
        advantages = group_advantages(rewards, g.loss_type).flatten()
        seqs, spans = [], []
        for prompt, (group, _) in zip(prompts, groups):
            for c in group:
                seqs.append(prompt + c.token_ids)
                counts = not (g.mask_truncated and c.finish_reason == "length")
                spans.append((len(prompt), len(c.token_ids) if counts else 0))
        L = max(map(len, seqs))
        ids = torch.full((len(seqs), L), self.policy.pad_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), L - 1)
        real = torch.arange(L)[None, :] < torch.tensor([len(seq) for seq in seqs])[:, None]
        for row, (seq, (start, n)) in enumerate(zip(seqs, spans)):
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, start - 1:start - 1 + n] = 1.0  # targets ids[start .. start + n - 1]
        device = self.policy.device
        ids, mask, real = ids.to(device), mask.to(device), real.to(device)

        def logprobs(model=None):
            return sequence_logprobs(self.policy, ids, real, g.temperature, g.logprob_tokens, model, mask.bool())[0]

        old = logprobs() if g.num_iterations > 1 else None
        ref = logprobs(self.reference) if self.reference is not None else None
        return Rollouts(ids, real, mask, advantages.to(device), old, ref, metrics)


def group_advantages(rewards: torch.Tensor, loss_type: str) -> torch.Tensor:
    """rewards (P, G) -> advantages (P, G), relative to each prompt's group."""
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if loss_type == "dr_grpo":
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + 1e-4)


def sequence_logprobs(policy, ids: torch.Tensor, real: torch.Tensor, temperature: float, max_tokens: int,
                      model: torch.nn.Module | None = None, targets: torch.Tensor | None = None):
    """`policy.logprobs` of right-padded rows ids (N, L) whose real tokens `real` (N, L) marks, run shortest first
    in micro-batches of at most `max_tokens` padded tokens (a longer row goes alone), each cut to its own longest
    row: the padding that one long rollout would force on every row is not computed. targets (N, L-1): the
    log-probs wanted (default all real ones). Returns log-probs and entropies (N, L-1) in the rows' order, zero past
    each micro-batch's width and outside `targets`, and the expert loads summed."""
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
        logp, entropy, counts = policy.logprobs(ids[index, :n], temperature, model, token_mask=real[index, :n],
                                                targets=None if targets is None else targets[index, :n - 1])
        logps.append(F.pad(logp, (0, width - logp.shape[1])))
        entropies.append(F.pad(entropy, (0, width - entropy.shape[1])))
        loads = counts if loads is None else [a + b for a, b in zip(loads, counts)]
    back = torch.tensor(order, device=ids.device).argsort()  # from length order to the rows' order
    return torch.cat(logps)[back], torch.cat(entropies)[back], loads


# ---- 4. the loss ---------------------------------------------------------------------------------------------------
def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, g: GRPOSettings,
              counts: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict]:
    """Per-token log-probs (N, T) of the policy, the sampling policy and the reference (or None), advantages (N,),
    completion-token mask (N, T) -> loss and its statistics (KL, clip fraction). `counts`: the divisors for
    completions and tokens in place of N and the mask's count (several processes: global counts / processes)."""
    ratio = (logp - old_logp).exp()
    adv = advantages[:, None]
    clipped = ratio.clamp(1 - g.epsilon_low, 1 + g.epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    kl = torch.zeros_like(logp)
    if ref_logp is not None:
        kl = (ref_logp - logp).exp() - (ref_logp - logp) - 1
        per_token = per_token + g.beta * kl
    mask = mask.float()
    tokens = mask.sum().clamp(min=1)
    if counts is not None:
        n, all_tokens = counts
        per_row = (per_token * mask).sum(1)
        loss = ((per_row / mask.sum(1).clamp(min=1)).sum() / n if g.loss_type == "grpo" else
                per_row.sum() / all_tokens if g.loss_type == "dapo" else
                per_row.sum() / (n * g.max_new_tokens))
    elif g.loss_type == "grpo":
        loss = ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    elif g.loss_type == "dapo":
        loss = (per_token * mask).sum() / tokens
    else:  # dr_grpo
        loss = (per_token * mask).sum() / (mask.shape[0] * g.max_new_tokens)
    was_clipped = ((ratio < 1 - g.epsilon_low) & (adv < 0)) | ((ratio > 1 + g.epsilon_high) & (adv > 0))
    return loss, {"kl": float((kl.detach() * mask).sum() / tokens),
                  "clip_fraction": float((was_clipped * mask).sum() / tokens)}


def grpo_loss_fn(g: GRPOSettings, policy):
    """The Trainer's loss function: the current policy's log-probs of a batch of rollouts -> `grpo_loss`."""
    def loss_fn(model, batch: Rollouts, step: int) -> StepOutput:
        counts = None
        if distributed.world() > 1:  # divide by the global numbers of completions and tokens
            local = torch.tensor([float(batch.ids.shape[0]), float(batch.mask.sum())])
            n, tokens = (distributed.all_reduce_sum(local).clamp(min=1) / distributed.world()).tolist()
            counts = (n, tokens)
        if batch.ids.shape[0] == 0:
            if counts is None:
                zero = sum(p.sum() for p in model.parameters()) * 0.0
                return StepOutput(zero, {**batch.metrics, "loss": 0.0}, [], 0)
            # nothing to learn here, but the forward and backward are collective: run them on a dummy row
            logp, _, loads = policy.logprobs(torch.full((1, 2), policy.pad_id, device=policy.device),
                                             g.temperature, model)
            return StepOutput(logp.sum() * 0.0, {**batch.metrics, "loss": 0.0}, [torch.zeros_like(c) for c in loads], 0)
        logp, entropy, loads = sequence_logprobs(policy, batch.ids, batch.real, g.temperature, g.logprob_tokens, model,
                                                 batch.mask.bool())
        entropy = entropy.detach()
        old = batch.old_logp if batch.old_logp is not None else logp.detach()
        loss, stats = grpo_loss(logp, old, batch.ref_logp, batch.advantages, batch.mask, g, counts)
        tokens = batch.mask.sum().clamp(min=1)
        metrics = {**batch.metrics, **stats, "entropy": float((entropy * batch.mask).sum() / tokens),
                   "loss": loss.item()}
        # tokens for tokens/s and MFU: every real one, at the model's FLOPs per token (its head counted though it
        # ran on the completions alone: at most the head's share of the FLOPs, 4% for the demo's model)
        return StepOutput(loss, metrics, loads, int(batch.real.sum()))
    return loss_fn
