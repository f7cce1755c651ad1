"""The inference artifact: its directory layout, its manifest, and loading it without running code from its files.

An artifact is a directory ``multiembed export`` writes (:mod:`multiembed.serving.export`)::

    DIR/
      manifest.json   written last: schema, vocabulary fingerprint, preprocessing, quantisation, sizes, and for
                      every other file its name (relative to DIR), size and SHA-256
      tables.pt       the embedding tables as a plain dict of tensors (torch.save; read with weights_only=True):
                      per table ``<name>.weight`` (fp32 ``[rows, K*d]``, or the row-wise quantised bytes
                      ``[rows, K*d*bits/8]`` uint8) and ``<name>.scale_shift`` (uint8 ``[rows, 4]``: fp16 scale and
                      bias per row, int8 / int4 only); padding stripped
      dense.pt2       the dense part (dense arch, set interaction arch, mean or set gate, over arch) as a
                      ``torch.export`` program: ``(embeddings [B, K, F, d], dense_features [B, num_dense]) -> logits [B]``
      vocab.npz       paper-mode vocabularies only: the sorted token keys per field (numpy, no pickle)

Self-contained means: the directory loads with ``multiembed predict DIR`` or one Python call,
:func:`load_artifact`, in an environment with multiembed and torchrec installed, without the training code path
(no trainer, optimizer, sharding plan or process group), the run directory or the dataset.

Loading runs no code from the files. ``manifest.json`` and ``vocab.npz`` are JSON and ``np.load(allow_pickle=False)``;
``tables.pt`` is read with ``torch.load(weights_only=True)`` and must be a flat dict of tensors of the manifest's
shapes and dtypes; the tables themselves are TorchRec modules built here (eager ``EmbeddingBagCollection`` for fp32,
``QuantEmbeddingBagCollection`` for int8 / int4), because neither ``torch.jit.script`` nor ``torch.export`` handles
the quantised tables on this stack. ``torch.export.load`` is not safe on untrusted files (it may unpickle weights,
constants and sample inputs with ``weights_only=False``, evaluates symbolic shape strings with ``sympy.sympify``
and compiles the program's guard strings into Python), so :func:`check_dense_program` inspects the archive first
and refuses anything but: the expected member names, tensor payloads stored raw (no pickled weights or constants,
no custom or opaque objects), sample inputs that load with ``weights_only=True``, graph nodes that each call
one of :data:`DENSE_PROGRAM_OPS` (the exact aten operators the package's own exports emit: functional tensor
maths, no in-place or ``out=`` variant, no file or storage access), identifiers as node names, shape expressions
built only from ``Symbol``, ``Integer`` and arithmetic, guards that only compare input sizes with integers, and
inputs of the shapes the manifest implies (:func:`dense_input_shapes`). A refusal is one line naming the file
(:class:`ArtifactError`).

``load_artifact(..., compile=True)`` serves the dense program compiled ahead of time: only after every check above,
from the loaded program, on this machine, into a private cache (:mod:`multiembed.serving.compiled`). No compiled
library is ever read from the artifact.
"""

from __future__ import annotations

import dataclasses
import json
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from multiembed.data.metadata import file_sha256
from multiembed.models.sparse_arch import MultiEmbeddingSparseArch, multi_embedding_tables
from multiembed.serving.compiled import CompiledProgram, compiled_dense

ARTIFACT_FORMAT = "multiembed-serving-v1"
MANIFEST_FILE = "manifest.json"
TABLES_FILE = "tables.pt"
DENSE_FILE = "dense.pt2"
QUANTIZE_CHOICES: Tuple[str, ...] = ("none", "int8", "int4")
DEFAULT_QUANTIZE = "int8"
# Bits per stored weight and TorchRec's data type of each quantisation.
QUANT_BITS: Dict[str, int] = {"none": 32, "int8": 8, "int4": 4}
QUANT_DATA_TYPES: Dict[str, DataType] = {"none": DataType.FP32, "int8": DataType.INT8, "int4": DataType.INT4}
# Row-wise quantised rows end in an fp16 scale and an fp16 bias, which FBGEMM reads at 2-byte alignment.
SCALE_SHIFT_BYTES = 4
QUANT_ROW_ALIGN_BYTES = 2
# The kinds of preprocessing an artifact records (see the manifest's ``preprocessing``).
RAW_PREPROCESSING = "raw"
NO_RAW_PREPROCESSING = "none"


