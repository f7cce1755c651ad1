"""Faults during training: a rank killed mid-epoch, and rank 0 killed while it publishes a checkpoint (torchrun
restarts the job from the newest complete checkpoint and it ends exactly as an uninterrupted run); a diverging loss,
on every rank or on one rank only (every rank stops: one error line, exit status 3, the last good checkpoint kept
and intact).

Interrupted and corrupted checkpoint writes in one process are covered in ``test_training_units.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_torchx import REPO, TINY_TRAIN, TINY_WORKER, VENV_BIN, run_torchx, tail, torchx_command, torchx_env

from multiembed.cli import main as cli_main
from multiembed.cli.train import EXIT_DIVERGED
from multiembed.data.loader import ParquetBatchLoader
from multiembed.data.metadata import DENSE_PREFIX, read_metadata
from multiembed.training import checkpoint as ckpt

# Facts of a run that depend on wall-clock time or on the run directory's name, not on what was trained.
TIMING_KEYS = {"samples_per_s", "loader_share", "checkpoint"}


@pytest.fixture(scope="module")
def click_log(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("faults") / "data"
    assert cli_main(["synth", "--rows", "20000", "--out", str(out), "--seed", "4", "--scale", "0.001", "--no-progress"]) == 0
    return out


# ------------------------------------------------------------------------------------------ elastic restart
STEPS_PER_EPOCH = 16000 // 256  # the click_log fixture's train split, global batch 256 (the last one dropped)
EPOCHS = 2
CHECKPOINT_EVERY = 10
KILL_AFTER_STEP = 20


def _published_steps(run: Path) -> List[int]:
    """Steps of the complete checkpoints (published name and a manifest) in a run directory."""
    return [
        int(path.name.split("-")[1])
        for path in ckpt.list_checkpoints(run)
        if (path / ckpt.MANIFEST).is_file()
    ]


def _workers(run: Path) -> Dict[int, int]:
    """``{local_rank: pid}`` of the live ``multiembed train`` worker processes of the run in ``run``.

    Workers are told apart from the torchrun agent and the bash wrapper (whose command lines name the run too) by
    the LOCAL_RANK that torchrun puts only in its workers' environment.
    """
    found: Dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile, or not ours
            continue
        if b"multiembed.cli" not in argv or str(run).encode() not in argv:
            continue
        local_rank = next((item.split(b"=", 1)[1] for item in environ if item.startswith(b"LOCAL_RANK=")), None)
        if local_rank is not None:
            found[int(local_rank)] = int(entry.name)
    return found


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _kill_one_rank_mid_epoch(proc: subprocess.Popen, run: Path, log: Path, timeout: float = 240) -> Dict[str, int]:
    """Waits for a complete checkpoint past ``KILL_AFTER_STEP``, then SIGKILLs local rank 1's worker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the job ended (rc {proc.returncode}) before a rank could be killed; log:\n{tail(log)}")
        steps = _published_steps(run)
        if steps and max(steps) >= KILL_AFTER_STEP:
            workers = _workers(run)
            if sorted(workers) == [0, 1]:
                assert not (run / "summary.json").exists(), "the run had already finished: nothing was interrupted"
                os.kill(workers[1], signal.SIGKILL)
                return {"pid": workers[1], "step": max(steps)}
        time.sleep(0.02)
    pytest.fail(f"no checkpoint past step {KILL_AFTER_STEP} within {timeout} s; log:\n{tail(log)}")


