"""Nothing too big starts: the memory a run needs (tables and their optimizer state, dense parameters and theirs,
one batch's activations) is counted on ``meta`` and refused in one line with both numbers when this machine's
available memory cannot hold it (``train``, ``days`` before its directory exists, a model whose sizes overflow
64 bits included); ``plan`` plans such a model on paper without allocating it, and the planner reserves the same
dense bytes the admission counts, on a topology sized from this machine's memory. ``synth`` refuses rows beyond the
disk and a click model beyond the available memory before writing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multiembed.cli import main as cli_main
from multiembed.config import TrainConfig
from multiembed.training import memory
from multiembed.training.build import account_memory

SMALL = ["--batch-size", "256", "--hidden", "16", "--epochs", "1", "--max-steps", "2", "--device", "cpu",
         "--no-progress", "--ia-every", "0"]


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("admission") / "data"
    assert cli_main(["synth", "--rows", "2000", "--scale", "0.001", "--seed", "7", "--out", str(out),
                     "--no-progress"]) == 0
    return out


@pytest.mark.parametrize("model", ["dcnv2-me-4x20000", "dcnv2-me-1x10000000"])
def test_a_model_too_big_for_this_machine_is_refused_before_it_allocates(data, tmp_path, capsys, model) -> None:
    capsys.readouterr()
    assert cli_main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", model, *SMALL]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"multiembed train: error: --model {model}: needs about "), line
    assert "TiB per rank" in line and "is available per rank" in line and "MemAvailable" in line
    assert not (tmp_path / "run").exists()  # refused before the run directory is created


def test_a_model_too_big_for_torch_to_describe_is_refused_in_one_line(data, tmp_path, capsys) -> None:
    """A model whose cross-layer weight's byte count overflows 64 bits is refused like any model too big, by
    ``train`` and ``plan``, instead of ending on torch's overflow as an unexpected error."""
    model = "dcnv2-me-1x100000000"
    capsys.readouterr()
    assert cli_main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", model, *SMALL]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"multiembed train: error: --model {model}: ") and "2^63 bytes" in line, line
    assert not (tmp_path / "run").exists()
    assert cli_main(["plan", "--model", model, "--world-size", "1", "--device", "cpu", "--data", str(data)]) == 2
    assert "2^63 bytes" in _error_line(capsys)


def test_days_refuses_a_model_too_big_before_creating_its_directory(tmp_path, capsys) -> None:
    days = tmp_path / "log"
    assert cli_main(["synth", "--days", "2", "--rows", "400", "--scale", "0.001", "--out", str(days),
                     "--no-progress"]) == 0
    day_dirs = sorted(str(p) for p in days.iterdir() if p.is_dir())
    capsys.readouterr()
    assert cli_main(["days", "--data", *day_dirs, "--out", str(tmp_path / "loop"), "--model", "dcnv2-me-4x20000",
                     "--batch-size", "256", "--hidden", "16", "--device", "cpu", "--no-progress"]) == 2
    assert "--model dcnv2-me-4x20000: needs about " in _error_line(capsys)
    assert not (tmp_path / "loop").exists()


def test_synth_refuses_a_dataset_that_cannot_fit_before_writing(tmp_path, capsys, monkeypatch) -> None:
    """Rows beyond the disk, or a click model beyond the available memory, are refused in one line with both
    numbers before anything is drawn or written."""
    from multiembed.data.synthetic import write

    monkeypatch.setattr(write, "_available_memory", lambda: 8 * 2**30)
    capsys.readouterr()
    for argv, words in (
        (["--rows", str(10**14), "--scale", "0.001"], ("rows need at least", "GiB free")),
        (["--rows", str(10**14), "--scale", "0.001", "--days", "3"], ("rows need at least", "GiB free")),
        (["--rows", "1000", "--scale", "1000000"], ("--scale 1e+06", "GiB is available")),
    ):
        assert cli_main(["synth", *argv, "--out", str(tmp_path / "big"), "--no-progress"]) == 2
        line = _error_line(capsys)
        assert all(word in line for word in words), line
        assert not (tmp_path / "big").exists()


def test_a_refused_overwrite_keeps_the_run_it_would_have_replaced(data, tmp_path, capsys) -> None:
    run = tmp_path / "run"
    assert cli_main(["train", "--data", str(data), "--out", str(run), "--model", "dnn-me-2x", *SMALL]) == 0
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    capsys.readouterr()
    assert cli_main(["train", "--data", str(data), "--out", str(run), "--model", "dcnv2-me-4x20000", "--overwrite",
                     *SMALL]) == 2
    assert "is available per rank" in _error_line(capsys)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_a_run_that_fails_to_build_leaves_no_directory_it_created(tmp_path) -> None:
    from multiembed.training.run_dir import RunDir

    existing = tmp_path / "kept"
    existing.mkdir()
    for target in (tmp_path / "new" / "deeper" / "run", existing):
        run = RunDir(target)
        assert run._lock_and_clear(overwrite=False) is None
        run.abandon()
    assert not (tmp_path / "new").exists()  # every level the run created went
    assert existing.is_dir()  # a directory that existed before stays


