"""Run directories a user can trust (the trainer's side): relative, moved and copied runs, safe
``--overwrite``, resume and evaluate only on the data a run was trained on, one job per run directory, no writes
through links, exact progress counters."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from multiembed.cli import main as cli_main

TRAIN = ["--model", "dnn-me-2x", "--batch-size", "256", "--hidden", "16", "--epochs", "1", "--device", "cpu",
         "--no-progress", "--ia-every", "0"]


def _synth(out: Path, *extra: str) -> Path:
    assert cli_main(["synth", "--rows", "2000", "--out", str(out), "--scale", "0.001", "--no-progress", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return _synth(tmp_path_factory.mktemp("trust") / "data", "--seed", "4")


@pytest.fixture(scope="module")
def finished_run(data: Path, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trust-run") / "run"
    assert cli_main(["train", "--data", str(data), "--out", str(run), *TRAIN]) == 0
    return run


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def test_relative_out_then_evaluate_and_analyze_from_another_directory(data: Path, tmp_path: Path) -> None:
    """``make train``'s path: a relative --out, then evaluate / analyze from elsewhere, then the run moved."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cli = [sys.executable, "-m", "multiembed.cli"]
    subprocess.run([*cli, "train", "--data", str(data), "--out", "runs/r1", *TRAIN], cwd=work, env=env, check=True,
                   capture_output=True)
    summary = json.loads((work / "runs/r1/summary.json").read_text())
    assert summary["checkpoint"] == f"checkpoints/step-{summary['best_step']:08d}"
    for run in (work / "runs/r1", Path(os.path.relpath(work / "runs/r1", elsewhere))):
        result = subprocess.run([*cli, "evaluate", str(run), "--data", str(data), "--device", "cpu"], cwd=elsewhere,
                                env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout.splitlines()[-1])["test_auc"] == pytest.approx(summary["test_auc"], abs=1e-6)
    moved = tmp_path / "moved"
    shutil.move(str(work / "runs/r1"), moved)
    result = subprocess.run([*cli, "analyze", str(moved), "--out", "report", "--device", "cpu", "--no-progress",
                             "--no-sub-embedding"], cwd=elsewhere, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (elsewhere / "report" / "collapse.json").is_file()


def test_a_copied_run_uses_its_own_checkpoints(finished_run: Path, data: Path, tmp_path: Path, capsys) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    summary = json.loads((copy / "summary.json").read_text())
    for shard in (copy / summary["checkpoint"]).glob("*.distcp"):
        shard.write_bytes(b"corrupted")
    capsys.readouterr()
    assert cli_main(["evaluate", str(copy), "--data", str(data), "--device", "cpu"]) == 2
    assert str(copy) in _error(capsys)


def test_overwrite_removes_only_a_run_directory_and_never_the_data(data: Path, tmp_path: Path, capsys) -> None:
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "holiday.jpg").write_bytes(b"x")
    capsys.readouterr()
    assert cli_main(["train", "--data", str(data), "--out", str(unrelated), "--overwrite", *TRAIN]) == 2
    assert "not a multiembed run directory" in _error(capsys)
    assert (unrelated / "holiday.jpg").read_bytes() == b"x"

    assert cli_main(["train", "--data", str(data), "--out", str(data), "--overwrite", *TRAIN]) == 2
    _error(capsys)
    assert (data / "metadata.json").is_file()

    # A run directory that holds the dataset (config.json planted so that only the data rule refuses).
    holder = tmp_path / "holder"
    shutil.copytree(data, holder / "data")
    (holder / "config.json").write_text("{}")
    assert cli_main(["train", "--data", str(holder / "data"), "--out", str(holder), "--overwrite", *TRAIN]) == 2
    assert "holds the --data directory" in _error(capsys)
    assert (holder / "data" / "metadata.json").is_file()


def test_overwrite_replaces_a_run(finished_run: Path, data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "checkpoints" / "step-99999999").mkdir()
    assert cli_main(["train", "--data", str(data), "--out", str(run), "--overwrite", "--max-steps", "2", *TRAIN]) == 0
    assert not (run / "checkpoints" / "step-99999999").exists()
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_resume_on_other_data_is_refused_naming_both_fingerprints(
    finished_run: Path, data: Path, tmp_path: Path, capsys
) -> None:
    other_sizes = _synth(tmp_path / "other-sizes", "--seed", "4", "--scale", "0.002")
    same_sizes = _synth(tmp_path / "same-sizes", "--seed", "5")
    trained = json.loads((finished_run / "config.json").read_text())["data"]["vocab_fingerprint"]
    for other in (other_sizes, same_sizes):
        run = tmp_path / f"run-{other.name}"
        shutil.copytree(finished_run, run)
        before = (run / "config.json").read_text()
        capsys.readouterr()
        assert cli_main(["train", "--data", str(other), "--out", str(run), "--resume", *TRAIN]) == 2
        error = _error(capsys)
        given = json.loads((other / "metadata.json").read_text())["vocab_fingerprint"]
        assert given != trained and trained[:16] in error and given[:16] in error and "fingerprint" in error, error
        assert (run / "config.json").read_text() == before


