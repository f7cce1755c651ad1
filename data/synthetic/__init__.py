"""Synthetic Criteo-shaped click logs drawn from a known label model (the package's built-in default dataset).

Every row has Criteo's paper-mode shape: 13 integer-derived fields ``I1..I13`` and 26 categorical fields
``C1..C26`` (39 one-hot fields), 13 dense features ``dense_I1..dense_I13`` (``log(1 + max(x, 0))`` of the raw
integers, 0 for a missing one) and a label. Because the generator knows the probability each label was drawn from
(column ``true_prob``), it writes the Bayes-optimal AUC and log loss of every split into ``metadata.json``: the
ceiling any model can reach on that split.

The generative model (all parameters drawn from ``seed``):

* Vocabularies: Criteo Kaggle's paper-mode sizes (:mod:`multiembed.data.presets`) times ``scale``, never below
  ``min(size, min_vocab)``; integer fields are also capped at their Criteo size (they are log-bins of raw values).
  With the default ``scale=0.02`` the 39 tables hold 21,964 ids in all (one embedding set), small enough that
  ``make train`` trains in minutes on 2 CPU cores.
* Ids: truncated Zipf(``zipf_exponent``) over each field's ranks, as in real click logs; categorical ranks map to
  ids through a random permutation per field (the most frequent value is not id 0), integer fields keep rank
  order so that small raw values are the most frequent, as in Criteo.
* Label: ``y ~ Bernoulli(sigmoid(logit))`` with
  ``logit = bias + a * sum_f w_f[x_f] + b * sum_{(f, g) in P} r_fg <U_f[x_f], U_g[x_g]>``: first-order weights per
  id plus ``num_pairs`` planted field pairs ``P`` interacting through rank-``rank`` factors ``U`` (a field-weighted
  FM), so interaction arches have something to find that a first-order model cannot. ``a`` and ``b`` are set so
  that each part has the requested standard deviation over the data and ``bias`` so that the mean of
  ``true_prob`` is ``positive_rate``, both measured on a pilot sample of :data:`PILOT_ROWS` rows drawn from its own
  seeded stream (so every ``scale`` gets the same difficulty).
  Defaults give a positive rate of about 25 % and a Bayes-optimal AUC of about 0.78 (tested on 200k rows); a
  model of the first-order part alone reaches about 0.69.

Learnability (measured once, not a test): a field-weighted FM of width 8 (the true model's family; Adam 3e-3,
batch 2048, no tuning) reaches a test AUC of 0.743 from 800k training rows and 0.764 from 3.2M (Bayes 0.777 and
0.776) at the default scale, and 0.761 from 800k rows at ``scale=0.005`` (Bayes 0.780): the gap to Bayes closes
with rows per id. A check that a model approaches the Bayes AUC should use a small ``scale`` or many rows.

Integer fields and ``--tsv``: for every integer field the generator draws the bin id, then a *raw integer*
uniformly inside that bin, so that the paper's binning (empty -> "NULL", v > 2 -> int(ln(v)^2), else v - 2) of the
raw integer gives back the id and the dense feature is a function of the raw value. The Criteo TSV it writes is a
faithful raw log: ``multiembed convert criteo`` on it bins the same raw values into the same bins (its ids are its
own numbering of those bins, and rare values fall into its OOV id under ``--min-count``). The id of a bin is its
position in :meth:`SyntheticClickModel.integer_tokens` (``"-2", "NULL", "-1", "0", "1", "2", ...``). Categorical
tokens are 8 hex digits, a bijective function of (field, id).

Splits are generated independently (rows are i.i.d., so this is distributed exactly as a random permutation split)
with row counts ``floor(N * cumsum(split) / sum(split))`` boundaries: 10,000 rows at 8,1,1 give exactly
8,000 / 1,000 / 1,000. Each split is drawn in chunks of :data:`CHUNK_ROWS` rows from a stream seeded by
(seed, split, chunk): memory is bounded by one chunk plus 5 bytes a row of the largest split (labels and
probabilities kept to compute the exact Bayes AUC). Generation is deterministic by seed.

The steps live in their own modules: :mod:`~multiembed.data.synthetic.model` (the default click model),
:mod:`~multiembed.data.synthetic.regime` (the collapse regime) and :mod:`~multiembed.data.synthetic.write` (splits,
chunks, files and the Bayes-optimal metrics); :mod:`~multiembed.data.synthetic.stream` draws the same click models
as a stream (``synth --stream``: rows a function of their index, drawn while training, no files). The package imports
numpy and pyarrow only (``multiembed synth`` must not import torch).
"""

from multiembed.data.synthetic.model import (
    CHUNK_ROWS,
    FIELD_NAMES,
    GENERATOR_VERSION,
    NUM_INT_FIELDS,
    PILOT_ROWS,
    SyntheticClickModel,
    SyntheticConfig,
    SyntheticRows,
    synthetic_vocab_sizes,
)
from multiembed.data.synthetic.regime import (
    COLLAPSE_FIELDS,
    COLLAPSE_PAIRS,
    REGIMES,
    AnyConfig,
    AnyModel,
    CollapseRegimeConfig,
    CollapseRegimeModel,
    PlantedPair,
    RegimeField,
    click_model,
)
from multiembed.data.synthetic.write import generate_dataset, split_counts

__all__ = [
    "CHUNK_ROWS",
    "COLLAPSE_FIELDS",
    "COLLAPSE_PAIRS",
    "FIELD_NAMES",
    "GENERATOR_VERSION",
    "NUM_INT_FIELDS",
    "PILOT_ROWS",
    "REGIMES",
    "AnyConfig",
    "AnyModel",
    "CollapseRegimeConfig",
    "CollapseRegimeModel",
    "PlantedPair",
    "RegimeField",
    "SyntheticClickModel",
    "SyntheticConfig",
    "SyntheticRows",
    "click_model",
    "generate_dataset",
    "split_counts",
    "synthetic_vocab_sizes",
]
