"""Parity with the paper's reference implementation on real Criteo rows.

On one converted dataset (``multiembed convert criteo`` in paper mode) and the same train / val / test rows, runs

(a) **reference**: a re-implementation of the recipe of the paper's public code (``thuml/Multi-Embedding``:
    ``main.py``, ``torchfm/layer.py``, ``torchfm/model/dcnv2.py``, ``torchfm/model/awesome.py``,
    ``torchfm/dataset/criteo.py``, ``utils.py``), in plain PyTorch (:class:`~multiembed.benchmarks.paper_baseline.
    PaperMultiDCNv2`), and
(b) **package**: ``multiembed train --data D --out R --model M --seed S`` with its defaults (a subprocess of the CLI,
    so exactly what a user gets; extra words with ``--package-args`` for single-factor studies),

for every model, split ("fold") and seed, then prints val/test AUC and log loss of both sides next to each other with
the mean paired difference (package - reference) and its 95 % interval, and writes everything as JSON. Runs already
finished are skipped (their result files are kept in ``--work``), so the long protocol can be stopped and resumed.

The reference recipe, as the paper's code has it (each point checked in its source):

* data: Criteo ``train.txt`` rows; integers binned ``'' -> 'NULL'``, ``v > 2 -> int(ln(v)^2)``, else ``v - 2``;
  every token seen fewer than 10 times over **all rows of the file** (train, val and test together, before the split)
  shares one out-of-vocabulary id per field; 39 categorical fields, no raw dense input. ``multiembed convert criteo``
  in paper mode does the same (it counts over all its inputs), and both sides read its Parquet output.
* split: ``random_split`` 8:1:1 with ``Generator().manual_seed(seed)``.
* model: ``MultiDCNnew2`` (ME) / ``CrossNetworkV2Model`` (SE) with 4 full-rank cross layers, MLP (400, 400) of
  Linear -> BatchNorm1d -> ReLU -> Dropout(0.2), a Linear(400, 1) head; one ``nn.Embedding(sum_i D_i, d)`` per set
  initialised ``xavier_uniform_`` over the whole table; cross weights ``xavier_uniform_``, cross biases 0; Linear and
  BatchNorm layers at torch's defaults. SE ``s``x is one set of width ``10 s`` (``dcn-40``); ME is ``s`` sets of 10
  (``mdcn-4x10``). With one set, ``PaperMultiDCNv2`` is ``CrossNetworkV2Model`` (same layers in the same order).
* optimizer: one ``torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-6)``: every parameter in one group,
  the embedding tables included with **dense** gradients, so every row of every table gets Adam's update and the
  (coupled, L2-style) weight decay at every step, touched in the batch or not.
* batches: batch 2048; ``DataLoader(train_subset, batch_size=2048)`` without ``shuffle`` over the ``random_split``
  subset: one random order of the training rows, the same in every epoch; the last, partial batch is kept.
* loss: ``BCELoss(sigmoid(logit), label)``; no gradient clipping, no LR schedule.
* early stopping: validation AUC after every epoch; ``EarlyStopper(num_trials=3)``: stop at the third evaluation in a
  row without a strictly higher AUC (the best starts at 0); at most 100 epochs (``--epoch 0``); the best state is
  saved at each improvement and loaded for the test.

Where (a) differs from the paper's code, and why:

1. The split and the vocabulary come from ``multiembed convert`` (an exact 8:1:1 split drawn from convert's seed, or
   the ``--folds`` cross-validation files), not ``random_split``: both sides must see the same rows to be paired.
   The vocabulary rule is the paper's (min-count 10 over every row of the file); its id order differs, which changes
   nothing (ids are only row indices).
2. The initialisation, dropout and the training order are seeded with the run's seed (``torch.manual_seed(seed)``;
   the order is ``randperm`` of the training rows under ``seed``). The paper's code seeds only the split, so its model
   initialisation is unseeded; a paired comparison needs reproducible runs.
3. ``binary_cross_entropy_with_logits`` instead of ``sigmoid`` + ``BCELoss`` and ``F.linear`` instead of
   ``matmul(W, x.unsqueeze(2))``: the same maths, numerically safer (``paper_baseline``'s choices).
4. The best state is kept in memory (a copy of ``state_dict``) instead of a file: the same state.
5. Metrics (AUC, log loss in nats) are computed by the package's ``EvalMetrics`` on both sides, so the two columns
   differ only in training; the paper's code uses ``sklearn.metrics.roc_auc_score`` (the same AUC up to ties of
   predicted probabilities; ``auc_exact``, the tie-averaged rank AUC, is recorded too).
6. A last training batch of a single row (BatchNorm cannot train on it; the paper's code would stop with an error)
   is skipped. It does not occur at 8,000 training rows and batch 2048.

The single-factor options (``--reference KEY=VALUE``, fields of :class:`ReferenceRecipe`) move one point of the
reference toward the package's CPU defaults: ``table_optimizer=adagrad`` (sparse element-wise Adagrad, lr 0.05, no
weight decay on the tables: what FBGEMM's fused CPU kernel does), ``order=epoch`` (reshuffled every epoch),
``drop_last=1``, ``max_epochs=10``, ``batch_size``, ``lr``, ``patience``, ``dropout``, ``eval_every``.

Usage::

    python -m multiembed.benchmarks.parity --raw ../shared/data/criteo_dac_train_head10k.txt --work /tmp/parity \\
        --seeds 3 --json runs/parity.json                   # default split (convert's 8:1:1, seed 0)
    python -m multiembed.benchmarks.parity ... --seeds 10 --folds 5      # paired cross-validation

``--folds K``: the file's rows are permuted once (``--fold-seed``) and cut into K equal folds; fold k's rows are the
held-out file (its first half validation, its second half test, ``convert --split-by-file``) and the other rows the
training file, so with K = 5 every split is 8:1:1. The fold files are written under ``--work`` (not into the
repository), then converted like the default split.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from multiembed.benchmarks.paper_baseline import PaperMultiDCNv2
from multiembed.data.convert import ConvertOptions, convert
from multiembed.data.metrics import roc_auc
from multiembed.data.metadata import DatasetMetadata, atomic_write_text, read_metadata, split_identity
from multiembed.models.names import parse_model_name

DEFAULT_MODELS = ("dcnv2-se-1x", "dcnv2-me-4x", "dcnv2-se-4x")
# Model pairs whose paired difference is printed when both ran (the paper's ME vs SE at the same size).
CONTRASTS = (("dcnv2-me-4x", "dcnv2-se-4x"),)
SIDES = ("reference", "package")
METRICS = ("val_auc", "test_auc", "val_logloss", "test_logloss")
RESULT_FILE = "result.json"


# ------------------------------------------------------------------------------------------------------- recipe
@dataclasses.dataclass
class ReferenceRecipe:
    """The paper's recipe (defaults) and the single-factor departures from it.

    Attributes:
        batch_size: rows per step (the paper's 2048).
        lr: Adam learning rate of every parameter (1e-3).
        weight_decay: Adam's (coupled) weight decay of every parameter (1e-6).
        table_optimizer: ``adam``: the tables are in the one dense Adam (the paper); ``adagrad``: sparse element-wise
            Adagrad on the tables (the package's CPU default: only rows with a gradient change, no weight decay).
        table_lr: the tables' rate under ``adagrad`` (None: 0.05, the package's CPU default).
        max_epochs: epochs at most (100).
        patience: evaluations without a strictly higher validation AUC before stopping (3).
        eval_every: evaluate every N steps (0: after every epoch, the paper).
        order: ``fixed``: one permutation of the training rows for every epoch (the paper's unshuffled loader over
            a random subset); ``epoch``: reshuffled every epoch.
        drop_last: drop the last partial batch of an epoch (the paper keeps it).
        hidden: MLP width (400).
        dropout: dropout (0.2).
    """

    batch_size: int = 2048
    lr: float = 1e-3
    weight_decay: float = 1e-6
    table_optimizer: str = "adam"
    table_lr: Optional[float] = None
    max_epochs: int = 100
    patience: int = 3
    eval_every: int = 0
    order: str = "fixed"
    drop_last: bool = False
    hidden: int = 400
    dropout: float = 0.2

    def validate(self) -> None:
        if self.table_optimizer not in ("adam", "adagrad"):
            raise ValueError(f"reference table_optimizer: adam or adagrad, got {self.table_optimizer!r}")
        if self.order not in ("fixed", "epoch"):
            raise ValueError(f"reference order: fixed or epoch, got {self.order!r}")
        if self.batch_size < 1 or self.max_epochs < 1 or self.patience < 0 or self.eval_every < 0:
            raise ValueError(f"reference recipe out of range: {self}")

    def differences(self) -> Dict[str, Any]:
        """The fields that differ from the paper's recipe."""
        base = ReferenceRecipe()
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if getattr(self, f.name) != getattr(base, f.name)}


