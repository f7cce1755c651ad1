"""No command writes over what it did not create, nor outside where it may write.

``predict --out`` refuses an existing file without ``--overwrite`` and, even with it, its own inputs and any file
inside a dataset, a run or an artifact; ``export --overwrite`` replaces only an intact artifact holding nothing
else; ``export --out`` stays out of datasets, artifacts and a run's ``checkpoints/``; ``scale --out`` and
``train --out`` stay out of their ``--data``; a killed export's temporary directory is removed by the next export
to the same place. Every other command's single output file (``plan --json``, ``synth --tsv``, ``bench --json``)
stays out of datasets, runs and artifacts, off links and off files it did not write; its output directories
(``synth``, ``scale``, ``days``, ``analyze``, ``paper`` ``--out``, ``predict --compile-cache``) stay out of the
datasets, runs and artifacts it does not make; ``train --overwrite`` keeps a run directory holding other files.
Every refusal is one line with exit status 2, and the refused target is left byte for byte.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest

from multiembed.cli import main as cli_main

TRAIN = ["--model", "dnn-me-2x", "--batch-size", "256", "--hidden", "16", "--epochs", "1", "--max-steps", "4",
         "--device", "cpu", "--no-progress", "--ia-every", "0"]


def _refused(capsys, argv, *words: str) -> str:
    """Runs ``argv``, which must be refused with status 2 in one error line holding every word; returns it."""
    capsys.readouterr()
    assert cli_main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _snapshot(directory: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Tuple[Path, Path, Path]:
    """(data, run, artifact): a tiny synthetic run and its export."""
    base = tmp_path_factory.mktemp("write-safety")
    data, run, artifact = base / "data", base / "run", base / "artifact"
    assert cli_main(["synth", "--rows", "2000", "--scale", "0.001", "--seed", "5", "--out", str(data),
                     "--no-progress"]) == 0
    assert cli_main(["train", "--data", str(data), "--out", str(run), *TRAIN]) == 0
    assert cli_main(["export", str(run), "--out", str(artifact), "--quantize", "none"]) == 0
    return data, run, artifact


# --- predict --out ---------------------------------------------------------------------------------------------------


def test_predict_refuses_an_existing_out_without_overwrite(exported, tmp_path, capsys) -> None:
    data, _, artifact = exported
    out = tmp_path / "notes.parquet"
    out.write_bytes(b"someone else's file")
    _refused(capsys, ["predict", str(artifact), "--data", str(data), "--out", str(out)], str(out), "--overwrite")
    assert out.read_bytes() == b"someone else's file"
    capsys.readouterr()
    assert cli_main(["predict", str(artifact), "--data", str(data), "--out", str(out), "--overwrite"]) == 0
    assert out.read_bytes()[:4] == b"PAR1"


def test_predict_never_writes_over_its_inputs_or_inside_a_dataset_run_or_artifact(exported, tmp_path, capsys) -> None:
    data, run, artifact = exported
    raw = tmp_path / "raw.tsv"
    raw.write_text("label\n")
    before = {d: _snapshot(d) for d in (data, run, artifact)}
    targets = [
        (["--raw", str(raw)], raw),  # its own input
        (["--data", str(data)], artifact / "manifest.json"),  # a file of the artifact
        (["--data", str(data)], artifact / "new.parquet"),
        (["--data", str(data)], data / "metadata.json"),  # the dataset
        (["--data", str(data)], data / "test" / "p.parquet"),
        (["--data", str(data)], run / "config.json"),  # a run
        (["--data", str(data)], run / "checkpoints" / "p.parquet"),
    ]
    for source, out in targets:
        for extra in ([], ["--overwrite"]):
            _refused(capsys, ["predict", str(artifact), *source, "--out", str(out), *extra], str(out))
    assert raw.read_text() == "label\n"
    assert {d: _snapshot(d) for d in (data, run, artifact)} == before


# --- export --out / --overwrite --------------------------------------------------------------------------------------


def test_export_overwrite_keeps_a_users_files_and_refuses_an_altered_artifact(exported, tmp_path, capsys) -> None:
    _, run, artifact = exported
    out = tmp_path / "art"
    shutil.copytree(artifact, out)
    (out / "notes.txt").write_text("my notes")
    _refused(capsys, ["export", str(run), "--out", str(out), "--overwrite"], "notes.txt")
    assert (out / "notes.txt").read_text() == "my notes"

    (out / "notes.txt").unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    tables = out / manifest["files"]["tables"]["path"]
    raw = bytearray(tables.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tables.write_bytes(bytes(raw))
    altered = _snapshot(out)
    _refused(capsys, ["export", str(run), "--out", str(out), "--overwrite"], "not an intact export artifact")
    assert _snapshot(out) == altered

    shutil.rmtree(out)
    shutil.copytree(artifact, out)
    assert cli_main(["export", str(run), "--out", str(out), "--overwrite", "--quantize", "int8"]) == 0
    assert json.loads((out / "manifest.json").read_text())["quantize"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_export_out_stays_out_of_checkpoints_datasets_and_artifacts(exported, capsys) -> None:
    data, run, artifact = exported
    for out in (run / "checkpoints" / "art", data / "art", data / "test" / "art", artifact / "nested"):
        _refused(capsys, ["export", str(run), "--out", str(out)], str(out), "lies inside")
        assert not out.exists()
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-export")]


def test_a_killed_exports_temporary_directory_is_removed_by_the_next_export(exported, tmp_path, capsys) -> None:
    from multiembed.serving.export import _host_prefix

    _, run, _ = exported
    out = tmp_path / "art"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f"{_host_prefix(out)}{dead.pid}-abc123"
    left.mkdir()
    (left / "tables.pt").write_bytes(b"\0" * 1024)
    running = tmp_path / f"{_host_prefix(out)}{os.getppid()}-def456"  # a live process's: kept
    running.mkdir()
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    assert not left.exists() and running.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["art", running.name])


# --- scale / train --out inside --data -------------------------------------------------------------------------------


def test_scale_and_train_out_inside_data_are_refused(exported, capsys) -> None:
    data, _, _ = exported
    before = _snapshot(data)
    study = ["--backbones", "dnn", "--scales", "1", "--modes", "se", "--seeds", "1", "--batch-size", "256",
             "--hidden", "16", "--epochs", "1", "--max-steps", "2", "--ia-every", "0", "--device", "cpu",
             "--no-progress"]
    for out in (data, data / "study"):
        _refused(capsys, ["scale", "--data", str(data), "--out", str(out), *study], str(out), "--data")
    for out in (data / "run",):
        _refused(capsys, ["train", "--data", str(data), "--out", str(out), *TRAIN], str(out), "--data")
    assert _snapshot(data) == before and not (data / "study").exists() and not (data / "run").exists()


# --- dataset files stay inside the dataset ---------------------------------------------------------------------------


def _escaping_copy(data: Path, where: Path, how: str) -> Path:
    """A copy of ``data`` whose test split names the training rows of another dataset beside it (row count
    matching): through ``..``, an absolute path, or a symbolic link inside the copy."""
    other = where / "other"
    shutil.copytree(data, other)
    copy = where / "copy"
    shutil.copytree(data, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    train = meta["splits"]["train"]["files"][0]
    outside = other / train["path"]
    test = {"rows": train["rows"], "files": [{"path": "", "rows": train["rows"]}]}
    if how == "dotdot":
        test["files"][0]["path"] = os.path.relpath(outside, copy)
    elif how == "absolute":
        test["files"][0]["path"] = str(outside)
    else:
        link = copy / "test" / "part-00000.parquet"
        link.unlink()
        link.symlink_to(outside)
        test["files"][0]["path"] = "test/part-00000.parquet"
    meta["splits"]["test"] = test
    (copy / "metadata.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("how", ["dotdot", "absolute", "link"])
def test_a_split_file_outside_the_dataset_is_refused_everywhere(exported, tmp_path, capsys, how: str) -> None:
    from multiembed.data.loader import ParquetBatchLoader
    from multiembed.data.metadata import DatasetError

    data, run, artifact = exported
    copy = _escaping_copy(data, tmp_path, how)
    entry = "splits.test.files[0].path"
    _refused(capsys, ["inspect", str(copy)], entry)
    _refused(capsys, ["evaluate", str(run), "--data", str(copy), "--device", "cpu"], entry)
    _refused(capsys, ["predict", str(artifact), "--data", str(copy), "--out", str(tmp_path / "p.parquet")], entry)
    _refused(capsys, ["train", "--data", str(copy), "--out", str(tmp_path / "run"), *TRAIN], entry)
    with pytest.raises(DatasetError, match=r"splits\.test\.files\[0\]\.path"):
        ParquetBatchLoader(copy, "test", 64, shuffle=False)
    assert not (tmp_path / "p.parquet").exists() and not (tmp_path / "run" / "config.json").exists()


# --- export of a run that is still training ---------------------------------------------------------------------------


def test_export_moves_on_when_retention_deletes_the_checkpoint_it_chose(exported, tmp_path, monkeypatch) -> None:
    """A running training's retention deletes the checkpoint export chose while export reads it: export loads the
    run's best complete checkpoint as it is then, instead of failing on a vanished ``.metadata``."""
    from multiembed.training import evaluation

    _, finished, _ = exported
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "summary.json").unlink()  # still training: no summary yet, the newest complete checkpoint is the best
    newest = max((run / "checkpoints").iterdir())
    older = newest.parent / "step-00000001"
    shutil.copytree(newest, older)
    real_load = evaluation.load_model_weights
    deleted = []

    def retention_strikes(built, path):
        if not deleted:
            deleted.append(path)
            shutil.rmtree(path)  # as prune_checkpoints does, between the choice and the read
        return real_load(built, path)

    monkeypatch.setattr(evaluation, "load_model_weights", retention_strikes)
    assert cli_main(["export", str(run), "--out", str(tmp_path / "art"), "--quantize", "none"]) == 0
    assert deleted == [newest]
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["source"]["checkpoint"].endswith("step-00000001")


