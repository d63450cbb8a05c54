"""What reporting log-probs costs: the Engine's tokens/s with the model's log-probs of every generated token and 5
alternatives (what `logprobs` / `top_logprobs` ask of the server) against the same requests without, eager and with
the compiled decode step, at batch 1 and 16, interleaved, median of `--repeats`. The API's goal: within 10%.

    python benchmarks/logprobs.py [--preset small] [--new-tokens 64] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch
from model_throughput import timed_interleaved

from nanoseek import ModelConfig, Transformer
from nanoseek.engine import Engine, IdsOnly
from nanoseek.sampling import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(args.preset)).eval()
    plain = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    reported = replace(plain, logprobs=5)
    print(f"{args.preset} preset, {torch.get_num_threads()} threads, greedy, {args.new_tokens} new tokens, median of "
          f"{args.repeats}; tokens/s")
    print(f"{'':<22}{'plain':>10}{'logprobs=5':>12}{'ratio':>8}")
    for compile in (False, True):
        for batch in (1, 16):
            prompts = torch.randint(0, model.cfg.vocab_size, (batch, args.prompt_len)).tolist()
            engine = Engine(model, IdsOnly(), max_batch=batch, max_len=args.prompt_len + args.new_tokens + 2,
                            compile=compile)
            engine.warmup([plain])
            same = ([c.token_ids for c in engine.generate(prompts, plain)]
                    == [c.token_ids for c in engine.generate(prompts, reported)])
            seconds = timed_interleaved({"plain": lambda: engine.generate(prompts, plain),
                                         "logprobs": lambda: engine.generate(prompts, reported)}, args.repeats)
            rate = {k: batch * args.new_tokens / s for k, s in seconds.items()}
            print(f"{('compiled' if compile else 'eager') + f', batch {batch}':<22}{rate['plain']:>10.0f}"
                  f"{rate['logprobs']:>12.0f}{rate['logprobs'] / rate['plain']:>7.2f}x"
                  + ("" if same else "  (different tokens!)"))


if __name__ == "__main__":
    main()
