"""The trainer's typed state: where each segment ends, what is due after it (evaluate, checkpoint, stop), and the
exact round trip through a checkpoint's tensors."""

from __future__ import annotations

import dataclasses
from typing import List, Tuple

import torch

from multiembed.config import TrainConfig
from multiembed.training.state import Due, TrainingState


def _config(**options: int) -> TrainConfig:
    return TrainConfig(data="data", model="dnn-me-2x", out="run", **options)


def _run(config: TrainConfig, num_batches: int, aucs: List[float]) -> List[Tuple[int, int, Due]]:
    """The trainer's loop with the training left out: ``(epoch, step, due)`` after each segment."""
    state, seen = TrainingState(), []
    while not state.done:
        start = state.batch
        stop = state.segment_end(config, num_batches)
        state.advance(stop - start, stop, seconds=1.0, batch_size=8)
        due = state.due(config, num_batches)
        if due.evaluate:
            state.record_evaluation(aucs[state.evaluations])
        seen.append((state.epoch, state.step, due))
        state.end_segment(config, num_batches)
    return seen


def test_segments_end_at_every_evaluation_and_checkpoint_step_and_at_each_epoch_end() -> None:
    config = _config(epochs=2, eval_every=3, checkpoint_every=2, patience=0)
    seen = _run(config, num_batches=4, aucs=[0.6, 0.7, 0.8])
    assert seen == [
        (0, 2, Due(evaluate=False, checkpoint=True)),
        (0, 3, Due(evaluate=True, checkpoint=True)),
        (0, 4, Due(evaluate=False, checkpoint=True)),
        (1, 6, Due(evaluate=True, checkpoint=True)),
        (1, 8, Due(evaluate=True, checkpoint=True)),  # the last step of the last epoch is always evaluated
    ]


def test_without_eval_every_each_epoch_end_is_evaluated_and_max_steps_ends_training_with_an_evaluation() -> None:
    seen = _run(_config(epochs=10, max_steps=5, patience=0), num_batches=4, aucs=[0.6, 0.7])
    assert seen == [(0, 4, Due(evaluate=True, checkpoint=True)), (1, 5, Due(evaluate=True, checkpoint=True))]


def test_patience_counts_evaluations_without_a_better_auc() -> None:
    config = _config(epochs=10, patience=2)
    seen = _run(config, num_batches=3, aucs=[0.7, 0.8, 0.75, 0.79])
    assert [step for _, step, _ in seen] == [3, 6, 9, 12]
    state = TrainingState(best_auc=0.8, best_step=6, evals_since_best=2)
    assert state.patience_exhausted(config) and state.finished(config)
    assert not state.finished(_config(epochs=10, patience=3))  # a larger --patience continues a resumed run


def test_larger_epochs_or_max_steps_extend_a_finished_run() -> None:
    state = TrainingState(epoch=2, step=8)
    assert state.finished(_config(epochs=2, patience=0))
    assert not state.finished(_config(epochs=3, patience=0))
    assert state.finished(_config(epochs=3, max_steps=8, patience=0))
    assert not state.finished(_config(epochs=3, max_steps=9, patience=0))


def test_information_abundance_is_due_every_ia_every_evaluations() -> None:
    config = _config(ia_every=2)
    due = []
    state = TrainingState()
    for auc in (0.5, 0.6, 0.7, 0.8):
        state.record_evaluation(auc)
        due.append(state.information_abundance_due(config))
    assert due == [False, True, False, True]
    assert not state.information_abundance_due(_config(ia_every=0))


def test_the_checkpointed_tensors_hold_every_field_exactly_and_load_back_with_their_types() -> None:
    big = 2**53 + 1  # float64 rounds it: counts are int64
    state = TrainingState(epoch=3, batch=7, step=big, best_auc=0.7654321, best_step=big - 1, evals_since_best=2,
                          evaluations=11, train_time_s=123.456, samples_trained=3 * big, done=True)
    tensors = state.to_tensors()
    assert list(tensors) == [f.name for f in dataclasses.fields(TrainingState)]
    assert tensors["step"].dtype == torch.int64 and tensors["best_auc"].dtype == torch.float64
    loaded = TrainingState()
    loaded.load_tensors({k: v.clone() for k, v in tensors.items()})
    assert loaded == state
    assert [type(getattr(loaded, f.name)) for f in dataclasses.fields(loaded)] == [
        int, int, int, float, int, int, int, float, int, bool
    ]
    assert state.to_dict() == dataclasses.asdict(state) and state.to_dict()["done"] is True
