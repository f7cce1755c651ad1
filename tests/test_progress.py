"""Units of the first-run output: progress lines off a terminal (training/progress.py), the silenced third-party
warnings (training/quiet.py) and the worker's one-line error recorded for torchrun (cli/errors.py)."""

from __future__ import annotations

import io
import json
import logging
import warnings
from pathlib import Path

import pytest
from tqdm import tqdm

from multiembed.cli.errors import LAUNCHED_ENV, one_line_error, report_error
from multiembed.training import progress as progress_module
from multiembed.training.progress import LineProgress, progress_bar
from multiembed.training.quiet import silence_known_warnings


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_tqdm_bar_and_a_log_gets_lines() -> None:
    with progress_bar(total=3, file=_Terminal()) as bar:
        assert isinstance(bar, tqdm)
    with progress_bar(total=3, file=io.StringIO()) as bar:
        assert isinstance(bar, LineProgress)


def test_lines_every_tenth_of_the_run_with_postfix() -> None:
    out = io.StringIO()
    with progress_bar(total=1000, desc="epoch 0", unit="step", file=out) as bar:
        for _ in range(1000):
            bar.update(1)
            bar.set_postfix(loss="0.5000")
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0].startswith("epoch 0:  10% 100/1,000 step") and lines[-1].startswith("epoch 0: 100% 1,000/1,000")
    assert lines[-1].endswith("loss=0.5000")


def test_a_segment_of_a_longer_run_counts_from_its_start_and_leaves_no_closing_line() -> None:
    out = io.StringIO()
    # Steps 36..49 of 100: the 40 % mark only; leave=False prints nothing more at close.
    with progress_bar(total=100, initial=35, desc="epoch 1", file=out, leave=False) as bar:
        for _ in range(14):
            bar.update(1)
    assert [line.split(" [")[0] for line in out.getvalue().splitlines()] == ["epoch 1:  40% 40/100 it"]


def test_a_line_every_interval_without_a_total(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 10.0, 31.0, 40.0, 62.0])  # construction, then one reading per update
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: next(clock))
    out = io.StringIO()
    bar = LineProgress(total=None, desc="rows", file=out)
    for _ in range(4):
        bar.update(1)
    bar.close()
    assert [line.split(" [")[0] for line in out.getvalue().splitlines()] == ["rows: 2 it", "rows: 4 it"]


def test_disabled_progress_prints_nothing() -> None:
    out = io.StringIO()
    with progress_bar(total=10, file=out, disable=True) as bar:
        for _ in range(10):
            bar.update(1)
    assert out.getvalue() == ""


def test_known_third_party_warnings_are_silenced_and_ours_are_not() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        silence_known_warnings()
        silence_known_warnings()  # idempotent
        warnings.warn_explicit("`broadcast_buffers` is deprecated. Use `forward_sync_buffers` instead.",
                               FutureWarning, "embeddingbag.py", 1, module="torchrec.distributed.embeddingbag")
        warnings.warn_explicit("Please use DTensor instead and we are deprecating ShardedTensor.",
                               FutureWarning, "default_planner.py", 1, module="torch.distributed.checkpoint.default_planner")
        # The same text from our own code still shows: filters match the issuing module too.
        warnings.warn_explicit("Please use DTensor instead and we are deprecating ShardedTensor.",
                               FutureWarning, "loader.py", 1, module="multiembed.data.loader")
    assert [str(w.message)[:10] for w in caught] == ["Please use"]
    assert caught[0].filename == "loader.py"


def test_known_third_party_log_records_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    silence_known_warnings()
    with caplog.at_level(logging.WARNING):
        logging.getLogger("torchrec.distributed.utils").warning("Sharding Type is data_parallel, caching params will be ignored")
        logging.getLogger("torchrec.distributed.utils").warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_the_one_line_error_is_recorded_for_torchrun(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    reply = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(reply))
    monkeypatch.delenv(LAUNCHED_ENV, raising=False)
    report_error("multiembed train: error: x", 2)
    assert capsys.readouterr().err == "multiembed train: error: x\n"
    data = json.loads(reply.read_text())
    assert one_line_error(data) == "multiembed train: error: x" and data["message"]["errorCode"] == 2
    # Under our launcher the worker only records it (the launcher prints it once for the job).
    monkeypatch.setenv(LAUNCHED_ENV, "1")
    report_error("multiembed train: error: y", 2)
    assert capsys.readouterr().err == "" and one_line_error(reply.read_text()) == "multiembed train: error: y"
    # No reply file (not under torchrun): printed even when the variable is set.
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    report_error("multiembed train: error: z", 2)
    assert capsys.readouterr().err == "multiembed train: error: z\n"
