"""The dense program compiled ahead of time (AOTInductor) on the serving machine, cached per program and machine.

:func:`compiled_dense` turns a checked, loaded ``ExportedProgram`` (:func:`~multiembed.serving.artifact.load_artifact`
runs every artifact check first) into a shared library with ``torch._inductor.aoti_compile_and_package`` and the
machine's C++ compiler, and keeps it in a cache directory::

    CACHE/                      mode 0700, owned by the user; refused when group or others can write it
      <digest>/                 one entry per key (the digest is the SHA-256 of the key's JSON)
        key.json                the key, the package's size and SHA-256 (written before the entry is published)
        model.pt2               the AOTInductor package (the compiled library and the program's weights)
      .tmp-<digest>-<random>/   a compile in progress (never loaded; renamed to <digest>/ once complete)

The key (:class:`CompileKey`) is the dense program's SHA-256 (the manifest's, which the artifact checks verified
against the file), the torch version, torch's CPU capability and the C++ compiler's version: a library is reused
only for the same program, built by the same torch and compiler for the same instruction set. An entry whose
recorded key or package checksum does not match is rebuilt, never loaded; an entry appears only by renaming a
finished compile into place, so a killed compile leaves a ``.tmp-`` directory that nothing loads (removed by the
next compile once it is a day old).

The cache location is ``--compile-cache`` / ``cache_dir``, else ``$MULTIEMBED_COMPILE_CACHE``, else
``$XDG_CACHE_HOME/multiembed/compiled``, else ``~/.cache/multiembed/compiled``. Inductor's own cache of generated
kernels is pointed into the compile's temporary directory, so no code from a shared ``/tmp/torchinductor_$USER``
enters a library. No compiled library is ever read from an artifact: the only libraries loaded are the ones this
module built into a directory only the user can write.

Compiling needs a C++ compiler (``$CXX`` or ``g++``); without one :func:`find_compiler` refuses in one line. Nothing
falls back to the interpreted program silently: a failed compile raises :class:`CompileError`.

Example::

    >>> from multiembed.serving import load_artifact
    >>> artifact = load_artifact("runs/me4x.int8", compile=True)  # doctest: +SKIP
    >>> probs = artifact.predict(dense_features, sparse_features)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from multiembed.data.metadata import atomic_write_text, file_sha256
from multiembed.models.precision import cpu_capability

CACHE_ENV = "MULTIEMBED_COMPILE_CACHE"
CACHE_SUBDIR = Path("multiembed") / "compiled"
KEY_FILE = "key.json"
PACKAGE_FILE = "model.pt2"
COMPILED_FORMAT = "multiembed-compiled-v1"
_TMP_PREFIX = ".tmp-"
# Group and others may neither write the cache directory nor an entry (they could plant a library to load).
_FOREIGN_WRITE = stat.S_IWGRP | stat.S_IWOTH
# A ``.tmp-`` directory older than this is a compile that was killed (a compile takes seconds to minutes): removed.
STALE_TMP_SECONDS = 24 * 3600
# The batch of the example inputs the compile traces with (the program's batch dimension stays dynamic).
_EXAMPLE_BATCH = 2


class CompileError(ValueError):
    """The dense program cannot be compiled or its cache cannot be used safely (one line, naming the path)."""


@dataclasses.dataclass(frozen=True)
class CompileKey:
    """What a compiled library depends on.

    Attributes:
        program_sha256: SHA-256 of the artifact's ``dense.pt2``.
        torch: ``torch.__version__``.
        cpu_capability: ``torch.backends.cpu.get_cpu_capability()`` (e.g. ``AVX512``, ``AVX2``, ``DEFAULT``).
        compiler: the C++ compiler's path.
        compiler_version: the compiler's own version text (``-v``).
    """

    program_sha256: str
    torch: str
    cpu_capability: str
    compiler: str
    compiler_version: str

    def to_json(self) -> Dict[str, str]:
        return {"format": COMPILED_FORMAT, **dataclasses.asdict(self)}

    @property
    def digest(self) -> str:
        """SHA-256 of the key's canonical JSON: the entry's directory name."""
        text = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


class CompiledProgram(nn.Module):
    """The compiled dense program: ``(embeddings [B, K, F, d], dense_features [B, num_dense]) -> logits [B]``.

    The library checks neither the inputs' dtype nor that their batch sizes agree (it would read past a shorter
    input), so every call checks both inputs against ``input_shapes`` first.

    Args:
        runner: the loaded AOTInductor package (``torch._inductor.aoti_load_package``).
        input_shapes: ``{"embeddings": (K, F, d), "dense_features": (num_dense,)}``, the sizes after the batch.
        entry: the cache entry it was loaded from.
        built: True when this call compiled it, False when it came from the cache.
        compile_seconds: wall time of the compile (0 when it came from the cache).
    """

    def __init__(self, runner: Any, input_shapes: Mapping[str, Tuple[int, ...]], entry: Path, built: bool,
                 compile_seconds: float) -> None:
        super().__init__()
        if list(input_shapes) != ["embeddings", "dense_features"]:
            raise ValueError(f"input_shapes must name embeddings and dense_features, got {list(input_shapes)}")
        self.runner = runner
        self.input_shapes = {name: tuple(sizes) for name, sizes in input_shapes.items()}
        self.entry = entry
        self.built = built
        self.compile_seconds = compile_seconds

    def forward(self, embeddings: torch.Tensor, dense_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: ``[B, K, F, d]`` float32.
            dense_features: ``[B, num_dense]`` float32.

        Returns:
            logits ``[B]``.

        Raises:
            ValueError: an input that is not float32, not of the program's sizes, or of another batch size.
        """
        batch = embeddings.shape[0] if embeddings.dim() else -1
        for name, value in (("embeddings", embeddings), ("dense_features", dense_features)):
            if value.dtype != torch.float32 or value.dim() == 0 or value.shape[0] != batch or (
                    tuple(value.shape[1:]) != self.input_shapes[name]):
                want = ", ".join(map(str, (batch, *self.input_shapes[name])))
                raise ValueError(f"compiled dense program: {name} is {value.dtype} [{', '.join(map(str, value.shape))}]"
                                 f", expected torch.float32 [{want}]")
        # The library's kernels index contiguous inputs; the flat runner call skips the per-call pytree parsing.
        return self.runner.loader.boxed_run([embeddings.contiguous(), dense_features.contiguous()])[0]

    def train(self, mode: bool = True) -> "CompiledProgram":
        """A compiled program has no training mode; only the flag is set."""
        self.training = mode
        return self


