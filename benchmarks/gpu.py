"""The CUDA paths in one run, on an NVIDIA GPU (bf16; real FP8 GEMMs on sm90): what the CPU benchmarks cannot show.

1. GEMM peaks: an n x n x n bf16 matrix product, and the same product as fp8.py's blockwise-scaled FP8 GEMM (1x128
   activation tiles against 128x128 weight blocks, and 1x128 against 1x128 as in Wgrad), TFLOP/s; each FP8 GEMM's
   relative error against its emulation (the same E4M3 operands dequantised and multiplied in fp32, what a CPU runs).
2. FP8Linear at every shape the model below has, forward and backward, on the real blockwise GEMMs against the
   emulation: relative error of y, dx, dW.
3. Greedy decoding of the one-GPU model (recipes/gpu-1x.yaml, bf16 weights): the Engine eager and compiled (Triton
   kernels replayed as CUDA graphs) against transformers' `generate` from the same weights, at batch 1 and 16; the
   compile warm-up; how many tokens each run shares with the eager engine before the first difference (bf16
   rounding differs between implementations, and a random model's logits are close); before it, the compiled
   engine's greedy tokens against its eager ones on the `small` preset in fp32, where they must be equal.
4. Training step of the same model (forward + backward + fused AdamW, bf16 autocast over fp32 master weights, as
   the trainer runs it): nanoseek eager, with FP8 GEMMs (blockwise where the shapes allow, else emulated), with the
   emulated FP8 GEMMs, with FP8 in attention and dense layers only, transformers' DeepseekV3 from the same weights,
   and nanoseek through `torch.compile`; tokens/s, MFU against section 1's bf16 peak, peak memory; the first step's
   loss and its gradients (cosine) on the first attention layer and on an MoE layer for the three nanoseek
   precisions, from the same weights on the same batch.

Each section runs while `--budget` seconds remain, and a failing section prints its error and the next one runs.

    python benchmarks/gpu.py [--batch 8] [--seq 1024] [--steps 5] [--new-tokens 64] [--budget 480]
                             [--sections gemms fp8_linear train decode_check decode train_compiled]
                             [--out FILE.json]
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F
from model_throughput import lm_loss

from nanoseek import ModelConfig, Transformer
from nanoseek.cost import flops_per_token, matmul_peak
from nanoseek.engine import Engine, IdsOnly
from nanoseek.fp8 import (BLOCK, TILE, FP8Linear, _blockwise_cuda, _mm, convert_to_fp8, dequantize,
                          dequantize_tiles, fp8_linear, quantize_blocks, quantize_tiles)
from nanoseek.model.moe import Experts, grouped_linear
from nanoseek.sampling import SamplingParams
from nanoseek.train.recipe import load_config

DEVICE = "cuda"
SECTIONS = ("gemms", "fp8_linear", "train", "decode_check", "decode", "train_compiled")


def timed(fn, repeats: int = 10, warmup: int = 2) -> float:
    """Median seconds of fn() on the GPU (synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def gpu_model_config() -> ModelConfig:
    tc = load_config("gpu-1x", {})
    return ModelConfig.from_preset(tc.preset, vocab_size=tc.vocab_size, **tc.model_overrides)


# ---- 1. GEMM peaks --------------------------------------------------------------------------------------------------
def gemms(n: int) -> dict:
    a, b = (torch.randn(n, n, device=DEVICE) for _ in range(2))
    a16, b16 = a.bfloat16(), b.bfloat16()
    flop = 2 * n ** 3
    out = {"n": n, "bf16_tflops": flop / timed(lambda: a16 @ b16.T) / 1e12}
    qa, qb, qt = quantize_tiles(a), quantize_blocks(b), quantize_tiles(b)
    for name, w, block in (("fp8_1x128_128x128", qb, BLOCK), ("fp8_1x128_1x128", qt, TILE)):
        real = _blockwise_cuda(qa[0], w[0], torch.bfloat16)
        y = _mm(qa, w, block, torch.bfloat16)
        ref = dequantize_tiles(*qa) @ dequantize(*w, block).T
        seconds = timed(lambda: _mm(qa, w, block, torch.bfloat16))
        out[name] = {"blockwise_kernel": real, "tflops": flop / seconds / 1e12,
                     "rel_error_vs_emulation": rel(y, ref), "rel_error_vs_fp32_product": rel(y, a @ b.T)}
    return out


# ---- 2. FP8Linear --------------------------------------------------------------------------------------------------
def fp8_linear_check(model: Transformer, tokens: int) -> dict:
    """Every FP8Linear shape of `model` at `tokens` rows (and a plain 2048 x 1024 x 1536), forward and backward on the
    real GEMMs against the emulation: relative error of y, dx, dW, and whether the blockwise kernel ran."""
    with torch.device("meta"):
        layers = convert_to_fp8(Transformer(model.cfg)).modules()
    shapes = {(2048, 1024, 1536)} | {(tokens, m.in_features, m.out_features)
                                     for m in layers if isinstance(m, FP8Linear)}
    out = {}
    for m, k, n in sorted(shapes):
        torch.manual_seed(0)
        x0, dy = torch.randn(m, k, device=DEVICE), torch.randn(m, n, device=DEVICE)
        w0 = torch.randn(n, k, device=DEVICE) / k ** 0.5
        got = {}
        for gemm in ("auto", "emulated"):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            y = fp8_linear(x, w, gemm)
            y.backward(dy)
            got[gemm] = (y.detach(), x.grad, w.grad)
        q = quantize_tiles(x0)[0]
        out[f"{m}x{k}x{n}"] = {"blockwise_kernel": _blockwise_cuda(q, quantize_blocks(w0)[0], torch.float32),
                               **{f"rel_error_{name}": rel(a, b) for name, a, b in
                                  zip(("y", "dx", "dW"), got["auto"], got["emulated"])}}
    return out


# ---- 3. decoding ----------------------------------------------------------------------------------------------------
def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def decode(base: Transformer, hf_dir: str, n: int, repeats: int = 3) -> dict:
    import transformers
    cfg = base.cfg
    model = copy.deepcopy(base).to(DEVICE, torch.bfloat16).eval()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(DEVICE).eval()
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    out = {}
    for batch in (1, 16):
        prompts = torch.randint(0, cfg.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(batch))
        eager = Engine(model, IdsOnly(), max_batch=batch, max_len=16 + n + 2)
        comp = Engine(model, IdsOnly(), max_batch=batch, max_len=16 + n + 2, compile=True)
        warm = comp.warmup([params])
        ids = prompts.to(DEVICE)

        def hf_generate():
            with torch.inference_mode():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0)
        runs = {"nanoseek": lambda: eager.generate(prompts.tolist(), params),
                "nanoseek compiled": lambda: comp.generate(prompts.tolist(), params), "transformers": hf_generate}
        tokens = {"nanoseek": [c.token_ids for c in runs["nanoseek"]()],
                  "nanoseek compiled": [c.token_ids for c in runs["nanoseek compiled"]()],
                  "transformers": hf_generate()[:, 16:].tolist()}
        secs = {name: timed(fn, repeats, warmup=1) for name, fn in runs.items()}
        out[f"batch_{batch}"] = {
            "tokens_per_s": {name: batch * n / s for name, s in secs.items()}, "compile_warmup_seconds": warm,
            "still_compiled": comp.compile,
            "tokens_equal_to_eager_before_first_difference": {
                name: sum(common_prefix(a, b) for a, b in zip(t, tokens["nanoseek"])) / (batch * n)
                for name, t in tokens.items() if name != "nanoseek"}}
        r = out[f"batch_{batch}"]
        r["compiled_over_transformers"] = r["tokens_per_s"]["nanoseek compiled"] / r["tokens_per_s"]["transformers"]
        r["compiled_over_eager"] = r["tokens_per_s"]["nanoseek compiled"] / r["tokens_per_s"]["nanoseek"]
        print(f"  decode batch {batch}: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in r["tokens_per_s"].items())
              + f"; compile warm-up {warm:.1f} s", flush=True)
    return out


