"""Decoding: the nanoseek Engine vs transformers' `generate` on the same model, MTP speculation, KV-cache bytes.

1. Greedy tokens/s of the Engine, eager and with its compiled decode step (`compile=True`), and of
   `DeepseekV3ForCausalLM.generate` (same weights through an HF directory, same prompts, exactly the same number of
   new tokens: min_new_tokens = max_new_tokens), at batch 1 and 16, the runs interleaved and the median taken;
   prefill included on both sides. The compiled engines' warm-up (compiling, before the timed runs) is reported.
   At batch 1 also llama.cpp (llama-cpp-python, when installed) on the same model exported by `nanoseek export
   --gguf` in f32, with as many threads: the CPU's best peer.
2. MTP speculation in the Engine (one draft per step, checked by the main model): acceptance rate and speed-up,
   on the random model (drafts nearly always wrong) and on the same architecture trained for a few dozen steps
   on a cyclic token sequence, where the MTP module has something to predict.
3. KV-cache bytes per token, measured on the tensors: the Engine's latent cache (c^KV and k^R per layer), the
   cache transformers keeps after `generate`, and the full per-head keys and values that attention reads
   (H x qk_head_dim + H x v_head_dim per layer), expanded from that cache by the model's own `expand_kv`
   (transformers 5 caches the compressed latents too, and expands them for every step).

    python benchmarks/decode.py [--preset small] [--new-tokens 64] [--repeats 5] [--train-steps 60] [--threads N]
                               [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F
from model_throughput import timed_interleaved

from nanoseek import ModelConfig, Transformer
from nanoseek.cost import kv_cache_bytes_per_token
from nanoseek.engine import Engine, IdsOnly
from nanoseek.sampling import SamplingParams

BATCHES = (1, 16)


def engines(model: Transformer, batch: int, max_len: int) -> dict[str, Engine]:
    """Plain and (with an MTP module) speculative engines, eager and compiled."""
    runs = {}
    for speculative in (False, True) if model.mtp else (False,):
        for compile in (False, True):
            name = "nanoseek" + (" compiled" if compile else "") + ("+MTP" if speculative else "")
            runs[name] = Engine(model, IdsOnly(), max_batch=batch, max_len=max_len, speculative=speculative,
                                compile=compile)
    return runs


def llama_cpp(model: Transformer, directory: str):
    """llama.cpp's `Llama` on the model's f32 GGUF export, or None when llama-cpp-python is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from nanoseek.export import export_gguf
    from nanoseek.tokenizer import train_tokenizer
    model.save_pretrained(directory)
    train_tokenizer(["any text to hold the token table"], 300).save(directory)  # ids past it export as unused
    export_gguf(directory, f"{directory}/model.gguf")
    return Llama(f"{directory}/model.gguf", n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)


