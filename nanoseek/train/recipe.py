"""A training run's settings: shared optimiser/schedule/runtime fields plus one section per stage, set by a YAML
recipe and overridden by `--key value` flags one to one.

    TrainConfig                 what every stage shares: model, data, batch, schedule, AdamW, checkpoints, runtime
      .moe   MoESettings        V3's objectives: MTP loss weight, aux-loss-free bias speed, balance loss (LM stages)
      .grpo  GRPOSettings       groups, clipping, KL, loss normalisation, rollouts (stage grpo)
      .distill DistillSettings  the teacher and its rejection sampling (stage distill)

Recipes live in `nanoseek/recipes/NAME.yaml` (or any path). A key is a section's field written flat (`group_size: 8`, as
recipes always have been: the stage picks the section where a name is in two) or under its section
(`grpo: {group_size: 8}`; on the command line `--grpo.group-size 8`). A key no section knows, or a value of the
wrong type, is an error that names the key and the file before anything runs.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import TrainError
from ..fp8 import GEMMS
from ..tasks import resolve_recipe

Rule = tuple[str, bool, str]  # (field, holds, what it must be)


@dataclass
class MoESettings:
    """DeepSeek-V3's objectives beside next-token prediction (pretraining, SFT, the distilled student)."""
    mtp_lambda: float = 0.3  # MTP loss weight ...
    mtp_lambda_final: float = 0.1  # ... and after mtp_lambda_switch * max_steps (V3: 0.3 for 10T tokens, then 0.1)
    mtp_lambda_switch: float = 0.68
    bias_gamma: float = 0.001  # aux-loss-free bias update speed (every stage with MoE layers) ...
    bias_gamma_stop: float = 0.97  # ... set to 0 after this fraction of steps (V3: 14.3T of 14.8T tokens)
    balance_alpha: float = 0.0001  # sequence-wise balance loss weight

    def rules(self) -> list[Rule]:
        return [("mtp_lambda", self.mtp_lambda >= 0, ">= 0"), ("mtp_lambda_final", self.mtp_lambda_final >= 0, ">= 0"),
                ("bias_gamma", self.bias_gamma >= 0, ">= 0"), ("balance_alpha", self.balance_alpha >= 0, ">= 0")]


@dataclass
class GRPOSettings:
    """GRPO (stage grpo): prompts from `tasks`, `group_size` samples each, rewards from the task verifiers."""
    group_size: int = 8  # G
    prompts_per_step: int = 8
    num_iterations: int = 1  # policy updates per batch of rollouts (mu)
    loss_type: str = "grpo"  # grpo (mean per sequence) | dr_grpo (no length/std normalisation) | dapo (token-level)
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2  # DAPO's clip-higher: 0.28
    beta: float = 0.0  # k3 KL to the initial policy; 0 keeps no reference model
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal
    mask_truncated: bool = True  # completions cut at max_new_tokens add no loss
    logprob_tokens: int = 768  # rollouts go through the policy sorted by length, in micro-batches of at most this
    # many (padded) tokens: less padding, the same loss; on 1-2 CPU threads 384-1,024 were fastest for `mini`
    # (768: 7% faster than 1,024 on one thread, as fast on two); raise it on a GPU
    temperature: float = 1.0
    max_new_tokens: int = 128
    format_weight: float = 0.0  # reward = accuracy (TinyZero's 0.1 for a well-formed wrong answer) + format
    format_partial: float = 0.1

    def rules(self) -> list[Rule]:
        return [("loss_type", self.loss_type in ("grpo", "dr_grpo", "dapo"), "one of grpo, dr_grpo, dapo"),
                ("group_size", self.group_size >= 2, ">= 2 (advantages compare samples of a group)"),
                ("prompts_per_step", self.prompts_per_step >= 1, ">= 1"),
                ("num_iterations", self.num_iterations >= 1, ">= 1"),
                ("logprob_tokens", self.logprob_tokens >= 1, ">= 1"),
                ("temperature", self.temperature > 0, "> 0"), ("max_new_tokens", self.max_new_tokens >= 1, ">= 1")]


@dataclass
class DistillSettings:
    """Rejection sampling from a teacher, then SFT of the student on the kept traces (stage distill)."""
    teacher: str | None = None  # the model whose verified-correct traces the student learns from
    samples: int = 8  # completions per problem (flat recipes call it group_size)
    temperature: float = 1.0
    max_new_tokens: int = 128

    def rules(self) -> list[Rule]:
        return [("teacher", self.teacher is not None, "set for distillation"),
                ("samples", self.samples >= 1, ">= 1"),
                ("temperature", self.temperature > 0, "> 0"), ("max_new_tokens", self.max_new_tokens >= 1, ">= 1")]


