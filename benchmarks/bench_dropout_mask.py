"""Dropout masks on CPU: the fast path's SplitMix64 mask against the earlier threaded draws and torch's draws.

Contenders for the ``keep`` mask of an inverted dropout with probability ``p`` (``--p``, the model's 0.2):

* ``fast_path``: :func:`multiembed.models.cpu_fastpath.keep_mask`: SplitMix64 words as vectorised int64 passes over
  chunks of ``2**16`` outputs (each chunk in cache), every pass on every intra-op thread;
* ``splitmix_whole``: the same words computed over the whole mask at once (the buffers leave the cache);
* ``threaded_uniform``: the fast path's earlier mask: ``uniform_`` in fixed chunks of ``2**17`` elements, each chunk
  from its own seeded ``torch.Generator`` on a pool of ``torch.get_num_threads()`` Python threads, then ``>= p``;
* ``torch_uniform``: ``torch.rand_like(x) >= p`` (one mt19937 on one thread);
* ``torch_bernoulli``: ``torch.empty_like(x).bernoulli_(1 - p)`` (what ``F.dropout`` draws on CPU).

Measured: the mask alone at the projection's ``[B, K * H]`` and the over arch's ``[B, H]``, and the dense step of
``dcnv2-me-{K}x`` (set arch + mean + over arch, forward, backward and a fused Adam step on ``[B, K, F, d]``
embeddings) with ``cpu_fastpath.keep_mask`` swapped for each contender. Contenders alternate in ``--rounds`` rounds
of ``--iters`` calls after a warm-up; the median round is reported with the median per-round ratio to
``fast_path``, so a busy machine disturbs all alike. The CPU facts and the load are recorded.

Usage::

    .venv/bin/python -m multiembed.benchmarks.bench_dropout_mask                  # batch 2048, K 4, H 400
    .venv/bin/python -m multiembed.benchmarks.bench_dropout_mask --quick --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from multiembed.benchmarks.machine import cpu_facts
from multiembed.data.metadata import atomic_write_text
from multiembed.models import cpu_fastpath
from multiembed.models.zoo import build_model

_UNIFORM_CHUNK = 1 << 17
_pool: Optional[ThreadPoolExecutor] = None


def threaded_uniform_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """The earlier fast-path mask: seeded ``uniform_`` chunks on a pool of threads, then ``>= p`` in place (a float
    0 / 1 mask, as the earlier fast path multiplied it)."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=torch.get_num_threads())
    out = torch.empty(x.shape, dtype=torch.float32)
    chunks = out.view(-1).split(_UNIFORM_CHUNK)
    base = cpu_fastpath._stream_base()

    def fill(i: int) -> None:
        chunks[i].uniform_(generator=torch.Generator().manual_seed(base + i))

    list(_pool.map(fill, range(len(chunks))))
    return out.ge_(p)


def splitmix_whole_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """:func:`~multiembed.models.cpu_fastpath.keep_mask`'s words computed over the whole tensor at once."""
    count = x.numel()
    words = cpu_fastpath.splitmix64((count + 1) // 2, cpu_fastpath._stream_base()).view(torch.int32)[:count]
    return words.ge(cpu_fastpath.keep_threshold(p)).view(x.shape)


MASKS: Dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "fast_path": cpu_fastpath.keep_mask,
    "splitmix_whole": splitmix_whole_mask,
    "threaded_uniform": threaded_uniform_mask,
    "torch_uniform": lambda x, p: torch.rand_like(x) >= p,
    "torch_bernoulli": lambda x, p: torch.empty_like(x).bernoulli_(1 - p).bool(),
}


