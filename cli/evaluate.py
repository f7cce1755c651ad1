"""``multiembed evaluate``: the best checkpoint of a run on a split of (another conversion of) the data."""

from __future__ import annotations

import argparse
import json

from multiembed.config import Device


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a run's best checkpoint; prints one JSON object",
        description=(
            "Loads the best checkpoint of RUN_DIR (any world size it was trained on) and evaluates every row of "
            "--split of --data, which must share the training data's vocabulary fingerprint. Prints "
            '{"<split>_auc", "<split>_logloss", "<split>_ne", "<split>_rows", ...} on stdout.'
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--data", required=True, help="converted dataset directory")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--device", choices=Device.choices(), default="auto")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from multiembed.training.distributed import destroy
    from multiembed.training.evaluation import evaluate_run

    try:
        result = evaluate_run(args.run_dir, args.data, split=args.split, device=args.device)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(json.dumps(result))
    finally:
        destroy()
    return 0
