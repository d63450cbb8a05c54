"""The public claims about DeepSeek-V3/R1, each checked against what can be computed from first principles.

`CLAIMS` is a table: each entry states a claim, its source, the figures it quotes and the check that recomputes them
(from the V3 config through `cost.py`, and the GPU table in `gpus.py`). A check's comparison gives the verdict:

  consistent      the published figures agree with each other and with the arithmetic
  inconsistent    they do not (often: a popular reading of a figure, not the figure)
  not checkable   public facts cannot settle it; where one of our runs measures the same quantity (MTP acceptance,
                  FP8 loss error, MaxVio) our measurement is shown beside it, on our much smaller models

`claims(measured)` runs the checks; `measurements(paths)` reads our measurements from run directories and reports.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ModelConfig
from .cost import format_dollars, kv_cache_bytes_per_token, param_counts, serving_memory, training_flops
from .errors import DataError
from .gpus import get_gpu
from .rundir import METRICS, find_stages, read_metrics

CONSISTENT, INCONSISTENT, UNCHECKABLE = "consistent", "inconsistent", "not checkable"
V3_REPORT = "DeepSeek-V3 Technical Report (arXiv 2412.19437)"
V2_REPORT = "DeepSeek-V2 report (arXiv 2405.04434)"

# DeepSeek-V3 report, Table 1: H800 GPU-hours per stage, priced at $2 per GPU-hour.
V3_GPU_HOURS = {"pre-training": 2664e3, "context extension": 119e3, "post-training": 5e3}
V3_PRICE = 2.0
V3_TOKENS = 14.8e12  # pre-training tokens (section 4.2)
V3_GPUS = 2048  # H800s in the training cluster (section 3.1)
V3_SEQ_LEN = 4096  # pre-training context (section 4.2)
# Context extension (section 4.3): two phases of 1,000 steps, 32K context x 1,920 sequences, then 128K x 480.
V3_EXTENSION = ((32768, 1920, 1000), (131072, 480, 1000))
# Model state per parameter: mixed-precision Adam (ZeRO, arXiv 1910.02054) against V3 (FP32 master weights and
# gradients, BF16 moments; V3 report, section 3.3).
STATE_BYTES = {"mixed_precision_adam": 16, "v3": 12}
# Large dense runs report 38-43% BF16 MFU (Llama 3 405B, arXiv 2407.21783, Table 4) and 46.2% (PaLM 540B, arXiv
# 2204.02311); an implied MFU outside this band would mean the hours and the tokens do not describe one run.
PLAUSIBLE_MFU = (0.15, 0.60)
# Llama 3.1 405B: 30.84M H100-80GB GPU-hours (Llama 3.1 model card); 405B dense parameters on 15.6T tokens, 3.8e25
# FLOPs (The Llama 3 Herd of Models, arXiv 2407.21783, section 3).
LLAMA3_405B = {"gpu_hours": 30.84e6, "params": 405e9, "tokens": 15.6e12}
# DeepSeek LLM 67B (arXiv 2401.02954, Table 2): 95 layers, GQA with 8 key-value heads of dimension 128.
DEEPSEEK_67B_KV = {"layers": 95, "kv_heads": 8, "head_dim": 128}
# DeepSeek-V2 (arXiv 2405.04434): 60 layers, d_c = 512, d_h^R = 64; served with its KV cache quantised to 6 bits
# per element on average (section 3.2.3).
V2_KV = {"layers": 60, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "bits": 6}
# API list prices, $ per million tokens, January 2025: DeepSeek-R1 (deepseek-reasoner, input cache miss / output)
# from DeepSeek's pricing page; OpenAI o1 from OpenAI's pricing page.
R1_PRICE, O1_PRICE = {"input": 0.55, "output": 2.19}, {"input": 15.0, "output": 60.0}
# DeepSeek's serving statistics (open-infra-index, "Day 6: DeepSeek-V3/R1 Inference System Overview", March 2025):
# per H800 node (8 GPUs) ~73.7K input tokens/s in prefill, ~14.8K output tokens/s in decode, GPUs at $2/hour.
V3_SERVING = {"prefill_tokens_per_s": 73.7e3, "decode_tokens_per_s": 14.8e3, "gpus_per_node": 8}
# DeepSeek-R1's post-training (Nature 645, 633-638 (2025), supplementary information): 512 H800s, about 198 hours
# for R1-Zero and 80 hours for R1, 5K GPU-hours to build the SFT data, each stage given to the nearest 1K GPU-hours.
R1_RL = {"gpus": 512, "r1_zero_hours": 198, "r1_hours": 80, "sft_data_gpu_hours": 5e3}


@dataclass(frozen=True)
class Check:
    """What a check computed: the working, whether it agrees with the quoted figures (None: nothing public can
    settle it), the reason, and the figures."""
    computed: str
    agrees: bool | None
    reason: str
    numbers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ClaimSpec:
    """One row of `CLAIMS`: a claim, where it was made, the figures it quotes, the check that recomputes them from a
    config, and the keys of our measurements of the same quantity (see `measurements`)."""
    key: str
    claim: str
    source: str
    quoted: dict
    check: Callable[[ModelConfig, dict], Check]
    measures: tuple[str, ...] = ()


@dataclass
class Claim:
    key: str
    claim: str
    source: str
    computed: str  # what nanoseek computes from first principles
    verdict: str  # CONSISTENT | INCONSISTENT | UNCHECKABLE
    reason: str
    measured: str | None = None  # our own measurement of the same quantity, when one was given
    numbers: dict = field(default_factory=dict)  # the computed figures


def _k(hours: float) -> str:
    return f"{hours / 1e3:,.0f}K"


def _rounds_to(value: float, quoted: float, unit: float) -> bool:
    """Whether `value` agrees with `quoted`, a figure given to the nearest `unit`."""
    return abs(value - quoted) <= unit / 2


def _plausible(mfu: float) -> bool:
    return PLAUSIBLE_MFU[0] <= mfu <= PLAUSIBLE_MFU[1]


def _pretraining(cfg: ModelConfig) -> tuple[dict, float]:
    """V3's pre-training FLOPs for `cfg`, and the FLOP/s per GPU that Table 1's pre-training hours imply."""
    pre = training_flops(cfg, V3_TOKENS, V3_SEQ_LEN)
    return pre, pre["total"] / (V3_GPU_HOURS["pre-training"] * 3600)


# ---- the checks: each recomputes a claim's figures and compares them with the quoted ones ----------------------------
def _cost_table(cfg: ModelConfig, q: dict) -> Check:
    hours = sum(V3_GPU_HOURS.values())
    stage_dollars = {k: v * V3_PRICE for k, v in V3_GPU_HOURS.items()}
    return Check(
        " + ".join(_k(v) for v in V3_GPU_HOURS.values()) + f" = {_k(hours)} GPU-hours; x ${V3_PRICE:.0f} = "
        + " + ".join(f"${v / 1e6:.3f}M" for v in stage_dollars.values()) + f" = ${hours * V3_PRICE / 1e6:.3f}M",
        _rounds_to(hours, q["gpu_hours"], 1e3) and _rounds_to(hours * V3_PRICE, q["dollars"], 1e3),
        "the stages add up and the price multiplies out; the report itself says the figure covers only the official "
        "training run, not prior research and ablations",
        {"gpu_hours": hours, "dollars": hours * V3_PRICE, "stage_dollars": stage_dollars})


def _pretraining_mfu(cfg: ModelConfig, q: dict) -> Check:
    p, h800 = param_counts(cfg), get_gpu("h800")
    pre = training_flops(cfg, q["tokens"], V3_SEQ_LEN)
    achieved = pre["total"] / (q["gpu_hours"] * 3600)
    mfu = {"bf16": achieved / h800.bf16, "fp8": achieved / h800.fp8}
    per = pre["per_token"]
    return Check(
        f"{per['total'] / 1e9:.1f} GFLOP per token (6 x {p.matmul_activated / 1e9:.2f}B = {per['matmul'] / 1e9:.1f}, "
        f"attention at {V3_SEQ_LEN:,} context {per['attention'] / 1e9:.1f}, MTP {per['mtp'] / 1e9:.1f}) x "
        f"{q['tokens'] / 1e12:g}T = {pre['total']:.3g} FLOPs; in {_k(q['gpu_hours'])} GPU-hours that is "
        f"{achieved / 1e12:.0f} TFLOP/s per GPU: {mfu['bf16']:.1%} of the H800's dense BF16 peak, {mfu['fp8']:.1%} "
        "of its FP8 peak", _plausible(mfu["bf16"]),
        f"an MFU of {mfu['bf16']:.0%} (BF16 terms) is what well-run large trainings reach (Llama 3 405B: 38-43%); "
        f"with most GEMMs in FP8 it is a modest {mfu['fp8']:.0%} of the FP8 peak" if _plausible(mfu["bf16"]) else
        f"an MFU of {mfu['bf16']:.0%} lies outside the {PLAUSIBLE_MFU[0]:.0%}-{PLAUSIBLE_MFU[1]:.0%} that large runs "
        "reach, so these hours cannot have trained this model on these tokens",
        {"flops": pre["total"], "flops_per_token": per, "achieved_flops_per_s": achieved, "mfu": mfu})


def _per_trillion(cfg: ModelConfig, q: dict) -> Check:
    days = q["gpu_hours_per_t"] / V3_GPUS / 24
    hours = q["gpu_hours_per_t"] * V3_TOKENS / 1e12
    return Check(
        f"{_k(q['gpu_hours_per_t'])} x {V3_TOKENS / 1e12:g} = {_k(hours)} GPU-hours (Table 1: "
        f"{_k(V3_GPU_HOURS['pre-training'])}); {_k(q['gpu_hours_per_t'])} / {V3_GPUS:,} GPUs = {days:.2f} days",
        _rounds_to(days, q["days"], 0.1) and _rounds_to(hours, V3_GPU_HOURS["pre-training"], 1e3),
        "the rate, the token count and the pre-training hours agree exactly",
        {"days_per_trillion": days, "pretraining_gpu_hours": hours})


def _cluster_time(cfg: ModelConfig, q: dict) -> Check:
    days = {"pre-training": V3_GPU_HOURS["pre-training"] / V3_GPUS / 24,
            "all stages": sum(V3_GPU_HOURS.values()) / V3_GPUS / 24}
    fits = days["pre-training"] < q["days"]
    return Check(
        f"{_k(V3_GPU_HOURS['pre-training'])} / {V3_GPUS:,} = {days['pre-training']:.1f} days of pre-training; all "
        f"{_k(sum(V3_GPU_HOURS.values()))} GPU-hours = {days['all stages']:.1f} days", fits,
        f"the GPU-hours fit the cluster and the calendar (two months: ~{q['days']} days)" if fits else
        "the GPU-hours need longer than two months on this cluster", {"days": days})


def _context_extension(cfg: ModelConfig, q: dict) -> Check:
    flops = sum(training_flops(cfg, steps * batch * seq, seq, mtp=False)["total"] for seq, batch, steps in V3_EXTENSION)
    tokens = sum(steps * batch * seq for seq, batch, steps in V3_EXTENSION)
    mfu = flops / (q["gpu_hours"] * 3600) / get_gpu("h800").bf16
    return Check(
        f"{tokens / 1e9:.0f}B tokens; attention over long contexts dominates: {flops:.3g} FLOPs (MTP left out), "
        f"{mfu:.1%} BF16 MFU in {_k(q['gpu_hours'])} GPU-hours", _plausible(mfu),
        "a plausible MFU, lower than pre-training's as long-context attention runs less efficiently" if _plausible(mfu)
        else f"an MFU outside the {PLAUSIBLE_MFU[0]:.0%}-{PLAUSIBLE_MFU[1]:.0%} that large runs reach",
        {"tokens": tokens, "flops": flops, "mfu": mfu})


def _post_training(cfg: ModelConfig, q: dict) -> Check:
    pre, achieved = _pretraining(cfg)
    mfu = achieved / get_gpu("h800").bf16
    return Check(
        f"{_k(q['gpu_hours'])} GPU-hours at pre-training's {mfu:.0%} MFU train "
        f"{q['gpu_hours'] * 3600 * achieved / pre['per_token']['total'] / 1e9:.0f}B tokens", None,
        "the SFT set (1.5M instances, 2 epochs) has no published token count, and RL's rollouts and their lengths "
        "are not given")


def _parameters(cfg: ModelConfig, q: dict) -> Check:
    p = param_counts(cfg)
    checkpoint = p.total + p.mtp_total + 2 * p.embedding
    # 37B, to the nearest 1B, lies between the activated counts without and with the embedding
    agrees = (_rounds_to(p.total, q["total"], 1e9)
              and p.activated_without_embedding - 0.5e9 <= q["activated"] <= p.activated + 0.5e9)
    return Check(
        f"from the config: {p.total / 1e9:.2f}B total; activated {p.activated / 1e9:.2f}B with the embedding, "
        f"{p.activated_without_embedding / 1e9:.2f}B without; MTP {p.mtp_total / 1e9:.2f}B unique, "
        f"{(p.mtp_total + 2 * p.embedding) / 1e9:.2f}B with its stored embedding and head: {checkpoint / 1e9:.1f}B in "
        "the checkpoint", agrees,
        "the config reproduces both figures (37B sits between the counts with and without the embedding)" if agrees
        else "this config does not reproduce the published counts",
        {"total": p.total, "activated": {"with embedding": p.activated, "without": p.activated_without_embedding},
         "mtp": p.mtp_total})


def _fp8_memory(cfg: ModelConfig, q: dict) -> Check:
    w = serving_memory(cfg, 1)["weights_bytes"]
    saving = 1 - w["fp8"] / w["bf16"]
    state = 1 - STATE_BYTES["v3"] / STATE_BYTES["mixed_precision_adam"]
    return Check(
        f"per tensor FP8 is 1 byte: {saving:.0%} less than BF16, 75% less only against FP32; V3's weights: "
        f"{w['fp8'] / 1e9:,.0f} GB in FP8, {w['bf16'] / 1e9:,.0f} GB in BF16. Model state per parameter: "
        f"{STATE_BYTES['mixed_precision_adam']} B for mixed-precision Adam (ZeRO, arXiv 1910.02054), "
        f"{STATE_BYTES['v3']} B for V3 (FP32 master weights and gradients, BF16 moments): {state:.0%} less",
        _rounds_to(saving, q["saving"], 0.01),
        "75% is FP8 against FP32; V3's baseline is BF16 (50%), and it keeps master weights, gradients and optimiser "
        "states in higher precision, so training memory falls far less; FP8 mainly halves cached activations",
        {"weights_bytes": w, "state_bytes_per_param": STATE_BYTES})


def _fp8_loss(cfg: ModelConfig, q: dict) -> Check:
    return Check("nothing to compute: it is a property of training runs", None,
                 "only training both ways shows it; our runs compare FP8 with fp32 on small models")


def _mla_v2_kv(cfg: ModelConfig, q: dict) -> Check:
    v67 = 2 * DEEPSEEK_67B_KV["kv_heads"] * DEEPSEEK_67B_KV["head_dim"] * DEEPSEEK_67B_KV["layers"]  # K and V
    v2 = (V2_KV["kv_lora_rank"] + V2_KV["qk_rope_head_dim"]) * V2_KV["layers"]  # (d_c + d_h^R) per layer
    cut = {"bf16": 1 - v2 / v67, "6-bit": 1 - v2 * V2_KV["bits"] / (v67 * 16)}
    return Check(
        f"per token: 67B (GQA, 8 KV heads) {v67:,} values, V2 (MLA) {v2:,}: {cut['bf16']:.1%} smaller at equal "
        f"precision, {cut['6-bit']:.1%} with V2's 6-bit cache against 67B's BF16",
        _rounds_to(cut["6-bit"], q["reduction"], 0.001),
        f"{q['reduction']:.1%} holds when V2's 6-bit cache quantisation is counted; MLA's own share is "
        f"{cut['bf16']:.0%}", {"values_67b": v67, "values_v2": v2, "reduction": cut})


def _mla_gqa_groups(cfg: ModelConfig, q: dict) -> Check:
    kv = kv_cache_bytes_per_token(cfg)
    groups = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) / (2 * cfg.qk_nope_head_dim)
    return Check(
        f"(d_c + d_h^R) / (2 d_h) = ({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim}) / (2 x {cfg.qk_nope_head_dim}) = "
        f"{groups:g} groups; V3: {kv['mla_bytes']:,} B per token (BF16) against {kv['mha_bytes']:,} B for the "
        f"equivalent MHA, {kv['mha_bytes'] / kv['mla_bytes']:.1f}x less", _rounds_to(groups, q["groups"], 0.01),
        "the cache sizes follow from the dimensions", {"groups": groups, "kv_bytes_per_token": kv})


def _mtp_speculation(cfg: ModelConfig, q: dict) -> Check:
    lo, hi = (1 + p for p in q["acceptance"])  # tokens per step with one draft token
    overhead = (lo / q["speedup"] - 1, hi / q["speedup"] - 1)  # the step cost the speed-up implies
    p = param_counts(cfg)
    draft = p.mtp_matmul_activated / p.matmul_activated  # the MTP module's share of a token's matmul FLOPs
    agrees = overhead[0] <= draft <= overhead[1]
    return Check(
        f"one draft token per step yields 1 + p = {lo:.2f}-{hi:.2f} tokens per step; {q['speedup']:g}x then means a "
        f"step costs {overhead[0]:.0%}-{overhead[1]:.0%} more than a plain decode step; the MTP module adds "
        f"{draft:.1%} to a token's matmul FLOPs", agrees,
        "the speed-up is what the acceptance rate allows after a small drafting overhead" if agrees else
        "the MTP module's share of the FLOPs does not give this speed-up at this acceptance rate",
        {"tokens_per_step": (lo, hi), "mtp_matmul_share": draft})


def _balance(cfg: ModelConfig, q: dict) -> Check:
    return Check("nothing to compute: balance is a property of training dynamics", None,
                 "only training shows it; our runs log MaxVio = (max load - mean load) / mean load per MoE layer and "
                 "step")


def _llama_share(cfg: ModelConfig, q: dict) -> Check:
    p, (pre, _) = param_counts(cfg), _pretraining(cfg)
    flops_llama = 6 * LLAMA3_405B["params"] * LLAMA3_405B["tokens"]
    ratio = {"gpu_hours": sum(V3_GPU_HOURS.values()) / LLAMA3_405B["gpu_hours"], "flops": pre["total"] / flops_llama}
    return Check(
        f"GPU-hours: {_k(sum(V3_GPU_HOURS.values()))} / {LLAMA3_405B['gpu_hours'] / 1e6:.2f}M = "
        f"{ratio['gpu_hours']:.1%}; FLOPs: {pre['total']:.3g} / (6 x 405B x 15.6T = {flops_llama:.3g}; Meta: 3.8e25) = "
        f"{ratio['flops']:.1%}",
        q["share"] / 2 <= ratio["gpu_hours"] <= 2 * q["share"],  # within a factor of two
        f"about {1 / ratio['gpu_hours']:.0f}x less, not {1 / q['share']:.0f}x: MoE activates {p.activated / 1e9:.1f}B "
        f"of {p.total / 1e9:.0f}B parameters per token, against Llama's 405B dense", {"ratio": ratio})


def _gaming_gpus(cfg: ModelConfig, q: dict) -> Check:
    p = param_counts(cfg)
    w = serving_memory(cfg, 1)["weights_bytes"]
    small = serving_memory(cfg, 4096, gpu="rtx4090")["min_gpus_by_type"]
    gaming = {k: small[k] for k in ("rtx4090", "rtx5090")}
    return Check(
        f"R1 has V3's {p.total / 1e9:.0f}B parameters: {w['4bit'] / 1e9:.0f} GB of weights even at 4 bits, at least "
        f"{gaming['rtx4090']['4bit']} RTX 4090s or {gaming['rtx5090']['4bit']} RTX 5090s ({gaming['rtx4090']['fp8']} "
        f"/ {gaming['rtx5090']['fp8']} in FP8); a 32B distilled model at 4 bits is 16 GB, one RTX 4090",
        min(g["4bit"] for g in gaming.values()) <= q["gpus"],
        "what runs on one gaming GPU is a distilled Qwen or Llama model (1.5B-70B) trained on R1's outputs, or R1 "
        "squeezed below 2 bits with most of it in CPU memory", {"min_gpus": gaming})


def _api_price(cfg: ModelConfig, q: dict) -> Check:
    cheaper = {k: 1 - R1_PRICE[k] / O1_PRICE[k] for k in R1_PRICE}
    node_dollars_per_s = V3_SERVING["gpus_per_node"] * V3_PRICE / 3600
    cost_per_m = {"input": node_dollars_per_s / V3_SERVING["prefill_tokens_per_s"] * 1e6,
                  "output": node_dollars_per_s / V3_SERVING["decode_tokens_per_s"] * 1e6}
    return Check(
        f"list prices: {cheaper['input']:.1%} less per input token, {cheaper['output']:.1%} per output token; "
        f"DeepSeek's own throughput ({V3_SERVING['decode_tokens_per_s'] / 1e3:g}K output tokens/s per "
        f"{V3_SERVING['gpus_per_node']}-H800 node at ${V3_PRICE:.0f}/GPU-hour) costs "
        f"{format_dollars(cost_per_m['output'])} per million output tokens against the "
        f"{format_dollars(R1_PRICE['output'])} price", min(cheaper.values()) >= q["cheaper"],
        f"about {min(cheaper.values()):.0%} cheaper at list prices, and the output price is "
        f"{R1_PRICE['output'] / cost_per_m['output']:.0f}x DeepSeek's GPU cost per output token",
        {"cheaper": cheaper, "gpu_cost_per_million": cost_per_m})


def _r1_cost(cfg: ModelConfig, q: dict) -> Check:
    stages = (R1_RL["gpus"] * R1_RL["r1_zero_hours"], R1_RL["sft_data_gpu_hours"], R1_RL["gpus"] * R1_RL["r1_hours"])
    hours, v3_hours = sum(stages), sum(V3_GPU_HOURS.values())
    return Check(
        f"{R1_RL['gpus']} H800s x ({R1_RL['r1_zero_hours']} + {R1_RL['r1_hours']}) hours + "
        f"{_k(R1_RL['sft_data_gpu_hours'])} = {_k(hours)} GPU-hours x ${V3_PRICE:.0f} = "
        f"{format_dollars(hours * V3_PRICE)}",
        _rounds_to(hours * V3_PRICE, q["dollars"], len(stages) * 1e3 * V3_PRICE),  # each stage to the nearest 1K
        f"the arithmetic holds; it covers R1's reinforcement learning on top of V3-Base, whose {_k(v3_hours)} "
        f"GPU-hours ({v3_hours / hours:.0f}x more) came first", {"gpu_hours": hours})


def _total_cost(cfg: ModelConfig, q: dict) -> Check:
    hours = sum(V3_GPU_HOURS.values())
    return Check(
        f"${hours * V3_PRICE / 1e6:.3f}M is {_k(hours)} rented GPU-hours at ${V3_PRICE:.0f}, nothing else", None,
        "the report excludes research, ablations, data and staff, and DeepSeek owns its GPUs; none of those costs "
        "is published")


CLAIMS = (
    ClaimSpec("cost_table", "$5.576M: 2,788K H800 GPU-hours at $2/hour (pre-training 2,664K, context extension 119K, "
              "post-training 5K)", f"{V3_REPORT}, Table 1", {"gpu_hours": 2788e3, "dollars": 5.576e6}, _cost_table),
    ClaimSpec("pretraining_mfu", "pre-training on 14.8T tokens took 2,664K H800 GPU-hours",
              f"{V3_REPORT}, Table 1 and section 4.2", {"tokens": V3_TOKENS, "gpu_hours": V3_GPU_HOURS["pre-training"]},
              _pretraining_mfu),
    ClaimSpec("per_trillion", "180K H800 GPU-hours per trillion tokens: 3.7 days on 2,048 H800s",
              f"{V3_REPORT}, section 1", {"gpu_hours_per_t": 180e3, "days": 3.7}, _per_trillion),
    ClaimSpec("cluster_time", "2,048 H800 GPUs; pre-training completed in less than two months",
              f"{V3_REPORT}, sections 1 and 3.1", {"days": 61}, _cluster_time),
    ClaimSpec("context_extension", "context extension to 32K then 128K (1,000 steps each) took 119K GPU-hours",
              f"{V3_REPORT}, Table 1 and section 4.3", {"gpu_hours": V3_GPU_HOURS["context extension"]},
              _context_extension),
    ClaimSpec("post_training", "post-training (SFT and RL) took 5K GPU-hours", f"{V3_REPORT}, Table 1",
              {"gpu_hours": V3_GPU_HOURS["post-training"]}, _post_training),
    ClaimSpec("parameters", "671B parameters, 37B activated per token (685B on Hugging Face with the MTP module)",
              f"{V3_REPORT}, abstract; Hugging Face model card", {"total": 671e9, "activated": 37e9}, _parameters),
    ClaimSpec("fp8_memory", "FP8 training needs 75% less memory", "popular summaries of the V3 report, January 2025; "
              f"the report's FP8 framework: {V3_REPORT}, section 3.3", {"saving": 0.75}, _fp8_memory),
    ClaimSpec("fp8_loss", "FP8 training's loss stays within 0.25% (relative) of BF16",
              f"{V3_REPORT}, section 3.3 and appendix B.1", {"relative_loss": 0.0025}, _fp8_loss,
              ("fp8_relative_loss",)),
    ClaimSpec("mla_v2_kv", "MLA cuts the KV cache by 93.3% (DeepSeek-V2 against DeepSeek 67B)",
              f"{V2_REPORT}, abstract and section 3.2.3", {"reduction": 0.933}, _mla_v2_kv),
    ClaimSpec("mla_gqa_groups", "MLA caches as little as GQA with 2.25 groups",
              f"{V2_REPORT}, section 2.1.4 and Table 1", {"groups": 2.25}, _mla_gqa_groups),
    ClaimSpec("mtp_speculation", "MTP as a draft model: the second token is accepted 85-90% of the time, 1.8x "
              "tokens/s", f"{V3_REPORT}, section 5.4.3", {"acceptance": (0.85, 0.90), "speedup": 1.8},
              _mtp_speculation, ("mtp_acceptance", "mtp_speedup")),
    ClaimSpec("balance", "auxiliary-loss-free balancing keeps experts balanced (low MaxVio) without an auxiliary "
              "loss's quality cost", f"{V3_REPORT}, sections 2.1.2 and 4.5; Wang et al., arXiv 2408.15664", {},
              _balance, ("maxvio",)),
    ClaimSpec("llama_1pct", "DeepSeek-V3 cost 1% of Llama 3's training", "popular comparisons, January 2025; Llama "
              "3.1 model card and arXiv 2407.21783 for Llama's figures", {"share": 0.01}, _llama_share),
    ClaimSpec("gaming_gpus", "DeepSeek-R1 runs on gaming GPUs", "popular coverage, January 2025; the distilled "
              "models: DeepSeek-R1 model card", {"gpus": 1}, _gaming_gpus),
    ClaimSpec("api_price", "R1's API is 95% cheaper than OpenAI o1", "DeepSeek and OpenAI API pricing pages, January "
              "2025; DeepSeek open-infra-index, Day 6 (March 2025)", {"cheaper": 0.95}, _api_price),
    ClaimSpec("r1_cost", "training DeepSeek-R1 cost $294K", "Nature 645, 633-638 (2025), supplementary information",
              {"dollars": 294e3}, _r1_cost),
    ClaimSpec("total_cost", "DeepSeek built V3 for $5.6M", "popular reading of the V3 report, January 2025",
              {"dollars": 5.6e6}, _total_cost),
)
MEASURABLE = tuple(c.key for c in CLAIMS if c.measures)  # claims our runs measure too


def claims(measured: dict | None = None, cfg: ModelConfig | None = None) -> list[Claim]:
    """Every claim with its check; `cfg` (default: the official V3 config) is the model the figures are computed
    from, `measured` what `measurements` found in our runs."""
    cfg = cfg or ModelConfig.from_preset("v3-671b")
    out = []
    for spec in CLAIMS:
        c = spec.check(cfg, spec.quoted)
        verdict = UNCHECKABLE if c.agrees is None else CONSISTENT if c.agrees else INCONSISTENT
        out.append(Claim(spec.key, spec.claim, spec.source, c.computed, verdict, c.reason,
                         _measured(measured or {}, spec.measures), c.numbers))
    return out


_MEASURED = {  # how each of our measurements reads beside a claim
    "fp8_relative_loss": "{value:+.2%} relative loss, FP8 vs fp32 ({source})",
    "mtp_acceptance": "{value:.1%} of drafts accepted ({source})",
    "mtp_speedup": "{value:.2f}x tokens/s with MTP ({source})",
    "maxvio": ("{stage}: MaxVio {first:.2f} over the first {n} of {steps} steps, {last:.2f} over the last {n} "
               "({source})"),
}


def _measured(measured: dict, keys: tuple[str, ...]) -> str | None:
    return "; ".join(_MEASURED[k].format(**m) for k in keys for m in measured.get(k, [])) or None


# ---- our measurements ---------------------------------------------------------------------------------------------
def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _read_maxvio(path: Path, found: dict) -> bool:
    values = [r["maxvio_mean"] for r in read_metrics(path) if "maxvio_mean" in r]
    if values:
        n = max(1, min(10, len(values) // 2))  # steps averaged at each end
        found.setdefault("maxvio", []).append({"stage": path.parent.resolve().name, "first": _mean(values[:n]),
                                               "last": _mean(values[-n:]), "n": n, "steps": len(values),
                                               "source": str(path)})
    return bool(values)


def _read_report(path: Path, found: dict) -> bool:
    """Measurements in a JSON report: `nanoseek eval --speculative --out`, benchmarks/decode.py --out,
    benchmarks/fp8_vs_fp32.py's fp8.json. False when it holds none."""
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        return False
    n = 0
    if "relative_loss_difference" in d:
        found.setdefault("fp8_relative_loss", []).append({
            "value": d["relative_loss_difference"],
            "source": f"benchmarks/fp8_vs_fp32.py, preset {d.get('preset')}, {d.get('steps')} steps: {path}"})
        n += 1
    if "acceptance_rate" in d:
        found.setdefault("mtp_acceptance", []).append({
            "value": d["acceptance_rate"], "source": f"nanoseek eval --speculative on {d.get('problems')}: {path}"})
        n += 1
    batches = {k: v for k, v in d.get("cyclic", {}).items() if k.startswith("batch_")} if isinstance(
        d.get("cyclic"), dict) else {}
    if batches:
        name, r = min(batches.items(), key=lambda kv: int(kv[0].split("_")[1]))
        where = f"benchmarks/decode.py, a model trained on a cyclic sequence, {name.replace('_', ' ')}: {path}"
        found.setdefault("mtp_acceptance", []).append({"value": r["mtp_acceptance"], "source": where})
        found.setdefault("mtp_speedup", []).append({"value": r["mtp_speedup"], "source": where})
        n += 1
    return n > 0


