"""Conversion speed: ``multiembed convert`` (a subprocess, start-up included) against pyarrow's bare read_csv.

Writes a Criteo-shaped TSV (label, 13 integer columns with ~20 % empty cells and negative values in I2, 26 hex
categorical columns with Zipf-distributed values and ~10 % empty cells), then measures in the same run:

* ``pyarrow.csv.read_csv`` of the file, multi-threaded, types inferred (the floor the target is set against);
* ``multiembed convert criteo-1tb`` (hashing mode) and ``multiembed convert criteo`` (paper mode: counting pass +
  encoding pass) as subprocesses, with their peak RSS (``wait4``);
* ``--modes workers``: the same rows as two files of half the rows, converted (hashing) by one worker held to one
  thread (``--workers 1 --threads-per-worker 1``) and by two such workers (``--workers 2 --threads-per-worker 1``):
  the scaling of ``--workers`` (the target: two workers >= 1.7x one on an idle 2-core machine).

Each measurement is repeated (``--repeats``) in interleaved order and the median is reported, because the machine
may be shared. Prints a markdown table and writes JSON.

Usage::

    .venv/bin/python benchmarks/bench_convert.py --rows 1000000 --json bench_convert.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

# Raw Criteo Kaggle cardinalities of C1..C26 (shapes the generated vocabularies).
CARDINALITIES = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
                 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def _hex_tokens(values: np.ndarray) -> pa.Array:
    nibbles = np.stack([(values >> np.uint64(4 * (7 - k))) & np.uint64(15) for k in range(8)], axis=1)
    return pa.array(_HEX[nibbles.astype(np.uint8)].copy().view("S8").ravel(), type=pa.binary())


def write_criteo_tsv(path: Path, rows: int, seed: int = 0, piece: int = 250_000) -> None:
    """Writes ``rows`` random Criteo-shaped rows, ``piece`` rows at a time (bounded memory)."""
    rng = np.random.default_rng(seed)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    with pa.OSFile(str(path), "wb") as sink:
        writer = None
        for start in range(0, rows, piece):
            n = min(piece, rows - start)
            columns = {"label": pa.array((rng.random(n) < 0.25).astype(np.int64))}
            for i in range(13):
                values = np.floor(rng.lognormal(2.0, 2.0, n)).astype(np.int64) - (3 if i == 1 else 0)
                columns[f"I{i + 1}"] = pa.array(values, mask=rng.random(n) < 0.2)
            for j, cardinality in enumerate(CARDINALITIES):
                ids = (rng.zipf(1.2, n) % cardinality).astype(np.uint64) * np.uint64(2654435761) % np.uint64(1 << 32)
                empty = pa.array(rng.random(n) < 0.1)
                columns[f"C{j + 1}"] = pc.if_else(empty, pa.scalar(None, pa.binary()), _hex_tokens(ids)).cast(pa.string())
            table = pa.table(columns)
            if writer is None:
                writer = pacsv.CSVWriter(sink, table.schema, write_options=options)
            writer.write_table(table)
        if writer is not None:
            writer.close()


_READ_CSV = """
import sys, time
import pyarrow.csv as pacsv
names = ["label"] + [f"I{i}" for i in range(1, 14)] + [f"C{i}" for i in range(1, 27)]
start = time.perf_counter()
table = pacsv.read_csv(sys.argv[1], pacsv.ReadOptions(column_names=names, use_threads=True),
                       pacsv.ParseOptions(delimiter="\\t"))
