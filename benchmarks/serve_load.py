"""Serving under load: N concurrent streaming chat clients, each sending a few requests one after another, against
the OpenAI-compatible server running in this process on a random model. Prints requests/s, generated tokens/s,
latency and time to first token (p50 / p99), and how full the engine's batch was. The same requests (prompts, seeds,
settings, max batch) also go through the Engine offline, with no HTTP, in the same process: the ratio of the two
tokens/s is what the serving layer costs. Server and offline rounds alternate (`--repeats`, default 3) and the
median ratio is reported with its range: on a shared machine one round of either can be off by a third.

The clients run in a process of their own (as real clients would; on a small machine they still share its cores
with the server); `--same-process` runs them on the server's event loop thread's process instead, where they also
compete for its interpreter lock, a floor for separate clients.

    python benchmarks/serve_load.py [--preset small] [--clients 32] [--rounds 6] [--max-tokens 32]
                                    [--max-batch 16] [--speculative] [--no-compile] [--threads N]
                                    [--repeats 3] [--same-process] [--out runs/bench-serve.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.engine import Engine
from nanoseek.sampling import SamplingParams
from nanoseek.serve import create_app, running
from nanoseek.tokenizer import train_tokenizer

LINES = ["What is 12+30? <think> 2+0=2, 1+3=4 </think> <answer>42</answer>", "Sort: 3, 1, 2 -> 1, 2, 3",
         "Count the letters in 'banana'.", "hello world, how are you today?", "Compute 7*6 step by step."]


def request(i: int, r: int, args) -> tuple[str, int]:
    """Client i's r-th request: its user message and seed."""
    return LINES[(i + r) % len(LINES)], i * args.rounds + r


async def client(http: httpx.AsyncClient, url: str, i: int, args) -> list[dict]:
    """`args.rounds` streaming chat requests in a row -> one record each: latency, time to first token, tokens."""
    records = []
    for r in range(args.rounds):
        text, seed = request(i, r, args)
        body = {"model": "bench", "messages": [{"role": "user", "content": text}],
                "max_tokens": args.max_tokens, "temperature": 1.0, "seed": seed, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first, usage = None, None
        async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                records.append({"status": response.status_code})
                continue
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line.removeprefix("data: "))
                delta = chunk["choices"][0]["delta"] if chunk["choices"] else {}
                if first is None and (delta.get("content") or delta.get("reasoning_content")):
                    first = time.perf_counter() - t0
                usage = chunk.get("usage") or usage
        records.append({"status": 200, "latency": time.perf_counter() - t0, "ttft": first,
                        "tokens": usage["completion_tokens"]})
    return records


