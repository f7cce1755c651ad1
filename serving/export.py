"""A finished run's best checkpoint -> an inference artifact (:mod:`multiembed.serving.artifact`).

:func:`export_run`:

1. finds the run's best checkpoint (refused in one line when the run has no complete one) and the training data's
   preprocessing: the raw format, vocabulary mode, hash seed and sizes, and the paper-mode vocabulary, read from the
   dataset directory ``config.json`` names (or ``data_dir``) and checked against the run's vocabulary fingerprint;
2. rebuilds the model through the one build path (:func:`~multiembed.training.evaluation.model_for_run`, one CPU
   rank) and loads the checkpoint, whatever world size and sharding it was saved with;
3. assembles every table from its shards, strips the padding (``K * stored_d -> K * d`` columns) and quantises the
   rows with TorchRec's inference quantisation (what ``quantize_inference_model`` does to an
   ``EmbeddingBagCollection``: row-wise int8 or int4 with an fp16 scale and bias per row); the artifact stores the
   quantised rows and rebuilds TorchRec's ``QuantEmbeddingBagCollection`` from them at load (tested to give the
   same outputs as ``quantize_inference_model``'s module);
4. exports the dense part (dense arch, set arch, mean over sets or the learned set gate, over arch; eval mode,
   the plain path of :mod:`multiembed.models.cpu_fastpath`) with ``torch.export`` over a dynamic batch dimension;
5. writes everything into a temporary directory beside ``out``, the manifest last, and renames it into place
   (temporary directories that killed exports to ``out`` left are removed first). ``out`` must not exist and must
   not lie inside a dataset, another artifact or a run's ``checkpoints/``; ``overwrite`` replaces only an intact
   earlier artifact (its manifest verifies: every listed file present, of its size and SHA-256) holding nothing
   the manifest does not list.

Example::

    >>> result = export_run("runs/me4x", "runs/me4x.int8", quantize="int8")  # doctest: +SKIP
    >>> result.manifest.sizes["memory_ratio"]  # doctest: +SKIP
    0.3
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import quantize_state_dict

from multiembed.collapse import local_shards_from_tensors
from multiembed.data.formats import HASHING_MODE, MANAGED_MODE, PAPER_MODE, raw_format
from multiembed.runtime.locking import pid_is_gone
from multiembed.data.metadata import DatasetError, atomic_write, atomic_write_text, read_metadata
from multiembed.data.remap import REMAP_FILE, RemappedVocabulary
from multiembed.data.vocab import VOCAB_FILE, CountedVocabulary, HashingVocabulary, ManagedVocabulary
from multiembed.models import MultiEmbeddingModel, multi_embedding_tables
from multiembed.models.cpu_fastpath import use_fast_path
from multiembed.models.managed import remapping, table_collection
from multiembed.models.model import MultiEmbeddingDensePath
from multiembed.serving.artifact import (
    DENSE_FILE,
    MANIFEST_FILE,
    NO_RAW_PREPROCESSING,
    QUANT_BITS,
    QUANT_DATA_TYPES,
    QUANTIZE_CHOICES,
    RAW_PREPROCESSING,
    TABLES_FILE,
    ArtifactError,
    Manifest,
    build_collection,
    file_entry,
    load_artifact,
    quantized_row_bytes,
    read_manifest,
    table_memory_bytes,
    verify_files,
)
from multiembed.serving.outputs import check_export_placement
from multiembed.training.evaluation import model_for_run
from multiembed.training.run_dir import RunDir

_TMP_PREFIX = ".tmp-export-"


class DenseHead(MultiEmbeddingDensePath):
    """The dense path of a :class:`~multiembed.models.MultiEmbeddingModel` as one module for ``torch.export``:
    ``(embeddings [B, K, F, d], dense_features [B, num_dense]) -> logits [B]``.

    Copies of every learned module after the model's sparse arch (dense arch, set arch, set gate, over arch), run by
    the model's own :meth:`~multiembed.models.model.MultiEmbeddingDensePath.dense_forward`, in fp32.

    Args:
        model: the trained model; its dense modules are copied.

    Raises:
        ValueError: the model holds a module outside its sparse arch that the dense path does not run (it would be
            dropped from the export).

    Example::

        >>> from multiembed.models import build_model
        >>> model = build_model("dcnv2-me-2x", {"f1": 10, "f2": 20}, device=torch.device("cpu"), hidden=16)
        >>> head = DenseHead(model).eval()
        >>> head(torch.rand(3, 2, 2, 10), torch.empty(3, 0)).shape
        torch.Size([3])
    """

    def __init__(self, model: MultiEmbeddingModel) -> None:
        super().__init__()
        self.dense_arch = copy.deepcopy(model.dense_arch)
        self.set_arch = copy.deepcopy(model.set_arch)
        self.set_gate = copy.deepcopy(model.set_gate)
        self.over_arch = copy.deepcopy(model.over_arch)
        dropped = sorted({name for name, _ in model.named_children()} - {"sparse_arch", *dict(self.named_children())})
        if dropped:
            raise ValueError(f"{type(model).__name__}: module(s) {', '.join(dropped)} are not part of the exported "
                             "dense path")

    def forward(self, embeddings: torch.Tensor, dense_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: ``[B, K, F, d]``.
            dense_features: ``[B, num_dense]`` (ignored without a dense arch).

        Returns:
            logits ``[B]``.
        """
        return self.dense_forward(dense_features, embeddings)


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_run` wrote.

    Attributes:
        out: the artifact directory.
        manifest: its manifest (``sizes`` holds the table byte counts).
        checkpoint: the checkpoint exported.
    """

    out: Path
    manifest: Manifest
    checkpoint: Path


def preprocessing_of(record: Mapping[str, Any], data_dir: Optional[str]) -> Tuple[Dict[str, Any], Optional[CountedVocabulary], list]:
    """The training data's preprocessing, vocabulary (paper mode) and dense field names.

    Args:
        record: the run's ``config.json``.
        data_dir: the dataset directory (default: the one ``config.json`` names).

    Raises:
        ValueError: the dataset is unreadable or its vocabulary fingerprint is not the run's.
    """
    data = record.get("data", {})
    where = data_dir or data.get("dir") or record.get("options", {}).get("data")
    if not where:
        raise ValueError("config.json names no dataset directory; pass --data with the training data")
    try:
        meta = read_metadata(where)
    except DatasetError as e:
        raise ValueError(f"{e} (export reads the training data's vocabulary; pass --data if it moved)") from None
    trained_on = data.get("vocab_fingerprint")
    if trained_on and meta.vocab_fingerprint != trained_on:
        raise ValueError(
            f"{where}: vocabulary fingerprint {meta.vocab_fingerprint[:16]}... differs from the run's "
            f"({trained_on[:16]}...); pass --data with the training data"
        )
    if meta.dataset == "synthetic" or "mode" not in meta.options:
        reason = f"{meta.dataset} data has no raw-log tokenisation: predict reads its converted Parquet only"
        return {"kind": NO_RAW_PREPROCESSING, "reason": reason}, None, list(meta.dense_fields)
    fmt = raw_format(meta.dataset)
    mode = meta.options["mode"]
    seed = int(meta.options.get("hash_seed", 0))
    spec: Dict[str, Any] = {"kind": RAW_PREPROCESSING, "format": fmt.name, "mode": mode, "hash_seed": seed,
                            "dense": "log1p(max(x, 0)), 0 when empty"}
    vocab: Optional[CountedVocabulary] = None
    if mode == HASHING_MODE:
        built = HashingVocabulary(fmt.name, meta.vocab_sizes, seed)
        spec["hash_sizes"] = [[f, int(n)] for f, n in meta.vocab_sizes.items()]
        fingerprint = built.fingerprint
    elif mode == MANAGED_MODE:
        fingerprint = ManagedVocabulary(fmt.name, meta.field_names, seed).fingerprint
        spec["remap"] = REMAP_FILE  # the run's remapping, written by export_run
    elif mode == PAPER_MODE:
        try:
            vocab = CountedVocabulary.load(where)
        except DatasetError as e:
            raise ValueError(str(e)) from None
        spec["vocabulary"] = VOCAB_FILE
        fingerprint = vocab.fingerprint
    else:
        raise ValueError(f"{where}: options.mode {mode!r} is not one of paper, hashing, managed")
    if fingerprint != meta.vocab_fingerprint:
        raise ValueError(f"{where}: the vocabulary gives fingerprint {fingerprint[:16]}..., metadata.json records "
                         f"{meta.vocab_fingerprint[:16]}...")
    return spec, vocab, list(meta.dense_fields)


def run_remapping(model: MultiEmbeddingModel, record: Mapping[str, Any], hash_seed: int) -> RemappedVocabulary:
    """The trained remapping of a ``--vocab managed`` run's model (loaded on one rank), with the buckets of the world
    size it was trained on (``config.json``) and the hash seed of its training data's token keys."""
    options, data = record.get("options", {}), record.get("data", {})
    tables = remapping(model)
    fields = model.sparse_arch.field_names
    return RemappedVocabulary(
        str(data.get("dataset", "")), fields, hash_seed,
        {f: tables[f"t_{f}"][0].numpy() for f in fields}, {f: tables[f"t_{f}"][1].numpy() for f in fields},
        table_rows=int(options["table_rows"]), buckets=int(record.get("provenance", {}).get("world_size", 1)),
    )


def logical_tables(model: MultiEmbeddingModel) -> Dict[str, torch.Tensor]:
    """``{field: [rows, K * d]}``: every table assembled from this process's shards (one rank holds them all),
    padding stripped, the K sets side by side."""
    sparse = model.sparse_arch
    state = table_collection(sparse.embedding_bag_collection).state_dict()
    stored = {name: state[f"embedding_bags.{name}.weight"] for name in sparse.table_names}
    full = {name: torch.zeros(tuple(weight.shape), dtype=torch.float32) for name, weight in stored.items()}
    for shard in local_shards_from_tensors(stored, rank=0):
        rows, cols = shard.tensor.shape
        full[shard.table_name][shard.row_offset : shard.row_offset + rows, shard.col_offset : shard.col_offset + cols] = (
            shard.tensor.detach().float().cpu()
        )
    per_set = sparse.weight_views_per_set(full)
    return {f: torch.cat([per_set[k][f] for k in range(sparse.num_sets)], dim=1).contiguous() for f in sparse.field_names}


def table_tensors(
    tables: Mapping[str, torch.Tensor], num_sets: int, set_dim: int, quantize: str
) -> Dict[str, torch.Tensor]:
    """The tensors ``tables.pt`` stores: fp32 rows, or TorchRec's row-wise quantisation of them.

    The quantisation is TorchRec's ``quantize_state_dict``, the step ``quantize_inference_model`` runs when it
    swaps an ``EmbeddingBagCollection`` for a ``QuantEmbeddingBagCollection`` (``from_float``): per table the
    row-wise quantised rows (FBGEMM's ``FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf``) and their fp16 scale and
    bias, which the artifact stores and hands back to ``QuantEmbeddingBagCollection`` at load.
    """
    if quantize == "none":
        return {f"t_{f}.weight": w for f, w in tables.items()}
    vocab_sizes = {f: int(w.shape[0]) for f, w in tables.items()}
    configs = multi_embedding_tables(vocab_sizes, num_sets, set_dim, layout="fused", init="torchrec",
                                     stored_set_dim=set_dim)
    collection = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
    collection.load_state_dict({f"embedding_bags.t_{f}.weight": w for f, w in tables.items()}, assign=True)
    quantized: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
    quantize_state_dict(collection, quantized, {c.name: QUANT_DATA_TYPES[quantize] for c in configs})
    out: Dict[str, torch.Tensor] = {}
    for name, (weight, scale_shift) in quantized.items():
        out[f"{name}.weight"] = weight.contiguous().clone()
        out[f"{name}.scale_shift"] = scale_shift.contiguous().clone()
    return out


def export_dense(model: MultiEmbeddingModel, num_fields: int, num_dense: int, path: Path) -> None:
    """``torch.export`` of :class:`DenseHead` (eval mode, the plain path) over a dynamic batch, saved to ``path``.

    Raises:
        ValueError: ``torch.export`` cannot capture the dense part over a dynamic batch (its first line).
    """
    head = DenseHead(model).eval()
    k, d = model.num_sets, model.sparse_arch.set_dim
    example = (torch.randn(2, k, num_fields, d), torch.rand(2, num_dense))
    batch = torch.export.Dim("batch", min=1)
    try:
        with use_fast_path(False), torch.no_grad():
            program = torch.export.export(head, example, dynamic_shapes=({0: batch}, {0: batch}))
    except torch._dynamo.exc.UserError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"torch.export cannot export this model's dense part over a dynamic batch ({reason})") from None
    # Serialised in memory, then written by Python: torch.export.save aborts the process (a C++ exception in a
    # destructor) when a write to a file fails, where a Python write raises an OSError that export reports.
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuses an ``--out`` that export would write over without having created it (one line naming it)."""
    if out.is_symlink():
        raise ValueError(f"{out}: is a symbolic link; export writes a new directory, never through a link")
    check_export_placement(out)
    if not out.exists():
        return
    if not overwrite:
        raise ValueError(f"{out}: already exists; choose a new --out (or --overwrite to replace an earlier export)")
    if not out.is_dir():
        raise ValueError(f"{out}: not a multiembed export artifact; --overwrite only replaces one")
    try:
        manifest = read_manifest(out)
        verify_files(out, manifest)
    except ArtifactError as e:
        raise ValueError(f"{out}: not an intact export artifact ({e}); --overwrite only replaces one") from None
    listed = {MANIFEST_FILE, *(entry["path"] for entry in manifest.files.values())}
    others = sorted(entry.name for entry in out.iterdir() if entry.name not in listed)
    if others:
        raise ValueError(f"{out}: holds files the artifact does not list ({', '.join(others[:3])}"
                         f"{', ...' if len(others) > 3 else ''}); --overwrite replaces only an artifact's own files")


def _host_prefix(out: Path) -> str:
    """``.tmp-export-<name>-<host>-``: the start of this host's temporary directories beside ``out`` (``<host>``:
    8 hex digits of the host name's SHA-256)."""
    return f"{_TMP_PREFIX}{out.name}-{hashlib.sha256(socket.gethostname().encode('utf-8')).hexdigest()[:8]}-"


def _tmp_prefix(out: Path) -> str:
    """The prefix of this process's temporary directories beside ``out`` (``<host prefix><pid>-``), so that a
    later export can tell those of a dead process."""
    return f"{_host_prefix(out)}{os.getpid()}-"


def remove_stale_temporaries(out: Path) -> List[Path]:
    """Removes the temporary directories that killed exports to ``out`` left beside it: those of a process of
    this host that no longer runs, or of this process's id (a running export's are kept). Returns what was
    removed."""
    pattern = re.compile(re.escape(_host_prefix(out)) + r"(\d+)-[A-Za-z0-9_]+$")
    removed: List[Path] = []
    if not out.parent.is_dir():
        return removed
    for entry in out.parent.iterdir():
        found = pattern.match(entry.name)
        pid = int(found.group(1)) if found else -1
        if found and entry.is_dir() and not entry.is_symlink() and (pid == os.getpid() or pid_is_gone(pid)):
            shutil.rmtree(entry)
            removed.append(entry)
    return removed


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Renames the finished ``tmp`` to ``out`` (an earlier artifact is moved aside first, then removed)."""
    old = None
    if overwrite and out.exists():
        old = out.parent / f"{_tmp_prefix(out)}old"
        os.rename(out, old)
    if out.exists():
        raise ValueError(f"{out}: appeared while exporting; not replaced")
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old)


def export_run(
    run_dir: "str | Path",
    out: "str | Path",
    quantize: str = "int8",
    data_dir: Optional[str] = None,
    overwrite: bool = False,
) -> ExportResult:
    """Exports a run's best checkpoint as an artifact directory (see the module docstring).

    Args:
        run_dir: the run directory (any world size and sharding it was trained with).
        out: the artifact directory to create.
        quantize: ``int8`` (default of the CLI), ``int4`` or ``none`` (fp32 tables).
        data_dir: the training data, when it moved from where ``config.json`` says.
        overwrite: replace ``out`` when it is an earlier artifact.

    Raises:
        ValueError: not a run, no complete checkpoint, the training data unreadable or of another vocabulary, a
            table width the quantisation cannot store (:func:`~multiembed.serving.artifact.quantized_row_bytes`),
            ``out`` exists.
    """
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"--quantize must be one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError("export runs as one process (not under torchrun); it reads every shard itself")
    run_dir, out = Path(run_dir), Path(out)
    run_files = RunDir(run_dir)
    record = run_files.read_config()
    try:
        checkpoint = run_files.best_checkpoint()
    except ValueError as e:
        raise ValueError(f"{run_dir}: no complete checkpoint to export ({e})") from None
    _check_out(out, overwrite)
    spec, vocab, dense_names = preprocessing_of(record, data_dir)
    run = model_for_run(run_dir, device="cpu")
    checkpoint = run.load()  # the best one again: a running training's retention may have replaced it meanwhile
    model = run.built.model
    model.eval()
    num_dense = int(record.get("data", {}).get("num_dense", len(dense_names))) if run.config.dense_features else 0
    dense_fields = dense_names[:num_dense] if num_dense else []
    sparse = model.sparse_arch
    if quantize != "none":
        quantized_row_bytes(sparse.num_sets * sparse.set_dim, quantize)  # refuses rows FBGEMM cannot align
    tables = logical_tables(model)

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out), dir=out.parent))
    try:
        tensors = table_tensors(tables, sparse.num_sets, sparse.set_dim, quantize)
        # Through a Python file: a failed write is an OSError naming the file, not torch's "unexpected pos".
        atomic_write(tmp / TABLES_FILE, lambda f: torch.save(tensors, f))
        export_dense(model, sparse.num_fields, num_dense, tmp / DENSE_FILE)
        files = {"tables": file_entry(tmp / TABLES_FILE), "dense": file_entry(tmp / DENSE_FILE)}
        if vocab is not None:
            vocab.save(tmp)
            files["vocabulary"] = file_entry(tmp / VOCAB_FILE)
        if record.get("options", {}).get("vocab") == MANAGED_MODE:
            # Raw keys -> trained rows, for predict --raw and --data alike (the Parquet of managed data holds keys).
            run_remapping(model, record, int(spec.get("hash_seed", 0))).save(tmp)
            files["remap"] = file_entry(tmp / REMAP_FILE)
            spec["remap"] = REMAP_FILE
        data = record.get("data", {})
        manifest = Manifest(
            model=str(record.get("options", {}).get("model", run.config.model)),
            quantize=quantize,
            num_sets=sparse.num_sets,
            set_dim=sparse.set_dim,
            vocab_sizes={f: int(n) for f, n in sparse.vocab_sizes.items()},
            dense_fields=dense_fields,
            dataset=str(data.get("dataset", "")),
            vocab_fingerprint=str(data.get("vocab_fingerprint", "")),
            preprocessing=spec,
            files=files,
            source={
                "run": os.path.relpath(os.path.abspath(run_dir), os.path.abspath(out)),
                "checkpoint": os.path.relpath(os.path.abspath(checkpoint), os.path.abspath(out)),
                "versions": {"torch": torch.__version__, **_versions()},
            },
        )
        manifest.sizes = table_sizes(manifest, tensors)
        atomic_write_text(tmp / MANIFEST_FILE, json.dumps(manifest.to_json(), indent=2) + "\n")
        load_artifact(tmp)  # what predict will do: the artifact must load before it is published
        _publish(tmp, out, overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"{out}: not written, its temporary directory is removed: {e}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, manifest, checkpoint)


def table_sizes(manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Byte counts of the tables: logical fp32 (unpadded), as stored in the file, and in memory once loaded."""
    rows = sum(manifest.vocab_sizes.values())
    logical = rows * manifest.table_width * 4
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    memory = table_memory_bytes(build_collection(manifest, tensors))
    return {
        "rows": rows,
        "table_width": manifest.table_width,
        "bits": QUANT_BITS[manifest.quantize],
        "logical_fp32_bytes": logical,
        "stored_bytes": stored,
        "memory_bytes": memory,
        "stored_ratio": round(stored / logical, 4),
        "memory_ratio": round(memory / logical, 4),
    }


def _versions() -> Dict[str, str]:
    from importlib import metadata

    out = {}
    for name in ("torchrec", "fbgemm-gpu-cpu", "fbgemm-gpu"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
