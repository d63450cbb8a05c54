"""Counting from first principles: parameters (total and activated per token), KV-cache bytes, FLOPs per token,
and what they cost: training FLOPs, GPU-hours, MFU and dollars; serving memory; the measured cost of our own runs.

Everything is computed from the config alone, so it works for 671B models that no laptop can instantiate; the tests
check the counts against the parameters of real instantiated models. GPU figures live in `gpus.py`.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import ConfigError, DataError
from .gpus import GPUS, get_gpu
from .rundir import find_stages, read_metrics


@dataclass
class ParamCounts:
    total: int  # main model: embedding, layers, final norm, head (no MTP)
    activated: int  # per token: embedding + head + attention + dense MLPs + shared and top-k routed experts + gates
    embedding: int
    mtp_total: int  # unique MTP parameters (the embedding and head are shared with the main model)
    mtp_activated: int
    matmul_activated: int  # weights of the matrix multiplies a token passes through (FLOPs = 2 x this)
    mtp_matmul_activated: int

    @property
    def activated_without_embedding(self) -> int:
        return self.activated - self.embedding


def _attention(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters, matmul weights) of one MLA layer."""
    D, H = cfg.hidden_size, cfg.num_attention_heads
    q = D * H * cfg.qk_head_dim if cfg.q_lora_rank is None else (
        D * cfg.q_lora_rank + cfg.q_lora_rank * H * cfg.qk_head_dim)
    mm = q + D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (
        cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D
    norms = (cfg.q_lora_rank or 0) + cfg.kv_lora_rank
    return mm + norms, mm


def _ffn(cfg: ModelConfig, layer_id: int) -> tuple[int, int, int]:
    """(total, activated, activated matmul weights) of one layer's feed-forward part."""
    D = cfg.hidden_size
    if not cfg.is_moe_layer(layer_id):
        dense = 3 * D * cfg.intermediate_size
        return dense, dense, dense
    expert = 3 * D * cfg.moe_intermediate_size
    gate = cfg.n_routed_experts * D
    bias = cfg.n_routed_experts if cfg.topk_method == "noaux_tc" else 0
    shared = cfg.n_shared_experts * expert
    active_mm = cfg.num_experts_per_tok * expert + shared + gate
    return cfg.n_routed_experts * expert + shared + gate + bias, active_mm + bias, active_mm


def param_counts(cfg: ModelConfig) -> ParamCounts:
    D, V = cfg.hidden_size, cfg.vocab_size
    attn, attn_mm = _attention(cfg)
    embedding, head = V * D, 0 if cfg.tie_word_embeddings else V * D
    total = activated = embedding + head + D  # + final norm
    matmul = V * D  # the head
    for i in range(cfg.num_hidden_layers):
        ffn_total, ffn_active, ffn_mm = _ffn(cfg, i)
        total += attn + 2 * D + ffn_total
        activated += attn + 2 * D + ffn_active
        matmul += attn_mm + ffn_mm
    mtp_total = mtp_active = mtp_mm = 0
    for k in range(cfg.num_nextn_predict_layers):
        ffn_total, ffn_active, ffn_mm = _ffn(cfg, cfg.num_hidden_layers + k)
        own = attn + 2 * D + 2 * D + 2 * D * D + D  # block norms, enorm + hnorm, eh_proj, shared_head.norm
        mtp_total += own + ffn_total
        mtp_active += own + ffn_active
        mtp_mm += attn_mm + ffn_mm + 2 * D * D + V * D  # the shared head runs again for each depth
    return ParamCounts(total, activated, embedding, mtp_total, mtp_active, matmul, mtp_mm)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 2) -> dict[str, int]:
    """MLA caches c^KV and k^R per layer; the equivalent multi-head attention caches every head's key and value."""
    mla = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers
    mha = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * cfg.num_hidden_layers
    return {"mla_values": mla, "mla_bytes": mla * bytes_per_value,
            "mha_values": mha, "mha_bytes": mha * bytes_per_value}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token: 2 x activated matmul weights, plus attention scores and values over a causal
    context of `seq_len` (on average (seq_len + 1) / 2 keys). Training = 3 x forward (backward costs twice)."""
    p = param_counts(cfg)
    keys = (seq_len + 1) / 2
    attn = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * keys * cfg.num_hidden_layers
    attn_mtp = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * keys * cfg.num_nextn_predict_layers
    forward = 2 * p.matmul_activated + attn
    mtp_forward = 2 * p.mtp_matmul_activated + attn_mtp
    return {"seq_len": seq_len, "forward_matmul": 2 * p.matmul_activated, "forward_attention": attn,
            "forward": forward, "training": 3 * forward, "mtp_forward": mtp_forward, "mtp_training": 3 * mtp_forward}


def model_info(cfg: ModelConfig, seq_len: int = 4096) -> dict:
    p = param_counts(cfg)
    return {"params": {**asdict(p), "activated_without_embedding": p.activated_without_embedding},
            "kv_cache_per_token": kv_cache_bytes_per_token(cfg), "flops_per_token": flops_per_token(cfg, seq_len)}


def matmul_peak(device: str | torch.device = "cpu", n: int = 1024, repeats: int = 16) -> float:
    """This machine's best dense matmul FLOP/s, n x n, fp32 on CPU and bf16 on CUDA: the yardstick for MFU. On the
    CPU, n = 1024 reads within 2% of n = 2048 in a seventh of the time."""
    device = torch.device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n * 4 if device.type == "cuda" else n
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


# ---- training: FLOPs, GPU-hours, MFU, dollars ------------------------------------------------------------------------
_SUFFIXES = {"": 1.0, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def quantity(text: str) -> float:
    """A count from the command line: 14.8e12, 14.8T, 2.664M, 180K (B and G: 1e9)."""
    m = re.fullmatch(r"\s*(\d+\.?\d*(?:e[+-]?\d+)?)\s*([KMBGT]?)\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(text)
    return float(m[1]) * _SUFFIXES[m[2].upper()]


def training_flops(cfg: ModelConfig, tokens: float, seq_len: int = 4096, mtp: bool = True) -> dict:
    """FLOPs to train on `tokens` tokens of context `seq_len`, per token and in all: 6 x N for the N activated matmul
    weights (3 x forward), the attention scores and values (3 x forward), and the MTP modules (when `mtp`)."""
    f = flops_per_token(cfg, seq_len)
    per_token = {"matmul": 3 * f["forward_matmul"], "attention": 3 * f["forward_attention"],
                 "mtp": f["mtp_training"] if mtp else 0.0}
    per_token["total"] = sum(per_token.values())
    return {"tokens": tokens, "seq_len": seq_len, "activated_matmul_params": param_counts(cfg).matmul_activated,
            "per_token": per_token, "total": per_token["total"] * tokens}


def training_cost(cfg: ModelConfig, tokens: float, gpu: str = "h800", seq_len: int = 4096, *,
                  mfu: float | None = None, tokens_per_s: float | None = None, gpu_hours: float | None = None,
                  price: float | None = None, n_gpus: int = 1, precision: str = "bf16", mtp: bool = True) -> dict:
    """GPU-hours, MFU and dollars to train `cfg` on `tokens` tokens with `n_gpus` GPUs of type `gpu`, from exactly one
    of: an MFU (a fraction of the dense `precision` peak), a measured throughput (tokens/s of the `n_gpus` together),
    or claimed GPU-hours (the reverse: the MFU they imply). `by_gpu`: the same FLOPs at that MFU on every GPU type."""
    given = {k: v for k, v in (("mfu", mfu), ("tokens_per_s", tokens_per_s), ("gpu_hours", gpu_hours)) if v is not None}
    if len(given) != 1:
        raise ConfigError("give exactly one of mfu, tokens_per_s (measured throughput) or gpu_hours (claimed)")
    (basis, value), = given.items()
    if value <= 0 or (basis == "mfu" and value > 1):
        raise ConfigError(f"{basis} = {value}: must be > 0" + (" and <= 1" if basis == "mfu" else ""))
    if tokens <= 0 or n_gpus < 1 or seq_len < 1:
        raise ConfigError(f"tokens = {tokens}, n_gpus = {n_gpus}, seq_len = {seq_len}: each must be positive")
    g = get_gpu(gpu)
    peak = g.peak(precision)  # fails for a GPU without FP8
    flops = training_flops(cfg, tokens, seq_len, mtp)
    if basis == "mfu":
        gpu_seconds = flops["total"] / (mfu * peak)
    elif basis == "tokens_per_s":
        gpu_seconds = tokens / tokens_per_s * n_gpus
    else:
        gpu_seconds = gpu_hours * 3600
    achieved = flops["total"] / gpu_seconds  # FLOP/s per GPU
    mfus = {p: achieved / getattr(g, p) if getattr(g, p) else None for p in ("bf16", "fp8")}
    price = g.price if price is None else price
    by_gpu = {}
    for key, other in GPUS.items():
        other_peak = getattr(other, precision)
        hours = flops["total"] / (mfus[precision] * other_peak) / 3600 if other_peak else None
        rate = price if other is g else other.price
        by_gpu[key] = {"name": other.name, "peak": other_peak, "gpu_hours": hours, "price": rate,
                       "dollars": hours * rate if hours else None, "days": hours / n_gpus / 24 if hours else None}
    hours = gpu_seconds / 3600
    return {"gpu": {"key": gpu, **g.to_dict()}, "precision": precision, "basis": basis, "given": value,
            "n_gpus": n_gpus, "flops": flops, "gpu_hours": hours, "price": price, "dollars": hours * price,
            "days": hours / n_gpus / 24, "tokens_per_s_per_gpu": tokens / gpu_seconds,
            "achieved_flops_per_s": achieved, "mfu": mfus, "by_gpu": by_gpu}


# ---- serving memory -------------------------------------------------------------------------------------------------
WEIGHT_BYTES = {"bf16": 2.0, "fp8": 1.0, "4bit": 0.5}  # per parameter (4-bit: the group scales left out, ~3% more)


def serving_memory(cfg: ModelConfig, context: int, batch: int = 1, gpu: str = "h800", mtp: bool = False) -> dict:
    """Memory to serve `batch` sequences of `context` tokens: the weights at BF16, FP8 and 4 bits, the BF16 KV cache
    with MLA and with the equivalent multi-head attention, and the fewest GPUs whose memory holds weights + cache (a
    lower bound: activations, runtime buffers and the shapes parallelism allows come on top)."""
    if context < 1 or batch < 1:
        raise ConfigError(f"context = {context}, batch = {batch}: each must be positive")
    p = param_counts(cfg)
    n = p.total + (p.mtp_total if mtp else 0)
    kv = kv_cache_bytes_per_token(cfg)
    cache = {"mla": kv["mla_bytes"] * context * batch, "mha": kv["mha_bytes"] * context * batch}
    weights = {w: n * b for w, b in WEIGHT_BYTES.items()}

    def fewest(g, w: str, attention: str) -> int:
        return math.ceil((weights[w] + cache[attention]) / g.memory_bytes)

    g = get_gpu(gpu)
    return {"params": n, "context": context, "batch": batch, "weights_bytes": weights, "kv_cache_bytes": cache,
            "kv_bytes_per_token": {"mla": kv["mla_bytes"], "mha": kv["mha_bytes"]},
            "gpu": {"key": gpu, **g.to_dict()}, "min_gpus": {w: {a: fewest(g, w, a) for a in cache} for w in weights},
            "min_gpus_by_type": {key: {w: fewest(o, w, "mla") for w in weights} for key, o in GPUS.items()}}


# ---- our own runs ---------------------------------------------------------------------------------------------------
def _on_gpus(flops: float, mfu: float) -> dict:
    """Hours and dollars of `flops` on one GPU of each type at `mfu` of its dense BF16 peak."""
    return {key: {"hours": flops / (mfu * g.bf16) / 3600, "dollars": flops / (mfu * g.bf16) / 3600 * g.price}
            for key, g in GPUS.items()}


def _stage_cost(path: Path, mfu: float) -> dict:
    metrics = path / "metrics.jsonl"
    rows = read_metrics(metrics)  # a malformed line is an error here: a cost needs every step
    if not rows:
        raise DataError(f"{metrics}: no rows")
    for i, row in enumerate(rows, 1):
        missing = [k for k in ("tokens", "seconds", "flops_per_token", "peak_flops") if k not in row]
        if missing:
            raise DataError(f"{metrics}:{i}: no {', '.join(missing)} (the training loop writes them in every row)")
    tokens, seconds = sum(r["tokens"] for r in rows), sum(r["seconds"] for r in rows)
    if seconds <= 0:
        raise DataError(f"{metrics}: the steps' seconds add up to {seconds}")
    flops = sum(r["tokens"] * r["flops_per_token"] for r in rows)
    peak = max(r["peak_flops"] for r in rows)
    return {"stage": path.resolve().name, "path": str(path), "steps": len(rows), "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "flops_per_token": rows[-1]["flops_per_token"], "flops": flops,
            "achieved_flops_per_s": flops / seconds, "peak_flops": peak, "mfu": flops / seconds / peak,
            "rollouts": "reward" in rows[-1], "gpus": _on_gpus(flops, mfu)}


def run_cost(run_dir: Path, mfu: float = 0.4) -> dict:
    """The measured cost of a run (a stage directory with metrics.jsonl, or a directory of stage directories): per
    stage tokens, seconds, tokens/s, training FLOPs, achieved FLOP/s and MFU against the device peak timed in the same
    run, and the hours and dollars the same FLOPs take on one GPU of each type at `mfu` of its dense BF16 peak."""
    if not 0 < mfu <= 1:
        raise ConfigError(f"mfu = {mfu}: must be in (0, 1]")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"{run_dir}: no such run directory")
    found = find_stages(run_dir)
    if not found:
        raise DataError(f"{run_dir}: no metrics.jsonl in it or in its subdirectories")
    stages = [_stage_cost(s.dir, mfu) for s in found]
    steps, tokens, seconds, flops = (sum(s[k] for s in stages) for k in ("steps", "tokens", "seconds", "flops"))
    total = {"steps": steps, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "flops": flops,
             "achieved_flops_per_s": flops / seconds,
             "mfu": flops / sum(s["seconds"] * s["peak_flops"] for s in stages), "gpus": _on_gpus(flops, mfu)}
    return {"run": str(run_dir), "mfu": mfu, "prices": {k: g.price for k, g in GPUS.items()}, "stages": stages,
            "total": total}


def format_duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= 2 * size or unit == "s" and seconds >= 1:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds * 1e3:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def format_dollars(x: float) -> str:
    if x >= 1e6:
        return f"${x / 1e6:,.3f}M"
    if x >= 100:
        return f"${x:,.0f}"
    return f"${x:.2f}" if x >= 0.01 else f"${x:.1e}"


def format_count(n: float) -> str:
    """A count in short: 14.80T, 36.62B, 3.40M, 2.05K, 512."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_run_cost(d: dict) -> str:
    """`run_cost`'s result as markdown: what was measured per stage, then the same FLOPs on each GPU type."""
    stages, total = d["stages"], d["total"]
    lines = ["| stage | steps | tokens | time | tokens/s | training FLOPs | achieved FLOP/s | device peak | MFU |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for s in stages:
        lines.append(f"| {s['stage']} | {s['steps']:,} | {s['tokens']:,} | {format_duration(s['seconds'])} | "
                     f"{s['tokens_per_s']:,.0f} | {s['flops']:.3g} | {s['achieved_flops_per_s']:.3g} | "
                     f"{s['peak_flops']:.3g} | {s['mfu']:.1%} |")
    if len(stages) > 1:
        lines.append(f"| total | {total['steps']:,} | {total['tokens']:,} | {format_duration(total['seconds'])} | "
                     f"{total['tokens_per_s']:,.0f} | {total['flops']:.3g} | {total['achieved_flops_per_s']:.3g} | | "
                     f"{total['mfu']:.1%} |")
    names = [s["stage"] for s in stages] + (["total"] if len(stages) > 1 else [])
    lines += ["", f"The same FLOPs on one GPU at {d['mfu']:.0%} MFU of its dense BF16 peak:", "",
              "| GPU | BF16 peak | $/GPU-hour | " + " | ".join(names) + " | dollars |",
              "|---|--:|--:|" + "--:|" * len(names) + "--:|"]
    for key, g in GPUS.items():
        times = [format_duration(s["gpus"][key]["hours"] * 3600) for s in stages]
        times += [format_duration(total["gpus"][key]["hours"] * 3600)] if len(stages) > 1 else []
        lines.append(f"| {g.name} | {g.bf16 / 1e12:,.0f} TFLOP/s | {d['prices'][key]:.2f} | " + " | ".join(times) +
                     f" | {format_dollars(total['gpus'][key]['dollars'])} |")
    lines += ["", "Training FLOPs per token: 6 x activated matmul weights + attention + MTP (nanoseek/cost.py). "
              "Device peak: the best dense matmul rate timed on this device during the run (fp32 on CPU, bf16 on "
              "CUDA); GPU peaks and prices: nanoseek/gpus.py."]
    if any(s["rollouts"] for s in stages):
        lines.append("RL stages: the step time includes generating the rollouts; the FLOPs count only the policy "
                     "update, so their MFU understates the device's use.")
    return "\n".join(lines)


def format_training_cost(t: dict, wall: bool = False) -> str:
    """`training_cost`'s result as text: the FLOPs per token and in all, the training on its GPU, then the same FLOPs
    on each GPU type. `wall`: add the days on its `n_gpus` GPUs (when their number was given)."""
    f, per, g = t["flops"], t["flops"]["per_token"], t["gpu"]
    scale, unit = (1e9, "GFLOP") if per["total"] >= 1e9 else (1e6, "MFLOP")
    lines = ["training FLOPs per token"]
    for name, value in ((f"6 x N, N = {format_count(f['activated_matmul_params'])} activated matmul weights",
                         per["matmul"]),
                        (f"attention scores and values over a causal {f['seq_len']:,}-token context",
                         per["attention"]), ("MTP modules", per["mtp"]), ("total", per["total"])):
        lines.append(f"  {name:<62} {value / scale:>12,.2f} {unit}")
    lines.append(f"  {'in all, ' + format_count(f['tokens']) + ' tokens':<62} {f['total']:>12.4g} FLOP")
    given = {"mfu": f"at {t['given']:.1%} MFU (given)", "gpu_hours": f"from {t['gpu_hours']:,.0f} GPU-hours (given)",
             "tokens_per_s": f"from {t['given']:,.0f} tokens/s measured on {t['n_gpus']:,} GPU(s)"}[t["basis"]]
    fp8 = f", {t['mfu']['fp8']:.1%} of its dense FP8 peak ({g['fp8'] / 1e12:,.1f} TFLOP/s)" if g["fp8"] else ""
    lines += [f"training on {g['name']} {given}",
              f"  per GPU:  {t['achieved_flops_per_s'] / 1e12:,.1f} TFLOP/s, {t['tokens_per_s_per_gpu']:,.0f} tokens/s",
              f"  MFU:      {t['mfu']['bf16']:.1%} of the dense BF16 peak ({g['bf16'] / 1e12:,.1f} TFLOP/s){fp8}",
              f"  cost:     {t['gpu_hours']:,.0f} GPU-hours x ${t['price']:.2f} = {format_dollars(t['dollars'])}"]
    if wall:
        lines.append(f"  wall:     {t['days']:,.1f} days on {t['n_gpus']:,} GPUs")
    lines += [f"the same FLOPs at {t['mfu'][t['precision']]:.1%} MFU ({t['precision'].upper()} peaks) on each GPU type",
              f"  {'GPU':<14} {'peak TFLOP/s':>12} {'GPU-hours':>14} {'$/hour':>7} {'dollars':>11}"
              + (f" {'days on ' + format(t['n_gpus'], ','):>14}" if wall else "")]
    for r in t["by_gpu"].values():
        if r["gpu_hours"] is None:
            lines.append(f"  {r['name']:<14} {'no ' + t['precision'].upper():>12}")
        else:
            lines.append(f"  {r['name']:<14} {r['peak'] / 1e12:>12,.1f} {r['gpu_hours']:>14,.0f} {r['price']:>7.2f} "
                         f"{format_dollars(r['dollars']):>11}" + (f" {r['days']:>14,.1f}" if wall else ""))
    return "\n".join(lines)


def format_serving_memory(s: dict) -> str:
    """`serving_memory`'s result as text: the weights, the KV cache, and the fewest GPUs of its type holding both."""
    kv, n, g = s["kv_cache_bytes"], s["min_gpus"], s["gpu"]
    labels = {"bf16": "BF16", "fp8": "FP8", "4bit": "4-bit"}
    return "\n".join([
        f"serving {s['batch']:,} sequence(s) of {s['context']:,} tokens",
        "  weights:  " + ", ".join(f"{label} {s['weights_bytes'][p] / 1e9:,.1f} GB" for p, label in labels.items()),
        f"  KV cache: MLA {kv['mla'] / 1e9:,.3f} GB ({s['kv_bytes_per_token']['mla']:,} B/token); the equivalent "
        f"MHA {kv['mha'] / 1e9:,.3f} GB ({s['kv_bytes_per_token']['mha']:,} B/token), BF16",
        f"  fewest {g['name']} ({g['memory_gib']:g} GiB) holding weights + KV cache, nothing else: "
        + ", ".join(f"{label} {n[p]['mla']}" for p, label in labels.items())
        + " (with MHA's cache: " + ", ".join(str(n[p]["mha"]) for p in labels) + ")"])