@dataclass
class ExtendSettings:
    """Context extension (stage extend), DeepSeek-V3 section 4.3: YaRN written into the init model's config, then
    training at the longer `seq_len` (V3: 4K -> 32K -> 128K, 1,000 steps each, scale 40, beta 32 / 1)."""
    factor: float = 4.0  # the new context: factor x original_length (a second phase gives the total factor)
    original_length: int | None = None  # the pretraining length; unset: the init model's YaRN original (phase 2)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    rope: str = "yarn"  # yarn | plain: the context grows, RoPE as the init model has it (a control for YaRN)

    def rules(self) -> list[Rule]:
        return [("factor", self.factor > 1, "> 1"), ("rope", self.rope in ("yarn", "plain"), "yarn or plain"),
                ("original_length", self.original_length is None or self.original_length > 0, "> 0 (or unset)")]


@dataclass
class TrainConfig:
    stage: str = "pretrain"  # pretrain | extend | sft | grpo | distill
    # model
    preset: str = "small"  # the architecture of a fresh model (vocab_size comes from the tokenizer)
    model_overrides: dict = field(default_factory=dict)  # ModelConfig fields to change in the preset
    init: str | None = None  # start from this Hugging Face model directory instead (GRPO: required)
    # data
    data: list = field(default_factory=list)  # .jsonl / .txt / .parquet files, or token-shard directories
    tasks: str | None = None  # or build the corpus from this task recipe (see `nanoseek data build`) ...
    tasks_n: int = 20000  # ... with this many problems (distill: problems the teacher answers)
    tokenizer: str | None = None  # tokenizer directory; default: the init model's, else train one on the data
    vocab_size: int = 2048  # for a tokenizer trained here ...
    tokenizer_digits: int = 3  # ... splitting numbers into runs of at most this many digits (V3: 3)
    seq_len: int = 256
    windows: str = "packed"  # packed: a window every seq_len tokens | documents: one at each document's start
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
    precision: str = "auto"  # the forward's autocast: auto (BF16 on CUDA, fp32 on CPU) | bf16 | fp32
    fp8: bool = False  # fine-grained FP8 GEMMs (emulated on CPU) ...
    fp8_gemm: str = "auto"  # ... auto | emulated | scaled_mm: real E4M3 GEMMs by K slice (fp8.GEMMS)
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
    # the sections
    moe: MoESettings = field(default_factory=MoESettings)
    grpo: GRPOSettings = field(default_factory=GRPOSettings)
    distill: DistillSettings = field(default_factory=DistillSettings)
    extend: ExtendSettings = field(default_factory=ExtendSettings)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def rules(self) -> list[Rule]:
        return [("stage", self.stage in STAGE_SECTIONS, "one of pretrain, extend, sft, grpo, distill"),
                ("schedule", self.schedule in ("cosine", "wsd"), "cosine or wsd"),
                ("precision", self.precision in ("auto", "bf16", "fp32"), "auto, bf16 or fp32"),
                ("fp8_gemm", self.fp8_gemm in GEMMS, ", ".join(GEMMS[:-1]) + " or " + GEMMS[-1]),
                ("windows", self.windows in ("packed", "documents"), "packed or documents"),
                ("device", self.device in ("auto", "cpu", "cuda"), "auto, cpu or cuda"),
                ("parallel", self.parallel in ("dp", "fsdp"), "dp or fsdp"),
                ("expert_parallel", self.expert_parallel >= 1, ">= 1"),
                ("expert_parallel", self.expert_parallel == 1 or self.stage != "grpo",
                 "1 for GRPO (rollouts of different lengths on each process cannot share experts)"),
                ("seq_len", self.seq_len > 0, "> 0"), ("batch_size", self.batch_size > 0, "> 0"),
                ("grad_accum", self.grad_accum > 0, "> 0"), ("max_steps", self.max_steps > 0, "> 0"),
                ("max_seconds", self.max_seconds is None or self.max_seconds >= 0, ">= 0 (or unset: no limit)"),
                ("lr", self.lr > 0, "> 0"), ("save_every", self.save_every > 0, "> 0"),
                ("keep_last", self.keep_last > 0, "> 0"), ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
                ("data", bool(self.data) or self.tasks is not None, "a list of files (or `tasks` a task recipe)"),
                ("init", self.stage not in ("grpo", "extend") or self.init is not None,
                 "set for GRPO and context extension (the model to train)"),
                ("tasks", self.stage not in ("grpo", "distill") or self.tasks is not None,
                 "a task recipe (the prompts)")]

    def validate(self, source: str = "settings") -> "TrainConfig":
        """The shared rules, then those of each section this stage uses."""
        checks = [("", self, self.rules())]
        checks += [(f"{name}.", getattr(self, name), getattr(self, name).rules())
                   for name in STAGE_SECTIONS.get(self.stage, ())]
        for prefix, owner, rules in checks:
            for key, ok, rule in rules:
                if not ok:
                    raise TrainError(f"{source}: '{prefix}{key}' = {getattr(owner, key)!r}: must be {rule}")
        return self


