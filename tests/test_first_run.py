"""A first run that reads well: ``make train``'s own recipe at a small size prints a short log (progress as a line
every 10 %, no third-party warnings, rank 0 only), and a refused run ends with the worker's one-line error rather
than torchrun's ``ChildFailedError`` traceback.

Both run torchx for real (``-s local_cwd``, two gloo ranks), with the helpers of ``test_torchx.py``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path
from typing import List

import pytest
from test_torchx import REPO, VENV_BIN, run_torchx, tail, torchx_command, torchx_env

# The recipe's size knobs: 20,000 rows of the built-in synthetic log (16,000 train rows, 31 steps of 512), a small
# DCNv2 with two sets; everything else is the Makefile's own `train` recipe.
SMALL = ["TRAIN_ROWS=20000", "TRAIN_MODEL=dcnv2-me-2x", "TRAIN_HIDDEN=32", "TRAIN_BATCH=512"]
STAMP = REPO / ".venv" / ".installed-cpu"


def lines_of(text: str) -> List[str]:
    """The lines a log file shows (a carriage return does not start one)."""
    return text.rstrip("\n").split("\n")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_make_train_prints_a_short_log(tmp_path: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    # `-o STAMP`: take the installed venv as it is (never reinstall it from a test); the rest is `make train`.
    command = ["make", "--no-print-directory", "-o", str(STAMP.relative_to(REPO)), "train",
               f"TRAIN_DATA={data}", f"TRAIN_RUN={run}", *SMALL]
    log = tmp_path / "make.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=torchx_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"make train did not finish; log:\n{tail(log)}")
    text = log.read_text(errors="replace")
    assert rc == 0, tail(log)
    lines = lines_of(text)
    assert len(lines) < 60, f"{len(lines)} lines:\n{text}"
    # Progress as whole lines (10 % marks over the run's 31 steps), from rank 0 only.
    progress = [line for line in lines if re.search(r"epoch 0: +\d+% \d+/31 step", line)]
    assert 5 <= len(progress) <= 12, "\n".join(progress) or text
    assert any("100% 31/31" in line for line in progress)
    assert not any(line.startswith("cli/0 [1]:") for line in lines), text
    # No known third-party noise.
    for noise in ("FutureWarning", "caching params will be ignored", "is_fx_tracing", "autograd kernel was not"):
        assert noise not in text, noise
    # The final metrics table and the run directory.
    assert re.search(r"test AUC +0\.\d+ +0\.\d+", text), text
    assert f"run directory: {run}" in text
    assert (run / "summary.json").is_file() and (run / "plan.txt").is_file()


@pytest.mark.multiprocess
def test_refused_run_ends_with_the_workers_one_line_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    subprocess.run([str(VENV_BIN / "multiembed"), "synth", "--rows", "2000", "--scale", "0.001", "--out", str(data),
                    "--no-progress"], check=True, capture_output=True)
    not_a_run = tmp_path / "notes"
    not_a_run.mkdir()
    (not_a_run / "todo.txt").write_text("not a run directory\n")
    component_args = ["--data", str(data), "--out", str(not_a_run), "--model", "dnn-me-2x", "--batch_size", "256",
                      "-j", "1x2"]
    log = tmp_path / "torchx.log"
    rc = run_torchx(torchx_command(tmp_path / "logs", component_args, ["--hidden", "32"]), log)
    text = log.read_text(errors="replace")
    assert rc != 0
    error = f"multiembed train: error: --out {not_a_run}: exists; pass --resume to continue that run or --overwrite"
    last = [line for line in lines_of(text) if line.strip()][-1]
    assert error in last, text
    # Said once by the launcher (not by every rank), and no torchrun traceback.
    worker_lines = [line for line in lines_of(text) if line.startswith("cli/0") and error in line]
    assert len(worker_lines) == 1, text
    assert "Traceback" not in text and "ChildFailedError" not in text, text