# --- every other command's outputs ------------------------------------------------------------------------------------


def test_the_owner_markers_are_the_writers_own() -> None:
    """The torch-free placement rules recognise runs and artifacts by the names their writers use."""
    from multiembed.data import owners
    from multiembed.serving.artifact import ARTIFACT_FORMAT, MANIFEST_FILE
    from multiembed.training.checkpoint import CHECKPOINT_DIR
    from multiembed.training.run_dir import CONFIG_FILE

    assert (owners.RUN_CONFIG, owners.RUN_CHECKPOINTS, owners.ARTIFACT_MANIFEST, owners.ARTIFACT_FORMAT) == (
        CONFIG_FILE, CHECKPOINT_DIR, MANIFEST_FILE, ARTIFACT_FORMAT)


def test_single_output_files_never_go_over_what_the_command_did_not_write(exported, tmp_path, capsys) -> None:
    """``plan --json``, ``synth --tsv`` and ``bench --json`` refuse a file inside a dataset, a run or an artifact, a
    symbolic link and an existing file they did not write; ``plan --json`` replaces its own summary."""
    data, run, artifact = exported
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    link = tmp_path / "link.json"
    link.symlink_to(secret)
    before = {d: _snapshot(d) for d in (data, run, artifact)}
    plan = ["plan", "--model", "dnn-me-2x", "--world-size", "1", "--device", "cpu", "--data", str(data), "--json"]
    for out, word in ((data / "metadata.json", "lies inside"), (run / "config.json", "lies inside"),
                      (artifact / "plan.json", "lies inside"), (notes, "not a plan summary"),
                      (link, "symbolic link")):
        _refused(capsys, [*plan, str(out)], str(out), word)
    synth = ["synth", "--rows", "300", "--scale", "0.001", "--no-progress"]
    _refused(capsys, [*synth, "--out", str(tmp_path / "s1"), "--tsv", str(notes)], str(notes), "--force")
    _refused(capsys, [*synth, "--out", str(tmp_path / "s2"), "--tsv", str(data / "metadata.json"), "--force"],
             "lies inside")
    _refused(capsys, ["bench", "--model", "dnn-me-2x", "--device", "cpu", "--json", str(data / "metadata.json")],
             "lies inside")
    _refused(capsys, ["bench", "--model", "dnn-me-2x", "--device", "cpu", "--json", str(notes)],
             "not a benchmark result")
    assert {d: _snapshot(d) for d in (data, run, artifact)} == before
    assert notes.read_text() == '{"my": "notes"}' and secret.read_text() == "secret" and link.is_symlink()
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()

    summary = tmp_path / "plan.json"
    for _ in range(2):  # the second run replaces the summary the first wrote
        assert cli_main([*plan, str(summary)]) == 0
    assert json.loads(summary.read_text())["request"]["model"] == "dnn-me-2x"


