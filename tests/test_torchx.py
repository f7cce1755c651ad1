"""The torchx components: they parse as torchx components (``ComponentTestCase``), build the torchrun command the
docstrings promise, and really run with ``torchx run -s local_cwd`` on this machine, as two local ranks (``-j 1x2``)
and as two one-rank "nodes" (``-j 2x1``, so the planner sees a multi-node topology and the c10d rendezvous runs on
an explicit port).

The helpers here (``torchx_command``, ``torchx_env``) are shared with ``test_faults.py``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import List, Optional, Sequence

import pytest
from dist_utils import free_port
from torchx.components.component_test_base import ComponentTestCase

from multiembed.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = REPO / "torchx_components.py"
VENV_BIN = Path(sys.executable).parent

# The smallest configuration that still trains through DMP, the pipeline and DCP on both ranks.
TINY_TRAIN = ["--model", "dnn-me-2x", "--batch_size", "256", "--sharding", "table_wise"]
TINY_WORKER = ["--hidden", "32", "--device", "cpu", "--no-progress"]


def load_components() -> ModuleType:
    """``torchx_components.py`` imported from the repository root (it is not part of the installed package)."""
    spec = importlib.util.spec_from_file_location("torchx_components", COMPONENTS)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchx_env() -> dict:
    """The environment for a ``torchx run`` subprocess.

    torchx starts ``torchrun`` through bash, so the venv's bin goes first on PATH. One intra-op thread per rank:
    torchrun sets that itself only with several processes per node, and -j 2x1 would otherwise run 4 threads on 2
    cores.
    """
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["OMP_NUM_THREADS"] = "1"
    env.pop("MULTIEMBED_DEBUG", None)
    return env


def torchx_command(log_dir: Path, component_args: Sequence[str], worker_args: Sequence[str] = ()) -> List[str]:
    """``torchx run -s local_cwd ./torchx_components.py:train ...`` with replica logs under ``log_dir``."""
    command = [
        str(VENV_BIN / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={log_dir}",
        f"{COMPONENTS}:train", *component_args,
    ]
    if worker_args:
        command += ["--", *worker_args]
    return command


def run_torchx(command: Sequence[str], log: Path, timeout: float = 300, cwd: Optional[Path] = None) -> int:
    """Runs a torchx command to completion (its own process group, killed on timeout) in ``cwd`` (default: the
    repository); output goes to ``log``."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(command), cwd=cwd or REPO, env=torchx_env(), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"torchx run did not finish in {timeout} s; log:\n{tail(log)}")


def tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


# ------------------------------------------------------------------------------------------ component checks
class TestComponentsParse(ComponentTestCase):
    """What ``torchx run ./torchx_components.py:<fn> --help`` checks: typed arguments and a parseable docstring."""

    def test_train_component_validates(self) -> None:
        self.validate(load_components(), "train")

    def test_benchmark_component_validates(self) -> None:
        self.validate(load_components(), "benchmark")


def _command_line(app) -> str:
    (role,) = app.roles
    assert role.entrypoint == "bash" and role.args[0] == "-c"
    return role.args[1]


def test_train_component_builds_the_worker_command_line() -> None:
    components = load_components()
    app = components.train("--dropout", "0", data="d", out="r", model="dnn-me-2x", batch_size=512, j="1x2")
    command = _command_line(app)
    # torchrun through multiembed.cli.launch, which ends a failed job with the worker's one-line error.
    assert command.startswith("python -m multiembed.cli.launch torchrun ")
    assert "--nproc_per_node 2" in command and "--nnodes 1" in command
    # One node: torchx lets torchrun pick a free rendezvous port (never a fixed one).
    assert "--rdzv_endpoint localhost:0" in command
    assert "-m multiembed.cli train --data d --out r --model dnn-me-2x" in command
    assert "--batch-size 512" in command and command.endswith("--dropout 0")
    assert "--max-restarts" not in command and "--resume" not in command


def test_component_options_are_the_trainers_own() -> None:
    """Every option a component passes to the worker is a TrainConfig field with the same default, so an option is
    defined once (multiembed.config) and the components cannot drift from it."""
    import dataclasses
    import inspect

    from multiembed.config import TrainConfig

    components = load_components()
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    grid = {"backbones", "scales", "modes", "seeds", "preset"}
    for component in (components.train, components.scaling_study):
        for name, parameter in inspect.signature(component).parameters.items():
            if name in components.LAUNCH_PARAMETERS or name in grid:
                continue
            assert name in fields, f"{component.__name__}: {name} is not a TrainConfig option"
            default = fields[name].default
            if component is components.train and default is not dataclasses.MISSING:
                assert parameter.default == default, f"train: {name} defaults to {parameter.default!r}, not {default!r}"


def test_max_restarts_reaches_torchrun_and_makes_workers_resume() -> None:
    components = load_components()
    app = components.train(data="d", out="r", max_restarts=2, checkpoint_every=50)
    command = _command_line(app)
    assert command.startswith("python -m multiembed.cli.launch torchrun --max-restarts 2 ")
    assert "--checkpoint-every 50" in command and " --resume" in command
    # A fresh rendezvous store per restart attempt (the shared one hands out the dead attempt's addresses).
    assert app.roles[0].env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    with pytest.raises(ValueError, match="overwrite cannot be combined"):
        components.train(data="d", out="r", max_restarts=1, overwrite=True)


def test_multi_node_jobs_rendezvous_on_the_given_port() -> None:
    components = load_components()
    app = components.train(data="d", out="r", j="2x1", rdzv_port=41234)
    command = _command_line(app)
    assert "--nnodes 2" in command and "--nproc_per_node 1" in command
    # The host is a torchx macro the scheduler fills in (TORCHX_RANK0_HOST, "localhost" under local_cwd).
    assert "--rdzv_endpoint $${${rank0_env}:=localhost}:41234 " in command
    assert app.roles[0].num_replicas == 2


def test_benchmark_component_builds_the_bench_command_line() -> None:
    components = load_components()
    command = _command_line(components.benchmark(out="b.json", steps=3, quick=True, j="1x2"))
    assert "-m multiembed.cli bench --json b.json" in command and "--steps 3" in command
    assert command.rstrip().endswith("--quick") and "--nproc_per_node 2" in command


# ------------------------------------------------------------------------------------------------ real runs
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("torchx") / "data"
    assert cli_main(["synth", "--rows", "4000", "--out", str(out), "--seed", "5", "--scale", "0.001", "--no-progress"]) == 0
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "topology,local_world_size",
    [("1x2", 2), ("2x1", 1)],
    ids=["one-node-two-ranks", "two-nodes-one-rank-each"],
)
def test_torchx_local_run_trains_on_two_ranks(tiny_data: Path, tmp_path: Path, topology: str, local_world_size: int) -> None:
    run = tmp_path / "run"
    component_args = [
        "--data", str(tiny_data), "--out", str(run), *TINY_TRAIN, "--epochs", "1", "-j", topology,
        # Only multi-node jobs use it (one node lets torchrun pick a port); free either way, never 29500.
        "--rdzv_port", str(free_port()),
    ]
    log = tmp_path / "torchx.log"
    rc = run_torchx(torchx_command(tmp_path / "logs", component_args, TINY_WORKER), log)
    assert rc == 0, tail(log)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    # 3200 train rows, global batch 256, the last partial batch dropped: 12 steps on each rank, together.
    assert summary["steps"] == 3200 // 256
    assert summary["val_rows"] == 400 and summary["test_rows"] == 400
    provenance = json.loads((run / "config.json").read_text())["provenance"]
    assert provenance["world_size"] == 2 and provenance["local_world_size"] == local_world_size