def test_evaluate_refuses_the_same_rows_split_another_way(finished_run: Path, data: Path, tmp_path: Path, capsys) -> None:
    """Same seed and generator (so the same rows and the same vocabulary), other split fractions: the run's training
    rows would be in this dataset's test split."""
    resplit = _synth(tmp_path / "resplit", "--seed", "4", "--split", "5,1,4")
    capsys.readouterr()
    assert cli_main(["evaluate", str(finished_run), "--data", str(resplit), "--device", "cpu"]) == 2
    assert "splits its rows differently" in _error(capsys)


def test_a_second_job_on_the_same_run_directory_is_refused(data: Path, tmp_path: Path, capsys) -> None:
    from multiembed.runtime.locking import exclusive_lock

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from multiembed.runtime.locking import exclusive_lock\n"
         "with exclusive_lock(sys.argv[1], 'training run'):\n    print('held', flush=True); time.sleep(60)", str(run)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        capsys.readouterr()
        assert cli_main(["train", "--data", str(data), "--out", str(run), *TRAIN]) == 2
        error = _error(capsys)
        assert f"pid {holder.pid}" in error and "training run" in error
    finally:
        holder.kill()
        holder.wait()
    with exclusive_lock(run, "check"):  # released when the holder died, and the refused job left nothing behind
        assert [p.name for p in run.iterdir()] == [".multiembed.lock"]


def test_nothing_is_written_through_a_link_inside_the_run(finished_run: Path, data: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "elsewhere.jsonl"
    target.write_text("")
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(target)
    capsys.readouterr()
    assert cli_main(["train", "--data", str(data), "--out", str(run), "--resume", "--epochs", "2", *TRAIN]) == 2
    assert "symbolic link" in _error(capsys)
    assert target.read_text() == ""


def test_progress_counters_survive_a_checkpoint_exactly(data: Path, tmp_path: Path) -> None:
    from multiembed.config import TrainConfig
    from multiembed.training.distributed import destroy
    from multiembed.training.trainer import Trainer

    config = TrainConfig(data=str(data), model="dnn-me-2x", out=str(tmp_path / "run"), batch_size=256, hidden=16,
                         device="cpu", progress=False, max_steps=1, ia_every=0)
    try:
        trainer = Trainer(config)
        trainer.fit()
        big = 2**24 + 1  # float32 rounds it to 2^24
        trainer.state.samples_trained, trainer.state.step = 3 * big, big
        path = trainer.save()
        trainer.state.samples_trained, trainer.state.step = 0, 0
        trainer.restore(path)
        assert trainer.state.samples_trained == 3 * big and trainer.state.step == big
    finally:
        destroy()


@pytest.mark.multiprocess
def test_make_trains_torchx_command_with_a_relative_out_then_evaluate_and_analyze_elsewhere(
    data: Path, tmp_path: Path
) -> None:
    """``make train``'s torchx command (small sizes) run from one directory with a relative ``--out``; the run is then
    evaluated and analysed from another directory, by a relative path."""
    from test_torchx import run_torchx, tail, torchx_command, torchx_env

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    component = ["--data", str(data), "--out", "runs/dcnv2-me-2x", "--model", "dcnv2-me-2x", "--epochs", "1",
                 "--batch_size", "256", "--max_restarts", "0", "--checkpoint_every", "0", "-j", "1x2"]
    worker = ["--hidden", "16", "--sparse-lr", "0.1", "--lr", "3e-3", "--dropout", "0", "--decay-steps", "6",
              "--eval-every", "3", "--device", "cpu", "--no-progress"]
    log = tmp_path / "torchx.log"
    assert run_torchx(torchx_command(tmp_path / "logs", component, worker), log, cwd=work) == 0, tail(log)
    run = Path(os.path.relpath(work / "runs" / "dcnv2-me-2x", elsewhere))
    summary = json.loads((elsewhere / run / "summary.json").read_text())
    assert not Path(summary["checkpoint"]).is_absolute()
    cli = [sys.executable, "-m", "multiembed.cli"]
    result = subprocess.run([*cli, "evaluate", str(run), "--data", str(data), "--device", "cpu"], cwd=elsewhere,
                            env=torchx_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["test_auc"] == pytest.approx(summary["test_auc"], abs=1e-6)
    result = subprocess.run([*cli, "analyze", str(run), "--out", "report", "--device", "cpu", "--no-progress",
                             "--no-sub-embedding"], cwd=elsewhere, env=torchx_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    collapse = json.loads((elsewhere / "report" / "collapse.json").read_text())
    assert (elsewhere / "report" / collapse["source"]["run_dir"]).resolve() == (work / "runs" / "dcnv2-me-2x").resolve()