def test_output_directories_stay_out_of_datasets_runs_and_artifacts(exported, tmp_path, capsys) -> None:
    """``synth``, ``scale``, ``days``, ``analyze`` and ``paper`` ``--out`` and ``predict --compile-cache`` refuse a
    directory that is, or lies inside, a dataset, a run or an artifact they do not make."""
    data, run, artifact = exported
    before = {d: _snapshot(d) for d in (data, run, artifact)}
    synth = ["synth", "--rows", "300", "--scale", "0.001", "--no-progress"]
    study = ["--backbones", "dnn", "--scales", "1", "--modes", "se", "--seeds", "1", "--device", "cpu"]
    days = ["days", "--data", str(data), "--model", "dnn-me-2x", "--device", "cpu", "--out"]
    refused = [
        ([*synth, "--out", str(run)], "is a training run directory"),
        ([*synth, "--out", str(run), "--force"], "is a training run directory"),
        ([*synth, "--out", str(artifact)], "is an export artifact"),
        ([*synth, "--out", str(data / "sub")], "lies inside"),
        ([*synth, "--days", "2", "--out", str(data)], "is a converted dataset"),
        (["scale", "--data", str(data), "--out", str(run), *study], "is a training run directory"),
        (["scale", "--data", str(data), "--out", str(artifact / "study"), *study], "lies inside"),
        ([*days, str(run)], "is a training run directory"),
        ([*days, str(artifact)], "is an export artifact"),
        (["analyze", str(run), "--out", str(data), "--device", "cpu"], "is a converted dataset"),
        (["analyze", str(run), "--out", str(artifact), "--device", "cpu"], "is an export artifact"),
        (["analyze", str(run), "--out", str(run / "checkpoints"), "--device", "cpu"], "lies inside"),
        (["paper", "fig4", "--out", str(data), "--seeds", "1", "--iterations", "2"], "is a converted dataset"),
        (["predict", str(artifact), "--data", str(data), "--out", str(tmp_path / "p.parquet"), "--compile",
          "--compile-cache", str(data)], "is a converted dataset"),
    ]
    for argv, word in refused:
        line = _refused(capsys, argv, word)
        assert str(argv[argv.index("--compile-cache" if "--compile-cache" in argv else "--out") + 1]) in line
    assert {d: _snapshot(d) for d in (data, run, artifact)} == before
    assert not (tmp_path / "p.parquet").exists()