def decode_check(n: int = 48) -> dict:
    """The compiled engine's CUDA graphs against its eager steps where rounding cannot excuse a difference: the
    `small` preset in fp32 (TF32 off), 4 requests of different lengths; greedy tokens must be equal."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("small")).to(DEVICE).eval()
    prompts = [torch.randint(0, model.cfg.vocab_size, (k,)).tolist() for k in (3, 9, 17, 30)]
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = {}
        for compile in (False, True):
            engine = Engine(model, IdsOnly(), max_batch=4, max_len=100, compile=compile)
            got[compile] = engine.generate(prompts, params)
        same = [a.token_ids == b.token_ids for a, b in zip(got[False], got[True])]
        logprob_gap = max(abs(x - y) for a, b in zip(got[False], got[True]) for x, y in zip(a.logprobs, b.logprobs))
        return {"same_greedy_tokens": same, "largest_logprob_difference": logprob_gap, "still_compiled": engine.compile}
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


# ---- 4. training ----------------------------------------------------------------------------------------------------
def training(base: Transformer, hf_dir: str, batch: int, seq: int, steps: int, peak: float, deadline: float,
             variants: tuple[str, ...]) -> dict:
    import transformers
    cfg = base.cfg
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    flops = flops_per_token(cfg, seq)["training"]
    # gradients compared: the first layer's attention (dense), and an MoE layer's (routed experts: a token whose
    # top-k changes with rounding moves its gradient to another expert)
    probes = ("layers.0.self_attn", "layers.1.mlp")

    def build(variant: str):
        if variant == "transformers":
            return transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(DEVICE)
        model = copy.deepcopy(base).to(DEVICE)
        if variant.startswith("nanoseek FP8"):
            convert_to_fp8(model, "emulated" if "emulated" in variant else "auto")
        if variant == "nanoseek FP8, experts bf16":  # where the FP8 step's time goes
            for module in model.modules():
                if isinstance(module, Experts):
                    module.grouped_linear = grouped_linear
        return model

    out = {}
    for variant in variants:
        if time.perf_counter() > deadline:
            out[variant] = "skipped: out of time"
            continue
        try:
            torch.cuda.reset_peak_memory_stats()
            model = build(variant).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
            forward = torch.compile(model) if variant == "nanoseek compiled" else model
            first = {}

            def step():
                with torch.autocast(DEVICE, dtype=torch.bfloat16):
                    loss = lm_loss(forward(ids).logits, ids)
                loss.backward()
                if not first:
                    first["loss"] = loss.item()
                    if variant.startswith("nanoseek") and variant != "nanoseek compiled":
                        first["grad"] = {probe: torch.cat([p.grad.flatten() for name, p in model.named_parameters()
                                                           if name.startswith(probe)]) for probe in probes}
                opt.step()
                opt.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            first_step = time.perf_counter() - t0
            s = timed(step, steps, warmup=1)
            out[variant] = {"seconds_per_step": s, "tokens_per_s": batch * seq / s,
                            "mfu": batch * seq / s * flops / peak,
                            "first_step_seconds": first_step, "first_loss": first["loss"],
                            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30, "_grad": first.get("grad")}
            print(f"  train {variant}: {batch * seq / s:,.0f} tok/s, MFU {out[variant]['mfu']:.1%}, first step "
                  f"{first_step:.1f} s, loss {first['loss']:.4f}", flush=True)
        except Exception as e:  # report it and go on with the next variant
            traceback.print_exc()
            out[variant] = f"failed: {type(e).__name__}: {str(e)[:500]}"
        model = opt = forward = None  # free the GPU memory before the next variant
        torch.cuda.empty_cache()
    grads = {k: v.pop("_grad") for k, v in out.items() if isinstance(v, dict)}
    pairs = (("nanoseek FP8", "nanoseek FP8 emulated"), ("nanoseek FP8", "nanoseek"),
             ("nanoseek FP8 emulated", "nanoseek"))
    for probe in probes if grads else ():
        out["grad_cosine_" + probe] = {f"{a} / {b}": float(F.cosine_similarity(grads[a][probe], grads[b][probe], dim=0))
                                       for a, b in pairs if grads.get(a) is not None and grads.get(b) is not None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--budget", type=float, default=480, help="seconds; a section starts only inside them")
    ap.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS)
    ap.add_argument("--out", help="write the figures as JSON here (after every section)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py: no CUDA device (torch.cuda.is_available() is False)")
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch._logging.set_logs(perf_hints=True)  # says why a step is not replayed as a CUDA graph, if it is not
    deadline = time.perf_counter() + args.budget
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda}
    print(f"{result['device']}, torch {result['torch']}, CUDA {result['cuda']}", flush=True)
    cfg = gpu_model_config()
    torch.manual_seed(0)
    base = Transformer(cfg)  # every model below starts from these weights
    hf_dir = tempfile.mkdtemp()
    base.save_pretrained(hf_dir)
    peak = matmul_peak(DEVICE, n=2048)
    result["bf16_matmul_peak_tflops"] = peak / 1e12
    train = functools.partial(training, base, hf_dir, args.batch, args.seq, args.steps, peak, deadline)
    sections = (("gemms", lambda: gemms(8192)), ("fp8_linear", lambda: fp8_linear_check(base, args.batch * args.seq)),
                ("train", lambda: train(("nanoseek", "nanoseek FP8", "nanoseek FP8 emulated",
                                         "nanoseek FP8, experts bf16", "transformers"))),
                ("decode_check", decode_check), ("decode", lambda: decode(base, hf_dir, args.new_tokens)),
                ("train_compiled", lambda: train(("nanoseek compiled",))))
    for name, run in sections:
        if name not in args.sections:
            continue
        if time.perf_counter() > deadline:
            result[name] = "skipped: out of time"
            continue
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result[name] = run()
        except Exception as e:  # one broken path should not hide the others' figures
            traceback.print_exc()
            result[name] = f"failed: {type(e).__name__}: {e}"
        print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2, default=str)
    print(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