def parse_recipe(items: Sequence[str]) -> ReferenceRecipe:
    """``["table_optimizer=adagrad", "batch_size=256"]`` -> :class:`ReferenceRecipe` (values typed by the field).

    Raises:
        ValueError: an unknown field or a value of the wrong type.
    """
    fields = {f.name: f for f in dataclasses.fields(ReferenceRecipe)}
    values: Dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in fields:
            raise ValueError(f"--reference {item!r}: expected KEY=VALUE with KEY one of {', '.join(fields)}")
        kind = str(fields[key].type)
        if "bool" in kind:
            values[key] = text.strip().lower() in ("1", "true", "yes", "on")
        elif "Optional[float]" in kind or kind == "float":
            values[key] = None if text.strip().lower() == "none" else float(text)
        elif "int" in kind:
            values[key] = int(text)
        else:
            values[key] = text.strip()
    recipe = ReferenceRecipe(**values)
    recipe.validate()
    return recipe


# --------------------------------------------------------------------------------------------------------- data
@dataclasses.dataclass(frozen=True)
class Split:
    """One converted dataset both sides train on: ``fold`` is ``"default"`` or ``"k/K"``."""

    fold: str
    data_dir: Path


def _convert(inputs: Sequence[Path], out: Path, split_by_file: bool) -> Path:
    if (out / "metadata.json").is_file():
        return out  # convert itself would re-check; skipping it keeps a resumed protocol quick
    convert(ConvertOptions(dataset="criteo", inputs=[str(p) for p in inputs], out=str(out), mode="paper",
                           split_by_file=split_by_file, progress=False))
    return out


