"""A wheel install (not editable) ships what the commands need: the recipes and task mixtures, the chat page."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_an_installed_package_finds_its_recipes_from_any_directory(tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(ROOT)], check=True, capture_output=True, text=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # ahead of the repository's editable install
    check = ("import nanoseek, importlib.resources as r; from nanoseek.pipeline import PipelineConfig; "
             "PipelineConfig.load('demo'); print(nanoseek.__file__); "
             "print(r.files('nanoseek').joinpath('static/chat.html').is_file())")
    out = subprocess.run([sys.executable, "-c", check], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    where, page = out.stdout.split()
    assert Path(where).is_relative_to(site) and page == "True"
    built = subprocess.run([sys.executable, "-m", "nanoseek", "data", "build", "--recipe", "tasks-r1-demo", "--n", "20",
                            "--out", "corpus.jsonl"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-2000:]
    assert len((elsewhere / "corpus.jsonl").read_text().splitlines()) > 0