def test_plan_sizes_the_topology_from_this_machine(capsys, monkeypatch) -> None:
    monkeypatch.setattr(memory, "_meminfo", lambda: {"MemTotal": 48 * 2**30, "MemAvailable": 40 * 2**30})
    monkeypatch.setattr(memory, "_cgroup_limit", lambda: None)
    capsys.readouterr()
    assert cli_main(["plan", "--model", "dcnv2-me-2x", "--data", "criteo-kaggle", "--world-size", "2",
                     "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "capacity 24.00 GiB per rank (host memory from MemTotal / MemAvailable of /proc/meminfo, divided by the 2 " \
        "ranks on this host)" in out, out
    assert cli_main(["plan", "--model", "dcnv2-me-2x", "--data", "criteo-kaggle", "--world-size", "2",
                     "--device", "cpu", "--ddr-gb", "100"]) == 0
    assert "capacity 100.00 GiB per rank (--ddr-gb)" in capsys.readouterr().out


def test_plan_plans_a_huge_model_on_paper_without_allocating_it(capsys) -> None:
    capsys.readouterr()
    status = cli_main(["plan", "--model", "dcnv2-me-4x20000", "--data", "criteo-kaggle", "--world-size", "1",
                       "--device", "cpu"])
    assert status == 2
    line = _error_line(capsys)
    assert line.startswith("multiembed plan: error: --model dcnv2-me-4x20000: needs about "), line
    assert "TiB per rank" in line and "a rank of this plan has" in line and "/proc/meminfo" in line


def test_the_account_counts_tables_dense_state_and_activations() -> None:
    config = TrainConfig(data="d", out="o", model="dnn-me-2x", hidden=16)
    vocab = {"f1": 100, "f2": 50}
    account = account_memory(config, vocab, num_dense=0, device_type="cpu", world_size=2, batch_size=64)
    from multiembed.models import build_model

    model = build_model("dnn-me-2x", vocab, device=torch.device("cpu"), hidden=16)
    dense_params = sum(p.numel() for n, p in model.named_parameters() if "embedding_bags" not in n)
    assert account.dense_bytes == dense_params * 4 * (2 + 2)  # weights, gradients, Adam's two moments
    # Tables: 150 rows x 2 sets x the stored set width, fp32, plus the CPU default optimizer's state (Adagrad: one
    # value per weight).
    width = model.sparse_arch.num_sets * model.sparse_arch.stored_set_dim
    assert account.table_bytes == 150 * width * 4 * 2
    embeddings = 64 * 2 * 2 * model.sparse_arch.set_dim * 4
    assert account.activation_bytes > memory.ACTIVATION_FACTOR * embeddings
    assert account.per_rank_bytes == -(-account.table_bytes // 2) + account.dense_bytes + account.activation_bytes


def test_machine_memory_takes_the_cgroup_limit_and_divides_by_local_ranks(monkeypatch) -> None:
    monkeypatch.setattr(memory, "_meminfo", lambda: {"MemTotal": 64 * 2**30, "MemAvailable": 60 * 2**30})
    monkeypatch.setattr(memory, "_cgroup_limit", lambda: None)
    machine = memory.machine_memory(torch.device("cpu"), 4)
    assert (machine.total_bytes, machine.available_bytes) == (16 * 2**30, 15 * 2**30)
    monkeypatch.setattr(memory, "_cgroup_limit", lambda: (8 * 2**30, 2 * 2**30))
    machine = memory.machine_memory(torch.device("cpu"), 2)
    assert (machine.total_bytes, machine.available_bytes) == (4 * 2**30, 3 * 2**30)
    assert "cgroup" in machine.source and "2 ranks" in machine.source


def test_the_planner_reserves_what_the_admission_counts_on_this_machines_capacity(data, tmp_path, monkeypatch) -> None:
    from multiembed.sharding import planner
    from multiembed.training import build

    seen = {}
    real_reservation, real_plan = planner.HeuristicalStorageReservation, build.plan_sharding

    def reservation(*args, **kwargs):
        seen["dense_tensor_estimate"] = kwargs.get("dense_tensor_estimate")
        return real_reservation(*args, **kwargs)

    def plan(*args, **kwargs):
        seen["ddr_gb"] = kwargs.get("ddr_gb")
        return real_plan(*args, **kwargs)

    monkeypatch.setattr(planner, "HeuristicalStorageReservation", reservation)
    monkeypatch.setattr(build, "plan_sharding", plan)
    assert cli_main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--model", "dnn-me-2x",
                     *SMALL]) == 0
    from multiembed.data.metadata import read_metadata

    meta = read_metadata(data)
    config = TrainConfig(data=str(data), out="o", model="dnn-me-2x", hidden=16, batch_size=256)
    account = account_memory(config, meta.vocab_sizes, num_dense=0, device_type="cpu", world_size=1, batch_size=256)
    assert seen["dense_tensor_estimate"] == account.dense_bytes + account.activation_bytes
    assert seen["ddr_gb"] == pytest.approx(memory.machine_memory(torch.device("cpu"), 1).total_bytes / 2**30)
