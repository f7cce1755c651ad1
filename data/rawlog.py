"""Reading raw click logs: opening and scanning files, cutting them into chunks, parsing chunks with pyarrow.

Parsing has two paths. The fast path hands a whole chunk (about 16 MB of lines) to ``pyarrow.csv.read_csv`` with
explicit column types and checks the result with vectorised tests. When anything is wrong with a chunk (pyarrow
rejects it, a label is not 0/1, a token is bad, lines and rows disagree), the careful path re-reads that chunk line
by line in Python, names the exact physical line and field of every bad row, and either raises
(``on_error="fail"``) or drops and counts them (``on_error="skip"``) before the remaining lines go through the fast
path again. Good chunks never touch Python per row.

Line numbers are 1-based physical lines of the file, the header included; chunks end at a newline, so a chunk's
first line number is known from the newlines before it.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import io
import os
import stat
import zlib
from pathlib import Path
from typing import BinaryIO, Counter, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from multiembed.data.formats import RawFormat
from multiembed.data.tokens import MAX_TOKEN_BYTES, string_offsets_and_data

ON_ERROR_CHOICES = ("fail", "skip")
# Read size of one chunk: big enough that pyarrow parses it with all threads, small enough that a chunk's Arrow
# table, its encoded columns and the careful path's Python lists stay far below the memory budget.
DEFAULT_CHUNK_BYTES = 16 << 20
# pyarrow's parse block inside a chunk (a chunk is split into several blocks parsed in parallel); a line longer
# than this makes pyarrow fail and is handled by the careful path (a valid line is far shorter).
_PARSE_BLOCK_BYTES = 2 << 20
_IO_BYTES = 1 << 20
# A line is buffered whole; one longer than this is reported (a file without newlines is not a click log, and
# buffering it whole could exhaust memory).
MAX_LINE_BYTES = 64 << 20
UTF8_BOM = b"\xef\xbb\xbf"
_MAX_EXAMPLES = 20

# Why a row was skipped: the keys of metadata.json's ``skipped``.
SKIP_REASONS = {
    "column_count": "wrong number of columns",
    "bad_line_ending": "carriage return inside a line",
    "bad_label": "label not 0 or 1",
    "bad_integer": "not an integer in an integer column",
    "integer_overflow": "integer does not fit in 64 bits",
    "nan_or_inf": "NaN or infinity in an integer column",
    "bad_utf8": "categorical token is not valid UTF-8",
    "token_too_long": f"categorical token longer than {MAX_TOKEN_BYTES} bytes",
    "bad_token": "categorical token contains a control character",
    "unparsable": "line rejected by the CSV parser",
}


class InputError(ValueError):
    """A raw input is missing, unreadable or malformed; the message reads ``file[:line]: [field: ]what is wrong``."""


@dataclasses.dataclass(frozen=True)
class SourceScan:
    """What a first pass over one input learned.

    Attributes:
        path: the input as given.
        bytes: size on disk.
        rows: data rows (physical lines, the header excluded).
        fingerprint: ``sha256:<hex>`` of every byte of the file on disk (the compressed bytes of a ``.gz``),
            computed while the scan reads it.
        compressed: gzip input.
        mtime_ns: modification time on disk (nanoseconds). A resumed run re-converts an input whose size, mtime
            or content hash changed.
    """

    path: str
    bytes: int
    rows: int
    fingerprint: str
    compressed: bool
    mtime_ns: int = 0

    @property
    def sha256(self) -> str:
        """The hex content digest (the fingerprint without its ``sha256:`` prefix)."""
        return self.fingerprint.split(":", 1)[-1]

    def to_json(self, base: Optional[os.PathLike] = None) -> Dict[str, object]:
        """The ``sources`` entry of metadata.json.

        Args:
            base: the directory the entry is written into: the path is recorded relative to it, so a moved
                dataset keeps naming its inputs the same way (``None``: absolute).
        """
        path = os.path.abspath(self.path)
        if base is not None:
            path = os.path.relpath(path, os.path.abspath(base))
        return {"path": path, "bytes": self.bytes, "mtime_ns": self.mtime_ns, "sha256": self.sha256,
                "fingerprint": self.fingerprint, "rows": self.rows}


def _is_gzip(path: Path) -> bool:
    return path.suffix == ".gz"


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def check_regular_file(path: os.PathLike) -> os.stat_result:
    """``os.stat`` of an input that must be an existing, readable regular file (links followed); never opens it.

    A FIFO is refused before it is opened: opening one without a writer would block forever.

    Raises:
        InputError: missing, a directory, a FIFO, socket or device, or unreadable.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{path}: is a directory, expected a {'gzip' if _is_gzip(path) else 'text'} file")
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _KINDS if test(st.st_mode)), "a special file")
        raise InputError(f"{path}: not a regular file ({kind}); inputs must be regular files")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: permission denied (not readable)")
    return st