def compare(model: Transformer, prompts: torch.Tensor, n: int, repeats: int, hf=None, llm=None) -> dict:
    """Median tokens/s of each engine (and of transformers and llama.cpp when given) on `prompts` (B, P), n new
    tokens each; the MTP acceptance rate; whether the speculative and the peers' tokens equal plain greedy's."""
    batch = prompts.shape[0]
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    runs = engines(model, batch, prompts.shape[1] + n + 2)
    warmup = {name: e.warmup([params]) for name, e in runs.items() if e.compile}
    tokens = {name: [c.token_ids for c in e.generate(prompts.tolist(), params)] for name, e in runs.items()}
    calls = {name: (lambda e=e: e.generate(prompts.tolist(), params)) for name, e in runs.items()}
    if hf is not None:
        def hf_generate():
            with torch.inference_mode():
                return hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                                   min_new_tokens=n, do_sample=False, pad_token_id=0)
        tokens["transformers"] = hf_generate()[:, prompts.shape[1]:].tolist()
        calls["transformers"] = hf_generate
    if llm is not None and batch == 1:
        def llama_generate():
            out = []
            for t in llm.generate(prompts[0].tolist(), temp=0.0, top_k=1, reset=True):
                out.append(t)
                if len(out) == n:
                    return [out]
        tokens["llama.cpp"] = llama_generate()
        calls["llama.cpp"] = llama_generate
    seconds = timed_interleaved(calls, repeats)
    result = {"tokens_per_s": {name: batch * n / s for name, s in seconds.items()}, "warmup_seconds": warmup,
              "same_tokens_as_nanoseek": {name: t == tokens["nanoseek"] for name, t in tokens.items()
                                          if name != "nanoseek"}}
    t = result["tokens_per_s"]
    result["compiled_speedup"] = t["nanoseek compiled"] / t["nanoseek"]
    if "nanoseek+MTP" in runs:
        result["mtp_acceptance"] = runs["nanoseek compiled+MTP"].acceptance_rate
        result["mtp_speedup"] = t["nanoseek compiled+MTP"] / t["nanoseek compiled"]
        result["mtp_speedup_eager"] = t["nanoseek+MTP"] / t["nanoseek"]
        # a speculative step yields 1 + acceptance tokens a row: its seconds in plain steps (compiled both)
        result["mtp_step_cost"] = (1 + result["mtp_acceptance"]) / result["mtp_speedup"]
    if hf is not None:
        result["speedup_vs_transformers"] = t["nanoseek compiled"] / t["transformers"]
        result["eager_speedup_vs_transformers"] = t["nanoseek"] / t["transformers"]
    if "llama.cpp" in t:
        result["compiled_over_llama_cpp"] = t["nanoseek compiled"] / t["llama.cpp"]
    return result


