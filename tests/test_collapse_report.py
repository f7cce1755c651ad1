"""Collapse report: collapse.json and every figure are written, and the figures draw the computed values."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List

import matplotlib.image
import numpy as np
import pytest
import torch

from multiembed.analysis.report import (
    plot_ia_sets,
    plot_spectra,
    plot_sub_embedding,
    read_collapse_json,
    write_collapse_json,
    write_collapse_report,
)
from multiembed.collapse import CollapseResult, collapse_from_tables

VOCAB = {"user": 120, "ad": 35, "site": 70, "hour": 24}  # deliberately not in vocabulary order
NUM_SETS, DIM, STORED = 3, 6, 8


@dataclass(frozen=True)
class Slice:
    table_name: str
    field: str
    set_index: int
    col_start: int
    col_stop: int


def numpy_ia(matrix: np.ndarray) -> float:
    x = matrix / np.linalg.norm(matrix, axis=1, keepdims=True)
    s = np.linalg.svd(x, compute_uv=False)
    return float(s.sum() / s.max())


def tables(num_sets: int, stored: int, seed: int) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for i, (field, rows) in enumerate(VOCAB.items()):
        rank = 2 + i
        out[f"t_{field}"] = torch.randn(rows, rank, generator=generator) @ torch.randn(
            rank, num_sets * stored, generator=generator
        ) + 0.05 * torch.randn(rows, num_sets * stored, generator=generator)
    return out


@pytest.fixture(scope="module")
def me_tables() -> Dict[str, torch.Tensor]:
    return tables(NUM_SETS, STORED, seed=0)


@pytest.fixture(scope="module")
def me_result(me_tables: Dict[str, torch.Tensor]) -> CollapseResult:
    layout = [Slice(f"t_{f}", f, k, k * STORED, k * STORED + DIM) for f in VOCAB for k in range(NUM_SETS)]
    generator = torch.Generator().manual_seed(5)
    weights = [torch.randn(len(VOCAB) * DIM, len(VOCAB) * DIM, generator=generator) for _ in range(NUM_SETS)]
    return collapse_from_tables(me_tables, layout, cross_weights=weights, chunk_rows=32)


@pytest.fixture(scope="module")
def se_result() -> CollapseResult:
    layout = [Slice(f"t_{f}", f, 0, 0, NUM_SETS * DIM) for f in VOCAB]
    return collapse_from_tables(tables(1, NUM_SETS * DIM, seed=1), layout)


def by_vocab() -> List[str]:
    return sorted(VOCAB, key=VOCAB.get)


def test_report_writes_every_file_with_the_computed_values(
    tmp_path: Path, me_result: CollapseResult, se_result: CollapseResult, me_tables: Dict[str, torch.Tensor]
) -> None:
    report = write_collapse_report(me_result, tmp_path, compare_with=[se_result], labels=["ME 3x", "SE 3x"])
    expected_files = {"collapse.json", "spectra.png", "ia_vs_random.png", "ia_sets.png", "sub_embedding.png"}
    assert {p.name for p in tmp_path.iterdir()} == expected_files  # no temporary files left behind
    assert {p.name for p in report.files.values()} == expected_files
    for name in expected_files - {"collapse.json"}:
        image = matplotlib.image.imread(tmp_path / name)
        assert image.ndim == 3 and min(image.shape[:2]) > 200, name

    saved = json.loads((tmp_path / "collapse.json").read_text())
    assert saved["row_normalized"] is True and saved["dim"] == DIM and saved["fields"] == list(VOCAB)
    assert len(saved["sets"]) == NUM_SETS and set(saved["random_init"]) == set(VOCAB)
    # Values in the file against an SVD computed here from the tables themselves.
    user = me_tables["t_user"].double().numpy()
    assert saved["sets"][2]["user"] == pytest.approx(numpy_ia(user[:, 2 * STORED : 2 * STORED + DIM]), rel=1e-8)
    concatenated = np.concatenate([user[:, k * STORED : k * STORED + DIM] for k in range(NUM_SETS)], axis=1)
    assert saved["concat"]["user"] == pytest.approx(numpy_ia(concatenated), rel=1e-8)
    assert [entry["fields"] for entry in saved["sub_embedding"]] == [list(VOCAB)] * NUM_SETS
    assert np.array(saved["sub_embedding"][1]["ia"]).shape == (len(VOCAB), len(VOCAB))
    assert saved["set_summary"][0]["min"] == pytest.approx(min(saved["sets"][0].values()))

    fields = by_vocab()
    spectra = report.figure_data["spectra"]
    assert spectra["fields"] == fields
    for k in range(NUM_SETS):
        np.testing.assert_array_equal(spectra["panels"][f"set {k}"], [me_result.spectra[k][f] for f in fields])
    concat_panel = spectra["panels"]["3 sets concatenated"]
    np.testing.assert_array_equal(concat_panel, [me_result.concat_spectra[f] for f in fields])

    bars = report.figure_data["ia_vs_random"]
    per_set = np.array([[me_result.sets[k][f] for f in fields] for k in range(NUM_SETS)])
    np.testing.assert_allclose(bars["mean"], per_set.mean(axis=0))
    np.testing.assert_array_equal(bars["min"], per_set.min(axis=0))
    np.testing.assert_array_equal(bars["max"], per_set.max(axis=0))
    np.testing.assert_array_equal(bars["random_init"], [me_result.random_init[f] for f in fields])

    sets = report.figure_data["ia_sets"]
    assert sets["labels"] == ["ME 3x", "SE 3x"] and sets["fields"] == fields
    assert sets["set_mean"][0] == pytest.approx([np.mean(list(s.values())) for s in me_result.sets])
    assert sets["set_min"][1] == [min(se_result.sets[0].values())]
    assert sets["whole"][0] == [me_result.concat[f] for f in fields]  # ME: the sets concatenated
    assert sets["whole"][1] == [se_result.sets[0][f] for f in fields]  # SE: its one table

    sub = report.figure_data["sub_embedding"]
    assert sub["fields"] == list(VOCAB)
    for k in range(NUM_SETS):
        np.testing.assert_array_equal(sub["panels"][k], me_result.sub_embedding[k]["ia"])


def test_report_redraws_from_the_saved_file(tmp_path: Path, me_result: CollapseResult) -> None:
    write_collapse_json(me_result, tmp_path / "collapse.json")
    loaded = read_collapse_json(tmp_path / "collapse.json")
    again = plot_spectra(loaded, tmp_path / "again.png")
    direct = plot_spectra(me_result, tmp_path / "direct.png")
    for title, matrix in direct["panels"].items():
        np.testing.assert_array_equal(again["panels"][title], matrix)
    assert CollapseResult.from_dict(loaded).to_dict() == loaded


def test_single_embedding_report_has_no_sub_embedding_figure(tmp_path: Path, se_result: CollapseResult) -> None:
    report = write_collapse_report(se_result, tmp_path)
    assert "sub_embedding" not in report.files and not (tmp_path / "sub_embedding.png").exists()
    saved = read_collapse_json(tmp_path / "collapse.json")
    assert saved["concat"] is None and saved["sub_embedding"] is None and saved["dim"] == NUM_SETS * DIM
    assert list(report.figure_data["spectra"]["panels"]) == ["single embedding"]
    with pytest.raises(ValueError, match="no sub-embedding IA"):
        plot_sub_embedding(se_result, tmp_path / "x.png")


def test_bad_inputs_are_reported(tmp_path: Path, me_result: CollapseResult) -> None:
    broken = tmp_path / "collapse.json"
    broken.write_text('{"dim": 4,')
    with pytest.raises(ValueError, match=f"{broken}: not valid JSON"):
        read_collapse_json(broken)
    broken.write_text('{"dim": 4}')
    with pytest.raises(ValueError, match="missing keys"):
        read_collapse_json(broken)
    without_concat = dict(me_result.to_dict(), concat=None)
    with pytest.raises(ValueError, match="no concatenated IA"):
        plot_ia_sets([without_concat], tmp_path / "sets.png")
    other_fields = dict(
        me_result.to_dict(), fields=["a"], vocab_sizes={"a": 3}, sets=[{"a": 1.0}], spectra=[{"a": [1.0]}]
    )
    with pytest.raises(ValueError, match="has fields"):
        plot_ia_sets([me_result, other_fields], tmp_path / "sets.png")