def _check_openable(path: Path) -> None:
    check_regular_file(path)


class _HashingFile(io.RawIOBase):
    """A read-only binary file that feeds every byte read through it to ``digest`` and counts them."""

    def __init__(self, raw: BinaryIO, digest: "hashlib._Hash") -> None:
        self._raw = raw
        self._digest = digest
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = self._raw.readinto(buffer)
        if n:
            with memoryview(buffer) as view:
                self._digest.update(view[:n])
            self.count += n
        return n or 0

    def close(self) -> None:
        self._raw.close()
        super().close()


def open_source(path: os.PathLike, digest: "Optional[hashlib._Hash]" = None) -> BinaryIO:
    """Opens an input for binary reading, decompressing ``.gz`` files.

    Args:
        path: the input.
        digest: when given, every byte read from the file on disk (compressed bytes of a ``.gz``) is fed to it.

    Raises:
        InputError: missing, not a regular file, or unreadable.
    """
    path = Path(path)
    _check_openable(path)
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise InputError(f"{path}: cannot open ({e.strerror or e})") from None
    if digest is not None:
        raw = io.BufferedReader(_HashingFile(raw, digest), buffer_size=_IO_BYTES)  # type: ignore[assignment]
    if _is_gzip(path):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    return raw


def _gzip_error(path: Path, error: BaseException, lines_before: int) -> InputError:
    if isinstance(error, EOFError):
        what = "truncated gzip stream (the file ends before the end-of-stream marker)"
    else:
        what = f"corrupt gzip data ({error})"
    return InputError(f"{path}:{lines_before + 1}: {what}")


