"""``multiembed paper FIGURE``: one of the paper's mechanism experiments, re-run, with its data and figure.

Figures:

- ``fig4``: the toy experiment (:mod:`multiembed.analysis.paper_toy`): IA of a field's embeddings trained against a
  low-information field (``D3 = 3``) and a rich one (``D3 = 100``).

Each writes its data (CSV and JSON) and a PNG into ``--out`` and prints a summary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


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
    toy = figures.add_parser(
        "fig4",
        help="the toy experiment: IA of E1 when it interacts with a 3-value vs a 100-value field",
        description=(
            "Three fields (100, 100 and D3 values), every (x1, x2) pair once, random labels; a factorisation "
            "machine of width 10 trained on E1 alone by full-batch gradient descent (lr 1). Writes toy.csv (IA and "
            "loss per seed, D3 and recorded iteration), toy.json (IA per seed at --check-iteration and at the end) "
            "and toy.png into --out."
        ),
    )
    toy.add_argument("--out", required=True, help="directory for toy.csv, toy.json and toy.png")
    toy.add_argument("--seeds", type=_positive, default=10, help="seeds 0..N-1 (default 10)")
    toy.add_argument("--iterations", type=_positive, default=5000, help="gradient steps (default 5000)")
    toy.add_argument("--every", type=_positive, default=50, help="record IA every N steps (default 50)")
    toy.add_argument("--check-iteration", type=_positive, default=2000,
                     help="iteration the summary compares the two settings at (default 2000)")
    toy.set_defaults(func=run_fig4)


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
