"""A few raw lines at a time -> the converter's ids, dense features and labels, without the chunked reader's set-up.

:class:`~multiembed.data.rawlog.ChunkParser` and :func:`~multiembed.data.encode.encode_table` are built for chunks
of millions of lines: a pyarrow CSV read and a pass of numpy work per column; one line pays that set-up (about a
millisecond) every time. :class:`LineEncoder` gives the same ids, dense features and labels a few lines at a time
(a served request):

* a line in its format's plain spelling (:func:`plain_line_pattern`: a ``0``/``1`` label, decimal integers of at most
  18 digits, tokens without control characters or quotes, valid UTF-8) is split with ``bytes.split`` and encoded
  by numpy over every cell of every line at once: one hash over all the tokens
  (:func:`~multiembed.data.tokens.hash_spans`), one vocabulary search over all the fields
  (``Vocabulary.encode_fields``);
* any other line, a bad one or a valid one in a rarer spelling (spaces around an integer, hex, quotes), goes
  through the converter's own parser as a one-line chunk, so it is accepted, encoded or refused (with the same
  ``file:line: field: what`` message) exactly as ``convert`` treats it.

Example::

    >>> from multiembed.data.formats import raw_format
    >>> from multiembed.data.vocab import HashingVocabulary
    >>> fmt = raw_format("criteo-1tb")
    >>> encoder = LineEncoder(fmt, "hashing", HashingVocabulary(fmt.name, {f: 1000 for f in fmt.cat_columns}), 0)
    >>> encoded = encoder.encode([b"1\\t5" + b"\\t" * 12 + b"\\t68fd1e64" * 26])
    >>> encoded.ids.shape, encoded.dense.shape, encoded.labels.tolist()
    ((1, 26), (1, 13), [1])
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Counter, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from multiembed.data.encode import encode_table
from multiembed.data.formats import PAPER_MODE, RawFormat
from multiembed.data.metadata import DENSE_PREFIX, LABEL_COLUMN
from multiembed.data.rawlog import ChunkParser, InputError, RawChunk
from multiembed.data.tokens import MAX_TOKEN_BYTES, hash_spans, log1p_clipped, paper_value_keys
from multiembed.data.vocab import Vocabulary

# Decimal integers of at most this many digits always fit in int64; longer ones take the converter's parser.
PLAIN_INT_DIGITS = 18


def plain_line_pattern(fmt: RawFormat) -> "re.Pattern[bytes]":
    """The plain spelling of one line of ``fmt`` (without its line ending), which the converter reads the way
    ``int()`` and ``bytes.split`` do: label ``0`` or ``1``; an integer cell empty or ``-?[0-9]{1,18}``; a token of at
    most ``MAX_TOKEN_BYTES`` bytes, none of them a control character, ``"`` or the delimiter (other bytes must
    form valid UTF-8, checked apart); a dropped column (Avazu ``id``) of such bytes, of any length."""
    delimiter = re.escape(fmt.delimiter.encode())
    byte = rb'[^\x00-\x1f\x7f"' + delimiter + rb"]"
    cells = []
    for column in fmt.columns:
        if column == fmt.label_column:
            cells.append(rb"[01]")
        elif column in fmt.int_columns:
            cells.append(rb"(?:-?[0-9]{1,%d})?" % PLAIN_INT_DIGITS)
        elif column in fmt.cat_columns:
            cells.append(byte + rb"{0,%d}" % MAX_TOKEN_BYTES)
        else:
            cells.append(byte + rb"*")
    return re.compile(delimiter.join(cells))


@dataclasses.dataclass
class EncodedLines:
    """The kept lines of one :meth:`LineEncoder.encode` call, in input order.

    Attributes:
        fields: the vocabulary's fields (the columns of ``ids``).
        dense_fields: the integer columns (the columns of ``dense``).
        ids: int64 ``[n, F]``.
        dense: float32 ``[n, D]``: ``log(1 + max(x, 0))`` of every integer column, 0 where empty.
        labels: int8 ``[n]``, or None in the unlabelled layout.
        rows: int64 ``[n]``: the index of each kept line in the input.
        skipped: lines dropped under ``on_error="skip"``, by reason.
    """

    fields: List[str]
    dense_fields: List[str]
    ids: np.ndarray
    dense: np.ndarray
    labels: Optional[np.ndarray]
    rows: np.ndarray
    skipped: Counter[str] = dataclasses.field(default_factory=collections.Counter)

    def columns(self) -> Dict[str, np.ndarray]:
        """The columns :func:`~multiembed.data.encode.encode_table` gives for the same rows."""
        out: Dict[str, np.ndarray] = {}
        if self.labels is not None:
            out[LABEL_COLUMN] = self.labels
        out.update({field: self.ids[:, j] for j, field in enumerate(self.fields)})
        out.update({DENSE_PREFIX + name: self.dense[:, j] for j, name in enumerate(self.dense_fields)})
        return out


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class LineEncoder:
    """Encodes raw lines of one layout with a vocabulary exactly as ``convert`` does (see the module docstring).

    Args:
        fmt: the lines' layout (``row_layout`` / ``data_line_layout``: labelled or not).
        mode: vocabulary mode (``paper`` or ``hashing``).
        vocab: the vocabulary the ids come from.
        hash_seed: seed of the token hash.
        source: what messages name as the file (``source:line: field: what``).
        on_error: ``fail`` raises :class:`~multiembed.data.rawlog.InputError` at the first bad line; ``skip`` drops
            and counts bad lines.

    Raises:
        ValueError: a vocabulary field that is no column of ``fmt``, an integer field outside paper mode, or an
            unknown ``on_error``.
    """

    def __init__(
        self, fmt: RawFormat, mode: str, vocab: Vocabulary, hash_seed: int, source: str = "<lines>",
        on_error: str = "fail",
    ) -> None:
        self._parser = ChunkParser(fmt, source, on_error)
        self.fmt, self.mode, self.vocab, self.hash_seed, self.source = fmt, mode, vocab, hash_seed, source
        self.fields = list(vocab.fields)
        unknown = [f for f in self.fields if f not in fmt.int_columns and f not in fmt.cat_columns]
        if unknown:
            raise ValueError(f"vocabulary fields {unknown[:3]} are not columns of the {fmt.name} format")
        int_fields = [f for f in self.fields if f in fmt.int_columns]
        if int_fields and mode != PAPER_MODE:
            raise ValueError(f"field {int_fields[0]}: integer columns are categorical fields only in paper mode")
        cat_fields = [f for f in self.fields if f in fmt.cat_columns]
        column = {name: i for i, name in enumerate(fmt.columns)}
        self._pattern = plain_line_pattern(fmt)
        self._delimiter = fmt.delimiter.encode()
        self._label = column[fmt.label_column] if fmt.label_column is not None else None
        self._int_cells = [column[c] for c in fmt.int_columns]
        self._cat_cells = np.array([column[f] for f in cat_fields], dtype=np.int64)
        # The integer fields: their cells, their places among the integer columns, and the order of the fields
        # in [integer field keys | categorical field keys].
        self._int_field_cells = np.array([column[f] for f in int_fields], dtype=np.int64)
        self._int_field_columns = np.array([fmt.int_columns.index(f) for f in int_fields], dtype=np.int64)
        self._all_ints = int_fields == list(fmt.int_columns)
        order = [(int_fields + cat_fields).index(f) for f in self.fields]
        self._order = None if order == list(range(len(order))) else np.array(order, dtype=np.int64)

    def encode(self, lines: Sequence[Union[bytes, str]], first_line: int = 1) -> EncodedLines:
        """Encodes ``lines``, each one line with or without its line ending (``\\n`` or ``\\r\\n``).

        Args:
            lines: the lines (``str`` is encoded as UTF-8).
            first_line: the line number messages give the first line.

        Raises:
            InputError: a bad line under ``on_error="fail"`` (the converter's message), or an item holding a
                newline inside (one line per item).
        """
        plain: List[bytes] = []
        plain_rows: List[int] = []
        other: List[Tuple[int, bytes]] = []
        for i, item in enumerate(lines):
            line = self._line(item, first_line + i)
            body = self._plain_body(line)
            if body is not None:
                plain.append(body)
                plain_rows.append(i)
            else:
                other.append((i, line))
        ids, dense, labels = self._encode_plain(plain)
        if not other:
            return EncodedLines(self.fields, list(self.fmt.int_columns), ids, dense, labels,
                                np.arange(len(plain), dtype=np.int64))
        others, skipped = self._encode_others(other, first_line)
        return self._merge(plain_rows, ids, dense, labels, others, skipped)

    def is_plain(self, line: Union[bytes, str]) -> bool:
        """Whether :meth:`encode` encodes ``line`` (line ending optional) on the vectorised path: the plain
        spelling of :func:`plain_line_pattern` in valid UTF-8. Every other line takes the converter's parser."""
        return self._plain_body(self._line(line, 1)) is not None

    def _line(self, line: Union[bytes, str], number: int) -> bytes:
        """One input item as bytes without its ``\\n`` (a ``\\r`` stays: the converter reads it)."""
        if isinstance(line, str):
            line = line.encode("utf-8", "surrogatepass")
        if line.endswith(b"\n"):
            line = line[:-1]
        if b"\n" in line:
            raise InputError(f"{self.source}:{number}: line: holds a newline; pass one line per item")
        return line

    def _plain_body(self, line: bytes) -> Optional[bytes]:
        """The line without a final ``\\r`` when it is in the plain spelling, else None."""
        body = line[:-1] if line.endswith(b"\r") else line
        if self._pattern.fullmatch(body) is None or not (body.isascii() or _is_utf8(body)):
            return None
        return body

    def _encode_plain(self, bodies: List[bytes]) -> Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
        """``(ids [m, F], dense [m, D], labels [m] or None)`` of lines in the plain spelling, vectorised."""
        m, width = len(bodies), self.fmt.num_columns
        if m == 0:
            labels = np.zeros(0, dtype=np.int8) if self._label is not None else None
            return (np.zeros((0, len(self.fields)), dtype=np.int64),
                    np.zeros((0, len(self._int_cells)), dtype=np.float32), labels)
        joined = self._delimiter.join(bodies)
        cells = joined.split(self._delimiter)  # every cell of every line, line by line
        lengths = np.fromiter(map(len, cells), dtype=np.int64, count=m * width).reshape(m, width)
        strides = lengths + 1  # each cell and the delimiter after it
        starts = np.cumsum(strides).reshape(m, width) - strides
        labels = None
        if self._label is not None:
            labels = np.fromiter((cells[i] == b"1" for i in range(self._label, m * width, width)), np.int8, m)
        values = np.array([int(cells[r + c] or 0) for r in range(0, m * width, width) for c in self._int_cells],
                          dtype=np.int64).reshape(m, len(self._int_cells))
        dense = log1p_clipped(values, np.empty(values.shape, dtype=np.float32))
        keys = hash_spans(np.frombuffer(joined, dtype=np.uint8), np.take(starts, self._cat_cells, axis=1).ravel(),
                          np.take(lengths, self._cat_cells, axis=1).ravel(), self.hash_seed)
        keys = keys.reshape(m, len(self._cat_cells))
        if len(self._int_field_cells):
            field_values = values if self._all_ints else np.take(values, self._int_field_columns, axis=1)
            valid = np.take(lengths, self._int_field_cells, axis=1) > 0
            int_keys = paper_value_keys(field_values.ravel(), valid.ravel(), self.hash_seed)
            keys = np.concatenate([int_keys.reshape(m, len(self._int_field_cells)), keys], axis=1)
        if self._order is not None:
            keys = keys[:, self._order]
        return self.vocab.encode_fields(keys), dense, labels

    def _encode_others(
        self, other: List[Tuple[int, bytes]], first_line: int
    ) -> Tuple[Dict[int, Dict[str, np.ndarray]], Counter[str]]:
        """``({index: encode_table's columns}, skipped)`` of the lines outside the plain spelling, each parsed by
        the converter as a one-line chunk (which raises its :class:`InputError` under ``on_error="fail"``)."""
        out: Dict[int, Dict[str, np.ndarray]] = {}
        skipped: Counter[str] = collections.Counter()
        for i, line in other:
            parsed = self._parser.parse(RawChunk(memoryview(line + b"\n"), first_line + i, i, 1))
            skipped.update(parsed.skipped)
            if parsed.table.num_rows:
                out[i] = encode_table(parsed.table, self.fmt, self.mode, self.vocab, self.hash_seed)
        return out, skipped

    def _merge(self, plain_rows: List[int], ids: np.ndarray, dense: np.ndarray, labels: Optional[np.ndarray],
               others: Dict[int, Dict[str, np.ndarray]], skipped: Counter[str]) -> EncodedLines:
        """The plain and the other kept lines together, in input order."""
        rows = np.array(sorted(plain_rows + list(others)), dtype=np.int64)
        at = {row: k for k, row in enumerate(rows.tolist())}
        plain_at = np.array([at[row] for row in plain_rows], dtype=np.int64)
        out_ids = np.empty((len(rows), len(self.fields)), dtype=np.int64)
        out_dense = np.empty((len(rows), len(self.fmt.int_columns)), dtype=np.float32)
        out_labels = np.empty(len(rows), dtype=np.int8) if labels is not None else None
        out_ids[plain_at], out_dense[plain_at] = ids, dense
        if out_labels is not None:
            out_labels[plain_at] = labels
        for row, columns in others.items():
            k = at[row]
            out_ids[k] = [columns[f][0] for f in self.fields]
            out_dense[k] = [columns[DENSE_PREFIX + name][0] for name in self.fmt.int_columns]
            if out_labels is not None:
                out_labels[k] = columns[LABEL_COLUMN][0]
        return EncodedLines(self.fields, list(self.fmt.int_columns), out_ids, out_dense, out_labels, rows, skipped)
