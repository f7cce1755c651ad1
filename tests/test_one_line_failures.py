"""Every failure a user can cause ends in one line and an exit status, never a traceback or a C++ abort.

A full disk is a small tmpfs of its own, mounted in a user and mount namespace (``unshare -Urm``, no privileges
needed; the tests skip where the kernel refuses it): during a checkpoint (the temporary directory removed, the last
good checkpoint named), an export (torch.export.save aborted the process) and a predict, the failure is one line
naming the path and the free bytes, and nothing is left behind. An exception nobody named is one line plus how to
see its traceback (status 1); the torchx component's refusal of ``--overwrite True --resume True`` is one line.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_torchx import COMPONENTS, VENV_BIN, torchx_env
from test_write_safety import exported  # noqa: F401  (the fixture: a tiny run and its export)

from multiembed.cli import main as cli_main

def _small_disk_run(mount: Path, size_kb: int, command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Runs the shell ``command`` with a ``size_kb`` KiB tmpfs mounted on ``mount`` (created), in a user and mount
    namespace of its own; skips the test where unprivileged namespaces are not allowed."""
    mount.mkdir(parents=True, exist_ok=True)
    script = f"mount -t tmpfs -o size={size_kb}k tmpfs '{mount}' || exit 97; {command}"
    result = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True, text=True,
                            timeout=timeout, env=torchx_env())
    if result.returncode == 97 or "unshare failed" in result.stderr or "Operation not permitted" in result.stderr:
        pytest.skip(f"no unprivileged tmpfs here (unshare -Urm): {result.stderr.strip()[:200]}")
    return result


def _one_line(result: subprocess.CompletedProcess, *words: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr and "terminate called" not in result.stderr, \
        result.stderr[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def _cli(*args: str) -> str:
    return " ".join([f"'{sys.executable}'", "-m", "multiembed.cli", *(f"'{a}'" for a in args)])


def test_a_full_disk_during_export_is_one_line_and_leaves_nothing(exported, tmp_path) -> None:
    _, run, _ = exported
    disk = tmp_path / "disk"
    result = _small_disk_run(disk, 48, _cli("export", str(run), "--out", str(disk / "art"), "--quantize", "none"))
    assert result.returncode == 2, result.stderr[-3000:]
    line = _one_line(result, f"{disk / 'art'}: not written", "No space left on device", "bytes free")
    assert "its temporary directory is removed" in line
    assert not disk.exists() or not any(disk.iterdir())


def test_a_full_disk_during_predict_is_one_line_and_leaves_nothing(exported, tmp_path) -> None:
    data, _, artifact = exported
    disk = tmp_path / "disk"
    out = disk / "p.parquet"
    # The tmpfs is filled first, so that the predictions cannot fit.
    result = _small_disk_run(disk, 16, f"head -c 12288 /dev/zero > '{disk}/filler'; "
                             + _cli("predict", str(artifact), "--data", str(data), "--out", str(out)))
    assert result.returncode == 2, result.stderr[-3000:]
    _one_line(result, f"{out}: cannot write (No space left on device)", "bytes free")
    assert not out.exists() and not [p for p in tmp_path.rglob(".p.parquet.*")]


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one_and_names_it(tmp_path) -> None:
    disk = tmp_path / "disk"
    code = (
        "import torch\n"
        "from pathlib import Path\n"
        "from multiembed.training import checkpoint as ckpt\n"
        "from multiembed.training.distributed import init_distributed\n"
        "init_distributed('cpu')\n"
        f"run = Path({str(disk / 'run')!r})\n"
        "ckpt.save_checkpoint(run, 1, {'w': torch.zeros(16, 16)}, {})\n"
        "try:\n"
        "    ckpt.save_checkpoint(run, 2, {'w': torch.zeros(1024, 1024)}, {})\n"
        "except ckpt.CheckpointError as e:\n"
        "    import sys; print('error: ' + str(e), file=sys.stderr); sys.exit(2)\n"
    )
    result = _small_disk_run(disk, 512, f"'{sys.executable}' -c \"{code}\"")
    assert result.returncode == 2, result.stderr[-3000:]
    kept = disk / "run" / "checkpoints" / "step-00000001"
    line = _one_line(result, str(disk / "run" / "checkpoints" / ".tmp-step-00000002"), "bytes free",
                     f"the last good checkpoint is kept: {kept}")
    assert "\n" not in line


def test_an_unexpected_exception_is_one_line_with_status_1(monkeypatch, capsys) -> None:
    from multiembed.cli import inspect as inspect_cli

    def crash(args) -> int:
        raise RuntimeError("something nobody named\nsecond line")

    monkeypatch.setattr(inspect_cli, "run", crash)
    monkeypatch.delenv("MULTIEMBED_DEBUG", raising=False)
    assert cli_main(["inspect", "anywhere"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["multiembed inspect: error: RuntimeError: something nobody named "
                   "(MULTIEMBED_DEBUG=1 shows the traceback)"]
    monkeypatch.setenv("MULTIEMBED_DEBUG", "1")
    with pytest.raises(RuntimeError, match="something nobody named"):
        cli_main(["inspect", "anywhere"])


def test_the_torchx_component_refuses_overwrite_with_resume_in_one_line(tmp_path) -> None:
    if not (VENV_BIN / "torchx").exists() and shutil.which("torchx") is None:
        pytest.skip("torchx is not installed")
    command = [str(VENV_BIN / "torchx"), "run", "-s", "local_cwd", f"{COMPONENTS}:train", "--data", str(tmp_path),
               "--out", str(tmp_path / "run"), "--overwrite", "True", "--resume", "True"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=torchx_env(), cwd=tmp_path)
    assert result.returncode == 2
    assert (result.stdout + result.stderr).strip().splitlines() == [
        "multiembed: error: overwrite cannot be combined with resume or max_restarts (a restart would erase the run)"
    ]


def test_a_value_of_the_wrong_type_in_a_runs_config_or_a_datasets_metadata_is_named(exported, tmp_path, capsys) -> None:
    """A hand-edited ``config.json`` or ``metadata.json`` holding a value of the wrong type is one line naming the
    file and the entry, status 2, not an unexpected error."""
    import json

    from test_write_safety import _refused

    data, finished, _ = exported
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    config = json.loads((run / "config.json").read_text())
    config["options"]["hidden"] = "wide"
    (run / "config.json").write_text(json.dumps(config))
    _refused(capsys, ["evaluate", str(run), "--data", str(data), "--device", "cpu"], "config.json",
             "options.hidden", "expected int")
    for entry, value, named in (("rows", "many", "splits.train.rows"), ("rows_read", [1], "rows_read"),
                                ("options", "x", "options")):
        copy = tmp_path / f"data-{entry}"
        shutil.copytree(data, copy)
        meta = json.loads((copy / "metadata.json").read_text())
        if entry == "rows":
            meta["splits"]["train"]["rows"] = value
        else:
            meta[entry] = value
        (copy / "metadata.json").write_text(json.dumps(meta))
        _refused(capsys, ["inspect", str(copy)], "metadata.json", named)
