"""The torchx ``convert`` component: the ranks of a job (here two "nodes" of one rank each, ``-j 2x1``, through a real
``torchx run -s local_cwd``) convert their shares of the inputs into the same dataset as one process, and a bad row
on one rank fails the whole job with its one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_utils import free_port
from test_convert_workers import _dataset, _inputs
from test_torchx import COMPONENTS, VENV_BIN, ComponentTestCase, load_components, run_torchx, tail

from multiembed.cli import build_parser
from multiembed.data.convert import ConvertOptions, convert


class TestConvertComponentParses(ComponentTestCase):
    def test_convert_component_validates(self) -> None:
        self.validate(load_components(), "convert")


def test_convert_component_command_is_the_clis() -> None:
    app = load_components().convert(
        "day_0.gz", "day_1.gz", dataset="criteo-1tb", out="/shared/out", hash_sizes="mlperf", split="8,1,1",
        overwrite=True, threads_per_worker=4, j="24x1",
    )
    (role,) = app.roles
    command = role.args[-1]
    assert role.num_replicas == 24 and "--nnodes 24" in command and "--nproc_per_node 1" in command
    words = command.split(" -m multiembed.cli ", 1)[1].split()
    args = build_parser().parse_args(words)  # every flag the component writes is the convert command's own
    assert (args.dataset, args.inputs, args.out) == ("criteo-1tb", ["day_0.gz", "day_1.gz"], "/shared/out")
    assert (args.hash_sizes, args.split, args.overwrite, args.threads_per_worker) == ("mlperf", "8,1,1", True, 4)
    with pytest.raises(ValueError, match="give the raw log files"):
        load_components().convert(dataset="criteo", out="o")


def torchx_convert(tmp_path: Path, out: Path, inputs, *options: str) -> tuple:
    command = [
        str(VENV_BIN / "torchx"), "run", "-s", "local_cwd", "-cfg", f"log_dir={tmp_path / 'logs'}",
        f"{COMPONENTS}:convert", "--dataset", "criteo", "--out", str(out), "-j", "2x1",
        "--rdzv_port", str(free_port()), *options, *inputs,
    ]
    log = tmp_path / f"torchx-{out.name}.log"
    return run_torchx(command, log, timeout=240), log


def test_two_nodes_convert_the_same_dataset_as_one_process(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    inputs = _inputs(tmp_path)  # 3 inputs: rank 0 converts two, rank 1 one
    convert(ConvertOptions("criteo", inputs, str(tmp_path / "one"), min_count=2, progress=False))
    rc, log = torchx_convert(tmp_path, tmp_path / "two", inputs, "--min_count", "2")
    assert rc == 0, tail(log)
    one, two = _dataset(tmp_path / "one"), _dataset(tmp_path / "two")
    assert one["metadata"] == two["metadata"]
    assert one["files"] == two["files"] and len(one["files"]) == 9
    for name in one["files"]:
        assert one["tables"][name].equals(two["tables"][name]), name
    state = tmp_path / "two" / ".convert"
    assert sorted(p.name for p in state.iterdir()) == [f"part-{i:05d}.json" for i in range(3)]  # count files removed
    assert not (tmp_path / "two" / ".multiembed.lock").exists()


def test_a_bad_row_on_one_rank_fails_the_job_with_its_line(tmp_path: Path) -> None:
    (tmp_path / "raw").mkdir()
    inputs = _inputs(tmp_path)
    lines = Path(inputs[1]).read_text().splitlines(keepends=True)  # input 1: rank 1's
    cells = lines[41].split("\t")
    cells[5] = "12x"
    lines[41] = "\t".join(cells)
    Path(inputs[1]).write_text("".join(lines))
    rc, log = torchx_convert(tmp_path, tmp_path / "out", inputs, "--min_count", "2")
    assert rc != 0
    assert f"{inputs[1]}:42: I5: " in log.read_text(), tail(log)
    assert not (tmp_path / "out" / "metadata.json").exists()
