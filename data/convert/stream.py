"""Streaming a raw input: parsed chunks read ahead in a background thread, and the progress bars of the passes."""

from __future__ import annotations

import concurrent.futures
import sys
from typing import Any, Iterable, Iterator, TypeVar

from multiembed.data.convert.options import ResolvedOptions
from multiembed.data.formats import RawFormat
from multiembed.data.rawlog import ChunkParser, ParsedChunk, iter_chunks


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar of ``total`` rows on stderr (``enabled=False``: updates are counted, nothing is shown)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=" rows", unit_scale=True, file=sys.stderr, disable=not enabled,
                mininterval=0.5, smoothing=0.1, dynamic_ncols=True)


T = TypeVar("T")
_END = object()


def background_threads(resolved: ResolvedOptions) -> bool:
    """Whether a conversion reads ahead and writes in threads of their own: not when it is held to one thread
    (``--threads-per-worker 1``), so that it uses one core and N such workers scale over N cores."""
    return resolved.threads_per_worker != 1


def prefetched(items: Iterable[T], background: bool = True) -> Iterator[T]:
    """Yields ``items`` while a background thread already produces the next one (pyarrow and numpy release the
    GIL, so parsing the next chunk overlaps encoding this one); ``background=False``: in this thread, one by one."""
    if not background:
        yield from items
        return
    iterator = iter(items)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="convert-read") as pool:
        future = pool.submit(next, iterator, _END)
        while True:
            item = future.result()
            if item is _END:
                return
            future = pool.submit(next, iterator, _END)
            yield item  # type: ignore[misc]


def parsed_chunks(path: str, fmt: RawFormat, on_error: str, chunk_bytes: int) -> Iterator[ParsedChunk]:
    """``path``'s chunks, parsed in order."""
    parser = ChunkParser(fmt, path, on_error)
    for chunk in iter_chunks(path, fmt, chunk_bytes):
        yield parser.parse(chunk)
