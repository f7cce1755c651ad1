"""A worker's one-line error, recorded for torchrun so that a launched job ends with it (see
:mod:`multiembed.cli.launch`).

A ``multiembed`` command refuses bad options or input with one line (``multiembed train: error: ...``, exit status
2). :func:`report_error` (called where ``multiembed`` prints such a line) also records it in torchrun's per-worker
reply file (``TORCHELASTIC_ERROR_FILE``, the file ``torch.distributed.elastic``'s ``@record`` writes) and leaves
printing it to the launcher when one of ours started the job; :func:`one_line_error` reads it back from a reply
file (the launcher, and ``torchx_components.py`` from torchx's status). Imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Optional

# Exit status of a refused command or component (bad options or input): one line printed, no traceback.
EXIT_USER_ERROR = 2
# Set by the launcher for its workers: they leave printing their one-line error to it.
LAUNCHED_ENV = "MULTIEMBED_LAUNCHED"
# Key in a reply file's ``extraInfo`` marking the message as a multiembed one-line error.
ONE_LINE_KEY = "multiembed_one_line_error"


def report_error(line: str, exit_code: int) -> None:
    """Reports a worker's one-line error: recorded in the reply file, printed unless the launcher prints it.

    Args:
        line: the whole error, one line (``multiembed CMD: error: ...``).
        exit_code: the status the worker exits with.
    """
    recorded = record_error(line, exit_code)
    if not (recorded and os.environ.get(LAUNCHED_ENV)):
        print(line, file=sys.stderr, flush=True)


def record_error(line: str, exit_code: int) -> bool:
    """Writes ``line`` to ``TORCHELASTIC_ERROR_FILE`` in the format of torch's ``ErrorHandler``; False when there is
    no such file (not under torchrun) or it cannot be written."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return False
    data = {
        "message": {
            "message": line,
            "extraInfo": {"py_callstack": "", "timestamp": str(int(time.time())), ONE_LINE_KEY: True},
            "errorCode": exit_code,
        }
    }
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f)
    except OSError:
        return False
    return True


def one_line_error(reply: Any) -> Optional[str]:
    """The one-line error in a reply file's content (a dict, or its JSON text); None when it holds another error.

    Example::

        >>> one_line_error({"message": {"message": "multiembed train: error: x",
        ...                             "extraInfo": {"multiembed_one_line_error": True}}})
        'multiembed train: error: x'
        >>> one_line_error({"message": "Signal 9 (SIGKILL) received by PID 12"}) is None
        True
    """
    message = _one_line_message(reply)
    if message is None:
        return None
    line = message.get("message")
    return line if isinstance(line, str) and line and "\n" not in line else None


def recorded_exit_code(reply: Any) -> Optional[int]:
    """The exit status a worker recorded with its one-line error (None without one): the job's status even when
    torchrun stopped that worker with a signal after it recorded the error and before it exited.

    Example::

        >>> recorded_exit_code({"message": {"message": "multiembed train: error: x", "errorCode": 3,
        ...                                 "extraInfo": {"multiembed_one_line_error": True}}})
        3
    """
    message = _one_line_message(reply)
    code = message.get("errorCode") if message is not None else None
    return code if isinstance(code, int) and not isinstance(code, bool) and code > 0 else None


def _one_line_message(reply: Any) -> Optional[dict]:
    """The ``message`` object of a reply file written by :func:`report_error`, else None."""
    if isinstance(reply, str):
        try:
            reply = json.loads(reply)
        except ValueError:
            return None
    message = reply.get("message") if isinstance(reply, dict) else None
    if not isinstance(message, dict) or not (message.get("extraInfo") or {}).get(ONE_LINE_KEY):
        return None
    return message