def prepare_splits(raw: Path, work: Path, folds: int, fold_seed: int = 0,
                   only: Optional[Sequence[int]] = None) -> List[Split]:
    """Converts ``raw`` once per split: convert's default 8:1:1 split (``folds`` 0), or K cross-validation folds.

    Fold files (``work/raw/folds-K-seed-S/fold-k/{train,heldout}.txt``) hold the raw lines of the rows; the raw
    file itself is only read.
    """
    if folds == 0:
        return [Split("default", _convert([raw], work / "data" / "default", split_by_file=False))]
    if folds < 2:
        raise ValueError(f"--folds: 0 (convert's default split) or >= 2, got {folds}")
    lines = raw.read_bytes().splitlines(keepends=True)
    lines = [line if line.endswith(b"\n") else line + b"\n" for line in lines if line.strip()]
    order = np.random.default_rng(fold_seed).permutation(len(lines))
    chunks = np.array_split(order, folds)
    splits: List[Split] = []
    for k in range(folds) if only is None else only:
        if not 0 <= k < folds:
            raise ValueError(f"--fold-list: fold {k} is outside 0..{folds - 1}")
        name = f"folds-{folds}-seed-{fold_seed}"
        files = work / "raw" / name / f"fold-{k}"
        train, heldout = files / "train.txt", files / "heldout.txt"
        if not heldout.is_file():
            files.mkdir(parents=True, exist_ok=True)
            held = set(chunks[k].tolist())
            train.write_bytes(b"".join(lines[i] for i in order if i not in held))
            tmp = files / "heldout.txt.tmp"
            tmp.write_bytes(b"".join(lines[i] for i in chunks[k]))
            os.replace(tmp, heldout)
        data = _convert([train, heldout], work / "data" / name / f"fold-{k}", split_by_file=True)
        splits.append(Split(f"{k}/{folds}", data))
    return splits


