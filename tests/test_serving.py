"""Serving (issue 15, items 1-3): ``multiembed export`` and ``multiembed predict`` at small sizes.

A tiny run on raw Criteo lines (the synthetic generator's TSV, and the real Kaggle rows in ../shared/data when
present) is exported as int8 / int4 / fp32 artifacts; predictions on the converted test split and on the same raw
lines must agree with each other and, for int8, reach ``multiembed evaluate``'s AUC within 0.001. Refusals are one
line; crafted artifacts show that loading runs no code from the files.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from multiembed.cli import main as cli_main

TRAIN = ["--model", "dcnv2-me-2x", "--batch-size", "256", "--hidden", "16", "--epochs", "1", "--device", "cpu",
         "--no-progress", "--ia-every", "0", "--dense-features"]


def _json_out(capsys) -> Dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(lines) == 1, lines
    return lines[0]


def _criteo_run(raw_lines: List[str], where: Path, min_count: int) -> Tuple[Path, Path, Path]:
    """Converts the lines as training file + held-out file (``--split-by-file``: the held-out file's second half is
    the test split), trains a tiny run; returns (data, run, raw test lines file)."""
    where.mkdir(parents=True, exist_ok=True)
    held = len(raw_lines) // 5
    (where / "train.txt").write_text("".join(raw_lines[:-held]))
    (where / "heldout.txt").write_text("".join(raw_lines[-held:]))
    (where / "test.txt").write_text("".join(raw_lines[-(held - held // 2):]))
    data, run = where / "data", where / "run"
    assert cli_main(["convert", "criteo", str(where / "train.txt"), str(where / "heldout.txt"), "--split-by-file",
                     "--min-count", str(min_count), "--out", str(data)]) == 0
    assert cli_main(["train", "--data", str(data), "--out", str(run), *TRAIN]) == 0
    return data, run, where / "test.txt"


@pytest.fixture(scope="module")
def synthetic_criteo(tmp_path_factory) -> Tuple[Path, Path, Path]:
    base = tmp_path_factory.mktemp("serving")
    assert cli_main(["synth", "--rows", "3000", "--scale", "0.001", "--seed", "3", "--out", str(base / "synth"),
                     "--tsv", str(base / "synth.tsv"), "--no-progress"]) == 0
    lines = (base / "synth.tsv").read_text().splitlines(keepends=True)
    return _criteo_run(lines, base / "criteo", min_count=2)


@pytest.fixture(scope="module")
def exported(synthetic_criteo, tmp_path_factory) -> Dict[str, Path]:
    _, run, _ = synthetic_criteo
    out = tmp_path_factory.mktemp("artifacts")
    artifacts = {}
    for quantize in ("int8", "int4", "none"):
        artifacts[quantize] = out / quantize
        assert cli_main(["export", str(run), "--out", str(artifacts[quantize]), "--quantize", quantize]) == 0
    return artifacts


def _evaluate(run: Path, data: Path, capsys) -> Dict:
    capsys.readouterr()
    assert cli_main(["evaluate", str(run), "--data", str(data), "--device", "cpu"]) == 0
    return _json_out(capsys)


def _predict(capsys, *args: str) -> Dict:
    capsys.readouterr()
    assert cli_main(["predict", *args]) == 0
    return _json_out(capsys)


def test_int8_predictions_match_evaluate_on_converted_and_raw_rows(synthetic_criteo, exported, tmp_path, capsys) -> None:
    data, run, raw = synthetic_criteo
    evaluated = _evaluate(run, data, capsys)
    results = {}
    for quantize, artifact in exported.items():
        on_data = _predict(capsys, str(artifact), "--data", str(data), "--out", str(tmp_path / f"{quantize}.parquet"))
        on_raw = _predict(capsys, str(artifact), "--raw", str(raw), "--out", str(tmp_path / f"{quantize}-raw.parquet"))
        assert on_data["rows"] == on_raw["rows"] == evaluated["test_rows"]
        # The same rows through convert's Parquet and through the artifact's own tokenisation: the same features.
        converted = pq.read_table(tmp_path / f"{quantize}.parquet").to_pydict()
        tokenised = pq.read_table(tmp_path / f"{quantize}-raw.parquet").to_pydict()
        assert converted["logit"] == tokenised["logit"] and converted["label"] == tokenised["label"]
        results[quantize] = on_data
    # The unquantised artifact computes the logits in another order than evaluate (float32 rounding, ~1e-6), which
    # can swap a near-tied (positive, negative) pair: allow two swapped pairs in the AUC; the log loss (continuous)
    # stays within 1e-5.
    labels = pq.read_table(tmp_path / "none.parquet").to_pydict()["label"]
    positives = sum(1 for y in labels if y == 1)
    pair_weight = 1.0 / (positives * (len(labels) - positives))
    assert abs(results["none"]["auc"] - evaluated["test_auc"]) <= 2 * pair_weight + 1e-7
    assert results["none"]["logloss"] == pytest.approx(evaluated["test_logloss"], abs=1e-5)
    assert abs(results["int8"]["auc"] - evaluated["test_auc"]) <= 1e-3
    assert abs(results["int4"]["auc"] - evaluated["test_auc"]) <= 1e-2  # reported, not promised: a loose sanity bound


def test_artifact_is_self_contained(exported, synthetic_criteo, tmp_path, capsys) -> None:
    """Copied away from the run and the data, which are moved out of reach meanwhile: it loads and predicts raw
    lines."""
    data, run, raw = synthetic_criteo
    moved = tmp_path / "elsewhere" / "model"
    shutil.copytree(exported["int8"], moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    assert all("/" not in entry["path"] for entry in manifest["files"].values())
    assert manifest["preprocessing"]["kind"] == "raw" and manifest["preprocessing"]["vocabulary"] == "vocab.npz"
    hidden = {path: tmp_path / f"hidden-{path.name}" for path in (data, run)}
    for path, away in hidden.items():
        path.rename(away)
    try:
        assert not data.exists() and not run.exists()
        result = _predict(capsys, str(moved), "--raw", str(raw), "--out", str(tmp_path / "p.parquet"))
    finally:
        for path, away in hidden.items():
            away.rename(path)
    assert result["rows"] > 0 and 0.0 < result["auc"] < 1.0


def test_unknown_tokens_get_the_oov_id(exported, synthetic_criteo, tmp_path) -> None:
    from multiembed.serving import load_artifact
    from multiembed.serving.predict import predict_raw

    _, _, raw = synthetic_criteo
    cells = raw.read_text().splitlines()[0].split("\t")
    cells[14:] = ["zzzzzzzz"] * 26  # categorical tokens never seen
    unseen = tmp_path / "unseen.txt"
    unseen.write_text("\t".join(cells) + "\n")
    artifact = load_artifact(exported["none"])
    logits = predict_raw(artifact, unseen).logits
    # The same row with every categorical field at id 0 (OOV) and its integer fields as converted.
    from multiembed.data.convert import encode_table
    from multiembed.data.rawlog import ChunkParser, iter_chunks
    from multiembed.serving.predict import artifact_vocabulary, encode_rows

    fmt, mode, seed, vocab = artifact_vocabulary(artifact)
    columns = encode_table(ChunkParser(fmt, str(unseen)).parse(next(iter_chunks(unseen, fmt))).table, fmt, mode, vocab, seed)
    assert all(int(columns[f"C{i}"][0]) == 0 for i in range(1, 27))
    dense, sparse = encode_rows(columns, artifact.fields, artifact.manifest.dense_fields)
    with torch.inference_mode():
        assert float(artifact.model(dense, sparse)[0]) == float(logits[0])


def test_refusals_are_one_line(synthetic_criteo, exported, tmp_path, capsys) -> None:
    data, run, _ = synthetic_criteo
    no_checkpoint = tmp_path / "run-without-checkpoint"
    shutil.copytree(run, no_checkpoint)
    shutil.rmtree(no_checkpoint / "checkpoints")
    (no_checkpoint / "summary.json").unlink()
    capsys.readouterr()
    assert cli_main(["export", str(no_checkpoint), "--out", str(tmp_path / "a")]) == 2
    assert "no complete checkpoint" in _error(capsys)
    assert not (tmp_path / "a").exists()

    victim = tmp_path / "not-an-artifact"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        assert cli_main(["export", str(run), "--out", str(victim), *extra]) == 2
        _error(capsys)
    assert (victim / "keep.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-export-")]

    other = tmp_path / "other-data"
    assert cli_main(["synth", "--rows", "500", "--scale", "0.001", "--out", str(other), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli_main(["predict", str(exported["int8"]), "--data", str(other), "--out", str(tmp_path / "p.parquet")]) == 2
    assert "vocabulary fingerprint" in _error(capsys)
    assert not (tmp_path / "p.parquet").exists()


def test_an_earlier_artifact_is_replaced_only_with_overwrite(synthetic_criteo, exported, tmp_path, capsys) -> None:
    _, run, _ = synthetic_criteo
    out = tmp_path / "art"
    shutil.copytree(exported["int4"], out)
    assert cli_main(["export", str(run), "--out", str(out)]) == 2
    assert cli_main(["export", str(run), "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "manifest.json").read_text())["quantize"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


# --- quantisation and sizes -----------------------------------------------------------------------------------------


def _random_tables(vocab: Dict[str, int], width: int) -> Dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f: torch.rand(n, width, generator=generator) * 0.2 - 0.1 for f, n in vocab.items()}


def test_stored_tables_rebuild_torchrec_quantize_inference_model_exactly() -> None:
    from torchrec.inference.modules import quantize_inference_model
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from multiembed.models import build_sparse_arch
    from multiembed.serving.artifact import Manifest, build_collection
    from multiembed.serving.export import table_tensors

    vocab = {"a": 50, "b": 7}
    tables = _random_tables(vocab, 40)
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.tensor([1, 2, 49, 6, 0, 3]), lengths=torch.tensor([1, 1, 1, 1, 1, 1]))
    for quantize, dtype in (("int8", torch.int8), ("int4", torch.quint4x2)):
        reference = build_sparse_arch(vocab, 4, 10, init="torchrec", device=torch.device("cpu"), stored_set_dim=10)
        with torch.no_grad():
            for f, w in tables.items():
                reference.embedding_bag_collection.embedding_bags[f"t_{f}"].weight.copy_(w)
        expected = quantize_inference_model(reference, quantization_dtype=dtype).embedding_bag_collection(features)
        manifest = Manifest("x", quantize, 4, 10, vocab, [], "criteo", "f", {}, {})
        rebuilt = build_collection(manifest, table_tensors(tables, 4, 10, quantize))(features)
        assert torch.equal(rebuilt.values(), expected.values())


@pytest.mark.parametrize("num_sets, set_dim, bound", [(4, 10, 0.35), (1, 10, 0.40)])
def test_int8_table_bytes(num_sets: int, set_dim: int, bound: float) -> None:
    """dcnv2-me-4x's tables (K*d = 40) take <= 0.35 of their logical fp32 bytes in int8; an SE set of width 10 cannot
    (FBGEMM aligns a row of 10 + 4 bytes to 16: 0.4)."""
    from multiembed.serving.artifact import Manifest
    from multiembed.serving.export import table_sizes, table_tensors

    vocab = {"a": 300, "b": 17}
    tensors = table_tensors(_random_tables(vocab, num_sets * set_dim), num_sets, set_dim, "int8")
    sizes = table_sizes(Manifest("x", "int8", num_sets, set_dim, vocab, [], "criteo", "f", {}, {}), tensors)
    assert sizes["memory_ratio"] <= bound and sizes["stored_ratio"] < sizes["memory_ratio"] + 1e-9


# --- loading runs no code from the files ----------------------------------------------------------------------------


class _Payload:
    """Pickles to a call of ``Path.touch`` on the marker: the side effect a safe loader must never let happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _reseal(artifact: Path, role: str) -> None:
    """Rewrites the manifest's size and SHA-256 of a tampered file (an attacker controls the manifest too)."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    path = artifact / manifest["files"][role]["path"]
    manifest["files"][role]["bytes"] = path.stat().st_size
    manifest["files"][role]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (artifact / "manifest.json").write_text(json.dumps(manifest))


def _rewrite_dense(artifact: Path, edit) -> None:
    path = artifact / "dense.pt2"
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    members = edit(members)
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    _reseal(artifact, "dense")


def _edit_program(members: Dict[str, bytes], change) -> Dict[str, bytes]:
    name = next(n for n in members if n.endswith("models/model.json"))
    program = json.loads(members[name])
    change(program)
    members[name] = json.dumps(program).encode()
    return members


def _first_node(program: Dict) -> Dict:
    return program["graph_module"]["graph"]["nodes"][0]


@pytest.mark.parametrize("attack", ["tables-pickle", "sample-inputs-pickle", "pickled-weight", "guard-code",
                                    "node-target", "sympy-expression", "extra-member"])
def test_crafted_artifacts_are_refused_without_running_code(exported, tmp_path, capsys, attack: str) -> None:
    from multiembed.serving import ArtifactError, load_artifact

    artifact = tmp_path / "crafted"
    shutil.copytree(exported["int8"], artifact)
    marker = tmp_path / "code-ran"
    payload = io.BytesIO()
    torch.save({"x": _Payload(marker)}, payload)
    if attack == "tables-pickle":
        tensors = torch.load(artifact / "tables.pt", weights_only=True)
        tensors["t_C1.weight"] = _Payload(marker)
        torch.save(tensors, artifact / "tables.pt")
        _reseal(artifact, "tables")
    elif attack == "sample-inputs-pickle":
        def edit(members):
            name = next(n for n in members if n.endswith("sample_inputs/model.pt"))
            members[name] = payload.getvalue()
            return members
        _rewrite_dense(artifact, edit)
    elif attack == "pickled-weight":
        def edit(members):
            name = next(n for n in members if n.endswith("model_weights_config.json"))
            config = json.loads(members[name])
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            members[name] = json.dumps(config).encode()
            members[name.rsplit("/", 1)[0] + "/" + first["path_name"]] = payload.getvalue()
            return members
        _rewrite_dense(artifact, edit)
    elif attack == "guard-code":
        _rewrite_dense(artifact, lambda m: _edit_program(
            m, lambda p: p.__setitem__("guards_code", [f"__import__('pathlib').Path('{marker}').touch()"])))
    elif attack == "node-target":
        _rewrite_dense(artifact, lambda m: _edit_program(m, lambda p: _first_node(p).__setitem__("target", "builtins.exec")))
    elif attack == "sympy-expression":
        def change(program):
            values = program["graph_module"]["graph"]["tensor_values"]
            for value in values.values():
                for size in value["sizes"]:
                    if "as_expr" in size:
                        size["as_expr"]["expr_str"] = f"__import__('pathlib').Path('{marker}').touch()"
                        return
            raise AssertionError("no symbolic size in the program")
        _rewrite_dense(artifact, lambda m: _edit_program(m, change))
    elif attack == "extra-member":
        def edit(members):
            prefix = next(iter(members)).split("/", 1)[0]
            members[f"{prefix}/data/constants/custom_obj_0"] = payload.getvalue()
            return members
        _rewrite_dense(artifact, edit)
    with pytest.raises(ArtifactError) as refused:
        load_artifact(artifact)
    assert "\n" not in str(refused.value) and str(artifact) in str(refused.value)
    assert not marker.exists()
    capsys.readouterr()
    assert cli_main(["predict", str(artifact), "--data", str(tmp_path), "--out", str(tmp_path / "p.parquet")]) == 2
    _error(capsys)
    assert not marker.exists()


def test_a_corrupted_file_is_refused(exported, tmp_path) -> None:
    from multiembed.serving import ArtifactError, load_artifact

    artifact = tmp_path / "corrupt"
    shutil.copytree(exported["int4"], artifact)
    data = bytearray((artifact / "tables.pt").read_bytes())
    data[-100] ^= 0xFF
    (artifact / "tables.pt").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_artifact(artifact)


# --- the real Criteo rows ---------------------------------------------------------------------------------------------


def test_real_criteo_rows_int8_within_0_001_of_evaluate(shared_data: Path, tmp_path, capsys) -> None:
    lines = (shared_data / "criteo_dac_train_head10k.txt").read_text().splitlines(keepends=True)
    data, run, raw = _criteo_run(lines, tmp_path, min_count=2)
    evaluated = _evaluate(run, data, capsys)
    assert cli_main(["export", str(run), "--out", str(tmp_path / "int8")]) == 0
    on_data = _predict(capsys, str(tmp_path / "int8"), "--data", str(data), "--out", str(tmp_path / "p.parquet"))
    on_raw = _predict(capsys, str(tmp_path / "int8"), "--raw", str(raw), "--out", str(tmp_path / "r.parquet"))
    assert abs(on_data["auc"] - evaluated["test_auc"]) <= 1e-3
    assert on_raw["auc"] == on_data["auc"] and on_raw["rows"] == evaluated["test_rows"]
    logits = pq.read_table(tmp_path / "r.parquet").column("logit").to_numpy()
    assert np.isfinite(logits).all()