def _evaluations(run: Path) -> List[dict]:
    return [
        {k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
        for line in (run / "metrics.jsonl").read_text().splitlines()
    ]


def _elastic_args(data: Path, run: Path) -> List[str]:
    # 16000 train rows / global batch 256: 62 steps an epoch, 2 epochs, a checkpoint every 10 steps. Dropout stays
    # on, so the per-rank RNG state in the checkpoint matters for the result too.
    return [
        "--data", str(data), "--out", str(run), *TINY_TRAIN, "--epochs", str(EPOCHS), "--patience", "0",
        "--checkpoint_every", str(CHECKPOINT_EVERY), "--max_restarts", "1", "-j", "1x2",
    ]


@pytest.fixture(scope="module")
def uninterrupted(click_log: Path, tmp_path_factory) -> Path:
    """The run the restarted runs must equal: same options, nothing killed (run once for the module)."""
    base = tmp_path_factory.mktemp("uninterrupted")
    run, log = base / "run", base / "torchx.log"
    rc = run_torchx(torchx_command(base / "logs", _elastic_args(click_log, run), TINY_WORKER), log)
    assert rc == 0, tail(log)
    assert "resumed from" not in log.read_text(errors="replace")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == EPOCHS * STEPS_PER_EPOCH and summary["world_size"] == 2
    return run


def _assert_same_result(restarted: Path, reference: Path) -> None:
    got = json.loads((restarted / "summary.json").read_text())
    want = json.loads((reference / "summary.json").read_text())
    # Same data order, same RNG streams, the same segment boundaries (every 10 steps and at epoch ends) and
    # gloo's fixed reduction order on CPU: the restarted run must be bit-identical, so no tolerance.
    assert {k: v for k, v in got.items() if k not in TIMING_KEYS} == {
        k: v for k, v in want.items() if k not in TIMING_KEYS
    }
    # Per evaluation, including each segment's mean training loss: no batch skipped or trained twice.
    assert _evaluations(restarted) == _evaluations(reference)


@pytest.mark.multiprocess
def test_rank_killed_mid_epoch_restarts_from_newest_checkpoint_and_ends_as_uninterrupted_run(
    click_log: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    restarted, restarted_log = tmp_path / "restarted", tmp_path / "restarted.log"
    env = torchx_env()
    env["LOGLEVEL"] = "INFO"  # torchrun reports the failed worker group and the restart at INFO
    with open(restarted_log, "wb") as out:
        proc = subprocess.Popen(
            torchx_command(tmp_path / "logs-restarted", _elastic_args(click_log, restarted), TINY_WORKER),
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            killed = _kill_one_rank_mid_epoch(proc, restarted, restarted_log)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = restarted_log.read_text(errors="replace")
    assert rc == 0, tail(restarted_log)
    assert not _pid_alive(killed["pid"])
    assert "Worker group FAILED. 1/1 attempts left; will restart worker group" in text, tail(restarted_log)
    resumed = re.findall(r"resumed from \S*step-(\d+) \(epoch (\d+), batch (\d+), step (\d+)\)", text)
    assert len(resumed) == 1, tail(restarted_log)
    resumed_step, resumed_epoch, resumed_batch = int(resumed[0][0]), int(resumed[0][1]), int(resumed[0][2])
    # The newest complete checkpoint when the rank died (or one published between the check and the kill).
    assert killed["step"] <= resumed_step < killed["step"] + 2 * CHECKPOINT_EVERY
    assert resumed_step % CHECKPOINT_EVERY == 0
    assert resumed_batch == resumed_step - STEPS_PER_EPOCH * resumed_epoch > 0, "expected a resume mid-epoch"
    _assert_same_result(restarted, uninterrupted)


def _run_logged(command: List[str], log: Path, env: Dict[str, str], timeout: float = 300) -> int:
    """Runs ``command`` in the repository (its own process group, killed on timeout: a hang fails the test)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"{command[:4]} did not finish in {timeout} s (a hang?); log:\n{tail(log)}")


# Imported at start-up by every python process with its directory on PYTHONPATH. In rank 0 of a torchx job's first
# attempt (TORCHELASTIC_RESTART_COUNT 0) it sets the hook training/checkpoint.py calls after a checkpoint's manifest
# is written and before its directory is renamed: the hook SIGKILLs the process while it publishes checkpoint {step},
# after cutting the manifest to half its bytes when {where} is "manifest" (as a kill in the middle of writing it
# would). The restarted job (restart count 1) gets past that step.
_KILL_AT_PUBLISH_SITE = """
import os

if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "0":
    import signal

    from multiembed.training import checkpoint

    def _kill_at_publish(tmp):
        if tmp.name != ".tmp-" + checkpoint.step_dir_name({step}):
            return
        if {where!r} == "manifest":
            manifest = tmp / checkpoint.MANIFEST
            with open(manifest, "r+b") as f:
                f.truncate(manifest.stat().st_size // 2)
                os.fsync(f.fileno())
        with open({marker!r}, "w") as f:  # proof that rank 0 died here (torchrun may log another rank's exit)
            f.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._before_publish_hook = _kill_at_publish
"""


# The file the hook writes (in the site directory) just before it kills rank 0.
KILLED_MARKER = "rank0-killed"


def _kill_at_publish_site(directory: Path, step: int, where: str) -> Path:
    """A directory holding :data:`_KILL_AT_PUBLISH_SITE` as ``sitecustomize.py`` for ``step`` and ``where``
    (``"manifest"`` or ``"rename"``), to put first on the workers' PYTHONPATH."""
    directory.mkdir(parents=True)
    marker = str(directory / KILLED_MARKER)
    (directory / "sitecustomize.py").write_text(
        _KILL_AT_PUBLISH_SITE.format(step=int(step), where=where, marker=marker)
    )
    return directory


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "kill_step,where", [(30, "manifest"), (80, "rename")], ids=["mid-manifest", "manifest-written-not-renamed"]
)
def test_rank0_killed_while_publishing_a_checkpoint_resumes_from_the_previous_one_and_ends_as_uninterrupted_run(
    click_log: Path, uninterrupted: Path, tmp_path: Path, kill_step: int, where: str
) -> None:
    # Rank 0 SIGKILLs itself inside save_checkpoint of step kill_step (_kill_at_publish_site): every shard is
    # written, the manifest is half written ("manifest") or complete ("rename": it would verify), but the directory
    # still has its temporary name. The restarted job must resume from the checkpoint before it.
    restarted, log = tmp_path / "restarted", tmp_path / "restarted.log"
    env = torchx_env()
    env["LOGLEVEL"] = "INFO"  # torchrun reports the failed worker group and the restart at INFO
    site = _kill_at_publish_site(tmp_path / "site", kill_step, where)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    rc = _run_logged(torchx_command(tmp_path / "logs", _elastic_args(click_log, restarted), TINY_WORKER), log, env)
    text = log.read_text(errors="replace")
    assert rc == 0, tail(log)
    # Rank 0 was killed by the hook (torchrun logs whichever rank's exit it sees first: under load that can be
    # rank 1's SIGTERM, so the hook's own marker is the proof), and the job was restarted once.
    assert (site / KILLED_MARKER).exists(), tail(log)
    assert re.search(r"exitcode: -(9|15)\) local_rank: [01] ", text), tail(log)
    assert "Worker group FAILED. 1/1 attempts left; will restart worker group" in text, tail(log)
    resumed = re.findall(r"resumed from (\S*)step-(\d+) \(epoch \d+, batch \d+, step \d+\)", text)
    # The newest complete checkpoint, never the half-published one (nor a "skipping" report about it: it was
    # never a candidate).
    assert [int(step) for _, step in resumed] == [kill_step - CHECKPOINT_EVERY], tail(log)
    assert "skipping checkpoint" not in text, tail(log)
    assert not list((restarted / ckpt.CHECKPOINT_DIR).glob(".tmp-*")), "the abandoned temporary directory was not cleared"
    _assert_same_result(restarted, uninterrupted)


# ---------------------------------------------------------------------------------------------- divergence
def _floating_tensors(state: object, prefix: str = "") -> Dict[str, torch.Tensor]:
    if isinstance(state, dict):
        out: Dict[str, torch.Tensor] = {}
        for key, value in state.items():
            out.update(_floating_tensors(value, f"{prefix}/{key}"))
        return out
    if isinstance(state, torch.Tensor) and state.is_floating_point():
        return {prefix: state}
    return {}


def test_diverging_loss_stops_with_one_error_line_and_keeps_last_good_checkpoint(
    click_log: Path, tmp_path: Path, capsys
) -> None:
    # Adam moves every dense weight by about lr on its first step: 1e30 leaves finite weights after step 1, and the
    # product of three such layers overflows float32 in the forward pass of step 2.
    run = tmp_path / "run"
    capsys.readouterr()
    status = cli_main(
        ["train", "--data", str(click_log), "--out", str(run), "--model", "dnn-me-2x", "--batch-size", "256",
         "--hidden", "32", "--epochs", "1", "--device", "cpu", "--no-progress", "--checkpoint-every", "1",
         "--lr", "1e30"]
    )
    err = capsys.readouterr().err
    assert status == EXIT_DIVERGED == 3
    errors = [line for line in err.splitlines() if line.startswith("multiembed train: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    match = re.search(r"NaN or infinite at step (\d+)", errors[0])
    assert match and str(run / ckpt.CHECKPOINT_DIR) in errors[0], errors[0]
    diverged_at = int(match.group(1))
    assert not (run / "summary.json").exists()
    _assert_last_good_checkpoint_intact(run, diverged_at, tmp_path)


def _assert_last_good_checkpoint_intact(run: Path, diverged_at: int, tmp_path: Path) -> Dict[str, object]:
    """The newest checkpoint verifies, is from before the divergence, holds only finite weights; its manifest."""
    last_good: Optional[Path] = ckpt.newest_valid_checkpoint(run, report=pytest.fail)
    assert last_good is not None
    manifest = ckpt.verify_checkpoint(last_good)
    # Nothing from the diverged segment was saved: the newest checkpoint is from before it.
    assert manifest["step"] == max(_published_steps(run)) and 0 < manifest["step"] < diverged_at
    assert not list((run / ckpt.CHECKPOINT_DIR).glob(".tmp-*"))

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = tmp_path / "last_good.pt"
    dcp_to_torch_save(str(last_good), str(flat))
    state = torch.load(flat, weights_only=False)
    weights = _floating_tensors(state["model"])
    assert any("embedding_bags" in name for name in weights) and any("over_arch" in name for name in weights)
    not_finite = [name for name, tensor in weights.items() if not torch.isfinite(tensor).all()]
    assert not not_finite, f"non-finite weights in the last good checkpoint: {not_finite}"
    assert int(state["progress"]["step"].item()) == manifest["step"]
    return manifest


# One global batch of the click_log fixture's train split where rank 1, and only rank 1, meets a row whose dense
# feature is infinite: the last batch of the second 2-step segment, so the segment's mean loss is NaN on rank 1 and
# finite on rank 0 (the NaN reaches rank 0's weights through the gradient all-reduce only after its last forward).
NAN_CHECKPOINT_EVERY = 2
NAN_GLOBAL_BATCH = 2 * NAN_CHECKPOINT_EVERY - 1


def _copy_with_one_infinite_dense_value(data: Path, out: Path, rank: int, global_batch: int) -> int:
    """Copies ``data`` to ``out`` with an infinite dense feature on one train row that, in a 2-rank run with global
    batch 256 and seed 0, only ``rank`` reads, in ``global_batch`` of epoch 0; returns that row (0-based)."""
    shutil.copytree(data, out)
    loaders = [
        ParquetBatchLoader(out, "train", 128, rank=r, world_size=2, shuffle=True, seed=0, last_batch="drop")
        for r in range(2)
    ]  # as the trainer's: local batch 256 / 2 ranks
    row = int(loaders[rank].epoch_rows(0)[0][global_batch * 128])
    assert all(row not in loader.epoch_rows(0)[0] for r, loader in enumerate(loaders) if r != rank)
    split = read_metadata(out).splits["train"]
    start = 0
    for rel, rows in zip(split.files, split.file_rows):
        if start <= row < start + rows:
            path = out / rel
            groups = pq.ParquetFile(path).metadata
            group_rows = groups.row_group(0).num_rows
            table = pq.read_table(path)
            name = DENSE_PREFIX + read_metadata(out).dense_fields[0]
            values = table.column(name).to_numpy().copy()
            values[row - start] = np.inf
            index = table.schema.get_field_index(name)
            table = table.set_column(index, table.schema.field(index), pa.array(values, type=pa.float32()))
            pq.write_table(table, path, row_group_size=group_rows)
            return row
        start += rows
    raise AssertionError(f"train row {row} is in no file")


@pytest.mark.multiprocess
def test_launcher_exits_with_the_recorded_status_of_a_worker_stopped_after_its_error(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """torchrun stops the other workers when one exits; a worker that had recorded its one-line error (every rank
    records a collective error such as a diverged loss) and was then stopped by SIGTERM is the job's first failure:
    the launcher prints its line and exits with the status it recorded, not 1."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from multiembed.cli import launch
    from multiembed.cli.errors import LAUNCHED_ENV, report_error

    line = "multiembed train: error: training loss is NaN or infinite at step 4 (epoch 0)"
    reply = tmp_path / "rank0.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(reply))
    monkeypatch.setenv(LAUNCHED_ENV, "1")  # as in a launched worker (and restored after the launcher sets it)
    report_error(line, EXIT_DIVERGED)
    assert reply.is_file() and capsys.readouterr().err == ""  # recorded, left to the launcher to print

    def torchrun_failing_with(exitcode: int):
        failure = ProcessFailure(local_rank=0, pid=1, exitcode=exitcode, error_file=str(reply))

        def torchrun(args) -> None:
            raise ChildFailedError("multiembed.cli", {0: failure})

        return torchrun

    monkeypatch.setattr(torch.distributed.run, "main", torchrun_failing_with(-signal.SIGTERM))
    assert launch.main(["torchrun", "-m", "multiembed.cli", "train"]) == EXIT_DIVERGED == 3
    assert capsys.readouterr().err.strip().splitlines() == [line]
    # A worker that exited on its own keeps its own status.
    monkeypatch.setattr(torch.distributed.run, "main", torchrun_failing_with(2))
    assert launch.main(["-m", "multiembed.cli", "train"]) == 2


@pytest.mark.multiprocess
def test_launcher_reports_the_rank_that_recorded_its_error_when_another_failed_first(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A rank torn down without a line of its own (here aborted, SIGABRT) may reach torchrun before the rank that
    recorded the job's one-line error: the launcher still prints the recorded line and exits with its status."""
    import time

    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from multiembed.cli import launch
    from multiembed.cli.errors import LAUNCHED_ENV, report_error

    line = "multiembed train: error: training loss is NaN or infinite at step 4 (epoch 0)"
    reply = tmp_path / "rank0.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(reply))
    monkeypatch.setenv(LAUNCHED_ENV, "1")
    report_error(line, EXIT_DIVERGED)
    capsys.readouterr()
    recorded = ProcessFailure(local_rank=0, pid=1, exitcode=-signal.SIGTERM, error_file=str(reply))
    aborted = ProcessFailure(local_rank=1, pid=2, exitcode=-signal.SIGABRT, error_file=str(tmp_path / "none.json"))
    aborted.timestamp = recorded.timestamp - 1  # seen first
    assert aborted.timestamp < recorded.timestamp and time.time() >= recorded.timestamp

    def torchrun(args) -> None:
        raise ChildFailedError("multiembed.cli", {1: aborted, 0: recorded})

    monkeypatch.setattr(torch.distributed.run, "main", torchrun)
    assert launch.main(["torchrun", "-m", "multiembed.cli", "train"]) == EXIT_DIVERGED
    assert capsys.readouterr().err.strip().splitlines() == [line]


def test_launcher_names_the_rank_the_signal_and_the_last_checkpoint_of_a_killed_worker(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """A worker killed by a signal records no error of its own: the launcher's one line says which rank ended by
    which signal and where the run's last complete checkpoint is (recorded for torchx too), not torchrun's
    ChildFailedError traceback."""
    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from multiembed.cli import launch
    from multiembed.cli.errors import one_line_error, recorded_exit_code
    from multiembed.training.distributed import init_distributed

    init_distributed("cpu")
    run = tmp_path / "run"
    kept = ckpt.save_checkpoint(run, 10, {"w": torch.zeros(2)}, {})
    (run / ckpt.CHECKPOINT_DIR / ".tmp-step-00000020").mkdir()  # the save the kill interrupted
    reply = tmp_path / "launcher-reply.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(reply))
    monkeypatch.delenv("MULTIEMBED_DEBUG", raising=False)

    def torchrun(args) -> None:
        failure = ProcessFailure(local_rank=1, pid=4242, exitcode=-signal.SIGKILL, error_file=str(tmp_path / "none"))
        raise ChildFailedError("multiembed.cli", {1: failure})

    monkeypatch.setattr(torch.distributed.run, "main", torchrun)
    status = launch.main(["torchrun", "--nproc_per_node", "2", "-m", "multiembed.cli", "train", "--data", "d",
                          "--out", str(run)])
    assert status == 128 + signal.SIGKILL
    lines = capsys.readouterr().err.strip().splitlines()
    expected = (f"multiembed train: error: rank 1 (pid 4242) was ended by signal SIGKILL; the last checkpoint is "
                f"{kept} (rerun with --resume to continue)")
    assert lines == [expected]
    assert one_line_error(reply.read_text()) == expected
    assert recorded_exit_code(reply.read_text()) == 128 + signal.SIGKILL


def test_nan_loss_on_one_rank_stops_every_rank_with_one_error_line(click_log: Path, tmp_path: Path) -> None:
    data, run, log = tmp_path / "data", tmp_path / "run", tmp_path / "launch.log"
    _copy_with_one_infinite_dense_value(click_log, data, rank=1, global_batch=NAN_GLOBAL_BATCH)
    # What the torchx component runs (torchrun through multiembed.cli.launch), here with its exit status.
    command = [
        str(VENV_BIN / "python"), "-m", "multiembed.cli.launch", "torchrun", "--standalone", "--nproc_per_node", "2",
        "-m", "multiembed.cli", "train", "--data", str(data), "--out", str(run), "--model", "dnn-me-2x",
        "--batch-size", "256", "--sharding", "table_wise", *TINY_WORKER, "--dense-features", "--epochs", "1",
        "--checkpoint-every", str(NAN_CHECKPOINT_EVERY),
    ]
    rc = _run_logged(command, log, torchx_env(), timeout=240)
    text = log.read_text(errors="replace")
    assert rc == EXIT_DIVERGED == 3, tail(log)
    errors = [line for line in text.splitlines() if "multiembed train: error:" in line]
    # One line, said once (not once per rank), the last one, and no traceback from a worker or from torchrun.
    assert len(errors) == 1, text
    assert [line for line in text.splitlines() if line.strip()][-1] == errors[0], text
    assert "Traceback" not in text and "ChildFailedError" not in text, text
    diverged_at = NAN_GLOBAL_BATCH + 1
    assert f"training loss is NaN or infinite at step {diverged_at} (epoch 0)" in errors[0], errors[0]
    last_good = run / ckpt.CHECKPOINT_DIR / ckpt.step_dir_name(diverged_at - NAN_CHECKPOINT_EVERY)
    assert f"the last good checkpoint is kept: {last_good}" in errors[0], errors[0]
    assert not (run / "summary.json").exists()
    manifest = _assert_last_good_checkpoint_intact(run, diverged_at, tmp_path)
    assert manifest["step"] == diverged_at - NAN_CHECKPOINT_EVERY
