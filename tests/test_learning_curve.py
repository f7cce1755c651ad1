"""Learning curves read from runs' metrics: rows trained per evaluation, the CSV round trip, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multiembed.analysis.learning_curve import CURVE_CSV, CURVE_PNG, curve_rows, main, read_curve_csv


def _run(root: Path, name: str, batch: int, aucs) -> Path:
    run = root / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"options": {"batch_size": batch, "model": name, "seed": 0}}))
    lines = [json.dumps({"step": 10 * (i + 1), "val_auc": auc, "val_logloss": 0.5, "train_loss": 0.6})
             for i, auc in enumerate(aucs)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


def test_curve_counts_rows_as_steps_times_the_global_batch_and_round_trips(tmp_path: Path, capsys) -> None:
    small = _run(tmp_path, "dcnv2-se-1x", 1024, [0.70, 0.72])
    wide = _run(tmp_path, "dcnv2-se-10x", 512, [0.69, 0.73, 0.74])
    assert [r["rows"] for r in curve_rows(small)] == [10240, 20480]
    assert main([str(small), str(wide), "--out", str(tmp_path / "out"), "--bayes-val-auc", "0.82"]) == 0
    rows = read_curve_csv(tmp_path / "out" / CURVE_CSV)
    assert [(r["run"], r["rows"], r["val_auc"]) for r in rows][2:] == [
        ("dcnv2-se-10x", 5120, 0.69), ("dcnv2-se-10x", 10240, 0.73), ("dcnv2-se-10x", 15360, 0.74)]
    assert all(r["bayes_val_auc"] == pytest.approx(0.82) for r in rows)
    assert (tmp_path / "out" / CURVE_PNG).stat().st_size > 1000


def test_a_bad_metrics_line_is_one_line_naming_file_and_line(tmp_path: Path, capsys) -> None:
    run = _run(tmp_path, "r", 8, [0.7])
    with open(run / "metrics.jsonl", "a") as f:
        f.write("{not json\n")
    assert main([str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "metrics.jsonl: line 2: not JSON" in err and "\n" not in err