def test_train_overwrite_replaces_only_a_run_holding_nothing_else(exported, tmp_path, capsys) -> None:
    """A run directory holding a user's notes, or an artifact exported beside the run, is not replaced."""
    data, finished, _ = exported
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (run / "notes.txt").write_text("my notes")
    (run / ".summary.json.x1y2.tmp").write_text("{")  # a killed job's temporary file: the run's own
    before = _snapshot(run)
    _refused(capsys, ["train", "--data", str(data), "--out", str(run), "--overwrite", *TRAIN], "'notes.txt'",
             "no run writes")
    assert _snapshot(run) == before
    (run / "notes.txt").unlink()
    assert cli_main(["export", str(run), "--out", str(run / "art"), "--quantize", "none"]) == 0
    exported_beside = _snapshot(run / "art")
    _refused(capsys, ["train", "--data", str(data), "--out", str(run), "--overwrite", *TRAIN], "'art'")
    assert _snapshot(run / "art") == exported_beside


def test_analyze_keeps_a_users_file_in_a_folder_that_held_no_report(exported, tmp_path, capsys) -> None:
    """A model without a sub-embedding figure removes an earlier report's figure, never a user's file of that name
    in a folder that held no report."""
    _, run, _ = exported
    report = tmp_path / "report"
    report.mkdir()
    (report / "sub_embedding.png").write_text("my figure")
    assert cli_main(["analyze", str(run), "--out", str(report), "--device", "cpu", "--no-progress"]) == 0
    assert (report / "sub_embedding.png").read_text() == "my figure"
    assert (report / "collapse.json").is_file()


# --- a run's checkpoints stay inside the run ---------------------------------------------------------------------------


@pytest.mark.parametrize("linked", ["step", "checkpoints"])
def test_a_checkpoint_leading_out_of_its_run_is_refused(exported, tmp_path, capsys, linked: str) -> None:
    """A copied run whose ``step-N`` (or whole ``checkpoints/``) is a link to another run's is refused by
    ``evaluate``, ``export`` and ``analyze`` instead of passing that run's weights for its own."""
    data, finished, _ = exported
    run, other = tmp_path / "run", tmp_path / "other"
    shutil.copytree(finished, run)
    shutil.copytree(finished, other)
    if linked == "step":
        newest = max((run / "checkpoints").iterdir())
        shutil.rmtree(newest)
        newest.symlink_to(other / "checkpoints" / newest.name)
    else:
        shutil.rmtree(run / "checkpoints")
        (run / "checkpoints").symlink_to(other / "checkpoints")
    _refused(capsys, ["evaluate", str(run), "--data", str(data), "--device", "cpu"], "leads out of its run directory")
    _refused(capsys, ["export", str(run), "--out", str(tmp_path / "art")], "leads out of its run directory")
    _refused(capsys, ["analyze", str(run), "--out", str(tmp_path / "rep"), "--device", "cpu", "--no-progress"],
             "leads out of its run directory")
    assert not (tmp_path / "art").exists()


def test_a_split_file_name_holding_a_nul_is_named(exported, tmp_path, capsys) -> None:
    data, _, _ = exported
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["splits"]["train"]["files"][0]["path"] = "train/part\u0000.parquet"
    (copy / "metadata.json").write_text(json.dumps(meta))
    _refused(capsys, ["inspect", str(copy)], "splits.train.files[0].path", "NUL")
