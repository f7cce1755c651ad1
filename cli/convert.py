"""``multiembed convert {criteo,criteo-1tb,avazu} INPUT... --out DIR``: raw click logs -> Parquet + metadata.json.

Prints a summary on stdout (rows per split, skipped rows by reason, vocabulary) and progress bars on stderr. A bad
row stops the command with ``multiembed convert: error: FILE:LINE: FIELD: what is wrong`` and exit status 2, unless
``--on-error skip`` counts it instead.
"""

from __future__ import annotations

import argparse
import os

FORMAT_NAMES = ("criteo", "criteo-1tb", "avazu")


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "convert",
        help="convert raw Criteo / Criteo 1TB / Avazu logs to Parquet",
        description=(
            "Converts raw click logs (.gz accepted, LF or CRLF) into a dataset directory: "
            "{train,val,test}/part-NNNNN.parquet (one per input) and metadata.json. Paper mode (default for criteo and "
            "avazu) counts every token first and keeps those seen at least --min-count times (one out-of-vocabulary "
            "id per field; Criteo integers binned into categorical fields); hashing mode (default for criteo-1tb) "
            "maps every token with a fixed 64-bit hash into --hash-size buckets in one pass. A re-run with the same "
            "inputs and options skips the inputs whose outputs are complete; a finished dataset of other inputs or "
            "options is replaced only with --overwrite. One conversion at a time per --out (a lock file). Under torchrun "
            "(the torchx convert component, e.g. -j 24x1 for 24 day files) the ranks convert their shares of the "
            "inputs into one dataset, rank 0 writing metadata.json last; the output is the same as one process's."
        ),
    )
    p.add_argument("dataset", choices=FORMAT_NAMES, help="raw log format")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="raw log files, in order (day_0 .. day_23 for 1TB)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output dataset directory (new, empty, resumed, or with --overwrite replaced)")
    p.add_argument("--mode", "--vocab", dest="mode", choices=("paper", "hashing", "managed"), default=None,
                   help="vocabulary mode (default: paper for criteo/avazu, hashing for criteo-1tb); managed keeps "
                        "every token as its 64-bit hash for a train --vocab managed run (docs/managed.md)")
    p.add_argument("--min-count", type=int, default=None, metavar="N",
                   help="paper mode: tokens seen fewer than N times share the OOV id (default: 10 Criteo, 4 Avazu)")
    p.add_argument("--hash-size", type=int, default=None, metavar="N",
                   help="hashing mode: buckets per field (default for criteo-1tb: 40000000, the DLRM/MLPerf cap)")
    p.add_argument("--hash-sizes", default=None, metavar="SPEC",
                   help="hashing mode: per-field sizes 'C1=1000,C3=5000' (others get --hash-size), or 'mlperf' for "
                        "the MLPerf DLRM-DCNv2 Criteo 1TB table sizes")
    p.add_argument("--vocab-from", default=None, metavar="DIR",
                   help="encode with the vocabulary of an earlier conversion (e.g. a held-out day with --split 0,0,1)")
    p.add_argument("--split", default=None, metavar="TRAIN,VAL,TEST",
                   help="random split weights, exact counts (default: 8,1,1)")
    p.add_argument("--split-by-file", action="store_true",
                   help="inputs but the last -> train; the last input's first half -> val, second half -> test")
    p.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    p.add_argument("--on-error", choices=("fail", "skip"), default="fail",
                   help="bad rows: stop with FILE:LINE: FIELD (fail, default) or count them in metadata.json (skip)")
    p.add_argument("--row-group-size", type=int, default=None, metavar="ROWS",
                   help="Parquet rows per row group (default: 131072)")
    p.add_argument("--compression", default=None, choices=("none", "snappy", "zstd", "lz4", "gzip"),
                   help="Parquet codec (default: none; the id columns are delta-bit-packed either way)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a finished dataset in --out made from other inputs or options (refused otherwise); "
                        "only a multiembed dataset directory (one holding metadata.json) is ever replaced")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="convert N input files at once, one process each (default: 1, this process); the output "
                        "is the same as with one worker. Each worker holds one input file's chunks and Parquet row "
                        "groups at a time, as one worker does, so peak memory is about N times one worker's (paper "
                        "mode adds the merged token counts)")
    p.add_argument("--threads-per-worker", type=int, default=None, metavar="K",
                   help="pyarrow CPU and IO threads per worker (default: all cores / workers; with one worker, "
                        "pyarrow's default); 1 also reads ahead and writes in the worker's own thread, so that each "
                        "worker uses one core")
    p.add_argument("--first-day", default=None, metavar="SEQUENCE",
                   help="the dataset is day 0 of the day sequence SEQUENCE (hashing or managed mode; multiembed "
                        "days, docs/days.md)")
    p.add_argument("--follows", default=None, metavar="DAY",
                   help="the dataset is the day after the day dataset DAY (same sequence, fields and hash sizes)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import signal

    from multiembed.data.convert import ConvertOptions, convert, summary_lines
    from multiembed.data.parquet_io import DEFAULT_COMPRESSION, DEFAULT_ROW_GROUP_SIZE
    from multiembed.runtime.malloc import tune_allocator

    # Past a file-size limit (ulimit -f) the kernel would kill the process with SIGXFSZ and no message; ignored,
    # the write fails with EFBIG instead and is reported like a full disk.
    if hasattr(signal, "SIGXFSZ"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    tune_allocator()
    options = ConvertOptions(
        dataset=args.dataset,
        inputs=args.inputs,
        out=args.out,
        mode=args.mode,
        min_count=args.min_count,
        hash_size=args.hash_size,
        hash_sizes=args.hash_sizes,
        vocab_from=args.vocab_from,
        split=args.split,
        split_by_file=args.split_by_file,
        seed=args.seed,
        on_error=args.on_error,
        row_group_size=args.row_group_size if args.row_group_size is not None else DEFAULT_ROW_GROUP_SIZE,
        compression=args.compression if args.compression is not None else DEFAULT_COMPRESSION,
        progress=not args.quiet,
        overwrite=args.overwrite,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker,
        first_day=args.first_day,
        follows=args.follows,
    )
    # Under torchrun (the torchx `convert` component) the ranks convert their shares of the inputs into one dataset.
    nodes = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from multiembed.data.convert.nodes import init_node_group

        nodes = init_node_group()
    try:
        result = convert(options, nodes=nodes)
    finally:
        if nodes is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
    if nodes is None or nodes.is_main:
        for line in summary_lines(result):
            print(line)
    return 0
