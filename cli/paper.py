"""``multiembed paper FIGURE``: one of the paper's mechanism experiments, re-run, with its data and figure.

Figures:

- ``fig3``: evidence I and II, the sub-embedding IA of field ``i`` as field ``j`` sees it, through FFM's field-aware
  sub-embeddings and DCNv2's first cross layer, fields ordered by their own IA (trained runs, any number of seeds).
- ``fig4``: the toy experiment (:mod:`multiembed.analysis.paper_toy`): IA of a field's embeddings trained against a
  low-information field (``D3 = 3``) and a rich one (``D3 = 100``).
- ``fig5``: evidence III, DCNv2 against DCNv2 with the projection regulariser (``se-pr``) and its weighted variant
  (``se-pwr``) over scales, one series per regulariser weight: IA, train loss, AUC (``multiembed scale`` studies).
- ``fig6``: evidence IV, DNN against DCNv2, single embedding, over scales: IA and test AUC (a study).
- ``fig8``: ME against SE: IA per field and per set, the cross maps' norms per set, and the scaling of ME under the
  set divergence penalty (``me-dr``, one study per weight).

Figures 3, 5, 6 and 8 read runs and studies (:mod:`multiembed.analysis.paper_mechanism`); docs/results/paper/
gives the commands that train them. Each writes its data (CSV and JSON) and a PNG into ``--out`` and prints a
summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "paper",
        help="re-run one of the paper's mechanism experiments (data, figure, summary)",
        description=__doc__.split("\n\n")[0] + " docs/results/paper/ puts each beside the paper's.",
    )
    figures = p.add_subparsers(dest="figure", metavar="FIGURE", required=True)
    toy = _figure(
        figures, "fig4", run_fig4, "toy",
        "the toy experiment: IA of E1 when it interacts with a 3-value vs a 100-value field",
        "Three fields (100, 100 and D3 values), every (x1, x2) pair once, random labels; a factorisation machine of "
        "width 10 trained on E1 alone by full-batch gradient descent (lr 1). Writes toy.csv (IA and loss per seed, D3 "
        "and recorded iteration), toy.json (IA per seed at --check-iteration and at the end) and toy.png into --out.",
    )
    toy.add_argument("--seeds", type=_positive, default=10, help="seeds 0..N-1 (default 10)")
    toy.add_argument("--iterations", type=_positive, default=5000, help="gradient steps (default 5000)")
    toy.add_argument("--every", type=_positive, default=50, help="record IA every N steps (default 50)")
    toy.add_argument("--check-iteration", type=_positive, default=2000,
                     help="iteration the summary compares the two settings at (default 2000)")

    sub = _figure(
        figures, "fig3", run_fig3, "fig3",
        "evidence I and II: sub-embedding IA of field i seen by field j (FFM and DCNv2 runs)",
        "Reads the best checkpoint of FFM runs and of DCNv2 runs (single embedding; repeat each option for seeds) and "
        "computes, for every field pair, the IA of field i's sub-embedding as field j sees it (FFM: its field-aware "
        "sub-embedding; DCNv2: E_i W_(i->j)^T through the first cross layer), fields ordered by their own IA. Writes "
        "fig3.csv (every run), fig3.json (per model the rank correlations of own IA with the sub-embedding IA over j "
        "and over i, per run and over runs; the mean over runs by thirds of the fields) and fig3.png (the mean over "
        "runs) into --out.",
    )
    sub.add_argument("--ffm-run", action="append", required=True, metavar="DIR",
                     help="run directory of an ffm-se-* model (multiembed train); repeat for more runs")
    sub.add_argument("--dcnv2-run", action="append", required=True, metavar="DIR",
                     help="run directory of a dcnv2-se-* model; repeat for more runs")

    _figure(
        figures, "fig5", run_fig5, "fig5",
        "evidence III: DCNv2 with and without the projection regulariser over scales (studies' se, se-pr, se-pwr)",
        "Reads multiembed scale studies holding DCNv2 se runs and se-pr or se-pwr runs (one --projection-reg weight "
        "per study; repeat --study for more weights) and draws IA, the train loss at the best step, validation and "
        "test AUC against the scale, one series per mode and weight. Writes fig5.csv, fig5.json and fig5.png into "
        "--out.",
        studies=True,
    )
    _figure(
        figures, "fig6", run_fig6, "fig6",
        "evidence IV: DNN against DCNv2, single embedding, over scales (a study's dnn and dcnv2 se runs)",
        "Reads multiembed scale studies holding DNN and DCNv2 se runs and draws IA and test AUC against the scale. "
        "Writes fig6.csv, fig6.json and fig6.png into --out.",
        studies=True,
    )
    me = _figure(
        figures, "fig8", run_fig8, "fig8",
        "ME analysis: IA per field and set, cross-map norms per set, scaling under the set divergence penalty",
        "Reads multiembed scale studies holding DCNv2 se and me runs (--study) and studies of me-dr runs, one per "
        "--divergence-reg weight (--ablation), and draws (a) the IA of each field's whole embedding, SE and ME at "
        "--scale, (b) ME's IA per set, (c) ||W(m)_(i->j)||_F of ME's first cross layer per set, (d) test AUC against "
        "the scale for SE, ME and each ablation. fig8.json also gives the spread of the norms over sets of every ME "
        "and me-dr run at --scale. Writes fig8.csv, fig8.json and fig8.png into --out.",
        studies=True,
    )
    me.add_argument("--ablation", action="append", default=[], metavar="DIR",
                    help="a study of me-dr runs (one --divergence-reg weight); repeat for each weight")
    me.add_argument("--scale", type=_positive, default=10, help="the scale of panels (a)-(c) (default 10)")


def _figure(
    figures: "argparse._SubParsersAction[argparse.ArgumentParser]", name: str,
    func: Callable[[argparse.Namespace], int], files: str, summary: str, description: str, *, studies: bool = False,
) -> argparse.ArgumentParser:
    """One figure's parser: its one-line help (``summary``) and description, ``--out`` (for ``files``.csv, .json
    and .png), ``--study`` where it reads studies, and the function that runs it."""
    p = figures.add_parser(name, help=summary, description=description)
    if studies:
        p.add_argument("--study", action="append", required=True, metavar="DIR",
                       help="a multiembed scale study directory (its --out); repeat to combine studies")
    p.add_argument("--out", required=True, help=f"directory for {files}.csv, {files}.json and {files}.png")
    p.set_defaults(func=_out_checked(func))
    return p


def _out_checked(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` after refusing an ``--out`` that is, or lies inside, a dataset, a run or an artifact."""

    def checked(args: argparse.Namespace) -> int:
        from multiembed.data.owners import check_directory_out

        check_directory_out(args.out, "--out")
        return run(args)

    return checked


