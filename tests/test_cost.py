import json

import pytest

from nanoseek import ModelConfig, Transformer
from nanoseek.cli import main as cli
from nanoseek.cost import (format_run_cost, kv_cache_bytes_per_token, param_counts, quantity, run_cost, serving_memory,
                           training_cost, training_flops)
from nanoseek.errors import NanoseekError
from nanoseek.gpus import GPUS, get_gpu


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


# ---- training cost, serving memory, runs ---------------------------------------------------------------------------
def test_v3_training_flops_are_6n_plus_attention_plus_mtp():
    f = training_flops(ModelConfig.from_preset("v3-671b"), 14.8e12, 4096)
    per = f["per_token"]
    assert f["activated_matmul_params"] == 36_624_596_992
    assert per["matmul"] == 6 * 36_624_596_992
    assert per["attention"] == 3 * 2 * 128 * (192 + 128) * 2048.5 * 61  # 3 x (QK^T + AV) over (4096 + 1) / 2 keys
    assert round(per["total"] / 1e9, 2) == 260.65
    assert round(f["total"] / 1e24, 3) == 3.858


def test_v3_claimed_gpu_hours_imply_its_mfu_and_dollars():
    t = training_cost(ModelConfig.from_preset("v3-671b"), 14.8e12, "h800", gpu_hours=2.664e6, n_gpus=2048)
    assert t["dollars"] == 5_328_000  # the report's $2/GPU-hour
    assert round(t["mfu"]["bf16"], 4) == 0.4065 and round(t["mfu"]["fp8"], 4) == 0.2033
    assert round(t["tokens_per_s_per_gpu"]) == 1543 and round(t["days"], 1) == 54.2
    # forwards: that MFU gives back the hours, on every GPU in proportion to its peak
    back = training_cost(ModelConfig.from_preset("v3-671b"), 14.8e12, "h800", mfu=t["mfu"]["bf16"])
    assert back["gpu_hours"] == pytest.approx(2.664e6)
    assert t["by_gpu"]["b200"]["gpu_hours"] == pytest.approx(2.664e6 * 989.5 / 2250)
    assert t["by_gpu"]["a100"]["gpu_hours"] == pytest.approx(2.664e6 * 989.5 / 312)
    measured = training_cost(ModelConfig.from_preset("v3-671b"), 14.8e12, "h800", tokens_per_s=1543.2 * 2048,
                             n_gpus=2048)
    assert measured["gpu_hours"] == pytest.approx(2.664e6, rel=1e-4)


def test_cost_rejects_bad_inputs():
    cfg = ModelConfig.from_preset("tiny")
    for kw in (dict(), dict(mfu=0.4, gpu_hours=10), dict(mfu=1.5), dict(gpu_hours=-1)):
        with pytest.raises(NanoseekError):
            training_cost(cfg, 1e9, "h100", **kw)
    with pytest.raises(NanoseekError, match="A100.*FP8"):
        training_cost(cfg, 1e9, "a100", mfu=0.4, precision="fp8")
    with pytest.raises(NanoseekError, match="unknown GPU 'v100'"):
        get_gpu("v100")
    assert quantity("14.8e12") == quantity("14.8T") == 14.8e12 and quantity("2.664M") == 2.664e6
    with pytest.raises(ValueError):
        quantity("lots")


def test_gpu_table_has_the_required_devices():
    assert {"h800", "h100", "h200", "b200", "a100", "mi300x", "rtx4090", "rtx5090"} <= set(GPUS)
    for g in GPUS.values():
        assert g.source and g.bf16 > 0 and g.memory_gib > 0 and g.price > 0
        assert g.fp8 is None or g.fp8 == pytest.approx(2 * g.bf16, rel=0.01)  # FP8 tensor cores run twice BF16
    assert GPUS["h800"].bf16 == GPUS["h100"].bf16 == 989.5e12 and GPUS["h800"].price == 2.0


def test_v3_serving_memory():
    s = serving_memory(ModelConfig.from_preset("v3-671b"), context=4096, batch=1, gpu="h800")
    assert s["weights_bytes"] == {"bf16": 2 * 671_026_419_200, "fp8": 671_026_419_200, "4bit": 335_513_209_600}
    assert s["kv_cache_bytes"] == {"mla": 70_272 * 4096, "mha": 4_997_120 * 4096}
    assert s["min_gpus"]["fp8"] == {"mla": 8, "mha": 9}  # 671 GB in 80 GiB GPUs; MHA's 20 GB cache needs one more
    assert s["min_gpus_by_type"]["rtx4090"]["4bit"] == 14 and s["min_gpus_by_type"]["h200"]["fp8"] == 5


def _figures(cfg):
    p = param_counts(cfg)
    return {"total": p.total, "activated": p.activated, "kv_bytes": kv_cache_bytes_per_token(cfg)["mla_bytes"],
            "flops": training_flops(cfg, 14.8e12)["total"]}


