import json

import pytest

from nanoseek import ConfigError, ModelConfig, Transformer
from nanoseek.config import PRESETS

OFFICIAL_V3 = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                   num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
                   n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                   scoring_func="sigmoid", topk_method="noaux_tc", first_k_dense_replace=3, norm_topk_prob=True,
                   num_nextn_predict_layers=1, max_position_embeddings=163840, rope_theta=10000,
                   rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                 "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})


def test_v3_preset_is_the_official_config():
    cfg = ModelConfig.from_preset("v3-671b")
    for name, value in OFFICIAL_V3.items():
        assert getattr(cfg, name) == value, name


def test_small_presets_sizes():
    assert Transformer(ModelConfig.from_preset("tiny")).num_parameters() < 1_000_000
    assert 8e6 < Transformer(ModelConfig.from_preset("small")).num_parameters() < 12e6
    assert 2e6 < Transformer(ModelConfig.from_preset("mini")).num_parameters() < 3e6


@pytest.mark.parametrize("preset", list(PRESETS))
def test_dict_round_trip(preset, tmp_path):
    cfg = ModelConfig.from_preset(preset)
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.load(tmp_path) == cfg


def test_transformers_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig.from_preset("v3-671b")
    cfg.save(tmp_path / "config.json")
    hf = transformers.AutoConfig.from_pretrained(tmp_path)
    assert hf.model_type == "deepseek_v3" and hf.q_lora_rank == 1536 and hf.n_group == 8
    assert hf.rope_parameters["factor"] == 40 and hf.rope_parameters["rope_type"] == "yarn"
    hf.save_pretrained(tmp_path / "hf")  # transformers writes `rope_parameters`; we read it back
    assert ModelConfig.load(tmp_path / "hf") == cfg.replace(extra=ModelConfig.load(tmp_path / "hf").extra)


def test_plain_q_projection_allowed():
    cfg = ModelConfig.from_dict({**ModelConfig.from_preset("tiny").to_dict(), "q_lora_rank": None})
    assert cfg.q_lora_rank is None and hasattr(Transformer(cfg).layers[0].self_attn, "q_proj")


def test_unknown_keys_are_kept(tmp_path):
    d = {**ModelConfig.from_preset("tiny").to_dict(), "aux_loss_alpha": 0.001, "quantization_config": {"fmt": "e4m3"}}
    cfg = ModelConfig.from_dict(d)
    assert cfg.extra == {"aux_loss_alpha": 0.001, "quantization_config": {"fmt": "e4m3"}}
    assert cfg.to_dict()["aux_loss_alpha"] == 0.001


@pytest.mark.parametrize("change, field", [
    (dict(topk_group=3), "topk_group"),  # > n_group = 2
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),  # > n_routed_experts = 8
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),  # > topk_group (1) x 4 experts per group
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(topk_method="random"), "topk_method"),
    (dict(n_group=3), "n_group"),  # does not divide 8
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(first_k_dense_replace=5), "first_k_dense_replace"),
    (dict(rope_scaling={"type": "longrope"}), "rope_scaling"),
    (dict(rope_scaling={"type": "yarn", "factor": 4}), "rope_scaling"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_invalid_configs_name_the_field(change, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        ModelConfig.from_preset("tiny", **change)


def test_malformed_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="malformed JSON"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": "big"}))
    with pytest.raises(ConfigError, match="'hidden_size'"):
        ModelConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="model_type"):
        ModelConfig.load(tmp_path)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        ModelConfig.from_preset("huge")
