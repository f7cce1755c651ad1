"""Serving: ``multiembed export`` and ``multiembed predict`` at small sizes.

A tiny run on raw Criteo lines (the synthetic generator's TSV, and the real Kaggle rows in ../shared/data when
present) is exported as int8 / int4 / fp32 artifacts; predictions on the converted test split and on the same raw
lines must agree with each other and, for int8, reach ``multiembed evaluate``'s AUC within 0.001. Every backbone x
mode x combiner exports a program that computes the model's own logits and calls only the committed aten op
allowlist. Refusals are one line; crafted artifacts show that loading runs no code from the files and that a
program which writes (a file, an input, a constant) is refused before it runs. The compiled dense program
(``--compile``) gives the uncompiled predictions, is built only after the checks and only into a private cache, and
an entry that does not match its key is rebuilt.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import stat
import time
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
    from multiembed.data.encode import encode_table
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
    if attack == "pickled-weight":  # the refusal's own message, not a generic one
        assert "is stored pickled or as an object" in str(refused.value)
        assert "unreadable archive metadata" not in str(refused.value)
    assert not marker.exists()
    capsys.readouterr()
    assert cli_main(["predict", str(artifact), "--data", str(tmp_path / "data-never-read"),
                     "--out", str(tmp_path / "p.parquet")]) == 2
    assert str(artifact) in _error(capsys)
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


# --- every model the package can export: the served program is the trained dense path ---------------------------------


def _export_matrix() -> List[Tuple[str, str, int]]:
    """``(model, combiner, num_dense)`` of every backbone x mode x combiner, hetero included: the mean without and
    the gate with dense features, so both branches of the dense path are exported."""
    from multiembed.models.names import BACKBONES, HETERO_BACKBONE, MODES

    names = [f"{b}-{m}-2x" for b in BACKBONES for m in MODES] + [f"{HETERO_BACKBONE}-me-4x"]
    return [(name, combiner, num_dense) for name in names for combiner, num_dense in (("mean", 0), ("gate", 3))]


# torch 2.13's torch.export cannot export FinalMLP's streams shared across sets over a dynamic batch (it derives the
# guard B * min(H, 2 * K * H * B) == H * B): `multiembed export` of a finalmlp-mesi run fails there. torch 2.14
# exports it, and the matrix then includes it.
_NOT_EXPORTABLE = {"finalmlp-mesi-2x"} if tuple(int(p) for p in torch.__version__.split(".")[:2]) < (2, 14) else set()
_MATRIX_VOCAB = {"a": 7, "b": 5, "c": 3}


def _matrix_model(name: str, combiner: str, num_dense: int):
    from multiembed.models import build_model

    torch.manual_seed(0)
    model = build_model(name, _MATRIX_VOCAB, num_dense=num_dense, device=torch.device("cpu"), hidden=8,
                        combiner=combiner, dense_arch_layer_sizes=(8,), init="torchrec")
    if model.set_gate is not None:  # a trained gate: away from its zero initialisation (the mean)
        torch.nn.init.normal_(model.set_gate.linear.weight, std=1.0)
        torch.nn.init.normal_(model.set_gate.linear.bias, std=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def export_matrix(tmp_path_factory) -> Dict[Tuple[str, str, int], Tuple[object, Path]]:
    """Every exportable configuration at tiny sizes: ``{config: (model, dense.pt2)}``."""
    from multiembed.serving.export import export_dense

    out = tmp_path_factory.mktemp("matrix")
    exported = {}
    for config in _export_matrix():
        if config[0] in _NOT_EXPORTABLE:
            continue
        model = _matrix_model(*config)
        path = out / ("-".join(map(str, config)) + ".pt2")
        export_dense(model, len(_MATRIX_VOCAB), config[2], path)
        exported[config] = (model, path)
    return exported


def _program_targets(path: Path) -> set:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith("models/model.json"))
        program = json.loads(archive.read(name))
    return {node["target"] for node in program["graph_module"]["graph"]["nodes"]}


@pytest.mark.slow
def test_exported_programs_equal_the_trained_models(export_matrix) -> None:
    """Served logits (the artifact's checked program after the model's own lookup) equal the model's forward, the
    one ``evaluate`` runs, for every backbone x mode x combiner: every learned module of the dense path is exported."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from multiembed.serving.artifact import load_dense_program

    assert len(export_matrix) == len(_export_matrix()) - 2 * len(_NOT_EXPORTABLE)
    generator = torch.Generator().manual_seed(1)
    rows = 5
    features = KeyedJaggedTensor.from_lengths_sync(
        keys=list(_MATRIX_VOCAB),
        values=torch.cat([torch.randint(0, n, (rows,), generator=generator) for n in _MATRIX_VOCAB.values()]),
        lengths=torch.ones(rows * len(_MATRIX_VOCAB), dtype=torch.int32),
    )
    mismatched = []
    for (name, combiner, num_dense), (model, path) in export_matrix.items():
        dense = torch.rand(rows, num_dense, generator=generator)
        inputs = {"embeddings": (model.num_sets, len(_MATRIX_VOCAB), model.sparse_arch.set_dim),
                  "dense_features": (num_dense,)}
        with torch.no_grad():
            expected = model(dense, features)
            served = load_dense_program(path, inputs)(model.sparse_arch(features), dense)
        if not torch.allclose(served, expected, rtol=0, atol=1e-5):
            mismatched.append(f"{name}/{combiner}: max |diff| {float((served - expected).abs().max()):.3g}")
    assert not mismatched, mismatched


