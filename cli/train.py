"""``multiembed train``: the training worker (one process, or one rank under torchrun / torchx)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

# Exit status when the loss became NaN or infinite: distinct from a user error (2) so that schedulers and scripts
# can tell "fix the options" from "the run diverged; the last good checkpoint is kept".
EXIT_DIVERGED = 3


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on a converted dataset (one rank under torchrun / torchx)",
        description=(
            "Trains a multi-embedding model with TorchRec (DMP + sparse-dist pipeline), early-stopping on validation "
            "AUC, and writes config.json, metrics.jsonl, summary.json and checkpoints/ into --out. Started alone it "
            "is a one-process job; under torchrun / torchx each process is one rank."
        ),
        epilog=(
            f"Exit status: 0 done, 2 bad options or input, {EXIT_DIVERGED} the training loss became NaN or infinite "
            "(one error line; the last good checkpoint stays in --out/checkpoints)."
        ),
    )
    p.add_argument("--data", required=True, help="converted dataset directory (multiembed convert / synth)")
    p.add_argument("--model", required=True, help="model name, e.g. dcnv2-me-4x, dnn-se-10x, dcnv2-me-4x16")
    p.add_argument("--out", required=True, help="run directory (refused if it exists, unless --resume/--overwrite)")
    p.add_argument("--epochs", type=int, default=10, help="maximum epochs under early stopping (default 10)")
    p.add_argument("--batch-size", type=int, default=2048, help="global batch size, split over ranks (default 2048)")
    p.add_argument(
        "--sparse-optimizer", choices=["adagrad", "rowwise_adagrad", "sgd", "adam"], default=None,
        help="fused embedding optimizer (default: adagrad on CPU, adam on GPU; adam needs a GPU)",
    )
    p.add_argument("--sparse-lr", type=float, default=None, help="embedding learning rate (default 0.05 adagrad, 1e-3 adam)")
    p.add_argument("--dense-optimizer", choices=["adam", "sgd"], default="adam", help="dense optimizer (default adam)")
    p.add_argument("--lr", type=float, default=None, help="dense learning rate (default 1e-3)")
    p.add_argument("--weight-decay", type=float, default=None, help="dense weight decay (default 1e-6)")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up steps for both optimizers")
    p.add_argument("--decay-start", type=int, default=0, help="step where the linear LR decay starts (both optimizers)")
    p.add_argument("--decay-steps", type=int, default=0, help="steps of linear LR decay to 0 (0: no decay)")
    p.add_argument(
        "--sharding", default="auto",
        choices=["auto", "table_wise", "row_wise", "column_wise", "data_parallel"],
        help="embedding sharding strategy (column_wise puts different sets on different ranks)",
    )
    p.add_argument("--patience", type=int, default=3, help="evaluations without val AUC gain before stopping (0: off)")
    p.add_argument("--seed", type=int, default=0)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    group.add_argument("--overwrite", action="store_true", help="delete --out first")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: once per epoch)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    p.add_argument(
        "--ia-every", type=int, default=1,
        help="log information abundance (mean/min per set) every N evaluations into metrics.jsonl (0: off)",
    )
    p.add_argument("--max-steps", type=int, default=0, help="stop after N steps (0: no limit)")
    p.add_argument("--hidden", type=int, default=400, help="MLP width (default 400, the paper's)")
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--layout", choices=["fused", "per_set"], default="fused", help="embedding table layout")
    p.add_argument("--dense-features", action="store_true", help="feed the raw dense features through a dense arch")
    p.add_argument("--spectral-reg", type=float, default=0.0, help="weight of the singular-spectrum regulariser")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from multiembed.data.stack import require_torchrec_stack

    require_torchrec_stack()
    from multiembed.training.distributed import destroy
    from multiembed.training.trainer import TrainConfig, Trainer, TrainingDiverged, format_summary

    names = {field.name for field in dataclasses.fields(TrainConfig)}
    options = {key: value for key, value in vars(args).items() if key in names}
    options["progress"] = not args.no_progress
    try:
        trainer = Trainer(TrainConfig(**options))
        try:
            summary = trainer.fit()
        except TrainingDiverged as e:
            # Every rank raises (the check is collective); one line from rank 0 is the whole story, as for the
            # user errors cli.main prints. MULTIEMBED_DEBUG=1 shows the traceback instead.
            if os.environ.get("MULTIEMBED_DEBUG"):
                raise
            if trainer.ctx.is_main:
                print(f"multiembed train: error: {e}", file=sys.stderr)
            return EXIT_DIVERGED
        if trainer.ctx.is_main:
            print(format_summary(summary, trainer.run_dir))
    finally:
        destroy()
    return 0