class _BlockReader:
    """Reads an input (decompressing ``.gz``) into one reused buffer, mapping read errors to :class:`InputError`.

    Reusing the buffer instead of allocating a new ``bytes`` per read saves a page-faulting allocation and a copy
    per block: at the conversion's rates those cost as much as counting the newlines.
    """

    def __init__(self, path: Path, size: int, digest: "Optional[hashlib._Hash]" = None) -> None:
        self.path = path
        self.buffer = bytearray(max(size, 1 << 12))
        self.lines_before = 0  # newlines before the current read position (for error messages)
        self._hashing: Optional[_HashingFile] = None
        self._stream = open_source(path, digest)
        if digest is not None:
            raw = self._stream.fileobj if isinstance(self._stream, gzip.GzipFile) else self._stream  # type: ignore[attr-defined]
            self._hashing = raw.raw  # type: ignore[union-attr]
        self._at_start = True

    @property
    def hashed_bytes(self) -> int:
        """Bytes of the file on disk fed to the digest so far (0 without a digest)."""
        return self._hashing.count if self._hashing is not None else 0

    def read_into(self, start: int) -> int:
        """Reads into ``buffer[start:]``; returns the number of bytes read (0 at the end of the input).

        A UTF-8 byte-order mark at the start of the input is dropped here, once, before anything parses or
        counts the bytes (so the first row keeps its line number and its first cell its value).
        """
        if self._at_start:
            self._at_start = False
            filled = start
            while filled - start < len(UTF8_BOM):
                size = self._read(filled)
                if size == 0:
                    break
                filled += size
            if bytes(self.buffer[start : start + len(UTF8_BOM)]) == UTF8_BOM:
                self.buffer[start : filled - len(UTF8_BOM)] = self.buffer[start + len(UTF8_BOM) : filled]
                filled -= len(UTF8_BOM)
            return filled - start
        return self._read(start)

    def _read(self, start: int) -> int:
        view = memoryview(self.buffer)[start:]
        try:
            return self._stream.readinto(view)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise _gzip_error(self.path, e, self.lines_before) from None
        except OSError as e:
            raise InputError(f"{self.path}:{self.lines_before + 1}: read failed ({e.strerror or e})") from None
        finally:
            view.release()

    def grow(self, filled: int) -> None:
        """Doubles the buffer, keeping its first ``filled`` bytes (a line longer than the buffer)."""
        bigger = bytearray(2 * len(self.buffer))
        bigger[:filled] = self.buffer[:filled]
        self.buffer = bigger

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> "_BlockReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def split_cells(fmt: RawFormat, line: bytes) -> Optional[List[bytes]]:
    """The cells of one line (without its newline), unquoted when the format allows CSV quoting.

    Quoting follows RFC 4180 as pyarrow's reader does with ``quote_char='"', double_quote=True``: a cell that
    starts with ``"`` runs to the next lone ``"``, and ``""`` inside it is one ``"``; characters after the closing
    quote are kept. Returns None for a quoted cell that is never closed.
    """
    delimiter = fmt.delimiter.encode()
    if not fmt.quoted or b'"' not in line:
        return line.split(delimiter)
    cells: List[bytes] = []
    i, n = 0, len(line)
    while True:
        if i < n and line[i : i + 1] == b'"':
            cell = bytearray()
            i += 1
            while True:
                end = line.find(b'"', i)
                if end < 0:
                    return None
                cell += line[i:end]
                if line[end + 1 : end + 2] == b'"':
                    cell += b'"'
                    i = end + 2
                    continue
                i = end + 1
                break
            stop = line.find(delimiter, i)
            stop = n if stop < 0 else stop
            cell += line[i:stop]
            cells.append(bytes(cell))
        else:
            stop = line.find(delimiter, i)
            stop = n if stop < 0 else stop
            cells.append(line[i:stop])
        if stop >= n:
            return cells
        i = stop + 1


def _check_header(path: Path, fmt: RawFormat, first_line: bytes) -> None:
    cells = split_cells(fmt, first_line.rstrip(b"\r\n"))
    if cells is None:
        raise InputError(f"{path}:1: header: a quoted column name is never closed")
    got = [cell.decode("utf-8", errors="replace") for cell in cells]
    if tuple(got) == fmt.columns:
        return
    for i, (want, have) in enumerate(zip(fmt.columns, got)):
        if want != have:
            raise InputError(f"{path}:1: header: column {i + 1} is {have!r}, expected {want!r} ({fmt.name} header)")
    raise InputError(f"{path}:1: header: {len(got)} columns, expected the {len(fmt.columns)} of the {fmt.name} header")


def row_layout(path: os.PathLike, fmt: RawFormat) -> RawFormat:
    """``fmt``, or ``fmt.unlabelled()`` when the file's first line has the unlabelled layout: the header without the
    label column (formats with a header), else one column fewer than ``fmt`` (Criteo Kaggle ``test.txt``: 39).

    Any other first line gives ``fmt``, whose checks then name what is wrong. A file that cannot be read gives
    ``fmt`` too (:func:`scan_source` reports it).
    """
    unlabelled = fmt.unlabelled()
    try:
        with open_source(path) as f:
            first = f.readline(1 << 20)
    except (InputError, OSError, EOFError, zlib.error):
        return fmt
    if first.startswith(UTF8_BOM):
        first = first[len(UTF8_BOM) :]
    if not fmt.header:
        return data_line_layout(fmt, first)
    cells = split_cells(fmt, first.rstrip(b"\r\n"))
    if cells is None:
        return fmt
    names = tuple(cell.decode("utf-8", errors="replace") for cell in cells)
    return unlabelled if names == unlabelled.columns else fmt


def data_line_layout(fmt: RawFormat, line: bytes) -> RawFormat:
    """``fmt.unlabelled()`` when a data line has the unlabelled layout's number of columns, else ``fmt`` (whose
    checks then name what is wrong): how :func:`row_layout` tells a file without a header."""
    return fmt.unlabelled() if is_unlabelled_line(fmt, line) else fmt


