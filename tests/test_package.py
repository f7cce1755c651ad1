"""The install itself: namespace layout, console command, version guard."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from multiembed.runtime import stack


def test_modules_import_through_the_multiembed_namespace() -> None:
    import multiembed.analysis
    import multiembed.data
    import multiembed.models
    import multiembed.sharding
    import multiembed.training

    for module in (multiembed.data, multiembed.models, multiembed.sharding, multiembed.training, multiembed.analysis):
        assert module.__name__.startswith("multiembed.")


def test_console_command_prints_help() -> None:
    command = str(Path(sys.executable).parent / "multiembed")
    out = subprocess.run([command, "--help"], capture_output=True, text=True, check=True).stdout
    assert "usage: multiembed" in out


def test_installed_stack_is_supported() -> None:
    stack.require_torchrec_stack()


@pytest.mark.parametrize(
    "versions, needle",
    [
        ({"torch": "2.14.1", "fbgemm_gpu": "1.8.0", "torchrec": "1.8.0"}, "fbgemm_gpu 1.8.0"),
        ({"torch": "2.13.0+cpu", "fbgemm_gpu": "1.8.0", "torchrec": "1.9.2"}, "torchrec 1.9.2"),
        ({"torch": "2.14.1", "fbgemm_gpu": "1.9.0", "torchrec": "1.8.0"}, "torchrec 1.8.0"),
        ({"torch": "2.13.0", "fbgemm_gpu": None, "torchrec": "1.8.0"}, "missing fbgemm_gpu"),
        ({"torch": "2.15.0", "fbgemm_gpu": "1.9.0", "torchrec": "1.9.2"}, "torch 2.15.0"),
        ({"torch": "2.9.0", "fbgemm_gpu": "1.4.0", "torchrec": "1.3.0"}, "torch 2.9.0"),
    ],
)
def test_mismatched_stack_names_versions_and_every_supported_triple(versions, needle) -> None:
    with pytest.raises(stack.StackError) as err:
        stack.check_versions(versions)
    message = str(err.value)
    assert needle in message
    for triple in (
        "torch 2.13.x + fbgemm-gpu(-cpu) 1.8.0 + torchrec 1.8.0",
        "torch 2.14.x + fbgemm-gpu(-cpu) 1.9.0 + torchrec 1.9.2",
        "torch 2.11.x + fbgemm-gpu(-cpu) 1.6.0 + torchrec 1.6.1",
    ):
        assert triple in message
    assert "make venv STACK=cpu-2.14" in message and "\n" not in message


@pytest.mark.parametrize(
    "versions",
    [
        {"torch": "2.13.0+cpu", "fbgemm_gpu": "1.8.0", "torchrec": "1.8.0"},
        {"torch": "2.14.1", "fbgemm_gpu": "1.9.0", "torchrec": "1.9.2"},
        {"torch": "2.14.0+cu130", "fbgemm_gpu": "1.9.0", "torchrec": "1.9.2"},
        {"torch": "2.11.0+cu130", "fbgemm_gpu": "1.6.0", "torchrec": "1.6.1"},
    ],
)
def test_each_supported_stack_passes(versions) -> None:
    stack.check_versions(versions)


def test_private_api_error_names_installed_and_supported_stacks() -> None:
    error = stack.private_api_error("torchrec.some._private", ImportError("cannot import name '_private'"))
    assert "torchrec.some._private" in str(error) and "_private'" in str(error)
    assert stack.describe_installed() in str(error) and stack.SUPPORTED in str(error)


def test_requirements_pin_one_supported_triple_each() -> None:
    """Every requirements file pins an exact triple that the version check accepts, with the fbgemm alias package of
    the same version on CPU stacks (so pip never pulls the CUDA fbgemm-gpu beside fbgemm-gpu-cpu)."""
    root = Path(__file__).resolve().parents[1] / "requirements"
    files = sorted(root.glob("*.txt"))
    assert {f.stem for f in files} == {"cpu", "cpu-2.14", "gpu"}
    for path in files:
        pins = dict(
            line.split("==") for line in path.read_text().splitlines() if "==" in line and not line.startswith("#")
        )
        fbgemm = pins.get("fbgemm-gpu-cpu") or pins["fbgemm-gpu"]
        stack.check_versions({"torch": pins["torch"], "fbgemm_gpu": fbgemm, "torchrec": pins["torchrec"]})
        if "fbgemm-gpu-cpu" in pins:
            alias = f"./requirements/fbgemm-gpu-cpu-alias-{fbgemm.rsplit('.', 1)[0]}"
            assert alias in path.read_text().splitlines(), path.name
            alias_project = (root.parent / alias / "pyproject.toml").read_text()
            assert f'version = "{fbgemm}"' in alias_project and f'"fbgemm-gpu-cpu=={fbgemm}"' in alias_project


def test_data_package_imports_without_torch() -> None:
    code = (
        "import sys, multiembed.data, multiembed.data.metadata, multiembed.cli;"
        "assert 'torch' not in sys.modules and 'torchrec' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_atomic_write_publishes_with_the_default_file_mode(tmp_path) -> None:
    import os

    from multiembed.data.metadata import atomic_write_text

    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        os.umask(umask)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "f.json").read_text() == "{}"