def alternating_medians(contenders: Dict[str, Callable[[], object]], warmup: int, iters: int, rounds: int
                        ) -> Dict[str, Dict[str, float]]:
    """Median ms per call of each contender over alternating rounds, and its median per-round ratio to the first."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    per_round: Dict[str, List[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            for _ in range(iters):
                fn()
            per_round[name].append((time.perf_counter() - start) / iters * 1e3)
    first = next(iter(contenders))
    return {
        name: {"ms": statistics.median(times),
               "ratio_to_" + first: statistics.median(a / b for a, b in zip(times, per_round[first]))}
        for name, times in per_round.items()
    }


def dense_step(model_name: str, batch: int, fields: int, hidden: int) -> Callable[[], None]:
    """One training step of the model's dense arches (set arch, mean over sets, over arch, loss, fused Adam)."""
    vocab = {f"f{i}": 100 for i in range(fields)}
    model = build_model(model_name, vocab, device=torch.device("cpu"), hidden=hidden)
    model.train()
    k, d = model.num_sets, model.sparse_arch.set_dim
    embeddings = (torch.randn(k, batch, fields, d) * 0.1).transpose(0, 1).requires_grad_()
    labels = torch.randint(0, 2, (batch,)).float()
    params = [p for n, p in model.named_parameters() if not n.startswith("sparse_arch")]
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)

    def step() -> None:
        per_set = model.set_arch(embeddings)
        logits = model.over_arch(per_set.sum(dim=1).div(k))
        F.binary_cross_entropy_with_logits(logits, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        embeddings.grad = None

    return step


def run(args: argparse.Namespace) -> Dict[str, object]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    result: Dict[str, object] = {
        "machine": cpu_facts(), "load_start": os.getloadavg(), "threads": torch.get_num_threads(),
        "batch": args.batch, "k": args.k, "hidden": args.hidden, "p": args.p, "masks": {}, "dense_step": {},
    }
    for shape in ((args.batch, args.k * args.hidden), (args.batch, args.hidden)):
        x = torch.empty(shape)
        result["masks"][f"{shape[0]}x{shape[1]}"] = alternating_medians(
            {name: (lambda mask=mask: mask(x, args.p)) for name, mask in MASKS.items()},
            args.warmup, args.iters, args.rounds)
    step = dense_step(f"dcnv2-me-{args.k}x", args.batch, args.fields, args.hidden)
    original = cpu_fastpath.keep_mask

    def with_mask(mask: Callable[[torch.Tensor, float], torch.Tensor]) -> Callable[[], None]:
        def timed() -> None:
            cpu_fastpath.keep_mask = mask
            try:
                step()
            finally:
                cpu_fastpath.keep_mask = original
        return timed

    result["dense_step"] = alternating_medians(
        {name: with_mask(MASKS[name]) for name in ("fast_path", "splitmix_whole", "threaded_uniform", "torch_uniform")},
        args.warmup, max(1, args.iters // 4), args.rounds)
    result["load_end"] = os.getloadavg()
    return result


def format_result(result: Dict[str, object]) -> str:
    lines = [f"CPU: {result['machine']}", f"threads {result['threads']}, load {result['load_start']} -> "
             f"{result['load_end']}", "", "| measured | contender | ms (median round) | / fast_path (paired) |",
             "|---|---|---:|---:|"]
    sections = [(f"mask {shape}", rows) for shape, rows in result["masks"].items()]
    sections.append((f"dcnv2-me-{result['k']}x dense step", result["dense_step"]))
    for title, rows in sections:
        for name, row in rows.items():
            lines.append(f"| {title} | {name} | {row['ms']:.2f} | {row['ratio_to_fast_path']:.2f} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--k", type=int, default=4, help="sets (the projection's mask is [batch, k * hidden])")
    parser.add_argument("--hidden", type=int, default=400)
    parser.add_argument("--fields", type=int, default=39)
    parser.add_argument("--p", type=float, default=0.2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20, help="mask calls per round (dense steps: a quarter)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="batch 256, 2 rounds of 4 calls (a smoke run)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.iters, args.rounds, args.warmup = 256, 4, 2, 1
    result = run(args)
    print(format_result(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
