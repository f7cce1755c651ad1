"""Raw click logs (Criteo Kaggle, Criteo 1TB, Avazu) -> a converted dataset directory (Parquet + metadata.json).

One call of :func:`convert` (:mod:`~multiembed.data.convert.run`) runs these steps, each in its own module:

1. checks the options (:mod:`~multiembed.data.convert.options`: no file twice, by device and inode), takes the
   output directory's lock (:mod:`multiembed.runtime.locking`: one job per directory), refuses a symbolic link
   inside it and a finished dataset of other options or inputs, unless ``overwrite``
   (:mod:`~multiembed.data.convert.outputs`), and checks every input (:func:`multiembed.data.rawlog.scan_source`:
   a regular file, readable, not empty, complete gzip stream, header; data rows counted; size, mtime and a SHA-256
   of every byte recorded in the same pass);
2. gets the vocabulary (:mod:`~multiembed.data.convert.count`): ``--vocab-from DIR``'s, a hashing vocabulary
   (nothing to count), or in paper mode a counting pass over all inputs (saved as ``vocab.npz``; reused by a resumed
   run with the same inputs and options);
3. encodes each input (:mod:`~multiembed.data.convert.write`) in one streaming pass into
   ``{train,val,test}/part-<input index>.parquet``: chunks parsed by pyarrow in a background thread, tokens encoded
   with numpy in this one, Parquet written by a third; each output is renamed into place when complete and the
   input's manifest (``.convert/part-<index>.json``) written last;
4. writes ``metadata.json`` (the contract of :mod:`multiembed.data.metadata`) atomically
   (:mod:`~multiembed.data.convert.dataset`).

Several inputs at once: a pool of processes (:mod:`~multiembed.data.convert.workers`, ``--workers``) or the ranks
of a multi-node job (:mod:`~multiembed.data.convert.nodes`) run the scan, counting and encoding passes.

A re-run with the same options skips every input whose manifest matches (same options, same row counts of all
inputs, same size, mtime and content hash of this input) and says so. Into a finished dataset (``metadata.json``)
a run with other options, or other inputs (neither the same paths nor files of the same content), is refused
unless ``overwrite`` is set; ``overwrite`` only ever replaces a multiembed dataset or conversion. ``metadata.json``
names every file relative to the dataset directory and records the ``split_recipe`` that
:func:`multiembed.data.metadata.split_identity` hashes; a ``--vocab-from`` conversion keeps a copy of the paper-mode
vocabulary, so it can be a ``--vocab-from`` source in turn. Memory in hashing mode is bounded by the chunk size and
the Parquet row groups, whatever the input size; paper mode's counting pass grows with the number of distinct tokens
(:mod:`multiembed.data.vocab`).

Example::

    >>> import tempfile, pathlib
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> row = "1\\t" + "\\t".join(["5"] * 13) + "\\t" + "\\t".join(["68fd1e64"] * 26) + "\\n"
    >>> _ = (tmp / "day_0").write_text(row * 10)
    >>> result = convert(ConvertOptions("criteo-1tb", [str(tmp / "day_0")], str(tmp / "out"), progress=False))
    >>> result.metadata.split_rows(), len(result.metadata.fields)
    ({'train': 8, 'val': 1, 'test': 1}, 26)
"""

from multiembed.data.convert.dataset import SPLIT_RULES, ConvertResult, split_recipe, summary_lines
from multiembed.data.convert.options import ConvertOptions, ResolvedOptions, resolve_options
from multiembed.data.convert.outputs import STATE_DIR, OutputError
from multiembed.data.convert.run import Conversion, Coordinator, convert

__all__ = [
    "SPLIT_RULES",
    "STATE_DIR",
    "Conversion",
    "ConvertOptions",
    "ConvertResult",
    "Coordinator",
    "OutputError",
    "ResolvedOptions",
    "convert",
    "resolve_options",
    "split_recipe",
    "summary_lines",
]