class ArtifactError(ValueError):
    """An artifact is missing, incomplete, corrupted or unsafe to load (the one-line message names the file)."""


# ------------------------------------------------------------------------------------------------------------------
# The manifest


@dataclasses.dataclass
class Manifest:
    """The parsed ``manifest.json`` of an artifact.

    Attributes:
        model: the zoo name the run trained (e.g. ``dcnv2-me-4x``).
        quantize: ``none``, ``int8`` or ``int4`` (the tables; the dense part is fp32).
        num_sets: K.
        set_dim: d, the logical width of a set (the tables hold ``K * d`` columns, no padding).
        vocab_sizes: ``{field: rows}`` in schema order (the KJT key order).
        dense_fields: the dense features the model reads, in order (empty when the run did not use them).
        dataset: ``criteo``, ``criteo-1tb``, ``avazu`` or ``synthetic``.
        vocab_fingerprint: the training data's vocabulary fingerprint; data with another one is refused.
        preprocessing: how raw rows become features: ``{"kind": "raw", "format", "mode", "hash_seed",
            "hash_sizes" (hashing mode), "vocabulary" (paper mode: file name)}`` or ``{"kind": "none", "reason"}``.
        files: ``{role: {"path", "bytes", "sha256"}}`` for ``tables``, ``dense`` and (paper mode) ``vocabulary``;
            paths relative to the artifact directory.
        sizes: byte counts of the tables (``logical_fp32_bytes``, ``stored_bytes``, ``memory_bytes``, ...).
        source: where it came from (run directory relative to the artifact, checkpoint, step, versions).
    """

    model: str
    quantize: str
    num_sets: int
    set_dim: int
    vocab_sizes: Dict[str, int]
    dense_fields: List[str]
    dataset: str
    vocab_fingerprint: str
    preprocessing: Dict[str, Any]
    files: Dict[str, Dict[str, Any]]
    sizes: Dict[str, Any] = dataclasses.field(default_factory=dict)
    source: Dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def fields(self) -> List[str]:
        return list(self.vocab_sizes)

    @property
    def table_width(self) -> int:
        """Columns of every stored table: ``K * d``."""
        return self.num_sets * self.set_dim

    def to_json(self) -> Dict[str, Any]:
        out = {"format": ARTIFACT_FORMAT}
        out.update(dataclasses.asdict(self))
        out["vocab_sizes"] = [[f, int(n)] for f, n in self.vocab_sizes.items()]
        return out

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "Manifest":
        """Parses and validates a manifest object.

        Raises:
            ArtifactError: not an artifact manifest, or a malformed entry (named).
        """
        if not isinstance(obj, dict) or obj.get("format") != ARTIFACT_FORMAT:
            got = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
            raise ArtifactError(f"{where}: not a multiembed serving manifest (format {got!r}, expected {ARTIFACT_FORMAT})")
        try:
            manifest = cls(
                model=str(obj["model"]),
                quantize=str(obj["quantize"]),
                num_sets=int(obj["num_sets"]),
                set_dim=int(obj["set_dim"]),
                vocab_sizes={str(f): int(n) for f, n in obj["vocab_sizes"]},
                dense_fields=[str(f) for f in obj["dense_fields"]],
                dataset=str(obj["dataset"]),
                vocab_fingerprint=str(obj["vocab_fingerprint"]),
                preprocessing=dict(obj["preprocessing"]),
                files={str(k): dict(v) for k, v in obj["files"].items()},
                sizes=dict(obj.get("sizes", {})),
                source=dict(obj.get("source", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: malformed manifest ({type(e).__name__}: {e})") from None
        if manifest.quantize not in QUANTIZE_CHOICES:
            raise ArtifactError(f"{where}: quantize: {manifest.quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
        if manifest.num_sets < 1 or manifest.set_dim < 1 or not manifest.vocab_sizes:
            raise ArtifactError(f"{where}: num_sets, set_dim and vocab_sizes must be positive and non-empty")
        if any(n < 1 for n in manifest.vocab_sizes.values()):
            raise ArtifactError(f"{where}: vocab_sizes: every field needs at least one row")
        for role in ("tables", "dense"):
            if role not in manifest.files:
                raise ArtifactError(f"{where}: files.{role}: missing")
        for role, entry in manifest.files.items():
            name = entry.get("path")
            # A bare file name inside the artifact: nothing the manifest names can point outside the directory.
            if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
                raise ArtifactError(f"{where}: files.{role}.path: {name!r} is not a plain file name in the artifact")
        return manifest


def read_manifest(directory: Path) -> Manifest:
    """Reads ``DIR/manifest.json``.

    Raises:
        ArtifactError: not an artifact directory, or an unreadable or malformed manifest.
    """
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not directory.is_dir():
        raise ArtifactError(f"{directory}: no such artifact directory")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing (not a multiembed export artifact, or its export did not finish)")
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path}: unreadable ({e})") from None
    return Manifest.from_json(obj, str(path))


def file_entry(path: Path) -> Dict[str, Any]:
    """The manifest's ``files`` entry of a file written into the artifact: its name, size and SHA-256."""
    return {"path": path.name, "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def verify_files(directory: Path, manifest: Manifest) -> None:
    """Checks every file the manifest names: present, a regular file, of the recorded size and SHA-256.

    Raises:
        ArtifactError: a missing, truncated or altered file (named).
    """
    for role, entry in manifest.files.items():
        path = Path(directory) / entry["path"]
        if path.is_symlink() or not path.is_file():
            raise ArtifactError(f"{path}: missing or not a regular file ({role} of the artifact)")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise ArtifactError(f"{path}: {size} bytes, the manifest records {entry.get('bytes')} (truncated or replaced)")
        if file_sha256(path) != entry.get("sha256"):
            raise ArtifactError(f"{path}: SHA-256 differs from the manifest's (corrupted or altered)")


# ------------------------------------------------------------------------------------------------------------------
# Tables


def table_configs(manifest: Manifest) -> List[EmbeddingBagConfig]:
    """One unpadded table per field of width ``K * d`` (the fused layout with ``stored_set_dim = d``), named
    ``t_<field>``, in the manifest's data type."""
    configs = multi_embedding_tables(
        manifest.vocab_sizes, manifest.num_sets, manifest.set_dim, layout="fused", init="torchrec",
        stored_set_dim=manifest.set_dim,
    )
    return [dataclasses.replace(c, data_type=QUANT_DATA_TYPES[manifest.quantize], init_fn=None) for c in configs]


def quantized_row_bytes(width: int, quantize: str) -> int:
    """Bytes of one stored row without its scale and bias: ``width * bits / 8``.

    FBGEMM's row-wise kernels place the fp16 scale and bias right after the weights, so a row's weights must fill
    a whole, even number of bytes: int8 needs an even width, int4 a multiple of 4.

    Raises:
        ValueError: a width whose quantised row is not a whole, even number of bytes.
    """
    bits = QUANT_BITS[quantize]
    if (width * bits) % (8 * QUANT_ROW_ALIGN_BYTES):
        raise ValueError(
            f"--quantize {quantize}: a table width of {width} (K * d) gives rows of {width * bits / 8:g} bytes; "
            f"FBGEMM needs a multiple of {QUANT_ROW_ALIGN_BYTES} bytes (a width that is a multiple of "
            f"{8 * QUANT_ROW_ALIGN_BYTES // bits}); use another --quantize"
        )
    return width * bits // 8


def expected_table_tensors(manifest: Manifest) -> Dict[str, Tuple[Tuple[int, int], torch.dtype]]:
    """``{key: (shape, dtype)}`` of every tensor ``tables.pt`` must hold."""
    out: Dict[str, Tuple[Tuple[int, int], torch.dtype]] = {}
    width = manifest.table_width
    for field, rows in manifest.vocab_sizes.items():
        name = f"t_{field}"
        if manifest.quantize == "none":
            out[f"{name}.weight"] = ((rows, width), torch.float32)
        else:
            out[f"{name}.weight"] = ((rows, quantized_row_bytes(width, manifest.quantize)), torch.uint8)
            out[f"{name}.scale_shift"] = ((rows, SCALE_SHIFT_BYTES), torch.uint8)
    return out


def load_table_tensors(path: Path, manifest: Manifest) -> Dict[str, torch.Tensor]:
    """Reads ``tables.pt`` with ``weights_only=True`` and checks it holds exactly the manifest's tensors.

    Raises:
        ArtifactError: unreadable, not a flat dict of tensors, or a missing, extra or misshapen tensor.
    """
    try:
        expected = expected_table_tensors(manifest)
    except ValueError as e:
        raise ArtifactError(f"{path}: {e}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure of the restricted unpickler is a refusal
        raise ArtifactError(f"{path}: not a plain dict of tensors ({_first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and type(v) is torch.Tensor for k, v in state.items()):
        raise ArtifactError(f"{path}: expected a dict of tensor names to plain tensors")
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ArtifactError(f"{path}: tensors do not match the manifest (missing {missing[:3]}, unexpected {extra[:3]})")
    for key, (shape, dtype) in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise ArtifactError(
                f"{path}: {key}: {tuple(tensor.shape)} {tensor.dtype}, the manifest implies {shape} {dtype}"
            )
    return state


def build_collection(manifest: Manifest, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """The TorchRec collection of the stored tables: an eager ``EmbeddingBagCollection`` (fp32) or a
    ``QuantEmbeddingBagCollection`` over FBGEMM's int8 / int4 table-batched kernel (row-wise scale and bias)."""
    configs = table_configs(manifest)
    if manifest.quantize == "none":
        collection = EmbeddingBagCollection(tables=configs, device=torch.device("meta"))
        state = {f"embedding_bags.{c.name}.weight": tensors[f"{c.name}.weight"] for c in configs}
        collection.load_state_dict(state, assign=True)
        return collection.requires_grad_(False)
    weights = {c.name: (tensors[f"{c.name}.weight"], tensors[f"{c.name}.scale_shift"]) for c in configs}
    return QuantEmbeddingBagCollection(
        configs, is_weighted=False, device=torch.device("cpu"), table_name_to_quantized_weights=weights
    )


def table_memory_bytes(collection: nn.Module) -> int:
    """Bytes the collection's table weights occupy in memory (FBGEMM aligns each quantised row, scale and bias
    included, to 16 bytes)."""
    total = 0
    for key, tensor in collection.state_dict().items():
        if key.endswith(".weight"):
            # int4 weights come wrapped in TorchRec's UInt4Tensor (two weights a byte); count the bytes it wraps.
            data = getattr(tensor, "elem", tensor)
            total += data.numel() * data.element_size()
    return total


# ------------------------------------------------------------------------------------------------------------------
# The dense program

_MEMBER = re.compile(
    r"(data/weights/weight_\d+|data/weights/model_weights_config\.json|data/constants/tensor_\d+|"
    r"data/constants/model_constants_config\.json|models/model\.json|data/sample_inputs/model\.pt|archive_format|"
    r"archive_version|\.data/version|byteorder|\.data/serialization_id)"
)
# The exact operators the package's exports emit: every backbone x mode x combiner (hetero included), with and
# without dense features (tests/test_serving.py::test_exports_emit_exactly_the_allowed_ops derives this set and
# fails when export emits another op). Functional tensor maths only: no in-place or out= variants, no file or
# storage access; batch norm and dropout only in eval mode (:data:`EVAL_MODE_ARGS`).
DENSE_PROGRAM_OPS: FrozenSet[str] = frozenset(f"torch.ops.aten.{op}" for op in (
    "add.Tensor", "addcmul.default", "alias.default", "baddbmm.default", "batch_norm.default", "bmm.default",
    "cat.default", "div.Tensor", "dropout.default", "einsum.default", "flatten.using_ints", "index.Tensor",
    "linear.default", "matmul.default", "mean.dim", "mul.Tensor", "narrow.default", "permute.default",
    "relu.default", "reshape.default", "select.int", "slice.Tensor", "softmax.int", "squeeze.dim", "sub.Tensor",
    "sum.dim_IntList", "transpose.int", "triu_indices.default", "unflatten.int", "unsqueeze.default",
    "view.default",
))
# Allowed ops that write or draw in training mode (batch norm updates its running statistics in place, dropout
# draws a mask): their mode argument must be the constant False.
EVAL_MODE_ARGS: Dict[str, str] = {
    "torch.ops.aten.batch_norm.default": "training",
    "torch.ops.aten.dropout.default": "train",
}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYMBOL_NAME = re.compile(r"[su]\d+")
# Shape expressions: sympy constructors and arithmetic of symbols and integers only (no dots, brackets or other
# names, so sympify's eval can reach nothing else).
_EXPR_WORDS = frozenset({"Symbol", "Integer", "Mul", "Add", "Pow", "Rational", "Max", "Min", "FloorDiv", "Mod",
                         "CeilDiv", "positive", "integer", "True", "False"})
_EXPR_CHARS = re.compile(r"[A-Za-z0-9_ ,()=+\-*/']*")
_GUARD_TERM = r"(?:L\['[A-Za-z_][A-Za-z0-9_]*'\]\.size\(\)\[\d+\]|-?\d+)"
_GUARD = re.compile(rf"{_GUARD_TERM}(?:\s*(?:==|!=|<=|>=|<|>)\s*{_GUARD_TERM})+")


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = (str(error) or type(error).__name__).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:limit]


def _check_expr(expr: str, where: str) -> None:
    if not _EXPR_CHARS.fullmatch(expr):
        raise ArtifactError(f"{where}: shape expression {expr[:60]!r} has characters outside the allowed set")
    for word in re.findall(r"'[^']*'|[A-Za-z_][A-Za-z0-9_]*", expr):
        if word.startswith("'"):
            if not _SYMBOL_NAME.fullmatch(word[1:-1]):
                raise ArtifactError(f"{where}: shape expression names {word}, not a shape symbol")
        elif word not in _EXPR_WORDS:
            raise ArtifactError(f"{where}: shape expression uses {word!r}, not an allowed sympy constructor")


def _check_program_json(program: Any, where: str) -> None:
    """Node targets, node names, shape expressions, range symbols and guards of a serialized ExportedProgram."""
    if not isinstance(program, dict) or "graph_module" not in program:
        raise ArtifactError(f"{where}: not a serialized exported program")
    for guard in program.get("guards_code") or []:
        if not isinstance(guard, str) or not _GUARD.fullmatch(guard.strip()):
            raise ArtifactError(f"{where}: guard {str(guard)[:60]!r} is not a comparison of input sizes")
    for name in (program.get("range_constraints") or {}):
        if not _SYMBOL_NAME.fullmatch(str(name)):
            raise ArtifactError(f"{where}: range constraint on {str(name)[:40]!r}, not a shape symbol")
    graph = program["graph_module"].get("graph", {})
    for node in graph.get("nodes", []):
        target = node.get("target") if isinstance(node, dict) else None
        if target not in DENSE_PROGRAM_OPS:
            name = node.get("name") if isinstance(node, dict) else None
            raise ArtifactError(
                f"{where}: node {str(name)[:40]!r} calls {str(target)[:60]!r}, not one of the "
                f"{len(DENSE_PROGRAM_OPS)} aten operators multiembed's exports use (DENSE_PROGRAM_OPS)"
            )
        mode = EVAL_MODE_ARGS.get(target)
        if mode is not None:
            args = {a.get("name"): a.get("arg") for a in node.get("inputs") or [] if isinstance(a, dict)}
            if args.get(mode) != {"as_bool": False}:
                raise ArtifactError(f"{where}: node {str(node.get('name'))[:40]!r} calls {target} with {mode} "
                                    f"{args.get(mode)!r}; only eval mode (False) is allowed")
    for table in ("tensor_values", "sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values"):
        values = graph.get(table) or {}
        if table == "custom_obj_values" and values:
            raise ArtifactError(f"{where}: the program holds custom objects")
        for name in values:
            if not _IDENTIFIER.fullmatch(str(name)):
                raise ArtifactError(f"{where}: value name {str(name)[:40]!r} is not an identifier")

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "expr_str":
                    if not isinstance(item, str):
                        raise ArtifactError(f"{where}: expr_str is not a string")
                    _check_expr(item, where)
                elif key == "name" and isinstance(item, str) and not _IDENTIFIER.fullmatch(item):
                    raise ArtifactError(f"{where}: name {item[:40]!r} is not an identifier")
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(program["graph_module"])


def dense_input_shapes(manifest: Manifest) -> Dict[str, Tuple[int, ...]]:
    """The dense program's inputs the manifest implies, ``{name: sizes after the batch dimension}``:
    ``embeddings [B, K, F, d]`` and ``dense_features [B, num_dense]``."""
    return {
        "embeddings": (manifest.num_sets, len(manifest.vocab_sizes), manifest.set_dim),
        "dense_features": (len(manifest.dense_fields),),
    }


def _check_inputs(program: Mapping[str, Any], where: str, expected: Mapping[str, Tuple[int, ...]]) -> None:
    """The program's user inputs are ``expected`` in order: a symbolic batch dimension, then these sizes."""
    graph_module = program["graph_module"]
    specs = (graph_module.get("signature") or {}).get("input_specs") or []
    names = []
    for spec in specs:
        if isinstance(spec, dict) and "user_input" in spec:
            names.append(str(((spec["user_input"].get("arg") or {}).get("as_tensor") or {}).get("name")))
    if len(names) != len(expected):
        raise ArtifactError(f"{where}: the program takes {len(names)} inputs, the manifest implies {len(expected)} "
                            f"({', '.join(expected)})")
    values = (graph_module.get("graph") or {}).get("tensor_values") or {}
    for name, (role, sizes) in zip(names, expected.items()):
        dims = (values.get(name) or {}).get("sizes") or []
        got = ["B" if "as_expr" in dim else dim.get("as_int") for dim in dims if isinstance(dim, dict)]
        want = ["B", *sizes]
        if got != want:
            raise ArtifactError(f"{where}: input {role} is [{', '.join(map(str, got))}], the manifest (num_sets, "
                                f"fields, set_dim, dense_fields) implies [{', '.join(map(str, want))}]")


def check_dense_program(path: Path, inputs: Mapping[str, Tuple[int, ...]]) -> None:
    """Refuses a ``torch.export`` archive that ``torch.export.load`` could run code from (see the module docstring),
    or whose inputs are not ``inputs`` (:func:`dense_input_shapes` of the manifest).

    Args:
        path: the ``dense.pt2`` archive.
        inputs: ``{name: sizes after the batch dimension}`` of the program's inputs in order.

    Raises:
        ArtifactError: one line naming the file and the first thing refused.
    """
    where = str(path)
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise ArtifactError(f"{where}: not a torch.export archive ({_first_line(e)})") from None
    with archive:
        names = archive.namelist()
        prefixes = {n.split("/", 1)[0] for n in names}
        if len(prefixes) != 1:
            raise ArtifactError(f"{where}: expected one top-level folder in the archive, found {sorted(prefixes)[:3]}")
        prefix = prefixes.pop() + "/"
        for name in names:
            if not name.startswith(prefix) or not _MEMBER.fullmatch(name[len(prefix):]):
                raise ArtifactError(f"{where}: unexpected archive member {name[:80]!r}")
        members = {name[len(prefix):]: name for name in names}
        if "models/model.json" not in members:
            raise ArtifactError(f"{where}: no models/model.json (not a torch.export.save archive)")
        try:
            for config_name in ("data/weights/model_weights_config.json", "data/constants/model_constants_config.json"):
                if config_name not in members:
                    continue
                config = json.loads(archive.read(members[config_name])).get("config", {})
                for fqn, payload in config.items():
                    if payload.get("use_pickle") or not str(payload.get("path_name", "")).startswith(("weight_", "tensor_")):
                        raise ArtifactError(f"{where}: {fqn} is stored pickled or as an object, not as raw tensor bytes")
            program = json.loads(archive.read(members["models/model.json"]))
        except ArtifactError:
            raise
        except (ValueError, KeyError, AttributeError) as e:
            raise ArtifactError(f"{where}: unreadable archive metadata ({_first_line(e)})") from None
        _check_program_json(program, where)
        _check_inputs(program, where, inputs)
        if "data/sample_inputs/model.pt" in members:
            data = archive.read(members["data/sample_inputs/model.pt"])
            if data:
                import io

                try:
                    torch.load(io.BytesIO(data), weights_only=True)
                except Exception as e:  # noqa: BLE001 - torch.export.load would fall back to weights_only=False
                    raise ArtifactError(f"{where}: sample inputs do not load with weights_only=True ({_first_line(e)})") from None


def load_exported_program(path: Path, inputs: Mapping[str, Tuple[int, ...]]) -> torch.export.ExportedProgram:
    """:func:`check_dense_program`, then ``torch.export.load(path)``."""
    check_dense_program(path, inputs)
    try:
        return torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 - any deserialisation failure is a bad artifact
        raise ArtifactError(f"{path}: cannot load the exported dense program ({_first_line(e)})") from None


def load_dense_program(path: Path, inputs: Mapping[str, Tuple[int, ...]]) -> nn.Module:
    """:func:`load_exported_program`, as a module: ``(embeddings, dense) -> logits``."""
    return load_exported_program(path, inputs).module()


# ------------------------------------------------------------------------------------------------------------------
# The model


class ServingModel(nn.Module):
    """An exported model: the TorchRec table lookup (eager, fp32 or quantised) then the exported dense program.

    Args:
        sparse_arch: the K sets over the artifact's collection, ``KJT -> [B, K, F, d]``.
        dense: the dense program, ``(embeddings [B, K, F, d], dense_features [B, num_dense]) -> logits [B]``.
        num_dense: dense features the program reads (0: pass ``[B, 0]``).

    Example::

        >>> artifact = load_artifact("runs/me4x.int8")  # doctest: +SKIP
        >>> logits = artifact.model(dense_features, sparse_features)  # doctest: +SKIP
    """

    def __init__(self, sparse_arch: MultiEmbeddingSparseArch, dense: nn.Module, num_dense: int) -> None:
        super().__init__()
        if num_dense < 0:
            raise ValueError(f"num_dense must be >= 0, got {num_dense}")
        self.sparse_arch = sparse_arch
        self.dense = dense
        self.num_dense = num_dense

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            dense_features: ``[B, num_dense]`` float32.
            sparse_features: KJT with one key per field.

        Returns:
            logits ``[B]``.
        """
        return self.dense(self.sparse_arch(sparse_features), dense_features)

    def train(self, mode: bool = True) -> "ServingModel":
        """Sets the mode of the table lookup only: the exported program was captured in eval mode and keeps it
        (``torch.export`` programs refuse ``train()``)."""
        self.training = mode
        self.sparse_arch.train(mode)
        return self


@dataclasses.dataclass
class ServingArtifact:
    """A loaded artifact.

    Attributes:
        directory: where it was loaded from.
        manifest: its manifest.
        model: the :class:`ServingModel` (eval mode; call it under ``torch.inference_mode()``).
    """

    directory: Path
    manifest: Manifest
    model: ServingModel

    @property
    def fields(self) -> List[str]:
        return self.manifest.fields

    @property
    def compiled(self) -> Optional[CompiledProgram]:
        """The compiled dense program (``load_artifact(..., compile=True)``), else None."""
        dense = self.model.dense
        return dense if isinstance(dense, CompiledProgram) else None

    def predict(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """Click probabilities ``[B]`` of one batch."""
        with torch.inference_mode():
            return torch.sigmoid(self.model(dense_features, sparse_features))


def load_artifact(
    directory: "str | Path", compile: bool = False, cache_dir: "str | Path | None" = None
) -> ServingArtifact:
    """Loads an artifact directory written by ``multiembed export`` (the one documented Python call).

    Verifies every file against the manifest (size and SHA-256), reads the tables with ``weights_only=True``,
    rebuilds the TorchRec collection, and loads the dense program after :func:`check_dense_program`.

    Args:
        directory: the artifact directory.
        compile: compile the checked dense program ahead of time on this machine (AOTInductor) and serve the
            compiled library, from the cache when it holds a valid entry (:mod:`multiembed.serving.compiled`).
        cache_dir: the compile cache (default :func:`~multiembed.serving.compiled.default_cache_dir`).

    Raises:
        ArtifactError: not an artifact, a missing or altered file, or anything the safety checks refuse.
        CompileError: ``compile`` without a C++ compiler, with an unsafe cache directory, or a failed compile.

    Example::

        >>> from multiembed.serving import load_artifact
        >>> artifact = load_artifact("runs/me4x.int8")  # doctest: +SKIP
        >>> probs = artifact.predict(dense_features, sparse_features)  # doctest: +SKIP
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    verify_files(directory, manifest)
    tensors = load_table_tensors(directory / manifest.files["tables"]["path"], manifest)
    collection = build_collection(manifest, tensors)
    sparse_arch = MultiEmbeddingSparseArch(
        collection, num_sets=manifest.num_sets, set_dim=manifest.set_dim, layout="fused"  # type: ignore[arg-type]
    )
    shapes = dense_input_shapes(manifest)
    program = load_exported_program(directory / manifest.files["dense"]["path"], shapes)
    dense: nn.Module
    if compile:
        dense = compiled_dense(program, manifest.files["dense"]["sha256"], shapes, cache_dir)
    else:
        dense = program.module()
    model = ServingModel(sparse_arch, dense, num_dense=len(manifest.dense_fields)).eval()
    return ServingArtifact(directory, manifest, model)
