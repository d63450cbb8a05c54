"""`nanoseek <command>`: the command line. User mistakes print one `error:` line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import PRESETS, ModelConfig
from .errors import NanoseekError, TrainError
from .rundir import write_json


def _load_config(args) -> tuple[ModelConfig, str]:
    if args.model:
        return ModelConfig.load(args.model), str(args.model)
    return ModelConfig.from_preset(args.preset), f"preset {args.preset}"


def cmd_info(args) -> None:
    from .cost import format_count, model_info
    cfg, source = _load_config(args)
    info = model_info(cfg, args.seq_len)
    if args.json:
        print(json.dumps({"source": source, **info}, indent=2))
        return
    p, kv, fl = info["params"], info["kv_cache_per_token"], info["flops_per_token"]
    rows = [
        ("total parameters (main model, no MTP)", f"{p['total']:,}", format_count(p["total"])),
        ("activated per token (embedding and head included, see below)", f"{p['activated']:,}",
         format_count(p["activated"])),
        ("activated per token without the embedding", f"{p['activated_without_embedding']:,}",
         format_count(p["activated_without_embedding"])),
        ("MTP modules (unique; embedding and head shared)", f"{p['mtp_total']:,}", format_count(p["mtp_total"])),
        ("KV cache per token, MLA (BF16)", f"{kv['mla_bytes']:,} B", f"{kv['mla_values']:,} values"),
        ("KV cache per token, equivalent MHA (BF16)", f"{kv['mha_bytes']:,} B",
         f"{kv['mha_bytes'] / kv['mla_bytes']:.1f}x MLA"),
        (f"forward FLOPs per token (seq {fl['seq_len']}): 2 x matmul weights + attention",
         f"{fl['forward']:.4g}", f"{format_count(fl['forward_matmul'])} + {format_count(fl['forward_attention'])}"),
        ("training FLOPs per token (3 x forward), main model", f"{fl['training']:.4g}", format_count(fl["training"])),
        ("training FLOPs per token, MTP modules", f"{fl['mtp_training']:.4g}", format_count(fl["mtp_training"])),
    ]
    print(f"nanoseek info: {source}")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>17}  {note}")
    print(f"  activated = embedding + head + attention + dense MLPs + {cfg.n_shared_experts} shared and "
          f"{cfg.num_experts_per_tok} routed experts + gates in every MoE layer")


def cmd_pipeline(args) -> None:
    """The end-to-end demo (`nanoseek demo`) and other multi-stage recipes (`nanoseek pipeline --recipe r1`)."""
    import shutil

    from .gains import summary
    from .pipeline import Pipeline, PipelineConfig
    from .rundir import PIPELINE_STATE
    recipe = args.recipe or ("demo-gpu" if args.device == "cuda" else "demo")
    out = Path(args.out or f"runs/{Path(recipe).stem}")
    cfg = PipelineConfig.load(recipe, device=args.device, seed=args.seed)
    if args.fresh and (out / PIPELINE_STATE).exists():
        shutil.rmtree(out)
    print(f"nanoseek {args.command}: {recipe} -> {out}" + (f"\n  {cfg.description.strip()}" if cfg.description else ""))
    result = Pipeline(cfg, out).run()
    print(f"\nfinished in {result['seconds'] / 60:.1f} min.")
    print("\n".join(summary(out)))
    print(f"  model:  {result['model']}\n  report: {result['report']}")
    print(f"  chat:   nanoseek chat --model {result['model']}")
    print(f"  serve:  nanoseek serve --model {result['model']}   (OpenAI-compatible API at http://127.0.0.1:8000/v1)")


def cmd_tasks_list(args) -> None:
    from .tasks import families, get_family
    from .tasks.reasoning_gym import PREFIX, dataset_names
    rows = [(f.name, f"1-{f.max_difficulty}", f.description) for f in map(get_family, families())]
    width = max(len(r[0]) for r in rows)
    print("task families (levels, what they are):")
    for name, levels, description in rows:
        print(f"  {name:<{width}}  {levels:>4}  {description}")
    rg = dataset_names()
    if not rg:
        print("reasoning-gym datasets (rg:<name>): install the extra, pip install 'nanoseek[tasks]'")
        return
    print(f"reasoning-gym datasets ({len(rg)}; RL and evaluation only, no worked solutions):")
    for name in rg:
        print(f"  {PREFIX}{name}  1-{get_family(PREFIX + name).max_difficulty}")


def cmd_tasks_sample(args) -> None:
    import random
    from .tasks import get_family
    family, rng = get_family(args.name), random.Random(args.seed)
    for i in range(args.n):
        p = family.generate(rng, args.difficulty)
        print(f"== {family.name}, difficulty {args.difficulty}, #{i + 1}")
        print(p.prompt)
        print(p.solution if p.has_solution else f"(no worked solution) answer: {p.answer}")


def cmd_data_build(args) -> None:
    from .data import build_corpus, cut_steps, held_out_path, write_jsonl
    from .errors import TaskError
    from .tasks import Mixture
    mixture = Mixture.from_recipe(args.recipe)
    if not 0 <= args.worked_fraction <= 1:
        raise TaskError(f"--worked-fraction must be in [0, 1], got {args.worked_fraction}")
    if args.held_out_n is not None:
        held_out = args.held_out_n
    elif 0 <= args.held_out_fraction <= 1:
        held_out = round(args.n * args.held_out_fraction)
    else:
        raise TaskError(f"--held-out-fraction must be in [0, 1], got {args.held_out_fraction}")
    corpus = build_corpus(mixture, args.n, held_out, seed=args.seed)
    corpus.train = cut_steps(corpus.train, args.worked_fraction, seed=args.seed)
    train_path, held_path = write_jsonl(args.out, corpus.train), write_jsonl(held_out_path(args.out), corpus.held_out)
    print(f"nanoseek data build: {mixture.source}, seed {args.seed}")
    for name, counts in sorted(corpus.per_family.items()):
        print(f"  {name:<24} train {counts['train']:>7,}  held-out {counts['held_out']:>6,}")
    total = len(corpus.train) + len(corpus.held_out) + corpus.no_solution
    if total < args.n:
        print(f"  only {total:,} distinct problems of the {args.n:,} asked for: the mixture ran out")
    if corpus.no_solution:
        print(f"  {corpus.no_solution:,} problems without worked solutions left out of train")
    print(f"  train: {len(corpus.train):,} problems -> {train_path}")
    print(f"  held-out: {len(corpus.held_out):,} problems -> {held_path}")


def cmd_tokenizer_train(args) -> None:
    """Byte-level BPE on data files: .txt (one document each), .jsonl rows (prompt + solution, or text), .parquet."""
    from .cost import format_count
    from .tokenizer import RESERVED, train_tokenizer
    from .train.lm_data import tokenizer_texts
    seen = {"documents": 0, "characters": 0}

    def texts():
        for text in tokenizer_texts([Path(p) for p in args.data]):
            seen["documents"] += 1
            seen["characters"] += len(text)
            yield text

    t0 = time.perf_counter()
    tok = train_tokenizer(texts(), args.vocab_size, show_progress=True, digits=args.digits)
    tok.save(args.out)
    print(f"nanoseek tokenizer train: {len(args.data)} files, {seen['documents']:,} documents, "
          f"{format_count(seen['characters'])} characters in {time.perf_counter() - t0:.1f} s")
    print(f"  vocabulary: {tok.vocab_size:,} tokens, ids 0-{len(RESERVED) - 1} reserved ({', '.join(RESERVED)})")
    if tok.vocab_size < args.vocab_size:
        print(f"  the corpus supports only {tok.vocab_size:,} of the {args.vocab_size:,} tokens asked for")
    print(f"  tokenizer: {args.out} (tokenizer.json, tokenizer_config.json)")


def cmd_train(args) -> None:
    """pretrain / sft: a recipe, then `--key value` overrides of its settings (see nanoseek/train/recipe.py)."""
    from .train import run as run_stage
    from .train.recipe import load_config, parse_overrides
    cfg = load_config(args.recipe, parse_overrides(args.overrides), stage=args.command,
                      out=f"runs/{args.command}")
    if cfg.stage != args.command:
        raise TrainError(f"recipe {args.recipe}: stage '{cfg.stage}' does not match `nanoseek {args.command}`")
    summary = run_stage(cfg)
    print(f"nanoseek {args.command}: {summary['steps']} steps, final loss {summary['final_loss']}")
    print(f"  model: {summary['model']}\n  metrics: {summary['metrics']}")
    if summary.get("held_out_before"):
        print(f"  held-out greedy accuracy before: {summary['held_out_before']['accuracy']:.1%}")
    if "held_out" in summary:
        h = summary["held_out"]
        print(f"  held-out greedy accuracy: {h['accuracy']:.1%} of {h['n']} ({h['answer_rate']:.0%} gave an <answer>)")
        for task, r in h["by_task"].items():
            print(f"    {task:<24} {r['accuracy']:6.1%} of {r['n']}")


def _load_model(path: Path):
    """A model directory and its tokenizer: on the GPU in bf16 when there is one, else on the CPU in fp32."""
    import torch
    from .model import Transformer
    from .tokenizer import Tokenizer
    cuda = torch.cuda.is_available()
    model = Transformer.from_pretrained(path, device="cuda" if cuda else "cpu",
                                        dtype=torch.bfloat16 if cuda else torch.float32)
    return model, Tokenizer.load(path)


def _levels(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a level (2) or a range (1-3), got {text!r}") from None


def cmd_eval(args) -> None:
    """K samples per problem, scored by the task verifiers: pass@1, pass@k, maj@k, format rate, length."""
    from .evaluate import evaluate, format_table, load_problems, task_problems
    from .sampling import SamplingParams
    if args.data:
        problems = load_problems(args.data)[:args.n]
    else:
        problems = task_problems(args.tasks, args.n or 100, seed=args.seed, difficulty=args.difficulty)
    model, tok = _load_model(args.model)
    temperature = args.temperature if args.temperature is not None else 0.6 if args.samples > 1 else 0.0
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=temperature, top_p=args.top_p)
    report = evaluate(model, tok, problems, args.samples, params, seed=args.seed, speculative=args.speculative,
                      batch_size=args.batch, compile=args.compile)
    report = {"model": str(args.model), "problems": str(args.data or args.tasks), **report}
    print(f"nanoseek eval: {args.model} on {len(problems)} problems ({report['problems']}), {args.samples} "
          f"sample(s) each, temperature {temperature}")
    print(format_table(report))
    if args.speculative:
        print(f"MTP speculative decoding: {report['acceptance_rate']:.1%} of drafts accepted")
    if args.compile:
        print(f"compiling the decode step took {report['compile_seconds']:.1f} s of the run")
    if args.out:
        print(f"report: {write_json(args.out, report)}")


def cmd_chat(args) -> None:
    from .chat import chat
    from .engine import Engine
    from .sampling import SamplingParams
    model, tok = _load_model(args.model)
    engine = Engine(model, tok, max_batch=1, speculative=args.speculative, compile=args.compile)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    if args.compile:
        print("compiling the decode step (--no-compile skips it) ...", end=" ", flush=True)
        print(f"{engine.warmup([params]):.1f} s")
    print(f"nanoseek chat: {args.model}. /exit or Ctrl-D ends, /reset starts afresh, Ctrl-C stops an answer.")
    chat(engine, params, system=args.system)


def cmd_generate(args) -> None:
    from .chat import generate, read_prompts
    from .sampling import SamplingParams
    prompts = args.prompt or read_prompts(args.file)
    model, tok = _load_model(args.model)
    params = SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    records = generate(model, tok, prompts, params, chat_format=args.chat, speculative=args.speculative,
                       batch_size=args.batch, compile=args.compile)
    for r in records:
        if args.json:
            print(json.dumps(r, ensure_ascii=False))
        else:
            print(f"== {r['prompt']}\n{r['completion']}\n[{r['tokens']} tokens, {r['finish_reason']}]")


def cmd_serve(args) -> None:
    """The OpenAI-compatible server (nanoseek/serve/) for one model directory, until Ctrl-C."""
    import uvicorn

    from .serve import create_app
    import torch
    torch.set_num_threads(args.threads or max(1, torch.get_num_threads() - 1))
    model, tok = _load_model(args.model)
    name = args.model.resolve().name
    app = create_app(model, tok, name, api_key=args.api_key, max_batch=args.max_batch, max_queue=args.max_queue,
                     speculative=args.speculative, max_len=args.max_len, compile=args.compile)
    print(f"nanoseek serve: {args.model} as model {name!r} at http://{args.host}:{args.port} "
          f"(chat page /, API /v1, schema /docs)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


def cmd_export(args) -> None:
    """A model directory as a GGUF file for llama.cpp, Ollama and LM Studio."""
    from .export import export_gguf
    t0 = time.perf_counter()
    out = export_gguf(args.model_dir, args.gguf, args.outtype)
    types = ", ".join(f"{n} {q}" for q, n in sorted(out["types"].items()))
    print(f"wrote {args.gguf}: {out['tensors']} tensors ({types}), {out['bytes'] / 2**20:,.1f} MiB, "
          f"in {time.perf_counter() - t0:.1f} s")
    print(f"run it: llama-cli -m {args.gguf}  (or llama_cpp.Llama(model_path=...) in Python)")


def cmd_report(args) -> None:
    """The report card of a run directory (nanoseek/report.py): report.md and PNG plots, from the run's own files."""
    from .report import write_report
    path = write_report(args.run_dir, mfu=args.mfu)
    plots = sorted((path.parent / "plots").glob("*.png"))
    print(f"nanoseek report: {path}")
    if plots:
        print(f"  plots: {', '.join(p.name for p in plots)} in {path.parent / 'plots'}")


