"""``multiembed convert --workers N``: a process pool converts several inputs at once into the same dataset as one
worker (same Parquet tables in the same files, same metadata.json), and a bad row fails the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pyarrow.parquet as pq
import pytest

from multiembed.cli import main
from multiembed.data.convert import ConvertOptions, convert

from test_convert import criteo_rows, write_lines

TIMING_KEYS = ("seconds", "created", "timings", "elapsed")


def _inputs(tmp_path: Path) -> List[str]:
    paths = []
    for i, rows in enumerate((300, 170, 240)):
        paths.append(str(write_lines(tmp_path / "raw" / f"day_{i}", criteo_rows(rows, seed=10 + i, unique_c1=False))))
    return paths


def _without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timings(v) for v in value]
    return value


def _dataset(out: Path) -> Dict[str, Any]:
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet"))
    return {
        "metadata": _without_timings(json.loads((out / "metadata.json").read_text())),
        "files": files,
        "tables": {f: pq.read_table(out / f) for f in files},
    }


@pytest.mark.parametrize("mode", ["hashing", "paper"])
def test_two_workers_give_the_same_dataset_as_one(tmp_path, mode):
    (tmp_path / "raw").mkdir()
    inputs = _inputs(tmp_path)
    extra: Dict[str, Any] = {"hash_size": 997} if mode == "hashing" else {"min_count": 2}
    results = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        result = convert(ConvertOptions("criteo", inputs, str(out), mode=mode, progress=False, chunk_bytes=4096,
                                        row_group_size=50, workers=workers,
                                        threads_per_worker=1 if workers > 1 else None, **extra))
        assert result.converted == inputs and result.rows_converted == 710
        results[workers] = _dataset(out)
    one, two = results[1], results[2]
    assert one["metadata"] == two["metadata"]
    assert one["files"] == two["files"] and len(one["files"]) == 9  # 3 inputs x 3 splits
    for name in one["files"]:
        assert one["tables"][name].equals(two["tables"][name]), name
    assert one["metadata"]["options"]["mode"] == mode


def test_vocab_from_a_paper_dataset_under_two_workers(tmp_path):
    (tmp_path / "raw").mkdir()
    inputs = _inputs(tmp_path)
    convert(ConvertOptions("criteo", inputs[:1], str(tmp_path / "source"), min_count=2, progress=False))
    datasets = []
    for workers in (1, 2):
        out = tmp_path / f"held-{workers}"
        convert(ConvertOptions("criteo", inputs[1:], str(out), vocab_from=str(tmp_path / "source"), split="0,0,1",
                               progress=False, workers=workers))
        datasets.append(_dataset(out))
    assert datasets[0]["metadata"] == datasets[1]["metadata"]
    assert all(datasets[0]["tables"][f].equals(datasets[1]["tables"][f]) for f in datasets[0]["files"])


def test_workers_resume_skips_complete_inputs(tmp_path):
    (tmp_path / "raw").mkdir()
    inputs = _inputs(tmp_path)
    options = ConvertOptions("criteo", inputs, str(tmp_path / "out"), min_count=2, progress=False, workers=3)
    first = convert(options)
    again = convert(options)
    assert again.converted == [] and again.reused == inputs and again.vocab_reused
    assert again.metadata.split_rows() == first.metadata.split_rows()


def test_bad_row_under_two_workers_is_the_same_one_line_error(tmp_path, capsys):
    (tmp_path / "raw").mkdir()
    inputs = _inputs(tmp_path)
    lines = Path(inputs[1]).read_text().splitlines(keepends=True)
    cells = lines[41].split("\t")
    cells[5] = "12x"  # I5 of physical line 42 of the second input
    lines[41] = "\t".join(cells)
    Path(inputs[1]).write_text("".join(lines))
    errors = {}
    for workers in (1, 2):
        for mode in ("hashing", "paper"):
            out = tmp_path / f"out-{workers}-{mode}"
            status = main(["convert", "criteo", *inputs, "--out", str(out), "--mode", mode, "--quiet",
                           "--workers", str(workers)] + (["--hash-size", "1000"] if mode == "hashing" else []))
            err = capsys.readouterr().err
            assert status == 2
            err_lines = [line for line in err.splitlines() if line.strip()]
            assert len(err_lines) == 1 and "Traceback" not in err, err
            errors[workers, mode] = err_lines[0].replace(str(out), "OUT")
            assert not (out / "metadata.json").exists()
            assert [p for p in out.rglob("*") if ".tmp" in p.name] == []
    for mode in ("hashing", "paper"):
        assert errors[1, mode] == errors[2, mode]
        assert errors[2, mode].startswith(f"multiembed convert: error: {inputs[1]}:42: I5: "), errors[2, mode]


def test_workers_option_is_checked(tmp_path):
    with pytest.raises(ValueError, match="--workers must be >= 1"):
        convert(ConvertOptions("criteo", ["x"], str(tmp_path / "out"), workers=0))
    with pytest.raises(ValueError, match="--threads-per-worker must be >= 1"):
        convert(ConvertOptions("criteo", ["x"], str(tmp_path / "out"), workers=2, threads_per_worker=0))
