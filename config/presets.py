"""Named sizes of the scaling study (``multiembed scale --preset NAME``), importable without torch (the CLI's
``--help`` spells them out).

A preset sets the grid (backbones, modes, scales, seeds) and training options; explicit command-line options override
each one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict


@dataclass(frozen=True)
class Preset:
    """A named study size.

    Attributes:
        name: the preset's name.
        grid: ``backbones``, ``modes``, ``scales`` (lists) and ``seeds`` (a count).
        train: :class:`~multiembed.config.TrainConfig` fields.
        data_hint: the command that makes the dataset the preset was sized for.
        description: what it is for, and its measured or estimated time.

    Example::

        >>> PRESETS["small"].grid["scales"]
        [1, 2, 4]
    """

    name: str
    grid: Dict[str, Any]
    train: Dict[str, Any]
    data_hint: str
    description: str

    def options_text(self) -> str:
        """The preset as the command-line options it stands for, e.g. ``--backbones dcnv2 --modes se,me ...``."""
        words = []
        for key, value in {**self.grid, **self.train}.items():
            if key == "device":
                continue
            shown = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
            words.append(f"--{key.replace('_', '-')} {shown}")
        return " ".join(words)

    def help_text(self) -> str:
        """One ``--help`` paragraph: options, the data it was sized for, and its description."""
        data = self.data_hint.replace(" --out DATA", "")
        return f"{self.name}: {self.options_text()}, sized for data from `{data}` ({self.description})"


# The collapse regime's data (README, "The collapse regime"), and what both collapse presets share: the grid and the
# model and optimiser settings (they differ only in how long a run trains). Every preset pins the logit's initial bias
# its recorded results were measured with (torch's initialisation), so they reproduce whatever train's default is.
COLLAPSE_PRESET_DATA = "multiembed synth --regime collapse --rows 450000 --split 16,1,1 --out DATA"
_COLLAPSE_GRID: Dict[str, Any] = {"backbones": ["dcnv2"], "modes": ["se", "me"], "scales": [1, 2, 4, 10], "seeds": 5}
_COLLAPSE_MODEL: Dict[str, Any] = {
    "batch_size": 1024, "hidden": 256, "patience": 2, "output_bias": "default", "device": "auto",
}

# Fresh rows (docs/results/fresh-rows/): the collapse regime drawn as a stream, so that no row is trained twice and a
# model gains only from what generalises; every run trains the same budget, FRESH_ROWS_STEPS steps of 1024 rows (the
# stream's epoch, so --max-steps and --epochs 1 end a run at the same row). The budget comes from the learning curves of
# DCNv2 SE 1x and SE 10x, seed 0, on this stream (docs/results/fresh-rows/learning_curve.csv): SE 1x still gains at
# 6.1M rows (val AUC 0.7294 at 614k, 0.7381 at 1.02M, 0.7715 at 6.1M), SE 10x from 0.7219 at 256k to 0.7456 at 768k,
# so neither flattens within any budget this machine allows and the budget is the largest whole number of steps at
# which 3 seeds of the grid fit in 3 hours at the throughputs measured during the curves on a loaded machine (SE 1x
# about 5,000 rows/s, SE 10x about 650 rows/s; the other models scaled by collapse-long's ratios): about 58 minutes a
# seed with the evaluations. At collapse-long's 2-core throughputs the same grid takes about 16 minutes.
FRESH_ROWS_STEPS = 750
FRESH_ROWS_BATCH = 1024
FRESH_ROWS_HELD_OUT = 100_000
FRESH_ROWS_PRESET_DATA = (
    f"multiembed synth --regime collapse --stream --rows {FRESH_ROWS_STEPS * FRESH_ROWS_BATCH + 2 * FRESH_ROWS_HELD_OUT} "
    f"--split {FRESH_ROWS_STEPS * FRESH_ROWS_BATCH},{FRESH_ROWS_HELD_OUT},{FRESH_ROWS_HELD_OUT} --out DATA"
)

PRESETS: Dict[str, Preset] = {
    "small": Preset(
        name="small",
        grid={"backbones": ["dcnv2"], "modes": ["se", "me"], "scales": [1, 2, 4], "seeds": 2},
        train={
            "epochs": 3, "batch_size": 1024, "hidden": 64, "patience": 2, "eval_every": 50, "max_steps": 300,
            "output_bias": "default", "device": "auto",
        },
        data_hint="multiembed synth --rows 150000 --scale 0.002 --out DATA",
        description="DCNv2 SE vs ME at 1x, 2x, 4x, 2 seeds: about 20 minutes on 2 CPU cores",
    ),
    # At most 180 steps (184k samples, under one pass) a run; results: docs/results/collapse-scaling/.
    "collapse": Preset(
        name="collapse",
        grid=_COLLAPSE_GRID,
        train={"epochs": 1, **_COLLAPSE_MODEL, "eval_every": 60, "max_steps": 180},
        data_hint=COLLAPSE_PRESET_DATA,
        description="DCNv2 SE vs ME at 1x, 2x, 4x, 10x, 5 seeds on the collapse regime, at most 180 steps a run: "
        "measured 8 minutes on 2 idle CPU cores",
    ),
    # The same grid, model and data trained under the paper's protocol (early stopping on validation AUC, here up to
    # 4 epochs evaluated every third of an epoch) instead of a step cap; the epoch limit keeps the whole grid within
    # 90 minutes on 2 CPU cores. Results: docs/results/collapse-scaling/.
    "collapse-long": Preset(
        name="collapse-long",
        grid=_COLLAPSE_GRID,
        train={"epochs": 4, **_COLLAPSE_MODEL, "eval_every": 130, "max_steps": 0},
        data_hint=COLLAPSE_PRESET_DATA,
        description="collapse's grid under early stopping, up to 4 epochs: measured 35 minutes on 2 CPU cores",
    ),
    "fresh-rows": Preset(
        name="fresh-rows",
        grid={"backbones": ["dcnv2"], "modes": ["se", "me"], "scales": [1, 4, 10], "seeds": 3},
        train={
            "epochs": 1, **_COLLAPSE_MODEL, "patience": 0, "eval_every": 250, "max_steps": FRESH_ROWS_STEPS,
        },
        data_hint=FRESH_ROWS_PRESET_DATA,
        description="DCNv2 SE vs ME at 1x, 4x, 10x, 3 seeds, on a stream of the collapse regime: every run trains the "
        "same 768,000 new rows (no early stopping); estimated 16 minutes at collapse-long's 2-core throughputs, about "
        "3 hours at those measured on a loaded machine (docs/results/fresh-rows/)",
    ),
}