SECTIONS = {"moe": MoESettings, "grpo": GRPOSettings, "distill": DistillSettings, "extend": ExtendSettings}
STAGE_SECTIONS = {"pretrain": ("moe",), "extend": ("moe", "extend"), "sft": ("moe",), "grpo": ("grpo",),
                  "distill": ("moe", "distill")}
SHARED = {f.name for f in dataclasses.fields(TrainConfig) if f.name not in SECTIONS}
RENAMED = {("distill", "group_size"): "samples"}  # flat name in a stage -> the field of its section


def _section_of(key: str, stage: str) -> tuple[str, str] | None:
    """(section, field) of a flat key: the section of this stage that has it, else the first that does."""
    found = [(s, RENAMED.get((s, key), key)) for s, cls in SECTIONS.items()
             if RENAMED.get((s, key), key) in {f.name for f in dataclasses.fields(cls)}]
    if not found:
        return None
    return next((f for f in found if f[0] in STAGE_SECTIONS.get(stage, ())), found[0])


def _coerce(cls: type, key: str, value: Any, source: str) -> Any:
    """Check (and for command-line strings, convert) a value against the type of field `key` of `cls`."""
    hint = typing.get_type_hints(cls)[key]
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


def _place(key: str, value: Any, stage: str, source: str, shared: dict, sections: dict) -> None:
    """Put one recipe / command-line key where it belongs: a shared field, a section given whole
    (`grpo: {...}`), a dotted `section.field`, or a flat section field."""
    if key in SECTIONS and isinstance(value, dict):
        for k, v in value.items():
            _place(f"{key}.{k}", v, stage, source, shared, sections)
        return
    section, _, name = key.rpartition(".")
    if section:
        place = (section, RENAMED.get((section, name), name)) if section in SECTIONS else None
        if place is not None and place[1] not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
            place = None
    elif key in SHARED:
        shared[key] = _coerce(TrainConfig, key, value, source)
        return
    else:
        place = _section_of(key, stage)
    if place is None:
        known = sorted(SHARED) + [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)]
        raise TrainError(f"{source}: unknown key '{key}' (known: {', '.join(known)})")
    section, name = place
    sections[section][name] = _coerce(SECTIONS[section], name, value, source)


def load_config(recipe: str | None, overrides: dict[str, Any], **defaults) -> TrainConfig:
    """TrainConfig from defaults, then the recipe's keys, then the overrides (`--key value` strings from the
    command line, or values)."""
    sources = [("settings", defaults), ("command line", overrides)]
    if recipe is not None:
        path = resolve_recipe(recipe)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise TrainError(f"recipe {path}: not valid YAML ({e})") from None
        if not isinstance(data, dict):
            raise TrainError(f"recipe {path}: expected a mapping of settings, got {type(data).__name__}")
        sources.insert(1, (f"recipe {path}", data))
    stage = next((d["stage"] for _, d in reversed(sources) if isinstance(d.get("stage"), str)), "pretrain")
    shared: dict[str, Any] = {}
    sections: dict[str, dict] = {name: {} for name in SECTIONS}
    for source, data in sources:
        for key, value in data.items():
            _place(key, value, stage, source, shared, sections)
    cfg = TrainConfig(**shared, **{name: SECTIONS[name](**values) for name, values in sections.items()})
    return cfg.validate(recipe or "settings")


def parse_overrides(args: list[str]) -> dict[str, str]:
    """['--lr', '1e-3', '--max-steps', '10', '--grpo.group-size', '4'] -> {'lr': '1e-3', 'max_steps': '10',
    'grpo.group_size': '4'}."""
    out, i = {}, 0
    while i < len(args):
        key = args[i]
        if not key.startswith("--") or i + 1 >= len(args):
            raise TrainError(f"command line: expected --key value pairs, got {' '.join(args[i:])!r}")
        out[key[2:].replace("-", "_")] = args[i + 1]
        i += 2
    return out
