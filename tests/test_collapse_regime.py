"""The collapse regime of the synthetic log (``multiembed synth --regime collapse``), the ``collapse`` study preset,
and the collapse monitor (trainer progress + metrics.jsonl, ``multiembed analyze`` marks), at small sizes."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import List

import numpy as np
import pytest
import torch

from multiembed.cli import main as cli_main
from multiembed.collapse import collapse_from_tables
from multiembed.collapse.monitor import CollapseMonitor, collapsed_fields, format_collapsed, random_init_ia
from multiembed.data.metadata import read_metadata
from multiembed.data.metrics import roc_auc
from multiembed.data.synthetic import (
    COLLAPSE_FIELDS,
    COLLAPSE_PAIRS,
    CollapseRegimeConfig,
    CollapseRegimeModel,
    SyntheticClickModel,
    SyntheticConfig,
)

BASE_WIDTH = 10  # one set's width (BASE_SET_DIM of dcnv2)


# ------------------------------------------------------------------------------------------------ the regime
def test_regime_follows_its_design() -> None:
    model = CollapseRegimeModel(CollapseRegimeConfig())
    sizes = model.vocab_sizes
    assert 8 <= len(COLLAPSE_FIELDS) <= 12 and model.dense_fields == ()
    ranks = model.field_ranks()
    rich = [f.name for f in COLLAPSE_FIELDS if f.role == "rich"]
    tiny = [f.name for f in COLLAPSE_FIELDS if f.role == "tiny"]
    assert len(rich) >= 3 and len(tiny) >= 2
    # Rich fields' planted interactions need more than one set's width; tiny fields are low-information.
    assert all(ranks[f] > BASE_WIDTH for f in rich), ranks
    assert all(sizes[f] <= 5 for f in tiny)
    assert max(sizes.values()) / min(sizes.values()) >= 500  # three orders of magnitude
    # Every rich field interacts explicitly with tiny fields (the interaction-collapse law's setting).
    for f in rich:
        assert any(p.group == "tiny" and f in (p.a, p.b) for p in COLLAPSE_PAIRS), f
    # Rows per id at the preset's data (500k rows, 400k train): even the rarest rich id has tens of rows.
    rows = model.min_expected_rows_per_id(400_000)
    assert min(rows[f] for f in rich) >= 40, rows
    assert model.id_probabilities("rich0").sum() == pytest.approx(1.0)


def test_regime_labels_and_parts() -> None:
    model = CollapseRegimeModel(CollapseRegimeConfig(seed=3))
    rows = model.sample(np.random.default_rng(0), 60_000)
    assert rows.ids.shape == (60_000, len(COLLAPSE_FIELDS)) and rows.dense.shape == (60_000, 0)
    for f, field in enumerate(COLLAPSE_FIELDS):
        assert rows.ids[:, f].min() >= 0 and rows.ids[:, f].max() < field.vocab_size
    assert abs(float(rows.true_prob.mean()) - 0.25) < 0.02
    parts = model.logit_parts(rows.ids)
    for name, std in (("first", 0.6), ("rich", 1.0), ("tiny", 1.0), ("mid", 0.4)):
        assert float(parts[name].std()) == pytest.approx(std, rel=0.1), name
    bayes = roc_auc(rows.labels, rows.true_prob)
    # Neither the rich nor the tiny interactions alone come close to the Bayes-optimal AUC.
    y = rows.labels
    assert roc_auc(y, parts["first"] + parts["tiny"] + parts["mid"]) < bayes - 0.05
    assert roc_auc(y, parts["first"] + parts["rich"] + parts["mid"]) < bayes - 0.05


def test_default_generator_is_unchanged() -> None:
    # The fingerprint of the default generator before the collapse regime existed (same ids, same labels).
    assert SyntheticClickModel(SyntheticConfig()).fingerprint() == "synthetic-v1-4323663d4cf5ea90bc022b695caa0793"
    assert CollapseRegimeModel(CollapseRegimeConfig()).fingerprint().startswith("synthetic-collapse-v1-")
    assert (CollapseRegimeModel(CollapseRegimeConfig(seed=1)).fingerprint()
            != CollapseRegimeModel(CollapseRegimeConfig()).fingerprint())


@pytest.fixture(scope="module")
def regime_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("regime") / "data"
    assert cli_main(["synth", "--regime", "collapse", "--rows", "6000", "--out", str(out), "--seed", "2",
                     "--no-progress"]) == 0
    return out


def test_synth_cli_writes_the_regime_with_its_bayes_auc(regime_data: Path, capsys) -> None:
    meta = read_metadata(str(regime_data))
    assert [f.name for f in meta.fields] == [f.name for f in COLLAPSE_FIELDS] and meta.dense_fields == []
    assert meta.options["regime"] == "collapse" and meta.vocab_fingerprint.startswith("synthetic-collapse-v1-")
    assert meta.extra["generator"]["field_ranks"]["rich0"] == 22
    import pyarrow.parquet as pq

    test = pq.read_table(regime_data / meta.splits["test"].files[0])
    labels, probs = test.column("label").to_numpy(), test.column("true_prob").to_numpy()
    assert meta.bayes["test"]["auc"] == pytest.approx(roc_auc(labels, probs))
    assert 0.75 < meta.bayes["test"]["auc"] < 0.9  # 600 rows: about 0.825 on large samples


def test_synth_cli_refuses_options_of_the_default_generator(tmp_path: Path, capsys) -> None:
    for extra in (["--scale", "0.1"], ["--tsv", str(tmp_path / "x.tsv")], ["--signal", "1"]):
        assert cli_main(["synth", "--regime", "collapse", "--rows", "100", "--out", str(tmp_path / "d"),
                         "--no-progress", *extra]) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("multiembed synth: error: ") and extra[0] in error and "--regime collapse" in error
    assert not (tmp_path / "d" / "metadata.json").exists()


# ---------------------------------------------------------------------------------------------- the preset
def test_collapse_preset_is_the_documented_grid() -> None:
    from multiembed.analysis.study import PRESETS, resolve_options

    preset = PRESETS["collapse"]
    assert preset.grid == {"backbones": ["dcnv2"], "modes": ["se", "me"], "scales": [1, 2, 4, 10], "seeds": 5}
    assert "--regime collapse" in preset.data_hint
    options = resolve_options({"scales": [1, 10], "modes": ["se", "se-sr"]}, "collapse")
    assert options["scales"] == [1, 10] and options["modes"] == ["se", "se-sr"] and options["seeds"] == 5
    assert options["spectral_reg"] == pytest.approx(1e-4)  # the se-sr mode's default weight
    # collapse-long: the same grid, data and model, trained under early stopping instead of a step cap.
    long = PRESETS["collapse-long"]
    assert long.grid == preset.grid and long.data_hint == preset.data_hint
    assert long.train["max_steps"] == 0 and long.train["patience"] > 0 and long.train["epochs"] > 1
    assert {k: v for k, v in long.train.items() if k not in ("epochs", "eval_every", "max_steps")} == {
        k: v for k, v in preset.train.items() if k not in ("epochs", "eval_every", "max_steps")}


# ------------------------------------------------------------------------------------------------ the monitor
def _layout(fields: List[str], sets: int, stored: int = 12):
    return [SimpleNamespace(table_name=f"t_{f}", field=f, set_index=k, col_start=stored * k,
                            col_stop=stored * k + BASE_WIDTH) for f in fields for k in range(sets)]


def test_random_reference_is_collapse_json_random_init() -> None:
    torch.manual_seed(0)
    tables = {"t_a": torch.randn(300, 24), "t_b": torch.randn(4, 24)}
    result = collapse_from_tables(tables, _layout(["a", "b"], 2), random_init_seed=0)
    reference = random_init_ia({"a": 300, "b": 4}, BASE_WIDTH, seed=0)
    assert reference == pytest.approx(result.random_init, rel=1e-12)
    assert reference["b"] <= 4.0 + 1e-9  # bounded by the rows of a tiny field
    wide = random_init_ia({"a": 300, "b": 4}, 2 * BASE_WIDTH)
    assert wide["a"] > reference["a"] and wide["b"] <= 4.0 + 1e-9


def test_monitor_names_collapsed_sets_and_concatenations() -> None:
    torch.manual_seed(1)
    direction = torch.randn(1, 24)
    # a: healthy; b: every set rank one; c: two healthy-looking sets that are copies (the concatenation collapses).
    copy = torch.randn(400, 12)
    tables = {"t_a": torch.randn(400, 24), "t_b": torch.randn(400, 1) * direction, "t_c": torch.cat([copy, copy], 1)}
    result = collapse_from_tables(tables, _layout(["a", "b", "c"], 2), random_init_seed=None)
    monitor = CollapseMonitor(0.5)
    entries = monitor.check(result)
    assert [(e.field, e.where) for e in entries] == [("b", "set 0"), ("b", "set 1"), ("b", "concat")]
    strict = CollapseMonitor(0.6).check(result)  # c's concatenation has the IA of one set: about half of 2d's
    assert ("c", "concat") in [(e.field, e.where) for e in strict]
    assert CollapseMonitor(0.0).check(result) == [] and not CollapseMonitor(0.0).enabled
    refs = monitor.references(result)
    assert collapsed_fields(result, 0.5, refs["set"], None) == [e for e in entries if e.where != "concat"]
    text = format_collapsed(entries, 0.5, limit=2)
    assert text.startswith("collapsed (IA < 0.5 x random init): b (set 0: 1.00 vs ") and text.endswith("and 1 more")
    with pytest.raises(ValueError, match="--collapse-warn"):
        CollapseMonitor(1.5)


TRAIN = ["--batch-size", "256", "--hidden", "16", "--epochs", "1", "--max-steps", "4", "--eval-every", "2",
         "--device", "cpu", "--no-progress"]


def test_trainer_names_collapsed_fields_and_analyze_marks_them(regime_data: Path, tmp_path: Path, capsys) -> None:
    from multiembed.analysis.analyze import analyze_run, format_summary
    from multiembed.training.distributed import destroy

    run = tmp_path / "run"
    # --collapse-warn 1: every field below a fresh random table's IA is named (after a few steps, most are).
    assert cli_main(["train", "--data", str(regime_data), "--model", "dnn-me-2x", "--out", str(run),
                     "--collapse-warn", "1", *TRAIN]) == 0
    err = capsys.readouterr().err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["collapse_warn"] == 1.0 for r in records)
    named = records[-1]["collapsed"]
    assert named and {e["where"] for e in named} <= {"set 0", "set 1", "concat"}
    assert all(e["ia"] < e["random_ia"] for e in named)
    assert "collapsed (IA < 1 x random init): " in err and f"{named[0]['field']} ({named[0]['where']}:" in err

    quiet = tmp_path / "quiet"
    assert cli_main(["train", "--data", str(regime_data), "--model", "dnn-me-2x", "--out", str(quiet),
                     "--collapse-warn", "0", *TRAIN]) == 0
    assert "collapsed (IA <" not in capsys.readouterr().err
    assert all("collapsed" not in json.loads(line) for line in (quiet / "metrics.jsonl").read_text().splitlines())

    try:
        marked = analyze_run(run, tmp_path / "report", sub_embedding=False, device="cpu", collapse_warn=1.0)
        relaxed = analyze_run(run, None, sub_embedding=False, device="cpu", collapse_warn=0.01)
    finally:
        destroy()
    data = marked.data
    assert data["collapse_warn"] == 1.0 and data["collapsed"]
    assert len(data["random_init_concat"]) == len(COLLAPSE_FIELDS)
    saved = json.loads((tmp_path / "report" / "collapse.json").read_text())
    assert saved["collapsed"] == data["collapsed"]
    summary = format_summary(data)
    assert "collapsed (IA < 1 x random init)" in summary and f"  * {data['collapsed'][0]['field']}: " in summary
    assert relaxed.data["collapsed"] == [] and "no field collapsed" in format_summary(relaxed.data)