def default_cache_dir() -> Path:
    """``$MULTIEMBED_COMPILE_CACHE``, else ``$XDG_CACHE_HOME/multiembed/compiled``, else
    ``~/.cache/multiembed/compiled``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / CACHE_SUBDIR


def find_compiler() -> Tuple[str, str]:
    """The C++ compiler inductor builds with and its version text.

    Raises:
        CompileError: no C++ compiler is found (one line).
    """
    from torch._inductor import config, exc
    from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler

    try:
        compiler = get_cpp_compiler()
    except (exc.InvalidCxxCompiler, RuntimeError, OSError):
        cxx = config.cpp.cxx if isinstance(config.cpp.cxx, (list, tuple)) else (config.cpp.cxx,)
        looked = ", ".join(str(c) for c in cxx if c) or "none configured"
        raise CompileError(f"--compile: no C++ compiler found (looked for {looked}; set $CXX before starting); "
                           "install one (e.g. g++) or serve without --compile") from None
    return compiler, get_compiler_version_info(compiler)


def compile_key(program_sha256: str) -> CompileKey:
    """The key of ``program_sha256`` on this machine (see :class:`CompileKey`).

    Raises:
        CompileError: no C++ compiler is found.
    """
    compiler, version = find_compiler()
    return CompileKey(program_sha256, torch.__version__, cpu_capability(), compiler, version)


def _check_private(path: Path, what: str) -> None:
    """``path`` is a real directory of this user that group and others cannot write."""
    try:
        info = os.lstat(path)
    except OSError as e:
        raise CompileError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise CompileError(f"{path}: the {what} is not a directory (a link or a file); refusing to use it")
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise CompileError(f"{path}: the {what} is owned by user {info.st_uid}, not by this user; refusing to load "
                           "libraries from it")
    if info.st_mode & _FOREIGN_WRITE:
        mode = stat.S_IMODE(info.st_mode)
        raise CompileError(f"{path}: the {what} is writable by group or others (mode {mode:04o}); refusing to load "
                           "libraries from it (chmod 700 it)")


def open_cache_dir(cache_dir: "str | os.PathLike | None" = None) -> Path:
    """Creates the cache directory (mode 0700) if needed and checks it is private.

    Raises:
        CompileError: it cannot be created, is a link or a file, belongs to another user, or group or others can
            write it.
    """
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path.expanduser()
    if not os.path.lexists(path):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise CompileError(f"{path}: cannot create the compile cache ({e.strerror or e})") from None
    _check_private(path, "compile cache")
    return path


def read_entry(entry: Path, key: CompileKey) -> Optional[Path]:
    """The package of a cache entry when its recorded key is ``key`` and the package has the recorded size and
    SHA-256; None otherwise (the entry is then rebuilt).

    Raises:
        CompileError: the entry is not a private directory of this user.
    """
    if not os.path.lexists(entry):
        return None
    _check_private(entry, "compile cache entry")
    package = entry / PACKAGE_FILE
    try:
        recorded = json.loads((entry / KEY_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(recorded, dict) or recorded.get("key") != key.to_json():
        return None
    try:
        if package.is_symlink() or not package.is_file() or package.stat().st_size != recorded.get("bytes"):
            return None
        if file_sha256(package) != recorded.get("sha256"):
            return None
    except OSError:
        return None
    return package


def _example_inputs(shapes: Mapping[str, Tuple[int, ...]]) -> Tuple[torch.Tensor, ...]:
    return tuple(torch.zeros(_EXAMPLE_BATCH, *sizes) for sizes in shapes.values())


def _build(program: "torch.export.ExportedProgram", shapes: Mapping[str, Tuple[int, ...]], key: CompileKey,
           tmp: Path) -> None:
    """Compiles ``program`` into ``tmp/model.pt2`` and records the key beside it."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    # Our own example inputs (the manifest's shapes), not the sample inputs stored in the archive.
    program.example_inputs = (_example_inputs(shapes), {})
    package = tmp / PACKAGE_FILE
    try:
        with temporary_cache_dir(str(tmp / "inductor")):
            torch._inductor.aoti_compile_and_package(program, package_path=str(package))
    except Exception as e:  # noqa: BLE001 - any compiler or inductor failure: one line, no fallback
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CompileError(f"--compile: AOTInductor could not compile the dense program ({type(e).__name__}: "
                           f"{text})") from None
    shutil.rmtree(tmp / "inductor", ignore_errors=True)
    with open(package, "rb") as f:
        os.fsync(f.fileno())
    record = {"key": key.to_json(), "bytes": package.stat().st_size, "sha256": file_sha256(package)}
    atomic_write_text(tmp / KEY_FILE, json.dumps(record, indent=2) + "\n")


