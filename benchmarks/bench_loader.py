"""Loader throughput: samples/s from Parquet into :class:`~multiembed.data.loader.WeightedBatch` (one process).

Generates a synthetic Criteo-shaped dataset (``multiembed synth``, 39 one-hot fields + 13 dense) unless ``--data``
names one, then times full epochs over the train split for each configuration: sequential and shuffled order,
built in the caller's thread (``prefetch=0``) and by the background thread (``prefetch=2``, the consumer only
takes batches). Start-up (reading and validating the Parquet files) is timed separately.

Run::

    .venv/bin/python benchmarks/bench_loader.py --rows 1250000 --batch-size 2048

The target: >= 1M samples/s per process.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="an existing dataset directory (default: generate one)")
    parser.add_argument("--rows", type=int, default=1_250_000, help="rows to generate (train gets 80 %%)")
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per configuration")
    args = parser.parse_args()

    from multiembed.data.loader import ParquetBatchLoader
    from multiembed.data.synthetic import SyntheticConfig, generate_dataset

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "synthetic"
        if args.data is None:
            generate_dataset(data, args.rows, SyntheticConfig(seed=0), progress=False)
        results = []
        for shuffle in (False, True):
            for prefetch in (0, 2):
                start = time.perf_counter()
                loader = ParquetBatchLoader(
                    data, "train", args.batch_size, shuffle=shuffle, prefetch=prefetch, last_batch="drop"
                )
                open_s = time.perf_counter() - start
                samples = 0
                start = time.perf_counter()
                for epoch in range(args.epochs):
                    for batch in loader.iter_epoch(epoch):
                        samples += batch.labels.shape[0]
                elapsed = time.perf_counter() - start
                results.append(
                    {
                        "shuffle": shuffle,
                        "prefetch": prefetch,
                        "batch_size": args.batch_size,
                        "rows": loader.num_rows,
                        "open_s": round(open_s, 3),
                        "samples_per_s": round(samples / elapsed),
                    }
                )
                print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