def cmd_cost(args) -> None:
    """Training FLOPs, GPU-hours, MFU and dollars of a model, and its serving memory; or the measured cost of a run."""
    from .cost import (format_count, format_run_cost, format_serving_memory, format_training_cost, run_cost,
                       serving_memory, training_cost)
    from .errors import ConfigError
    if args.run:
        if any(v is not None for v in (args.tokens, args.tokens_per_s, args.gpu_hours)):
            raise ConfigError("--run measures its own tokens and time; of the rate options only --mfu applies")
        d = run_cost(args.run, 0.4 if args.mfu is None else args.mfu)
        print(json.dumps(d, indent=2) if args.json else f"nanoseek cost: {args.run}\n\n{format_run_cost(d)}")
        return
    if args.tokens is None:
        raise ConfigError("--tokens: give the training tokens (e.g. 14.8e12 or 14.8T)")
    cfg, source = _load_config(args)
    rate = {"mfu": args.mfu, "tokens_per_s": args.tokens_per_s, "gpu_hours": args.gpu_hours}
    if all(v is None for v in rate.values()):
        rate["mfu"] = 0.4
    t = training_cost(cfg, args.tokens, args.gpu, args.seq_len, **rate, price=args.price, n_gpus=args.gpus or 1,
                      precision=args.precision, mtp=not args.no_mtp)
    s = serving_memory(cfg, args.context or args.seq_len, args.batch, args.gpu)
    if args.json:
        print(json.dumps({"source": source, "training": t, "serving": s}, indent=2))
        return
    print(f"nanoseek cost: {source}, {format_count(args.tokens)} tokens at context {args.seq_len:,}, "
          f"{t['gpu']['name']}")
    print(format_training_cost(t, wall=bool(args.gpus)))
    print(format_serving_memory(s))


