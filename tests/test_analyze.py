"""``multiembed analyze``: every file of the report from a real (tiny) run, values equal to an SVD done here on the
loaded checkpoint, figures drawing those values, checkpoint paths, and one-line errors for bad paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Dict, Tuple

import matplotlib.image
import numpy as np
import pytest

from multiembed.cli import main as cli_main

MODEL = "dcnv2-me-2x"
FILES = {"collapse.json", "spectra.png", "ia_vs_random.png", "ia_sets.png", "sub_embedding.png"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("analyze")
    data, run = root / "data", root / "run"
    synth = ["synth", "--rows", "3000", "--out", str(data), "--seed", "3", "--scale", "0.001", "--no-progress"]
    assert cli_main(synth) == 0
    # Two evaluations, two checkpoints kept (the best and the last, unless they coincide).
    assert cli_main(
        ["train", "--data", str(data), "--out", str(run), "--model", MODEL, "--batch-size", "256", "--hidden", "16",
         "--max-steps", "6", "--eval-every", "3", "--ia-every", "0", "--device", "cpu", "--no-progress"]
    ) == 0
    return run


def numpy_ia(matrix: np.ndarray, normalize: bool = True) -> float:
    x = matrix.astype(np.float64)
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = np.linalg.svd(x, compute_uv=False)
    return float(s.sum() / s.max())


def loaded_weights(run: Path, checkpoint: Path) -> Tuple[Dict[Tuple[str, int], np.ndarray], np.ndarray, list]:
    """The checkpoint's per-(field, set) tables and first cross weights, loaded through the build path
    (``model_for_run`` + ``load``), assembled here from the DMP state dict."""
    from multiembed.training.distributed import destroy
    from multiembed.training.evaluation import model_for_run

    try:
        loaded = model_for_run(run, device="cpu")
        loaded.load(checkpoint)
        model = loaded.built.model
        state = loaded.built.dmp.state_dict()
        tables = {}
        for key, value in state.items():
            if ".embedding_bags." not in key:
                continue
            if hasattr(value, "local_shards"):
                full = np.zeros(tuple(value.size()), dtype=np.float64)
                for shard in value.local_shards():
                    (r, c), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    full[r : r + nr, c : c + nc] = shard.tensor.double().numpy()
            else:
                full = value.double().numpy()
            tables[key.split(".embedding_bags.")[1].rsplit(".weight", 1)[0]] = full
        per_slot = {
            (s.field, s.set_index): tables[s.table_name][:, s.col_start : s.col_stop]
            for s in model.sparse_arch.table_layout
        }
        cross = model.set_arch.cross_weights(0).double().numpy()
        fields = list(model.sparse_arch.field_names)
    finally:
        destroy()
    return per_slot, cross, fields


def random_comparison(run: Path) -> Dict:
    """An SE-shaped collapse result over the run's fields (random tables): something to draw next to the run."""
    import torch
    from types import SimpleNamespace

    from multiembed.collapse import collapse_from_tables

    vocab = json.loads((run / "config.json").read_text())["data"]["vocab_sizes"]
    generator = torch.Generator().manual_seed(0)
    tables = {f"t_{f}": torch.randn(rows, 20, generator=generator) for f, rows in vocab.items()}
    layout = [SimpleNamespace(table_name=f"t_{f}", field=f, set_index=0, col_start=0, col_stop=20) for f in vocab]
    data = collapse_from_tables(tables, layout, random_init_seed=None).to_dict()
    data["source"] = {"model": "random tables"}
    return data


def test_analyze_run_writes_every_file_with_values_from_the_checkpoint(run_dir: Path, tmp_path: Path) -> None:
    from multiembed.analysis.analyze import analyze_run
    from multiembed.training.distributed import destroy

    out = tmp_path / "report"
    other = random_comparison(run_dir)
    try:
        analysis = analyze_run(run_dir, out, device="cpu", compare_with=[other])
    finally:
        destroy()
    assert {p.name for p in out.iterdir()} == FILES
    for name in FILES - {"collapse.json"}:
        assert matplotlib.image.imread(out / name).ndim == 3, name

    saved = json.loads((out / "collapse.json").read_text())
    # Files name other files relative to the folder that holds them: summary.json's checkpoint is relative to the
    # run, collapse.json's run relative to the report folder and its checkpoint relative to the run.
    relative = json.loads((run_dir / "summary.json").read_text())["checkpoint"]
    assert not Path(relative).is_absolute() and relative.startswith("checkpoints/")
    best = run_dir / relative
    assert saved["source"]["model"] == MODEL and saved["source"]["checkpoint"] == relative
    assert (out / saved["source"]["run_dir"]).resolve() == run_dir.resolve()
    assert saved["row_normalized"] is True and saved["dim"] == 10 and len(saved["sets"]) == 2
    monitor_keys = ("source", "collapse_warn", "collapsed", "random_init_concat")  # the collapse monitor's marks
    assert analysis.collapse.to_dict() == {k: v for k, v in saved.items() if k not in monitor_keys}
    assert saved["collapse_warn"] == 0.5 and set(saved["random_init_concat"]) == set(saved["fields"])

    # Every IA against an SVD done here on the checkpoint's tables.
    per_slot, cross, fields = loaded_weights(run_dir, best)
    assert saved["fields"] == fields
    for k in range(2):
        for field in fields:
            assert saved["sets"][k][field] == pytest.approx(numpy_ia(per_slot[(field, k)]), rel=1e-7), (k, field)
    for field in fields:
        concatenated = np.concatenate([per_slot[(field, 0)], per_slot[(field, 1)]], axis=1)
        assert saved["concat"][field] == pytest.approx(numpy_ia(concatenated), rel=1e-7), field
    # Sub-embedding: field i seen by field j is E_i W_{i->j}^T, W_{i->j} = the (j, i) block of the first cross weight.
    d = 10
    for k in range(2):
        entry = saved["sub_embedding"][k]
        assert entry["fields"] == fields
        for i in range(0, len(fields), 5):
            for j in range(0, len(fields), 4):
                block = cross[k, j * d : (j + 1) * d, i * d : (i + 1) * d]
                expected = numpy_ia(per_slot[(fields[i], k)] @ block.T)
                assert entry["ia"][i][j] == pytest.approx(expected, rel=1e-6), (k, i, j)

    # The figures drew those values.
    figures = analysis.report.figure_data
    by_vocab = sorted(fields, key=lambda f: (saved["vocab_sizes"][f], fields.index(f)))
    assert figures["spectra"]["fields"] == by_vocab
    for k in range(2):
        expected_panel = [saved["spectra"][k][f] for f in by_vocab]
        np.testing.assert_array_equal(figures["spectra"]["panels"][f"set {k}"], expected_panel)
        np.testing.assert_array_equal(figures["sub_embedding"]["panels"][k], saved["sub_embedding"][k]["ia"])
    per_set = np.array([[saved["sets"][k][f] for f in by_vocab] for k in range(2)])
    np.testing.assert_allclose(figures["ia_vs_random"]["mean"], per_set.mean(axis=0))
    np.testing.assert_array_equal(figures["ia_vs_random"]["min"], per_set.min(axis=0))
    np.testing.assert_array_equal(figures["ia_vs_random"]["random_init"], [saved["random_init"][f] for f in by_vocab])
    sets = figures["ia_sets"]
    assert sets["labels"] == [MODEL, "random tables"]
    assert sets["whole"][0] == [saved["concat"][f] for f in by_vocab]  # ME: its sets concatenated
    assert sets["whole"][1] == [other["sets"][0][f] for f in by_vocab]  # the SE-shaped comparison: its one table
    assert sets["set_mean"][0] == pytest.approx([np.mean(list(s.values())) for s in saved["sets"]])