print(time.perf_counter() - start, table.num_rows)
"""


def time_read_csv(path: Path) -> Dict[str, float]:
    """pyarrow's bare multi-threaded read_csv (types inferred), timed inside a fresh process around the call only.

    A separate process keeps the benchmark's own memory small: Linux carries a parent's peak RSS into the
    ``ru_maxrss`` of the children it starts, which would spoil the converter's measured peak.
    """
    result = subprocess.run([sys.executable, "-c", _READ_CSV, str(path)], capture_output=True, text=True, check=True)
    seconds, rows = result.stdout.split()
    return {"seconds": float(seconds), "rows": int(rows)}


def time_command(command: List[str]) -> Dict[str, float]:
    """Wall time and peak RSS (MiB) of one subprocess."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    stderr = process.stderr.read().decode() if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {stderr.strip()[-500:]}")
    return {"seconds": elapsed, "peak_rss_mib": usage.ru_maxrss / 1024.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the generated TSV")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of each measurement (median reported)")
    parser.add_argument("--workdir", default=None, help="where to write the TSV and outputs (default: a temp dir)")
    parser.add_argument("--json", default="bench_convert.json", help="JSON result file")
    parser.add_argument("--modes", default="hashing,hashing-snappy,paper",
                        help="comma list of hashing, hashing-snappy (Parquet pages snappy-compressed), paper, workers "
                             "(one vs two single-thread workers on two half files)")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_"))
    workdir.mkdir(parents=True, exist_ok=True)
    tsv = workdir / f"criteo_{args.rows}.tsv"
    if not tsv.exists():
        print(f"writing {args.rows:,} rows to {tsv} ...", file=sys.stderr)
        partial = tsv.with_suffix(".partial")
        write_criteo_tsv(partial, args.rows)
        partial.rename(tsv)
    size = tsv.stat().st_size
    multiembed = str(Path(sys.executable).with_name("multiembed"))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    halves = [workdir / f"criteo_{args.rows}_half{i}.tsv" for i in (1, 2)]
    if "workers" in modes:
        for i, half in enumerate(halves, start=1):
            if not half.exists():
                partial = half.with_suffix(".partial")
                write_criteo_tsv(partial, args.rows // 2, seed=i)
                partial.rename(half)
        modes = [m for m in modes if m != "workers"] + ["workers-1", "workers-2"]
    # Each mode: (inputs, options).
    commands = {
        "hashing": ([tsv], ["criteo-1tb"]),
        "hashing-snappy": ([tsv], ["criteo-1tb", "--compression", "snappy"]),
        "paper": ([tsv], ["criteo"]),
        "workers-1": (halves, ["criteo-1tb", "--workers", "1", "--threads-per-worker", "1"]),
        "workers-2": (halves, ["criteo-1tb", "--workers", "2", "--threads-per-worker", "1"]),
    }
    results: Dict[str, List[Dict[str, float]]] = {"read_csv": []}
    results.update({m: [] for m in modes})
    time_read_csv(tsv)  # warm the page cache and pyarrow's thread pool once
    for repeat in range(args.repeats):
        results["read_csv"].append(time_read_csv(tsv))
        for mode in modes:
            out = workdir / f"out_{mode}"
            inputs, options = commands[mode]
            # --overwrite: convert itself replaces only a dataset directory (what an earlier repeat wrote).
            command = [multiembed, "convert", options[0], *map(str, inputs), *options[1:], "--out", str(out),
                       "--quiet", "--overwrite"]
            results[mode].append(time_command(command))
            results[mode][-1]["output_mib"] = sum(p.stat().st_size for p in out.rglob("*.parquet")) / 2**20
    summary = {}
    for name, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        best = min(r["seconds"] for r in runs)
        entry = {"seconds_median": seconds, "rows_per_s": args.rows / seconds, "seconds_best": best,
                 "rows_per_s_best": args.rows / best, "runs": runs}
        if runs and "peak_rss_mib" in runs[0]:
            entry["peak_rss_mib_max"] = max(r["peak_rss_mib"] for r in runs)
        summary[name] = entry
    floor = summary["read_csv"]["rows_per_s"]
    floor_best = summary["read_csv"]["rows_per_s_best"]
    from multiembed.benchmarks.machine import cpu_facts

    report = {
        "rows": args.rows,
        "bytes": size,
        **cpu_facts(),  # CPU model, cpu_count, cpu_capability, mkldnn_bf16_supported, gemm_backend
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "pyarrow": pa.__version__,
        "load_average": os.getloadavg(),
        "results": summary,
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"Criteo-shaped TSV: {args.rows:,} rows, {size / 2**20:.0f} MiB, {os.cpu_count()} CPUs, "
          f"{args.repeats} runs each (median and best), load average {os.getloadavg()[0]:.1f}")
    print()
    print("| what | seconds (median) | rows/s (median) | vs read_csv (median) | vs read_csv (best of each) | "
          "peak RSS | Parquet |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    labels = {"read_csv": "pyarrow.csv.read_csv (multithreaded, types inferred; timed around the call)",
              "hashing": "multiembed convert criteo-1tb (hashing; whole command)",
              "hashing-snappy": "multiembed convert criteo-1tb --compression snappy (whole command)",
              "paper": "multiembed convert criteo (paper, 2 passes; whole command)",
              "workers-1": "convert criteo-1tb, 2 half files, --workers 1 --threads-per-worker 1",
              "workers-2": "convert criteo-1tb, 2 half files, --workers 2 --threads-per-worker 1"}
    for name, entry in summary.items():
        rss = f"{entry['peak_rss_mib_max']:.0f} MiB" if "peak_rss_mib_max" in entry else "-"
        size_mib = f"{entry['runs'][-1]['output_mib']:.0f} MiB" if "output_mib" in entry["runs"][-1] else "-"
        print(f"| {labels[name]} | {entry['seconds_median']:.2f} | {entry['rows_per_s']:,.0f} | "
              f"{entry['rows_per_s'] / floor:.0%} | {entry['rows_per_s_best'] / floor_best:.0%} | {rss} | {size_mib} |")
    if "workers-1" in summary and "workers-2" in summary:
        ratio = summary["workers-2"]["rows_per_s"] / summary["workers-1"]["rows_per_s"]
        print(f"\ntwo single-thread workers / one: {ratio:.2f}x (medians)")


if __name__ == "__main__":
    main()