def cmd_claims(args) -> None:
    """The public claims about DeepSeek-V3/R1 with sources, first-principles checks, verdicts and our measurements."""
    from .claims import claims, claims_json, format_claims, measurements
    items = claims(measurements(args.run) if args.run else None)
    if args.json:
        print(json.dumps(claims_json(items), indent=2))
        return
    if not args.markdown:
        print("nanoseek claims: the public figures about DeepSeek-V3/R1, checked from first principles\n")
    print(format_claims(items, markdown=args.markdown))


def _model_source(p: argparse.ArgumentParser):
    """The required --preset | --model choice of a model to count; returns the group for more choices."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help=f"one of {', '.join(PRESETS)}")
    source.add_argument("--model", type=Path, help="a Hugging Face DeepseekV3 directory")
    return source


def _add_info(sub) -> None:
    info = sub.add_parser("info", help="parameters, activated parameters, KV cache and FLOPs of a model")
    _model_source(info)
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--seq-len", type=int, default=4096, help="context length for the attention FLOPs")
    info.set_defaults(func=cmd_info)


def _add_cost(sub) -> None:
    from .cost import quantity
    from .gpus import GPUS
    cost = sub.add_parser("cost", help="training FLOPs, GPU-hours, MFU and dollars; serving memory; a run's cost")
    source = _model_source(cost)
    source.add_argument("--run", type=Path, help="a run directory (one stage, or a pipeline of stages): measured "
                        "tokens/s, FLOP/s and MFU, and what the run costs on each GPU type at --mfu")
    cost.add_argument("--tokens", type=quantity, help="training tokens: 14.8e12 or 14.8T")
    cost.add_argument("--seq-len", type=int, default=4096, help="training context, for the attention FLOPs")
    cost.add_argument("--gpu", default="h800", help=f"one of {', '.join(GPUS)}")
    rate = cost.add_mutually_exclusive_group()
    rate.add_argument("--mfu", type=float, help="model FLOPs utilisation, a fraction of the dense peak (default 0.4)")
    rate.add_argument("--tokens-per-s", type=quantity, help="measured training tokens/s of the --gpus together")
    rate.add_argument("--gpu-hours", type=quantity, help="claimed GPU-hours (2.664e6, 2.664M): the MFU they imply")
    cost.add_argument("--gpus", type=int, help="GPUs training together: the wall-clock time, and the throughput's GPUs")
    cost.add_argument("--price", type=float, help="$ per GPU-hour of --gpu (default: nanoseek/gpus.py's)")
    cost.add_argument("--precision", choices=["bf16", "fp8"], default="bf16", help="the dense peak MFU is taken of")
    cost.add_argument("--no-mtp", action="store_true", help="leave the MTP modules' FLOPs out")
    cost.add_argument("--context", type=int, help="serving: tokens per sequence in the KV cache (default --seq-len)")
    cost.add_argument("--batch", type=int, default=1, help="serving: sequences in the KV cache")
    cost.add_argument("--json", action="store_true", help="print JSON")
    cost.set_defaults(func=cmd_cost)


def _add_claims(sub) -> None:
    claims = sub.add_parser("claims", help="the public claims about DeepSeek-V3/R1: sources, checks, verdicts")
    claims.add_argument("--run", type=Path, nargs="+", help="run directories, metrics.jsonl or JSON reports (nanoseek "
                        "eval --speculative --out, benchmarks/decode.py, benchmarks/fp8_vs_fp32.py) to measure from")
    claims.add_argument("--markdown", action="store_true", help="print a markdown table")
    claims.add_argument("--json", action="store_true", help="print JSON")
    claims.set_defaults(func=cmd_claims)


def _add_pipelines(sub) -> None:
    """`demo` and `pipeline`: the same options, a recipe required only by `pipeline`."""
    for name, text in (("demo", "the main job: data -> tokenizer -> pretrain -> GRPO (against an equal-time "
                                "control) -> distil (against the student's own GRPO), evaluated, exported, reported "
                                "(about 9 min on 2 CPU cores)"),
                       ("pipeline", "a multi-stage recipe: r1-zero, r1, demo, or your own")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--recipe", required=name == "pipeline",
                       help="a pipeline recipe (file, or name in recipes/); demo: demo, or demo-gpu with --device cuda")
        p.add_argument("--out", help="the run directory (default runs/<recipe>); rerun to resume an interrupted run")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        p.add_argument("--seed", type=int, help="overrides the recipe's seed")
        p.add_argument("--fresh", action="store_true", help="delete the run directory's earlier run and start over")
        p.set_defaults(func=cmd_pipeline)


def _add_tasks(sub) -> None:
    tasks = sub.add_parser("tasks", help="generated, machine-verifiable task families").add_subparsers(
        dest="tasks_command", required=True)
    tasks.add_parser("list", help="the task families and their difficulty levels").set_defaults(func=cmd_tasks_list)
    sample = tasks.add_parser("sample", help="print problems of one family with their worked solutions")
    sample.add_argument("name", help="a family from `nanoseek tasks list`, or rg:<reasoning-gym dataset>")
    sample.add_argument("--difficulty", type=int, default=1)
    sample.add_argument("--n", type=int, default=3, help="how many problems")
    sample.add_argument("--seed", type=int, default=0)
    sample.set_defaults(func=cmd_tasks_sample)


def _add_data(sub) -> None:
    data = sub.add_parser("data", help="corpora").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="a JSONL corpus of problems from a task recipe, with a held-out split")
    build.add_argument("--recipe", required=True, help="a recipe file, or the name of one in recipes/")
    build.add_argument("--out", required=True, help="the train JSONL; held-out goes beside it as <name>-held-out.jsonl")
    build.add_argument("--n", type=int, default=10_000, help="distinct problems in all (train + held-out)")
    split = build.add_mutually_exclusive_group()
    split.add_argument("--held-out-fraction", type=float, default=0.05)
    split.add_argument("--held-out-n", type=int, help="an exact number of held-out problems")
    build.add_argument("--worked-fraction", type=float, default=1.0,
                       help="the share of training problems that keep their worked steps (the rest: the answer only)")
    build.add_argument("--seed", type=int, default=0)
    build.set_defaults(func=cmd_data_build)


def _add_tokenizer(sub) -> None:
    tokenizer = sub.add_parser("tokenizer", help="byte-level BPE tokenizers").add_subparsers(
        dest="tokenizer_command", required=True)
    tok_train = tokenizer.add_parser("train", help="train a byte-level BPE with DeepSeek's special tokens")
    tok_train.add_argument("--data", type=Path, nargs="+", required=True,
                           help=".txt (one document each), .jsonl (prompt + solution, or text) or .parquet files")
    tok_train.add_argument("--vocab-size", type=int, default=2048,
                           help="ids in all, reserved tokens and bytes included")
    tok_train.add_argument("--digits", type=int, default=3,
                           help="split numbers into runs of at most this many digits (DeepSeek-V3: 3)")
    tok_train.add_argument("--out", type=Path, required=True,
                           help="directory for tokenizer.json + tokenizer_config.json (other files in it stay)")
    tok_train.set_defaults(func=cmd_tokenizer_train)


def _add_training(sub) -> None:
    """One command per training stage: a recipe, then any of its settings as --key value."""
    for stage, what in (("pretrain", "pretrain a V3 model (MoE, MLA, MTP; FP8 optional) on text or task data"),
                        ("extend", "extend a model's context with YaRN (V3 section 4.3): --extend.factor 4 "
                         "--extend.original-length L, then training at the longer --seq-len"),
                        ("sft", "supervised fine-tuning on prompt/solution pairs, loss on the reply only"),
                        ("grpo", "GRPO / Dr. GRPO / DAPO with rewards from the task verifiers (R1-Zero from a base)"),
                        ("distill", "a teacher's verified-correct traces (rejection sampling) -> SFT of a student")):
        train = sub.add_parser(stage, help=what, description=f"{what}. Any setting of the recipe can be "
                               "overridden with --key value (e.g. --max-steps 100 --lr 1e-3).")
        train.add_argument("--recipe", help="a recipe file, or the name of one in recipes/ (e.g. cpu-demo)")
        train.set_defaults(func=cmd_train, overrides=[])  # the --key value pairs argparse does not know


def _model_args(p: argparse.ArgumentParser, temperature: float | None, max_tokens: int, compile: bool) -> None:
    """The options every command that samples from a model shares, with that command's defaults."""
    p.add_argument("--model", type=Path, required=True, help="a model directory (with its tokenizer)")
    p.add_argument("--temperature", type=float, default=temperature, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling when the temperature is > 0")
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="new tokens per completion at most")
    p.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=compile,
                   help="torch.compile the decode step: 2-3x the tokens/s at batch 1, after a warm-up of "
                   "seconds to a minute")


