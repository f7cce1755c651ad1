"""Resuming anywhere: a checkpoint's state matched to the state of a job on another world size or sharding.

DCP reshards tensors by itself: a table saved in any sharding loads into any other (its shards are read by
overlap), and so does optimizer state that has the same shape in both. What changes with the plan is which
optimizer *implementation* updates a table, and the per-rank keys:

* a table that is sharded in one plan and data-parallel in the other (``auto`` decides per table and world size)
  is updated by FBGEMM's fused kernel in one and by torch's optimizer in the other
  (:func:`multiembed.training.optim.table_update_rule`): their state has other names. Element-wise Adagrad is the
  same update in both, its accumulator ``momentum1`` (fused) is torch's ``sum``; it is translated key to key.
  Other optimizers' state has no exact translation here (Adam's step counts differ between the two), so the
  resume is refused in one line;
* row-wise Adagrad keeps one accumulator per row *of each column shard*: saved column-wise it cannot become one
  table's accumulator (another shape): refused in one line;
* ``rank{r}`` RNG state exists only for the ranks that saved it; ranks new to the job are seeded from
  ``(seed, step, rank)``;
* scalars that the run's options define (param groups: learning rates, betas; torch Adagrad's ``step``, which
  only scales ``lr_decay``, 0 here) keep the values this job built from the same options.

:func:`match_saved_state` makes that decision key by key, before anything is loaded.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

# Path components the sparse optimizer's wrappers insert (CombinedOptimizer names) when a plan mixes fused and
# data-parallel tables; a key with or without them names the same table's state.
_WRAPPER_NAMES = ("fused", "replicated")
# Element-wise Adagrad's accumulator: FBGEMM's fused kernel names it ``<param>.<table>.momentum1``, torch's Adagrad
# ``<param>.sum``.
_FUSED_ACCUMULATOR = re.compile(r"^(optim\.state\.sparse\..*\.weight)\.[^.]+\.momentum1$")
_TORCH_ACCUMULATOR = re.compile(r"^(optim\.state\.sparse\..*\.weight)\.sum$")
_TORCH_STEP = re.compile(r"^optim\.state\.sparse\..*\.weight\.step$")


def _without_wrappers(key: str) -> str:
    parts = key.split(".")
    if len(parts) > 3 and parts[0] == "optim" and parts[2] == "sparse":
        parts = parts[:3] + [p for i, p in enumerate(parts[3:]) if not (i == 0 and p in _WRAPPER_NAMES)]
    return ".".join(parts)


def _accumulator_of(key: str) -> Optional[str]:
    """``optim.state.sparse.<param>#adagrad`` for an element-wise Adagrad accumulator key (either implementation)."""
    plain = _without_wrappers(key)
    for pattern in (_FUSED_ACCUMULATOR, _TORCH_ACCUMULATOR):
        match = pattern.match(plain)
        if match:
            return match.group(1) + "#adagrad"
    return None


def is_rank_state(key: str) -> bool:
    """Whether ``key`` is per-rank state (``rank{r}...``), saved only by the ranks of the saving job."""
    return re.match(r"^rank\d+\.", key) is not None


def match_saved_state(
    template: Mapping[str, Any],
    saved: Mapping[str, Optional[Tuple[int, ...]]],
    sizes: Mapping[str, Optional[Tuple[int, ...]]],
    *,
    sparse_optimizer: str,
    where: str,
) -> Tuple[Dict[str, str], List[str]]:
    """Pairs every key of this job's (flattened) state with the checkpoint key that holds its value.

    Args:
        template: this job's flattened state (``flatten_state_dict`` of the trainer's state).
        saved: the checkpoint's keys and their tensor sizes (None: a non-tensor value).
        sizes: the sizes of ``template``'s tensors (None: a non-tensor value).
        sparse_optimizer: the run's sparse optimizer.
        where: the checkpoint's path, for messages.

    Returns:
        ``(pairs, kept)``: template key -> checkpoint key for everything loaded, and the template keys that keep
        this job's value (per-rank state of ranks new to the job, option-defined scalars).

    Raises:
        ValueError: state that cannot be converted exactly (one line, saying why).
    """
    by_plain: Dict[str, str] = {}
    by_accumulator: Dict[str, str] = {}
    for key in saved:
        by_plain.setdefault(_without_wrappers(key), key)
        accumulator = _accumulator_of(key)
        if accumulator is not None:
            by_accumulator[accumulator] = key
    pairs: Dict[str, str] = {}
    kept: List[str] = []
    for key in template:
        if key in saved:
            found: Optional[str] = key
        else:
            found = by_plain.get(_without_wrappers(key))
            accumulator = _accumulator_of(key)
            if found is None and accumulator is not None and accumulator in by_accumulator:
                if sparse_optimizer != "adagrad":
                    raise ValueError(
                        f"{where}: {key} is kept by another optimizer implementation on this plan, and "
                        f"{sparse_optimizer}'s state has no exact translation between them; resume with the "
                        "checkpoint's --sharding and world size"
                    )
                found = by_accumulator[accumulator]
        if found is None:
            if is_rank_state(key) or ".param_groups." in key or key.startswith("optim.param_groups") or _TORCH_STEP.match(
                _without_wrappers(key)
            ):
                kept.append(key)
                continue
            if key.startswith("optim.state.sparse"):
                raise ValueError(
                    f"{where}: holds no state for {key} (the table's optimizer state was saved under another "
                    "implementation or sharding that cannot be converted exactly); resume with the checkpoint's "
                    "--sharding and world size"
                )
            raise ValueError(f"{where}: has no entry {key}; it was not written by a run of this model and options")
        want, have = sizes.get(key), saved.get(found)
        if want is not None and have is not None and tuple(want) != tuple(have):
            why = (
                " (row-wise Adagrad keeps one accumulator per row of each column shard: saved under one sharding it "
                "cannot become another's)"
                if sparse_optimizer == "rowwise_adagrad"
                else ""
            )
            raise ValueError(
                f"{where}: {found} has shape {list(have)} but this plan holds {list(want)} for it{why}; resume with "
                "the checkpoint's --sharding and world size"
            )
        pairs[key] = found
    return pairs, kept


def describe(kept: Sequence[str]) -> str:
    """A one-line account of the state that kept this job's values (for the resume log line)."""
    ranks = sorted({k.split(".", 1)[0] for k in kept if is_rank_state(k)})
    others = [k for k in kept if not is_rank_state(k)]
    parts = []
    if ranks:
        parts.append(f"new ranks seeded afresh ({', '.join(ranks)})")
    if others:
        parts.append(f"{len(others)} option-defined value(s) from this job's options")
    return "; ".join(parts)