def is_unlabelled_line(fmt: RawFormat, line: bytes) -> bool:
    """Whether a data line of labelled format ``fmt`` has one column fewer: the unlabelled layout
    (:func:`data_line_layout`; how lines served without their file are told)."""
    if fmt.label_column is None:
        return False
    cells = split_cells(fmt, line.rstrip(b"\r\n"))
    return cells is not None and len(cells) == fmt.num_columns - 1


def file_state(path: os.PathLike) -> Tuple[int, int]:
    """``(size, mtime_ns)`` of an input on disk: compared before and after every pass over it."""
    st = check_regular_file(path)
    return st.st_size, st.st_mtime_ns


# Byte-order marks of the other encodings a log saved by a text editor or a spreadsheet may have (longest first;
# a UTF-8 byte-order mark is read as UTF-8).
_BYTE_ORDER_MARKS = (
    (b"\xff\xfe\x00\x00", "UTF-32 (little-endian)"),
    (b"\x00\x00\xfe\xff", "UTF-32 (big-endian)"),
    (b"\xff\xfe", "UTF-16 (little-endian)"),
    (b"\xfe\xff", "UTF-16 (big-endian)"),
)


def _check_encoding(path: Path, start: bytes) -> None:
    """Refuses an input whose first bytes (after decompression) show another encoding than ASCII / UTF-8: a UTF-16
    or UTF-32 byte-order mark, or NUL bytes (UTF-16 / UTF-32 without one).

    Raises:
        InputError: ``<path>: is <encoding> encoded ...; logs are read as ASCII / UTF-8 ...`` (one line).
    """
    fix = "logs are read as ASCII / UTF-8; re-encode it first (e.g. iconv -t UTF-8)"
    for mark, name in _BYTE_ORDER_MARKS:
        if start.startswith(mark):
            raise InputError(f"{path}: is {name} encoded (starts with bytes {mark.hex(' ').upper()}); {fix}")
    if b"\x00" in start:
        raise InputError(f"{path}: holds NUL bytes in its first line (UTF-16 or UTF-32 text?); {fix}")


def scan_source(path: os.PathLike, fmt: RawFormat) -> SourceScan:
    """First pass over an input: checks it can be read to the end, counts its data rows, fingerprints it.

    Counting newlines runs at memory speed (a few GB/s); it is what lets the split draw an exact number of rows
    per split before the single encoding pass. The same pass feeds every byte read from disk to SHA-256 (about
    1.7 GB/s with the CPU's SHA extensions): the fingerprint covers the whole file at no extra read.

    Raises:
        InputError: missing, unreadable, not a regular file, empty, another text encoding (a byte-order mark or
            NUL bytes at the start), no data rows, bad header, truncated gzip, or changed while it was read.
    """
    path = Path(path)
    size_before, mtime_before = file_state(path)
    if size_before == 0:
        raise InputError(f"{path}: empty file (no rows)")
    newlines = 0
    last = b""
    head = b""
    digest = hashlib.sha256()
    with _BlockReader(path, _IO_BYTES * 8, digest) as reader:
        while True:
            size = reader.read_into(0)
            if size == 0:
                break
            buffer = reader.buffer
            if newlines == 0 and not head and not last:
                _check_encoding(path, bytes(buffer[: min(size, 64)]))
            if fmt.header and len(head) < 1 << 16 and b"\n" not in head:
                head += bytes(buffer[: min(size, 1 << 16)])
            newlines += buffer.count(b"\n", 0, size)
            reader.lines_before = newlines
            last = bytes(buffer[size - 1 : size])
        hashed = reader.hashed_bytes
    if file_state(path) != (size_before, mtime_before) or hashed != size_before:
        raise InputError(f"{path}: changed while it was being read (size or modification time); convert it again")
    lines = newlines + (1 if last not in (b"\n", b"") else 0)
    if lines == 0:
        raise InputError(f"{path}: empty after decompression (no rows)")
    if fmt.header:
        _check_header(path, fmt, head.split(b"\n", 1)[0])
    rows = lines - (1 if fmt.header else 0)
    if rows == 0:
        raise InputError(f"{path}: no data rows (only the header)")
    return SourceScan(str(path), size_before, rows, f"sha256:{digest.hexdigest()}", _is_gzip(path), mtime_before)