def _add_eval(sub) -> None:
    evaluation = sub.add_parser("eval", help="pass@1, pass@k, maj@k and format rate on task problems")
    _model_args(evaluation, None, 256, compile=False)
    source = evaluation.add_mutually_exclusive_group(required=True)
    source.add_argument("--tasks", help="a recipe (file, or name in recipes/) or comma-separated task families")
    source.add_argument("--data", type=Path, help="a problem JSONL, e.g. a run's data/corpus-held-out.jsonl "
                        "(problems a run never trained on; --tasks with the run's seed draws its training problems)")
    evaluation.add_argument("--difficulty", type=_levels, help="a level (2) or range (1-3) for every family")
    evaluation.add_argument("--n", type=int, help="problems (default: 100 from --tasks, all of --data)")
    evaluation.add_argument("--samples", type=int, default=1, help="completions per problem (k)")
    evaluation.add_argument("--seed", type=int, default=1, help="draws the problems and the sampling seeds")
    evaluation.add_argument("--batch", type=int, default=128, help="sequences decoded together")
    evaluation.add_argument("--out", help="write the report as JSON here")
    evaluation.set_defaults(func=cmd_eval)  # temperature None: 0 for one sample, 0.6 (R1's setting) for several


def _add_chat(sub) -> None:
    talk = sub.add_parser("chat", help="a streaming multi-turn chat in the terminal")
    _model_args(talk, 0.6, 1024, compile=True)
    talk.add_argument("--system", help="a system prompt")
    talk.add_argument("--seed", type=int)
    talk.set_defaults(func=cmd_chat)