def run_fig3(args: argparse.Namespace) -> int:
    from multiembed.analysis.analyze import analyze_run
    from multiembed.analysis.paper_mechanism import sub_embedding_view, write_fig3
    from multiembed.training.distributed import destroy, init_distributed

    ctx = init_distributed("cpu")
    try:
        runs: Dict[str, List[Tuple[str, Any]]] = {}
        for label, dirs in (("FFM", args.ffm_run), ("DCNv2", args.dcnv2_run)):
            names = [Path(run).name for run in dirs]
            for run, name in zip(dirs, names):
                analysis = analyze_run(run, None, sub_embedding=True, random_init_seed=None, device="cpu", ctx=ctx)
                # A run is named by its directory, by its path where two directories share a name.
                name = name if names.count(name) == 1 else str(run)
                runs.setdefault(label, []).append((name, sub_embedding_view(label, analysis.model, analysis.data)))
    finally:
        destroy()
    record = write_fig3(runs, Path(args.out))
    for label, entry in record["models"].items():
        source, target = entry["rho_source"], entry["rho_target"]
        print(f"{label} ({entry['model']}, {len(entry['runs'])} runs): rank correlation of own IA with "
              f"sub-embedding IA, as seen (over j) {source['mean']:.3f} ({source['min']:.3f} to {source['max']:.3f}), "
              f"as seeing (over i) {target['mean']:.3f} ({target['min']:.3f} to {target['max']:.3f})")
    print(json.dumps({"out": str(args.out), "data": "fig3.csv", "figure": "fig3.png"}))
    return 0


