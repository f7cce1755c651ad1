"""The run directory's one owner (training/run_dir.py): the checks before a job writes into it, its lock, its
records and the lookup of its checkpoints, each through :class:`RunDir` alone (the trainer's use of it is covered
in test_trainer.py, test_run_trust.py and test_write_safety.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from multiembed.cli import main as cli_main
from multiembed.config import TrainConfig
from multiembed.data.metadata import read_metadata
from multiembed.runtime.locking import LOCK_FILE
from multiembed.training import checkpoint as ckpt
from multiembed.training.run_dir import RunDir


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rundir") / "data"
    synth = ["synth", "--rows", "1500", "--out", str(out), "--seed", "3", "--scale", "0.001", "--no-progress"]
    assert cli_main(synth) == 0
    return out


def _config(data: Path, out: Path, **options) -> TrainConfig:
    return TrainConfig(data=str(data), model="dnn-me-2x", out=str(out), batch_size=256, hidden=16, **options)


def _recorded_run(data: Path, out: Path, **options) -> RunDir:
    """A run directory as a finished run leaves it (config.json only: what the checks read)."""
    run = RunDir(out)
    out.mkdir(parents=True)
    meta = read_metadata(data)
    record = {"options": dataclasses.asdict(_config(data, out, **options)),
              "data": {"vocab_fingerprint": meta.vocab_fingerprint}}
    run.write_config(record, "plan")
    return run


def test_a_new_directory_is_usable_and_an_existing_run_needs_resume_or_overwrite(data: Path, tmp_path: Path) -> None:
    meta = read_metadata(data)
    assert RunDir(tmp_path / "new").problem(_config(data, tmp_path / "new"), meta) is None
    run = _recorded_run(data, tmp_path / "run")
    assert "exists; pass --resume" in run.problem(_config(data, run.path), meta)
    assert run.problem(_config(data, run.path, resume=True), meta) is None
    assert run.problem(_config(data, run.path, overwrite=True), meta) is None
    assert "--seed is 5 but the run in" in run.problem(_config(data, run.path, resume=True, seed=5), meta)
    inside = data / "run"
    assert "a run never writes into its dataset" in RunDir(inside).problem(_config(data, inside), meta)


def test_overwrite_refuses_a_directory_that_is_not_a_run_and_open_keeps_nothing_but_the_lock(
    data: Path, tmp_path: Path
) -> None:
    meta = read_metadata(data)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert "is not a multiembed run directory" in RunDir(other).problem(_config(data, other, overwrite=True), meta)
    run = _recorded_run(data, tmp_path / "run")
    run.append_metrics({"evaluation": 1})
    run.open(_config(data, run.path, overwrite=True), meta, is_main=True)
    try:
        assert sorted(p.name for p in run.path.iterdir()) == [LOCK_FILE]
        with pytest.raises(ValueError, match="training run"):
            RunDir(run.path).open(_config(data, run.path, overwrite=True), meta, is_main=True)
    finally:
        run.close()
    assert not (run.path / LOCK_FILE).exists()
    run.close()  # closing twice is harmless


def test_a_symbolic_link_among_the_run_files_is_refused(data: Path, tmp_path: Path) -> None:
    run = _recorded_run(data, tmp_path / "run")
    target = tmp_path / "elsewhere.jsonl"
    target.write_text("")
    run.metrics_file.symlink_to(target)
    assert "is a symbolic link" in run.problem(_config(data, run.path, resume=True), read_metadata(data))
    with pytest.raises(ValueError, match="metrics.jsonl: is a symbolic link"):
        run.append_metrics({"evaluation": 1})
    assert target.read_text() == ""


def test_keep_metrics_drops_only_the_evaluations_after_the_checkpoint(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    assert run.keep_metrics(0) == 0  # no log yet
    for i in range(1, 5):
        run.append_metrics({"evaluation": i})
    assert run.keep_metrics(4) == 0
    assert run.keep_metrics(2) == 2
    assert [json.loads(line)["evaluation"] for line in run.metrics_file.read_text().splitlines()] == [1, 2]


def test_read_config_and_train_config_of_a_run_that_predates_an_option(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a multiembed run directory"):
        RunDir(tmp_path / "nothing").read_config()
    run = _recorded_run(data, tmp_path / "run", seed=7)
    record = run.read_config()
    del record["options"]["output_bias"]  # as written before the option existed
    run.config_file.write_text(json.dumps(record))
    config = run.train_config(resume=True)
    assert config.seed == 7 and config.resume and config.model == "dnn-me-2x"
    assert config.output_bias == "default"  # the behaviour such a run had, not today's default
    run.config_file.write_text("{")
    with pytest.raises(ValueError, match="config.json: not valid JSON"):
        run.read_config()


def test_best_checkpoint_is_summary_best_step_and_names_a_bad_summary(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    with pytest.raises(ValueError, match="no complete checkpoint to evaluate"):
        run.best_checkpoint()
    assert run.checkpoint(12) == tmp_path / ckpt.CHECKPOINT_DIR / "step-00000012"
    run.write_summary({"best_step": "twelve"})
    with pytest.raises(ValueError, match="summary.json: no valid best_step"):
        run.best_checkpoint()
    run.write_summary({"best_step": 12})
    with pytest.raises(ckpt.CheckpointError):
        run.best_checkpoint()  # named but not there: never another one silently