def load_in_process(url: str, args) -> tuple[list[dict], float]:
    """`load` in a fresh process (spawned: no copy of the server's threads)."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(run_load, (url, args))


def run_load(url: str, args) -> tuple[list[dict], float]:
    return asyncio.run(load(url, args))


async def load(url: str, args) -> tuple[list[dict], float]:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(limits=limits, timeout=600) as http:
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(client(http, url, i, args) for i in range(args.clients)))
        return [r for records in per_client for r in records], time.perf_counter() - t0


def offline(engine: Engine, tok, args) -> float:
    """Tokens/s of the same requests submitted to the engine directly."""
    prompts = [request(i, r, args) for i in range(args.clients) for r in range(args.rounds)]
    t0 = time.perf_counter()
    done = engine.generate([tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
                            for text, _ in prompts],
                           [SamplingParams(max_new_tokens=args.max_tokens, temperature=1.0, seed=seed, ignore_eos=True)
                            for _, seed in prompts])
    return sum(len(c.token_ids) for c in done) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=6, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens per reply (end of sentence ignored)")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--speculative", action="store_true")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="the compiled decode step "
                    "(the server's default), warmed up before the clients start")
    ap.add_argument("--threads", type=int, help="torch threads (default: as `nanoseek serve`, one core fewer than "
                    "torch's choice, left to the event loop)")
    ap.add_argument("--repeats", type=int, default=3, help="server and offline rounds, alternated")
    ap.add_argument("--same-process", action="store_true", help="the clients in the server's process")
    ap.add_argument("--out", help="write the figures as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads() - 1))

    tok = train_tokenizer(LINES * 20, 512, digits=1)
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset(args.preset, vocab_size=tok.vocab_size)).eval()
    app = create_app(model, tok, "bench", max_batch=args.max_batch, max_queue=max(64, args.clients),
                     speculative=args.speculative, max_len=256, compile=args.compile)
    batch_sizes, done = [], threading.Event()

    def sample_batch() -> None:  # how many sequences the engine decodes together, every 10 ms
        while not done.wait(0.01):
            batch_sizes.append(app.state.worker.stats()["running"])

    engine = Engine(model, tok, args.max_batch, 256, args.speculative, args.compile)
    engine.warmup()
    rounds, offline_rates = [], []
    with running(app) as url:
        sampler = threading.Thread(target=sample_batch, daemon=True)
        sampler.start()
        for _ in range(args.repeats):  # alternated, so that a slow spell of the machine hits both sides
            rounds.append(run_load(url, args) if args.same_process else load_in_process(url, args))
            offline_rates.append(offline(engine, tok, args))
        done.set()
        sampler.join()
    records = [r for records, _ in rounds for r in records]
    ok = [r for r in records if r["status"] == 200]
    rates = [sum(r["tokens"] for r in rs if r["status"] == 200) / wall for rs, wall in rounds]
    ratios = [a / b for a, b in zip(rates, offline_rates)]
    wall = sum(w for _, w in rounds)
    latency, ttft = np.array([r["latency"] for r in ok]), np.array([r["ttft"] for r in ok if r["ttft"] is not None])
    busy = [b for b in batch_sizes if b]
    result = {"preset": args.preset, "parameters": model.num_parameters(), "clients": args.clients,
              "rounds": args.rounds, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
              "speculative": args.speculative, "torch_threads": torch.get_num_threads(), "repeats": args.repeats,
              "requests": len(records), "failed": len(records) - len(ok), "wall_s": wall,
              "requests_per_s": len(ok) / wall, "tokens_per_s": float(np.median(rates)),
              "latency_s": {"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99))},
              "ttft_s": {"p50": float(np.percentile(ttft, 50)), "p99": float(np.percentile(ttft, 99))},
              "mean_batch_when_busy": float(np.mean(busy)) if busy else 0.0, "compile": args.compile,
              "clients_in_server_process": args.same_process, "server_tokens_per_s_by_round": rates,
              "offline_tokens_per_s_by_round": offline_rates, "offline_tokens_per_s": float(np.median(offline_rates)),
              "server_over_offline_by_round": ratios, "server_over_offline": float(np.median(ratios))}
    print(f"{args.preset} preset ({result['parameters']:,} parameters), {args.clients} streaming clients "
          f"({'in the server process' if args.same_process else 'in a process of their own'}) x "
          f"{args.rounds} requests of {args.max_tokens} tokens, max batch {args.max_batch}"
          f"{', MTP speculative' if args.speculative else ''}{', compiled' if args.compile else ', eager'}, "
          f"{result['torch_threads']} torch threads")
    print(f"  {result['requests']} requests ({result['failed']} failed) in {args.repeats} rounds, {wall:.1f} s: "
          f"{result['requests_per_s']:.2f} requests/s, {result['tokens_per_s']:.0f} tokens/s (median round)")
    print(f"  latency p50 {result['latency_s']['p50']:.2f} s, p99 {result['latency_s']['p99']:.2f} s; "
          f"time to first token p50 {result['ttft_s']['p50']:.2f} s, p99 {result['ttft_s']['p99']:.2f} s")
    print(f"  engine batch while busy: {result['mean_batch_when_busy']:.1f} sequences on average")
    print("  tokens/s by round, server / offline (Engine.generate, no HTTP): "
          + ", ".join(f"{a:.0f} / {b:.0f}" for a, b in zip(rates, offline_rates)))
    print(f"server / offline: {result['server_over_offline']:.2f} (median of {args.repeats} rounds, range "
          f"{min(ratios):.2f}-{max(ratios):.2f})")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