@dataclasses.dataclass
class RawChunk:
    """Whole lines of one input: ``data`` ends with a newline except at the end of the file.

    Attributes:
        data: the bytes of the lines (a view: valid until the next chunk is read).
        first_line: 1-based physical line number of the first line.
        first_row: 0-based data-row index of the first line (the header is not a data row).
        lines: number of lines in ``data``.
    """

    data: memoryview
    first_line: int
    first_row: int
    lines: int


def iter_chunks(path: os.PathLike, fmt: RawFormat, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[RawChunk]:
    """Cuts an input into chunks of whole lines of about ``chunk_bytes`` (a longer line makes a longer chunk).

    The header line (formats with a header) is not part of any chunk. Every chunk's ``data`` is a view into one
    reused buffer: it is valid until the next chunk is requested (parsing copies what it keeps).
    """
    line = 1
    row = 0
    header_left = fmt.header
    with _BlockReader(Path(path), chunk_bytes) as reader:
        filled = 0
        while True:
            if filled == len(reader.buffer):
                if filled >= MAX_LINE_BYTES:
                    raise InputError(
                        f"{path}:{line}: line: longer than {MAX_LINE_BYTES >> 20} MiB without a newline (not a click log?)"
                    )
                reader.grow(filled)
            size = reader.read_into(filled)
            buffer = reader.buffer
            if size == 0:
                break
            filled += size
            start = 0
            if header_left:
                cut = buffer.find(b"\n", 0, filled)
                if cut < 0:
                    continue
                start = cut + 1
                line += 1
                header_left = False
            cut = buffer.rfind(b"\n", start, filled)
            if cut < 0:
                if start:
                    buffer[: filled - start] = buffer[start:filled]
                    filled -= start
                continue
            count = buffer.count(b"\n", start, cut + 1)
            view = memoryview(buffer)[start : cut + 1]
            yield RawChunk(view, line, row, count)
            line += count
            row += count
            reader.lines_before = line - 1
            tail = filled - (cut + 1)
            buffer[:tail] = buffer[cut + 1 : filled]
            filled = tail
        if filled and not header_left:
            view = memoryview(reader.buffer)[:filled]
            yield RawChunk(view, line, row, 1)


@dataclasses.dataclass
class ParsedChunk:
    """The good rows of one chunk, typed.

    Attributes:
        table: columns ``label`` (int8), integer columns (int64, null when empty), categorical columns (string).
        rows: 0-based data-row indices of the rows in ``table`` (int64 ``[num_rows]``); ``None`` when the chunk
            had no bad row, i.e. the rows are ``first_row .. first_row + lines - 1``.
        first_row: data-row index of the chunk's first line.
        lines: lines in the chunk (kept and skipped).
        skipped: skipped rows by reason.
        examples: ``file:line: field: what`` of the first skipped rows.
    """

    table: pa.Table
    rows: Optional[np.ndarray]
    first_row: int
    lines: int
    skipped: Counter[str]
    examples: List[str]


def _shorten(cell: bytes, limit: int = 40) -> str:
    text = cell.decode("utf-8", errors="backslashreplace")
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(cell)} bytes)"


_NAN_INF = {b"nan", b"-nan", b"+nan", b"inf", b"-inf", b"+inf", b"infinity", b"-infinity", b"+infinity"}
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _parse_int_like_arrow(cell: bytes) -> Optional[int]:
    """Integer syntax pyarrow accepts (surrounding spaces, a leading '-', decimal or ``0x`` hex digits), else None."""
    text = cell.strip(b" ")
    negative = text.startswith(b"-")
    if negative:
        text = text[1:]
    if text[:2] in (b"0x", b"0X"):
        digits, base = text[2:], 16
        ok = bool(digits) and all(c in b"0123456789abcdefABCDEF" for c in digits)
    else:
        digits, base = text, 10
        ok = bool(digits) and digits.isdigit()
    if not ok:
        return None
    value = int(digits, base)
    return -value if negative else value


