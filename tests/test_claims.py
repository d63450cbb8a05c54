import json

import pytest

from nanoseek import ModelConfig
from nanoseek.claims import (CONSISTENT, INCONSISTENT, MEASURABLE, UNCHECKABLE, claims, format_claims,
                             measurements)
from nanoseek.cli import main as cli
from nanoseek.errors import NanoseekError


def by_key(items):
    return {c.key: c for c in items}


def test_every_claim_has_a_source_a_verdict_and_a_reason():
    items = claims()
    assert len(items) >= 15 and len({c.key for c in items}) == len(items)
    for c in items:
        assert c.claim and c.source and c.computed and c.reason
        assert c.verdict in (CONSISTENT, INCONSISTENT, UNCHECKABLE)
    assert {c.verdict for c in items} == {CONSISTENT, INCONSISTENT, UNCHECKABLE}
    json.dumps([c.numbers for c in items])


def test_the_cost_table_and_its_rates():
    c = by_key(claims())
    assert c["cost_table"].numbers["gpu_hours"] == 2_788_000 and c["cost_table"].numbers["dollars"] == 5_576_000
    assert c["cost_table"].numbers["stage_dollars"] == {"pre-training": 5_328_000, "context extension": 238_000,
                                                       "post-training": 10_000}
    assert round(c["per_trillion"].numbers["days_per_trillion"], 1) == 3.7
    assert round(c["cluster_time"].numbers["days"]["all stages"], 1) == 56.7
    assert round(c["pretraining_mfu"].numbers["mfu"]["bf16"], 3) == 0.407
    assert round(c["context_extension"].numbers["mfu"], 3) == 0.248
    assert c["r1_cost"].numbers["gpu_hours"] == 512 * (198 + 80) + 5000
    assert all(c[k].verdict == CONSISTENT for k in ("cost_table", "per_trillion", "cluster_time", "pretraining_mfu",
                                                     "context_extension", "parameters", "mla_v2_kv", "r1_cost"))


def test_the_popular_readings():
    c = by_key(claims())
    assert round(c["llama_1pct"].numbers["ratio"]["gpu_hours"], 3) == 0.090 and c["llama_1pct"].verdict == INCONSISTENT
    assert c["fp8_memory"].verdict == INCONSISTENT  # 50% against BF16, not 75%
    assert c["gaming_gpus"].numbers["min_gpus"]["rtx4090"]["4bit"] == 14 and c["gaming_gpus"].verdict == INCONSISTENT
    assert round(c["api_price"].numbers["cheaper"]["output"], 3) == 0.964 and c["api_price"].verdict == CONSISTENT
    assert round(c["mla_v2_kv"].numbers["reduction"]["6-bit"], 3) == 0.933
    assert round(c["mla_v2_kv"].numbers["reduction"]["bf16"], 3) == 0.822
    assert c["mla_gqa_groups"].numbers["kv_bytes_per_token"]["mla_bytes"] == 70_272


def test_a_wrong_config_breaks_the_checks():
    good = by_key(claims())
    fewer_active = by_key(claims(cfg=ModelConfig.from_preset("v3-671b", num_experts_per_tok=4)))
    assert fewer_active["pretraining_mfu"].numbers["mfu"]["bf16"] < good["pretraining_mfu"].numbers["mfu"]["bf16"]
    assert fewer_active["parameters"].verdict == INCONSISTENT  # 37B activated no longer holds
    half_experts = by_key(claims(cfg=ModelConfig.from_preset("v3-671b", n_routed_experts=128, n_group=4)))
    assert half_experts["parameters"].verdict == INCONSISTENT
    wide_cache = by_key(claims(cfg=ModelConfig.from_preset("v3-671b", kv_lora_rank=1024)))
    assert wide_cache["mla_gqa_groups"].verdict == INCONSISTENT


@pytest.fixture
def run_dir(tmp_path):
    """A pipeline run: a pretrain stage with MaxVio falling, an evaluation with MTP speculation, an FP8 benchmark."""
    stage = tmp_path / "run" / "pretrain"
    stage.mkdir(parents=True)
    rows = [{"step": i, "maxvio_mean": 2.0 if i <= 10 else 0.2} for i in range(1, 41)]
    (stage / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (stage / "eval.json").write_text(json.dumps({"accuracy": 0.5, "acceptance_rate": 0.8, "problems": "held-out"}))
    fp8 = tmp_path / "fp8.json"
    fp8.write_text(json.dumps({"preset": "small", "steps": 150, "relative_loss_difference": 0.0012}))
    return tmp_path / "run", fp8


def test_our_measurements_sit_beside_the_claims(run_dir):
    run, fp8 = run_dir
    found = measurements([run, fp8])
    assert found["maxvio"][0]["first"] == 2.0 and found["maxvio"][0]["last"] == pytest.approx(0.2)
    assert found["mtp_acceptance"][0]["value"] == 0.8
    c = by_key(claims(found))
    assert "80.0% of drafts accepted" in c["mtp_speculation"].measured
    assert "+0.12% relative loss" in c["fp8_loss"].measured
    assert "MaxVio 2.00 over the first 10 of 40 steps, 0.20 over the last 10" in c["balance"].measured
    assert c["cost_table"].measured is None
    text = format_claims(claims(found))
    assert text.count("\n  ours: ") == len(MEASURABLE)
    assert "not measured" in format_claims(claims(), markdown=True)


def test_measurements_reject_what_they_cannot_read(tmp_path):
    (tmp_path / "other.json").write_text(json.dumps({"accuracy": 0.5}))
    with pytest.raises(NanoseekError, match="other.json: none of acceptance_rate"):
        measurements([tmp_path / "other.json"])
    with pytest.raises(NanoseekError, match="no metrics.jsonl with MaxVio"):
        measurements([tmp_path])
    with pytest.raises(NanoseekError, match="expected a run directory"):
        measurements([tmp_path / "missing"])


def test_cli_claims(run_dir, capsys):
    assert cli(["claims"]) == 0
    out = capsys.readouterr().out
    assert "[consistent] $5.576M" in out and "arXiv 2412.19437" in out and "40.7%" in out
    assert cli(["claims", "--markdown", "--run", str(run_dir[0])]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| claim | source |") and "80.0% of drafts accepted" in out
    assert cli(["claims", "--json"]) == 0
    assert {"cost_table", "mtp_speculation", "api_price"} <= {c["key"] for c in json.loads(capsys.readouterr().out)}
    assert cli(["claims", "--run", str(run_dir[0] / "nothing")]) == 2
    assert capsys.readouterr().err.startswith("error:")
