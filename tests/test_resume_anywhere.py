"""Resuming a run on another world size (2 gloo ranks -> 1 and 1 -> 2), default optimizers and ``auto`` sharding:
the state loaded on the new world size, gathered, equals the checkpoint's; the rows trained after the resume are
exactly the rows the epoch had left; the run finishes. (Final AUCs of such runs are a benchmark matter, not a test.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from dist_utils import run_ranks

from multiembed.cli import main as cli_main

pytestmark = pytest.mark.multiprocess

GLOBAL_BATCH = 256
FIRST_STEPS, TOTAL_STEPS = 2, 5


def _options(data: str, run: str, max_steps: int, resume: bool) -> Dict[str, Any]:
    return dict(
        data=data, out=run, model="dcnv2-me-2x", batch_size=GLOBAL_BATCH, hidden=16, epochs=1, max_steps=max_steps,
        patience=0, progress=False, device="cpu", resume=resume, ia_every=0,
    )


def _full_state(checkpoint: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint, whole (read in this one process), under keys that name the same state on any
    plan (the sparse optimizer's wrapper names dropped; Adagrad's accumulator under one name for both
    implementations)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import metadata as dcp_metadata

    from multiembed.training.checkpoint import SafeFileSystemReader
    from multiembed.training.resume import _accumulator_of, _without_wrappers

    reader = SafeFileSystemReader(str(checkpoint))
    entries = reader.read_metadata().state_dict_metadata
    template = {
        key: torch.zeros(tuple(entry.size), dtype=entry.properties.dtype)
        for key, entry in entries.items()
        if isinstance(entry, dcp_metadata.TensorStorageMetadata) and key.startswith(("model.", "optim.state."))
        and not key.endswith(".step") and len(entry.size) > 0 and min(entry.size) > 0
    }
    dcp.load(template, storage_reader=reader, no_dist=True)
    return {(_accumulator_of(k) or _without_wrappers(k)): v.double() for k, v in template.items()}


def _phase(rank: int, world_size: int, data: str, run: str, max_steps: int, resume: bool, record: str) -> None:
    from multiembed.config import TrainConfig
    from multiembed.training.trainer import Trainer

    import torch.distributed.checkpoint as dcp

    rows: List[int] = []

    class Recording(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            loader, original = self.train_loader, self.train_loader.iter_epoch

            def iter_epoch(epoch: int, start_batch: int = 0):
                order, _ = loader.epoch_rows(epoch)
                for i, batch in enumerate(original(epoch, start_batch=start_batch)):
                    b = start_batch + i
                    rows.extend(int(r) for r in order[b * loader.batch_size : (b + 1) * loader.batch_size])
                    yield batch

            loader.iter_epoch = iter_epoch

        def restore(self, path: Path) -> None:
            super().restore(path)
            # What this job now holds, written out as it is sharded here, to be compared with what was saved.
            dcp.save(self._state(), checkpoint_id=f"{record}.loaded")

    trainer = Recording(TrainConfig(**_options(data, run, max_steps, resume)))
    trainer.fit()
    torch.save({"rows": rows, "step": trainer.state.step}, f"{record}.rank{rank}.pt")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("anywhere") / "data"
    assert cli_main(["synth", "--rows", "2000", "--out", str(out), "--seed", "6", "--scale", "0.001", "--no-progress"]) == 0
    return out


def _run(world_size: int, data: Path, run: Path, max_steps: int, resume: bool, record: Path) -> List[Dict[str, Any]]:
    if world_size == 1:
        from multiembed.training.distributed import destroy

        try:
            _phase(0, 1, str(data), str(run), max_steps, resume, str(record))
        finally:
            destroy()
    else:
        run_ranks(_phase, world_size, str(data), str(run), max_steps, resume, str(record))
    return [torch.load(f"{record}.rank{r}.pt", weights_only=False) for r in range(world_size)]


@pytest.mark.parametrize("first, second", [(2, 1), (1, 2)], ids=["2-ranks-then-1", "1-rank-then-2"])
def test_resume_on_another_world_size(data: Path, tmp_path: Path, first: int, second: int) -> None:
    from multiembed.data.loader import ParquetBatchLoader

    import shutil

    run = tmp_path / "run"
    before = _run(first, data, run, FIRST_STEPS, False, tmp_path / "first")
    # A copy of the checkpoint the second job resumes from: the run's retention may delete it once a later
    # evaluation is better.
    shutil.copytree(run / "checkpoints" / f"step-{FIRST_STEPS:08d}", tmp_path / "resumed-from")
    after = _run(second, data, run, TOTAL_STEPS, True, tmp_path / "second")

    # The state loaded on the new world size is the checkpoint's.
    saved = _full_state(tmp_path / "resumed-from")
    loaded = _full_state(Path(f"{tmp_path / 'second'}.loaded"))
    assert set(saved) == set(loaded) and any("#adagrad" in k for k in saved) and len(saved) > 40
    for key in saved:
        assert torch.allclose(loaded[key], saved[key], atol=1e-6, rtol=0), key

    # Rows: the first job trained global batches [0, 2), the resumed one exactly [2, 5) of the same epoch order.
    order, _ = ParquetBatchLoader(data, "train", GLOBAL_BATCH, shuffle=True, seed=0).epoch_rows(0)
    seen_before = sorted(r for rank in before for r in rank["rows"])
    seen_after = sorted(r for rank in after for r in rank["rows"])
    assert seen_before == sorted(int(r) for r in order[: FIRST_STEPS * GLOBAL_BATCH])
    assert seen_after == sorted(int(r) for r in order[FIRST_STEPS * GLOBAL_BATCH : TOTAL_STEPS * GLOBAL_BATCH])
    assert not set(seen_before) & set(seen_after)

    assert after[0]["step"] == TOTAL_STEPS
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == TOTAL_STEPS and summary["world_size"] == second
