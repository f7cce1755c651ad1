"""The examples run as their docstrings say: ``examples/train_own_loop.py`` (a multiembed model in a hand-written
TorchRec loop: planner, DMP, fused sparse optimizer, ``TrainPipelineSparseDist``) trains on two gloo ranks through
``torchx run -s local_cwd dist.ddp --script`` and learns its planted signal.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_torchx import REPO, VENV_BIN, run_torchx, tail

EXAMPLE = REPO / "examples" / "train_own_loop.py"


@pytest.mark.multiprocess
def test_own_loop_example_learns_on_two_ranks(tmp_path: Path) -> None:
    out = tmp_path / "losses.json"
    command = [
        str(VENV_BIN / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
        "dist.ddp", "-j", "1x2", "--script", str(EXAMPLE.relative_to(REPO)),
        "--", "--steps", "60", "--json", str(out),
    ]
    log = tmp_path / "torchx.log"
    rc = run_torchx(command, log)
    assert rc == 0, tail(log)
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["steps"] == 60 and len(result["losses"]) == 60
    # The planted signal is learnt: the mean loss of the last 10 steps is below that of the first 10.
    assert result["last10_loss"] < result["first10_loss"], result
    assert "mean loss: first 10 steps" in log.read_text()