def measurements(paths: list[Path]) -> dict:
    """Our figures for the claims a run can measure, from run or stage directories (MaxVio from metrics.jsonl; the
    JSON reports in them and in evals/) and from report files (see `_read_report`)."""
    found: dict = {}
    for path in map(Path, paths):
        if path.is_dir():
            stages = [s.dir for s in find_stages(path)]
            hit = [_read_maxvio(s / METRICS, found) for s in stages]
            reports = sorted({*path.glob("*.json"), *path.glob("evals/*.json"),
                              *(f for s in stages for f in s.glob("*.json"))})
            hit += [_read_report(f, found) for f in reports]
            if not any(hit):
                raise DataError(f"{path}: no metrics.jsonl with MaxVio and no JSON report with a measurement in it")
        elif path.suffix == ".jsonl":
            if not _read_maxvio(path, found):
                raise DataError(f"{path}: no maxvio_mean in its rows")
        elif path.suffix == ".json" and path.exists():
            if not _read_report(path, found):
                raise DataError(f"{path}: none of acceptance_rate (nanoseek eval --speculative --out), "
                                "relative_loss_difference (benchmarks/fp8_vs_fp32.py) or cyclic (benchmarks/decode.py)")
        else:
            raise DataError(f"{path}: expected a run directory, a metrics.jsonl or a JSON report")
    return found


