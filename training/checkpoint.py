"""Checkpoints with ``torch.distributed.checkpoint`` (DCP), written atomically and verified on load.

Layout under ``RUN_DIR/checkpoints/``::

    step-00001200/            a complete checkpoint: DCP shards + .metadata + manifest.json
    .tmp-step-00001300/       being written (never read; removed on the next save)

A save writes every rank's shards into the temporary directory, then rank 0 writes ``manifest.json`` (size and
SHA-256 of every file) and renames the directory: a directory without the ``.tmp-`` prefix is complete. DCP itself
checks no bytes, so the manifest is what makes truncation or corruption detectable; a checkpoint that fails the
check is reported and skipped, never loaded.

The state saved is ``{"model": dmp.state_dict(), "optim": optimizer.state_dict(), "progress": {...},
"rank<r>": {...}}``: sharded tables and the fused optimizer's per-shard state come as ShardedTensors, so the same
files load on another world size or plan. Per-rank state (RNG) sits under a rank-specific key because DCP
deduplicates equal keys across ranks.

Loading runs no code from the files. DCP pickles ``.metadata`` and any non-tensor value; here ``.metadata`` is
unpickled by :class:`SafeFileSystemReader`, which admits only the classes DCP's ``Metadata`` is made of, and
non-tensor values are read by :class:`SafeLoadPlanner` with ``torch.load(weights_only=True)``, which also refuses
a value stored as bytes where the state being loaded holds a tensor (DCP would replace the tensor with the object).
Tensors DCP itself reads with ``weights_only=True``. A refusal is a one-line :class:`CheckpointError` that names the
file.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

from multiembed.data.metadata import atomic_write_text, file_sha256, write_failure
from multiembed.data.paths import escape_reason, is_within
from multiembed.runtime.stack import private_api_error
from multiembed.training.distributed import all_gather_object, barrier, broadcast_object

try:  # DCP internals the safe loader needs: the type its .metadata pickles per file, and its nested-dict setter
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.filesystem import _StorageInfo
except ImportError as e:  # pragma: no cover - depends on the installed torch
    raise private_api_error("torch.distributed.checkpoint._traverse / filesystem._StorageInfo", e) from e

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"

# Called on rank 0 with the temporary directory after the manifest is written, before the checkpoint is published
# (None in normal use). Tests set it to interrupt a save at its most delicate point: in-process, or in the workers
# of a torchx job through a sitecustomize module on PYTHONPATH (tests/test_faults.py).
_before_publish_hook: Optional[Callable[[Path], None]] = None


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted or unsafe (the one-line message names the file)."""


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` as one printable line (names read from a crafted file may hold newlines), at most ``limit`` chars."""
    line = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(text))
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


# ------------------------------------------------------------------------------------------- safe loading
# What the pinned torch pickles into a DCP ``.metadata`` (logged from find_class on checkpoints of our trainer):
# the Metadata dataclasses, the file reader's _StorageInfo, torch.Size, dtypes (pickled as ``torch.<name>``),
# layouts (through ``torch.serialization._get_layout``) and StorageMeta.checkpoint_id, a PosixPath.
_METADATA_ALLOWLIST: Dict[str, frozenset] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch": frozenset({"Size"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "pathlib": frozenset({"PosixPath", "PurePosixPath"}),
}

# Dtypes by the name they pickle as (``torch.float32``), looked up here rather than with getattr(torch, name): torch's
# module __getattr__ imports submodules on demand.
_TORCH_DTYPES: Dict[str, torch.dtype] = {n: v for n, v in vars(torch).items() if isinstance(v, torch.dtype)}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata``, admitting only :data:`_METADATA_ALLOWLIST` and torch dtypes."""

    def __init__(self, file: Any, path: Any) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if name in _METADATA_ALLOWLIST.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and name in _TORCH_DTYPES:
            return _TORCH_DTYPES[name]
        raise CheckpointError(
            f"{_one_line(self._path)}: refuses to load class {_one_line(module, 120)}.{_one_line(name, 120)}: "
            "not a checkpoint metadata class"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{_one_line(self._path)}: refuses a persistent id: not checkpoint metadata")


def _check_metadata(metadata: Any, path: Any) -> None:
    """Raises :class:`CheckpointError` unless ``metadata`` has the shape DCP writes (checked before DCP uses it)."""
    where = _one_line(path)
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise CheckpointError(f"{where}: not checkpoint metadata (a {type(metadata).__name__})")
    entries = metadata.state_dict_metadata
    storage = metadata.storage_data
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CheckpointError(f"{where}: malformed checkpoint metadata (state_dict_metadata / storage_data)")
    for fqn, md in entries.items():
        if not isinstance(fqn, str) or not isinstance(
            md, (dcp_metadata.TensorStorageMetadata, dcp_metadata.BytesStorageMetadata)
        ):
            raise CheckpointError(f"{where}: malformed checkpoint metadata entry {_one_line(repr(fqn), 120)}")
    for index, info in storage.items():
        if not isinstance(index, dcp_metadata.MetadataIndex) or not isinstance(info, _StorageInfo):
            raise CheckpointError(f"{where}: malformed checkpoint storage entry {_one_line(repr(index), 120)}")
        rel = info.relative_path
        if (
            not isinstance(rel, str)
            or not rel
            or PurePosixPath(rel).is_absolute()
            or ".." in PurePosixPath(rel).parts
            or "\\" in rel
            or not isinstance(info.offset, int)
            or not isinstance(info.length, int)
            or info.offset < 0
            or info.length < 0
        ):
            raise CheckpointError(
                f"{where}: storage entry {_one_line(index.fqn, 120)} points outside the checkpoint "
                f"({_one_line(repr(rel), 120)}, offset {_one_line(repr(info.offset), 40)})"
            )


class SafeFileSystemReader(FileSystemReader):
    """A DCP ``FileSystemReader`` that unpickles ``.metadata`` with an allowlist of DCP's metadata classes.

    ``FileSystemReader.read_metadata`` runs ``pickle.load`` on the file, so a crafted ``.metadata`` runs arbitrary
    code. Here any class outside :data:`_METADATA_ALLOWLIST` (and torch dtypes) raises :class:`CheckpointError`
    ("<path>/.metadata: refuses to load class X.Y: not a checkpoint metadata class") before it is imported or
    called, and the result must have the shape of DCP ``Metadata`` with storage inside the checkpoint directory.
    Tensor data DCP's ``read_data`` already reads with ``torch.load(weights_only=True)``; bytes entries go to the
    planner's ``load_bytes`` (see :class:`SafeLoadPlanner`).
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            with self.fs.create_stream(path, "rb") as metadata_file:
                metadata = _MetadataUnpickler(metadata_file, path).load()
        except CheckpointError:
            raise
        except OSError as e:
            reason = _one_line(e.strerror or e)
            raise CheckpointError(f"{_one_line(path)}: cannot read checkpoint metadata ({reason})") from None
        except Exception as e:  # a truncated or garbled pickle, or an allowed class given bad arguments
            raise CheckpointError(
                f"{_one_line(path)}: unreadable checkpoint metadata ({type(e).__name__}: {_one_line(e, 160)})"
            ) from None
        _check_metadata(metadata, path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _holds_tensor(value: Any) -> bool:
    """Whether a state-dict leaf is a tensor (plain, ShardedTensor or DTensor: all ``torch.Tensor`` subclasses)."""
    return isinstance(value, torch.Tensor)


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner without its two ways to run code from a checkpoint.

    * A key the metadata declares as bytes (``BytesStorageMetadata``) where the state being loaded holds a tensor
      is refused: DCP would unpickle the bytes in place of the tensor.
    * Bytes entries (non-tensor values) are read with ``torch.load(weights_only=True)`` instead of DCP's
      ``weights_only=False``.

    Args:
        checkpoint: the checkpoint directory, named in error messages.
    """

    def __init__(self, checkpoint: Any = "checkpoint", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.checkpoint = str(checkpoint)

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        for item in plan.items:
            if item.type != LoadItemType.BYTE_IO:
                continue
            fqn = item.dest_index.fqn
            if _holds_tensor(self.state_dict.get(fqn)):
                raise CheckpointError(
                    f"{_one_line(self.checkpoint)}/.metadata: refuses {_one_line(fqn, 160)}: stored as pickled "
                    "bytes where the model/optimizer state holds a tensor"
                )
        return plan

    def _data_file(self, read_item: ReadItem) -> str:
        storage = getattr(self.metadata, "storage_data", None) or {}
        info = storage.get(read_item.storage_index)
        name = info.relative_path if isinstance(info, _StorageInfo) else "?"
        return f"{_one_line(self.checkpoint)}/{_one_line(name, 120)}"

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        if _holds_tensor(self.state_dict.get(fqn)):  # create_local_plan refused this already
            raise CheckpointError(f"{self._data_file(read_item)}: refuses bytes for tensor {_one_line(fqn, 160)}")
        try:
            obj = torch.load(value, weights_only=True)
        except Exception as e:
            # torch's message is many lines; keep the class it refused (its wording varies by cause).
            found = re.search(r"GLOBAL ([\w.]+)", str(e))
            reason = f"refuses to load class {found.group(1)}" if found else _first_line(e)
            raise CheckpointError(
                f"{self._data_file(read_item)}: value {_one_line(fqn, 160)}: {_one_line(reason, 160)}: not plain "
                "checkpoint data"
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj


def _first_refusal(error: CheckpointException) -> Optional[CheckpointError]:
    for failure in error.failures.values():
        exc = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(exc, CheckpointError):
            return exc
    return None


def _agree_on_error(problem: Optional[CheckpointError]) -> Optional[CheckpointError]:
    """The first rank's error when any rank has one (so that every rank raises, instead of some waiting in DCP)."""
    messages = all_gather_object(str(problem) if problem is not None else None)
    first = next((m for m in messages if m), None)
    if first is None:
        return None
    return problem if problem is not None else CheckpointError(first)


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def save_checkpoint(run_dir: Path, step: int, state: Dict[str, Any], info: Dict[str, Any]) -> Path:
    """Saves ``state`` with DCP as ``checkpoints/step-<step>`` on every rank (a collective).

    Args:
        run_dir: the run directory (shared by all ranks).
        step: global training step; names the checkpoint.
        state: the DCP state dict (model, optimizer, progress, per-rank entries).
        info: JSON-able facts written into the manifest (epoch, metrics, plan summary).

    Returns:
        The published checkpoint directory.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{step_dir_name(step)}"
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        tmp.mkdir(parents=True)
    barrier()
    try:
        dcp.save(state, checkpoint_id=str(tmp))
    except CheckpointException as e:
        raise _save_failure(run_dir, tmp, _failure_of(e)) from None
    barrier()
    if _rank() == 0:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "step": step,
            "info": info,
            "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files},
        }
        try:
            atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        except OSError as e:
            raise _save_failure(run_dir, tmp, e) from None
        _fsync_dir(tmp)
        if _before_publish_hook is not None:
            _before_publish_hook(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
    barrier()
    return final


def _failure_of(error: CheckpointException) -> BaseException:
    """The first rank's exception inside DCP's ``CheckpointException`` (the exception itself when it holds none)."""
    detail = next(iter(error.failures.values()), None)
    exc = detail[0] if isinstance(detail, tuple) else detail
    return exc if isinstance(exc, BaseException) else error


def _save_failure(run_dir: Path, tmp: Path, error: BaseException) -> CheckpointError:
    """A failed save (a full disk, a quota, an I/O error) as one line: the temporary directory (removed here, rank
    0), the reason and the free bytes, and the last good checkpoint, which is kept."""
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    kept = _newest_valid_here(run_dir, report=lambda _: None)
    after = f"the last good checkpoint is kept: {kept}" if kept is not None else "no earlier checkpoint exists"
    return CheckpointError(f"{_one_line(str(write_failure(tmp, error)), 400)}; the partial checkpoint is removed; {after}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def verify_checkpoint(path: Path) -> Dict[str, Any]:
    """Checks a checkpoint against its manifest and returns the manifest.

    Raises:
        CheckpointError: the directory is a link or leads out of its run directory (``RUN/checkpoints/step-N``),
            no manifest, a listed file outside the checkpoint, a missing or extra file, or a size / checksum mismatch
            (named).
    """
    path = Path(path)
    if path.is_symlink() or not is_within(path, path.parent.parent):
        # A copied run whose step-N (or checkpoints/) links to another run's would pass those weights for its own.
        raise CheckpointError(
            f"{path}: leads out of its run directory {path.parent.parent} (to {path.resolve()}); a run's "
            "checkpoints are its own directories"
        )
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint ({MANIFEST} missing)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    for rel, expected in files.items():
        reason = escape_reason(str(rel), path)
        if reason is not None:
            raise CheckpointError(
                f"{manifest_path}: files entry {rel!r} {reason}; every file stays inside the checkpoint"
            )
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, manifest says {expected['bytes']} (truncated?)")
        if file_sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{file}: checksum mismatch (corrupted)")
    return manifest


def list_checkpoints(run_dir: Path) -> List[Path]:
    """Published checkpoint directories of a run, oldest first (temporary ones excluded)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def newest_valid_checkpoint(run_dir: Path, report: Callable[[str], None] = print) -> Optional[Path]:
    """The newest checkpoint that passes :func:`verify_checkpoint`; broken ones are reported and skipped.

    Only rank 0 reads the files; the answer is broadcast so every rank loads the same checkpoint.
    """
    choice: Optional[str] = None
    if _rank() == 0:
        found = _newest_valid_here(run_dir, report)
        choice = str(found) if found is not None else None
    choice = broadcast_object(choice)
    return Path(choice) if choice else None


def _newest_valid_here(run_dir: Path, report: Callable[[str], None]) -> Optional[Path]:
    """The newest checkpoint passing :func:`verify_checkpoint`, read by this process alone (no collective)."""
    for candidate in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(candidate)
        except CheckpointError as e:
            report(f"skipping checkpoint: {e}")
            continue
        return candidate
    return None


def checkpoint_entries(path: Path) -> Dict[str, Optional[tuple]]:
    """Every key a checkpoint holds and its tensor size (None for a non-tensor value), read safely.

    Raises:
        CheckpointError: unreadable or unsafe ``.metadata`` (one line, naming the file).
    """
    metadata = SafeFileSystemReader(str(Path(path))).read_metadata()
    return {
        key: tuple(entry.size) if isinstance(entry, dcp_metadata.TensorStorageMetadata) else None
        for key, entry in metadata.state_dict_metadata.items()
    }


def load_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Loads a checkpoint in place into ``state`` (a template with the same keys, built by the caller).

    For optimizer state, the caller must run ``optimizer.init_state()`` before taking ``optimizer.state_dict()``
    as the template: lazily created state that is absent from the template is silently not loaded by DCP.

    The files are read by :class:`SafeFileSystemReader` and :class:`SafeLoadPlanner`: no code in them runs.

    Raises:
        CheckpointError: (one line, naming the file) ``.metadata`` holds a class that is not checkpoint metadata,
            a value is not plain data, a tensor is stored as pickled bytes, or the checkpoint does not fit
            ``state`` (a missing key, another shape).
    """
    path = Path(path)
    reader = SafeFileSystemReader(str(path))
    # Read (and refuse) the metadata before DCP does, on every rank: DCP would log a traceback, fall back to
    # per-rank metadata files and wrap the error; refusing here is one line, and every rank refuses together.
    problem: Optional[CheckpointError] = None
    try:
        reader.read_metadata()
    except CheckpointError as e:
        problem = e
    problem = _agree_on_error(problem)
    if problem is not None:
        raise problem
    try:
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(path))
    except CheckpointException as e:
        refusal = _first_refusal(e)
        if refusal is not None:
            raise CheckpointError(str(refusal)) from None
        reason = _first_line(_failure_of(e))
        raise CheckpointError(f"{_one_line(path)}: cannot load checkpoint ({_one_line(reason, 240)})") from e


def written_by_save(path: Path) -> bool:
    """Whether ``path`` is a checkpoint :func:`save_checkpoint` published: a directory (not a link) named
    ``step-N`` holding the manifest it writes, which records that same step."""
    path = Path(path)
    found = _STEP_DIR.match(path.name)
    if found is None or path.is_symlink() or not path.is_dir() or not (path / MANIFEST).is_file():
        return False
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("step") == int(found.group(1)) and "files" in manifest


def prune_checkpoints(run_dir: Path, keep: List[Path]) -> None:
    """Deletes published checkpoints not in ``keep`` (rank 0 only; call after a barrier): only directories
    :func:`written_by_save` recognises; anything else named like one (a link, a directory without its manifest)
    is left as it is."""
    if _rank() != 0:
        return
    keep_set = {Path(p).resolve() for p in keep}
    for path in list_checkpoints(run_dir):
        if path.resolve() not in keep_set and written_by_save(path):
            shutil.rmtree(path, ignore_errors=True)


def rng_state() -> Dict[str, torch.Tensor]:
    """This rank's RNG state (torch CPU, and CUDA when present)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
