"""The public claims about DeepSeek-V3/R1, each checked against what can be computed from first principles.

A claim carries its source, what nanoseek computes (from the V3 config through `cost.py`, and the GPU table in
`gpus.py`), a verdict and the reason for it:

  consistent      the published figures agree with each other and with the arithmetic
  inconsistent    they do not (often: a popular reading of a figure, not the figure)
  not checkable   public facts cannot settle it; where one of our runs measures the same quantity (MTP acceptance,
                  FP8 loss error, MaxVio) our measurement is shown beside it, on our much smaller models

`claims(measured)` builds the list; `measurements(paths)` reads our measurements from run directories and reports.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import ModelConfig
from .cost import (format_dollars, kv_cache_bytes_per_token, param_counts, read_metrics, serving_memory,
                   stage_dirs, training_flops)
from .errors import DataError
from .gpus import get_gpu

CONSISTENT, INCONSISTENT, UNCHECKABLE = "consistent", "inconsistent", "not checkable"
MEASURABLE = ("fp8_loss", "mtp_speculation", "balance")  # claims our runs measure too
V3_REPORT = "DeepSeek-V3 Technical Report (arXiv 2412.19437)"
V2_REPORT = "DeepSeek-V2 report (arXiv 2405.04434)"

# DeepSeek-V3 report, Table 1: H800 GPU-hours per stage, priced at $2 per GPU-hour.
V3_GPU_HOURS = {"pre-training": 2664e3, "context extension": 119e3, "post-training": 5e3}
V3_PRICE = 2.0
V3_TOTAL = {"gpu_hours": 2788e3, "dollars": 5.576e6}  # the table's totals
V3_TOKENS = 14.8e12  # pre-training tokens (section 4.2)
V3_GPUS = 2048  # H800s in the training cluster (section 3.1)
V3_GPU_HOURS_PER_T = 180e3  # "180K H800 GPU hours" per trillion tokens, "3.7 days on our cluster" (section 1)
V3_SEQ_LEN = 4096  # pre-training context (section 4.2)
# Context extension (section 4.3): two phases of 1,000 steps, 32K context x 1,920 sequences, then 128K x 480.
V3_EXTENSION = ((32768, 1920, 1000), (131072, 480, 1000))
# Large dense runs report 38-43% BF16 MFU (Llama 3 405B, arXiv 2407.21783, Table 4) and 46.2% (PaLM 540B, arXiv
# 2204.02311); an implied MFU outside this band would mean the hours and the tokens do not describe one run.
PLAUSIBLE_MFU = (0.15, 0.60)
# Llama 3.1 405B: 30.84M H100-80GB GPU-hours (Llama 3.1 model card); 405B dense parameters on 15.6T tokens, 3.8e25
# FLOPs (The Llama 3 Herd of Models, arXiv 2407.21783, section 3).
LLAMA3_405B = {"gpu_hours": 30.84e6, "params": 405e9, "tokens": 15.6e12, "reported_flops": 3.8e25}
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
# for R1-Zero and 80 hours for R1, 5K GPU-hours to build the SFT data, $294K in all at $2 per GPU-hour.
R1_RL = {"gpus": 512, "r1_zero_hours": 198, "r1_hours": 80, "sft_data_gpu_hours": 5e3, "claimed_dollars": 294e3}


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


def claims(measured: dict | None = None, cfg: ModelConfig | None = None) -> list[Claim]:
    """Every claim with its check; `cfg` (default: the official V3 config) is the model the figures are computed
    from, `measured` what `measurements` found in our runs."""
    cfg = cfg or ModelConfig.from_preset("v3-671b")
    measured = measured or {}
    p, h800 = param_counts(cfg), get_gpu("h800")
    out = []

    total_hours = sum(V3_GPU_HOURS.values())
    stage_dollars = {k: v * V3_PRICE for k, v in V3_GPU_HOURS.items()}
    out.append(Claim(
        "cost_table", "$5.576M: 2,788K H800 GPU-hours at $2/hour (pre-training 2,664K, context extension 119K, "
        "post-training 5K)", f"{V3_REPORT}, Table 1",
        " + ".join(_k(v) for v in V3_GPU_HOURS.values()) + f" = {_k(total_hours)} GPU-hours; x ${V3_PRICE:.0f} = "
        + " + ".join(f"${v / 1e6:.3f}M" for v in stage_dollars.values()) + f" = ${total_hours * V3_PRICE / 1e6:.3f}M",
        CONSISTENT if (total_hours, total_hours * V3_PRICE) == (V3_TOTAL["gpu_hours"], V3_TOTAL["dollars"])
        else INCONSISTENT, "the stages add up and the price multiplies out; the report itself says the figure covers "
        "only the official training run, not prior research and ablations",
        numbers={"gpu_hours": total_hours, "dollars": total_hours * V3_PRICE, "stage_dollars": stage_dollars}))

    pre = training_flops(cfg, V3_TOKENS, V3_SEQ_LEN)
    achieved = pre["total"] / (V3_GPU_HOURS["pre-training"] * 3600)
    mfu = {"bf16": achieved / h800.bf16, "fp8": achieved / h800.fp8}
    plausible = PLAUSIBLE_MFU[0] <= mfu["bf16"] <= PLAUSIBLE_MFU[1]
    per = pre["per_token"]
    out.append(Claim(
        "pretraining_mfu", "pre-training on 14.8T tokens took 2,664K H800 GPU-hours", f"{V3_REPORT}, Table 1 and "
        "section 4.2", f"{per['total'] / 1e9:.1f} GFLOP per token (6 x {p.matmul_activated / 1e9:.2f}B = "
        f"{per['matmul'] / 1e9:.1f}, attention at {V3_SEQ_LEN:,} context {per['attention'] / 1e9:.1f}, MTP "
        f"{per['mtp'] / 1e9:.1f}) x 14.8T = {pre['total']:.3g} FLOPs; in 2,664K GPU-hours that is "
        f"{achieved / 1e12:.0f} TFLOP/s per GPU: {mfu['bf16']:.1%} of the H800's dense BF16 peak, {mfu['fp8']:.1%} "
        "of its FP8 peak", CONSISTENT if plausible else INCONSISTENT,
        f"an MFU of {mfu['bf16']:.0%} (BF16 terms) is what well-run large trainings reach (Llama 3 405B: 38-43%); "
        f"with most GEMMs in FP8 it is a modest {mfu['fp8']:.0%} of the FP8 peak" if plausible else
        f"an MFU of {mfu['bf16']:.0%} lies outside the {PLAUSIBLE_MFU[0]:.0%}-{PLAUSIBLE_MFU[1]:.0%} that large runs "
        "reach, so these hours cannot have trained this model on these tokens",
        numbers={"flops": pre["total"], "flops_per_token": per, "achieved_flops_per_s": achieved, "mfu": mfu}))

    per_t_days = V3_GPU_HOURS_PER_T / V3_GPUS / 24
    out.append(Claim(
        "per_trillion", "180K H800 GPU-hours per trillion tokens: 3.7 days on 2,048 H800s",
        f"{V3_REPORT}, section 1", f"180K x 14.8 = {_k(V3_GPU_HOURS_PER_T * 14.8)} GPU-hours (Table 1: 2,664K); "
        f"180K / 2,048 GPUs = {per_t_days:.2f} days",
        CONSISTENT if round(per_t_days, 1) == 3.7 and round(V3_GPU_HOURS_PER_T * 14.8) == V3_GPU_HOURS["pre-training"]
        else INCONSISTENT, "the rate, the token count and the pre-training hours agree exactly",
        numbers={"days_per_trillion": per_t_days, "pretraining_gpu_hours": V3_GPU_HOURS_PER_T * 14.8}))

    days = {"pre-training": V3_GPU_HOURS["pre-training"] / V3_GPUS / 24, "all stages": total_hours / V3_GPUS / 24}
    out.append(Claim(
        "cluster_time", "2,048 H800 GPUs; pre-training completed in less than two months", f"{V3_REPORT}, sections 1 "
        "and 3.1", f"2,664K / 2,048 = {days['pre-training']:.1f} days of pre-training; all 2,788K GPU-hours = "
        f"{days['all stages']:.1f} days", CONSISTENT if days["pre-training"] < 61 else INCONSISTENT,
        "the GPU-hours fit the cluster and the calendar (two months: ~61 days)" if days["pre-training"] < 61 else
        "the GPU-hours need longer than two months on this cluster", numbers={"days": days}))

    ext_flops = sum(training_flops(cfg, steps * batch * seq, seq, mtp=False)["total"]
                    for seq, batch, steps in V3_EXTENSION)
    ext_tokens = sum(steps * batch * seq for seq, batch, steps in V3_EXTENSION)
    ext_mfu = ext_flops / (V3_GPU_HOURS["context extension"] * 3600) / h800.bf16
    out.append(Claim(
        "context_extension", "context extension to 32K then 128K (1,000 steps each) took 119K GPU-hours",
        f"{V3_REPORT}, Table 1 and section 4.3", f"{ext_tokens / 1e9:.0f}B tokens; attention over long contexts "
        f"dominates: {ext_flops:.3g} FLOPs (MTP left out), {ext_mfu:.1%} BF16 MFU in 119K GPU-hours",
        CONSISTENT if PLAUSIBLE_MFU[0] <= ext_mfu <= PLAUSIBLE_MFU[1] else INCONSISTENT,
        "a plausible MFU, lower than pre-training's as long-context attention runs less efficiently"
        if PLAUSIBLE_MFU[0] <= ext_mfu <= PLAUSIBLE_MFU[1] else
        f"an MFU outside the {PLAUSIBLE_MFU[0]:.0%}-{PLAUSIBLE_MFU[1]:.0%} that large runs reach",
        numbers={"tokens": ext_tokens, "flops": ext_flops, "mfu": ext_mfu}))

    out.append(Claim(
        "post_training", "post-training (SFT and RL) took 5K GPU-hours", f"{V3_REPORT}, Table 1", "5K GPU-hours at "
        f"40% MFU train {5e3 * 3600 * 0.4 * h800.bf16 / per['total'] / 1e9:.0f}B tokens", UNCHECKABLE,
        "the SFT set (1.5M instances, 2 epochs) has no published token count, and RL's rollouts and their lengths "
        "are not given"))

    activated = {"with embedding": p.activated, "without": p.activated_without_embedding}
    matches = abs(p.total / 1e9 - 671) < 0.5 and abs(p.activated / 1e9 - 37) < 1
    out.append(Claim(
        "parameters", "671B parameters, 37B activated per token (685B on Hugging Face with the MTP module)",
        f"{V3_REPORT}, abstract; Hugging Face model card", f"from the config: {p.total / 1e9:.2f}B total; activated "
        f"{p.activated / 1e9:.2f}B with the embedding, {p.activated_without_embedding / 1e9:.2f}B without; MTP "
        f"{p.mtp_total / 1e9:.2f}B unique, {(p.mtp_total + 2 * p.embedding) / 1e9:.2f}B with its stored embedding and "
        f"head: {(p.total + p.mtp_total + 2 * p.embedding) / 1e9:.1f}B in the checkpoint",
        CONSISTENT if matches else INCONSISTENT,
        "the config reproduces both figures (37B sits between the counts with and without the embedding)" if matches
        else "this config does not reproduce the published counts",
        numbers={"total": p.total, "activated": activated, "mtp": p.mtp_total}))

    serve = serving_memory(cfg, 1)
    w = serve["weights_bytes"]
    out.append(Claim(
        "fp8_memory", "FP8 training needs 75% less memory", "popular summaries of the V3 report, January 2025; the "
        f"report's FP8 framework: {V3_REPORT}, section 3.3", f"per tensor FP8 is 1 byte: 50% less than BF16, 75% less "
        f"only against FP32; V3's weights: {w['fp8'] / 1e9:,.0f} GB in FP8, {w['bf16'] / 1e9:,.0f} GB in BF16. Model "
        "state per parameter: 16 B for mixed-precision Adam (ZeRO, arXiv 1910.02054), 12 B for V3 (FP32 master "
        "weights and gradients, BF16 moments): 25% less",
        INCONSISTENT if 1 - w["fp8"] / w["bf16"] < 0.7 else CONSISTENT,
        "75% is FP8 against FP32; V3's baseline is BF16 (50%), and it keeps master weights, gradients and optimiser "
        "states in higher precision, so training memory falls far less; FP8 mainly halves cached activations",
        numbers={"weights_bytes": w, "state_bytes_per_param": {"mixed_precision_adam": 16, "v3": 12}}))

    out.append(Claim(
        "fp8_loss", "FP8 training's loss stays within 0.25% (relative) of BF16", f"{V3_REPORT}, section 3.3 and "
        "appendix B.1", "nothing to compute: it is a property of training runs", UNCHECKABLE,
        "only training both ways shows it; our runs compare FP8 with fp32 on small models",
        _measured(measured, "fp8_relative_loss")))

    v67 = 2 * DEEPSEEK_67B_KV["kv_heads"] * DEEPSEEK_67B_KV["head_dim"] * DEEPSEEK_67B_KV["layers"]  # K and V
    v2 = (V2_KV["kv_lora_rank"] + V2_KV["qk_rope_head_dim"]) * V2_KV["layers"]
    cut = {"bf16": 1 - v2 / v67, "6-bit": 1 - v2 * V2_KV["bits"] / (v67 * 16)}
    out.append(Claim(
        "mla_v2_kv", "MLA cuts the KV cache by 93.3% (DeepSeek-V2 against DeepSeek 67B)", f"{V2_REPORT}, abstract and "
        "section 3.2.3", f"per token: 67B (GQA, 8 KV heads) {v67:,} values, V2 (MLA) {v2:,}: {cut['bf16']:.1%} "
        f"smaller at equal precision, {cut['6-bit']:.1%} with V2's 6-bit cache against 67B's BF16",
        CONSISTENT if round(cut["6-bit"], 3) == 0.933 else INCONSISTENT,
        f"93.3% holds when V2's 6-bit cache quantisation is counted; MLA's own share is {cut['bf16']:.0%}",
        numbers={"values_67b": v67, "values_v2": v2, "reduction": cut}))

    kv = kv_cache_bytes_per_token(cfg)
    groups = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) / (2 * cfg.qk_nope_head_dim)
    out.append(Claim(
        "mla_gqa_groups", "MLA caches as little as GQA with 2.25 groups", f"{V2_REPORT}, section 2.1.4 and Table 1",
        f"(d_c + d_h^R) / (2 d_h) = ({cfg.kv_lora_rank} + {cfg.qk_rope_head_dim}) / (2 x {cfg.qk_nope_head_dim}) = "
        f"{groups:g} groups; V3: {kv['mla_bytes']:,} B per token (BF16) against {kv['mha_bytes']:,} B for the "
        f"equivalent MHA, {kv['mha_bytes'] / kv['mla_bytes']:.1f}x less",
        CONSISTENT if groups == 2.25 else INCONSISTENT, "the cache sizes follow from the dimensions",
        numbers={"groups": groups, "kv_bytes_per_token": kv}))

    lo, hi = 0.85, 0.90
    out.append(Claim(
        "mtp_speculation", "MTP as a draft model: the second token is accepted 85-90% of the time, 1.8x tokens/s",
        f"{V3_REPORT}, section 5.4.3", f"one draft token per step yields 1 + p = {1 + lo:.2f}-{1 + hi:.2f} tokens per "
        f"step; 1.8x then means a step costs {(1 + lo) / 1.8 - 1:.0%}-{(1 + hi) / 1.8 - 1:.0%} more than a plain "
        "decode step", CONSISTENT if 1.8 <= 1 + lo else INCONSISTENT,
        "the speed-up is what the acceptance rate allows after a small drafting overhead",
        _measured(measured, "mtp_acceptance", "mtp_speedup"), numbers={"tokens_per_step": (1 + lo, 1 + hi)}))

    out.append(Claim(
        "balance", "auxiliary-loss-free balancing keeps experts balanced (low MaxVio) without an auxiliary loss's "
        "quality cost", f"{V3_REPORT}, sections 2.1.2 and 4.5; Wang et al., arXiv 2408.15664",
        "nothing to compute: balance is a property of training dynamics", UNCHECKABLE,
        "only training shows it; our runs log MaxVio = (max load - mean load) / mean load per MoE layer and step",
        _measured(measured, "maxvio")))

    flops_llama = 6 * LLAMA3_405B["params"] * LLAMA3_405B["tokens"]
    ratio = {"gpu_hours": total_hours / LLAMA3_405B["gpu_hours"], "flops": pre["total"] / flops_llama}
    out.append(Claim(
        "llama_1pct", "DeepSeek-V3 cost 1% of Llama 3's training", "popular comparisons, January 2025; Llama 3.1 model "
        "card and arXiv 2407.21783 for Llama's figures", f"GPU-hours: 2,788K / 30.84M = {ratio['gpu_hours']:.1%}; "
        f"FLOPs: {pre['total']:.3g} / (6 x 405B x 15.6T = {flops_llama:.3g}; Meta: 3.8e25) = {ratio['flops']:.1%}",
        INCONSISTENT if ratio["gpu_hours"] > 0.02 else CONSISTENT,
        f"about {1 / ratio['gpu_hours']:.0f}x less, not 100x: MoE activates {p.activated / 1e9:.1f}B of "
        f"{p.total / 1e9:.0f}B parameters per token, against Llama's 405B dense", numbers={"ratio": ratio}))

    small = serving_memory(cfg, 4096, gpu="rtx4090")["min_gpus_by_type"]
    out.append(Claim(
        "gaming_gpus", "DeepSeek-R1 runs on gaming GPUs", "popular coverage, January 2025; the distilled models: "
        "DeepSeek-R1 model card", f"R1 has V3's {p.total / 1e9:.0f}B parameters: {w['4bit'] / 1e9:.0f} GB of "
        f"weights even at 4 bits, at least {small['rtx4090']['4bit']} RTX 4090s or {small['rtx5090']['4bit']} RTX "
        f"5090s ({small['rtx4090']['fp8']} / {small['rtx5090']['fp8']} in FP8); a 32B distilled model at 4 bits is "
        "16 GB, one RTX 4090", INCONSISTENT if small["rtx5090"]["4bit"] > 1 else CONSISTENT,
        "what runs on one gaming GPU is a distilled Qwen or Llama model (1.5B-70B) trained on R1's outputs, or R1 "
        "squeezed below 2 bits with most of it in CPU memory",
        numbers={"min_gpus": {k: small[k] for k in ("rtx4090", "rtx5090")}}))

    cheaper = {k: 1 - R1_PRICE[k] / O1_PRICE[k] for k in R1_PRICE}
    node_dollars_per_s = V3_SERVING["gpus_per_node"] * V3_PRICE / 3600
    cost_per_m = {"input": node_dollars_per_s / V3_SERVING["prefill_tokens_per_s"] * 1e6,
                  "output": node_dollars_per_s / V3_SERVING["decode_tokens_per_s"] * 1e6}
    out.append(Claim(
        "api_price", "R1's API is 95% cheaper than OpenAI o1", "DeepSeek and OpenAI API pricing pages, January 2025; "
        "DeepSeek open-infra-index, Day 6 (March 2025)", f"list prices: {cheaper['input']:.1%} less per input token, "
        f"{cheaper['output']:.1%} per output token; DeepSeek's own throughput (14.8K output tokens/s per 8-H800 node "
        f"at $2/GPU-hour) costs {format_dollars(cost_per_m['output'])} per million output tokens against the "
        f"{format_dollars(R1_PRICE['output'])} price", CONSISTENT if min(cheaper.values()) >= 0.95 else INCONSISTENT,
        f"about {min(cheaper.values()):.0%} cheaper at list prices, and the output price is "
        f"{R1_PRICE['output'] / cost_per_m['output']:.0f}x DeepSeek's GPU cost per output token",
        numbers={"cheaper": cheaper, "gpu_cost_per_million": cost_per_m}))

    r1_hours = R1_RL["gpus"] * (R1_RL["r1_zero_hours"] + R1_RL["r1_hours"]) + R1_RL["sft_data_gpu_hours"]
    out.append(Claim(
        "r1_cost", "training DeepSeek-R1 cost $294K", "Nature 645, 633-638 (2025), supplementary information",
        f"512 H800s x (198 + 80) hours + 5K = {_k(r1_hours)} GPU-hours x $2 = {format_dollars(r1_hours * V3_PRICE)}",
        CONSISTENT if abs(r1_hours * V3_PRICE - R1_RL["claimed_dollars"]) < 5e3 else INCONSISTENT,
        f"the arithmetic holds; it covers R1's reinforcement learning on top of V3-Base, whose {_k(total_hours)} "
        f"GPU-hours ({total_hours / r1_hours:.0f}x more) came first", numbers={"gpu_hours": r1_hours}))

    out.append(Claim(
        "total_cost", "DeepSeek built V3 for $5.6M", "popular reading of the V3 report, January 2025",
        f"$5.576M is {_k(total_hours)} rented GPU-hours at $2, nothing else", UNCHECKABLE,
        "the report excludes research, ablations, data and staff, and DeepSeek owns its GPUs; none of those costs "
        "is published"))
    return out


def _measured(measured: dict, *keys: str) -> str | None:
    parts = []
    for key in keys:
        for m in measured.get(key, []):
            if key == "maxvio":
                parts.append(f"{m['stage']}: MaxVio {m['first']:.2f} over the first {m['n']} of {m['steps']} steps, "
                             f"{m['last']:.2f} over the last {m['n']} ({m['source']})")
            elif key == "fp8_relative_loss":
                parts.append(f"{m['value']:+.2%} relative loss, FP8 vs fp32 ({m['source']})")
            elif key == "mtp_acceptance":
                parts.append(f"{m['value']:.1%} of drafts accepted ({m['source']})")
            else:
                parts.append(f"{m['value']:.2f}x tokens/s with MTP ({m['source']})")
    return "; ".join(parts) or None


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
            try:
                stages = stage_dirs(path)
            except DataError:
                stages = []
            hit = [_read_maxvio(s / "metrics.jsonl", found) for s in stages]
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