def train_cyclic(cfg: ModelConfig, steps: int, cycle: int = 48, seq: int = 96,
                 batch: int = 8) -> tuple[Transformer, float]:
    """The architecture trained on one cyclic token sequence (next-token + MTP loss), so drafts can be right."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.arange(10, 10 + cycle)
    for _ in range(steps):
        starts = torch.randint(0, cycle, (batch,)).tolist()
        x = torch.stack([tokens.roll(-s).repeat(seq // cycle + 1)[:seq] for s in starts])
        out = model(x, return_mtp=True)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()) + \
            F.cross_entropy(out.mtp_logits[0][:, :-1].flatten(0, 1), x[:, 2:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), loss.item()


def kv_bytes(model: Transformer, hf, prompts: torch.Tensor, n: int) -> dict:
    """Bytes per cached token, from the tensors each side holds after generating n tokens for `prompts`."""
    engine = Engine(model, IdsOnly(), max_batch=prompts.shape[0], max_len=prompts.shape[1] + n + 1)
    main_layers = engine.cache[:len(model.layers)]
    latent = sum(c.kv.nbytes + c.pe.nbytes for c in main_layers) / (engine.max_batch * engine.max_len)
    with torch.inference_mode():
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        layers = out.past_key_values.layers
        cached = layers[0].keys.shape[0] * layers[0].keys.shape[-2]  # batch x tokens
        hf_cache = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers) / cached
        full = sum(k.nbytes + v.nbytes for k, v in (block.self_attn.expand_kv(layer.keys, layer.values)
                                                    for block, layer in zip(hf.model.layers, layers))) / cached
    dtype_bytes = main_layers[0].kv.element_size()
    computed = kv_cache_bytes_per_token(model.cfg, dtype_bytes)
    return {"dtype_bytes": dtype_bytes, "nanoseek_latent": latent, "transformers_cache": hf_cache,
            "full_kv": full, "full_over_latent": full / latent,
            "computed": {"latent": computed["mla_bytes"], "full_kv": computed["mha_bytes"]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (after one warm-up); the median is kept")
    ap.add_argument("--train-steps", type=int, default=60, help="steps on the cyclic sequence for the MTP test")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's; 1 where other jobs share the cores)")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    transformers.logging.set_verbosity_error()  # it ignores our MTP layer by design; no load report
    transformers.logging.disable_progress_bar()

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    ours = Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        hf = transformers.DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        llm = llama_cpp(ours, d)
    n = args.new_tokens
    prompts = {b: torch.randint(0, cfg.vocab_size, (b, args.prompt_len)) for b in BATCHES}
    result = {"preset": args.preset, "threads": torch.get_num_threads(), "prompt_len": args.prompt_len,
              "new_tokens": n, "repeats": args.repeats,
              "random": {f"batch_{b}": compare(ours, prompts[b], n, args.repeats, hf, llm) for b in BATCHES}}

    t0 = time.perf_counter()
    cyclic, loss = train_cyclic(cfg, args.train_steps)
    trained = {"train_steps": args.train_steps, "train_seconds": time.perf_counter() - t0, "final_loss": loss}
    cycle_prompts = {b: 10 + (torch.randint(0, 48, (b, 1)) + torch.arange(args.prompt_len)) % 48 for b in BATCHES}
    trained.update({f"batch_{b}": compare(cyclic, cycle_prompts[b], n, args.repeats) for b in BATCHES})
    result["cyclic"] = trained
    result["kv_cache_bytes_per_token"] = kv_bytes(ours, hf, prompts[16], n)

    print(f"{args.preset} preset, {result['threads']} threads, prompts of {args.prompt_len} tokens, {n} new tokens, "
          f"greedy, median of {args.repeats}; tokens/s")
    print(f"{'':<26}{'eager':>8}{'compiled':>10}{'+MTP':>8}{'compiled+MTP':>14}{'transformers':>14}"
          f"{'compiled/tf':>13}{'MTP accept':>12}{'MTP speed-up':>14}")
    for model_kind, results in (("random model", result["random"]), ("cyclic-trained", trained)):
        for b in BATCHES:
            r = results[f"batch_{b}"]
            t = r["tokens_per_s"]
            tf = (f"{t['transformers']:>14.0f}{r['speedup_vs_transformers']:>12.2f}x" if "transformers" in t
                  else " " * 27)
            print(f"{f'{model_kind}, batch {b}':<26}{t['nanoseek']:>8.0f}{t['nanoseek compiled']:>10.0f}"
                  f"{t['nanoseek+MTP']:>8.0f}{t['nanoseek compiled+MTP']:>14.0f}{tf}{r['mtp_acceptance']:>12.1%}"
                  f"{r['mtp_speedup']:>13.2f}x")
    warm = {f"batch {b}": sum(result["random"][f"batch_{b}"]["warmup_seconds"].values()) for b in BATCHES}
    print("compile warm-up before the timed runs (s, first compile of each graph in this process): "
          + ", ".join(f"{k}: {v:.1f}" for k, v in warm.items()))
    print("ratios above: compiled engine / transformers; MTP speed-up: compiled+MTP / compiled")
    print("a compiled speculative step (draft, then the two-token check) costs "
          + ", ".join(f"{trained[f'batch_{b}']['mtp_step_cost']:.2f}" for b in BATCHES)
          + f" plain steps at batch {', '.join(map(str, BATCHES))} (cyclic model): MTP pays where 1 + acceptance "
          "exceeds it")
    r1 = result["random"]["batch_1"]
    if "llama.cpp" in r1["tokens_per_s"]:
        print(f"llama.cpp (f32 GGUF export, {result['threads']} threads), random model, batch 1: "
              f"{r1['tokens_per_s']['llama.cpp']:.0f} tok/s; compiled engine / llama.cpp "
              f"{r1['compiled_over_llama_cpp']:.2f}x")
    else:
        print("llama.cpp: not run (pip install llama-cpp-python to add it)")
    same = {f"{m} b{b} {k}": v for m in ("random", "cyclic") for b in BATCHES
            for k, v in result[m][f"batch_{b}"]["same_tokens_as_nanoseek"].items()}
    print("same greedy tokens as the plain Engine: " + ", ".join(f"{k}: {v}" for k, v in same.items()))
    print(f"cyclic training: {args.train_steps} steps in {trained['train_seconds']:.1f} s, final loss {loss:.3f}")
    kv = result["kv_cache_bytes_per_token"]
    print(f"KV cache per token ({kv['dtype_bytes']}-byte values, measured): nanoseek latent "
          f"{kv['nanoseek_latent']:,.0f} B, transformers' cache {kv['transformers_cache']:,.0f} B, full per-head K+V "
          f"{kv['full_kv']:,.0f} B ({kv['full_over_latent']:.1f}x latent); computed "
          f"{kv['computed']['latent']:,} / {kv['computed']['full_kv']:,} B")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
