import json
import subprocess
import sys

from nanoseek import ModelConfig, Transformer
from nanoseek.cli import main


def test_info_v3_json(capsys):
    assert main(["info", "--preset", "v3-671b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["total"] == 671_026_419_200
    assert round(info["params"]["activated"] / 1e9, 2) == 37.55
    assert round(info["params"]["mtp_total"] / 1e9, 1) == 11.6
    assert info["kv_cache_per_token"]["mla_bytes"] == 70_272


def test_info_table_names_the_figures(capsys):
    assert main(["info", "--preset", "v3-671b"]) == 0
    out = capsys.readouterr().out
    assert "671,026,419,200" in out and "70,272 B" in out


def test_info_counts_a_saved_model_exactly(tmp_path, capsys):
    model = Transformer(ModelConfig.from_preset("tiny"))
    model.save_pretrained(tmp_path / "model")
    n = model.num_parameters() + sum(b.numel() for name, b in model.named_buffers() if name.endswith("correction_bias"))
    assert main(["info", "--model", str(tmp_path / "model"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"]["total"] + info["params"]["mtp_total"] == n


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    assert main(["info", "--preset", "v9"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "v9" in err and "Traceback" not in err
    (tmp_path / "config.json").write_text("{not json")
    assert main(["info", "--model", str(tmp_path)]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["info", "--model", str(tmp_path / "missing")]) == 2


def test_console_entry_point_exit_code():
    r = subprocess.run([sys.executable, "-m", "nanoseek.cli", "info", "--preset", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "error:" in r.stderr and "Traceback" not in r.stderr
