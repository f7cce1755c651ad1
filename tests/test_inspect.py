"""``multiembed inspect``: the JSON keys it promises, the text summary, and start-up without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from multiembed.cli import main
from multiembed.data.metadata import read_metadata, write_metadata


def criteo_line(i: int, label: int) -> str:
    ints = [str((i * 3 + k) % 40 - 2) if (i + k) % 4 else "" for k in range(13)]
    cats = ["%08x" % ((i * 13 + k) % 11) for k in range(26)]
    return "\t".join([str(label)] + ints + cats)


@pytest.fixture
def dataset(tmp_path) -> Path:
    lines = [criteo_line(i, int(i % 3 == 0)) for i in range(50)]
    lines[7] = "\t".join(lines[7].split("\t")[:30])  # one row with too few columns
    lines[9] = "5" + lines[9][1:]  # one label out of range
    src = tmp_path / "day_0"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "data"
    assert main(["convert", "criteo", str(src), "--out", str(out), "--min-count", "2", "--on-error", "skip",
                 "--quiet"]) == 0
    return out


def inspect_json(capsys, directory: Path, *extra: str) -> dict:
    capsys.readouterr()
    assert main(["inspect", str(directory), "--json", *extra]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1  # one JSON object on one line
    return json.loads(out)


def test_json_has_splits_vocab_sizes_in_field_order_and_skipped(dataset, capsys):
    info = inspect_json(capsys, dataset)
    meta = json.loads((dataset / "metadata.json").read_text())
    assert info["splits"] == {name: meta["splits"][name]["rows"] for name in ("train", "val", "test")}
    assert sum(info["splits"].values()) == 48
    assert list(info["vocab_sizes"].items()) == [(f["name"], f["vocab_size"]) for f in meta["fields"]]
    assert list(info["vocab_sizes"])[:2] == ["I1", "I2"] and len(info["vocab_sizes"]) == 39
    assert info["skipped"] == {"bad_label": 1, "column_count": 1}
    assert "bayes_auc" not in info  # not synthetic data


def test_json_skipped_is_empty_when_nothing_was_skipped(tmp_path, capsys):
    src = tmp_path / "day_0"
    src.write_text("".join(criteo_line(i, i % 2) + "\n" for i in range(20)))
    assert main(["convert", "criteo-1tb", str(src), "--out", str(tmp_path / "d"), "--hash-size", "97", "--quiet"]) == 0
    info = inspect_json(capsys, tmp_path / "d")
    assert info["skipped"] == {}
    assert info["splits"] == {"train": 16, "val": 2, "test": 2}
    assert info["vocab_sizes"] == {f"C{i}": 97 for i in range(1, 27)}


def test_json_bayes_auc_from_metadata(dataset, capsys):
    meta = read_metadata(dataset)
    meta.bayes = {"train": {"auc": 0.7712, "logloss": 0.45}, "val": {"auc": 0.7689, "logloss": 0.46},
                  "test": {"auc": 0.7701, "logloss": 0.455}}
    write_metadata(dataset, meta)
    info = inspect_json(capsys, dataset)
    assert info["bayes_auc"] == {"train": 0.7712, "val": 0.7689, "test": 0.7701}


def test_synthetic_dataset_reports_its_bayes_auc(tmp_path, capsys):
    out = tmp_path / "synth"
    assert main(["synth", "--rows", "2000", "--out", str(out)]) == 0
    info = inspect_json(capsys, out)
    meta = read_metadata(out)
    assert info["bayes_auc"] == {split: values["auc"] for split, values in meta.bayes.items()}
    assert set(info) >= {"splits", "vocab_sizes", "skipped", "bayes_auc"}
    assert sum(info["splits"].values()) == 2000


def test_text_summary(dataset, capsys):
    capsys.readouterr()
    assert main(["inspect", str(dataset)]) == 0
    text = capsys.readouterr().out
    meta = read_metadata(dataset)
    rows = meta.split_rows()
    assert f"train {rows['train']:,}, val {rows['val']:,}, test {rows['test']:,}" in text
    assert "skipped by reason: bad_label 1, column_count 1" in text
    assert meta.vocab_fingerprint in text


def test_no_check_reads_metadata_only(dataset, capsys):
    (dataset / "train" / "part-00000.parquet").unlink()
    info = inspect_json(capsys, dataset, "--no-check")
    assert sum(info["splits"].values()) == 48
    assert main(["inspect", str(dataset)]) == 2  # the default check notices the missing file


def test_inspect_does_not_import_torch(dataset):
    code = (
        "import sys; from multiembed.cli import main; "
        f"rc = main(['inspect', {str(dataset)!r}, '--json']); "
        "print('RESULT', rc, [m for m in ('torch', 'torchrec', 'fbgemm_gpu') if m in sys.modules])"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "RESULT 0 []" in result.stdout, result.stdout + result.stderr
