"""The trainer's progress as one typed record, and the rules that say what is due after each segment of training:
where the next segment ends, whether to evaluate, whether to checkpoint, whether training is over.

Training runs in *segments* that end at every evaluation and every checkpoint (see
:mod:`multiembed.training.trainer`); the state is what a checkpoint saves under ``"progress"``, one exact tensor per
field (int64 counts, float64 times and AUCs), so a resumed run continues exactly where the saved one stopped.
"""

from __future__ import annotations

import dataclasses
from typing import Dict

import torch

from multiembed.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class Due:
    """What is due at the end of a segment.

    Attributes:
        evaluate: validate now (every ``--eval-every`` steps, else at each epoch's end; always at the last step).
        checkpoint: save now (after every evaluation, every ``--checkpoint-every`` steps, and when training is over).
    """

    evaluate: bool
    checkpoint: bool


@dataclasses.dataclass
class TrainingState:
    """Where training stands: the data position, the step, early stopping's bookkeeping and the throughput counters.

    Attributes:
        epoch: the epoch being trained.
        batch: the next batch of that epoch (its index in the epoch's order).
        step: optimizer steps taken so far.
        best_auc: the best validation AUC so far (-1 before any evaluation).
        best_step: the step of that evaluation (-1 before any).
        evals_since_best: evaluations since the best one (early stopping's patience counter).
        evaluations: evaluations so far (lines of ``metrics.jsonl``).
        train_time_s: seconds spent in training segments, over all processes that trained this run.
        samples_trained: rows trained over all ranks.
        done: nothing is left to train.

    Example::

        >>> config = TrainConfig(data="d", model="dnn-me-2x", out="o", epochs=1, eval_every=0, checkpoint_every=0)
        >>> state = TrainingState()
        >>> state.segment_end(config, num_batches=10)
        10
        >>> state.advance(steps=10, stop=10, seconds=2.0, batch_size=256)
        >>> state.due(config, num_batches=10)
        Due(evaluate=True, checkpoint=True)
        >>> state.record_evaluation(0.75), state.best_step
        (True, 10)
        >>> state.end_segment(config, num_batches=10)
        >>> state.epoch, state.batch, state.done
        (1, 0, True)
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_auc: float = -1.0
    best_step: int = -1
    evals_since_best: int = 0
    evaluations: int = 0
    train_time_s: float = 0.0
    samples_trained: int = 0
    done: bool = False

    # ------------------------------------------------------------------------------------------- due rules
    def segment_end(self, config: TrainConfig, num_batches: int) -> int:
        """The batch index (exclusive) where the segment starting at :attr:`batch` ends: the epoch's end, the next
        evaluation or checkpoint step, or ``--max-steps``, whichever comes first."""
        start, stop = self.batch, num_batches
        for every in (config.eval_every, config.checkpoint_every):
            if every:
                stop = min(stop, start + every - (self.step % every))
        if config.max_steps:
            stop = min(stop, start + config.max_steps - self.step)
        return stop

    def due(self, config: TrainConfig, num_batches: int) -> Due:
        """What is due now that a segment ended (call before :meth:`end_segment`)."""
        epoch_done = self.batch >= num_batches
        if config.eval_every:
            evaluate = self.step % config.eval_every == 0
        else:
            evaluate = epoch_done
        evaluate = evaluate or self.at_step_limit(config) or (epoch_done and self.epoch + 1 >= config.epochs)
        periodic = bool(config.checkpoint_every) and self.step % config.checkpoint_every == 0
        return Due(evaluate=evaluate, checkpoint=evaluate or periodic)

    def at_step_limit(self, config: TrainConfig) -> bool:
        """Whether ``--max-steps`` (when set) is reached."""
        return bool(config.max_steps) and self.step >= config.max_steps

    def patience_exhausted(self, config: TrainConfig) -> bool:
        """Whether early stopping ends training: ``--patience`` evaluations (when set) without a better AUC."""
        return config.patience > 0 and self.evals_since_best >= config.patience

    def finished(self, config: TrainConfig) -> bool:
        """Whether training is over under ``config``: patience exhausted, every epoch trained, or ``--max-steps``
        reached (options may extend a resumed run: a larger ``--epochs`` or ``--max-steps`` continues it)."""
        return self.patience_exhausted(config) or self.epoch >= config.epochs or self.at_step_limit(config)

    def information_abundance_due(self, config: TrainConfig) -> bool:
        """Whether this evaluation also logs information abundance (every ``--ia-every`` evaluations)."""
        return bool(config.ia_every) and self.evaluations % config.ia_every == 0

    # ------------------------------------------------------------------------------------------ transitions
    def advance(self, steps: int, stop: int, seconds: float, batch_size: int) -> None:
        """Counts a segment that trained ``steps`` global batches of ``batch_size`` rows up to batch ``stop`` of
        the epoch in ``seconds``."""
        self.train_time_s += seconds
        self.samples_trained += steps * batch_size
        self.step += steps
        self.batch = stop

    def record_evaluation(self, auc: float) -> bool:
        """Counts an evaluation of validation AUC ``auc``; returns whether it is the best so far."""
        self.evaluations += 1
        if auc > self.best_auc:
            self.best_auc, self.best_step, self.evals_since_best = auc, self.step, 0
            return True
        self.evals_since_best += 1
        return False

    def end_segment(self, config: TrainConfig, num_batches: int) -> None:
        """Moves to the next epoch when this one is trained, and marks training :attr:`done` when it is over."""
        if self.batch >= num_batches:
            self.epoch, self.batch = self.epoch + 1, 0
        self.done = self.finished(config)

    @property
    def samples_per_s(self) -> float:
        """Rows trained per second of training time, over all ranks."""
        return self.samples_trained / max(self.train_time_s, 1e-9)

    # ------------------------------------------------------------------------------------------ checkpoints
    def to_tensors(self) -> Dict[str, torch.Tensor]:
        """The state as a checkpoint saves it: one tensor per field that holds its value exactly.

        Example::

            >>> TrainingState(step=2**24 + 1).to_tensors()["step"]
            tensor(16777217)
        """
        return {f.name: _exact_tensor(getattr(self, f.name)) for f in dataclasses.fields(self)}

    def load_tensors(self, saved: Dict[str, torch.Tensor]) -> None:
        """Sets every field from the tensors of :meth:`to_tensors` (as a checkpoint loaded them)."""
        for f in dataclasses.fields(self):
            kind = type(f.default)
            value = saved[f.name].item()
            setattr(self, f.name, bool(value) if kind is bool else kind(value))

    def to_dict(self) -> Dict[str, float]:
        """The state as plain JSON-able values (a checkpoint's manifest records them)."""
        return dataclasses.asdict(self)


def _exact_tensor(value: float) -> torch.Tensor:
    """A progress counter as a tensor that holds it exactly (int64 counts: float32 loses them past 2^24)."""
    if isinstance(value, bool) or isinstance(value, int):
        return torch.tensor(int(value), dtype=torch.int64)
    return torch.tensor(float(value), dtype=torch.float64)