def _print_means(record: Dict[str, Any]) -> None:
    for metric, series in record["means"].items():
        for name, values in series.items():
            cells = ", ".join(f"{s}x {m:.4f}" for s, m in zip(values["scales"], values["mean"]))
            print(f"{metric} {name}: {cells}")


def run_fig5(args: argparse.Namespace) -> int:
    from multiembed.analysis.paper_mechanism import fig5_label, fig5_rows, write_scale_figure

    rows = fig5_rows([Path(s) for s in args.study])
    labels = {f"dcnv2 {r['mode']}": fig5_label(r) for r in rows}
    weights = {f"dcnv2 {r['mode']}": r["weight"] for r in rows if "weight" in r}
    record = write_scale_figure(
        rows, ("ia_mean", "train_loss", "val_auc", "test_auc"), Path(args.out), "fig5",
        "DCNv2 with and without the projection regulariser", labels=labels,
        extra={"labels": labels, "projection_reg": weights},
    )
    _print_means(record)
    print(json.dumps({"out": str(args.out), "data": "fig5.csv", "figure": "fig5.png"}))
    return 0


def run_fig6(args: argparse.Namespace) -> int:
    from multiembed.analysis.paper_mechanism import read_study_rows, select, write_scale_figure

    rows = select(read_study_rows([Path(s) for s in args.study]), [("dnn", "se"), ("dcnv2", "se")])
    record = write_scale_figure(
        rows, ("ia_mean", "test_auc"), Path(args.out), "fig6", "DNN against DCNv2, single embedding",
        labels={"dnn se": "DNN", "dcnv2 se": "DCNv2"},
    )
    _print_means(record)
    print(json.dumps({"out": str(args.out), "data": "fig6.csv", "figure": "fig6.png"}))
    return 0


def run_fig8(args: argparse.Namespace) -> int:
    from multiembed.analysis.paper_mechanism import ablation_rows, read_study_rows, select, write_fig8
    from multiembed.training.distributed import destroy, init_distributed

    rows = select(read_study_rows([Path(s) for s in args.study]), [("dcnv2", "se"), ("dcnv2", "me")])
    ablations = [ablation_rows(Path(study)) for study in args.ablation]
    ctx = init_distributed("cpu")
    try:
        record = write_fig8(rows, ablations, args.scale, Path(args.out), ctx)
    finally:
        destroy()
    for name, values in record["test_auc"].items():
        cells = ", ".join(f"{s}x {m:.4f}" for s, m in zip(values["scales"], values["mean"]))
        print(f"test AUC {record['labels'].get(name, name)}: {cells}")
    for mode, entry in record["panels"]["norm_spread_by_mode"].items():
        print(f"{mode} at {args.scale}x: spread of ||W(m)_(i->j)||_F over sets {entry['mean']:.4f}")
    print(json.dumps({"out": str(args.out), "data": "fig8.csv", "figure": "fig8.png"}))
    return 0


def run_fig4(args: argparse.Namespace) -> int:
    from multiembed.analysis.paper_toy import run_toy, write_toy_report

    if args.check_iteration > args.iterations or args.check_iteration % args.every:
        raise ValueError(f"--check-iteration {args.check_iteration}: must be a recorded iteration (a multiple of "
                         f"--every {args.every}, at most --iterations {args.iterations})")
    points = run_toy(range(args.seeds), args.iterations, args.every)
    record = write_toy_report(points, Path(args.out), args.check_iteration)
    for key in ("at_check", "at_end"):
        summary = record[key]
        low, high = summary["ia"]["d3=3"], summary["ia"]["d3=100"]
        print(f"iteration {summary['iteration']}: IA(E1) with D3=3 mean "
              f"{sum(low.values()) / len(low):.3f}, with D3=100 mean {sum(high.values()) / len(high):.3f}; "
              f"gap per seed min {summary['min_gap']:.3f}")
    print(json.dumps({"out": str(args.out), "data": "toy.csv", "figure": "toy.png"}))
    return 0