def test_cli_analyzes_a_checkpoint_directory_raw_and_prints_the_summary(run_dir: Path, tmp_path: Path, capsys) -> None:
    checkpoints = sorted((run_dir / "checkpoints").glob("step-*"))
    chosen = checkpoints[0]
    out = tmp_path / "raw"
    args = ["analyze", str(chosen), "--out", str(out), "--raw", "--no-sub-embedding", "--device", "cpu",
            "--no-progress"]
    assert cli_main([*args, "--compare", str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == FILES - {"sub_embedding.png"}
    saved = json.loads((out / "collapse.json").read_text())
    assert saved["row_normalized"] is False and saved["sub_embedding"] is None and saved["concat"] is not None
    assert (out / saved["source"]["run_dir"] / saved["source"]["checkpoint"]).resolve() == chosen.resolve()
    assert saved["source"]["step"] == int(chosen.name.split("-")[1])
    per_slot, _, fields = loaded_weights(run_dir, chosen)
    for field in fields[::6]:
        assert saved["sets"][1][field] == pytest.approx(numpy_ia(per_slot[(field, 1)], normalize=False), rel=1e-7)

    # The summary table: IA mean and min over fields per set, for the concatenation and the random reference.
    assert f"collapse of {MODEL} at {chosen.name} (raw rows, d=10, 39 fields)" in printed
    for label, values in (
        ("set 0", saved["sets"][0]), ("set 1", saved["sets"][1]),
        ("sets concatenated (2 x 10)", saved["concat"]), ("random init (d=10)", saved["random_init"]),
    ):
        line = next(line for line in printed.splitlines() if line.startswith(label))
        assert line.split()[-2:] == [f"{np.mean(list(values.values())):.3f}", f"{min(values.values()):.3f}"], label
    for name in FILES - {"sub_embedding.png"}:
        assert str(out / name) in printed


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    return err[-1]


def test_bad_paths_give_one_line_errors(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = str(tmp_path / "out")
    assert cli_main(["analyze", str(tmp_path / "nope"), "--out", out]) == 2
    assert _error_line(capsys) == (
        f"multiembed analyze: error: {tmp_path / 'nope'}: no such directory (expected a run directory or "
        "RUN/checkpoints/step-N)"
    )

    (tmp_path / "empty").mkdir()
    assert cli_main(["analyze", str(tmp_path / "empty"), "--out", out]) == 2
    assert "not a multiembed run directory (config.json missing)" in _error_line(capsys)

    # A run whose checkpoints are gone.
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run_dir / "config.json", bare / "config.json")
    assert cli_main(["analyze", str(bare), "--out", out]) == 2
    assert "no complete checkpoint" in _error_line(capsys)

    # A corrupted checkpoint: the manifest's checksum catches it before anything is loaded.
    broken = tmp_path / "broken"
    shutil.copytree(run_dir, broken)
    (broken / "summary.json").unlink()
    for checkpoint in (broken / "checkpoints").glob("step-*"):
        shard = next(checkpoint.glob("*.distcp"))
        payload = bytearray(shard.read_bytes())
        payload[len(payload) // 2] ^= 0xFF
        shard.write_bytes(bytes(payload))
    target = next((broken / "checkpoints").glob("step-*"))
    assert cli_main(["analyze", str(target), "--out", out]) == 2
    assert "checksum mismatch (corrupted)" in _error_line(capsys)
    assert cli_main(["analyze", str(broken), "--out", out]) == 2
    assert "no complete checkpoint" in _error_line(capsys)
    assert not (tmp_path / "out").exists()
