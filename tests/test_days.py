"""The production loop: a drifting synthetic log of day datasets (``synth --days``), the checks a day sequence
passes (order, schema, id space, paper mode), the loop itself (``multiembed days``: warm start, progressive
validation, new ids, resume per day, retention) and its torchx component, killed in the middle of day 4 of 7 and
ending identical to an uninterrupted loop."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
from test_faults import TIMING_KEYS, _pid_alive, _published_steps, _run_logged, _workers
from test_torchx import COMPONENTS, REPO, TINY_WORKER, VENV_BIN, load_components, tail, torchx_env

from multiembed.cli import main as cli_main
from multiembed.data.days import IdHistory, day_ids, day_of, day_record, read_days
from multiembed.data.metadata import DatasetError, FieldSpec, read_metadata, write_metadata
from multiembed.data.synthetic import SyntheticConfig
from multiembed.data.synthetic.days import DriftConfig, DriftingClickModel, day_dirs

ROWS_PER_DAY = 6000
TINY_DAYS = ["--model", "dnn-me-2x", "--batch-size", "256", "--sharding", "table_wise", "--hidden", "32",
             "--sparse-lr", "0.1", "--lr", "3e-3", "--device", "cpu", "--no-progress"]


def _synth_days(out: Path, days: int, *extra: str) -> List[Path]:
    assert cli_main([
        "synth", "--days", str(days), "--rows", str(ROWS_PER_DAY), "--out", str(out), "--seed", "3", "--scale",
        "0.001", "--churn", "0.2", "--no-progress", *extra,
    ]) == 0
    return day_dirs(out, days)


@pytest.fixture(scope="module")
def log5(tmp_path_factory) -> List[Path]:
    """Five days of a drifting log."""
    return _synth_days(tmp_path_factory.mktemp("days") / "log", 5)


# ------------------------------------------------------------------------------------------ the drifting log
def test_synth_days_writes_consecutive_days_of_one_log_with_churning_ids(log5: List[Path]) -> None:
    places = read_days(log5)
    assert [p.index for _, _, p in places] == [0, 1, 2, 3, 4]
    assert len({p.sequence for _, _, p in places}) == 1 and len({p.hash_space for _, _, p in places}) == 1
    metas = [meta for _, meta, _ in places]
    # Every day is a full dataset with its own rows and its own Bayes-optimal AUC per split.
    for meta in metas:
        assert meta.split_rows() == {"train": 4800, "val": 600, "test": 600}
        assert set(meta.bayes) == {"train", "val", "test"} and 0.6 < meta.bayes["test"]["auc"] < 0.95
    assert len({json.dumps(meta.split_recipe, sort_keys=True) for meta in metas}) == 5
    # Ids churn: every later day brings ids no earlier day had, in the categorical fields only.
    history = IdHistory(metas[0].vocab_sizes)
    new = [history.add(day_ids(path, meta)) for path, meta in zip(log5, metas)]
    for day in new[1:]:
        assert sum(day.values()) > 0
        assert all(day[f"I{i}"] == 0 for i in range(1, 14))


def test_the_click_model_drifts_slowly_and_any_day_regenerates_alone() -> None:
    config, drift = SyntheticConfig(seed=5, scale=0.001), DriftConfig(drift=0.1, churn=0.2)
    model = DriftingClickModel(config, drift, day=0)
    ids = model.sample(np.random.default_rng(0), 4000).ids
    first = [model.logit_parts(ids)[0]]
    live = [model.live_ids("C3")]
    for _ in range(4):
        model.advance()
        first.append(model.logit_parts(ids)[0])
        live.append(model.live_ids("C3"))
    # A stationary AR(1) step per day: day k correlates (1 - drift)^(k/2) with day 0.
    for k in (1, 4):
        corr = np.corrcoef(first[0], first[k])[0, 1]
        assert abs(corr - (1 - drift.drift) ** (k / 2)) < 0.05, (k, corr)
    # A share `churn` of the live ids is replaced each day; the table size (hash space) never changes.
    assert len(set(live[1]) - set(live[0])) == round(len(live[0]) * drift.churn)
    alone = DriftingClickModel(config, drift, day=4)
    assert np.array_equal(alone.live_ids("C3"), live[4])
    assert np.array_equal(alone.logit_parts(ids)[0], first[4])
    assert alone.vocab_sizes == model.vocab_sizes and alone.fingerprint() == model.fingerprint()


def test_synth_days_options_are_refused_in_one_line_where_they_do_not_apply(tmp_path: Path, capsys) -> None:
    assert cli_main(["synth", "--rows", "100", "--out", str(tmp_path / "a"), "--churn", "0.1"]) == 2
    assert cli_main(["synth", "--days", "2", "--rows", "100", "--out", str(tmp_path / "b"), "--regime",
                     "collapse"]) == 2
    assert cli_main(["synth", "--days", "2", "--rows", "100", "--out", str(tmp_path / "c"), "--churn", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "multiembed synth: error: --churn: options of a drifting log; add --days D",
        "multiembed synth: error: --days: a drifting log is drawn from the default generator (no --regime collapse, "
        "no --tsv)",
        "multiembed synth: error: --churn must be in [0, 1], got 2.0",
    ]


# --------------------------------------------------------------------------------------- sequence checks
def _rewrite(day: Path, out: Path, edit) -> Path:
    """A copy of a day with its metadata after ``edit(meta)``; the day record is rewritten from the edited metadata so
    that only what ``edit`` changed differs."""
    out.mkdir()
    for split in ("train", "val", "test"):
        shutil.copytree(day / split, out / split)
    meta = read_metadata(day)
    sequence, index = meta.extra["day"]["sequence"], meta.extra["day"]["index"]
    edit(meta)
    meta.extra["day"] = day_record(meta, sequence, index)
    write_metadata(out, meta)
    return out


def test_a_day_out_of_order_is_refused_in_one_line(log5: List[Path]) -> None:
    with pytest.raises(DatasetError, match=r"day-002/metadata.json: day.index: day 2 given after day 0 .*"
                                           r"consecutive and in order$"):
        read_days([log5[0], log5[2]])
    with pytest.raises(DatasetError, match=r"day 0 given after day 1"):
        read_days([log5[1], log5[0]])


def test_a_day_of_another_schema_or_id_space_or_log_is_refused(log5: List[Path], tmp_path: Path) -> None:
    def rename_field(meta) -> None:
        meta.fields[-1] = FieldSpec(name="C27", vocab_size=meta.fields[-1].vocab_size)

    def grow_table(meta) -> None:
        meta.fields[-1] = FieldSpec(name=meta.fields[-1].name, vocab_size=meta.fields[-1].vocab_size + 1)
        meta.vocab_fingerprint = "another-hash-space"

    other_schema = _rewrite(log5[1], tmp_path / "schema", rename_field)
    with pytest.raises(DatasetError, match=r"schema/metadata.json: day.schema: another schema than .*day-000"):
        read_days([log5[0], other_schema])
    other_space = _rewrite(log5[1], tmp_path / "space", grow_table)
    with pytest.raises(DatasetError, match=r"space/metadata.json: day.hash_space: another id space than"):
        read_days([log5[0], other_space])
    other_log = _synth_days(tmp_path / "other", 2, "--drift", "0.5")
    with pytest.raises(DatasetError, match=r"day-001/metadata.json: day.sequence: .* is another log than"):
        read_days([log5[0], other_log[1]])


def test_paper_mode_and_plain_datasets_are_not_days(log5: List[Path], tmp_path: Path) -> None:
    def paper(meta) -> None:
        meta.options["mode"] = "paper"

    with pytest.raises(DatasetError, match=r"options.mode: paper mode's vocabulary is frozen at conversion"):
        read_days([_rewrite(log5[0], tmp_path / "paper", paper)])
    plain = tmp_path / "plain"
    assert cli_main(["synth", "--rows", "300", "--out", str(plain), "--scale", "0.001", "--no-progress"]) == 0
    with pytest.raises(DatasetError, match=r"plain/metadata.json: day: missing; not a day of a sequence \(days are"):
        day_of(read_metadata(plain), str(plain / "metadata.json"))


def test_the_days_command_refuses_bad_days_in_one_line(log5: List[Path], tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert cli_main(["days", "--data", str(log5[0]), str(log5[2]), "--out", str(run), *TINY_DAYS]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("multiembed days: error: ") and "day 2 given after day 0" in err[0]
    assert not run.exists()


# ------------------------------------------------------------------------------------- converted real logs
@pytest.fixture(scope="module")
def raw_days(tmp_path_factory) -> List[Path]:
    """Two raw Criteo TSV files, one per day."""
    base = tmp_path_factory.mktemp("raw")
    paths = []
    for day in range(2):
        tsv = base / f"day{day}.tsv"
        assert cli_main(["synth", "--rows", "400", "--out", str(base / f"synth{day}"), "--seed", str(day), "--scale",
                         "0.001", "--tsv", str(tsv), "--no-progress"]) == 0
        paths.append(tsv)
    return paths


def _convert(tsv: Path, out: Path, *options: str) -> int:
    return cli_main(["convert", "criteo", str(tsv), "--out", str(out), "--quiet", *options])


def test_convert_writes_days_in_hashing_mode_that_follow_one_another(raw_days: List[Path], tmp_path: Path) -> None:
    assert _convert(raw_days[0], tmp_path / "d0", "--hash-size", "1000", "--first-day", "clicks") == 0
    assert _convert(raw_days[1], tmp_path / "d1", "--hash-size", "1000", "--follows", str(tmp_path / "d0")) == 0
    places = read_days([tmp_path / "d0", tmp_path / "d1"])
    assert [(p.sequence, p.index) for _, _, p in places] == [("clicks", 0), ("clicks", 1)]
    # Without a day option a conversion is a plain dataset, which is no day.
    assert _convert(raw_days[0], tmp_path / "plain", "--hash-size", "1000") == 0
    with pytest.raises(DatasetError, match="day: missing"):
        read_days([tmp_path / "plain"])


def test_convert_refuses_days_in_paper_mode_or_of_another_hash_space_in_one_line(
    raw_days: List[Path], tmp_path: Path, capsys
) -> None:
    assert _convert(raw_days[0], tmp_path / "d0", "--hash-size", "1000", "--first-day", "clicks") == 0
    capsys.readouterr()
    assert _convert(raw_days[1], tmp_path / "paper", "--first-day", "clicks") == 2
    assert _convert(raw_days[1], tmp_path / "d1", "--hash-size", "999", "--follows", str(tmp_path / "d0")) == 2
    plain = raw_days[0].parent / "synth0"
    assert _convert(raw_days[1], tmp_path / "d1", "--hash-size", "1000", "--follows", str(plain)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "multiembed convert: error: --first-day: a day sequence needs hashing mode (--hash-size N) or managed mode "
        "(--vocab managed); paper mode's vocabulary is frozen at conversion and cannot grow with later days",
        f"multiembed convert: error: --follows {tmp_path / 'd0' / 'metadata.json'}: day.hash_space: another id space "
        "than this conversion's (the hash sizes or hash seed differ); every day of a sequence keeps its --hash-size "
        "/ --hash-sizes",
        f"multiembed convert: error: {plain / 'metadata.json'}: day: missing; not a day of a sequence (days are "
        "written by multiembed synth --days and convert --first-day / --follows)",
    ]
    # Refused before anything is written.
    assert not (tmp_path / "paper").exists() and not (tmp_path / "d1").exists()


# ---------------------------------------------------------------------------------------------- the loop
def _summary(run: Path) -> Dict:
    return json.loads((run / "summary.json").read_text())


@pytest.mark.slow
def test_the_loop_warm_starts_validates_progressively_resumes_and_keeps_the_last_days(
    log5: List[Path], tmp_path: Path, capsys
) -> None:
    run = tmp_path / "run"
    assert cli_main(["days", "--data", *map(str, log5[:3]), "--out", str(run), "--keep-days", "1", *TINY_DAYS]) == 0
    days = _summary(run)["days"]
    assert [d["day"] for d in days] == [0, 1, 2]
    for d in days:
        assert d["rows"] == 4800 and d["steps"] == 4800 // 256
        assert len(d["ia_mean_per_set"]) == 2  # dnn-me-2x: two embedding sets
    # Day 0 is judged by a fresh model; every later day by the model of the day before, which learnt something.
    assert abs(days[0]["pv_auc"] - 0.5) < 0.05
    assert days[1]["pv_auc"] > days[0]["pv_auc"] + 0.05 and days[2]["pv_auc"] > days[0]["pv_auc"] + 0.05
    # The warm start loads the previous day's final checkpoint, as each day's log says.
    err = capsys.readouterr().err
    assert err.count("warm-started from") == 2
    assert f"{run / 'day-000' / 'checkpoints'}" in err.split("warm-started from")[1].split("\n")[0]
    # Every id of day 0 is new; later days bring the churned ones.
    assert days[0]["new_ids"] == days[0]["ids"] and 0 < days[1]["new_ids"] < days[1]["ids"]
    # --keep-days 1: only the last finished day keeps its checkpoint.
    assert [bool(_published_steps(run / f"day-00{k}")) for k in range(3)] == [False, False, True]
    assert (run / "auc_per_day.png").stat().st_size > 0

    # Rerun with one more day: the three finished days are not trained again, day 3 starts from day 2.
    before = {k: (run / f"day-00{k}" / "metrics.jsonl").read_text() for k in range(3)}
    assert cli_main(["days", "--data", *map(str, log5[:4]), "--out", str(run), "--keep-days", "1", *TINY_DAYS]) == 0
    err = capsys.readouterr().err
    assert err.count("warm-started from") == 1 and "day-002" in err.split("warm-started from")[1].split("\n")[0]
    assert {k: (run / f"day-00{k}" / "metrics.jsonl").read_text() for k in range(3)} == before
    assert [d["day"] for d in _summary(run)["days"]] == [0, 1, 2, 3]
    assert _summary(run)["days"][:3] == days

    # Day 4 alone continues the run from day 3; the run's summary keeps every finished day.
    assert cli_main(["days", "--data", str(log5[4]), "--out", str(run), "--keep-days", "1", *TINY_DAYS]) == 0
    last = _summary(run)["days"]
    assert [d["day"] for d in last] == [0, 1, 2, 3, 4]
    # Its new ids are counted against every earlier day of the run (the history day 3 left), not only day 4's own.
    assert 0 < last[4]["new_ids"] < last[4]["ids"]
    assert [p.name for p in sorted(run.glob("*.seen.npz"))] == ["day-004.seen.npz"]
    capsys.readouterr()

    # Another model on the same run is refused in one line, before anything trains.
    other = [*TINY_DAYS]
    other[other.index("dnn-me-2x")] = "dnn-se-1x"
    assert cli_main(["days", "--data", *map(str, log5[:4]), "--out", str(run), *other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"multiembed days: error: --model is 'dnn-se-1x' but the run in {run} used 'dnn-me-2x' "
                   f"({run / 'days.json'})"]


@pytest.mark.slow
def test_a_warm_start_from_another_models_checkpoint_is_refused_in_one_line(log5: List[Path], tmp_path: Path) -> None:
    from multiembed.config import TrainConfig
    from multiembed.training import checkpoint as ckpt
    from multiembed.training.trainer import Trainer

    run = tmp_path / "run"
    assert cli_main(["days", "--data", str(log5[0]), "--out", str(run), *TINY_DAYS]) == 0
    found = ckpt.newest_valid_checkpoint(run / "day-000")
    assert found is not None
    trainer = Trainer(TrainConfig(data=str(log5[1]), model="dnn-se-1x", out=str(tmp_path / "se"), hidden=32,
                                  batch_size=256, sharding="table_wise", device="cpu", progress=False))
    try:
        # The checkpoint's tables or dense layers are not this model's: the first of them named, in one line.
        with pytest.raises(ValueError, match=r"^\S*step-\d+: (has no entry \S+; it was not written by a run of this "
                                             r"model and options|\S+ has shape \[.*resume with the checkpoint's .*)$"):
            trainer.warm_start(found)
    finally:
        trainer.close()


# --------------------------------------------------------------------------------------------------- torchx
def test_days_component_validates_and_builds_the_worker_command_line() -> None:
    from torchx.components.component_test_base import ComponentTestCase

    class Check(ComponentTestCase):
        def runTest(self) -> None:
            self.validate(load_components(), "days")

    Check().runTest()
    app = load_components().days("--hidden", "32", data=["d0", "d1"], out="r", model="dnn-me-2x", keep_days=2)
    (role,) = app.roles
    command = role.args[1]
    assert "-m multiembed.cli days --data d0 d1 --out r --keep-days 2 --model dnn-me-2x" in command
    assert command.endswith("--hidden 32")


DAYS_OF_RUN = 7
KILL_DAY = 4


def _days_command(log_dir: Path, days: List[Path], run: Path) -> List[str]:
    return [
        str(VENV_BIN / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={log_dir}", f"{COMPONENTS}:days",
        "--data", ",".join(map(str, days)), "--out", str(run), "--model", "dnn-me-2x", "--batch_size", "128",
        "--sharding", "table_wise", "--checkpoint_every", "8", "--max_restarts", "1", "-j", "1x2",
        "--", *TINY_WORKER,
    ]


def _without_timing(run: Path) -> Dict:
    days = _summary(run)["days"]
    metrics = {
        k: [{key: v for key, v in json.loads(line).items() if key not in TIMING_KEYS}
            for line in (run / f"day-00{k}" / "metrics.jsonl").read_text().splitlines()]
        for k in range(DAYS_OF_RUN)
    }
    return {"days": days, "metrics": metrics}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_seven_days_on_two_ranks_killed_in_the_middle_of_day_4_end_as_an_uninterrupted_loop(tmp_path: Path) -> None:
    days = _synth_days(tmp_path / "log", DAYS_OF_RUN)
    env = torchx_env()
    env["LOGLEVEL"] = "INFO"  # torchrun reports the failed worker group and the restart at INFO

    reference, reference_log = tmp_path / "reference", tmp_path / "reference.log"
    rc = _run_logged(_days_command(tmp_path / "logs-ref", days, reference), reference_log, env, timeout=400)
    assert rc == 0, tail(reference_log)
    assert [d["day"] for d in _summary(reference)["days"]] == list(range(DAYS_OF_RUN))
    assert _summary(reference)["world_size"] == 2

    run, log = tmp_path / "killed", tmp_path / "killed.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(_days_command(tmp_path / "logs", days, run), cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        day = run / f"day-00{KILL_DAY}"
        deadline = time.monotonic() + 400
        killed = None
        while killed is None and time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"the job ended (rc {proc.returncode}) before day {KILL_DAY} was interrupted:\n{tail(log)}")
            if _published_steps(day):
                workers = _workers(run)
                if sorted(workers) == [0, 1]:
                    assert not (day / "summary.json").exists(), f"day {KILL_DAY} had already finished"
                    os.kill(workers[1], signal.SIGKILL)
                    killed = workers[1]
            time.sleep(0.02)
        assert killed is not None, f"no checkpoint of day {KILL_DAY} within the deadline:\n{tail(log)}"
        rc = proc.wait(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    text = log.read_text(errors="replace")
    assert rc == 0, tail(log)
    assert not _pid_alive(killed)
    assert "Worker group FAILED. 1/1 attempts left; will restart worker group" in text, tail(log)
    # Days 0-3 were not trained again; day 4 resumed from its own checkpoint mid-day.
    resumed = [line for line in text.splitlines() if "resumed from" in line and f"day-00{KILL_DAY}" in line]
    assert len(resumed) == 1, tail(log)
    step = int(resumed[0].split(" step ")[1].split(")")[0])
    assert 0 < step < ROWS_PER_DAY * 8 // 10 // 128, resumed[0]
    assert not any("resumed from" in line and "day-00" in line and f"day-00{KILL_DAY}" not in line
                   for line in text.splitlines())
    assert _without_timing(run) == _without_timing(reference)
