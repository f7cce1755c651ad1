"""Dataset presets: per-field vocabulary sizes and row counts of the public CTR datasets.

Used where the real data is not at hand: the synthetic generator shapes its vocabularies like Criteo Kaggle's, and
the sharding planner (``multiembed plan --data criteo-kaggle|criteo-1tb|avazu``) sizes tables from them. Field order
is the converter's: the order of the Parquet columns, embedding tables and KJT keys.

Where the numbers come from:

* ``criteo-1tb``: exact. The 26 hashed tables of MLPerf Training DLRM-DCNv2 (TorchRec
  ``examples/golden_training`` / ``torchrec_dlrm`` README, ``--num_embeddings_per_feature 40000000,39060,17295,...``):
  the raw categorical cardinalities of the 24 days, capped at 40M by hashing. Rows: 4,373,472,329 (days 0-23, the
  Criteo Terabyte Click Logs release). 13 integer fields are dense features only (``log(1 + max(x, 0))``); hashing
  mode names the tables ``C1..C26``.
* ``criteo-kaggle``: **estimates**. Paper mode (the ME paper's public code, ``thuml/Multi-Embedding``
  ``torchfm/dataset/criteo.py``): values counted over the whole ``train.txt`` (45,840,617 rows), a value seen fewer
  than 10 times maps to one OOV id per field, integers binned (empty -> "NULL", v > 2 -> int(ln(v)^2), else v - 2).
  We found no published per-field table sizes for exactly this preprocessing, so the sizes below are estimates,
  built as follows and consistent with the published totals:

  - ``I1..I13``: the number of bins int(ln(v)^2) up to each field's maximum (ln(max)^2, from the public field
    maxima of train.txt), plus the v - 2 bins of small and negative values, "NULL" and OOV, less a sparse tail.
  - ``C1..C26``: the raw Kaggle cardinalities (the DLRM Kaggle table sizes ``1460, 583, 10131227, 2202608, ...``)
    kept whole for small fields and cut to the share of values a heavy-tailed field keeps at count >= 10 for the
    large ones.
  - Totals to compare with: about 1.08M here; AutoInt (Song et al., CIKM 2019) reports 998,960 features for Criteo
    with a count threshold of 10 over all rows; BARS ``FM_criteo_x4_001`` (min count 10, counted on the 80 % train
    split only) logs 15,482,037 parameters for an FM of width 16, i.e. 15,482,036 / 17 = 910,708 ids. The
    per-field split between the large fields is the uncertain part.

  Rows: 45,840,617 (Kaggle Display Advertising Challenge ``train.txt``).
* ``avazu``: **estimates**. 22 fields in header order without ``id`` and ``click`` (``hour`` kept as a categorical
  token as the paper's code does), min count 4 (the paper's Avazu threshold). Small fields are the public raw
  cardinalities of Avazu ``train`` (hour 240, C1 7, banner_pos 7, site_category 26, app_category 36, device_type 5,
  device_conn_type 4, C15 8, C16 9, C18 4, ...) plus OOV; ``device_id`` (2.69M raw) and ``device_ip`` (6.73M raw)
  are mostly singletons and are cut to estimates consistent with the published total of 1,544,488 features at
  threshold 5 (AutoInt) and a little more at threshold 4. Rows: 40,428,967.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

CRITEO_INT_FIELDS: Tuple[str, ...] = tuple(f"I{i}" for i in range(1, 14))
CRITEO_CAT_FIELDS: Tuple[str, ...] = tuple(f"C{i}" for i in range(1, 27))
AVAZU_FIELDS: Tuple[str, ...] = (
    "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
    "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)


@dataclasses.dataclass(frozen=True)
class DatasetPreset:
    """Shape of a public CTR dataset as the converter would write it.

    Attributes:
        name: preset name (``criteo-kaggle``, ``criteo-1tb``, ``avazu``).
        vocab_sizes: ``{field: ids its table needs, OOV included}`` in the converter's field order.
        num_dense: number of dense features (``dense_<name>`` columns).
        rows: rows of the whole raw dataset (all splits).
        exact: True when every vocabulary size is a published number, False when some are estimates.
        multi_hot_sizes: ``{field: ids per row}`` of a standard multi-hot variant (MLPerf DLRM-DCNv2 for
            ``criteo-1tb``), empty when the dataset is one-hot.
    """

    name: str
    vocab_sizes: Dict[str, int]
    num_dense: int
    rows: int
    exact: bool = True
    multi_hot_sizes: Dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def field_names(self) -> List[str]:
        return list(self.vocab_sizes)

    @property
    def total_vocab(self) -> int:
        """Sum of all table sizes (the embedding rows of one set)."""
        return sum(self.vocab_sizes.values())


# I1..I13 then C1..C26, paper mode (min count 10): estimates, see the module docstring.
_CRITEO_KAGGLE_SIZES = (
    # I1..I13
    64, 121, 111, 54, 225, 144, 111, 76, 104, 9, 35, 68, 80,
    # C1..C26
    1396, 553, 180000, 150000, 305, 24, 11000, 634, 4, 40000, 5000, 215000, 3100,
    28, 10000, 160000, 11, 4500, 2000, 5, 195000, 19, 16, 60000, 106, 40000,
)

# MLPerf Training DLRM-DCNv2 (Criteo 1TB, 40M cap), C1..C26.
_CRITEO_1TB_SIZES = (
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
)
_CRITEO_1TB_MULTI_HOT = (3, 2, 1, 2, 6, 1, 1, 1, 1, 7, 3, 8, 1, 6, 9, 5, 1, 1, 1, 12, 100, 27, 10, 3, 1, 1)

# Avazu, header order without id/click, min count 4: estimates, see the module docstring.
_AVAZU_SIZES = (
    241, 8, 8, 3500, 4500, 27, 4200, 330, 33, 810000, 740000, 6500, 6, 5,
    2500, 9, 10, 430, 5, 69, 170, 61,
)


def _criteo_kaggle() -> DatasetPreset:
    fields = CRITEO_INT_FIELDS + CRITEO_CAT_FIELDS
    return DatasetPreset(
        name="criteo-kaggle",
        vocab_sizes=dict(zip(fields, _CRITEO_KAGGLE_SIZES)),
        num_dense=13,
        rows=45_840_617,
        exact=False,
    )


def _criteo_1tb() -> DatasetPreset:
    return DatasetPreset(
        name="criteo-1tb",
        vocab_sizes=dict(zip(CRITEO_CAT_FIELDS, _CRITEO_1TB_SIZES)),
        num_dense=13,
        rows=4_373_472_329,
        exact=True,
        multi_hot_sizes=dict(zip(CRITEO_CAT_FIELDS, _CRITEO_1TB_MULTI_HOT)),
    )


def _avazu() -> DatasetPreset:
    return DatasetPreset(
        name="avazu",
        vocab_sizes=dict(zip(AVAZU_FIELDS, _AVAZU_SIZES)),
        num_dense=0,
        rows=40_428_967,
        exact=False,
    )


DATASET_PRESETS: Dict[str, DatasetPreset] = {p.name: p for p in (_criteo_kaggle(), _criteo_1tb(), _avazu())}


def preset(name: str) -> DatasetPreset:
    """Returns the preset called ``name``.

    Raises:
        ValueError: unknown name; the message lists the valid ones.

    Example::

        >>> preset("criteo-1tb").vocab_sizes["C1"]
        40000000
    """
    try:
        return DATASET_PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown dataset preset {name!r}; valid presets: {', '.join(DATASET_PRESETS)}") from None
