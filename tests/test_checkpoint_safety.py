"""Loading a checkpoint runs no code from it: crafted ``.metadata`` and bytes entries are refused.

Every crafted checkpoint here is made by our own save path and then republished with a manifest that matches the
altered files, so :func:`verify_checkpoint` passes and only the loader stands between the file and the code. Each
attack is first shown to run its payload under stock DCP (``dcp.load`` with the default reader and planner), so the
tests prove the payloads are live.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Dict

import pytest
import torch
import torch.distributed.checkpoint as dcp

from multiembed.data.metadata import file_sha256
from multiembed.training import checkpoint as ckpt
from multiembed.training.distributed import init_distributed


@pytest.fixture(scope="module")
def one_rank():
    return init_distributed("cpu")


class _Payload:
    """Pickles as a call that writes ``marker`` when unpickled by anything that trusts the file."""

    def __init__(self, marker: Path, via: str = "exec") -> None:
        self.marker, self.via = Path(marker), via

    def __reduce__(self):
        if self.via == "system":
            import os

            return (os.system, (f"touch '{self.marker}'",))
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _republish(path: Path) -> None:
    """Rewrites ``manifest.json`` to match the files as they now are (what an attacker would do)."""
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.name != ckpt.MANIFEST)
    manifest["files"] = {
        str(p.relative_to(path)): {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files
    }
    (path / ckpt.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    ckpt.verify_checkpoint(path)


def _state(seed: int) -> Dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 8, generator=g)}, "progress": {"step": torch.tensor(5.0)}}


def _template() -> Dict[str, Any]:
    return {"model": {"w": torch.zeros(64, 8)}, "progress": {"step": torch.tensor(0.0)}}


def _assert_one_line_naming(error: pytest.ExceptionInfo, file: Path) -> str:
    message = str(error.value)
    assert isinstance(error.value, ValueError) and isinstance(error.value, ckpt.CheckpointError)
    assert "\n" not in message and str(file) in message, message
    return message


def _stock_dcp_runs(path: Path, template: Dict[str, Any], marker: Path) -> bool:
    """Whether loading ``path`` with stock DCP writes ``marker`` (then removed): the payload is live."""
    try:
        dcp.load(template, checkpoint_id=str(path))
    except BaseException:  # stock DCP fails after the payload ran (the result is not Metadata, etc.)
        pass
    ran = marker.exists()
    if ran:
        marker.unlink()
    return ran


# ------------------------------------------------------------------------------------------ .metadata route
@pytest.mark.parametrize("via", ["exec", "system"])
def test_a_crafted_metadata_pickle_is_refused_without_running(tmp_path: Path, one_rank, via: str) -> None:
    path = ckpt.save_checkpoint(tmp_path / "run", 1, _state(1), {})
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker, via)))
    _republish(path)
    assert _stock_dcp_runs(path, _template(), marker)

    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_checkpoint(path, _template())
    message = _assert_one_line_naming(error, path / ".metadata")
    assert not marker.exists()
    target = "builtins.exec" if via == "exec" else r"(posix|os)\.system"
    assert re.search(rf"refuses to load class {target}: not a checkpoint metadata class", message), message


def test_a_payload_hidden_inside_real_metadata_is_refused(tmp_path: Path, one_rank) -> None:
    path = ckpt.save_checkpoint(tmp_path / "run", 1, _state(1), {})
    marker = tmp_path / "pwned"
    metadata = ckpt.SafeFileSystemReader(str(path)).read_metadata()
    metadata.planner_data = {"model.w": _Payload(marker)}
    metadata.storage_meta = None
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    _republish(path)
    assert _stock_dcp_runs(path, _template(), marker)

    with pytest.raises(ckpt.CheckpointError, match="refuses to load class builtins.exec") as error:
        ckpt.load_checkpoint(path, _template())
    _assert_one_line_naming(error, path / ".metadata")
    assert not marker.exists()


def test_metadata_pointing_outside_the_checkpoint_is_refused(tmp_path: Path, one_rank) -> None:
    path = ckpt.save_checkpoint(tmp_path / "run", 1, _state(1), {})
    metadata = ckpt.SafeFileSystemReader(str(path)).read_metadata()
    info = next(iter(metadata.storage_data.values()))
    info.relative_path = "../../../etc/passwd"
    metadata.storage_meta = None
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    _republish(path)
    with pytest.raises(ckpt.CheckpointError, match="points outside the checkpoint") as error:
        ckpt.load_checkpoint(path, _template())
    _assert_one_line_naming(error, path / ".metadata")


def test_garbled_metadata_is_one_line(tmp_path: Path, one_rank) -> None:
    path = ckpt.save_checkpoint(tmp_path / "run", 1, _state(1), {})
    raw = (path / ".metadata").read_bytes()
    (path / ".metadata").write_bytes(raw[: len(raw) // 2])
    _republish(path)
    with pytest.raises(ckpt.CheckpointError, match="unreadable checkpoint metadata") as error:
        ckpt.load_checkpoint(path, _template())
    _assert_one_line_naming(error, path / ".metadata")


def test_class_names_with_newlines_stay_on_one_line(tmp_path: Path, one_rank) -> None:
    path = ckpt.save_checkpoint(tmp_path / "run", 1, _state(1), {})
    # protocol-0 GLOBAL needs newline-free names; STACK_GLOBAL (protocol 4) takes any string.
    crafted = b"\x80\x04\x8c\x06evil\nm\x94\x8c\x08na\nme\r\x1b[\x94\x93\x94)R."
    (path / ".metadata").write_bytes(crafted)
    _republish(path)
    with pytest.raises(ckpt.CheckpointError, match="refuses to load class") as error:
        ckpt.load_checkpoint(path, _template())
    _assert_one_line_naming(error, path / ".metadata")


# ---------------------------------------------------------------------------------------------- bytes route
def test_bytes_where_the_state_holds_a_tensor_are_refused(tmp_path: Path, one_rank) -> None:
    marker = tmp_path / "pwned"
    crafted = {"model": {"w": _Payload(marker)}, "progress": {"step": torch.tensor(5.0)}}
    path = ckpt.save_checkpoint(tmp_path / "run", 1, crafted, {})
    assert not marker.exists()  # saving pickles the payload without running it
    assert _stock_dcp_runs(path, _template(), marker)

    template = _template()
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_checkpoint(path, template)
    message = _assert_one_line_naming(error, path / ".metadata")
    assert "refuses model.w: stored as pickled bytes where the model/optimizer state holds a tensor" in message
    assert not marker.exists()
    assert isinstance(template["model"]["w"], torch.Tensor)


def test_harmless_bytes_where_the_state_holds_a_tensor_are_refused_too(tmp_path: Path, one_rank) -> None:
    path = ckpt.save_checkpoint(tmp_path / "run", 1, {"model": {"w": [1, 2, 3]}, "progress": {"step": 1}}, {})
    with pytest.raises(ckpt.CheckpointError, match="refuses model.w: stored as pickled bytes") as error:
        ckpt.load_checkpoint(path, _template())
    _assert_one_line_naming(error, path / ".metadata")


def test_a_malicious_bytes_value_is_refused_without_running(tmp_path: Path, one_rank) -> None:
    marker = tmp_path / "pwned"
    crafted = _state(1)
    crafted["extra"] = {"note": _Payload(marker)}
    path = ckpt.save_checkpoint(tmp_path / "run", 1, crafted, {})
    template = _template()
    template["extra"] = {"note": "a string"}
    assert _stock_dcp_runs(path, {**_template(), "extra": {"note": "a string"}}, marker)

    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_checkpoint(path, template)
    message = _assert_one_line_naming(error, path)
    assert re.search(r"/__0_0\.distcp: value extra\.note: refuses to load class (builtins\.)?exec: not plain", message)
    assert not marker.exists()


def test_a_checkpoint_that_does_not_fit_the_state_is_one_line(tmp_path: Path, one_rank) -> None:
    path = ckpt.save_checkpoint(tmp_path / "run", 1, _state(1), {})
    template = {"model": {"w": torch.zeros(32, 8)}, "progress": {"step": torch.tensor(0.0)}}
    with pytest.raises(ckpt.CheckpointError, match="cannot load checkpoint .*Size mismatch") as error:
        ckpt.load_checkpoint(path, template)
    _assert_one_line_naming(error, path)


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip_is_bit_exact_with_plain_bytes_values(tmp_path: Path, one_rank) -> None:
    g = torch.Generator().manual_seed(7)
    weights = torch.randn(33, 5, generator=g)
    weights[0, 0] = float("nan")
    weights[0, 1] = float("-inf")
    weights[0, 2] = -0.0
    saved = {
        "model": {
            "w": weights,
            "half": torch.randn(7, generator=g).to(torch.bfloat16),
            "ids": torch.randint(-(2**40), 2**40, (9,), generator=g),
            "mask": torch.rand(4, 4, generator=g) > 0.5,
        },
        "progress": {"step": torch.tensor(11, dtype=torch.int64)},
        "extra": {
            "name": "dcnv2-me-2x", "n": 3, "lrs": [0.1, 1e-3], "pair": (1, "b"), "none": None, "t": torch.ones(2)
        },
        "rank0": {"rng": {"cpu": torch.get_rng_state()}},
    }
    path = ckpt.save_checkpoint(tmp_path / "run", 4, saved, {"epoch": 1})
    ckpt.verify_checkpoint(path)
    loaded = {
        "model": {k: torch.zeros_like(v) for k, v in saved["model"].items()},
        "progress": {"step": torch.tensor(0, dtype=torch.int64)},
        "extra": {"name": "", "n": 0, "lrs": [], "pair": (), "none": 1, "t": torch.zeros(2)},
        "rank0": {"rng": {"cpu": torch.zeros_like(torch.get_rng_state())}},
    }
    ckpt.load_checkpoint(path, loaded)
    for key, value in saved["model"].items():
        got = loaded["model"][key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert torch.equal(got.view(torch.uint8), value.view(torch.uint8)), key
    assert int(loaded["progress"]["step"]) == 11
    assert torch.equal(loaded["rank0"]["rng"]["cpu"], saved["rank0"]["rng"]["cpu"])
    extra = loaded["extra"]
    assert {k: extra[k] for k in ("name", "n", "lrs", "pair", "none")} == {
        "name": "dcnv2-me-2x", "n": 3, "lrs": [0.1, 1e-3], "pair": (1, "b"), "none": None
    }
    assert torch.equal(extra["t"], torch.ones(2))


def test_the_allowlist_is_what_dcp_metadata_needs(tmp_path: Path, one_rank) -> None:
    """Every class a real checkpoint's ``.metadata`` names is admitted, and nothing it does not name but torch
    dtypes (so a changed torch that pickles something new fails here, not in a user's evaluate)."""
    path = ckpt.save_checkpoint(tmp_path / "run", 1, _state(1), {})
    named = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            named.add((module, name))
            return super().find_class(module, name)

    with open(path / ".metadata", "rb") as f:
        Recorder(f).load()
    allowed = {(m, n) for m, names in ckpt._METADATA_ALLOWLIST.items() for n in names}
    dtypes = {(m, n) for m, n in named if m == "torch" and n in ckpt._TORCH_DTYPES}
    assert named - dtypes <= allowed, named - dtypes - allowed
    ckpt.SafeFileSystemReader(str(path)).read_metadata()


def test_the_allowlist_is_exactly_the_metadata_classes() -> None:
    """Pinned: a class added to the allowlist must be added here too, on purpose."""
    assert ckpt._METADATA_ALLOWLIST == {
        "torch.distributed.checkpoint.metadata": {
            "Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
            "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING",
        },
        "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
        "torch": {"Size"},
        "torch.serialization": {"_get_layout"},
        "pathlib": {"PosixPath", "PurePosixPath"},
    }
    assert all(isinstance(v, torch.dtype) for v in ckpt._TORCH_DTYPES.values())


def _global(module: str, name: str) -> bytes:
    return f"c{module}\n{name}\n".encode()


def _text(value: str) -> bytes:
    return b"V" + value.encode("raw_unicode_escape") + b"\n"


def _call(func: bytes, *args: bytes) -> bytes:
    """Pickle opcodes (protocol 0) that call ``func`` with ``args`` (each already opcodes) when unpickled."""
    return func + b"(" + b"".join(args) + b"tR"


def _attack(route: str, marker: Path) -> bytes:
    """A hand-written pickle that touches ``marker`` through ``route`` when a trusting unpickler loads it."""
    touch = _text(f"touch '{marker}'")
    write = _text(f"open({str(marker)!r}, 'w').write('pwned')")
    os_system = _call(_global("builtins", "getattr"), _call(_global("builtins", "__import__"), _text("os")),
                      _text("system"))
    body = {
        "eval": _call(_global("builtins", "eval"), write),
        "exec": _call(_global("builtins", "exec"), write),
        "getattr": _call(os_system, touch),
        "os.system": _call(_global("os", "system"), touch),
        "subprocess": _call(_global("subprocess", "getoutput"), touch),
        # importlib.import_module("os") first (memo 0), then getattr(<memo 0>, "system")(touch).
        "importlib": _call(_global("importlib", "import_module"), _text("os")) + b"p0\n0"
        + _call(_call(_global("builtins", "getattr"), b"g0\n", _text("system")), touch),
        # A __reduce__ chain: a metadata class built from the result of a call.
        "reduce-chain": _call(_global("torch.distributed.checkpoint.metadata", "StorageMeta"),
                              _call(_global("builtins", "eval"), write)),
    }[route]
    return body + b"."


@pytest.mark.parametrize(
    "route, refused",
    [("eval", "builtins.eval"), ("exec", "builtins.exec"), ("getattr", "builtins.getattr"),
     ("os.system", "os.system"), ("subprocess", "subprocess.getoutput"), ("importlib", "importlib.import_module"),
     ("reduce-chain", "builtins.eval")],
)
def test_code_through_any_route_is_refused_without_running(
    tmp_path: Path, one_rank, route: str, refused: str
) -> None:
    marker = tmp_path / "pwned"
    payload = _attack(route, marker)
    try:
        pickle.loads(payload)  # a trusting unpickler runs it: the payload is live
    except Exception:
        pass
    assert marker.exists()
    marker.unlink()

    path = ckpt.save_checkpoint(tmp_path / "run", 1, _state(1), {})
    (path / ".metadata").write_bytes(payload)
    _republish(path)
    with pytest.raises(ckpt.CheckpointError) as error:
        ckpt.load_checkpoint(path, _template())
    message = _assert_one_line_naming(error, path / ".metadata")
    assert f"refuses to load class {refused}: not a checkpoint metadata class" in message, message
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------ two ranks
def _two_rank_worker(rank: int, world_size: int, root: str) -> None:
    import torch.distributed as dist

    root_dir = Path(root)
    marker = root_dir / "pwned"
    init_distributed("cpu")
    crafted = {
        "model": {"w": _Payload(marker)},
        "progress": {"step": torch.tensor(5.0)},
        f"rank{rank}": {"r": torch.tensor(rank)},
    }
    path = ckpt.save_checkpoint(root_dir / "run", 1, crafted, {})
    messages = []
    for route in ("bytes", "metadata"):
        if route == "metadata" and rank == 0:
            (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
            _republish(path)
        dist.barrier()
        template = {**_template(), f"rank{rank}": {"r": torch.tensor(-1)}}
        try:
            ckpt.load_checkpoint(path, template)
            messages.append("loaded")
        except ckpt.CheckpointError as e:
            messages.append(str(e))
    (root_dir / f"rank{rank}.json").write_text(json.dumps(messages))
    dist.barrier()
    dist.destroy_process_group()


def test_every_rank_refuses_together(tmp_path: Path) -> None:
    from dist_utils import run_ranks

    run_ranks(_two_rank_worker, 2, str(tmp_path))
    per_rank = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert per_rank[0] == per_rank[1], per_rank
    bytes_refusal, metadata_refusal = per_rank[0]
    assert "refuses model.w: stored as pickled bytes" in bytes_refusal and "\n" not in bytes_refusal
    assert "/.metadata: refuses to load class builtins.exec" in metadata_refusal and "\n" not in metadata_refusal
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------------ CLI
def test_evaluate_of_a_crafted_checkpoint_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    from multiembed.cli import main as cli_main
    from multiembed.training.run_dir import RunDir

    data, run = tmp_path / "data", tmp_path / "run"
    synth = ["synth", "--rows", "1500", "--out", str(data), "--seed", "2", "--scale", "0.001", "--no-progress"]
    assert cli_main(synth) == 0
    assert cli_main(
        ["train", "--data", str(data), "--out", str(run), "--model", "dcnv2-me-2x", "--batch-size", "256",
         "--hidden", "16", "--epochs", "1", "--device", "cpu", "--no-progress"]
    ) == 0
    path = RunDir(run).best_checkpoint()
    marker = tmp_path / "pwned"
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _republish(path)
    capsys.readouterr()
    assert cli_main(["evaluate", str(run), "--data", str(data), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("multiembed evaluate: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert f"{path / '.metadata'}: refuses to load class builtins.exec" in errors[0]
    assert not marker.exists()
