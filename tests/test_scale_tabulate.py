"""``multiembed scale --tabulate``: the tables of a study's finished runs, nothing trained, the others named."""

from __future__ import annotations

import csv
from pathlib import Path

from multiembed.cli import main as cli_main
from multiembed.data.synthetic import CollapseRegimeConfig
from multiembed.data.synthetic.stream import write_stream_dataset


def _scale(data: Path, out: Path, modes: str, *extra: str) -> int:
    return cli_main(["scale", "--data", str(data), "--out", str(out), "--backbones", "dcnv2", "--modes", modes,
                     "--scales", "1", "--seeds", "1", "--batch-size", "100", "--hidden", "16", "--epochs", "1",
                     "--max-steps", "4", "--eval-every", "2", "--patience", "0", "--device", "cpu", "--no-progress",
                     *extra])


def test_tabulate_writes_the_finished_runs_and_trains_nothing(tmp_path: Path, capsys) -> None:
    data, out = tmp_path / "data", tmp_path / "study"
    write_stream_dataset(data, 1000, CollapseRegimeConfig(seed=1), split=(8, 1, 1), block_rows=64)
    assert _scale(data, out, "se") == 0
    capsys.readouterr()
    assert _scale(data, out, "se,me", "--tabulate") == 0
    assert "not finished yet (not trained by --tabulate): dcnv2-me-1x-seed0" in capsys.readouterr().out
    assert not (out / "runs" / "dcnv2-me-1x-seed0").exists()
    with open(out / "scaling.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["scale"], r["seed"]) for r in rows] == [("se", "1", "0")]
    assert "PARTIAL: 1 of 2 runs finished; not trained yet: dcnv2-me-1x-seed0" in (out / "scaling.md").read_text()
