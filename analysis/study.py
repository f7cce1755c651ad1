"""The scaling study runner: every backbone x mode x scale x seed trained with early stopping, then tabulated.

Layout of ``OUT``::

    runs/<backbone>-<mode>-<s>x-seed<k>/   one run directory each (config.json, summary.json, checkpoints/, ...)
        collapse.json                      IA of its best checkpoint (sets, fields, sets concatenated)
    logs/<run>.log                         each run's trainer log (plan, evaluations)
    scaling.csv, scaling.md, scaling.png   the results (:mod:`multiembed.analysis.scaling`)

The study is resumable: a run whose ``summary.json`` exists is not trained again (its options are checked against
this study's, so results of different settings never mix), one interrupted mid-way continues from its newest
checkpoint (``--resume`` semantics), and a finished run without ``collapse.json`` is analysed from its best
checkpoint.

Runs execute in this process, one after the other, over one process group created once. Why not a subprocess per
run: importing torch, fbgemm and torchrec costs 5-10 s a process on a 2-core machine, which would dominate the short
runs of small studies and of the tests; the one-rank group holds nothing between runs (every collective of a run
finishes before ``fit`` returns), and each run's model, optimizer and loaders are dropped (and the CUDA cache emptied)
before the next run is built. Re-creating the group per run would, under torchrun / torchx, rendezvous again on the
launcher's store, which nothing here needs. Started by torchrun with several ranks, every run is trained by all of
them (decisions are rank 0's, broadcast; only rank 0 writes files).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, TextIO, Tuple

import torch
from tqdm import tqdm

from multiembed.analysis.analyze import analyze_run, trained_model
from multiembed.analysis.report import COLLAPSE_JSON, read_collapse_json, write_collapse_json
from multiembed.analysis.scaling import (
    SCALING_CSV,
    SCALING_MD,
    SCALING_PNG,
    STUDY_MODES,
    Row,
    StudyPoint,
    ia_concat_mean,
    ia_mean,
    make_row,
    plot_scaling,
    point_experts,
    sort_rows,
    write_csv,
    write_markdown,
)
from multiembed.collapse import collapse_from_model
from multiembed.collapse.monitor import CollapseMonitor
from multiembed.data.metadata import read_metadata
from multiembed.data.paths import refuse_within
from multiembed.models import (
    DEFAULT_DIVERGENCE_REG_WEIGHT,
    DEFAULT_PROJECTION_REG_WEIGHT,
    DEFAULT_SPECTRAL_REG_WEIGHT,
)
from multiembed.models.names import BASE_SET_DIM, parse_model_name
from multiembed.training.distributed import DistContext, broadcast_object, init_distributed
from multiembed.config import STUDY_OPTIONS, TrainConfig, default_of, recorded_option
from multiembed.config.presets import COLLAPSE_PRESET_DATA, PRESETS, Preset  # noqa: F401  (re-exported)
from multiembed.training.run_dir import RunDir
from multiembed.training.progress import progress_bar
from multiembed.training.trainer import Trainer, TrainingDiverged

RUNS_DIR = "runs"
LOGS_DIR = "logs"

# Options of `multiembed train` a study forwards to every run (all others keep TrainConfig's defaults).
TRAIN_OPTIONS = STUDY_OPTIONS
# Options that must agree with a finished run's for it to count in this study (the others do not change results;
# the regularisers' weights are checked per run: the runs of the mode that trains with one use the study's weight,
# the others 0).
_REGULARIZERS = ("spectral_reg", "projection_reg", "divergence_reg")
_RESULT_OPTIONS = tuple(
    o for o in TRAIN_OPTIONS if o not in ("device", "ia_every", "collapse_warn", *_REGULARIZERS, "experts")
)
_DEFAULT_EXPERTS = default_of("experts")


@dataclass
class StudyResult:
    """What :func:`run_scaling_study` produced.

    Attributes:
        rows: one row per finished run (sorted), the content of ``scaling.csv``.
        trained: run names trained (or resumed) by this call.
        skipped: run names finished earlier and only read back.
        failed: run name -> reason, for runs whose training diverged.
        pending: run names not finished yet, left untrained by ``tabulate_only``.
        files: ``scaling.csv`` / ``scaling.md`` / ``scaling.png`` paths (rank 0; empty without finished runs).
        figure_data: what ``scaling.png`` drew.
        seconds: wall time of this call.
    """

    rows: List[Row] = field(default_factory=list)
    trained: List[str] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    failed: Dict[str, str] = field(default_factory=dict)
    pending: List[str] = field(default_factory=list)
    files: Dict[str, Path] = field(default_factory=dict)
    figure_data: Optional[Dict[str, Any]] = None
    seconds: float = 0.0


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); delete the run directory to train it again") from None


def run_options(point: StudyPoint, options: Mapping[str, Any]) -> Dict[str, Any]:
    """The :data:`TRAIN_OPTIONS` of one run: the study's, with ``spectral_reg`` (``projection_reg``,
    ``divergence_reg``) the study's weight for the ``se-sr`` (``se-pr`` and ``se-pwr``, ``me-dr``) mode and 0 for
    every other mode, ``pair_scales`` on for the ``se-pwr`` mode only, and ``experts`` the ``hetero`` mode's
    (:func:`point_experts`; the default for the other modes, which take none)."""
    values = {k: options[k] for k in TRAIN_OPTIONS}
    mode = STUDY_MODES[point.mode]
    for name in _REGULARIZERS:
        values[name] = float(options[name]) if getattr(mode, name) else 0.0
    values["pair_scales"] = mode.pair_scales
    values["experts"] = (
        point_experts(point.backbone, str(options["experts"])) if point.heterogeneous else _DEFAULT_EXPERTS
    )
    return values


def _check_finished_run(run_dir: Path, point: StudyPoint, options: Mapping[str, Any], fingerprint: str) -> None:
    """Refuses a finished run trained with other settings (its result would silently mix into this study)."""
    config_file = RunDir(run_dir).config_file
    record = _read_json(config_file)
    recorded = record.get("options", {})
    per_run = run_options(point, options)
    expected = {
        "model": point.model, "seed": point.seed,
        **{k: per_run[k] for k in (*_RESULT_OPTIONS, *_REGULARIZERS, "experts", "pair_scales")},
    }
    for key, value in expected.items():
        if recorded_option(recorded, key) != value:
            raise ValueError(
                f"{config_file}: this finished run used --{key.replace('_', '-')} "
                f"{recorded_option(recorded, key)!r} but "
                f"the study asks for {value!r}; use another --out, the run's settings, or delete {run_dir}"
            )
    if record.get("data", {}).get("vocab_fingerprint") != fingerprint:
        raise ValueError(
            f"{config_file}: this finished run was trained on other data (vocabulary fingerprint differs "
            f"from --data's); use another --out or delete {run_dir}"
        )


def _finished_summary(
    run_dir: Path, point: StudyPoint, options: Mapping[str, Any], fingerprint: str
) -> Optional[Dict[str, Any]]:
    """The ``summary.json`` of a finished run of this study, None for a run still to train."""
    summary_file = RunDir(run_dir).summary_file
    if not summary_file.is_file():
        return None
    _check_finished_run(run_dir, point, options, fingerprint)
    return _read_json(summary_file)


def _on_rank0(ctx: DistContext, read: Callable[[], Any]) -> Any:
    """``read()`` on rank 0 (file system decisions), its value broadcast; a ValueError there is raised on every rank
    (so no rank waits forever in the next collective)."""
    outcome: Tuple[Optional[str], Any] = (None, None)
    if ctx.is_main:
        try:
            outcome = (None, read())
        except ValueError as e:
            outcome = (str(e), None)
    error, value = broadcast_object(outcome)  # type: ignore[misc]
    if error is not None:
        raise ValueError(error)
    return value


def _collapse_of(trainer: Trainer) -> Dict[str, Any]:
    """IA of the model the trainer holds (after ``fit``: the best checkpoint's weights), as ``collapse.json``."""
    result = collapse_from_model(
        trained_model(trainer), sub_embedding=False, row_normalized=True, concat=True, random_init_seed=None
    )
    return result.to_dict()


def _release(ctx: DistContext) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def run_scaling_study(
    data: str,
    out: str,
    points: Sequence[StudyPoint],
    train_options: Mapping[str, Any],
    *,
    title: str = "Scaling study",
    notes: Sequence[str] = (),
    progress: bool = True,
    log: Optional[TextIO] = None,
    ctx: Optional[DistContext] = None,
    tabulate_only: bool = False,
) -> StudyResult:
    """Trains (or reads back) every configuration, computes its IA, then writes the CSV, markdown and figure.

    Args:
        data: converted dataset directory.
        out: the study directory (created).
        points: the configurations (:func:`~multiembed.analysis.scaling.study_grid`).
        train_options: values for :data:`TRAIN_OPTIONS` (every key present).
        title: heading of ``scaling.md``.
        notes: extra lines for ``scaling.md``.
        progress: progress bars (configurations, and each run's batches) on stderr.
        log: where the per-configuration lines go (stderr by default).
        ctx: the process group context (``init_distributed`` once when omitted).
        tabulate_only: train and analyse nothing: tabulate the runs finished so far (``summary.json`` and
            ``collapse.json`` present), list the others in :attr:`StudyResult.pending` and say so in ``scaling.md``
            (safe beside a study still training in ``out``: it only reads run directories).

    Returns:
        the :class:`StudyResult`.

    Raises:
        ValueError: bad model names or options, unreadable data, ``out`` equal to or inside ``data``, or a finished
            run trained with other settings.
    """
    started = time.perf_counter()
    log = log if log is not None else sys.stderr
    missing = [k for k in TRAIN_OPTIONS if k not in train_options]
    if missing:
        raise ValueError(f"run_scaling_study: train_options lacks {missing}")
    for point in points:
        parse_model_name(point.model)  # every name checked before the first run starts
        mode = STUDY_MODES[point.mode]
        if (mode.projection_reg or mode.divergence_reg) and point.backbone != "dcnv2":
            raise ValueError(f"--modes {point.mode}: regularises DCNv2's cross maps, {point.backbone} has none "
                             "(use --backbones dcnv2)")
        if mode.divergence_reg and point.scale < 2:
            raise ValueError(f"--modes {point.mode}: the set divergence penalty needs at least 2 sets, not scale "
                             f"{point.scale} (use --scales from 2; ME at 1x is SE-1x)")
    for name in _REGULARIZERS:
        modes = sorted({p.mode for p in points if getattr(STUDY_MODES[p.mode], name)})
        if modes and not train_options[name] > 0:
            raise ValueError(f"--modes {','.join(modes)}: needs a positive --{name.replace('_', '-')} (the "
                             f"regulariser's weight)")
    meta = read_metadata(data)
    refuse_within(out, data, "--out {path}: is the --data directory {directory} or inside it; a study never writes "
                  "into its dataset")
    ctx = ctx or init_distributed(train_options["device"])
    out_dir, runs_dir, logs_dir = Path(out), Path(out) / RUNS_DIR, Path(out) / LOGS_DIR
    if ctx.is_main:
        runs_dir.mkdir(parents=True, exist_ok=True)
        logs_dir.mkdir(parents=True, exist_ok=True)
    result = StudyResult()
    # Random-initialisation IA of each run's whole embedding, [D_i, s * d]: SE and ME of one scale share the shape,
    # so one reference per scale (collapse/monitor.py; a collective when several ranks run the study).
    monitor = CollapseMonitor(1.0)

    def say(message: str) -> None:
        if ctx.is_main:
            tqdm.write(message, file=log)

    # A bar on a terminal, a line every 10 % of the runs in a log (training.progress).
    bar = progress_bar(total=len(points), desc="scaling study", unit="run", file=sys.stderr, dynamic_ncols=True,
                       disable=not (progress and ctx.is_main))
    with bar:
        for index, point in enumerate(points, start=1):
            bar.set_postfix_str(point.run_name)
            run_dir = runs_dir / point.run_name
            prefix = f"[{index}/{len(points)}] {point.run_name}:"
            finished = _on_rank0(
                ctx, lambda: _finished_summary(run_dir, point, train_options, meta.vocab_fingerprint)
            )
            trainer: Optional[Trainer] = None
            collapse_path = run_dir / COLLAPSE_JSON
            if tabulate_only and (finished is None or not _on_rank0(ctx, collapse_path.is_file)):
                result.pending.append(point.run_name)
                bar.update(1)
                continue
            if finished is not None:
                summary: Dict[str, Any] = finished  # type: ignore[assignment]
                result.skipped.append(point.run_name)
                how = "finished earlier (summary.json exists), skipped"
            else:
                config = TrainConfig(
                    data=data, model=point.model, out=str(run_dir), seed=point.seed, resume=True,
                    progress=progress, **run_options(point, train_options),
                )
                run_started = time.perf_counter()
                log_path = logs_dir / f"{point.run_name}.log"
                run_log = open(log_path, "a", encoding="utf-8") if ctx.is_main else _NullLog()
                with run_log:
                    try:
                        trainer = Trainer(config, ctx=ctx, log=run_log)
                        summary = trainer.fit()
                    except TrainingDiverged as e:
                        result.failed[point.run_name] = str(e)
                        say(f"{prefix} FAILED: {e}")
                        trainer = None
                        _release(ctx)
                        bar.update(1)
                        continue
                result.trained.append(point.run_name)
                how = f"trained in {time.perf_counter() - run_started:,.0f} s"

            collapse = None
            if trainer is None:
                collapse = _on_rank0(
                    ctx, lambda: read_collapse_json(collapse_path) if collapse_path.is_file() else None
                )
            if collapse is None:
                if trainer is not None:  # just trained: after fit the model holds the best checkpoint's weights
                    collapse = _collapse_of(trainer)
                else:  # finished earlier, interrupted before its IA was saved
                    collapse = analyze_run(
                        run_dir, None, sub_embedding=False, random_init_seed=None, device=train_options["device"],
                        ctx=ctx,
                    ).data
                if ctx.is_main:
                    write_collapse_json(collapse, collapse_path)
            trainer = None
            _release(ctx)

            vocab = {f: int(collapse["vocab_sizes"][f]) for f in collapse["fields"]}
            whole_width = int(collapse["dim"]) * len(collapse["sets"])
            random_whole = monitor.reference(vocab, whole_width, bool(collapse["row_normalized"]))
            row = make_row(
                point, summary, ia_mean(collapse["sets"]), ia_concat_mean(collapse),
                sum(random_whole.values()) / len(random_whole),
            )
            result.rows.append(row)
            say(
                f"{prefix} {how}; val AUC {row['val_auc']:.5f}, test AUC {row['test_auc']:.5f}, "
                f"IA mean per set {row['ia_mean']:.3f}, whole embedding {row['ia_concat_mean']:.3f} "
                f"(random init {row['ia_random_mean']:.3f})"
            )
            bar.update(1)

    backbones = list(dict.fromkeys(p.backbone for p in points))
    result.rows = sort_rows(result.rows, backbones)
    if result.pending:
        notes = [*notes, f"PARTIAL: {len(result.rows)} of {len(points)} runs finished; not trained yet: "
                 f"{', '.join(result.pending)}"]
    if result.failed:
        notes = [*notes, *(f"FAILED (training diverged, not in the tables): {name}" for name in result.failed)]
    if ctx.is_main and result.rows:
        result.files["csv"] = write_csv(result.rows, out_dir / SCALING_CSV)
        result.files["md"] = write_markdown(result.rows, out_dir / SCALING_MD, title=title, notes=notes)
        result.figure_data = plot_scaling(result.rows, out_dir / SCALING_PNG, base_widths=BASE_SET_DIM)
        result.files["png"] = out_dir / SCALING_PNG
    result.seconds = time.perf_counter() - started
    return result


class _NullLog:
    """A do-nothing log for ranks other than 0 (the trainer only logs on rank 0 anyway)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass

    def __enter__(self) -> "_NullLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def resolve_options(explicit: Mapping[str, Any], preset: Optional[str]) -> Dict[str, Any]:
    """Study settings: explicit values (not None) first, then the preset's, then the paper's defaults.

    Args:
        explicit: ``backbones``, ``modes``, ``scales``, ``seeds`` and :data:`TRAIN_OPTIONS` as given on the command
            line (None where not given).
        preset: a :data:`PRESETS` name or None.

    Returns:
        every grid key and every :data:`TRAIN_OPTIONS` key with its value.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"--preset: unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    defaults: Dict[str, Any] = {
        "backbones": ["dcnv2", "dnn"], "modes": ["se", "me"], "scales": [1, 2, 3, 4, 10], "seeds": 3,
    }
    paper = TrainConfig(data="", model="", out="")
    defaults.update({k: getattr(paper, k) for k in TRAIN_OPTIONS})
    defaults["spectral_reg"] = DEFAULT_SPECTRAL_REG_WEIGHT  # the se-sr mode's weight (the paper's ablation setting)
    defaults["projection_reg"] = DEFAULT_PROJECTION_REG_WEIGHT  # the se-pr mode's weight (the paper's code's)
    defaults["divergence_reg"] = DEFAULT_DIVERGENCE_REG_WEIGHT  # the me-dr mode's weight (the middle of its sweep)
    chosen = dict(defaults)
    if preset is not None:
        chosen.update(PRESETS[preset].grid)
        chosen.update(PRESETS[preset].train)
    chosen.update({k: v for k, v in explicit.items() if v is not None and k in chosen})
    return chosen


def describe_options(options: Mapping[str, Any]) -> str:
    """One line naming every training option of a study (for ``scaling.md`` and the log)."""
    shown = {k: options[k] for k in TRAIN_OPTIONS if options[k] is not None}
    words = [f"--{k.replace('_', '-')} {v}" for k, v in shown.items() if k not in (*_REGULARIZERS, "experts")]
    modes = [m for m in options.get("modes", ()) if m in STUDY_MODES]
    for name in _REGULARIZERS:
        using = [m for m in modes if getattr(STUDY_MODES[m], name)]
        if name in shown and using:
            words.append(f"--{name.replace('_', '-')} {shown[name]} ({', '.join(using)} runs only)")
    if "experts" in shown and any(STUDY_MODES[m].heterogeneous for m in modes):
        words.append(f"--experts {shown['experts']} (hetero runs only, after the backbone)")
    return "training options: " + ", ".join(words)

