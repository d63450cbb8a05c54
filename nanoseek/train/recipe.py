"""A training run's settings: one dataclass, set by a YAML recipe and overridden by `--key value` flags one to one.

Recipes live in `recipes/NAME.yaml` (or any path); keys are TrainConfig's fields. A key that is not a field, or a
value of the wrong type, is an error that names the key and the file before anything runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import TrainError
from ..tasks import resolve_recipe

@dataclass
class TrainConfig:
    stage: str = "pretrain"  # pretrain | sft | grpo | distill
    # model
    preset: str = "small"  # the architecture of a fresh model (vocab_size comes from the tokenizer)
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change in the preset
    init: str | None = None  # start from this Hugging Face model directory instead (GRPO: required)
    teacher: str | None = None  # distill: the model whose verified-correct traces the student learns from
    # data
    data: list = field(default_factory=list)  # .jsonl / .txt / .parquet files, or token-shard directories
    tasks: str | None = None  # or build the corpus from this task recipe (see `nanoseek data build`) ...
    tasks_n: int = 20000  # ... with this many problems (distill: problems the teacher answers)
    tokenizer: str | None = None  # tokenizer directory; default: the init model's, else train one on the data
    vocab_size: int = 2048  # for a tokenizer trained here ...
    tokenizer_digits: int = 3  # ... splitting numbers into runs of at most this many digits (V3: 3)
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int = 1000
    max_seconds: float | None = None  # also stop once the steps have taken this long (equal-time controls)
    # optimiser (AdamW, betas 0.9 / 0.95)
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    schedule: str = "cosine"  # cosine | wsd
    warmup_steps: int = 50
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # DeepSeek-V3 objectives
    mtp_lambda: float = 0.3  # MTP loss weight ...
    mtp_lambda_final: float = 0.1  # ... and after mtp_lambda_switch * max_steps (V3: 0.3 for 10T tokens, then 0.1)
    mtp_lambda_switch: float = 0.68
    bias_gamma: float = 0.001  # aux-loss-free bias update speed ...
    bias_gamma_stop: float = 0.97  # ... set to 0 after this fraction of steps (V3: 14.3T of 14.8T tokens)
    balance_alpha: float = 0.0001  # sequence-wise balance loss weight
    fp8: bool = False  # fine-grained FP8 GEMMs (emulated on CPU)
    # runtime
    device: str = "auto"  # auto | cpu | cuda
    compile: bool = False  # torch.compile the training forward (no faster on CPU: benchmarks/model_throughput.py)
    compile_decode: bool = False  # the Engine's compiled decode step for GRPO's rollouts and distillation's traces
    # many processes (`torchrun ... -m nanoseek`): batch_size (and prompts_per_step) are global, split over them
    parallel: str = "dp"  # dp: DDP replicas | fsdp: FSDP2, parameters, gradients and optimiser state sharded
    expert_parallel: int = 1  # split every MoE layer's routed experts over this many processes (all_to_all)
    seed: int = 0
    out: str = "runs/pretrain"
    save_every: int = 200
    keep_last: int = 2
    resume: bool = False
    eval_n: int = 64  # held-out problems answered greedily at the end (0: none)
    # GRPO (stage grpo): prompts from `tasks`, `group_size` samples each, rewards from the task verifiers
    group_size: int = 8  # G (distill: samples per problem for rejection sampling)
    prompts_per_step: int = 8
    num_iterations: int = 1  # policy updates per batch of rollouts (mu)
    loss_type: str = "grpo"  # grpo (mean per sequence) | dr_grpo (no length/std normalisation) | dapo (token-level)
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # DAPO's clip-higher: 0.28
    beta: float = 0.0  # k3 KL to the initial policy; 0 keeps no reference model
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    mask_truncated: bool = True  # completions cut at max_new_tokens add no loss
    logprob_tokens: int = 1024  # rollouts go through the policy sorted by length, in micro-batches of at most this
    # many (padded) tokens: less padding, the same loss; raise it on a GPU
    temperature: float = 1.0
    max_new_tokens: int = 128
    format_weight: float = 0.0  # reward = accuracy (TinyZero's 0.1 for a well-formed wrong answer) + format
    format_partial: float = 0.1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, source: str = "settings") -> "TrainConfig":
        rules = [("stage", self.stage in ("pretrain", "sft", "grpo", "distill"), "is pretrain, sft, grpo or distill"),
                 ("loss_type", self.loss_type in ("grpo", "dr_grpo", "dapo"), "is grpo, dr_grpo or dapo"),
                 ("group_size", self.group_size >= 2, ">= 2 (advantages compare samples of a group)"),
                 ("num_iterations", self.num_iterations >= 1, ">= 1"),
                 ("logprob_tokens", self.logprob_tokens >= 1, ">= 1"),
                 ("schedule", self.schedule in ("cosine", "wsd"), "is cosine or wsd"),
                 ("device", self.device in ("auto", "cpu", "cuda"), "is auto, cpu or cuda"),
                 ("parallel", self.parallel in ("dp", "fsdp"), "is dp or fsdp"),
                 ("expert_parallel", self.expert_parallel >= 1, ">= 1"),
                 ("expert_parallel", self.expert_parallel == 1 or self.stage != "grpo",
                  "1 for GRPO (rollouts of different lengths on each process cannot share experts)"),
                 ("seq_len", self.seq_len > 0, "> 0"), ("batch_size", self.batch_size > 0, "> 0"),
                 ("grad_accum", self.grad_accum > 0, "> 0"), ("max_steps", self.max_steps > 0, "> 0"),
                 ("max_seconds", self.max_seconds is None or self.max_seconds >= 0, ">= 0 (or unset: no limit)"),
                 ("lr", self.lr > 0, "> 0"), ("save_every", self.save_every > 0, "> 0"),
                 ("keep_last", self.keep_last > 0, "> 0"), ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                 ("data", bool(self.data) or self.tasks is not None, "lists files (or `tasks` names a task recipe)"),
                 ("init", self.stage != "grpo" or self.init is not None, "is set for GRPO (the model to train)"),
                 ("teacher", self.stage != "distill" or self.teacher is not None, "is set for distillation"),
                 ("tasks", self.stage not in ("grpo", "distill") or self.tasks is not None,
                  "names a task recipe (the prompts)")]
        for key, ok, rule in rules:
            if not ok:
                raise TrainError(f"{source}: '{key}' = {getattr(self, key)!r}: must be {rule}")
        return self


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check (and for command-line strings, convert) a value against the field's type."""
    hint = typing.get_type_hints(TrainConfig)[key]
    types_ = [t for t in typing.get_args(hint)] if isinstance(hint, types.UnionType) else [hint]
    if value is None and type(None) in types_:
        return None
    if isinstance(value, str) and str not in types_:  # from the command line: parse as YAML scalar/list
        value = yaml.safe_load(value)
    for t in types_:
        t = typing.get_origin(t) or t
        if t is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is list and isinstance(value, str):
            return [value]
        if isinstance(value, t) and not (t is int and isinstance(value, bool)):
            return value
    names = " or ".join(getattr(t, "__name__", str(t)) for t in types_)
    raise TrainError(f"{source}: '{key}' = {value!r}: expected {names}")


