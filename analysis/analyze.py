"""Collapse analysis of a trained run: what ``multiembed analyze`` does, without the command line.

A run directory (``RUN/config.json``, ``RUN/checkpoints/step-N/``) records every option of its run, so the sharded
model is rebuilt through the one build path (:func:`~multiembed.training.evaluation.model_for_run`, which touches
nothing in the run directory and needs no dataset), the checkpoint is loaded into it, and
:func:`~multiembed.collapse.collapse_from_model` streams its tables: a collective over the ranks when started
by torchrun / torchx, one rank otherwise. No table is gathered on one rank. Rank 0 writes the report
(:func:`~multiembed.analysis.report.write_collapse_report`): ``collapse.json`` and the figures.

``collapse.json`` holds :meth:`CollapseResult.to_dict` plus ``source``: the model name, run directory, checkpoint
and its training step, so a report says what it analysed.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from multiembed.analysis.report import (
    COLLAPSE_JSON,
    SUB_EMBEDDING_PNG,
    CollapseReport,
    read_collapse_json,
    write_collapse_report,
)
from multiembed.collapse import CollapseResult, collapse_from_model, summarize_sets
from multiembed.collapse.monitor import CollapsedField, CollapseMonitor, collapsed_fields, format_collapsed
from multiembed.config import TrainConfig
from multiembed.training import checkpoint as ckpt
from multiembed.training.distributed import DistContext
from multiembed.data.metadata import read_metadata
from multiembed.training.evaluation import RunModel, model_for_run
from multiembed.training.run_dir import CONFIG_FILE, SUMMARY_FILE, RunDir

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class RunCheckpoint:
    """A run directory and the checkpoint of it to analyse.

    Attributes:
        run_dir: the run directory (holds ``config.json``).
        checkpoint: ``run_dir/checkpoints/step-N``, verified against its manifest.
        step: the training step the checkpoint was written at.
    """

    run_dir: Path
    checkpoint: Path
    step: int


@dataclass
class RunAnalysis:
    """What :func:`analyze_run` computed and wrote.

    Attributes:
        source: the run and checkpoint analysed.
        model: the run's model name (e.g. ``dcnv2-me-4x``).
        collapse: the metrics (identical on every rank).
        data: the dict written to ``collapse.json`` (``collapse.to_dict()`` plus ``source``).
        report: the files and figure data written (rank 0; None on other ranks).
    """

    source: RunCheckpoint
    model: str
    collapse: CollapseResult
    data: Dict[str, Any]
    report: Optional[CollapseReport]


def resolve_checkpoint(path: PathLike) -> RunCheckpoint:
    """The run directory and checkpoint that ``path`` names.

    Args:
        path: a run directory (its best checkpoint is taken: the one ``summary.json`` names, else the newest complete
            one) or a checkpoint directory ``RUN/checkpoints/step-N``.

    Returns:
        the verified :class:`RunCheckpoint`.

    Raises:
        ValueError: ``path`` is missing, is neither a run nor a checkpoint directory, the run has no complete
            checkpoint, or the checkpoint is incomplete or corrupted (the message names the file).
    """
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such directory (expected a run directory or RUN/checkpoints/step-N)")
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory (expected a run directory or RUN/checkpoints/step-N)")
    if RunDir(path).is_run():
        run_dir = path
        try:
            checkpoint = RunDir(run_dir).best_checkpoint()
        except json.JSONDecodeError as e:
            raise ValueError(f"{run_dir / SUMMARY_FILE}: not valid JSON ({e})") from None
        except KeyError:
            raise ValueError(f"{run_dir / SUMMARY_FILE}: has no 'checkpoint' entry") from None
    elif path.parent.name == ckpt.CHECKPOINT_DIR and RunDir(path.parent.parent).is_run():
        run_dir, checkpoint = path.parent.parent, path
    else:
        raise ValueError(
            f"{path}: not a multiembed run directory ({CONFIG_FILE} missing) nor a checkpoint directory "
            f"(RUN/{ckpt.CHECKPOINT_DIR}/step-N of a run)"
        )
    manifest = ckpt.verify_checkpoint(checkpoint)
    return RunCheckpoint(run_dir=run_dir, checkpoint=checkpoint, step=int(manifest.get("step", -1)))


def trained_model(holder: Any) -> Any:
    """The zoo model inside a trainer's or a :class:`RunModel`'s DMP (``DMP -> MultiEmbeddingTrain -> model``), its
    tables sharded."""
    built = holder.built
    return built.model


def analyze_run(
    path: PathLike,
    out: Optional[PathLike],
    *,
    row_normalized: bool = True,
    sub_embedding: bool = True,
    random_init_seed: Optional[int] = 0,
    data: Optional[PathLike] = None,
    device: str = "auto",
    compare_with: Sequence[Mapping[str, Any]] = (),
    compare_labels: Optional[Sequence[str]] = None,
    ctx: Optional[DistContext] = None,
    progress: bool = False,
    collapse_warn: float = TrainConfig.collapse_warn,
) -> RunAnalysis:
    """Analyses one checkpoint of a run and (rank 0) writes ``collapse.json`` and the figures into ``out``.

    A collective when several ranks run it (torchrun): every rank passes the same arguments.

    Args:
        path: a run directory (its best checkpoint) or ``RUN/checkpoints/step-N``.
        out: the report folder (created); None computes without writing.
        row_normalized: L2-normalise rows before the spectra (the paper's analysis; False: raw rows).
        sub_embedding: DCNv2's sub-embedding IA through the first cross layer (ignored for other backbones).
        random_init_seed: seed of the random-initialisation reference tables (None: skip them).
        data: a dataset to check against the run's vocabulary fingerprint (the model itself is rebuilt from
            ``config.json`` alone).
        device: ``auto``, ``cpu`` or ``cuda``.
        compare_with: other analyses (``collapse.json`` dicts over the same fields, e.g. SE of the same scale),
            drawn next to this one in ``ia_sets.png``.
        compare_labels: their legend names (default: each one's model name).
        ctx: the process group context (see :func:`multiembed.training.evaluation.model_for_run`).
        progress: progress bar on stderr (rank 0).
        collapse_warn: mark the fields whose IA (per set, and of the sets side by side) is below this fraction of
            the random-init IA of the same shape (``collapsed`` in ``collapse.json``; 0: none marked). Needs
            ``random_init_seed``.

    Returns:
        the :class:`RunAnalysis`.

    Raises:
        ValueError: bad path, missing or corrupted checkpoint, dataset mismatch, or an undefined IA (all-zero table).
    """
    source = resolve_checkpoint(path)
    run: RunModel = model_for_run(source.run_dir, device=device, ctx=ctx)
    if data is not None:
        run.check_data(read_metadata(str(data)), str(data))
    run.load(source.checkpoint)
    collapse = collapse_from_model(
        trained_model(run), sub_embedding=sub_embedding, row_normalized=row_normalized, concat=True,
        random_init_seed=random_init_seed, progress=progress and run.ctx.is_main,
    )
    model = run.config.model
    data_dict = collapse.to_dict()
    monitor = CollapseMonitor(collapse_warn, seed=0 if random_init_seed is None else random_init_seed)
    if monitor.enabled and collapse.random_init is not None:
        concat_reference = None
        if collapse.num_sets > 1:  # [D_i, K*d]: the reference of the sets side by side (a collective)
            concat_reference = monitor.reference(
                {f: collapse.vocab_sizes[f] for f in collapse.fields}, collapse.num_sets * collapse.dim,
                collapse.row_normalized,
            )
        data_dict["random_init_concat"] = concat_reference
        data_dict["collapse_warn"] = monitor.fraction
        data_dict["collapsed"] = [
            e.to_dict() for e in collapsed_fields(collapse, monitor.fraction, collapse.random_init, concat_reference)
        ]
    # Paths relative to the report folder (or absolute without one), the checkpoint relative to its run.
    run_dir_text = os.path.relpath(source.run_dir.resolve(), Path(out).resolve()) if out is not None else str(
        source.run_dir.resolve()
    )
    data_dict["source"] = {
        "model": model,
        "run_dir": Path(run_dir_text).as_posix(),
        "checkpoint": source.checkpoint.resolve().relative_to(source.run_dir.resolve()).as_posix(),
        "step": source.step,
    }
    report = None
    if out is not None and run.ctx.is_main:
        labels = None
        if compare_with:
            others = list(compare_labels) if compare_labels else [_label_of(c) for c in compare_with]
            labels = [model, *others]
        earlier_report = (Path(out) / COLLAPSE_JSON).is_file()
        report = write_collapse_report(data_dict, out, compare_with=compare_with, labels=labels)
        stale = Path(out) / SUB_EMBEDDING_PNG
        if "sub_embedding" not in report.files and earlier_report and stale.is_file() and not stale.is_symlink():
            stale.unlink()  # an earlier report's figure in the same folder would pass for this model's
    return RunAnalysis(source=source, model=model, collapse=collapse, data=data_dict, report=report)


def _label_of(collapse: Mapping[str, Any]) -> str:
    source = collapse.get("source") or {}
    if source.get("model"):
        return str(source["model"])
    sets = len(collapse["sets"])
    return f"SE (d={collapse['dim']})" if sets == 1 else f"ME ({sets} sets x d={collapse['dim']})"


def read_comparison(path: PathLike) -> Dict[str, Any]:
    """An earlier analysis to compare with: a ``collapse.json`` file or a folder holding one.

    Raises:
        ValueError: no such file, or not a valid ``collapse.json``.
    """
    path = Path(path)
    file = path / COLLAPSE_JSON if path.is_dir() else path
    if not file.is_file():
        raise ValueError(
            f"{file}: no such file (expected a {COLLAPSE_JSON} or a folder written by multiembed analyze)"
        )
    return read_collapse_json(file)


def summary_rows(collapse: Mapping[str, Any]) -> List[Tuple[str, float, float]]:
    """The rows of the summary table: ``(label, IA mean over fields, IA min over fields)``.

    One row per set, then the sets concatenated (ME), then the random-initialisation reference.
    """
    rows = [(f"set {k}", s["mean"], s["min"]) for k, s in enumerate(summarize_sets(collapse["sets"]))]
    num_sets, dim = len(collapse["sets"]), collapse["dim"]
    for label, values in (
        (f"sets concatenated ({num_sets} x {dim})", collapse.get("concat")),
        (f"random init (d={dim})", collapse.get("random_init")),
    ):
        if values:
            summary = summarize_sets([values])[0]
            rows.append((label, summary["mean"], summary["min"]))
    return rows


def format_summary(collapse: Mapping[str, Any]) -> str:
    """A short text table: IA mean and min over fields per set, for the concatenation and the random reference."""
    source = collapse.get("source") or {}
    mode = "rows L2-normalised" if collapse["row_normalized"] else "raw rows"
    head = f"collapse of {source.get('model', 'model')}"
    if source.get("checkpoint"):
        head += f" at {Path(source['checkpoint']).name}"
    lines = [f"{head} ({mode}, d={collapse['dim']}, {len(collapse['fields'])} fields)"]
    rows = summary_rows(collapse)
    width = max(len(label) for label, _, _ in rows)
    lines.append(f"{'':<{width}}  {'IA mean':>8}  {'IA min':>8}")
    lines += [f"{label:<{width}}  {mean:>8.3f}  {low:>8.3f}" for label, mean, low in rows]
    if collapse.get("sub_embedding"):
        matrices = [entry["ia"] for entry in collapse["sub_embedding"]]
        values = [v for m in matrices for row in m for v in row]
        label = "sub-embedding (all i->j)"
        lines.append(f"{label:<{width}}  {sum(values) / len(values):>8.3f}  {min(values):>8.3f}")
    if collapse.get("collapse_warn"):
        lines += collapsed_lines(collapse)
    return "\n".join(lines)


def collapsed_lines(collapse: Mapping[str, Any]) -> List[str]:
    """The collapse monitor's marks: one line per field (``*`` marks where it collapsed), or a line saying none.

    Args:
        collapse: a ``collapse.json`` dict with ``collapsed`` and ``collapse_warn`` (:func:`analyze_run`).
    """
    fraction = float(collapse["collapse_warn"])
    entries = [CollapsedField(**e) for e in collapse.get("collapsed") or []]
    if not entries:
        return [f"no field collapsed (every IA >= {fraction:g} x the random init of its shape)"]
    lines = [format_collapsed(entries, fraction, limit=len(entries))]
    by_field: Dict[str, List[str]] = {}
    for entry in entries:
        by_field.setdefault(entry.field, []).append(entry.where)
    lines += [f"  * {field}: {', '.join(where)}" for field, where in by_field.items()]
    return lines


def print_report(analysis: RunAnalysis, stream: Any = None) -> None:
    """Prints the summary table and the files written (rank 0's :class:`RunAnalysis`)."""
    stream = stream or sys.stdout
    print(format_summary(analysis.data), file=stream)
    if analysis.report is not None:
        for name, file in analysis.report.files.items():
            print(f"  {name:<14} {file}", file=stream)
