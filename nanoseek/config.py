"""ModelConfig: DeepSeek-V3's hyper-parameters under Hugging Face `DeepseekV3Config` field names, presets, validation.

A `config.json` written here loads in transformers (and vLLM/SGLang); one written by transformers or shipped with
the official checkpoints loads here. Fields that nanoseek does not use are kept in `extra` and written back.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

SCORING_FUNCS = ("sigmoid", "softmax")
# noaux_tc: V3's bias-corrected group-limited routing; group_limited_greedy: V2's; greedy: plain top-k (V2-Lite).
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")
# Keys transformers derives or adds on save; they carry no information of their own.
_DERIVED_KEYS = {"head_dim", "qk_head_dim", "model_type", "architectures", "transformers_version", "auto_map",
                 "torch_dtype", "dtype", "num_mtp_layers", "rope_parameters"}


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 2048  # one routed (or shared) expert
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128  # unused by MLA; kept for transformers
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512  # d_c: the compressed KV latent, all the cache keeps (with the rope key)
    q_lora_rank: int | None = 1536  # d_c': None means a plain q projection
    qk_rope_head_dim: int = 64  # d_h^R: decoupled rope key/query per head
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128  # d_h
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8  # K_r
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    moe_layer_freq: int = 1
    num_nextn_predict_layers: int = 1  # MTP depth D
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor", "original_max_position_embeddings", ...}
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict)  # other config.json keys, written back unchanged

    def __post_init__(self):
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.first_k_dense_replace and layer_id % self.moe_layer_freq == 0

    @property
    def n_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_hidden_layers))

    # ---- validation ----------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def fail(name, rule):
            raise ConfigError(f"config field '{name}' = {getattr(self, name)!r}: {rule}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "n_routed_experts", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group", "num_experts_per_tok",
                     "max_position_embeddings", "moe_layer_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(name, "must be a positive integer")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                fail(name, "must be a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            fail("q_lora_rank", "must be a positive integer or null (plain q projection)")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.scoring_func not in SCORING_FUNCS:
            fail("scoring_func", f"must be one of {SCORING_FUNCS}")
        if self.topk_method not in TOPK_METHODS:
            fail("topk_method", f"must be one of {TOPK_METHODS}")
        if self.hidden_act != "silu":
            fail("hidden_act", "only 'silu' (SwiGLU experts) is supported")
        if self.attention_bias:
            fail("attention_bias", "biases in MLA projections are not supported (DeepSeek models have none)")
        if self.num_experts_per_tok > self.n_routed_experts:
            fail("num_experts_per_tok", f"must be <= n_routed_experts ({self.n_routed_experts})")
        if self.n_routed_experts % self.n_group:
            fail("n_group", f"must divide n_routed_experts ({self.n_routed_experts})")
        if self.topk_group > self.n_group:
            fail("topk_group", f"must be <= n_group ({self.n_group})")
        experts_per_group = self.n_routed_experts // self.n_group
        if self.topk_method != "greedy" and self.num_experts_per_tok > self.topk_group * experts_per_group:
            fail("num_experts_per_tok", f"must be <= topk_group * experts per group "
                                        f"({self.topk_group} * {experts_per_group})")
        if self.topk_method == "noaux_tc" and self.n_group > 1 and experts_per_group < 2:
            fail("n_group", "noaux_tc scores a group by its top-2 experts, so each group needs at least 2 experts")
        if self.first_k_dense_replace > self.num_hidden_layers:
            fail("first_k_dense_replace", f"must be <= num_hidden_layers ({self.num_hidden_layers})")
        if not (isinstance(self.routed_scaling_factor, (int, float)) and self.routed_scaling_factor > 0):
            fail("routed_scaling_factor", "must be a positive number")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            fail("rms_norm_eps", "must be a positive number")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1):
            fail("rope_theta", "must be a number > 1")
        if self.rope_scaling is not None:
            rs = self.rope_scaling
            if not isinstance(rs, dict):
                fail("rope_scaling", "must be an object or null")
            kind = rs.get("type", rs.get("rope_type"))
            if kind not in ("yarn", "default", None):
                fail("rope_scaling", f"type {kind!r} is not supported (use 'yarn' or null)")
            if kind == "yarn":
                if not isinstance(rs.get("factor"), (int, float)) or rs["factor"] < 1:
                    fail("rope_scaling", "yarn needs 'factor' >= 1")
                if not isinstance(rs.get("original_max_position_embeddings"), int):
                    fail("rope_scaling", "yarn needs an integer 'original_max_position_embeddings'")

    # ---- (de)serialisation ---------------------------------------------------------------------------------------
    @property
    def yarn(self) -> dict | None:
        """The YaRN parameters, or None for plain RoPE."""
        rs = self.rope_scaling
        if rs and rs.get("type", rs.get("rope_type")) == "yarn":
            return rs
        return None

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        d = {**self.extra, **d, "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"]}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type", "deepseek_v3") not in ("deepseek_v3", "deepseek_v2"):
            raise ConfigError(f"{source}: field 'model_type' = {d['model_type']!r}: expected 'deepseek_v3'")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names and k not in _DERIVED_KEYS}
        if "rope_parameters" in d and "rope_scaling" not in d:  # transformers >= 5 layout
            rp = dict(d["rope_parameters"] or {})
            kwargs.setdefault("rope_theta", rp.pop("rope_theta", cls.rope_theta))
            kind = rp.pop("rope_type", rp.pop("type", "default"))
            kwargs["rope_scaling"] = None if kind == "default" else {"type": kind, **rp}
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            kwargs["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if kwargs.get("q_lora_rank") == 0:
            kwargs["q_lora_rank"] = None
        try:
            return cls(**kwargs, extra=extra)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.exists():
            raise ConfigError(f"{path}: no such file (a model directory needs a config.json)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: malformed JSON ({e})") from None
        return cls.from_dict(d, source=str(path))

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_V3_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}

PRESETS: dict[str, dict[str, Any]] = {
    # For tests: a complete V3 (MLA, MoE with groups and a shared expert, a dense layer, MTP) under 1M parameters.
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32,
                 qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1,
                 num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
                 num_nextn_predict_layers=1, max_position_embeddings=512),
    # The CPU demo's model: `small` at half the width (~2.8M parameters with the MTP module), 2.7x its tokens/s, so the
    # demo's pretraining reaches the worked solutions' algorithms (~2.5M tokens) in minutes.
    "mini": dict(vocab_size=2048, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=96,
                 kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                 n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                 num_nextn_predict_layers=1, max_position_embeddings=2048),
    # A CPU model of twice the width: ~10M parameters with the MTP module.
    "small": dict(vocab_size=2048, hidden_size=256, intermediate_size=768, moe_intermediate_size=128,
                  num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=128,
                  kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=16,
                  n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2, first_k_dense_replace=1,
                  num_nextn_predict_layers=1, max_position_embeddings=2048),
    # DeepSeek-V2-Lite (15.7B total, 2.4B active): plain q projection, softmax gate, greedy top-6 of 64.
    "v2-lite": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                    num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, q_lora_rank=None,
                    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
                    first_k_dense_replace=1, routed_scaling_factor=1.0, norm_topk_prob=False,
                    scoring_func="softmax", topk_method="greedy", num_nextn_predict_layers=0,
                    max_position_embeddings=163840, bos_token_id=100000, eos_token_id=100001,
                    rope_scaling={**_V3_YARN, "mscale": 0.707, "mscale_all_dim": 0.707}),
    # DeepSeek-V3 / R1 (671B): the official config.json values.
    "v3-671b": dict(rope_scaling=_V3_YARN),
}
