"""Progress that reads well on a terminal and in a log: a tqdm bar on a tty, a line every 10 % or 30 s otherwise.

A tqdm bar redraws itself with carriage returns; once its output is not a terminal (torchx prefixes every chunk of a
worker's output, CI, ``> train.log``) each redraw becomes a line of its own, so a run of a few hundred steps printed
more than a thousand lines. :func:`progress_bar` returns a tqdm bar when the stream is a terminal and a
:class:`LineProgress` otherwise; both take the same calls (``update``, ``set_postfix``, ``set_postfix_str``,
``close``, ``disable``, use as a context manager).

Example::

    >>> import io
    >>> out = io.StringIO()
    >>> with progress_bar(total=4, desc="train", unit="step", file=out) as bar:
    ...     for _ in range(4):
    ...         bar.update(1)
    >>> out.getvalue().splitlines()[-1].startswith("train: 100% 4/4 step")
    True
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Dict, Optional, TextIO, Union

from tqdm import tqdm

# A non-terminal stream gets a line each time progress crosses a multiple of this fraction of the total...
LINE_FRACTION = 0.1
# ... or when this many seconds passed since the last line (long runs, unknown totals).
LINE_INTERVAL_S = 30.0


def _is_terminal(stream: Any) -> bool:
    """True when ``stream`` is an interactive terminal (a bar can redraw itself in place)."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (OSError, ValueError):  # a closed or detached stream
        return False


def _duration(seconds: float) -> str:
    """``mm:ss`` (or ``h:mm:ss``) like tqdm's elapsed time."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class LineProgress:
    """A tqdm-compatible progress report that prints whole lines: one each time progress crosses a multiple of
    ``fraction`` of ``total`` (10 % by default) or ``interval_s`` seconds after the previous line, and one at
    :meth:`close` when progress moved since the last line.

    Args:
        total: units of work (None: unknown; only the time rule applies).
        desc: prefix of every line.
        unit: name of one unit.
        initial: units already done (a resumed run, or one segment of a longer run).
        file: where lines go (stderr by default).
        disable: print nothing (the calls still work).
        fraction: print each time ``n / total`` crosses a multiple of this.
        interval_s: print when this many seconds passed since the last line.
        leave: print a last line at :meth:`close` when progress moved since the previous one (like a tqdm bar left
            on screen); False for a piece of a longer run whose caller reports the end itself.
        **_tqdm_options: tqdm options without a meaning here (``leave``, ``dynamic_ncols``, ...), accepted so that
            one call builds either kind.

    Example::

        >>> import io
        >>> out = io.StringIO()
        >>> bar = LineProgress(total=20, desc="epoch 0", unit="batch", file=out)
        >>> for _ in range(20):
        ...     bar.update(1)
        >>> len(out.getvalue().splitlines())
        10
    """

    def __init__(
        self,
        total: Optional[int] = None,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        file: Optional[TextIO] = None,
        disable: bool = False,
        fraction: float = LINE_FRACTION,
        interval_s: float = LINE_INTERVAL_S,
        leave: bool = True,
        **_tqdm_options: Any,
    ) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = initial
        self.initial = initial
        self.disable = disable
        self._file = file
        self._fraction = fraction
        self._interval_s = interval_s
        self._leave = leave
        self._postfix = ""
        self._started = time.perf_counter()
        self._last_time = self._started
        self._last_n = initial
        self._next_mark = self._mark_after(initial)
        self._closed = False

    # -------------------------------------------------------------------------------------- tqdm's interface
    def update(self, n: Union[int, float] = 1) -> None:
        """Adds ``n`` units; prints a line when a 10 % mark was crossed or the interval passed."""
        self.n += n
        if self.disable:
            return
        now = time.perf_counter()
        crossed = self._next_mark is not None and self.n >= self._next_mark
        if crossed or now - self._last_time >= self._interval_s:
            self._print(now)

    def set_postfix(self, ordered_dict: Optional[Dict[str, Any]] = None, refresh: bool = True, **kwargs: Any) -> None:
        """Values shown at the end of the next line, as ``key=value``."""
        items = dict(ordered_dict or {}, **kwargs)
        self._postfix = ", ".join(f"{key}={value}" for key, value in items.items())

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        """Text shown at the end of the next line."""
        self._postfix = s

    def set_description(self, desc: Optional[str] = None, refresh: bool = True) -> None:
        """The prefix of the next lines."""
        self.desc = desc or ""

    def refresh(self) -> None:
        """No-op: lines are printed on progress, not on request (tqdm compatibility)."""

    def close(self) -> None:
        """Prints a last line when progress moved since the previous one (unless ``leave`` is False)."""
        if self._closed:
            return
        self._closed = True
        if self._leave and not self.disable and self.n != self._last_n:
            self._print(time.perf_counter())

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ lines
    def _mark_after(self, n: float) -> Optional[float]:
        """The next progress value at which a line is due (the next multiple of ``fraction * total``)."""
        if not self.total:
            return None
        step = self._fraction * self.total
        return (math.floor(n / step + 1e-9) + 1) * step

    def _print(self, now: float) -> None:
        elapsed = now - self._started
        done = self.n - self.initial
        rate = f"{done / elapsed:,.1f} {self.unit}/s" if elapsed > 0 and done > 0 else f"? {self.unit}/s"
        if self.total:
            where = f"{100.0 * self.n / self.total:3.0f}% {self.n:,}/{self.total:,} {self.unit}"
        else:
            where = f"{self.n:,} {self.unit}"
        line = f"{self.desc}: {where} [{_duration(elapsed)}, {rate}]" if self.desc else f"{where} [{_duration(elapsed)}, {rate}]"
        if self._postfix:
            line += f" {self._postfix}"
        print(line, file=self._file if self._file is not None else sys.stderr, flush=True)
        self._last_time = now
        self._last_n = self.n
        self._next_mark = self._mark_after(self.n)


def progress_bar(
    total: Optional[int] = None,
    desc: str = "",
    unit: str = "it",
    *,
    initial: int = 0,
    file: Optional[TextIO] = None,
    disable: bool = False,
    leave: bool = True,
    **tqdm_options: Any,
) -> Union[tqdm, LineProgress]:
    """A progress bar on a terminal, a :class:`LineProgress` (a line every 10 % or 30 s) anywhere else.

    Args:
        total: units of work.
        desc: label.
        unit: name of one unit.
        initial: units already done.
        file: the stream (stderr by default); whether it is a terminal decides the kind.
        disable: show nothing.
        leave: keep the finished bar on a terminal; elsewhere, print a last line at ``close``.
        **tqdm_options: further tqdm options (``dynamic_ncols``, ...), used on a terminal.

    Returns:
        a ``tqdm`` bar or a :class:`LineProgress`; both take ``update``, ``set_postfix``, ``close``.
    """
    stream = file if file is not None else sys.stderr
    if _is_terminal(stream):
        return tqdm(
            total=total, desc=desc, unit=unit, initial=initial, file=stream, disable=disable, leave=leave,
            **tqdm_options,
        )
    return LineProgress(total=total, desc=desc, unit=unit, initial=initial, file=stream, disable=disable, leave=leave)