def read_split(meta: DatasetMetadata, data_dir: Path, split: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``[N, F]`` int64 ids (fields in schema order) and ``[N]`` float labels of one split, in file order."""
    import pyarrow.parquet as pq

    names = meta.field_names
    ids, labels = [], []
    for path in meta.splits[split].files:
        table = pq.read_table(data_dir / path, columns=["label", *names])
        ids.append(np.stack([table.column(n).to_numpy().astype(np.int64) for n in names], axis=1))
        labels.append(table.column("label").to_numpy().astype(np.float32))
    return torch.from_numpy(np.concatenate(ids)), torch.from_numpy(np.concatenate(labels))


# ------------------------------------------------------------------------------------------------------ metrics
def evaluate_logits(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """AUC and log loss as the package's evaluation computes them (``training.metrics.EvalMetrics``), plus
    ``auc_exact``."""
    from multiembed.training.metrics import EvalMetrics

    n = len(labels)
    metrics = EvalMetrics(rows_per_rank=n, batch_size=n, world_size=1, rank=0, device=torch.device("cpu"))
    metrics.update(logits, labels, torch.ones(n))
    out = metrics.compute()
    both_classes = 0 < int((labels > 0.5).sum()) < n
    out["auc_exact"] = roc_auc(labels.numpy() > 0.5, logits.double().numpy()) if both_classes else float("nan")
    return out


# ---------------------------------------------------------------------------------------------------- reference
@torch.no_grad()
def _predict(model: torch.nn.Module, ids: torch.Tensor, batch: int = 8192) -> torch.Tensor:
    model.eval()
    return torch.cat([model(ids[i:i + batch]) for i in range(0, len(ids), batch)])


def train_reference(model_name: str, data_dir: Path, seed: int, recipe: ReferenceRecipe,
                    log: Any = None) -> Dict[str, Any]:
    """Trains ``model_name`` with the reference recipe on ``data_dir``'s train split; early-stops on val; returns
    val/test metrics of the best state and the run's facts."""
    recipe.validate()
    spec = parse_model_name(model_name)
    if spec.backbone != "dcnv2" or spec.mode not in ("se", "me"):
        raise ValueError(f"the reference re-implements DCNv2 SE / ME only, not {model_name!r}")
    meta = read_metadata(data_dir)
    train_ids, train_y = read_split(meta, data_dir, "train")
    val_ids, val_y = read_split(meta, data_dir, "val")
    test_ids, test_y = read_split(meta, data_dir, "test")
    started = time.perf_counter()
    torch.manual_seed(seed)
    model = PaperMultiDCNv2(list(meta.vocab_sizes.values()), num_sets=spec.num_sets, set_dim=spec.set_dim,
                            hidden=recipe.hidden, dropout=recipe.dropout)
    if recipe.table_optimizer == "adam":
        optimizers = [torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)]
    else:
        tables = list(model.embeddings.parameters())
        table_ids = {id(p) for p in tables}
        dense = [p for p in model.parameters() if id(p) not in table_ids]
        table_lr = 0.05 if recipe.table_lr is None else recipe.table_lr
        optimizers = [torch.optim.Adagrad(tables, lr=table_lr, eps=1e-8),
                      torch.optim.Adam(dense, lr=recipe.lr, weight_decay=recipe.weight_decay)]
    order_gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_y), generator=order_gen)
    n, batch = len(train_y), recipe.batch_size
    starts = list(range(0, n - batch + 1 if recipe.drop_last else n, batch))
    best_auc, best_state, best_step, since_best, step, evaluations = 0.0, None, -1, 0, 0, 0
    history: List[Dict[str, float]] = []
    stop = False
    for epoch in range(recipe.max_epochs):
        if recipe.order == "epoch" and epoch > 0:
            order = torch.randperm(n, generator=order_gen)
        for start in starts:
            index = order[start:start + batch]
            if len(index) >= 2:  # BatchNorm cannot train on one row (difference 6)
                model.train()
                for optimizer in optimizers:
                    optimizer.zero_grad()
                loss = F.binary_cross_entropy_with_logits(model(train_ids[index]), train_y[index])
                loss.backward()
                for optimizer in optimizers:
                    optimizer.step()
                step += 1
            due = (recipe.eval_every and step % recipe.eval_every == 0) or (
                not recipe.eval_every and start == starts[-1])
            if not due:
                continue
            val = evaluate_logits(_predict(model, val_ids), val_y)
            evaluations += 1
            history.append({"epoch": epoch, "step": step, "val_auc": val["auc"]})
            if val["auc"] > best_auc:
                best_auc, best_step, since_best = val["auc"], step, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                since_best += 1
                if recipe.patience and since_best >= recipe.patience:
                    stop = True
                    break
        if stop:
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    val = evaluate_logits(_predict(model, val_ids), val_y)
    test = evaluate_logits(_predict(model, test_ids), test_y)
    return {
        "side": "reference",
        "model": model_name,
        "seed": seed,
        "recipe": dataclasses.asdict(recipe),
        "best_step": best_step,
        "steps": step,
        "epochs_run": round(step / max(len(starts), 1), 3),
        "evaluations": evaluations,
        "history": history,
        **{f"val_{k}": v for k, v in val.items()},
        **{f"test_{k}": v for k, v in test.items()},
        "train_rows": n,
        "wall_s": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------------------ package
# What ``multiembed train`` resolves to on CPU with no tuning options: the recipe the parity protocol (this module,
# ``--seeds 10 --folds 5``) measures. Each package run records its departures from it (``recipe_departures``), and tests/test_parity.py checks
# that train's defaults still resolve to it: change a default, and the protocol must be run again before this changes.
CERTIFIED_CPU_RECIPE: Dict[str, Dict[str, Any]] = {
    "options": {
        "epochs": 10, "batch_size": 2048, "patience": 3, "eval_every": 0, "max_steps": 0, "hidden": 400,
        "dropout": 0.2, "layout": "fused", "precision": "fp32", "table_dtype": "fp32", "combiner": "mean",
        "spectral_reg": 0.0, "dense_features": False, "output_bias": "prior",
    },
    "optimizer": {
        "sparse_optimizer": "adagrad", "sparse_lr": 0.05, "sparse_weight_decay": 0.0, "lr": 0.001,
        "weight_decay": 1e-06, "dense_optimizer": "adam", "warmup_steps": 0, "decay_start": 0, "decay_steps": 0,
    },
}


def recipe_departures(config: Mapping[str, Any]) -> Dict[str, List[Any]]:
    """``{"options.KEY" | "optimizer.KEY": [certified, recorded]}`` for every key of :data:`CERTIFIED_CPU_RECIPE`
    where a run's ``config.json`` differs (empty: the run used the certified recipe)."""
    departures: Dict[str, List[Any]] = {}
    for section, expected in CERTIFIED_CPU_RECIPE.items():
        recorded = config.get(section, {})
        for key, value in expected.items():
            if recorded.get(key) != value:
                departures[f"{section}.{key}"] = [value, recorded.get(key)]
    return departures


def train_package(model_name: str, data_dir: Path, seed: int, run_dir: Path, extra: Sequence[str] = ()) -> Dict[str, Any]:
    """``multiembed train`` with its defaults (plus ``extra`` words) in a subprocess; returns its summary."""
    command = [sys.executable, "-m", "multiembed.cli", "train", "--data", str(data_dir), "--out", str(run_dir),
               "--model", model_name, "--seed", str(seed), "--no-progress", "--overwrite", *extra]
    started = time.perf_counter()
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "w", encoding="utf-8") as log:
        proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"{shlex.join(command)} exited {proc.returncode}:\n{tail}")
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    return {
        "side": "package",
        "model": model_name,
        "seed": seed,
        "command": shlex.join(command),
        "optimizer": config.get("optimizer"),
        "recipe_departures": recipe_departures(config),
        "options": {k: config["options"].get(k) for k in ("batch_size", "epochs", "patience", "eval_every", "lr",
                                                          "sparse_lr", "sparse_optimizer", "dropout", "hidden")},
        **{k: summary.get(k) for k in ("best_step", "steps", "epochs_run")},
        **{k: v for k, v in summary.items() if k.startswith(("val_", "test_"))},
        "wall_s": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------------------ protocol
def run_key(side: str, model: str, fold: str, seed: int) -> str:
    return f"{side}/{model}/fold-{fold.replace('/', 'of')}/seed-{seed}"


def run_protocol(
    splits: Sequence[Split], models: Sequence[str], seeds: Sequence[int], work: Path, *, tag: str,
    recipe: ReferenceRecipe, package_args: Sequence[str] = (), sides: Sequence[str] = SIDES, log: Any = None,
    reference_tag: Optional[str] = None,
) -> List[Dict[str, Any]]:
    """Every (model, split, seed) on both sides; a run whose ``result.json`` exists is read, not rerun.

    Reference runs live under ``reference_tag`` when given (the finished reference runs of another configuration,
    shared by package configurations that differ only on the package side), else under ``tag``. Each result records
    the dataset directory and its split identity, so the pairing can be checked.
    """
    log = log or sys.stderr
    results: List[Dict[str, Any]] = []
    for split in splits:
        meta = read_metadata(split.data_dir)
        identity = split_identity(meta)
        for model in models:
            for seed in seeds:
                for side in sides:
                    side_tag = reference_tag if side == "reference" and reference_tag else tag
                    out = work / "runs" / side_tag / run_key(side, model, split.fold, seed)
                    done = out / RESULT_FILE
                    if done.is_file():
                        results.append(json.loads(done.read_text(encoding="utf-8")))
                        continue
                    print(f"[parity] {tag}: {side} {model} fold {split.fold} seed {seed} ...", file=log, flush=True)
                    if side == "reference":
                        result = train_reference(model, split.data_dir, seed, recipe)
                    else:
                        result = train_package(model, split.data_dir, seed, out / "run", package_args)
                    result.update(fold=split.fold, data_dir=str(split.data_dir), split_identity=identity,
                                  rows=meta.split_rows(), tag=tag)
                    out.mkdir(parents=True, exist_ok=True)
                    tmp = out / (RESULT_FILE + ".tmp")
                    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
                    os.replace(tmp, done)
                    print(f"[parity]   val auc {result['val_auc']:.5f} test auc {result['test_auc']:.5f} "
                          f"({result['wall_s']:.0f} s, {result.get('epochs_run')} epochs)", file=log, flush=True)
                    results.append(result)
    return results


# ----------------------------------------------------------------------------------------------------- statistics
# Two-sided 95 % quantiles of Student's t by degrees of freedom (no scipy in the stack).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 50: 2.009, 60: 2.000, 80: 1.990, 100: 1.984, 120: 1.980}


def t975(df: int) -> float:
    """The 97.5 % quantile of Student's t with ``df`` degrees of freedom (table; the next smaller tabulated df
    between entries, which errs wide; 1.96 beyond 120)."""
    if df < 1:
        return float("nan")
    if df > 120:
        return 1.960
    return _T975[max(k for k in _T975 if k <= df)]


def mean_interval(values: Sequence[float]) -> Dict[str, Any]:
    """Mean, standard deviation and the t-based 95 % interval of the mean."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    mean = float(x.mean()) if n else float("nan")
    sd = float(x.std(ddof=1)) if n > 1 else float("nan")
    half = t975(n - 1) * sd / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "sd": sd, "ci95": [mean - half, mean + half]}


def fold_means_interval(folds: Sequence[str], diffs: Sequence[float]) -> Optional[Dict[str, Any]]:
    """The interval over per-fold means of paired differences (``diffs[i]`` from split ``folds[i]``); seeds on one
    split share its rows, so this one does not treat them as independent (df = folds - 1). None with one split."""
    by_fold: Dict[str, List[float]] = {}
    for fold, d in zip(folds, diffs):
        by_fold.setdefault(fold, []).append(d)
    return mean_interval([float(np.mean(v)) for v in by_fold.values()]) if len(by_fold) > 1 else None


def paired_table(results: Iterable[Mapping[str, Any]], models: Sequence[str]) -> List[Dict[str, Any]]:
    """Per model and metric: both sides' mean and sd, and the paired difference (package - reference) with its 95 %
    interval over pairs (same model, split and seed); with several splits also over split means (``diff_by_fold``,
    :func:`fold_means_interval`).

    Raises:
        ValueError: a pair whose two sides trained on different splits.
    """
    by_key: Dict[Tuple[str, str, int], Dict[str, Mapping[str, Any]]] = {}
    for r in results:
        by_key.setdefault((r["model"], r["fold"], int(r["seed"])), {})[r["side"]] = r
    rows: List[Dict[str, Any]] = []
    for model in models:
        pairs = [(k, v) for k, v in sorted(by_key.items()) if k[0] == model and set(SIDES) <= set(v)]
        for key, pair in pairs:
            if pair["reference"].get("split_identity") != pair["package"].get("split_identity") or \
                    pair["reference"].get("data_dir") != pair["package"].get("data_dir"):
                raise ValueError(f"pair {key}: the two sides trained on different splits")
        for metric in METRICS:
            ref = [p["reference"][metric] for _, p in pairs]
            pkg = [p["package"][metric] for _, p in pairs]
            diff = [b - a for a, b in zip(ref, pkg)]
            by_fold = fold_means_interval([k[1] for k, _ in pairs], diff)
            row = {
                "model": model, "metric": metric, "pairs": len(pairs), "folds": len({k[1] for k, _ in pairs}),
                "reference": mean_interval(ref), "package": mean_interval(pkg), "diff": mean_interval(diff),
            }
            if by_fold is not None:
                row["diff_by_fold"] = by_fold
            rows.append(row)
    return rows


def factor_effects(results: Sequence[Mapping[str, Any]], work: Path, baseline_tag: str) -> List[Dict[str, Any]]:
    """Single-factor effects: each run of ``results`` against the same side, model, split and seed of the runs in
    ``work/runs/BASELINE_TAG`` (this configuration - baseline), per metric, with the 95 % interval over pairs.
    Runs without a finished baseline counterpart are left out, and so are the baseline's own runs (e.g. reference
    runs reused through ``--reference-tag``), which have no effect to show."""
    rows: List[Dict[str, Any]] = []
    groups: Dict[Tuple[str, str], List[Tuple[Mapping[str, Any], Mapping[str, Any]]]] = {}
    for r in results:
        if r.get("tag") == baseline_tag:
            continue
        base = work / "runs" / baseline_tag / run_key(r["side"], r["model"], r["fold"], int(r["seed"])) / RESULT_FILE
        if base.is_file():
            groups.setdefault((r["side"], r["model"]), []).append((r, json.loads(base.read_text(encoding="utf-8"))))
    for (side, model), pairs in sorted(groups.items()):
        for metric in METRICS:
            rows.append({"side": side, "model": model, "metric": metric, "pairs": len(pairs),
                         "baseline": mean_interval([b[metric] for _, b in pairs]),
                         "this": mean_interval([r[metric] for r, _ in pairs]),
                         "diff": mean_interval([r[metric] - b[metric] for r, b in pairs])})
    return rows


# The rule for "the package matches the reference" on a model, read on the paired test AUC difference.
RULE_METRIC = "test_auc"
RULE_MIN_MEAN = -0.002
RULE_MIN_LOWER = -0.005


def rule_verdicts(rows: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """Per model: does package - reference on :data:`RULE_METRIC` have mean >= :data:`RULE_MIN_MEAN` and 95 % lower
    end >= :data:`RULE_MIN_LOWER`? Judged on the interval over pairs and, stricter, over fold means
    (``by_fold``, df = folds - 1; None with one split)."""
    verdicts = []
    for r in rows:
        if r["metric"] != RULE_METRIC:
            continue
        diff = r["diff"]
        by_fold = r.get("diff_by_fold")
        verdicts.append({
            "model": r["model"], "metric": RULE_METRIC, "pairs": r["pairs"], "mean": diff["mean"],
            "lower": diff["ci95"][0], "passes": diff["mean"] >= RULE_MIN_MEAN and diff["ci95"][0] >= RULE_MIN_LOWER,
            "lower_by_fold": by_fold["ci95"][0] if by_fold else None,
            "passes_by_fold": (by_fold["mean"] >= RULE_MIN_MEAN and by_fold["ci95"][0] >= RULE_MIN_LOWER)
            if by_fold else None,
        })
    return verdicts


def model_contrasts(results: Iterable[Mapping[str, Any]], first: str, second: str) -> List[Dict[str, Any]]:
    """``first - second`` (e.g. ME 4x - SE 4x) per side and metric, paired over runs of the same split and seed,
    with the 95 % interval over pairs and over fold means."""
    by_key: Dict[Tuple[str, str, str, int], Mapping[str, Any]] = {
        (r["side"], r["model"], r["fold"], int(r["seed"])): r for r in results}
    rows: List[Dict[str, Any]] = []
    for side in SIDES:
        keys = sorted((f, sd) for (sd_side, m, f, sd) in by_key if sd_side == side and m == first
                      and (side, second, f, sd) in by_key)
        if not keys:
            continue
        for metric in METRICS:
            diffs = [by_key[(side, first, f, sd)][metric] - by_key[(side, second, f, sd)][metric] for f, sd in keys]
            rows.append({"side": side, "first": first, "second": second, "metric": metric, "pairs": len(keys),
                         "diff": mean_interval(diffs),
                         "diff_by_fold": fold_means_interval([f for f, _ in keys], diffs)})
    return rows


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The parity table as Markdown."""
    lines = ["| model | metric | reference mean (sd) | package mean (sd) | package - reference [95% CI] | pairs |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ref, pkg, diff = r["reference"], r["package"], r["diff"]
        lo, hi = diff["ci95"]
        lines.append(
            f"| {r['model']} | {r['metric']} | {ref['mean']:.5f} ({ref['sd']:.5f}) | {pkg['mean']:.5f} "
            f"({pkg['sd']:.5f}) | {diff['mean']:+.5f} [{lo:+.5f}, {hi:+.5f}] | {r['pairs']} |"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------ CLI
def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m multiembed.benchmarks.parity", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--raw", required=True, type=Path, help="Criteo train.txt rows (read in place)")
    p.add_argument("--work", required=True, type=Path,
                   help="work directory: converted datasets, fold files, every run (resumable)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated model names")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per model and split (default 3)")
    p.add_argument("--folds", type=int, default=0,
                   help="K-fold cross-validation over the file's rows (0: convert's default 8:1:1 split)")
    p.add_argument("--fold-list", default=None, help="only these folds, e.g. 0,1 (default: all)")
    p.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment (default 0)")
    p.add_argument("--sides", default=",".join(SIDES), help="reference,package (default both)")
    p.add_argument("--reference", nargs="*", default=[], metavar="KEY=VALUE",
                   help="reference recipe departures (ReferenceRecipe fields), e.g. table_optimizer=adagrad")
    p.add_argument("--package-args", default="", help="extra words for multiembed train, e.g. '--epochs 100'")
    p.add_argument("--tag", default="defaults", help="name of this configuration (its runs live in work/runs/TAG)")
    p.add_argument("--reference-tag", default=None,
                   help="read (and run missing) reference runs under work/runs/REFERENCE_TAG instead of TAG, for a "
                        "package-side factor paired with the reference runs already made, e.g. 'defaults'")
    p.add_argument("--baseline-tag", default=None,
                   help="also print this configuration's paired effect against the runs of TAG (same side, model, "
                        "split, seed): a single factor's measured effect")
    p.add_argument("--json", type=Path, default=None, help="write runs and table as JSON here")
    args = p.parse_args(argv)

    started = time.perf_counter()
    recipe = parse_recipe(args.reference)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    if not set(sides) <= set(SIDES):
        p.error(f"--sides: choose from {', '.join(SIDES)}")
    only = [int(k) for k in args.fold_list.split(",")] if args.fold_list else None
    splits = prepare_splits(args.raw.resolve(), args.work.resolve(), args.folds, args.fold_seed, only)
    results = run_protocol(splits, models, list(range(args.seeds)), args.work.resolve(), tag=args.tag,
                           recipe=recipe, package_args=shlex.split(args.package_args), sides=sides,
                           reference_tag=args.reference_tag)
    rows = paired_table(results, models) if set(sides) == set(SIDES) else []
    verdicts = rule_verdicts(rows)
    contrasts = [c for a, b in CONTRASTS if a in models and b in models for c in model_contrasts(results, a, b)]
    effects = factor_effects(results, args.work.resolve(), args.baseline_tag) if args.baseline_tag else []
    wall = time.perf_counter() - started
    if rows:
        print(format_table(rows))
    for v in verdicts:
        fold_part = "" if v["passes_by_fold"] is None else (
            f"; over fold means lower {v['lower_by_fold']:+.5f}: {'PASS' if v['passes_by_fold'] else 'FAIL'}")
        print(f"[rule] {v['model']}: package - reference {v['metric']} mean {v['mean']:+.5f} (>= {RULE_MIN_MEAN}), "
              f"95% lower end {v['lower']:+.5f} (>= {RULE_MIN_LOWER}) over {v['pairs']} pairs: "
              f"{'PASS' if v['passes'] else 'FAIL'}{fold_part}")
    for c in contrasts:
        lo, hi = c["diff"]["ci95"]
        fold_part = "" if c["diff_by_fold"] is None else (
            " (over fold means [{:+.5f}, {:+.5f}])".format(*c["diff_by_fold"]["ci95"]))
        print(f"[contrast] {c['side']} {c['first']} - {c['second']} {c['metric']}: {c['diff']['mean']:+.5f} "
              f"[{lo:+.5f}, {hi:+.5f}] over {c['pairs']} pairs{fold_part}")
    for e in effects:
        lo, hi = e["diff"]["ci95"]
        print(f"[effect vs {args.baseline_tag}] {e['side']} {e['model']} {e['metric']}: {e['baseline']['mean']:.5f} -> "
              f"{e['this']['mean']:.5f}, {e['diff']['mean']:+.5f} [{lo:+.5f}, {hi:+.5f}] over {e['pairs']} pairs")
    print(f"[parity] {len(results)} runs ({args.tag}; reference departures {recipe.differences() or 'none'}; "
          f"package args {args.package_args or 'none'}); wall {wall:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "command": shlex.join([sys.executable, "-m", "multiembed.benchmarks.parity", *(argv or sys.argv[1:])]),
            "tag": args.tag, "reference_tag": args.reference_tag, "raw": str(args.raw), "folds": args.folds,
            "fold_seed": args.fold_seed,
            "seeds": args.seeds, "models": models, "reference_recipe": dataclasses.asdict(recipe),
            "reference_departures": recipe.differences(), "package_args": args.package_args,
            "wall_s": wall, "table": rows, "rule": verdicts, "contrasts": contrasts, "baseline_tag": args.baseline_tag,
            "effects": effects, "runs": results,
        }
        atomic_write_text(args.json, json.dumps(record, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
