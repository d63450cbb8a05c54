import pytest

from nanoseek import ModelConfig, Transformer
from nanoseek.cost import kv_cache_bytes_per_token, param_counts


def test_v3_figures():
    cfg = ModelConfig.from_preset("v3-671b")
    p = param_counts(cfg)
    assert p.total == 671_026_419_200
    assert round(p.activated / 1e9, 2) == 37.55
    assert round(p.activated_without_embedding / 1e9, 1) == 36.6
    assert round(p.mtp_total / 1e9, 1) == 11.6
    assert kv_cache_bytes_per_token(cfg)["mla_bytes"] == 70_272
    assert kv_cache_bytes_per_token(cfg)["mha_values"] == 128 * (192 + 128) * 61


def test_v2_lite_total():
    assert round(param_counts(ModelConfig.from_preset("v2-lite")).total / 1e9, 1) == 15.7


@pytest.mark.parametrize("overrides", [
    {}, dict(q_lora_rank=None), dict(n_shared_experts=2, first_k_dense_replace=0), dict(tie_word_embeddings=True),
    dict(scoring_func="softmax", topk_method="greedy"), dict(num_nextn_predict_layers=2),
])
def test_counts_match_instantiated_model(overrides):
    cfg = ModelConfig.from_preset("tiny", **overrides)
    model = Transformer(cfg)
    p = param_counts(cfg)
    params = dict(model.named_parameters())
    buffers = {n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    main = sum(t.numel() for n, t in {**params, **buffers}.items() if not n.startswith("mtp."))
    mtp = sum(t.numel() for n, t in {**params, **buffers}.items() if n.startswith("mtp."))
    assert (p.total, p.mtp_total) == (main, mtp)
    # activated = total - the (E - K_r) routed experts a token skips in each MoE layer
    skipped = cfg.n_moe_layers * (cfg.n_routed_experts - cfg.num_experts_per_tok) * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    assert p.activated == p.total - skipped
