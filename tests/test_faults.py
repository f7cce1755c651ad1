"""Faults during training: a rank killed mid-epoch (torchrun restarts the job from the newest complete checkpoint
and it ends exactly as an uninterrupted run), and a diverging loss (one error line, exit status 3, the last good
checkpoint kept and intact).

Interrupted and corrupted checkpoint writes are covered in ``test_training_units.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
from test_torchx import REPO, TINY_TRAIN, TINY_WORKER, run_torchx, tail, torchx_command, torchx_env

from multiembed.cli import main as cli_main
from multiembed.cli.train import EXIT_DIVERGED
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


@pytest.mark.multiprocess
def test_rank_killed_mid_epoch_restarts_from_newest_checkpoint_and_ends_as_uninterrupted_run(
    click_log: Path, tmp_path: Path
) -> None:
    # 16000 train rows / global batch 256: 62 steps an epoch, 2 epochs, a checkpoint every 10 steps. Dropout stays
    # on, so the per-rank RNG state in the checkpoint matters for the result too.
    def component_args(run: Path) -> List[str]:
        return [
            "--data", str(click_log), "--out", str(run), *TINY_TRAIN, "--epochs", str(EPOCHS), "--patience", "0",
            "--checkpoint_every", str(CHECKPOINT_EVERY), "--max_restarts", "1", "-j", "1x2",
        ]

    restarted, restarted_log = tmp_path / "restarted", tmp_path / "restarted.log"
    env = torchx_env()
    env["LOGLEVEL"] = "INFO"  # torchrun reports the failed worker group and the restart at INFO
    with open(restarted_log, "wb") as out:
        proc = subprocess.Popen(
            torchx_command(tmp_path / "logs-restarted", component_args(restarted), TINY_WORKER),
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

    reference, reference_log = tmp_path / "uninterrupted", tmp_path / "uninterrupted.log"
    rc = run_torchx(torchx_command(tmp_path / "logs-reference", component_args(reference), TINY_WORKER), reference_log)
    assert rc == 0, tail(reference_log)
    assert "resumed from" not in reference_log.read_text(errors="replace")

    got = json.loads((restarted / "summary.json").read_text())
    want = json.loads((reference / "summary.json").read_text())
    assert want["steps"] == EPOCHS * STEPS_PER_EPOCH and want["world_size"] == 2
    # Same data order, same RNG streams, the same segment boundaries (every 10 steps and at epoch ends) and
    # gloo's fixed reduction order on CPU: the restarted run must be bit-identical, so no tolerance.
    assert {k: v for k, v in got.items() if k not in TIMING_KEYS} == {
        k: v for k, v in want.items() if k not in TIMING_KEYS
    }
    # Per evaluation, including each segment's mean training loss: no batch skipped or trained twice.
    assert _evaluations(restarted) == _evaluations(reference)


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
