"""The trainer in one process: run directory contents, refusal of an existing run, evaluate and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multiembed.cli import main as cli_main


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    assert cli_main(["synth", "--rows", "3000", "--out", str(out), "--seed", "2", "--scale", "0.001", "--no-progress"]) == 0
    return out


def _train(data: Path, out: Path, *extra: str) -> int:
    return cli_main(
        ["train", "--data", str(data), "--out", str(out), "--model", "dcnv2-me-2x", "--batch-size", "256",
         "--hidden", "32", "--epochs", "2", "--device", "cpu", "--no-progress", *extra]
    )


def test_train_writes_the_run_directory_and_evaluate_reproduces_test_metrics(synthetic: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert _train(synthetic, run) == 0
    summary = json.loads((run / "summary.json").read_text())
    for key in ("val_auc", "test_auc", "test_logloss", "test_ne", "samples_per_s", "embedding_params",
                "dense_params", "bayes_test_auc"):
        assert key in summary, key
    assert summary["test_rows"] == 300 and summary["val_rows"] == 300
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["step"] == summary["steps"]
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["vocab_fingerprint"] and config["provenance"]["versions"]["torchrec"] == "1.8.0"
    capsys.readouterr()
    assert cli_main(["evaluate", str(run), "--data", str(synthetic), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["test_rows"] == 300
    assert result["test_auc"] == pytest.approx(summary["test_auc"], abs=1e-6)
    assert result["test_logloss"] == pytest.approx(summary["test_logloss"], abs=1e-6)


def test_existing_run_directory_is_refused_without_resume(synthetic: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "something").write_text("x")
    assert _train(synthetic, run) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_sparse_adam_on_cpu_is_refused_at_the_cli(synthetic: Path, tmp_path: Path, capsys) -> None:
    assert _train(synthetic, tmp_path / "run", "--sparse-optimizer", "adam") == 2
    assert "Adam needs a GPU" in capsys.readouterr().err
