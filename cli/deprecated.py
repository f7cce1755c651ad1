"""Old option spellings that still work: each use prints one ``multiembed CMD: warning: ...`` line.

The line is a :class:`DeprecatedOption` warning (a ``FutureWarning``, shown by default), formatted on one line by
:func:`one_line_warnings`, which :func:`multiembed.cli.main` installs. Imports nothing heavy.

Example::

    >>> import argparse, warnings
    >>> p = argparse.ArgumentParser(prog="multiembed plan")
    >>> _ = p.add_argument("--sharding", default="auto")
    >>> add_deprecated_alias(p, "--strategy", "--sharding")
    >>> with warnings.catch_warnings(record=True) as caught:
    ...     warnings.simplefilter("always")
    ...     p.parse_args(["--strategy", "row_wise"]).sharding
    'row_wise'
    >>> str(caught[0].message)
    'multiembed plan: warning: --strategy is deprecated; use --sharding (same values)'
"""

from __future__ import annotations

import argparse
import warnings
from typing import Any, Callable, Optional, Sequence, Union


class DeprecatedOption(FutureWarning):
    """An option was given by a spelling that will go away."""


class _Alias(argparse.Action):
    """Stores into the new option's destination and warns once per use."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Union[str, Sequence[Any], None],
        option_string: Optional[str] = None,
    ) -> None:
        warnings.warn(
            f"{parser.prog}: warning: {option_string} is deprecated; use {self.new} (same values)",
            DeprecatedOption, stacklevel=2,
        )
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: str, **kwargs: Any) -> None:
    """Adds ``old`` as a hidden spelling of the already added option ``new``.

    Args:
        parser: the parser holding ``new``.
        old: the old spelling (``--strategy``).
        new: the option it stands for (``--sharding``), whose destination, type and choices it shares.
        **kwargs: overrides of what is copied from ``new``.

    Raises:
        ValueError: ``new`` is not an option of ``parser``.
    """
    target = next((a for a in parser._actions if new in a.option_strings), None)
    if target is None:
        raise ValueError(f"{parser.prog}: no option {new} to alias as {old}")
    options = {"type": target.type, "choices": target.choices, "metavar": target.metavar, **kwargs}
    parser.add_argument(old, dest=target.dest, action=_Alias, new=new, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **options)


def one_line_warnings(formatter: Callable[..., str]) -> Callable[..., str]:
    """``warnings.formatwarning`` that prints a :class:`DeprecatedOption` as its message alone, other warnings
    through ``formatter``."""
    if getattr(formatter, "one_line", False):
        return formatter

    def format_warning(message: Any, category: Any, *args: Any, **kwargs: Any) -> str:
        if isinstance(category, type) and issubclass(category, DeprecatedOption):
            return f"{message}\n"
        return formatter(message, category, *args, **kwargs)

    format_warning.one_line = True  # type: ignore[attr-defined]
    return format_warning
