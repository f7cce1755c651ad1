"""The days study (``multiembed days-study``): several day datasets read as one training split, the paired
differences and verdicts of the report (by hand), and the command at a tiny size: three arms that agree where they
are the same model, a retrain run over two days without re-converting them, resuming without training again, and a
rerun with other options refused in one line."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import List

import numpy as np
import pytest

from multiembed.analysis.days_compare import (
    Difference,
    arm_differences,
    format_markdown,
    model_differences,
    plot_days_study,
    read_csv,
    verdict,
    write_csv,
)
from multiembed.analysis.scaling import t_critical
from multiembed.cli import main as cli_main
from multiembed.data.metadata import DatasetError
from multiembed.data.synthetic.days import day_dirs

ROWS_PER_DAY = 3000
TINY = ["--batch-size", "256", "--sharding", "table_wise", "--hidden", "32", "--sparse-lr", "0.1", "--lr", "3e-3",
        "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def log3(tmp_path_factory) -> List[Path]:
    """Three days of a drifting log."""
    out = tmp_path_factory.mktemp("days") / "log"
    assert cli_main(["synth", "--days", "3", "--rows", str(ROWS_PER_DAY), "--out", str(out), "--seed", "4",
                     "--scale", "0.001", "--churn", "0.2", "--no-progress"]) == 0
    return day_dirs(out, 3)


# -------------------------------------------------------------------------------------- several days, one split
def test_the_loader_reads_several_days_as_one_shuffled_split(log3: List[Path]) -> None:
    from multiembed.data.loader import ParquetBatchLoader

    one = [ParquetBatchLoader(day, "train", 100, shuffle=False, last_batch="keep", prefetch=0) for day in log3[:2]]
    both = ParquetBatchLoader(log3[1], "train", 100, shuffle=True, seed=2, last_batch="keep", prefetch=0,
                              extra_data=[log3[0]])
    assert both.num_rows == 2 * 2400
    # Row n of the combined split is row n of the first dataset, then of the next.
    labels = np.concatenate([np.concatenate([b.labels.numpy() for b in loader]) for loader in (one[1], one[0])])
    rows, _ = both.epoch_rows(0)
    assert sorted(rows.tolist()) == list(range(4800))
    shuffled = np.concatenate([b.labels.numpy() for b in both])
    assert np.array_equal(shuffled, labels[rows])
    # One permutation over both: rows of each day are spread over the whole epoch.
    assert 0.3 < float(np.mean(rows[:2400] >= 2400)) < 0.7


def test_days_of_another_id_space_do_not_form_one_split(log3: List[Path], tmp_path: Path) -> None:
    from multiembed.data.loader import ParquetBatchLoader

    other = tmp_path / "other"
    assert cli_main(["synth", "--rows", "500", "--out", str(other), "--scale", "0.002", "--no-progress"]) == 0
    with pytest.raises(DatasetError, match=rf"^{other / 'metadata.json'}: vocab_fingerprint: another id space than "):
        ParquetBatchLoader(log3[0], "train", 100, extra_data=[other])


# ------------------------------------------------------------------------------------------- the report, by hand
def _rows() -> List[dict]:
    """Two models, three seeds, three arms, days 1-3; incremental beats retrain by 0.01 + 0.001 * seed on days 2..,
    frozen is 0.02 lower; ME beats SE by exactly 0.003 everywhere."""
    rows = []
    for model, shift in (("dnn-me-2x", 0.003), ("dnn-se-2x", 0.0)):
        for seed in range(3):
            for day in (1, 2, 3):
                base = 0.7 + 0.01 * day + 0.002 * seed + shift
                arms = {"incremental": base, "retrain": base - (0.01 + 0.001 * seed if day >= 2 else 0.0),
                        "frozen": base - (0.02 if day >= 2 else 0.0)}
                for arm, auc in arms.items():
                    rows.append({"model": model, "seed": seed, "arm": arm, "day": day, "trained_days": day,
                                 "trained_rows": 100 * day, "pv_auc": auc, "pv_logloss": 0.5,
                                 "bayes_pv_auc": 0.8})
    return rows


def test_paired_differences_and_their_intervals_by_hand() -> None:
    rows = _rows()
    arms = {(d.first, d.second, d.within, d.day): d for d in arm_differences(rows)}
    # Days 1.. are never compared between arms: day 1's model is the same in every arm.
    assert {key[3] for key in arms} == {2, 3, None}
    d = arms[("incremental", "retrain", "dnn-me-2x", 2)]
    diffs = [0.010, 0.011, 0.012]
    half = t_critical(0.95, 2) * float(np.std(diffs, ddof=1)) / math.sqrt(3)
    assert d.seeds == (0, 1, 2) and d.mean == pytest.approx(0.011)
    assert (d.low, d.high) == (pytest.approx(0.011 - half), pytest.approx(0.011 + half))
    over = arms[("incremental", "retrain", "dnn-me-2x", None)]
    assert over.mean == pytest.approx(0.011) and over.excludes_zero
    frozen = arms[("incremental", "frozen", "dnn-se-2x", None)]
    assert frozen.mean == pytest.approx(0.02) and frozen.low == pytest.approx(0.02)  # no spread: a zero-width interval
    models = {(d.within, d.day): d for d in model_differences(rows)}
    assert set(models) == {(arm, day) for arm in ("incremental", "retrain", "frozen") for day in (1, 2, 3, None)}
    assert all(d.first == "dnn-me-2x" and d.second == "dnn-se-2x" and d.mean == pytest.approx(0.003)
               for d in models.values())


def test_verdicts_say_plainly_whether_an_interval_excludes_zero() -> None:
    def diff(mean: float, low, high) -> Difference:
        return Difference("dnn-me-2x", "dnn-se-2x", "incremental", None, (0, 1, 2), mean, low, high, 0.95)

    assert verdict(diff(0.002, -0.001, 0.005)) == (
        "dnn-me-2x - dnn-se-2x (incremental): +0.0020, interval [-0.0010, +0.0050] includes 0: no difference shown.")
    assert verdict(diff(-0.003, -0.005, -0.001)).endswith(": dnn-me-2x is lower.")
    assert verdict(diff(0.003, None, None)).endswith("from 3 seed(s), no interval.")


def test_the_report_and_plot_are_rebuilt_from_the_csv(tmp_path: Path) -> None:
    rows = _rows()
    write_csv(rows, tmp_path / "days_study.csv")
    again = read_csv(tmp_path / "days_study.csv")
    assert again == rows
    text = format_markdown(again, notes=["days: x"])
    assert "| dnn-me-2x | incremental | 3 | 0.7150 | 0.7250 | 0.7350 |" in text
    assert "| Bayes-optimal | | | 0.8000 | 0.8000 | 0.8000 |" in text
    assert "- incremental - retrain (dnn-me-2x): +0.0110, interval" in text and "incremental is higher." in text
    series = plot_days_study(again, tmp_path / "days_study.png")
    assert series["dnn-se-2x"]["frozen"]["pv_auc"] == pytest.approx([0.712, 0.702, 0.712])
    assert (tmp_path / "days_study.png").stat().st_size > 0


# ---------------------------------------------------------------------------------------------- the command
@pytest.mark.slow
def test_the_days_study_at_a_tiny_size(log3: List[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    command = ["days-study", "--data", *map(str, log3), "--out", str(out), "--models", "dnn-me-2x,dnn-se-2x",
               "--seeds", "1", *TINY]
    assert cli_main(command) == 0
    rows = read_csv(out / "days_study.csv")
    assert len(rows) == 2 * 3 * 2
    by = {(r["model"], r["arm"], r["day"]): r for r in rows}
    for model in ("dnn-me-2x", "dnn-se-2x"):
        loop = json.loads((out / f"{model}-seed0" / "incremental" / "summary.json").read_text())["days"]
        # The incremental arm is the loop's progressive validation.
        assert [by[(model, "incremental", d)]["pv_auc"] for d in (1, 2)] == [loop[1]["pv_auc"], loop[2]["pv_auc"]]
        # Day 1: one model (day 0's) in every arm, judged alike.
        assert by[(model, "frozen", 1)]["pv_auc"] == pytest.approx(loop[1]["pv_auc"], abs=1e-9)
        assert by[(model, "retrain", 1)]["pv_auc"] == by[(model, "frozen", 1)]["pv_auc"]
        # Day 2: retrained from scratch on days 0 and 1 read as one split (not converted again), one pass.
        retrain = out / f"{model}-seed0" / "retrain" / "days-000-001"
        config = json.loads((retrain / "config.json").read_text())
        assert config["data"]["dir"] == str(log3[1].resolve())
        assert config["data"]["extra_train"] == [str(log3[0].resolve())]
        steps = json.loads((retrain / "summary.json").read_text())["steps"]
        assert steps == 2 * 2400 // 256 and by[(model, "retrain", 2)]["trained_rows"] == steps * 256
        assert by[(model, "retrain", 2)]["pv_auc"] != by[(model, "incremental", 2)]["pv_auc"]
        # Frozen: day 0's model, as far from day 2 as the log drifted; better than chance.
        assert by[(model, "frozen", 2)]["trained_days"] == 1 and by[(model, "frozen", 2)]["pv_auc"] > 0.55
    text = (out / "days_study.md").read_text()
    assert "## Verdicts (mean over days)" in text and "- dnn-me-2x - dnn-se-2x (incremental): " in text
    assert (out / "days_study.png").stat().st_size > 0

    # A rerun trains and evaluates nothing again and writes the same rows.
    written = [*out.rglob("judged/*.json"), *out.rglob("metrics.jsonl"), *out.rglob("checkpoints/*")]
    assert len(written) > 10
    stamps = {p: p.stat().st_mtime_ns for p in written}
    capsys.readouterr()
    assert cli_main(command) == 0
    assert "retraining from scratch" not in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert read_csv(out / "days_study.csv") == rows

    # Other training options on the same study are refused in one line.
    other = [*command]
    other[other.index("3e-3")] = "1e-2"
    assert cli_main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"multiembed days-study: error: --lr is 0.01 but the study in {out} used 0.003 "
                   f"({out / 'study.json'}); use another --out"]


def test_the_days_study_refuses_too_few_or_unordered_days_in_one_line(log3: List[Path], tmp_path: Path,
                                                                      capsys) -> None:
    out = tmp_path / "study"
    assert cli_main(["days-study", "--data", str(log3[0]), "--out", str(out), *TINY]) == 2
    assert cli_main(["days-study", "--data", str(log3[0]), str(log3[2]), "--out", str(out), *TINY]) == 2
    assert cli_main(["days-study", "--data", *map(str, log3[:2]), "--out", str(out), "--models", "dnn-me-2x,nope",
                     *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("multiembed days-study: error: ") for line in err)
    assert err[0].endswith("a days study judges every day after the first; give at least 2 days, got 1")
    assert "day 2 given after day 0" in err[1] and "nope" in err[2]
    assert not out.exists()
