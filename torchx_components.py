"""torchx components for multiembed: each is one typed function returning an ``AppDef``.

Run locally (CPU, gloo; two ranks on this machine)::

    torchx run -s local_cwd ./torchx_components.py:train --data runs/data/synth --out runs/me4x -j 1x2

On a GPU cluster (nccl; 16 nodes x 8 GPUs), with the package installed in the image::

    torchx run -s slurm ./torchx_components.py:train --image /path/to/venv-or-image \\
        --data /datasets/criteo-1tb-parquet --out /checkpoints/dcnv2-me-4x --model dcnv2-me-4x \\
        -j 16x8 --gpu 8 --sharding auto
    torchx run -s kubernetes -cfg queue=default ./torchx_components.py:train --image REGISTRY/multiembed:TAG ...

Every component delegates to ``torchx.components.dist.ddp`` (torchrun under the hood), so rendezvous, ``-j
{nnodes}x{nproc_per_node}`` and scheduler support are torchx's own.
"""


import logging
import os
import sys
from typing import Dict, List, Optional

import torchx
import torchx.specs as specs
from torchx.components import dist

# The options' spellings come from their one definition (multiembed.config, importable without torch); each
# component below names the options a launcher most often sets and passes any other through ``extra_args``.
from multiembed.cli.errors import EXIT_USER_ERROR, one_line_error
from multiembed.config import TrainConfig, to_command_line

# Component parameters that size or place the job rather than configure the command.
LAUNCH_PARAMETERS = frozenset(
    {"extra_args", "j", "image", "h", "cpu", "gpu", "memMB", "env", "max_retries", "max_restarts", "rdzv_port", "name"}
)