@pytest.mark.slow
def test_exports_emit_exactly_the_allowed_ops(export_matrix) -> None:
    """The committed allowlist is the set of ops the package's exports emit: an op export starts emitting (or stops
    emitting) changes DENSE_PROGRAM_OPS in a reviewed commit."""
    from multiembed.serving.artifact import DENSE_PROGRAM_OPS

    emitted = set().union(*(_program_targets(path) for _, path in export_matrix.values()))
    assert not any(op.endswith("_") or ".out" in op for op in emitted), "an in-place or out= op was exported"
    assert emitted == DENSE_PROGRAM_OPS, (
        f"new: {sorted(emitted - DENSE_PROGRAM_OPS)}, no longer emitted: {sorted(DENSE_PROGRAM_OPS - emitted)}"
    )


@pytest.mark.parametrize("name", sorted(_NOT_EXPORTABLE))
def test_models_torch_export_cannot_export_are_listed(name: str, tmp_path) -> None:
    """The matrix leaves out only models export fails on (remove a name here once it exports)."""
    from multiembed.serving.export import export_dense

    with pytest.raises(ValueError, match=r"torch\.export cannot export this model's dense part .*Constraints violated"):
        export_dense(_matrix_model(name, "mean", 0), len(_MATRIX_VOCAB), 0, tmp_path / "dense.pt2")


# --- programs that act: only the allowed ops run ------------------------------------------------------------------


