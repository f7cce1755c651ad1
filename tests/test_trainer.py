"""The trainer in one process: run directory contents, refusal of an existing run, evaluate and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from multiembed.cli import main as cli_main
from multiembed.runtime.stack import installed_versions


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    assert cli_main(["synth", "--rows", "3000", "--out", str(out), "--seed", "2", "--scale", "0.001", "--no-progress"]) == 0
    return out


def _train(data: Path, out: Path, *extra: str) -> int:
    return cli_main(
        ["train", "--data", str(data), "--out", str(out), "--model", "dcnv2-me-2x", "--batch-size", "256",
         "--hidden", "32", "--epochs", "2", "--device", "cpu", "--no-progress", *extra]
    )


def test_train_writes_the_run_directory_and_evaluate_reproduces_test_metrics(synthetic: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert _train(synthetic, run) == 0
    summary = json.loads((run / "summary.json").read_text())
    for key in ("val_auc", "test_auc", "test_logloss", "test_ne", "samples_per_s", "embedding_params",
                "dense_params", "bayes_test_auc"):
        assert key in summary, key
    assert summary["test_rows"] == 300 and summary["val_rows"] == 300
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[-1])["step"] == summary["steps"]
    # The loader's share of the training time (waiting in next() over the segments' wall time).
    assert 0.0 <= summary["loader_share"] < 1.0
    assert all(0.0 <= json.loads(line)["loader_share"] < 1.0 for line in lines)
    config = json.loads((run / "config.json").read_text())
    assert config["data"]["vocab_fingerprint"] and config["provenance"]["versions"]["torchrec"] == installed_versions()["torchrec"]
    capsys.readouterr()
    assert cli_main(["evaluate", str(run), "--data", str(synthetic), "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["test_rows"] == 300
    assert result["test_auc"] == pytest.approx(summary["test_auc"], abs=1e-6)
    assert result["test_logloss"] == pytest.approx(summary["test_logloss"], abs=1e-6)


def test_existing_run_directory_is_refused_without_resume(synthetic: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "something").write_text("x")
    assert _train(synthetic, run) == 2
    assert "pass --resume" in capsys.readouterr().err


def test_sparse_adam_on_cpu_is_refused_at_the_cli(synthetic: Path, tmp_path: Path, capsys) -> None:
    assert _train(synthetic, tmp_path / "run", "--sparse-optimizer", "adam") == 2
    assert "Adam needs a GPU" in capsys.readouterr().err


def test_the_warmup_schedule_reaches_the_fused_embedding_optimizer(synthetic: Path, tmp_path: Path) -> None:
    """Linear warm-up from 0: the first step must leave the tables untouched (the fused kernel updates rows inside
    backward, so a schedule that only reached the dense optimizer would show here), later steps grow with the LR."""
    from itertools import islice

    from multiembed.training.trainer import TrainConfig, Trainer

    trainer = Trainer(
        TrainConfig(
            data=str(synthetic), out=str(tmp_path / "run"), model="dcnv2-me-2x", batch_size=64, hidden=16,
            warmup_steps=4, sparse_optimizer="sgd", sparse_lr=1.0, progress=False, device="cpu", patience=0,
        )
    )

    def snapshot() -> dict:
        return {k: v.detach().clone() for k, v in trainer.dmp.named_parameters()} | {
            k: v.local_shards()[0].tensor.clone() for k, v in trainer.dmp.state_dict().items() if ".embedding_bags." in k
        }

    batches = iter(list(islice(trainer.train_loader.iter_epoch(0), 6)))
    changes = []
    before = snapshot()
    for _ in range(5):
        trainer.pipeline.progress(batches)
        after = snapshot()
        table = max((after[k] - before[k]).abs().max().item() for k in after if ".embedding_bags." in k)
        dense = max((after[k] - before[k]).abs().max().item() for k in after if ".embedding_bags." not in k)
        changes.append((table, dense))
        before = after
    sparse_lrs = {group["lr"] for group in trainer.built.schedules[0].param_groups}
    assert changes[0] == (0.0, 0.0)
    assert all(table > 0 and dense > 0 for table, dense in changes[1:])
    assert sparse_lrs == {1.0}  # warm-up over after 4 steps
    assert trainer.built.schedules[1].param_groups[0]["lr"] == pytest.approx(1e-3)


def test_metrics_log_information_abundance_every_n_evaluations(synthetic: Path, tmp_path: Path) -> None:
    import numpy as np

    from multiembed.training.trainer import TrainConfig, Trainer

    trainer = Trainer(
        TrainConfig(
            data=str(synthetic), out=str(tmp_path / "run"), model="dcnv2-me-2x", batch_size=256, hidden=16,
            eval_every=3, max_steps=6, ia_every=2, patience=0, progress=False, device="cpu",
        )
    )
    trainer.fit()
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [3, 6]
    assert "ia_mean" not in lines[0]
    logged = lines[1]
    assert logged["ia_row_normalized"] is True and len(logged["ia_mean"]) == len(logged["ia_min"]) == 2

    # Independently: the step-6 checkpoint's tables (one rank holds every table whole), rows L2-normalised,
    # numpy's SVD, IA = sum(s) / max(s) per field, then mean and min over fields per set.
    trainer.load_model_only(tmp_path / "run" / "checkpoints" / "step-00000006")
    state = trainer.dmp.state_dict()
    sparse_arch = trainer.model.sparse_arch
    tables = {
        name: state[f"model.sparse_arch.embedding_bag_collection.embedding_bags.{name}.weight"].local_shards()[0].tensor
        for name in sparse_arch.table_names
    }
    for set_index, fields in enumerate(sparse_arch.weight_views_per_set(tables)):
        values = []
        for weight in fields.values():
            rows = weight.double().numpy()
            rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
            s = np.linalg.svd(rows, compute_uv=False)
            values.append(s.sum() / s.max())
        # The trainer's route squares the condition number (eigenvalues of a float64 Gram of float32 rows).
        assert logged["ia_mean"][set_index] == pytest.approx(np.mean(values), rel=1e-6)
        assert logged["ia_min"][set_index] == pytest.approx(min(values), rel=1e-6)


def test_a_model_with_non_finite_weights_is_never_checkpointed(synthetic: Path, tmp_path: Path) -> None:
    from multiembed.training import checkpoint as ckpt
    from multiembed.training.trainer import TrainConfig, Trainer, TrainingDiverged

    trainer = Trainer(
        TrainConfig(data=str(synthetic), out=str(tmp_path / "run"), model="dcnv2-me-2x", batch_size=256, hidden=16,
                    progress=False, device="cpu")
    )
    good = trainer.save()
    table = next(v for k, v in trainer.dmp.state_dict().items() if ".embedding_bags." in k)
    table.local_shards()[0].tensor[3, 1] = float("inf")  # a finite loss can still come with such a weight
    trainer.state.step = 1
    with pytest.raises(TrainingDiverged, match="not checkpointed"):
        trainer.save()
    assert ckpt.newest_valid_checkpoint(tmp_path / "run") == good


def test_resume_drops_evaluations_logged_after_the_restored_checkpoint(synthetic: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert _train(synthetic, run, "--epochs", "1") == 0
    log = run / "metrics.jsonl"
    logged = log.read_text()
    # As if the job died between an evaluation and its checkpoint: a line the checkpoint does not know about.
    log.write_text(logged + json.dumps({"evaluation": 2, "step": 99}) + "\n")
    assert _train(synthetic, run, "--epochs", "1", "--resume") == 0
    assert log.read_text() == logged


def test_evaluate_refuses_data_with_another_vocabulary(synthetic: Path, tmp_path: Path, capsys) -> None:
    run, other = tmp_path / "run", tmp_path / "other"
    assert _train(synthetic, run, "--max-steps", "2") == 0
    assert cli_main(["synth", "--rows", "3000", "--out", str(other), "--seed", "3", "--scale", "0.001", "--no-progress"]) == 0
    capsys.readouterr()
    assert cli_main(["evaluate", str(run), "--data", str(other), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"multiembed evaluate: error: {other}: vocabulary fingerprint")
    assert "config.json" in lines[0] and "--vocab-from" in lines[0]


def test_output_bias_prior_starts_the_logit_at_the_train_splits_log_odds(synthetic: Path, tmp_path: Path) -> None:
    """``--output-bias prior`` (train's default): the logit's constant term is the log-odds of the train split's
    labels (read here independently with pyarrow; each count plus 1/2), recorded in config.json; ``default`` leaves
    torch's initialisation."""
    import math

    import numpy as np
    import pyarrow.parquet as pq

    from multiembed.data.metadata import read_metadata
    from multiembed.training.trainer import TrainConfig, Trainer

    meta = read_metadata(synthetic)
    labels = np.concatenate([pq.read_table(synthetic / f, columns=["label"]).column(0).to_numpy()
                             for f in meta.splits["train"].files])
    rate = float(labels.mean())
    positives = int(labels.sum())
    options = dict(data=str(synthetic), model="dcnv2-me-2x", batch_size=256, hidden=16, max_steps=1,
                   progress=False, device="cpu")
    assert TrainConfig(out="x", **options).output_bias == "prior"
    prior = Trainer(TrainConfig(out=str(tmp_path / "prior"), **options))
    (bias,) = prior.built.model.over_arch.output_biases()
    expected = math.log((positives + 0.5) / (len(labels) - positives + 0.5))
    assert float(bias) == pytest.approx(expected, abs=1e-6)
    assert abs(expected - math.log(rate / (1 - rate))) < 5 / len(labels)
    prior.fit()
    record = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert record["options"]["output_bias"] == "prior"
    assert record["output_bias_init"]["positive_rate"] == pytest.approx(rate)
    assert record["output_bias_init"]["logit"] == pytest.approx(expected)
    assert record["output_bias_init"]["rows"] == len(labels) == meta.splits["train"].rows

    default = Trainer(TrainConfig(out=str(tmp_path / "default"), output_bias="default", **options))
    (bias,) = default.built.model.over_arch.output_biases()
    assert abs(float(bias)) <= 1 / math.sqrt(16)  # torch's Linear init: U(-1/sqrt(in), 1/sqrt(in))
    default.fit()
    assert json.loads((tmp_path / "default" / "config.json").read_text())["output_bias_init"] is None


def test_a_resumed_run_records_the_output_bias_it_started_with(synthetic: Path, tmp_path: Path, capsys) -> None:
    """The bias of a resumed run is the checkpoint's: config.json keeps the run's own --output-bias and
    output_bias_init, also for a run whose config.json predates the option (it started at torch's initialisation)."""
    from multiembed.training.trainer import TrainConfig, Trainer

    out = tmp_path / "run"
    options = dict(data=str(synthetic), out=str(out), model="dcnv2-me-2x", batch_size=256, hidden=16, progress=False,
                   device="cpu", ia_every=0, patience=0)
    Trainer(TrainConfig(output_bias="default", max_steps=1, **options)).fit()
    Trainer(TrainConfig(resume=True, max_steps=2, **options)).fit()  # today's default: prior
    record = json.loads((out / "config.json").read_text())
    assert record["options"]["output_bias"] == "default" and record["output_bias_init"] is None
    assert record["options"]["max_steps"] == 2
    assert "--resume: the run started with --output-bias default" in capsys.readouterr().err

    del record["options"]["output_bias"]  # as written before the option existed
    (out / "config.json").write_text(json.dumps(record))
    Trainer(TrainConfig(resume=True, max_steps=3, **options)).fit()
    record = json.loads((out / "config.json").read_text())
    assert record["options"]["output_bias"] == "default" and record["output_bias_init"] is None
    assert json.loads((out / "summary.json").read_text())["steps"] == 3


def test_a_trainer_for_an_existing_run_continues_it_with_the_options_it_recorded(
    synthetic: Path, tmp_path: Path, capsys
) -> None:
    from multiembed.training.trainer import TrainConfig, Trainer

    out = tmp_path / "run"
    with pytest.raises(ValueError, match="not a multiembed run directory"):
        Trainer.for_run(out)
    Trainer(TrainConfig(data=str(synthetic), out=str(out), model="dnn-me-2x", batch_size=256, hidden=16, seed=3,
                        progress=False, device="cpu", ia_every=0, patience=0, max_steps=1)).fit()
    trainer = Trainer.for_run(out, max_steps=2)
    assert trainer.run_dir == out and trainer.config.resume
    assert (trainer.config.model, trainer.config.hidden, trainer.config.seed) == ("dnn-me-2x", 16, 3)
    summary = trainer.fit()
    assert summary["steps"] == 2
    assert "resumed from " in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["options"]["max_steps"] == 2


def test_prior_logit_is_finite_on_a_split_of_one_class() -> None:
    import math

    from multiembed.training.trainer import prior_logit

    assert prior_logit(0, 10) == pytest.approx(math.log(0.5 / 10.5)) and prior_logit(10, 10) == -prior_logit(0, 10)
    assert prior_logit(5, 10) == 0.0
    assert prior_logit(2_200_000, 10_000_000) == pytest.approx(math.log(0.22 / 0.78), abs=1e-6)
    with pytest.raises(ValueError, match=r"positives must be in \[0, rows=10\], got 11"):
        prior_logit(11, 10)


def test_positive_rate_reads_at_most_max_rows_and_names_a_bad_label(synthetic: Path, tmp_path: Path) -> None:
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from multiembed.data.metadata import DatasetError, read_metadata
    from multiembed.data.loader import positive_rate

    meta = read_metadata(synthetic)
    path = synthetic / meta.splits["train"].files[0]
    labels = pq.read_table(path, columns=["label"]).column(0).to_numpy()
    assert positive_rate(synthetic, meta, max_rows=100) == (float(labels[:100].mean()), 100)
    assert positive_rate(synthetic, meta, "val")[1] == meta.splits["val"].rows
    # A label that is not 0 or 1 (written past the loader's checks) is named by file and row.
    copy = tmp_path / "data"
    shutil.copytree(synthetic, copy)
    table = pq.read_table(copy / meta.splits["train"].files[0])
    bad = table.column("label").to_numpy().copy()
    bad[6] = 3
    index = table.schema.get_field_index("label")
    pq.write_table(table.set_column(index, "label", pa.array(bad, type=pa.int8())), copy / meta.splits["train"].files[0])
    with pytest.raises(DatasetError, match=r"row 7: field label: 3 is not 0 or 1"):
        positive_rate(copy, meta)