def format_claims(items: list[Claim], markdown: bool = False) -> str:
    """The claims as a markdown table, or as blocks for the terminal."""
    if markdown:
        lines = ["| claim | source | computed by nanoseek | verdict | reason | our measurement |",
                 "|---|---|---|---|---|---|"]
        lines += [f"| {c.claim} | {c.source} | {c.computed} | **{c.verdict}** | {c.reason} | "
                  f"{c.measured or ('not measured' if c.key in MEASURABLE else '')} |" for c in items]
        return "\n".join(lines)
    blocks = []
    for c in items:
        block = [f"[{c.verdict}] {c.claim}", f"  source:   {c.source}", f"  computed: {c.computed}",
                 f"  reason:   {c.reason}"]
        if c.measured or c.key in MEASURABLE:
            block.append(f"  ours:     {c.measured or 'not measured (nanoseek claims --run RUN_DIR or a JSON report)'}")
        blocks.append("\n".join(block))
    counts = {v: sum(c.verdict == v for c in items) for v in (CONSISTENT, INCONSISTENT, UNCHECKABLE)}
    return "\n\n".join(blocks) + "\n\n" + ", ".join(f"{n} {v}" for v, n in counts.items())


def claims_json(items: list[Claim]) -> list[dict]:
    return [asdict(c) for c in items]
