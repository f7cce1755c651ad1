"""Serving: a trained run exported as a self-contained inference artifact, and predictions from it.

* :mod:`multiembed.serving.export`: a run's best checkpoint -> an artifact directory (quantised TorchRec tables,
  the dense part as a ``torch.export`` program, schema, vocabulary and preprocessing);
* :mod:`multiembed.serving.artifact`: the artifact's layout and :func:`load_artifact`, which runs no code from the
  files;
* :mod:`multiembed.serving.compiled`: ``load_artifact(..., compile=True)``: the checked dense program compiled
  ahead of time on the serving machine (AOTInductor), cached in a private directory;
* :mod:`multiembed.serving.predict`: converted Parquet splits or raw Criteo / Avazu lines -> predictions, AUC and
  log loss; :class:`~multiembed.serving.predict.RawLineEncoder`: a server's raw lines -> ``(dense, KJT)``.

It sits after ``training`` in the flow (it rebuilds a run's model through the one build path to export it) and
imports nothing from ``cli``.

Example::

    from multiembed.serving import load_artifact

    artifact = load_artifact("runs/me4x.int8")
    probs = artifact.predict(dense_features, sparse_features)  # [B]
"""

import multiembed.runtime.stack_check  # noqa: F401  (checks the TorchRec stack before any torchrec import)

from multiembed.serving.artifact import (
    ARTIFACT_FORMAT,
    QUANTIZE_CHOICES,
    ArtifactError,
    Manifest,
    ServingArtifact,
    ServingModel,
    load_artifact,
)
from multiembed.serving.compiled import CompileError

__all__ = [
    "ARTIFACT_FORMAT",
    "QUANTIZE_CHOICES",
    "ArtifactError",
    "CompileError",
    "Manifest",
    "ServingArtifact",
    "ServingModel",
    "load_artifact",
]