@pytest.mark.parametrize("overrides, changed", [
    (dict(num_experts_per_tok=7), {"activated", "flops"}),  # one routed expert fewer per token; same model size
    (dict(n_routed_experts=128, n_group=4), {"total", "activated", "flops"}),  # the gate scores every expert
    (dict(kv_lora_rank=256), {"total", "activated", "kv_bytes", "flops"}),
])
def test_a_wrong_config_changes_the_pinned_figures(overrides, changed):
    good, bad = _figures(ModelConfig.from_preset("v3-671b")), _figures(ModelConfig.from_preset("v3-671b", **overrides))
    assert (good["total"], good["activated"], good["kv_bytes"]) == (671_026_419_200, 37_552_297_472, 70_272)
    assert {k for k in good if good[k] != bad[k]} == changed


def _write_stage(path, rows):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _row(step, **kw):
    return {"step": step, "loss": 5.0, "maxvio_mean": 0.5, "tokens": 1000, "seconds": 0.5, "flops_per_token": 1e6,
            "peak_flops": 1e11, **kw}


def test_run_cost_of_a_stage_and_of_a_pipeline(tmp_path):
    _write_stage(tmp_path / "pretrain", [_row(1), _row(2, seconds=1.5)])
    _write_stage(tmp_path / "grpo", [_row(1, reward=0.5, flops_per_token=2e6, peak_flops=2e11)])
    one = run_cost(tmp_path / "pretrain", mfu=0.5)
    s = one["stages"][0]
    assert (s["stage"], s["steps"], s["tokens"], s["seconds"]) == ("pretrain", 2, 2000, 2.0)
    assert s["tokens_per_s"] == 1000 and s["flops"] == 2e9 and s["achieved_flops_per_s"] == 1e9
    assert s["mfu"] == pytest.approx(0.01)  # 1e9 FLOP/s of a 1e11 FLOP/s peak
    assert s["gpus"]["h100"]["hours"] == pytest.approx(2e9 / (0.5 * 989.5e12) / 3600)
    assert s["gpus"]["h100"]["dollars"] == pytest.approx(s["gpus"]["h100"]["hours"] * 2.5)
    both = run_cost(tmp_path, mfu=0.5)
    assert [s["stage"] for s in both["stages"]] == ["pretrain", "grpo"]  # pipeline order, not alphabetical
    t = both["total"]
    assert (t["steps"], t["tokens"], t["seconds"], t["flops"]) == (3, 3000, 2.5, 4e9)
    assert t["mfu"] == pytest.approx(4e9 / (2.0 * 1e11 + 0.5 * 2e11))
    json.dumps(both)
    text = format_run_cost(both)
    assert "| pretrain | 2 | 2,000 | 2.0 s | 1,000 | 2e+09 |" in text and "| total | 3 | 3,000 |" in text
    assert "| H800 SXM |" in text and "RL stages" in text


def test_run_cost_errors_name_the_file(tmp_path):
    with pytest.raises(NanoseekError, match="no metrics.jsonl"):
        run_cost(tmp_path)
    _write_stage(tmp_path / "old", [{"step": 1, "tokens": 10, "seconds": 1.0}])
    with pytest.raises(NanoseekError, match=r"metrics.jsonl:1: no flops_per_token, peak_flops"):
        run_cost(tmp_path / "old")
    (tmp_path / "old" / "metrics.jsonl").write_text("{bad\n" + json.dumps(_row(1)) + "\n")
    with pytest.raises(NanoseekError, match="metrics.jsonl:1: not valid JSON"):
        run_cost(tmp_path / "old")
    (tmp_path / "old" / "metrics.jsonl").write_text(json.dumps(_row(1)) + '\n{"step": 2, "tok')  # killed mid-write
    assert run_cost(tmp_path / "old")["total"]["steps"] == 1


def test_cli_cost(tmp_path, capsys):
    assert cli(["cost", "--preset", "v3-671b", "--tokens", "14.8e12", "--gpu", "h800", "--gpu-hours", "2.664e6"]) == 0
    out = capsys.readouterr().out
    assert "40.7% of the dense BF16 peak" in out and "$5.328M" in out and "70,272 B/token" in out
    assert cli(["cost", "--preset", "v3-671b", "--tokens", "14.8T", "--gpu", "h100", "--mfu", "0.4", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["training"]["mfu"]["bf16"] == pytest.approx(0.4) and d["serving"]["min_gpus"]["fp8"]["mla"] == 8
    _write_stage(tmp_path / "pretrain", [_row(1)])
    assert cli(["cost", "--run", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["tokens"] == 1000
    assert cli(["cost", "--preset", "tiny"]) == 2 and "--tokens" in capsys.readouterr().err
    assert cli(["cost", "--run", str(tmp_path), "--gpu-hours", "5"]) == 2
    assert cli(["cost", "--preset", "tiny", "--tokens", "1e9", "--gpu", "v100"]) == 2
    assert "unknown GPU" in capsys.readouterr().err