def _add_generate(sub) -> None:
    gen = sub.add_parser("generate", help="completions for prompts from the command line or a file, batched")
    _model_args(gen, 0.0, 256, compile=False)
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeat for several)")
    prompts.add_argument("--file", type=Path, help="one prompt per line, or .jsonl rows with a \"prompt\"")
    form = gen.add_mutually_exclusive_group()
    form.add_argument("--chat", action="store_true", default=True, help="prompts as user turns (the default)")
    form.add_argument("--raw", dest="chat", action="store_false", help="prompts as raw text after bos")
    gen.add_argument("--seed", type=int, help="prompt i samples with seed + i")
    gen.add_argument("--batch", type=int, default=16, help="sequences decoded together")
    gen.add_argument("--json", action="store_true", help="one JSON line per prompt: prompt, completion, reasoning, "
                     "content, finish_reason, tokens")
    gen.set_defaults(func=cmd_generate)


def _add_serve(sub) -> None:
    serve = sub.add_parser("serve", help="an OpenAI-compatible API (and a chat page) for a model directory")
    serve.add_argument("--model", type=Path, required=True, help="a model directory (with its tokenizer)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1")
    serve.add_argument("--max-batch", type=int, default=16, help="sequences decoded together")
    serve.add_argument("--max-queue", type=int, default=64, help="requests waiting or running; more get 429")
    serve.add_argument("--max-len", type=int, help="longest prompt + reply (default: the model's context); "
                       "the KV cache holds max-batch x max-len tokens")
    serve.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    serve.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                       help="torch.compile the decode step (warmed up before the server takes requests)")
    serve.add_argument("--threads", type=int, help="torch threads for the engine (default: one core fewer than "
                       "torch would take, left to the HTTP layer; 1.4x the tokens/s under load on 2 cores)")
    serve.set_defaults(func=cmd_serve)


