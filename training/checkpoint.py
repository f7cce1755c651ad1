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

Checkpoints hold pickled Python objects: load only checkpoints you trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_TMP_PREFIX = ".tmp-"

# Test-only fault injection: called between writing the shards and publishing the checkpoint.
_before_publish_hook: Optional[Callable[[Path], None]] = None


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete or corrupted (the message names the directory and the file)."""


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


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
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "step": step,
            "info": info,
            "files": {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        _fsync_dir(tmp)
        if _before_publish_hook is not None:
            _before_publish_hook(tmp)
        os.replace(tmp, final)
        _fsync_dir(root)
    _barrier()
    return final


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
        CheckpointError: no manifest, a missing or extra file, or a size / checksum mismatch (named).
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint ({MANIFEST} missing)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    for rel, expected in files.items():
        file = path / rel
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{file}: {size} bytes, manifest says {expected['bytes']} (truncated?)")
        if _sha256(file) != expected["sha256"]:
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
        for candidate in reversed(list_checkpoints(run_dir)):
            try:
                verify_checkpoint(candidate)
            except CheckpointError as e:
                report(f"skipping checkpoint: {e}")
                continue
            choice = str(candidate)
            break
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [choice]
        dist.broadcast_object_list(box, src=0)
        choice = box[0]
    return Path(choice) if choice else None


def load_checkpoint(path: Path, state: Dict[str, Any]) -> None:
    """Loads a checkpoint in place into ``state`` (a template with the same keys, built by the caller).

    For optimizer state, the caller must run ``optimizer.init_state()`` before taking ``optimizer.state_dict()``
    as the template: lazily created state that is absent from the template is silently not loaded by DCP.
    """
    dcp.load(state, checkpoint_id=str(path))


def prune_checkpoints(run_dir: Path, keep: List[Path]) -> None:
    """Deletes published checkpoints not in ``keep`` (rank 0 only; call after a barrier)."""
    if _rank() != 0:
        return
    keep_set = {Path(p).resolve() for p in keep}
    for path in list_checkpoints(run_dir):
        if path.resolve() not in keep_set:
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
