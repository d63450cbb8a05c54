"""`nanoseek <command>`: the command line. User mistakes print one `error:` line and exit with status 2."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .config import PRESETS, ModelConfig
from .errors import NanoseekError


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _load_config(args) -> tuple[ModelConfig, str]:
    if args.model:
        return ModelConfig.load(args.model), str(args.model)
    return ModelConfig.from_preset(args.preset), f"preset {args.preset}"


def cmd_info(args) -> None:
    from .cost import model_info
    cfg, source = _load_config(args)
    info = model_info(cfg, args.seq_len)
    if args.json:
        print(json.dumps({"source": source, **info}, indent=2))
        return
    p, kv, fl = info["params"], info["kv_cache_per_token"], info["flops_per_token"]
    rows = [
        ("total parameters (main model, no MTP)", f"{p['total']:,}", _human(p["total"])),
        ("activated per token (embedding and head included, see below)", f"{p['activated']:,}",
         _human(p["activated"])),
        ("activated per token without the embedding", f"{p['activated_without_embedding']:,}",
         _human(p["activated_without_embedding"])),
        ("MTP modules (unique; embedding and head shared)", f"{p['mtp_total']:,}", _human(p["mtp_total"])),
        ("KV cache per token, MLA (BF16)", f"{kv['mla_bytes']:,} B", f"{kv['mla_values']:,} values"),
        ("KV cache per token, equivalent MHA (BF16)", f"{kv['mha_bytes']:,} B",
         f"{kv['mha_bytes'] / kv['mla_bytes']:.1f}x MLA"),
        (f"forward FLOPs per token (seq {fl['seq_len']}): 2 x matmul weights + attention",
         f"{fl['forward']:.4g}", f"{_human(fl['forward_matmul'])} + {_human(fl['forward_attention'])}"),
        ("training FLOPs per token (3 x forward), main model", f"{fl['training']:.4g}", _human(fl["training"])),
        ("training FLOPs per token, MTP modules", f"{fl['mtp_training']:.4g}", _human(fl["mtp_training"])),
    ]
    print(f"nanoseek info: {source}")
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>17}  {note}")
    print(f"  activated = embedding + head + attention + dense MLPs + {cfg.n_shared_experts} shared and "
          f"{cfg.num_experts_per_tok} routed experts + gates in every MoE layer")


def cmd_demo(args) -> None:
    """The main job at this stage: the V3 figures, then a random tiny V3 run end to end on this machine."""
    import torch
    from .engine import greedy_generate
    from .model import Transformer

    out = Path(args.out)
    print("== DeepSeek-V3 (671B), counted from its config ==")
    cmd_info(argparse.Namespace(model=None, preset="v3-671b", json=False, seq_len=4096))
    print(f"\n== a random '{args.preset}' V3 model on {'CUDA' if torch.cuda.is_available() else 'CPU'} ==")
    torch.manual_seed(args.seed)
    cfg = ModelConfig.from_preset(args.preset)
    model = Transformer(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 32))
    t0 = time.perf_counter()
    with torch.no_grad():
        o = model(ids)
        loss = torch.nn.functional.cross_entropy(o.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    print(f"  parameters: {model.num_parameters():,}; forward of {tuple(ids.shape)} tokens in "
          f"{(time.perf_counter() - t0) * 1e3:.0f} ms; loss {loss:.3f} (uniform guess: {torch.log(torch.tensor(cfg.vocab_size)):.3f})")
    print(f"  MTP logits: {[tuple(m.shape) for m in o.mtp_logits]}; tokens per expert, layer "
          f"{cfg.first_k_dense_replace}: {o.router[0].tolist()}")
    gen = greedy_generate(model, ids[:1, :8], max_new_tokens=16)
    with torch.no_grad():  # the absorbed decode path must agree with the naive training path
        diff = (model(gen).logits[0, 7:-1].argmax(-1) != gen[0, 8:]).sum().item()
    print(f"  greedy generation (latent KV cache): {gen[0, 8:].tolist()}; "
          f"{'agrees with' if diff == 0 else f'{diff} tokens differ from'} the full forward")
    model_dir = out / "model"
    model.save_pretrained(model_dir)
    reloaded = Transformer.from_pretrained(model_dir)
    with torch.no_grad():
        same = torch.equal(reloaded(ids).logits, o.logits)
    print(f"  saved as a Hugging Face DeepseekV3 directory: {model_dir} (reload {'identical' if same else 'DIFFERS'})")
    print(f"\nnext: nanoseek info --model {model_dir}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nanoseek", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameters, activated parameters, KV cache and FLOPs of a model")
    src = info.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help=f"one of {', '.join(PRESETS)}")
    src.add_argument("--model", type=Path, help="a Hugging Face DeepseekV3 directory")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--seq-len", type=int, default=4096, help="context length for the attention FLOPs")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="the main job: V3's figures, then a random tiny V3 end to end")
    demo.add_argument("--preset", default="tiny", help="the random model to run")
    demo.add_argument("--out", default="runs/demo", help="where the model directory goes")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except NanoseekError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
