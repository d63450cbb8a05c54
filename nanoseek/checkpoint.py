"""Hugging Face DeepseekV3 directories: save and load, sharded or not, FP8 (block-scaled E4M3) included.

This file is the only place that knows the on-disk names. Ours differ in three ways:
* every tensor but `lm_head` lives under `model.`;
* routed experts are stacked, `layers.L.mlp.experts.gate_proj` (E, I, D), and stored one per expert,
  `model.layers.L.mlp.experts.E.gate_proj.weight`;
* MTP module k is `mtp.k`, stored as layer `num_hidden_layers + k` together with copies of the shared embedding and
  head (`embed_tokens`, `shared_head.head`) as the official checkpoints have them.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import ModelConfig
from .errors import CheckpointError, ConfigError
from .fp8 import E4M3, QUANTIZATION_CONFIG, fp8_weight_names, quantize_blocks
from .fp8 import dequantize_blocks as dequantize_fp8
from .model import Transformer
from .rundir import commit, staging

SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"
_EXPERT = re.compile(r"^((?:layers|mtp)\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


# ---- names ---------------------------------------------------------------------------------------------------------
def _hf_prefix(name: str, cfg: ModelConfig) -> str:
    """Our dotted module path -> the HF one (mtp.k. -> model.layers.{N+k}.)."""
    if name.startswith("lm_head."):
        return name
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    if m:
        return f"model.layers.{cfg.num_hidden_layers + int(m[1])}.{m[2]}"
    return "model." + name


def hf_names(name: str, cfg: ModelConfig) -> list[str]:
    """The HF tensor name(s) of one of our tensors; a stacked expert tensor maps to one name per expert."""
    m = _EXPERT.match(name.removesuffix(".weight"))
    if m:
        base = _hf_prefix(m[1], cfg)
        return [f"{base}.{e}.{m[2]}.weight" for e in range(cfg.n_routed_experts)]
    return [_hf_prefix(name, cfg)]


def to_hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF name -> tensor, floating tensors cast to `dtype`. With dtype E4M3 the weights V3 ships in FP8
    (`fp8_weight_names`) are 128x128 block-quantised, each with its fp32 `weight_scale_inv`; the rest stay as is."""
    cfg, out = model.cfg, {}
    quantized = fp8_weight_names(model) if dtype == E4M3 else set()
    for name, t in model.state_dict().items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().to("cpu")
        names = hf_names(name, cfg)
        if name in quantized:
            t, scale = quantize_blocks(t)  # E4M3 (E?, N, K), fp32 (E?, ceil(N/128), ceil(K/128))
            out.update(_per_name([f"{n}_scale_inv" for n in names], scale))
        elif dtype not in (None, E4M3) and t.is_floating_point():
            t = t.to(dtype)
        out.update(_per_name(names, t))
    for k in range(len(model.mtp)):  # the official MTP layer carries its own copy of the shared embedding and head
        layer = f"model.layers.{cfg.num_hidden_layers + k}"
        out[f"{layer}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        head = out.get("lm_head.weight", out["model.embed_tokens.weight"])
        out[f"{layer}.shared_head.head.weight"] = head.clone()
    return out


def _per_name(names: list[str], t: torch.Tensor):
    """(name, tensor) pairs: a stacked expert tensor (E, ...) becomes E tensors, each with storage of its own."""
    return zip(names, [part.clone() for part in t.unbind(0)] if len(names) > 1 else [t])


# ---- save -----------------------------------------------------------------------------------------------------------
def save_model(model: Transformer, path: str | Path, max_shard_size: int = 5 * 2**30,
               dtype: torch.dtype | None = None) -> None:
    """Write config.json, generation_config.json and safetensors (sharded past max_shard_size bytes) atomically:
    everything goes to a temporary sibling that replaces `path` in one rename; other files in `path` are kept.
    dtype=torch.float8_e4m3fn writes the official FP8 layout (see `to_hf_state_dict`) and its quantization_config."""
    if dtype is not None and dtype.is_floating_point and dtype.itemsize == 1 and dtype != E4M3:
        raise CheckpointError(f"dtype {dtype}: FP8 checkpoints are E4M3 (torch.float8_e4m3fn) with 128x128 blocks")
    path = Path(path)
    tmp = staging(path)
    state = to_hf_state_dict(model, dtype)
    shards, size = [[]], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    files = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for fname, names in zip(files, shards):
        save_file({n: state[n].contiguous() for n in names}, tmp / fname, metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": {n: f for f, names in zip(files, shards) for n in names}}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    extra = {k: v for k, v in model.cfg.extra.items() if k != "quantization_config"}
    cfg = model.cfg.replace(extra={**extra, "quantization_config": QUANTIZATION_CONFIG} if dtype == E4M3 else extra)
    cfg.save(tmp / "config.json")
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": True,
           "temperature": 0.6, "top_p": 0.95}
    (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if path.exists():
        ours = {SINGLE_FILE, INDEX_FILE, "config.json", "generation_config.json"}
        for f in path.iterdir():  # keep what others put there (tokenizer files), drop our old shards
            if f.is_file() and f.name not in ours and not re.match(r"model-\d+-of-\d+\.safetensors$", f.name):
                shutil.copy2(f, tmp / f.name)
    commit(tmp, path)


# ---- load -----------------------------------------------------------------------------------------------------------
def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the file that holds it."""
    index = path / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e!r}); it needs a 'weight_map' object") from None
        for f in set(weight_map.values()):
            if not (path / f).exists():
                raise CheckpointError(f"{path / f}: listed in {INDEX_FILE} but missing")
        return {k: path / f for k, f in weight_map.items()}
    single = path / SINGLE_FILE
    if not single.exists():
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    with _open(single) as f:
        return {k: single for k in f.keys()}


def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: cannot read safetensors file ({e}); is it truncated or corrupt?") from None


def load_model(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Transformer:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a model directory")
    try:
        cfg = ModelConfig.load(path)
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    files = _weight_files(path)
    mtp_present = sum(f"model.layers.{cfg.num_hidden_layers + k}.eh_proj.weight" in files
                      for k in range(cfg.num_nextn_predict_layers))
    if mtp_present < cfg.num_nextn_predict_layers:
        print(f"note: {path} has {mtp_present} of {cfg.num_nextn_predict_layers} MTP modules; "
              f"loading without the missing ones", file=sys.stderr)
        cfg = cfg.replace(num_nextn_predict_layers=mtp_present)
    qcfg = cfg.extra.get("quantization_config") or {}
    block = tuple(qcfg.get("weight_block_size", (128, 128)))

    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    wanted = {}  # HF name -> (our name, expert index or None)
    for name in expected:
        names = hf_names(name, cfg)
        for e, hf in enumerate(names):
            wanted[hf] = (name, e if len(names) > 1 else None)
    missing = [hf for hf in wanted if hf not in files]
    if missing:
        raise CheckpointError(f"{path}: missing tensor {missing[0]}" +
                              (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))

    def target_dtype(name, t):  # gate biases stay fp32, as in the official checkpoints
        return t.dtype if not t.is_floating_point() or name.endswith("e_score_correction_bias") else dtype

    tensors = {name: torch.empty(t.shape, dtype=target_dtype(name, t), device=device) for name, t in expected.items()}
    by_file: dict[Path, list[str]] = {}
    for hf in wanted:
        by_file.setdefault(files[hf], []).append(hf)
    for file, names in by_file.items():
        with _open(file) as f:
            for hf in names:
                name, e = wanted[hf]
                t = _read(f, file, hf, files, block)
                target = tensors[name] if e is None else tensors[name][e]
                if t.shape != target.shape:
                    raise CheckpointError(f"{file}: tensor {hf} has shape {tuple(t.shape)}, "
                                          f"expected {tuple(target.shape)} from config.json")
                target.copy_(t)
    model.load_state_dict(tensors, assign=True, strict=not cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rope.reset_parameters(device)
    return model.eval()


def _read(f, file: Path, name: str, files: dict[str, Path], block: tuple[int, int]) -> torch.Tensor:
    try:
        t = f.get_tensor(name)
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{file}: cannot read tensor {name} ({e}); is the file truncated?") from None
    if t.dtype == torch.float8_e4m3fn:
        scale_name = name + "_scale_inv"
        if scale_name not in files:
            raise CheckpointError(f"{file}: FP8 tensor {name} has no {scale_name}")
        with _open(files[scale_name]) as sf:
            t = dequantize_fp8(t, sf.get_tensor(scale_name), block)
    return t


# The model knows no file format (model/ imports nothing of this package but its config); these are its Hugging Face
# directory methods: `Transformer.from_pretrained(dir)`, `model.save_pretrained(dir)`.
Transformer.from_pretrained = staticmethod(load_model)
Transformer.save_pretrained = save_model