class ChunkParser:
    """Parses the chunks of one input of one format (see the module docstring for the two paths).

    Args:
        fmt: the raw format.
        path: the input (for messages).
        on_error: ``"fail"`` raises :class:`InputError` at the first bad row; ``"skip"`` drops and counts bad rows.
    """

    def __init__(self, fmt: RawFormat, path: str, on_error: str = "fail") -> None:
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}")
        self.fmt = fmt
        self.path = path
        self.on_error = on_error
        self._delimiter = fmt.delimiter.encode()
        self._kept = [c for c in fmt.columns if c not in fmt.dropped_columns]
        types = {fmt.label_column: pa.int8()} if fmt.label_column is not None else {}
        types.update({c: pa.int64() for c in fmt.int_columns})
        types.update({c: pa.string() for c in fmt.cat_columns})
        self._parse_options = pacsv.ParseOptions(
            delimiter=fmt.delimiter,
            quote_char='"' if fmt.quoted else False,
            double_quote=fmt.quoted,
            escape_char=False,
            newlines_in_values=False,
            ignore_empty_lines=False,
        )
        self._convert_options = pacsv.ConvertOptions(
            column_types=types,
            null_values=[""],
            strings_can_be_null=False,
            quoted_strings_can_be_null=False,
            include_columns=self._kept,
            check_utf8=True,
        )
        self.schema = pa.schema([(name, types[name]) for name in self._kept])
        self._column_index = {name: i for i, name in enumerate(fmt.columns)}
        self._label_index = self._column_index[fmt.label_column] if fmt.label_column is not None else None
        self._int_indices = [self._column_index[c] for c in fmt.int_columns]
        self._cat_indices = [self._column_index[c] for c in fmt.cat_columns]

    # -- fast path ---------------------------------------------------------------------------------------------

    def _read(self, data: Union[bytes, memoryview]) -> pa.Table:
        read_options = pacsv.ReadOptions(
            column_names=list(self.fmt.columns), block_size=_PARSE_BLOCK_BYTES, use_threads=True
        )
        return pacsv.read_csv(pa.BufferReader(pa.py_buffer(data)), read_options, self._parse_options, self._convert_options)

    def _table_is_clean(self, table: pa.Table, lines: int) -> bool:
        if table.num_rows != lines:  # a lone carriage return splits a line in two
            return False
        if self.fmt.label_column is not None:
            label = table.column(self.fmt.label_column)
            if label.null_count:
                return False
            if table.num_rows:
                low, high = pc.min_max(label).values()
                if low.as_py() < 0 or high.as_py() > 1:
                    return False
        for name in self.fmt.cat_columns:
            for chunk in table.column(name).chunks:
                offsets, data = string_offsets_and_data(chunk)
                if len(chunk) and int(np.max(np.diff(offsets))) > MAX_TOKEN_BYTES:
                    return False
                used = data[offsets[0] : offsets[-1]]
                if used.size and (used < 0x20).any() | (used == 0x7F).any():
                    return False
        return True

    def _fast(self, data: Union[bytes, memoryview], lines: int) -> Optional[pa.Table]:
        try:
            table = self._read(data)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            return None
        return table if self._table_is_clean(table, lines) else None

    # -- careful path ------------------------------------------------------------------------------------------

    def _problem(self, raw: bytes) -> Optional[Tuple[str, str, str]]:
        """``(field, reason, what)`` of the first problem of one line (without its newline), or None."""
        fmt = self.fmt
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if b"\r" in raw:
            where = raw.index(b"\r") + 1
            return "line", "bad_line_ending", f"carriage return inside the line at byte {where}"
        cells = split_cells(fmt, raw)
        if cells is None:
            return "line", "unparsable", "a quoted field is never closed (quotes cannot span lines)"
        if len(cells) != fmt.num_columns:
            sep = "tab" if fmt.delimiter == "\t" else repr(fmt.delimiter)
            empty = " (empty line)" if raw == b"" else ""
            return (
                "columns",
                "column_count",
                f"expected {fmt.num_columns} {sep}-separated columns, got {len(cells)}{empty}",
            )
        if self._label_index is not None:
            label = _parse_int_like_arrow(cells[self._label_index])
            if label not in (0, 1):
                return str(fmt.label_column), "bad_label", f"expected 0 or 1, got {_shorten(cells[self._label_index])}"
        for index in self._int_indices:
            cell = cells[index]
            if cell == b"":
                continue
            value = _parse_int_like_arrow(cell)
            name = fmt.columns[index]
            if value is None:
                if cell.strip(b" ").lower() in _NAN_INF:
                    return name, "nan_or_inf", f"{_shorten(cell)} is not a finite integer"
                return name, "bad_integer", f"expected an integer, got {_shorten(cell)}"
            if not _INT64_MIN <= value <= _INT64_MAX:
                return name, "integer_overflow", f"{_shorten(cell)} does not fit in a signed 64-bit integer"
        for index in self._cat_indices:
            cell = cells[index]
            name = fmt.columns[index]
            if len(cell) > MAX_TOKEN_BYTES:
                return name, "token_too_long", f"token of {len(cell)} bytes (at most {MAX_TOKEN_BYTES} accepted)"
            try:
                cell.decode("utf-8")
            except UnicodeDecodeError as e:
                return name, "bad_utf8", f"invalid UTF-8 at byte {e.start + 1} of {_shorten(cell)}"
            control = next((b for b in cell if b < 0x20 or b == 0x7F), None)
            if control is not None:
                return name, "bad_token", f"control character 0x{control:02x} in {_shorten(cell)}"
        return None

    def _reject(self, line: int, field: str, reason: str, what: str, skipped: Counter[str], examples: List[str]) -> None:
        message = f"{self.path}:{line}: {field}: {what}"
        if self.on_error == "fail":
            raise InputError(message)
        skipped[reason] += 1
        if len(examples) < _MAX_EXAMPLES:
            examples.append(message)

    def _parse_lines(self, lines: List[bytes], indices: List[int]) -> Tuple[List[pa.Table], List[int], List[Tuple[int, str]]]:
        """Fast-parses lines the careful checks passed; bisects to the lines pyarrow still rejects (rare)."""
        if not lines:
            return [], [], []
        table = self._fast(b"\n".join(lines) + b"\n", len(lines))
        if table is not None:
            return [table], list(indices), []
        if len(lines) == 1:
            try:
                self._read(lines[0] + b"\n")
                what = "rejected by the CSV parser"
            except pa.ArrowException as e:
                what = f"rejected by the CSV parser ({str(e).splitlines()[0]})"
            return [], [], [(indices[0], what)]
        half = len(lines) // 2
        left = self._parse_lines(lines[:half], indices[:half])
        right = self._parse_lines(lines[half:], indices[half:])
        return left[0] + right[0], left[1] + right[1], left[2] + right[2]

    def _careful(self, chunk: RawChunk) -> ParsedChunk:
        data = bytes(chunk.data)
        lines = data.split(b"\n")
        if data.endswith(b"\n"):
            lines.pop()
        skipped: Counter[str] = collections.Counter()
        examples: List[str] = []
        good_lines: List[bytes] = []
        good_indices: List[int] = []
        for i, raw in enumerate(lines):
            problem = self._problem(raw)
            if problem is None:
                good_lines.append(raw[:-1] if raw.endswith(b"\r") else raw)
                good_indices.append(i)
            else:
                self._reject(chunk.first_line + i, *problem, skipped, examples)
        tables, kept, rejected = self._parse_lines(good_lines, good_indices)
        for index, what in sorted(rejected):
            self._reject(chunk.first_line + index, "line", "unparsable", what, skipped, examples)
        table = pa.concat_tables(tables) if tables else self.schema.empty_table()
        rows = chunk.first_row + np.asarray(kept, dtype=np.int64)
        return ParsedChunk(table, rows, chunk.first_row, chunk.lines, skipped, examples)

    def parse(self, chunk: RawChunk) -> ParsedChunk:
        """Parses one chunk: the fast path, or the careful path when the chunk has a problem."""
        table = self._fast(chunk.data, chunk.lines)
        if table is not None:
            return ParsedChunk(table, None, chunk.first_row, chunk.lines, collections.Counter(), [])
        return self._careful(chunk)


def parse_source(
    path: os.PathLike, fmt: RawFormat, on_error: str = "fail", chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[ParsedChunk]:
    """Parses every chunk of one input in order."""
    parser = ChunkParser(fmt, str(path), on_error)
    for chunk in iter_chunks(path, fmt, chunk_bytes):
        yield parser.parse(chunk)