class _FromFile(torch.nn.Module):
    """Stands in for ``from_file``: ``torch.empty`` then ``fill_`` (the archive's node is rewritten to from_file)."""

    def forward(self, embeddings: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        mapped = torch.empty(64, dtype=torch.uint8)
        mapped.fill_(66)
        return embeddings.sum(dim=(1, 2, 3)) + mapped.sum().float() * 0


class _InputWrite(torch.nn.Module):
    def forward(self, embeddings: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        dense.add_(1.0)
        return embeddings.sum(dim=(1, 2, 3))


class _OutWrite(torch.nn.Module):
    def forward(self, embeddings: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        torch.mul(dense, 2.0, out=dense)
        return embeddings.sum(dim=(1, 2, 3))


class _ConstantWrite(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.zeros(1), persistent=False)

    def forward(self, embeddings: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
        self.offset.add_(1.0)
        return embeddings.sum(dim=(1, 2, 3)) + self.offset


_PAYLOADS = {"from-file": (_FromFile, "aten.from_file"), "input-write": (_InputWrite, "aten.add_"),
             "out-variant": (_OutWrite, "aten.mul.out"), "constant-write": (_ConstantWrite, "aten.add_")}


def _payload_program(kind: str, manifest: Dict, path: Path, canary: Path) -> None:
    """Exports the payload with the artifact's input shapes to ``path`` (from-file: its node then reads
    ``canary`` shared, so that ``fill_`` writes the file)."""
    k, d, fields = manifest["num_sets"], manifest["set_dim"], len(manifest["vocab_sizes"])
    example = (torch.randn(2, k, fields, d), torch.rand(2, len(manifest["dense_fields"])))
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(_PAYLOADS[kind][0](), example, dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, str(path))
    if kind == "from-file":
        def edit(program):
            node = _first_node(program)
            assert node["target"] == "torch.ops.aten.empty.memory_format"
            node["target"] = "torch.ops.aten.from_file.default"
            node["inputs"] = [{"name": "filename", "arg": {"as_string": str(canary)}, "kind": 1},
                              {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                              {"name": "size", "arg": {"as_int": canary.stat().st_size}, "kind": 1},
                              {"name": "dtype", "arg": {"as_scalar_type": 1}, "kind": 2}]

        with zipfile.ZipFile(path) as archive:
            members = {name: archive.read(name) for name in archive.namelist()}
        members = _edit_program(members, edit)
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)


def _canary_inputs(manifest: Dict, canary: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    """Inputs of 4 rows whose dense features are the canary file's bytes, mapped shared: a write into the input
    is a write into the file."""
    num_dense = len(manifest["dense_fields"])
    dense = torch.from_file(str(canary), shared=True, size=4 * num_dense, dtype=torch.float32).view(4, num_dense)
    embeddings = torch.randn(4, manifest["num_sets"], len(manifest["vocab_sizes"]), manifest["set_dim"])
    return embeddings, dense


@pytest.mark.parametrize("kind", sorted(_PAYLOADS))
def test_programs_that_write_are_refused_before_they_run(exported, tmp_path, capsys, kind: str) -> None:
    from multiembed.serving import ArtifactError, load_artifact

    artifact = tmp_path / "crafted"
    shutil.copytree(exported["none"], artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    canary = tmp_path / "canary.bin"
    original = np.ones(4 * len(manifest["dense_fields"]), dtype=np.float32).tobytes()
    canary.write_bytes(original)
    payload = tmp_path / "payload.pt2"
    _payload_program(kind, manifest, payload, canary)

    # Unchecked, the payload acts: it writes the canary file (the constant write: the program's own constant,
    # so the same rows give other logits on every call).
    program = torch.export.load(str(payload)).module()
    embeddings, dense = _canary_inputs(manifest, canary)
    first = program(embeddings, dense)
    if kind == "constant-write":
        assert not torch.equal(program(embeddings, dense.clone()), first)
    else:
        assert canary.read_bytes() != original
    del program, dense
    canary.write_bytes(original)

    shutil.copyfile(payload, artifact / "dense.pt2")
    _reseal(artifact, "dense")
    op = _PAYLOADS[kind][1]
    with pytest.raises(ArtifactError, match=rf"node '[a-z_0-9]+' calls 'torch\.ops\.{re.escape(op)}") as refused:
        load_artifact(artifact)
    assert "\n" not in str(refused.value) and str(artifact) in str(refused.value)
    capsys.readouterr()
    assert cli_main(["predict", str(artifact), "--data", str(tmp_path / "data-never-read"),
                     "--out", str(tmp_path / "p.parquet")]) == 2
    assert op in _error(capsys)
    assert canary.read_bytes() == original and not (tmp_path / "p.parquet").exists()


def test_a_gated_run_predicts_what_evaluate_scores(synthetic_criteo, tmp_path, capsys) -> None:
    """A run trained with the learned set gate serves that gate: predict's AUC and log loss are evaluate's."""
    data, _, _ = synthetic_criteo
    run = tmp_path / "gate-run"
    assert cli_main(["train", "--data", str(data), "--out", str(run), *TRAIN, "--combiner", "gate", "--lr", "0.01"]) == 0
    evaluated = _evaluate(run, data, capsys)
    assert cli_main(["export", str(run), "--out", str(tmp_path / "art"), "--quantize", "none"]) == 0
    predicted = _predict(capsys, str(tmp_path / "art"), "--data", str(data), "--out", str(tmp_path / "p.parquet"))
    labels = pq.read_table(tmp_path / "p.parquet").column("label").to_numpy()
    positives = int(labels.sum())
    pair_weight = 1.0 / (positives * (len(labels) - positives))
    assert abs(predicted["auc"] - evaluated["test_auc"]) <= 2 * pair_weight + 1e-7
    assert predicted["logloss"] == pytest.approx(evaluated["test_logloss"], abs=1e-5)


# --- the rest of the artifact's surface ---------------------------------------------------------------------------


@pytest.mark.parametrize("edit", ["dense-fields", "sets-and-width"])
def test_a_manifest_that_disagrees_with_the_program_is_refused(exported, tmp_path, capsys, edit: str) -> None:
    from multiembed.serving import ArtifactError, load_artifact

    artifact = tmp_path / "edited"
    shutil.copytree(exported["none"], artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    if edit == "dense-fields":
        manifest["dense_fields"] = manifest["dense_fields"][:-1]
    else:  # the same table width K * d, so the tables still match
        manifest["num_sets"], manifest["set_dim"] = 1, manifest["num_sets"] * manifest["set_dim"]
    (artifact / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"dense\.pt2: input (dense_features|embeddings) is \[B, .*implies \[B, "):
        load_artifact(artifact)
    capsys.readouterr()
    assert cli_main(["predict", str(artifact), "--data", str(tmp_path / "data-never-read"),
                     "--out", str(tmp_path / "p.parquet")]) == 2
    assert "the manifest (num_sets, fields, set_dim, dense_fields) implies" in _error(capsys)


@pytest.mark.parametrize("width, quantize", [(2, "int4"), (10, "int4"), (3, "int4"), (3, "int8")])
def test_quantised_rows_fbgemm_cannot_align_are_refused(width: int, quantize: str) -> None:
    """FBGEMM reads a row's fp16 scale and bias at 2-byte alignment: rows of 1, 5 or 1.5 bytes are refused before
    anything is quantised (export checks this width before it writes)."""
    from multiembed.serving.artifact import quantized_row_bytes

    with pytest.raises(ValueError, match=rf"--quantize {quantize}: a table width of {width} \(K \* d\) gives rows"):
        quantized_row_bytes(width, quantize)
    assert quantized_row_bytes(4, "int4") == 2 and quantized_row_bytes(2, "int8") == 2


def test_export_refuses_int4_of_one_byte_rows(synthetic_criteo, tmp_path, capsys) -> None:
    data, _, _ = synthetic_criteo
    run = tmp_path / "narrow"
    train = [a for a in TRAIN if a != "--dense-features"]
    assert cli_main(["train", "--data", str(data), "--out", str(run), *train, "--model", "dcnv2-me-1x2"]) == 0
    capsys.readouterr()
    assert cli_main(["export", str(run), "--out", str(tmp_path / "art"), "--quantize", "int4"]) == 2
    assert "a table width of 2 (K * d) gives rows of 1 bytes" in _error(capsys)
    assert not (tmp_path / "art").exists()


def test_predict_raw_serves_unlabelled_rows(synthetic_criteo, exported, tmp_path, capsys) -> None:
    """Kaggle test.txt's layout (39 columns, no label): the same logits as the labelled rows, no metrics, no label
    column."""
    _, _, raw = synthetic_criteo
    unlabelled = tmp_path / "test.txt"
    unlabelled.write_text("".join(line.split("\t", 1)[1] for line in raw.read_text().splitlines(keepends=True)))
    assert len(unlabelled.read_text().splitlines()[0].split("\t")) == 39
    labelled = _predict(capsys, str(exported["int8"]), "--raw", str(raw), "--out", str(tmp_path / "l.parquet"))
    served = _predict(capsys, str(exported["int8"]), "--raw", str(unlabelled), "--out", str(tmp_path / "u.parquet"))
    assert served == {"rows": labelled["rows"], "out": str(tmp_path / "u.parquet")}
    table = pq.read_table(tmp_path / "u.parquet")
    assert table.column_names == ["row", "logit", "prob"]
    assert table.column("logit").to_pylist() == pq.read_table(tmp_path / "l.parquet").column("logit").to_pylist()
    # A row of the other layout inside the file is a bad line, named.
    unlabelled.write_text(unlabelled.read_text() + raw.read_text().splitlines(keepends=True)[0])
    capsys.readouterr()
    assert cli_main(["predict", str(exported["int8"]), "--raw", str(unlabelled), "--out", str(tmp_path / "x.parquet")]) == 2
    assert "columns: expected 39 tab-separated columns, got 40" in _error(capsys)


def test_raw_line_encoder_serves_the_features_of_the_converters_encoding(synthetic_criteo, exported) -> None:
    """A server's path, raw lines -> (dense, KJT): a line alone gives its row of the converter's encoding of the whole
    file, a request of every line gives all of them and the same probabilities; unlabelled lines (39 columns) are
    told by their column count and give the same features."""
    from multiembed.data.encode import encode_table
    from multiembed.data.rawlog import ChunkParser, iter_chunks
    from multiembed.serving import load_artifact
    from multiembed.serving.predict import RawLineEncoder, artifact_vocabulary, encode_rows

    _, _, raw = synthetic_criteo
    artifact = load_artifact(exported["int8"])
    fmt, mode, seed, vocab = artifact_vocabulary(artifact)
    columns = encode_table(ChunkParser(fmt, str(raw)).parse(next(iter_chunks(raw, fmt))).table, fmt, mode, vocab, seed)
    dense, sparse = encode_rows(columns, artifact.fields, artifact.manifest.dense_fields)
    ids = sparse.values().view(len(artifact.fields), -1)
    lines = raw.read_bytes().splitlines(keepends=True)
    assert len(lines) == dense.shape[0] and dense.shape[1] == 13
    encoder = RawLineEncoder(artifact, source="request")
    for i in range(0, len(lines), 7):
        one_dense, one_sparse = encoder.features([lines[i]], first_line=i + 1)
        assert one_sparse.keys() == artifact.fields and one_sparse.lengths().tolist() == [1] * len(artifact.fields)
        assert torch.equal(one_dense, dense[i : i + 1]) and torch.equal(one_sparse.values(), ids[:, i])
    unlabelled = [line.split(b"\t", 1)[1] for line in lines]
    for request in (lines, unlabelled):
        all_dense, all_sparse = encoder.features(request)
        assert torch.equal(all_dense, dense) and torch.equal(all_sparse.values(), sparse.values())
        assert torch.equal(artifact.predict(all_dense, all_sparse), artifact.predict(dense, sparse))
    with pytest.raises(ValueError, match=r"^request:2: I1: expected an integer, got 'x'$"):
        encoder.features([lines[0], b"0\tx\t" + lines[1].split(b"\t", 2)[2]])


def test_predict_raw_predicts_the_same_through_either_tokeniser(synthetic_criteo, exported, tmp_path,
                                                                monkeypatch) -> None:
    """``predict --raw`` encodes short chunks line by line and long ones with the chunked reader: the same rows,
    skips, labels and logits either way, and the same one-line refusal."""
    from multiembed.data.lines import LineEncoder
    from multiembed.data.rawlog import InputError
    from multiembed.serving import load_artifact
    from multiembed.serving import predict as serving_predict

    _, _, raw = synthetic_criteo
    lines = raw.read_bytes().splitlines(keepends=True)
    bad = tmp_path / "bad.txt"
    broken = lines[40].split(b"\t", 2)
    bad.write_bytes(b"".join(lines[:20] + [b"1\t2\n"] + lines[20:40] + [b"\t".join([broken[0], b"x", broken[2]])]
                             + lines[41:]))
    artifact = load_artifact(exported["int8"])
    calls: List[int] = []
    encode = LineEncoder.encode
    monkeypatch.setattr(LineEncoder, "encode", lambda self, *a, **k: calls.append(1) or encode(self, *a, **k))
    results, refusals = [], []
    for limit in (0, 10**6):
        monkeypatch.setattr(serving_predict, "LINE_ENCODER_MAX_LINES", limit)
        results.append(serving_predict.predict_raw(artifact, bad, batch_size=64, on_error="skip"))
        with pytest.raises(InputError) as refused:
            serving_predict.predict_raw(artifact, bad, batch_size=64)
        refusals.append(str(refused.value))
        assert bool(calls) == (limit > 0)
    chunked, by_line = results
    assert by_line.skipped == chunked.skipped == {"column_count": 1, "bad_integer": 1}
    assert by_line.rows.tolist() == chunked.rows.tolist() == [r for r in range(len(lines) + 1) if r not in (20, 41)]
    assert by_line.labels.tobytes() == chunked.labels.tobytes()
    assert by_line.logits.tobytes() == chunked.logits.tobytes() and len(chunked.logits) == len(lines) - 1
    assert refusals[0] == refusals[1] == f"{bad}:21: columns: expected 40 tab-separated columns, got 2"


def test_predict_ends_with_one_summary_line(synthetic_criteo, exported, tmp_path) -> None:
    """As a user runs it: stdout is the one JSON summary (rows, output path, AUC and log loss of labelled rows)
    and nothing else is printed."""
    import subprocess
    import sys

    _, _, raw = synthetic_criteo
    out = tmp_path / "p.parquet"
    done = subprocess.run([sys.executable, "-m", "multiembed.cli", "predict", str(exported["int8"]), "--raw", str(raw),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    summary = json.loads(lines[0])
    assert set(summary) == {"rows", "out", "auc", "logloss"} and summary["out"] == str(out)
    assert summary["rows"] == pq.read_table(out).num_rows and 0.0 < summary["auc"] < 1.0


def test_batch_norm_in_training_mode_is_refused(exported, tmp_path, capsys) -> None:
    """An allowed op with a writing mode: batch norm told ``training=True`` updates its running statistics in place
    on every call (the served model drifts); refused before it runs."""
    from multiembed.serving import ArtifactError, load_artifact

    artifact = tmp_path / "crafted"
    shutil.copytree(exported["none"], artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())

    def train_mode(program):
        node = next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"].endswith("batch_norm.default"))
        next(a for a in node["inputs"] if a["name"] == "training")["arg"] = {"as_bool": True}

    _rewrite_dense(artifact, lambda m: _edit_program(m, train_mode))
    program = torch.export.load(str(artifact / "dense.pt2")).module()
    before = {k: v.clone() for k, v in program.state_dict().items() if k.endswith("running_mean")}
    program(torch.randn(4, manifest["num_sets"], len(manifest["vocab_sizes"]), manifest["set_dim"]),
            torch.rand(4, len(manifest["dense_fields"])))
    after = program.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in before.items())  # unchecked, it writes its own buffers
    with pytest.raises(ArtifactError, match=r"calls torch\.ops\.aten\.batch_norm\.default with training .*eval mode"):
        load_artifact(artifact)
    capsys.readouterr()
    assert cli_main(["predict", str(artifact), "--data", str(tmp_path / "data-never-read"),
                     "--out", str(tmp_path / "p.parquet")]) == 2
    assert "only eval mode" in _error(capsys)


def test_dense_head_refuses_a_model_module_it_would_drop() -> None:
    from multiembed.serving.export import DenseHead

    model = _matrix_model("dcnv2-me-2x", "mean", 0)
    model.calibration = torch.nn.Linear(1, 1)
    with pytest.raises(ValueError, match="module\\(s\\) calibration are not part of the exported dense path"):
        DenseHead(model)


def test_row_layout_tells_unlabelled_rows_apart(tmp_path) -> None:
    import gzip

    from multiembed.data.formats import raw_format
    from multiembed.data.rawlog import row_layout

    criteo, avazu = raw_format("criteo"), raw_format("avazu")
    labelled = "\t".join(["1"] + ["5"] * 13 + ["ab"] * 26) + "\n"
    cases = {
        "train.txt": (labelled, criteo, criteo),
        "test.txt.gz": (labelled.split("\t", 1)[1], criteo, criteo.unlabelled()),
        "short.txt": ("1\t2\t3\n", criteo, criteo),  # neither: the labelled layout's checks name the problem
        "train.csv": (",".join(avazu.columns) + "\n", avazu, avazu),
        "test.csv": (",".join(avazu.unlabelled().columns) + "\n", avazu, avazu.unlabelled()),
    }
    for name, (text, fmt, expected) in cases.items():
        path = tmp_path / name
        path.write_bytes(gzip.compress(text.encode()) if name.endswith(".gz") else text.encode())
        assert row_layout(path, fmt) == expected, name
    assert row_layout(tmp_path / "missing.txt", criteo) == criteo


# --- compiled serving: the checked program compiled on this machine (AOTInductor), cached privately -------------------

# One configuration per backbone (and hetero), alternating mean and gate and cycling the modes: every backbone,
# mode and combiner is compiled in the default suite. The whole matrix (48 compiles, about 6.5 minutes on 2 cores)
# runs with MULTIEMBED_TEST_COMPILE_MATRIX=1.
_COMPILE_SUBSET = [
    ("dnn-se-2x", "mean", 0), ("ipnn-me-2x", "gate", 3), ("nfwfm-mesi-2x", "mean", 0), ("xdeepfm-se-2x", "gate", 3),
    ("dcnv2-me-2x", "mean", 0), ("dcnv2lr-mesi-2x", "gate", 3), ("finalmlp-me-2x", "mean", 0),
    ("dlrm-mesi-2x", "gate", 3), ("ffm-se-2x", "gate", 3), ("hetero-me-4x", "gate", 3),
]
COMPILE_MATRIX_ENV = "MULTIEMBED_TEST_COMPILE_MATRIX"


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    """One private cache for the module's compiles (entries are keyed, so configurations never collide)."""
    return tmp_path_factory.mktemp("compile-cache") / "cache"


def _compiled_mismatches(export_matrix, configs, cache: Path) -> List[str]:
    """Compiles each configuration's checked program and compares it with the uncompiled program on the same
    embeddings (batch 1 and 5): ``["config: max |diff|"]`` of those that differ by more than 1e-5."""
    from multiembed.data.metadata import file_sha256
    from multiembed.serving.artifact import load_exported_program
    from multiembed.serving.compiled import compiled_dense

    generator = torch.Generator().manual_seed(2)
    mismatched = []
    for config in configs:
        model, path = export_matrix[config]
        shapes = {"embeddings": (model.num_sets, len(_MATRIX_VOCAB), model.sparse_arch.set_dim),
                  "dense_features": (config[2],)}
        program = load_exported_program(path, shapes)
        compiled = compiled_dense(load_exported_program(path, shapes), file_sha256(path), shapes, cache)
        assert compiled.built
        for rows in (1, 5):
            embeddings = torch.randn(rows, *shapes["embeddings"], generator=generator)
            dense = torch.rand(rows, config[2], generator=generator)
            with torch.inference_mode():
                expected, served = program.module()(embeddings, dense), compiled(embeddings, dense)
            if served.shape != expected.shape or not torch.allclose(served, expected, rtol=0, atol=1e-5):
                mismatched.append(f"{'/'.join(map(str, config))} batch {rows}: {served.shape} vs {expected.shape}, "
                                  f"max |diff| {float((served - expected).abs().max()):.3g}")
    return mismatched


def test_compiled_programs_equal_the_uncompiled_ones(export_matrix, compile_cache) -> None:
    """Every backbone (hetero included), every mode and both combiners, with and without dense features."""
    backbones = {name.split("-")[0] for name, _, _ in export_matrix}
    assert {name.split("-")[0] for name, _, _ in _COMPILE_SUBSET} == backbones
    assert {name.split("-")[1] for name, _, _ in _COMPILE_SUBSET} == {"se", "me", "mesi"}
    assert {combiner for _, combiner, _ in _COMPILE_SUBSET} == {"mean", "gate"}
    assert not _compiled_mismatches(export_matrix, _COMPILE_SUBSET, compile_cache)


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get(COMPILE_MATRIX_ENV),
                    reason=f"the whole compile matrix (48 compiles, about 6.5 minutes): set {COMPILE_MATRIX_ENV}=1")
def test_every_compiled_program_equals_the_uncompiled_one(export_matrix, tmp_path) -> None:
    assert not _compiled_mismatches(export_matrix, sorted(export_matrix), tmp_path / "cache")


def test_predict_compile_serves_the_uncompiled_predictions_from_the_cache(synthetic_criteo, exported, compile_cache,
                                                                           tmp_path, capsys) -> None:
    """``predict --compile``: the same predictions (within 1e-5), compiled once, then loaded from the cache."""
    data, _, raw = synthetic_criteo
    cache = compile_cache
    plain = _predict(capsys, str(exported["int8"]), "--raw", str(raw), "--out", str(tmp_path / "plain.parquet"))
    first = _predict(capsys, str(exported["int8"]), "--raw", str(raw), "--out", str(tmp_path / "c1.parquet"),
                     "--compile", "--compile-cache", str(cache))
    second = _predict(capsys, str(exported["int8"]), "--data", str(data), "--out", str(tmp_path / "c2.parquet"),
                      "--compile", "--compile-cache", str(cache))
    assert first["compiled"]["built"] and not second["compiled"]["built"]
    assert first["compiled"]["entry"] == second["compiled"]["entry"]
    assert Path(first["compiled"]["entry"]).parent == cache and stat.S_IMODE(cache.stat().st_mode) == 0o700
    assert first["rows"] == plain["rows"] == second["rows"]
    expected = pq.read_table(tmp_path / "plain.parquet").column("logit").to_numpy()
    for name in ("c1", "c2"):
        np.testing.assert_allclose(pq.read_table(tmp_path / f"{name}.parquet").column("logit").to_numpy(), expected,
                                   rtol=0, atol=1e-5)
    # Nothing compiled is written into (or read from) the artifact.
    assert sorted(p.name for p in exported["int8"].iterdir()) == ["dense.pt2", "manifest.json", "tables.pt",
                                                                  "vocab.npz"]


@pytest.mark.parametrize("unsafe", ["group-writable", "other-writable", "foreign-owner", "symlink"])
def test_an_unsafe_compile_cache_is_refused(exported, tmp_path, capsys, unsafe: str) -> None:
    from multiembed.serving import CompileError, load_artifact

    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if unsafe == "group-writable":
        cache.chmod(0o770)
    elif unsafe == "other-writable":
        cache.chmod(0o703)
    elif unsafe == "foreign-owner":
        if os.geteuid() != 0:
            pytest.skip("giving a directory to another user needs root")
        os.chown(cache, 54321, 54321)
    else:
        cache.rmdir()
        (tmp_path / "elsewhere").mkdir(mode=0o700)
        cache.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(CompileError) as refused:
        load_artifact(exported["int8"], compile=True, cache_dir=cache)
    assert "\n" not in str(refused.value) and str(cache) in str(refused.value) and "refusing" in str(refused.value)
    capsys.readouterr()
    assert cli_main(["predict", str(exported["int8"]), "--data", str(tmp_path / "data-never-read"),
                     "--out", str(tmp_path / "p.parquet"),
                     "--compile", "--compile-cache", str(cache)]) == 2
    assert str(cache) in _error(capsys)


def test_bench_predict_reports_compiled_rows_flop_fractions_and_stages(synthetic_criteo, exported, compile_cache,
                                                                        tmp_path, capsys) -> None:
    """A smoke run (tiny call counts, no figures): every artifact exported and compiled at every batch size, the FLOP
    limit from the GEMM rate of the same run, tokenisation and lookup at batch 1, the targets of the compiled rows."""
    from multiembed.benchmarks import bench_predict

    data, _, raw = synthetic_criteo
    out = tmp_path / "bench.json"
    assert bench_predict.main(["--artifacts", str(exported["int8"]), str(exported["none"]), "--data", str(data),
                               "--raw", str(raw), "--batch-sizes", "1,64", "--min-calls", "3", "--min-seconds", "0",
                               "--compile-cache", str(compile_cache), "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    rows = record["results"]
    assert {(r["artifact"], r["compiled"], r["batch"]) for r in rows} == {
        (str(exported[q]), c, b) for q in ("int8", "none") for c in (False, True) for b in (1, 64)}
    flops = record["flops_per_prediction"][str(exported["int8"])]
    assert flops > 0 and record["flops_per_prediction"][str(exported["none"])] == flops
    for row in rows:
        limit = record["gemm_flops_per_s_per_core"] / flops
        assert row["flop_limit_predictions_per_s_per_core"] == pytest.approx(limit)
        assert row["flop_fraction"] == pytest.approx(row["predictions_per_s_per_core"] / limit)
        assert row["calls"] >= 3 and 0 < row["p50_ms"] <= row["p99_ms"]
    for artifact in (exported["int8"], exported["none"]):
        stages = record["stages"][str(artifact)]
        assert stages["tokenise"]["p50_ms"] > 0 and stages["lookup"]["p50_ms"] > 0
    targets = {(t["artifact"], t["target"]) for t in record["targets"]}
    assert len(targets) == 2 * 5  # per compiled artifact: batch-1 p50 and p99, tokenise, lookup, batch-64 fraction
    assert all(isinstance(t["held"], bool) for t in record["targets"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == rows


def _entry_of(cache: Path) -> Path:
    entries = [p for p in cache.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1, entries
    return entries[0]


def test_an_entry_that_does_not_match_is_rebuilt_not_loaded(export_matrix, tmp_path) -> None:
    """An entry recording another key (a planted package with its own correct checksum), then an entry whose package
    is not the one recorded, is compiled again: loading the planted bytes would fail, so a load would show."""
    from multiembed.data.metadata import file_sha256
    from multiembed.serving.artifact import load_exported_program
    from multiembed.serving.compiled import KEY_FILE, PACKAGE_FILE, compiled_dense

    model, path = export_matrix[("dcnv2-me-2x", "mean", 0)]
    shapes = {"embeddings": (model.num_sets, len(_MATRIX_VOCAB), model.sparse_arch.set_dim), "dense_features": (0,)}
    cache = tmp_path / "cache"
    first = compiled_dense(load_exported_program(path, shapes), file_sha256(path), shapes, cache)
    entry = _entry_of(cache)
    embeddings = torch.randn(3, *shapes["embeddings"])
    with torch.inference_mode():
        expected = load_exported_program(path, shapes).module()(embeddings, torch.zeros(3, 0))
    planted = b"not a compiled library"
    for tamper in ("key", "package"):
        record = json.loads((entry / KEY_FILE).read_text())
        (entry / PACKAGE_FILE).write_bytes(planted)
        if tamper == "key":
            record.update(bytes=len(planted), sha256=hashlib.sha256(planted).hexdigest())
            record["key"]["torch"] = "0.0.0"
            (entry / KEY_FILE).write_text(json.dumps(record))
        rebuilt = compiled_dense(load_exported_program(path, shapes), file_sha256(path), shapes, cache)
        assert first.built and rebuilt.built and rebuilt.entry == entry == first.entry, tamper
        assert (entry / PACKAGE_FILE).read_bytes() != planted
        assert json.loads((entry / KEY_FILE).read_text())["key"]["torch"] == torch.__version__
        with torch.inference_mode():
            assert torch.allclose(rebuilt(embeddings, torch.zeros(3, 0)), expected, rtol=0, atol=1e-5), tamper
    assert [p.name for p in cache.iterdir()] == [entry.name]  # nothing stale or temporary left beside it


def test_the_compiled_program_refuses_inputs_it_would_misread(export_matrix, compile_cache) -> None:
    """The library itself would serve a shorter dense batch by reading past it: every call checks the inputs."""
    from multiembed.data.metadata import file_sha256
    from multiembed.serving.artifact import load_exported_program
    from multiembed.serving.compiled import compiled_dense

    model, path = export_matrix[("dcnv2lr-mesi-2x", "gate", 3)]
    shapes = {"embeddings": (model.num_sets, len(_MATRIX_VOCAB), model.sparse_arch.set_dim), "dense_features": (3,)}
    compiled = compiled_dense(load_exported_program(path, shapes), file_sha256(path), shapes, compile_cache)
    embeddings = torch.randn(4, *shapes["embeddings"])
    assert compiled(embeddings, torch.rand(4, 3)).shape == (4,)
    refused = ((torch.rand(3, 3), r"dense_features is torch.float32 \[3, 3\], expected torch.float32 \[4, 3\]"),
               (torch.rand(4, 2), r"dense_features is torch.float32 \[4, 2\]"),
               (torch.rand(4, 3).double(), r"dense_features is torch.float64"))
    for dense, message in refused:
        with pytest.raises(ValueError, match=message):
            compiled(embeddings, dense)
    with pytest.raises(ValueError, match=r"embeddings is torch.float32 \[4, 1,"):
        compiled(embeddings[:, :1], torch.rand(4, 3))


def test_a_killed_compile_leaves_no_entry_that_loads(export_matrix, tmp_path, monkeypatch) -> None:
    """A compile stopped after writing part of its package publishes nothing and leaves nothing behind; the
    temporary directory of a compile killed outright (a day old) is removed by the next compile, a recent one (a
    compile in progress) is kept."""
    from multiembed.data.metadata import file_sha256
    from multiembed.serving.artifact import load_exported_program
    from multiembed.serving.compiled import compiled_dense

    model, path = export_matrix[("dnn-se-2x", "mean", 0)]
    shapes = {"embeddings": (model.num_sets, len(_MATRIX_VOCAB), model.sparse_arch.set_dim), "dense_features": (0,)}
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    (cache / ".tmp-killed-outright").mkdir()
    (cache / ".tmp-killed-outright" / "model.pt2").write_bytes(b"PK half a package")
    os.utime(cache / ".tmp-killed-outright", (time.time() - 2 * 86400,) * 2)
    (cache / ".tmp-in-progress").mkdir()

    def killed(program, package_path):
        Path(package_path).write_bytes(b"PK\x03\x04 half a package")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", killed)
    with pytest.raises(KeyboardInterrupt):
        compiled_dense(load_exported_program(path, shapes), file_sha256(path), shapes, cache)
    assert [p.name for p in cache.iterdir()] == [".tmp-in-progress"]


def test_compile_is_refused_in_one_line_without_a_compiler(exported, tmp_path, capsys, monkeypatch) -> None:
    from torch._inductor import config

    monkeypatch.setattr(config.cpp, "cxx", (str(tmp_path / "no-such-c++"),))
    capsys.readouterr()
    assert cli_main(["predict", str(exported["int8"]), "--data", str(tmp_path / "data-never-read"),
                     "--out", str(tmp_path / "p.parquet"),
                     "--compile", "--compile-cache", str(tmp_path / "cache")]) == 2
    line = _error(capsys)
    assert "--compile: no C++ compiler found" in line and "no-such-c++" in line
    assert not (tmp_path / "p.parquet").exists()


def test_compile_runs_only_after_the_artifact_checks(exported, tmp_path, monkeypatch) -> None:
    """A program the checks refuse never reaches the compiler."""
    from multiembed.serving import ArtifactError, load_artifact

    artifact = tmp_path / "crafted"
    shutil.copytree(exported["int8"], artifact)
    _rewrite_dense(artifact, lambda m: _edit_program(
        m, lambda p: _first_node(p).__setitem__("target", "builtins.exec")))
    calls = []
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", lambda *a, **k: calls.append(a))
    with pytest.raises(ArtifactError, match="builtins.exec"):
        load_artifact(artifact, compile=True, cache_dir=tmp_path / "cache")
    assert calls == [] and not (tmp_path / "cache").exists()