def _add_export(sub) -> None:
    export = sub.add_parser("export", help="a model directory as a GGUF file (llama.cpp, Ollama, LM Studio)")
    export.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a Hugging Face DeepseekV3 directory "
                        "with its tokenizer, e.g. runs/demo/model")
    export.add_argument("--gguf", type=Path, required=True, metavar="OUT", help="the GGUF file to write")
    export.add_argument("--outtype", choices=["f32", "f16", "q8_0"], default="f32",
                        help="the matrices' type (norms, biases and the router stay f32; default: %(default)s)")
    export.set_defaults(func=cmd_export)


def _add_report(sub) -> None:
    report = sub.add_parser("report", help="report.md + PNG plots of a run: loss, MaxVio, GRPO, held-out accuracy, "
                            "MFU and cost")
    report.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                        help="a stage directory (with metrics.jsonl) or a run of stage directories")
    report.add_argument("--mfu", type=float, default=0.4, help="utilisation assumed for the rented-GPU estimates")
    report.set_defaults(func=cmd_report)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nanoseek", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    for add in (_add_info, _add_cost, _add_claims, _add_pipelines, _add_tasks, _add_data, _add_tokenizer,
                _add_training, _add_eval, _add_chat, _add_generate, _add_serve, _add_export, _add_report):
        add(sub)  # in this order in `nanoseek --help`
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.func is not cmd_train:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = unknown
    try:
        args.func(args)
    except NanoseekError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