def remove_stale_tmp(cache: Path, max_age_s: float = STALE_TMP_SECONDS) -> None:
    """Removes the ``.tmp-`` directories of ``cache`` not modified for ``max_age_s`` seconds (killed compiles)."""
    now = time.time()
    for path in cache.glob(f"{_TMP_PREFIX}*"):
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(info.st_mode) and now - info.st_mtime > max_age_s:
            shutil.rmtree(path, ignore_errors=True)


def _publish(tmp: Path, entry: Path) -> None:
    """Renames the finished ``tmp`` to ``entry``; a stale entry (another key or a bad package) is moved aside first.
    Another process that published the same entry meanwhile wins (its entry is checked on load like any other)."""
    if os.path.lexists(entry):
        stale = entry.with_name(f"{_TMP_PREFIX}stale-{entry.name}-{os.getpid()}")
        try:
            os.rename(entry, stale)
        except FileNotFoundError:
            stale = None
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    try:
        os.rename(tmp, entry)
    except OSError:  # published by a concurrent compile of the same key
        shutil.rmtree(tmp, ignore_errors=True)


def compiled_dense(
    program: "torch.export.ExportedProgram",
    program_sha256: str,
    input_shapes: Mapping[str, Tuple[int, ...]],
    cache_dir: "str | os.PathLike | None" = None,
) -> CompiledProgram:
    """The compiled dense program from the cache, compiled and cached first when no valid entry holds it.

    Args:
        program: the checked, loaded ``ExportedProgram`` of the artifact.
        program_sha256: SHA-256 of its ``dense.pt2`` (verified against the file by the artifact checks).
        input_shapes: ``{name: sizes after the batch dimension}`` of its inputs
            (:func:`~multiembed.serving.artifact.dense_input_shapes`).
        cache_dir: the cache directory (default :func:`default_cache_dir`).

    Raises:
        CompileError: no C++ compiler, an unsafe cache directory, or the compile failed.
    """
    import torch._inductor  # noqa: F401  (AOTInductor: imported only when a program is compiled or loaded)

    key = compile_key(program_sha256)
    cache = open_cache_dir(cache_dir)
    entry = cache / key.digest
    package = read_entry(entry, key)
    built, seconds = False, 0.0
    if package is None:
        remove_stale_tmp(cache)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{key.digest[:16]}-", dir=cache))
        try:
            _build(program, input_shapes, key, tmp)
            _publish(tmp, entry)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        seconds = time.perf_counter() - start
        package = read_entry(entry, key)
        if package is None:
            raise CompileError(f"{entry}: the compiled entry does not match its key right after it was written")
        built = True
    try:
        runner = torch._inductor.aoti_load_package(str(package))
    except Exception as e:  # noqa: BLE001 - a library that does not load is an error, never a fallback
        text = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CompileError(f"{package}: cannot load the compiled dense program ({text})") from None
    return CompiledProgram(runner, input_shapes, entry, built, seconds)
