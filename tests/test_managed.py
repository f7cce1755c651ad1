"""Managed-collision vocabulary: ``convert`` / ``synth --vocab managed`` keep raw token hashes, ``train --vocab
managed`` maps them to rows through TorchRec's MCH modules (row-wise, fallback row, evictions), records what the
tables did, checkpoints the remapping and resumes exactly; every configuration outside what was checked is refused in
one line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from multiembed.cli import main as cli_main
from multiembed.data.days import IdHistory, read_days
from multiembed.data.metadata import read_metadata
from multiembed.data.synthetic.days import day_dirs
from multiembed.data.tokens import hash_tokens
from multiembed.data.vocab import MANAGED_ID_SPACE, ManagedVocabulary, managed_ids
from multiembed.models.managed import ManagedSpec, managed_collection, managed_counts
from multiembed.sharding.managed import plan_managed
from multiembed.training import checkpoint as ckpt
from multiembed.training.managed import check_same_world_size, saved_world_size

TABLE_ROWS = 64
TINY = ["--batch-size", "256", "--hidden", "32", "--device", "cpu", "--no-progress"]
MANAGED = ["--vocab", "managed", "--table-rows", str(TABLE_ROWS), "--eviction-interval", "3"]
# Facts of a run that depend on wall-clock time or on the run directory's name, not on what was trained.
TIMING_KEYS = {"samples_per_s", "loader_share", "checkpoint"}


def _synth(out: Path, *extra: str) -> Path:
    assert cli_main(["synth", "--rows", "3000", "--out", str(out), "--seed", "2", "--scale", "0.001",
                     "--no-progress", *extra]) == 0
    return out


@pytest.fixture(scope="module")
def managed_data(tmp_path_factory) -> Path:
    return _synth(tmp_path_factory.mktemp("managed") / "data", "--vocab", "managed")


@pytest.fixture(scope="module")
def native_data(tmp_path_factory) -> Path:
    return _synth(tmp_path_factory.mktemp("native") / "data")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


# ------------------------------------------------------------------------------------------------ the data
def test_managed_ids_are_the_high_63_bits_of_the_token_hash() -> None:
    keys = hash_tokens(pa.array(["68fd1e64", "", "05db9164", "68fd1e64"]))
    ids = ManagedVocabulary("criteo", ["C1"]).encode("C1", keys)
    assert ids.dtype == np.int64 and ids.tolist() == (keys >> np.uint64(1)).astype(np.int64).tolist()
    assert ids[0] == ids[3] and len(set(ids.tolist())) == 3
    # The top key stays below the MCH modules' empty-slot marker (the int64 maximum).
    assert managed_ids(np.array([2**64 - 1], dtype=np.uint64))[0] == MANAGED_ID_SPACE - 1


def _criteo_c1_tokens(path: Path) -> List[str]:
    return [line.rstrip("\n").split("\t")[14] for line in path.read_text().splitlines()]


def test_convert_vocab_managed_keeps_token_hashes_and_days_follow(shared_data: Path, tmp_path: Path, capsys) -> None:
    raw = shared_data / "criteo_dac_train_head10k.txt"
    day0, day1 = tmp_path / "day0", tmp_path / "day1"
    assert cli_main(["convert", "criteo", str(raw), "--vocab", "managed", "--out", str(day0), "--first-day", "log",
                     "--quiet"]) == 0
    meta = read_metadata(day0)
    assert meta.options["mode"] == "managed" and meta.field_names == [f"C{i}" for i in range(1, 27)]
    assert all(f.vocab_size == MANAGED_ID_SPACE for f in meta.fields)
    # Every C1 id is a token's 63-bit key: the converted ids are exactly the keys of the raw tokens.
    ids = np.concatenate([pq.read_table(day0 / f, columns=["C1"]).column("C1").to_numpy()
                          for split in meta.splits.values() for f in split.files])
    expected = managed_ids(hash_tokens(pa.array(_criteo_c1_tokens(raw))))
    assert sorted(ids.tolist()) == sorted(expected.tolist())
    assert "63-bit token keys" in capsys.readouterr().out
    # A later day follows in managed mode; a hashing day cannot follow a managed one.
    assert cli_main(["convert", "criteo", str(raw), "--vocab", "managed", "--out", str(day1), "--follows", str(day0),
                     "--quiet"]) == 0
    assert [p.index for _, _, p in read_days([day0, day1])] == [0, 1]
    capsys.readouterr()
    assert cli_main(["convert", "criteo", str(raw), "--hash-size", "100", "--out", str(tmp_path / "h"), "--follows",
                     str(day0), "--quiet"]) == 2
    assert "options.mode: the day was converted in managed mode" in _error_line(capsys)


def test_convert_refuses_table_sizes_with_vocab_managed(shared_data: Path, tmp_path: Path, capsys) -> None:
    raw = shared_data / "criteo_dac_train_head10k.txt"
    for extra in (["--hash-size", "10"], ["--min-count", "2"]):
        assert cli_main(["convert", "criteo", str(raw), "--vocab", "managed", "--out", str(tmp_path / "x"), "--quiet",
                         *extra]) == 2
        assert "--vocab managed keeps every token's 64-bit hash" in _error_line(capsys)


def test_synth_vocab_writes_the_same_rows_as_hashing_or_managed_ids(
    native_data: Path, managed_data: Path, tmp_path: Path, capsys
) -> None:
    hashed = _synth(tmp_path / "hashed", "--vocab", "hashing", "--hash-size", "50")
    native, managed, hashing = (read_metadata(d) for d in (native_data, managed_data, hashed))
    assert managed.options["mode"] == "managed" and hashing.options["mode"] == "hashing"
    assert {f.vocab_size for f in managed.fields} == {MANAGED_ID_SPACE} and {f.vocab_size for f in hashing.fields} == {50}
    assert len({native.vocab_fingerprint, managed.vocab_fingerprint, hashing.vocab_fingerprint}) == 3
    assert native.bayes == managed.bayes == hashing.bayes
    file = native.splits["train"].files[0]
    tables = [pq.read_table(d / file) for d in (native_data, managed_data, hashed)]
    assert tables[0].column("label").equals(tables[1].column("label"))
    assert int(pa.compute.max(tables[2].column("C1")).as_py()) < 50
    # One native id, one managed id: the encoding is a bijection on each field.
    c3 = [t.column("C3").to_numpy() for t in tables[:2]]
    assert len(set(zip(c3[0].tolist(), c3[1].tolist()))) == len(set(c3[0].tolist())) == len(set(c3[1].tolist()))
    capsys.readouterr()
    assert cli_main(["synth", "--rows", "10", "--out", str(tmp_path / "x"), "--hash-size", "5", "--no-progress"]) == 2
    assert "--hash-size: give --vocab hashing" in _error_line(capsys)


def test_synth_days_in_managed_mode_form_a_day_sequence(tmp_path: Path) -> None:
    out = tmp_path / "log"
    assert cli_main(["synth", "--days", "2", "--rows", "2000", "--out", str(out), "--scale", "0.001", "--churn", "0.3",
                     "--vocab", "managed", "--no-progress"]) == 0
    places = read_days(day_dirs(out, 2))
    assert [meta.options["mode"] for _, meta, _ in places] == ["managed", "managed"]
    # The id history keeps managed keys as sorted ids (a mask over 2**63 ids would not fit).
    history = IdHistory(places[0][1].vocab_sizes)
    first = history.add({"C1": np.array([5, 2**62, 5])})
    assert first["C1"] == 2 and history.add({"C1": np.array([5, 7])})["C1"] == 1
    history.save(tmp_path / "seen.npz")
    assert IdHistory.load(tmp_path / "seen.npz", places[0][1].vocab_sizes).add({"C1": np.array([7, 8])})["C1"] == 1


# ------------------------------------------------------------------------------------------ the modules
def test_unseen_ids_share_the_fallback_row_until_an_eviction_gives_them_rows() -> None:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t_f", embedding_dim=4, num_embeddings=4, feature_names=["f"])])
    mc = managed_collection(ebc, ManagedSpec(table_rows=4, eviction="lfu", eviction_interval=2)).train()
    kjt = lambda *ids: KeyedJaggedTensor.from_lengths_sync(  # noqa: E731
        keys=["f"], values=torch.tensor(ids), lengths=torch.ones(len(ids), dtype=torch.int64))
    remap = mc._managed_collision_collection
    # Batches of one size: TorchRec sizes the buffer of an interval's keys from the first batch.
    assert remap(kjt(11, 12, 12)).values().tolist() == [3, 3, 3]  # step 1: unseen, the fallback row (the last)
    counts = managed_counts(mc)
    assert (counts["train_fallback"], counts["rows_in_use"]) == (3, 0)
    remap(kjt(11, 13, 11))  # step 2: the interval ends, the 3 keys take the 3 free rows
    counts = managed_counts(mc)
    assert (counts["rows_in_use"], counts["assigned"], counts["evictions"]) == (3, 3, 0)
    rows = remap(kjt(11, 12, 13)).values().tolist()
    assert sorted(rows) == [0, 1, 2]
    remap(kjt(14, 14, 14))  # step 4: 14 (counted 3 times) evicts the least counted key, 13 (2 times)
    counts = managed_counts(mc)
    assert (counts["rows_in_use"], counts["assigned"], counts["evictions"]) == (3, 1, 1)
    assert remap(kjt(14, 13, 11)).values().tolist()[:2] == [rows[2], 3]  # 14 took 13's row; 13 falls back
    mc.eval()
    remap(kjt(99))
    assert managed_counts(mc)["eval_fallback"] == 1


def test_managed_specs_and_plans_outside_what_was_checked_are_refused() -> None:
    with pytest.raises(ValueError, match="must be a multiple of the world size 2"):
        ManagedSpec(table_rows=65, buckets=2)
    with pytest.raises(ValueError, match="at least 2 rows per rank"):
        ManagedSpec(table_rows=2, buckets=2)
    with pytest.raises(ValueError, match="--eviction: expected one of lfu, lru"):
        ManagedSpec(table_rows=8, eviction="fifo")
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t_f", embedding_dim=8, num_embeddings=16, feature_names=["f"])],
                                 device=torch.device("meta"))
    mc = managed_collection(ebc, ManagedSpec(table_rows=16, buckets=2))
    with pytest.raises(ValueError, match="--vocab managed runs on cpu"):
        plan_managed(mc, world_size=2, local_world_size=2, device_type="cuda")
    with pytest.raises(ValueError, match="not a multiple of the world size 3"):
        plan_managed(mc, world_size=3, local_world_size=3, device_type="cpu")


def test_managed_checkpoints_resume_only_on_their_world_size(tmp_path: Path) -> None:
    entries = ["model.x", "rank0.rng", "rank1.rng"]
    assert saved_world_size(entries) == 2
    check_same_world_size(tmp_path, entries, 2)
    with pytest.raises(ValueError, match="checkpointed on 2 rank\\(s\\) and cannot resume on 1"):
        check_same_world_size(tmp_path, entries, 1)


# ------------------------------------------------------------------------------------------------ training
def _train(data: Path, out: Path, *extra: str) -> int:
    return cli_main(["train", "--data", str(data), "--out", str(out), "--model", "dnn-me-2x", "--epochs", "1", *TINY,
                     *extra])


@pytest.mark.parametrize(
    "data,extra,message",
    [
        ("native", MANAGED, "--vocab managed needs data converted with --vocab managed"),
        ("managed", [], "train it with --vocab managed --table-rows N"),
        ("managed", ["--vocab", "managed"], "--vocab managed needs --table-rows N"),
        ("native", ["--table-rows", "64"], "--table-rows: options of managed tables; add --vocab managed"),
        ("managed", [*MANAGED, "--layout", "per_set"], "--vocab managed needs --layout fused"),
        ("managed", [*MANAGED, "--sharding", "column_wise"], "shards its tables row-wise"),
        ("managed", [*MANAGED, "--table-dtype", "fp16"], "--vocab managed keeps fp32 tables"),
        ("managed", [*MANAGED, "--eviction-interval", "0"], "--eviction-interval: must be >= 1 step"),
    ],
    ids=["native-data", "no-vocab-flag", "no-table-rows", "rows-without-managed", "per-set", "column-wise", "fp16",
         "interval-0"],
)
def test_train_refuses_in_one_line(
    managed_data: Path, native_data: Path, tmp_path: Path, capsys, data: str, extra: List[str], message: str
) -> None:
    source = managed_data if data == "managed" else native_data
    assert _train(source, tmp_path / "run", *extra) == 2
    assert message in _error_line(capsys)


@pytest.mark.parametrize("model", ["dnn-me-2x", "dnn-se-2x"])
def test_a_managed_run_records_fallback_hits_rows_in_use_and_evictions(
    managed_data: Path, tmp_path: Path, model: str
) -> None:
    run = tmp_path / "run"
    assert _train(managed_data, run, *MANAGED, "--model", model, "--eval-every", "4") == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) >= 2
    fields = len(read_metadata(managed_data).fields)
    for record in records:
        assert record["managed_rows"] == fields * TABLE_ROWS
        # One fallback row per table never holds a key.
        assert 0 < record["managed_rows_in_use"] <= fields * (TABLE_ROWS - 1)
        assert 0.0 <= record["managed_eval_fallback_share"] <= 1.0
    # Before the first eviction every id falls back; later the hot ids have rows and some rows changed hands.
    assert records[0]["managed_train_fallback_share"] > records[-1]["managed_train_fallback_share"]
    assert sum(r["managed_evictions"] for r in records) > 0
    summary = json.loads((run / "summary.json").read_text())
    for key in ("managed_rows_in_use", "managed_train_fallback_share", "managed_val_fallback_share",
                "managed_test_fallback_share", "managed_assigned", "managed_evictions"):
        assert summary[key] is not None, key
    assert 0.0 < summary["test_auc"] < 1.0 and np.isfinite(summary["test_logloss"])  # 9 steps: near chance
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["vocab"] == "managed" and config["sharding"]["tables"][0]["sharding_type"] == "row_wise"


class _Crash(RuntimeError):
    pass


def test_a_managed_run_resumes_exactly_from_its_checkpoint(managed_data: Path, tmp_path: Path, monkeypatch) -> None:
    # Checkpoints at steps 4 and 8 (and the end, 9); intervals of 3 steps, so step 4 is mid-interval: the checkpoint
    # closes it. The second run dies while publishing step 8 and resumes from step 4.
    options = [*MANAGED, "--checkpoint-every", "4", "--eval-every", "4", "--patience", "0"]
    reference = tmp_path / "reference"
    assert _train(managed_data, reference, *options) == 0

    def crash(tmp: Path) -> None:
        if tmp.name == ".tmp-" + ckpt.step_dir_name(8):
            raise _Crash("killed while publishing step 8")

    crashed = tmp_path / "crashed"
    monkeypatch.setattr(ckpt, "_before_publish_hook", crash)
    assert _train(managed_data, crashed, *options) != 0
    monkeypatch.setattr(ckpt, "_before_publish_hook", None)
    assert _train(managed_data, crashed, *options, "--resume") == 0
    # Counted by the process that ran them: the resumed process counts from the resume on.
    counted = TIMING_KEYS | {"managed_train_fallback_share", "managed_assigned", "managed_evictions"}
    got, want = (json.loads((r / "summary.json").read_text()) for r in (crashed, reference))
    assert {k: v for k, v in got.items() if k not in counted} == {k: v for k, v in want.items() if k not in counted}
    evaluations = [
        [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in
         (r / "metrics.jsonl").read_text().splitlines()]
        for r in (crashed, reference)
    ]
    # Rows assigned when the checkpoint of step 4 closed its interval were counted by the crashed process.
    for got_record, want_record in zip(*evaluations):
        for key in ("managed_assigned", "managed_evictions"):
            got_record.pop(key), want_record.pop(key)
    assert evaluations[0] == evaluations[1]


def test_the_days_loop_records_what_the_managed_tables_did_each_day(tmp_path: Path) -> None:
    log = tmp_path / "log"
    assert cli_main(["synth", "--days", "2", "--rows", "3000", "--out", str(log), "--scale", "0.001", "--churn", "0.3",
                     "--vocab", "managed", "--no-progress"]) == 0
    run = tmp_path / "days"
    assert cli_main(["days", "--data", *map(str, day_dirs(log, 2)), "--out", str(run), "--model", "dnn-me-2x", *TINY,
                     *MANAGED]) == 0
    days = json.loads((run / "summary.json").read_text())["days"]
    # Day 0 starts with empty tables: every lookup falls back before training; day 1 brings only its new ids.
    assert days[0]["managed_pv_fallback_share"] == 1.0
    assert 0.0 < days[1]["managed_pv_fallback_share"] < 0.5
    for day in days:
        assert 0 < day["managed_rows_in_use"] <= day["managed_rows"]
        assert day["managed_assigned"] > 0 and 0.0 <= day["managed_train_fallback_share"] <= 1.0


# ------------------------------------------------------------------------------------------ export / predict
def _predict(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert cli_main(["predict", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_an_exported_managed_run_predicts_what_it_scored(managed_data: Path, tmp_path: Path, capsys) -> None:
    run, artifact = tmp_path / "run", tmp_path / "artifact"
    assert _train(managed_data, run, *MANAGED) == 0
    assert cli_main(["export", str(run), "--out", str(artifact), "--quantize", "none"]) == 0
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["preprocessing"]["remap"] == "remap.npz" and "remap" in manifest["files"]
    assert {int(n) for _, n in manifest["vocab_sizes"]} == {TABLE_ROWS}
    # The Parquet of managed data holds raw keys: predict maps them through the remapping (unseen: the fallback row).
    result = _predict(capsys, str(artifact), "--data", str(managed_data), "--out", str(tmp_path / "p.parquet"))
    summary = json.loads((run / "summary.json").read_text())
    assert result["auc"] == pytest.approx(summary["test_auc"], abs=1e-6)
    assert result["logloss"] == pytest.approx(summary["test_logloss"], abs=1e-6)


def test_predict_raw_maps_raw_rows_through_the_remapping(shared_data: Path, tmp_path: Path, capsys) -> None:
    raw = shared_data / "criteo_dac_train_head10k.txt"
    data, rows, run, artifact = (tmp_path / n for n in ("data", "rows", "run", "artifact"))
    assert cli_main(["convert", "criteo", str(raw), "--vocab", "managed", "--out", str(data), "--quiet"]) == 0
    # The same file, every row in the test split in file order: the rows predict --raw reads.
    assert cli_main(["convert", "criteo", str(raw), "--vocab", "managed", "--out", str(rows), "--split", "0,0,1",
                     "--quiet"]) == 0
    assert _train(data, run, *MANAGED, "--model", "dnn-se-2x") == 0
    assert cli_main(["export", str(run), "--out", str(artifact), "--quantize", "none"]) == 0
    from multiembed.data.remap import RemappedVocabulary

    remap = RemappedVocabulary.load(artifact)
    assert 0 < remap.keys_with_rows("C1") < TABLE_ROWS
    by_raw = _predict(capsys, str(artifact), "--raw", str(raw), "--out", str(tmp_path / "raw.parquet"))
    by_rows = _predict(capsys, str(artifact), "--data", str(rows), "--out", str(tmp_path / "rows.parquet"))
    raw_probs = pq.read_table(tmp_path / "raw.parquet").column("prob").to_numpy()
    row_probs = pq.read_table(tmp_path / "rows.parquet").column("prob").to_numpy()
    np.testing.assert_array_equal(raw_probs, row_probs)


# ------------------------------------------------------------------------------------------ two ranks, torchx
@pytest.fixture(scope="module")
def managed_log(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("managed-torchx") / "data"
    assert cli_main(["synth", "--rows", "4000", "--out", str(out), "--seed", "5", "--scale", "0.001", "--vocab",
                     "managed", "--no-progress"]) == 0
    return out


def _torchx_args(data: Path, run: Path) -> List[str]:
    # 3200 train rows / global batch 256: 12 steps; a checkpoint every 4 steps; evictions every 3 steps.
    return ["--data", str(data), "--out", str(run), "--model", "dnn-me-2x", "--batch_size", "256", "--epochs", "1",
            "--patience", "0", "--checkpoint_every", "4", "--max_restarts", "1", "-j", "1x2"]


@pytest.mark.multiprocess
def test_a_managed_run_on_two_ranks_resumes_identically_after_a_kill_and_exports(
    managed_log: Path, tmp_path: Path, capsys
) -> None:
    import os
    import re

    from test_faults import _assert_same_result, _kill_at_publish_site, _run_logged
    from test_torchx import TINY_WORKER, run_torchx, tail, torchx_command, torchx_env

    worker = [*TINY_WORKER, *MANAGED, "--eval-every", "4"]
    reference, log = tmp_path / "reference", tmp_path / "reference.log"
    assert run_torchx(torchx_command(tmp_path / "logs", _torchx_args(managed_log, reference), worker), log) == 0, tail(log)
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["managed_rows"] == 39 * TABLE_ROWS
    assert summary["managed_evictions"] > 0
    # Rank 0 is killed while it publishes the checkpoint of step 8; torchrun restarts both ranks from step 4.
    restarted, restarted_log = tmp_path / "restarted", tmp_path / "restarted.log"
    env = torchx_env()
    env["LOGLEVEL"] = "INFO"
    site = _kill_at_publish_site(tmp_path / "site", 8, "rename")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH", "")) if p)
    command = torchx_command(tmp_path / "logs-restarted", _torchx_args(managed_log, restarted), worker)
    assert _run_logged(command, restarted_log, env) == 0, tail(restarted_log)
    text = restarted_log.read_text(errors="replace")
    assert [int(s) for s in re.findall(r"resumed from \S*step-(\d+)", text)] == [4], tail(restarted_log)
    for run in (restarted, reference):  # counted by the process that ran them (the restarted one counts from step 4)
        for name in ("summary.json",):
            record = json.loads((run / name).read_text())
            for key in ("managed_train_fallback_share", "managed_assigned", "managed_evictions"):
                record.pop(key)
            (run / name).write_text(json.dumps(record))
        lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        for record in lines:
            record.pop("managed_assigned"), record.pop("managed_evictions")
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    _assert_same_result(restarted, reference)
    # Another world size is refused in one line (each rank's remapping covers its bucket of ids).
    capsys.readouterr()
    assert _train(managed_log, restarted, *MANAGED, "--resume", "--epochs", "2") == 2
    assert "checkpointed on 2 rank(s) and cannot resume on 1" in _error_line(capsys)
    # Exported on one process, the two ranks' remappings serve what the run scored (unseen ids: their bucket's
    # fallback row).
    artifact = tmp_path / "artifact"
    assert cli_main(["export", str(reference), "--out", str(artifact), "--quantize", "none"]) == 0
    result = _predict(capsys, str(artifact), "--data", str(managed_log), "--out", str(tmp_path / "p.parquet"))
    assert result["auc"] == pytest.approx(summary["test_auc"], abs=1e-6)
    assert result["logloss"] == pytest.approx(summary["test_logloss"], abs=1e-5)
