"""The stacks comparison's plumbing: the environments it runs, the metrics it reads, its refusal and summary."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multiembed.benchmarks import compare_stacks
from multiembed.data.metrics import roc_auc

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("stack", ["cpu", "cpu-2.14", "gpu"])
def test_each_stack_runs_in_the_environment_the_makefile_builds(stack: str) -> None:
    out = subprocess.run(["make", "-n", "-B", "venv", f"STACK={stack}"], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    venv = compare_stacks.venv_of(stack).relative_to(ROOT)
    assert f"test -x {venv}/bin/python || python3 -m venv {venv}\n" in out
    assert f"-r requirements/{stack}.txt" in out


def test_makefile_refuses_an_unknown_stack() -> None:
    proc = subprocess.run(["make", "-n", "venv", "STACK=cpu-2.99"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode != 0 and "unknown STACK=cpu-2.99" in proc.stderr and "cpu-2.14" in proc.stderr


def test_predictions_metrics_read_the_predict_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500).astype(np.float32)
    probs = np.clip(0.3 * labels + rng.uniform(0, 0.7, 500), 1e-3, 1 - 1e-3).astype(np.float32)
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"row": np.arange(500), "prob": probs, "label": labels}), path)
    got = compare_stacks.predictions_metrics(path)
    assert got["rows"] == 500
    assert got["auc"] == pytest.approx(roc_auc(labels.astype(np.float64), probs.astype(np.float64)))
    expected_loss = -np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs))
    assert got["logloss"] == pytest.approx(float(expected_loss), rel=1e-5)


def test_a_missing_environment_is_refused_by_name(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        compare_stacks.main(["--stacks", "cpu,cpu-9.99", "--work", str(tmp_path), "--raw", "x", "--json",
                             str(tmp_path / "o.json")])
    assert exit_info.value.code == 2
    assert "cpu-9.99" in capsys.readouterr().err


def test_summary_names_every_stack_and_measurement() -> None:
    record = {
        "train": {"cpu": {"test_auc": 0.76, "gap_to_bayes": 0.017, "wall_s": 300.0}},
        "cross_stack": [{"made_by": "cpu", "run_by": "cpu-2.14", "evaluate_test_auc": 0.76,
                         "predict": {"auc": 0.7599}}],
        "bench_predict": {"cpu-2.14": {"results": [{"batch": 1, "p50_ms": 0.5, "p99_ms": 1.0,
                                                     "predictions_per_s_per_core": 2000.0}]}},
        "bench": {"cpu": [{"samples_per_s": 6000.0}, {"samples_per_s": 6100.0}]},
        "parity": {"cpu-2.14": {"runs": 15, "mean_test_auc": 0.72, "effects": [
            {"metric": "test_auc", "diff": {"mean": 0.0001, "ci95": [-0.001, 0.0012]}, "pairs": 15}]}},
    }
    lines = compare_stacks.summary_lines(record)
    assert lines == [
        "[train] cpu: test AUC 0.76000, gap to Bayes 0.01700, 300 s",
        "[cross] made by cpu, run by cpu-2.14: evaluate AUC 0.760000, predict AUC 0.759900",
        "[predict] cpu-2.14: batch 1: p50 0.500 ms, p99 1.000 ms, 2000 pred/s/core",
        "[bench] cpu: 6000, 6100 samples/s",
        "[parity] cpu-2.14: 15 runs, mean test AUC 0.72000; vs first stack: test_auc +0.00010 [-0.00100, +0.00120] "
        "over 15 pairs",
    ]
