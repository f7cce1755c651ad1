"""The parity harness (benchmarks/parity.py) at a tiny size on real Criteo rows: both sides train on the
same splits, the JSON holds the paired table, and a second invocation reruns nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from multiembed.benchmarks import parity

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SAMPLE = SHARED / "criteo_dac_deepctr_sample_200.txt"


def test_recipe_parsing_and_statistics() -> None:
    recipe = parity.parse_recipe(["table_optimizer=adagrad", "batch_size=256", "drop_last=1", "table_lr=0.01"])
    assert recipe.differences() == {"table_optimizer": "adagrad", "batch_size": 256, "drop_last": True,
                                    "table_lr": 0.01}
    assert parity.ReferenceRecipe().differences() == {}
    with pytest.raises(ValueError):
        parity.parse_recipe(["no_such_field=1"])
    with pytest.raises(ValueError):
        parity.parse_recipe(["table_optimizer=sgd"])
    stats = parity.mean_interval([1.0, 2.0, 3.0])
    assert stats["mean"] == 2.0 and stats["sd"] == 1.0
    assert stats["ci95"] == pytest.approx([2.0 - 4.303 / math.sqrt(3), 2.0 + 4.303 / math.sqrt(3)])
    # sklearn's definition: ties count half
    import numpy as np

    from multiembed.data.metrics import roc_auc

    assert roc_auc(np.array([0.0, 0.0, 1.0, 1.0]) > 0.5, np.array([0.1, 0.4, 0.4, 0.8])) == 0.875


@pytest.mark.skipif(not SAMPLE.is_file(), reason=f"real Criteo rows not available ({SAMPLE} missing: ../shared/data)")
def test_both_sides_same_splits_paired_json(tmp_path: Path) -> None:
    work, out = tmp_path / "work", tmp_path / "parity.json"
    argv = [
        "--raw", str(SAMPLE), "--work", str(work), "--models", "dcnv2-se-1x", "--seeds", "1", "--folds", "2",
        "--reference", "batch_size=32", "max_epochs=1", "hidden=16",
        "--package-args", "--batch-size 32 --epochs 1 --hidden 16 --ia-every 0",
        "--tag", "tiny", "--json", str(out),
    ]
    assert parity.main(argv) == 0
    record = json.loads(out.read_text())
    runs = record["runs"]
    assert sorted((r["side"], r["fold"]) for r in runs) == [
        ("package", "0/2"), ("package", "1/2"), ("reference", "0/2"), ("reference", "1/2")]
    for fold in ("0/2", "1/2"):
        ref, pkg = (next(r for r in runs if r["side"] == s and r["fold"] == fold) for s in ("reference", "package"))
        # the same converted dataset, the same split, the same rows evaluated
        assert ref["data_dir"] == pkg["data_dir"] and ref["split_identity"] == pkg["split_identity"]
        assert ref["val_rows"] == pkg["val_rows"] == 50 and ref["test_rows"] == pkg["test_rows"] == 50
        assert ref["rows"] == {"train": 100, "val": 50, "test": 50}
        assert "--batch-size 32" in pkg["command"] and pkg["options"]["batch_size"] == 32
        # the run's config.json departs from the certified recipe exactly where --package-args moved it
        assert pkg["recipe_departures"] == {"options.batch_size": [2048, 32], "options.epochs": [10, 1],
                                            "options.hidden": [400, 16]}
        assert ref["recipe"]["batch_size"] == 32 and ref["recipe"]["table_optimizer"] == "adam"
    # the two folds hold different held-out rows
    assert runs[0]["split_identity"] != next(r for r in runs if r["fold"] != runs[0]["fold"])["split_identity"]
    table = {(row["model"], row["metric"]): row for row in record["table"]}
    assert set(table) == {("dcnv2-se-1x", m) for m in parity.METRICS}
    for metric in parity.METRICS:
        row = table[("dcnv2-se-1x", metric)]
        assert row["pairs"] == 2 and row["folds"] == 2 and "diff_by_fold" in row
        pairs = [(next(r for r in runs if r["side"] == "package" and r["fold"] == f)[metric]
                  - next(r for r in runs if r["side"] == "reference" and r["fold"] == f)[metric]) for f in ("0/2", "1/2")]
        assert row["diff"]["mean"] == pytest.approx(sum(pairs) / 2)
        lo, hi = row["diff"]["ci95"]
        assert lo <= row["diff"]["mean"] <= hi
    assert "| dcnv2-se-1x | test_auc |" in parity.format_table(record["table"])

    # resumable: a second invocation finds every run finished and trains nothing
    before = {p: p.stat().st_mtime_ns for p in work.rglob(parity.RESULT_FILE)}
    assert len(before) == 4
    assert parity.main(argv + ["--baseline-tag", "tiny"]) == 0
    assert {p: p.stat().st_mtime_ns for p in work.rglob(parity.RESULT_FILE)} == before
    again = json.loads(out.read_text())
    assert again["table"] == record["table"]
    # a configuration's own runs have no effect against themselves
    assert again["effects"] == []

    # --reference-tag: a package-side configuration paired with the reference runs already made under another tag
    other = tmp_path / "other.json"
    assert parity.main([*argv[:-4], "--tag", "other", "--reference-tag", "tiny", "--sides", "reference",
                        "--json", str(other)]) == 0
    assert {p: p.stat().st_mtime_ns for p in work.rglob(parity.RESULT_FILE)} == before  # nothing trained
    shared = json.loads(other.read_text())
    assert shared["reference_tag"] == "tiny" and sorted(r["fold"] for r in shared["runs"]) == ["0/2", "1/2"]
    assert all(r["side"] == "reference" and r["tag"] == "tiny" for r in shared["runs"])

    # a package-side factor (--dropout 0) on fold 0, paired with the baseline's run of the same fold and seed; the
    # reused reference runs are the baseline's own and show no effect
    factor = tmp_path / "factor.json"
    package_args = argv[argv.index("--package-args") + 1] + " --dropout 0"
    moved = [*argv[:-4], "--package-args", package_args, "--tag", "dropout0", "--reference-tag", "tiny",
             "--baseline-tag", "tiny", "--fold-list", "0", "--json", str(factor)]
    assert parity.main(moved) == 0
    effect = json.loads(factor.read_text())
    (mine,) = [r for r in effect["runs"] if r["side"] == "package"]
    (base,) = [r for r in runs if r["side"] == "package" and r["fold"] == "0/2"]
    assert mine["recipe_departures"]["options.dropout"] == [0.2, 0.0]
    assert {(e["side"], e["metric"]) for e in effect["effects"]} == {("package", m) for m in parity.METRICS}
    for e in effect["effects"]:
        assert e["pairs"] == 1 and e["diff"]["mean"] == pytest.approx(mine[e["metric"]] - base[e["metric"]])


def fake_run(side: str, model: str, fold: str, seed: int, test_auc: float) -> dict:
    return {"side": side, "model": model, "fold": fold, "seed": seed, "split_identity": fold, "data_dir": fold,
            "val_auc": 0.7, "test_auc": test_auc, "val_logloss": 0.5, "test_logloss": 0.5}


@pytest.mark.parametrize("differs", ["split_identity", "data_dir"])
def test_a_pair_trained_on_different_splits_is_refused(differs: str) -> None:
    """Two sides of one (model, fold, seed) whose split identity or dataset differ are not a pair."""
    runs = [fake_run("reference", "dcnv2-se-4x", "0/2", 0, 0.72), fake_run("package", "dcnv2-se-4x", "0/2", 0, 0.72)]
    assert parity.paired_table(runs, ["dcnv2-se-4x"])[0]["pairs"] == 1
    runs[1] = {**runs[1], differs: "another"}
    with pytest.raises(ValueError, match=r"pair \('dcnv2-se-4x', '0/2', 0\): the two sides trained on different splits"):
        parity.paired_table(runs, ["dcnv2-se-4x"])


def test_rule_verdicts_and_model_contrasts_from_paired_runs() -> None:
    runs = []
    for fold in ("0/2", "1/2"):
        for seed in range(3):
            base = 0.72 + 0.001 * seed + (0.002 if fold == "1/2" else 0.0)
            runs.append(fake_run("reference", "dcnv2-se-4x", fold, seed, base))
            runs.append(fake_run("package", "dcnv2-se-4x", fold, seed, base - 0.001 + 0.0002 * seed))  # close
            runs.append(fake_run("reference", "dcnv2-me-4x", fold, seed, base))
            runs.append(fake_run("package", "dcnv2-me-4x", fold, seed, base - 0.004))  # behind: mean -0.004
    rows = parity.paired_table(runs, ["dcnv2-se-4x", "dcnv2-me-4x"])
    verdicts = {v["model"]: v for v in parity.rule_verdicts(rows)}
    assert set(verdicts) == {"dcnv2-se-4x", "dcnv2-me-4x"}
    se, me = verdicts["dcnv2-se-4x"], verdicts["dcnv2-me-4x"]
    assert se["mean"] == pytest.approx(-0.0008) and se["passes"] and se["passes_by_fold"]
    assert me["mean"] == pytest.approx(-0.004) and not me["passes"] and not me["passes_by_fold"]
    assert me["lower"] == pytest.approx(-0.004)  # every pair differs by exactly -0.004: a zero-width interval

    contrasts = {(c["side"], c["metric"]): c for c in parity.model_contrasts(runs, "dcnv2-me-4x", "dcnv2-se-4x")}
    assert contrasts[("reference", "test_auc")]["diff"]["mean"] == pytest.approx(0.0)
    package = contrasts[("package", "test_auc")]
    assert package["pairs"] == 6 and package["diff"]["mean"] == pytest.approx(-0.004 + 0.001 - 0.0002)
    assert package["diff_by_fold"]["n"] == 2
    # pairs need both models on the same split and seed: a lone run is left out
    lone = runs + [fake_run("package", "dcnv2-me-4x", "0/2", 9, 0.5)]
    assert parity.model_contrasts(lone, "dcnv2-me-4x", "dcnv2-se-4x")[4]["pairs"] == 6


def test_train_defaults_on_cpu_are_the_certified_parity_recipe() -> None:
    """``multiembed train`` with no tuning options resolves, on CPU, to the recipe the parity protocol
    measured (a test of the configuration, not of the AUC). If this fails, a default changed: run the parity protocol
    again before updating ``parity.CERTIFIED_CPU_RECIPE``."""
    import argparse
    import dataclasses

    from multiembed.cli import train as train_cli
    from multiembed.config import TrainConfig, from_arguments
    from multiembed.training.build import optimizer_config

    def train_config_from_args(words):
        """TrainConfig as ``multiembed train WORDS`` builds it (the CLI's own parser)."""
        parser = argparse.ArgumentParser()
        train_cli.register(parser.add_subparsers())
        return from_arguments(TrainConfig, parser.parse_args(["train", *words]))

    config = train_config_from_args(["--data", "D", "--out", "R", "--model", "dcnv2-me-4x"])
    recorded = {"options": dataclasses.asdict(config),
                "optimizer": dataclasses.asdict(optimizer_config(config, "cpu"))}
    assert parity.recipe_departures(recorded) == {}
    moved = train_config_from_args(["--data", "D", "--out", "R", "--model", "dcnv2-me-4x", "--sparse-lr", "0.01"])
    assert parity.recipe_departures({"options": dataclasses.asdict(moved),
                                     "optimizer": dataclasses.asdict(optimizer_config(moved, "cpu"))}) == {
        "optimizer.sparse_lr": [0.05, 0.01]}