def _refuse(message: str) -> None:
    """Refuses a component's arguments: one line and exit status 2 under ``torchx run`` (whose own handling would
    print the ``ValueError``'s traceback), a ``ValueError`` when the component is called as a function."""
    if os.environ.get("TORCHX_CONTEXT_NAME") == "cli_run":
        print(f"multiembed: error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    raise ValueError(message)


def _with_max_restarts(app: specs.AppDef, max_restarts: int) -> specs.AppDef:
    """Adds ``--max-restarts`` to the torchrun command line that ``dist.ddp`` builds.

    ``dist.ddp`` exposes only the scheduler's ``max_retries``; torchrun's own restart budget (restart every
    local worker from the newest checkpoint after one fails) is what recovers a killed rank without a new
    allocation, so it is spliced into the ``bash -c`` command here.
    """
    if max_restarts <= 0:
        return app
    for role in app.roles:
        command = role.args[-1]
        if not command.startswith("torchrun "):
            raise ValueError(f"unexpected torchx ddp command line (expected torchrun): {command[:80]!r}")
        role.args[-1] = command.replace("torchrun ", f"torchrun --max-restarts {int(max_restarts)} ", 1)
        # torchrun's c10d rendezvous lends its TCPStore to the workers and keeps it across restarts, so a restarted
        # worker group reads the killed attempt's gloo / nccl addresses from it and fails to connect ("Connection
        # refused"; pytorch/pytorch#135712). A fresh store per attempt avoids that; an explicit env entry wins.
        role.env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    return app


def _with_launcher(app: specs.AppDef) -> specs.AppDef:
    """Runs torchrun through ``python -m multiembed.cli.launch``, so that a failed job ends with the failing worker's
    one-line error instead of torchrun's ``ChildFailedError`` traceback (``multiembed/cli/launch.py``)."""
    for role in app.roles:
        command = role.args[-1]
        if not command.startswith("torchrun "):
            raise ValueError(f"unexpected torchx ddp command line (expected torchrun): {command[:80]!r}")
        role.args[-1] = "python -m multiembed.cli.launch " + command
    return app


class _OneLineFailure(logging.Filter):
    """Replaces the status dump ``torchx run`` logs after a failed job with the worker's one-line error.

    ``torchx run`` ends a failed job with a YAML dump of its ``AppStatus``; when the worker failed with a multiembed
    one-line error (which torchrun copies into the reply file torchx reads, ``structured_error_msg``), that line is
    the whole story, so it is what the user sees last. Installed on torchx's CLI logger when this file is loaded as
    a component file (only ``torchx`` loads it); any other status is logged unchanged.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        status = record.msg
        if isinstance(status, specs.AppStatus) and status.state != specs.AppState.SUCCEEDED:
            line = one_line_error(status.structured_error_msg)
            if line is not None:
                record.msg, record.args = line, ()
        return True


_CLI_LOGGER = logging.getLogger("torchx.cli.cmd_run")
if not any(isinstance(f, _OneLineFailure) for f in _CLI_LOGGER.filters):
    _CLI_LOGGER.addFilter(_OneLineFailure())


def _cli_app(
    args: List[str],
    *,
    name: str,
    image: str,
    h: Optional[str],
    cpu: int,
    gpu: int,
    memMB: int,
    j: str,
    env: Optional[Dict[str, str]],
    rdzv_port: int,
    max_retries: int = 0,
    max_restarts: int = 0,
) -> specs.AppDef:
    """``python -m multiembed.cli ARGS`` on every rank, through ``dist.ddp`` (torchrun), with the restart budget."""
    app = dist.ddp(
        *args,
        m="multiembed.cli",
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
    )
    return _with_launcher(_with_max_restarts(app, max_restarts))


def train(
    *extra_args: str,
    data: str,
    out: str,
    model: str = "dcnv2-me-4x",
    epochs: int = 10,
    batch_size: int = 2048,
    sharding: str = "auto",
    sparse_optimizer: Optional[str] = None,
    sparse_lr: Optional[float] = None,
    lr: Optional[float] = None,
    patience: int = 3,
    seed: int = 0,
    eval_every: int = 0,
    checkpoint_every: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    j: str = "1x2",
    image: str = torchx.IMAGE,
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
    name: str = "/multiembed-train",
) -> specs.AppDef:
    """Trains a multiembed model with one ``multiembed train`` worker per rank.

    Args:
        extra_args: further ``multiembed train`` options, passed through (e.g. ``--dropout 0``).
        data: converted dataset directory, visible to every node.
        out: run directory on storage shared by all nodes (checkpoints are written there).
        model: model name, e.g. ``dcnv2-me-4x`` or ``dcnv2-se-10x``.
        epochs: maximum epochs under early stopping.
        batch_size: global batch size (split evenly over all ranks).
        sharding: ``auto``, ``table_wise``, ``row_wise``, ``column_wise`` or ``data_parallel``.
        sparse_optimizer: ``adagrad``, ``rowwise_adagrad``, ``sgd`` or ``adam`` (GPU); device default when unset.
        sparse_lr: embedding learning rate; device default when unset.
        lr: dense learning rate (default 1e-3).
        patience: evaluations without validation AUC gain before early stopping.
        seed: seed of initialisation and shuffling.
        eval_every: evaluate every N steps (0: once per epoch).
        checkpoint_every: also checkpoint every N steps (0: at evaluations only).
        resume: continue the run in ``out`` from its newest complete checkpoint.
        overwrite: delete ``out`` first.
        j: ``{nnodes}x{nproc_per_node}``, e.g. ``1x2`` (two local ranks) or ``16x8``.
        image: image (docker / slurm: a directory holding the environment) that has multiembed installed.
        h: a registered named resource (takes precedence over cpu, gpu, memMB).
        cpu: CPUs per node.
        gpu: GPUs per node (one rank per GPU; 0 trains on CPU with gloo).
        memMB: memory per node in MB.
        env: extra environment variables for the workers.
        max_retries: scheduler-level retries of the whole job.
        max_restarts: torchrun restarts of the local workers after a failure; workers resume from the newest
            complete checkpoint, so set ``checkpoint_every`` too.
        rdzv_port: rendezvous port on the first node (multi-node only; single-node jobs pick a free port).
        name: torchx job name.
    """
    if overwrite and (resume or max_restarts > 0):
        _refuse("overwrite cannot be combined with resume or max_restarts (a restart would erase the run)")
    options = dict(
        data=data, out=out, model=model, epochs=epochs, batch_size=batch_size, sharding=sharding,
        sparse_optimizer=sparse_optimizer, sparse_lr=sparse_lr, lr=lr, patience=patience, seed=seed,
        eval_every=eval_every, checkpoint_every=checkpoint_every,
        # A restarted worker must pick up the run it was part of rather than refuse the existing directory.
        resume=resume or max_restarts > 0, overwrite=overwrite,
    )
    args: List[str] = ["train", *to_command_line(TrainConfig, options), *extra_args]
    return _cli_app(
        args, name=name, image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=env, rdzv_port=rdzv_port,
        max_retries=max_retries, max_restarts=max_restarts,
    )


def days(
    *extra_args: str,
    data: List[str],
    out: str,
    model: str = "dcnv2-me-4x",
    batch_size: int = 2048,
    sharding: str = "auto",
    seed: int = 0,
    checkpoint_every: int = 0,
    keep_days: int = 0,
    j: str = "1x2",
    image: str = torchx.IMAGE,
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
    name: str = "/multiembed-days",
) -> specs.AppDef:
    """The production loop (``multiembed days``): trains the day datasets in order, each warm-started from the
    previous day and judged on its rows before training on them, with one ``multiembed days`` worker per rank.

    A failed job rerun with the same arguments (or restarted by torchrun, ``max_restarts``) resumes: finished days
    are not trained again and the interrupted day resumes from its newest checkpoint (set ``checkpoint_every``).

    Args:
        extra_args: further ``multiembed days`` options, passed through (e.g. ``--lr 1e-3``).
        data: the day dataset directories in day order, comma-separated, visible to every node.
        out: the loop's run directory on storage shared by all nodes.
        model: model name, e.g. ``dcnv2-me-4x`` or ``dcnv2-se-10x``.
        batch_size: global batch size (split evenly over all ranks).
        sharding: ``auto``, ``table_wise``, ``row_wise``, ``column_wise`` or ``data_parallel``.
        seed: seed of initialisation and shuffling.
        checkpoint_every: also checkpoint every N steps within a day (0: at the end of each day only).
        keep_days: keep the checkpoints of the last N finished days only (0: every day's).
        j: ``{nnodes}x{nproc_per_node}``, e.g. ``1x2`` (two local ranks) or ``16x8``.
        image: image (docker / slurm: a directory holding the environment) that has multiembed installed.
        h: a registered named resource (takes precedence over cpu, gpu, memMB).
        cpu: CPUs per node.
        gpu: GPUs per node (one rank per GPU; 0 trains on CPU with gloo).
        memMB: memory per node in MB.
        env: extra environment variables for the workers.
        max_retries: scheduler-level retries of the whole job.
        max_restarts: torchrun restarts of the local workers after a failure (they resume as above).
        rdzv_port: rendezvous port on the first node (multi-node only; single-node jobs pick a free port).
        name: torchx job name.
    """
    if not data:
        _refuse("data: give at least one day dataset directory")
    if keep_days < 0:
        _refuse(f"keep_days must be >= 0, got {keep_days}")
    options = dict(model=model, batch_size=batch_size, sharding=sharding, seed=seed, checkpoint_every=checkpoint_every)
    args: List[str] = [
        "days", "--data", *data, "--out", out, "--keep-days", str(keep_days),
        *to_command_line(TrainConfig, options), *extra_args,
    ]
    return _cli_app(
        args, name=name, image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=env, rdzv_port=rdzv_port,
        max_retries=max_retries, max_restarts=max_restarts,
    )


def benchmark(
    *extra_args: str,
    out: str,
    model: str = "dcnv2-me-4x",
    batch_size: int = 2048,
    rows_per_set: int = 1_100_000,
    steps: int = 20,
    baseline: bool = True,
    quick: bool = False,
    threads: int = 0,
    j: str = "1x1",
    image: str = torchx.IMAGE,
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    rdzv_port: int = 29500,
    name: str = "/multiembed-bench",
) -> specs.AppDef:
    """Benchmarks training throughput (``multiembed bench``) on synthetic Criteo-shaped batches, one worker per rank.

    Every rank trains through DMP on its share of the global batch; rank 0 writes the JSON and prints the markdown
    table. The plain-PyTorch baseline runs on each rank alone (no gradient exchange), interleaved with the project's
    steps.

    Args:
        extra_args: further ``multiembed bench`` options, passed through (e.g. ``--no-scaling``, ``--k-values 1,4``).
        out: JSON result path (rank 0 writes it).
        model: model name, e.g. ``dcnv2-me-4x``.
        batch_size: global batch size (split evenly over all ranks).
        rows_per_set: embedding rows per set, spread over Criteo Kaggle's fields in its proportions.
        steps: timed steps per contender and sweep point.
        baseline: run the paper-style plain-PyTorch baseline (dcnv2 models only).
        quick: smoke run (small sweeps, fewer repetitions).
        threads: torch intra-op threads per rank (0: torch's default; torchrun sets one thread per rank when
            several share a node unless ``OMP_NUM_THREADS`` is given in ``env``).
        j: ``{nnodes}x{nproc_per_node}``.
        image: image (docker / slurm: a directory holding the environment) that has multiembed installed.
        h: a registered named resource (takes precedence over cpu, gpu, memMB).
        cpu: CPUs per node.
        gpu: GPUs per node (one rank per GPU; 0 benchmarks the CPU path with gloo).
        memMB: memory per node in MB.
        env: extra environment variables for the workers.
        rdzv_port: rendezvous port on the first node (multi-node only).
        name: torchx job name.
    """
    args: List[str] = [
        "bench", "--json", out, "--model", model, "--batch-size", str(batch_size), "--rows-per-set", str(rows_per_set),
        "--steps", str(steps), "--threads", str(threads), "--baseline" if baseline else "--no-baseline",
    ]
    if quick:
        args.append("--quick")
    args += list(extra_args)
    return _cli_app(
        args, name=name, image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=env, rdzv_port=rdzv_port
    )


def scaling_study(
    *extra_args: str,
    data: str,
    out: str,
    backbones: Optional[str] = None,
    scales: Optional[str] = None,
    modes: Optional[str] = None,
    seeds: Optional[int] = None,
    preset: Optional[str] = None,
    epochs: Optional[int] = None,
    batch_size: Optional[int] = None,
    hidden: Optional[int] = None,
    patience: Optional[int] = None,
    j: str = "1x1",
    image: str = torchx.IMAGE,
    h: Optional[str] = None,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 16384,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
    name: str = "/multiembed-scale",
) -> specs.AppDef:
    """The paper's scaling study (``multiembed scale``) as one torchx app: every configuration in sequence.

    Each backbone x SE/ME x scale x seed run trains with early stopping on all ranks of the app (``-j 1x1``: one
    process, one GPU), then ``scaling.csv``, ``scaling.md`` and ``scaling.png`` are written into ``out``. The study
    is resumable: resubmitting with the same ``out`` skips finished runs and continues an interrupted one from its
    newest checkpoint, so ``max_restarts`` / ``max_retries`` recover a failed worker.

    The full protocol of the paper (Criteo Kaggle, DCNv2 and DNN, scales 1, 2, 3, 4, 10, SE and ME, 3 seeds; Adam
    lr 1e-3, weight decay 1e-6, batch 2048, MLP 400, dropout 0.2, early stopping on validation AUC with patience 3,
    the command's defaults) on one GPU::

        multiembed convert criteo train.txt --out /datasets/criteo-kaggle
        torchx run -s local_cwd ./torchx_components.py:scaling_study --data /datasets/criteo-kaggle \\
            --out /checkpoints/scaling --backbones dcnv2,dnn --scales 1,2,3,4,10 --modes se,me --seeds 3 \\
            --gpu 1 -j 1x1

    On CPU, the small preset on a synthetic log::

        multiembed synth --rows 150000 --scale 0.002 --out runs/data/synth-small
        torchx run -s local_cwd ./torchx_components.py:scaling_study --data runs/data/synth-small \\
            --out runs/scaling-small --preset small

    Args:
        extra_args: further ``multiembed scale`` options, passed through (e.g. ``--lr 0.002``, ``--max-steps 1000``).
        data: converted dataset directory, visible to every node.
        out: study directory on storage shared by all nodes (runs, checkpoints and results go there).
        backbones: comma-separated backbones (the command's default: dcnv2,dnn).
        scales: comma-separated scale factors (default: 1,2,3,4,10).
        modes: comma-separated modes, se, me or mesi (default: se,me).
        seeds: number of seeds per configuration (default: 3).
        preset: a named study size (``small``); explicit options override its values.
        epochs: maximum epochs per run under early stopping (default: 10).
        batch_size: global batch size (default: 2048).
        hidden: MLP width (default: 400).
        patience: evaluations without validation AUC gain before stopping (default: 3).
        j: ``{nnodes}x{nproc_per_node}``; every run is trained by all ranks (``1x1``: one process).
        image: image (docker / slurm: a directory holding the environment) that has multiembed installed.
        h: a registered named resource (takes precedence over cpu, gpu, memMB).
        cpu: CPUs per node.
        gpu: GPUs per node (one rank per GPU; 0 trains on CPU with gloo).
        memMB: memory per node in MB.
        env: extra environment variables for the workers.
        max_retries: scheduler-level retries of the whole job (the study resumes).
        max_restarts: torchrun restarts of the local workers after a failure (the study resumes).
        rdzv_port: rendezvous port on the first node (multi-node only).
        name: torchx job name.
    """
    args: List[str] = ["scale", "--data", data, "--out", out]
    for flag, value in (
        ("--backbones", backbones), ("--scales", scales), ("--modes", modes), ("--seeds", seeds), ("--preset", preset),
    ):
        if value is not None:
            args += [flag, str(value)]
    args += to_command_line(TrainConfig, dict(epochs=epochs, batch_size=batch_size, hidden=hidden, patience=patience))
    args += list(extra_args)
    return _cli_app(
        args, name=name, image=image, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j, env=env, rdzv_port=rdzv_port,
        max_retries=max_retries, max_restarts=max_restarts,
    )


def convert(
    *inputs: str,
    dataset: str,
    out: str,
    mode: Optional[str] = None,
    min_count: Optional[int] = None,
    hash_size: Optional[int] = None,
    hash_sizes: Optional[str] = None,
    vocab_from: Optional[str] = None,
    split: Optional[str] = None,
    split_by_file: bool = False,
    seed: int = 0,
    on_error: str = "fail",
    overwrite: bool = False,
    threads_per_worker: Optional[int] = None,
    j: str = "1x1",
    image: str = torchx.IMAGE,
    h: Optional[str] = None,
    cpu: int = 2,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_port: int = 29500,
    name: str = "/multiembed-convert",
) -> specs.AppDef:
    """Converts raw logs into one dataset with every rank of the job converting its share of the input files.

    Rank 0 holds the output's lock, makes the decisions and writes ``metadata.json`` last; input ``i`` is scanned and
    counted on rank ``i mod world`` and the inputs still to convert are shared round-robin
    (``multiembed/data/convert/nodes.py``). The output is the same as one ``multiembed convert`` process's. Criteo 1TB
    on 24 nodes::

        torchx run -s slurm ./torchx_components.py:convert --dataset criteo-1tb --out /shared/criteo-1tb \\
            --hash_sizes mlperf --j 24x1 /shared/raw/day_{0..23}.gz

    Args:
        inputs: raw log files, in order, on storage every node reads (e.g. ``day_0.gz`` .. ``day_23.gz``).
        dataset: ``criteo``, ``criteo-1tb`` or ``avazu``.
        out: output dataset directory on storage shared by every node.
        mode: ``paper`` or ``hashing`` (default: the dataset's).
        min_count: paper mode's minimum token count.
        hash_size: hashing mode's buckets per field.
        hash_sizes: hashing mode's per-field sizes (``C1=1000,...`` or ``mlperf``).
        vocab_from: encode with the vocabulary of an earlier conversion.
        split: random split weights ``TRAIN,VAL,TEST``.
        split_by_file: inputs but the last -> train; the last input's halves -> val, test.
        seed: split seed.
        on_error: ``fail`` or ``skip`` bad rows.
        overwrite: replace a finished dataset in ``out`` made from other inputs or options.
        threads_per_worker: pyarrow threads per rank (default: pyarrow's, all cores).
        j: ``{nnodes}x{nproc_per_node}``, e.g. ``24x1``.
        image: image (docker / slurm: a directory holding the environment) that has multiembed installed.
        h: a registered named resource (takes precedence over cpu and memMB).
        cpu: CPUs per node.
        memMB: memory per node in MB.
        env: extra environment variables for the workers.
        max_retries: scheduler-level retries of the whole job (complete inputs are kept).
        rdzv_port: rendezvous port on the first node (multi-node only).
        name: torchx job name.
    """
    if not inputs:
        _refuse("convert: give the raw log files to convert")
    args: List[str] = ["convert", dataset, *inputs, "--out", out, "--seed", str(seed), "--on-error", on_error]
    for flag, value in (
        ("--mode", mode), ("--min-count", min_count), ("--hash-size", hash_size), ("--hash-sizes", hash_sizes),
        ("--vocab-from", vocab_from), ("--split", split), ("--threads-per-worker", threads_per_worker),
    ):
        if value is not None:
            args += [flag, str(value)]
    args += [flag for flag, on in (("--split-by-file", split_by_file), ("--overwrite", overwrite)) if on]
    return _cli_app(
        args, name=name, image=image, h=h, cpu=cpu, gpu=0, memMB=memMB, j=j, env=env, rdzv_port=rdzv_port,
        max_retries=max_retries,
    )