def load_config(recipe: str | None, overrides: dict[str, Any], **defaults) -> TrainConfig:
    """TrainConfig from defaults, then the recipe's keys, then the overrides (`--key value` strings from the
    command line, or values)."""
    values: dict[str, Any] = dict(defaults)
    sources = [("command line", overrides)]
    if recipe is not None:
        path = resolve_recipe(recipe)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainError(f"recipe {path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise TrainError(f"recipe {path}: expected a mapping of settings, got {type(data).__name__}")
        sources.insert(0, (f"recipe {path}", data))
    for source, data in sources:
        for key, value in data.items():
            if key not in FIELDS:
                raise TrainError(f"{source}: unknown key '{key}' (known: {', '.join(FIELDS)})")
            values[key] = _coerce(key, value, source)
    return TrainConfig(**values).validate(recipe or "settings")


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--lr', '1e-3', '--max-steps', '10'] -> {'lr': '1e-3', 'max_steps': '10'}."""
    out, i = {}, 0
    while i < len(args):
        key = args[i]
        if not key.startswith("--") or i + 1 >= len(args):
            raise TrainError(f"command line: expected --key value pairs, got {' '.join(args[i:])!r}")
        out[key[2:].replace("-", "_")] = args[i + 1]
        i += 2
    return out
