"""The scaling study: statistics and tables checked against hand-computed numbers on made-up rows, the torchx
component, and a tiny real ``multiembed scale`` run (files, rows, resumption, refusal of mixed settings)."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType
from typing import Dict, List

import matplotlib.image
import numpy as np
import pytest
from torchx.components.component_test_base import ComponentTestCase

from multiembed.analysis.scaling import (
    SCALING_COLUMNS,
    StudyPoint,
    aggregate,
    difference_table,
    format_markdown,
    ia_concat_mean,
    ia_mean,
    make_row,
    mean_std,
    metric_table,
    paired_differences,
    plot_scaling,
    read_csv,
    scaling_series,
    study_grid,
    t_critical,
    write_csv,
)
from multiembed.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


def row(backbone: str, mode: str, scale: int, seed: int, test_auc: float, ia: float = 5.0) -> Dict:
    return {
        "backbone": backbone, "mode": mode, "scale": scale, "seed": seed, "val_auc": test_auc - 0.01,
        "test_auc": test_auc, "test_logloss": 0.45, "bayes_test_auc": 0.85, "ia_mean": ia,
        "ia_concat_mean": ia * (1 if mode == "se" else scale), "ia_random_mean": 9.0 * scale,
        "embedding_params": 1000 * scale, "dense_params": 50_000 * (scale if mode == "se" else 1),
        "samples_per_s": 100.0 * seed + 1.0,
    }


# Made-up results: at 2x, ME - SE per seed is 0.001, 0.002, 0.004 (mean 7/3 e-3, sample variance 7/3 e-6).
MADE_UP: List[Dict] = [
    row("dcnv2", "se", 1, 0, 0.800, 6.0), row("dcnv2", "se", 1, 1, 0.801, 7.0), row("dcnv2", "se", 1, 2, 0.803, 8.0),
    row("dcnv2", "me", 1, 0, 0.800, 6.0), row("dcnv2", "me", 1, 1, 0.801, 7.0), row("dcnv2", "me", 1, 2, 0.803, 8.0),
    row("dcnv2", "se", 2, 0, 0.810, 9.0), row("dcnv2", "se", 2, 1, 0.811, 10.0), row("dcnv2", "se", 2, 2, 0.812, 11.0),
    row("dcnv2", "me", 2, 0, 0.811, 4.0), row("dcnv2", "me", 2, 1, 0.813, 5.0), row("dcnv2", "me", 2, 2, 0.816, 6.0),
    row("dcnv2", "me", 2, 3, 0.900, 6.0),  # no SE partner: not paired
    row("dnn", "se", 2, 0, 0.700), row("dnn", "me", 2, 0, 0.705),  # one seed: no interval
]


# ------------------------------------------------------------------------------------------------ statistics
def test_mean_and_sample_std_by_hand() -> None:
    mean, std = mean_std([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and std == pytest.approx(math.sqrt(7 / 3))  # ((16 + 1 + 25) / 9) / 2
    assert mean_std([0.5]) == (0.5, None)
    with pytest.raises(ValueError):
        mean_std([])


@pytest.mark.parametrize(
    "df,expected",  # two-sided 95% critical values from a printed Student-t table
    [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423), (1000, 1.9623)],
)
def test_t_critical_matches_the_printed_table(df: int, expected: float) -> None:
    assert t_critical(0.95, df) == pytest.approx(expected, abs=5e-5)


def test_t_critical_other_levels_and_bad_input() -> None:
    assert t_critical(0.99, 4) == pytest.approx(4.6041, abs=5e-5)
    assert t_critical(0.90, 2) == pytest.approx(2.9200, abs=5e-5)
    for confidence, df in ((0.95, 0), (1.0, 3), (0.95, 2.5)):
        with pytest.raises(ValueError):
            t_critical(confidence, df)


def test_aggregate_cells() -> None:
    cells = aggregate(MADE_UP, "test_auc")
    se2 = cells[("dcnv2", "se", 2)]
    assert se2.n == 3 and se2.mean == pytest.approx(0.811) and se2.std == pytest.approx(0.001)
    me2 = cells[("dcnv2", "me", 2)]  # four seeds, the unpaired one included
    assert me2.n == 4 and me2.mean == pytest.approx((0.811 + 0.813 + 0.816 + 0.900) / 4)
    assert cells[("dnn", "me", 2)].std is None


def test_paired_differences_with_a_t_interval() -> None:
    diffs = {(d.backbone, d.scale): d for d in paired_differences(MADE_UP)}
    assert set(diffs) == {("dcnv2", 1), ("dcnv2", 2), ("dnn", 2)}
    at2 = diffs[("dcnv2", 2)]
    assert at2.seeds == (0, 1, 2)  # seed 3 has no SE run
    assert at2.mean == pytest.approx(7e-3 / 3) and at2.std == pytest.approx(math.sqrt(7 / 3) * 1e-3)
    half = 4.302653 * math.sqrt(7 / 3) * 1e-3 / math.sqrt(3)
    assert at2.low == pytest.approx(7e-3 / 3 - half, abs=1e-9) and at2.high == pytest.approx(7e-3 / 3 + half, abs=1e-9)
    at1 = diffs[("dcnv2", 1)]
    assert at1.mean == pytest.approx(0.0) and at1.low == pytest.approx(0.0) and at1.high == pytest.approx(0.0)
    single = diffs[("dnn", 2)]
    assert single.n == 1 and single.mean == pytest.approx(0.005) and single.low is None and single.std is None


def test_markdown_table_like_the_paper_and_intervals() -> None:
    table = metric_table(MADE_UP, "test_auc", 5).splitlines()
    assert table[0] == "| model | 1x | 2x |"
    se_cells = [c.strip() for c in table[2].strip("|").split("|")]
    assert se_cells[0] == "DCNv2 SE"
    assert se_cells[1] == f"{np.mean([0.800, 0.801, 0.803]):.5f} ± {np.std([0.800, 0.801, 0.803], ddof=1):.5f} (n=3)"
    me_cells = [c.strip() for c in table[3].strip("|").split("|")]
    me2 = [0.811, 0.813, 0.816, 0.900]
    assert me_cells[0] == "DCNv2 ME" and me_cells[2] == f"{np.mean(me2):.5f} ± {np.std(me2, ddof=1):.5f}"  # full count
    assert [line.split("|")[1].strip() for line in table[2:]] == ["DCNv2 SE", "DCNv2 ME", "DNN SE", "DNN ME"]
    assert table[4].split("|")[2].strip() == "-"  # DNN has no 1x run

    text = format_markdown(MADE_UP, notes=["data: made up"])
    half = 4.302653 * math.sqrt(7 / 3) * 1e-3 / math.sqrt(3)
    assert f"| DCNv2 | 2x | 3 | +0.00233 | 0.00153 | [{7e-3 / 3 - half:+.5f}, {7e-3 / 3 + half:+.5f}] |" in text
    assert "| DNN | 2x | 1 | +0.00500 | n/a | n/a |" in text
    assert "- data: made up" in text and "## Information abundance" in text


def test_csv_round_trip_has_the_exact_columns(tmp_path: Path) -> None:
    path = write_csv(MADE_UP, tmp_path / "scaling.csv")
    with open(path, newline="") as f:
        header = next(csv.reader(f))
    assert header == list(SCALING_COLUMNS) == [
        "backbone", "mode", "scale", "seed", "val_auc", "test_auc", "test_logloss", "bayes_test_auc", "ia_mean",
        "ia_concat_mean", "ia_random_mean", "embedding_params", "dense_params", "samples_per_s",
    ]
    assert read_csv(path) == MADE_UP
    (tmp_path / "bad.csv").write_text(path.read_text().replace("0.801", "x.801", 1))
    with pytest.raises(ValueError, match=r"bad.csv: line \d+, column 'test_auc'"):
        read_csv(tmp_path / "bad.csv")


def test_scaling_figure_draws_the_aggregates(tmp_path: Path) -> None:
    data = plot_scaling(MADE_UP, tmp_path / "scaling.png", base_widths={"dcnv2": 10, "dnn": 10})
    assert matplotlib.image.imread(tmp_path / "scaling.png").ndim == 3
    se = data["auc"][("dcnv2", "se")]
    assert se["scales"] == [1, 2]
    assert se["mean"] == pytest.approx([np.mean([0.800, 0.801, 0.803]), 0.811])
    assert se["std"] == pytest.approx([np.std([0.800, 0.801, 0.803], ddof=1), 0.001])
    assert data["ia_sets"][("dcnv2", "me")]["mean"] == pytest.approx([7.0, 5.25])
    assert data["ia"][("dcnv2", "me")]["mean"] == pytest.approx([7.0, 10.5])  # whole embedding: ME's sets side by side
    assert data["ia_random"][("dcnv2", "se")]["mean"] == pytest.approx([9.0, 18.0])
    assert data["auc"][("dnn", "me")]["std"] == [0.0]  # one seed: no error bar
    assert data["ceilings"][("dcnv2", "se")] == [10, 20] and data["ceilings"][("dcnv2", "me")] == [10, 10]
    assert data["ia_sets"] == scaling_series(MADE_UP, "ia_mean")
    assert data["ia"] == scaling_series(MADE_UP, "ia_concat_mean")


def test_grid_rows_and_ia_mean() -> None:
    grid = study_grid(["dcnv2", "dnn"], ["se", "me"], [1, 2, 4], 2)
    assert len(grid) == 24 and grid[0] == StudyPoint("dcnv2", "se", 1, 0) and grid[-1] == StudyPoint("dnn", "me", 4, 1)
    assert grid[0].run_name == "dcnv2-se-1x-seed0" and grid[5].model == "dcnv2-me-4x"
    assert [p.seed for p in grid[:12]] == [0] * 12  # seed-major
    for bad in ((["dcnv2"], ["se"], [], 1), (["dcnv2", "dcnv2"], ["se"], [1], 1), (["dnn"], ["se"], [0], 1),
                (["dnn"], ["se"], [1], 0)):
        with pytest.raises(ValueError):
            study_grid(*bad)
    assert ia_mean([{"a": 2.0, "b": 4.0}, {"a": 6.0, "b": 8.0}]) == pytest.approx(5.0)
    summary = {"val_auc": 0.7, "test_auc": 0.71, "test_logloss": 0.5, "embedding_params": 10, "dense_params": 20,
               "samples_per_s": 3.5, "steps": 9}
    made = make_row(StudyPoint("dnn", "me", 2, 1), summary, 4.5)
    assert list(made) == list(SCALING_COLUMNS) and made["ia_mean"] == 4.5 and made["mode"] == "me"
    assert math.isnan(made["bayes_test_auc"]) and math.isnan(made["ia_concat_mean"])  # not known / not given
    full = make_row(StudyPoint("dnn", "me", 2, 1), {**summary, "bayes_test_auc": 0.8}, 4.5, 8.0, 17.5)
    assert (full["bayes_test_auc"], full["ia_concat_mean"], full["ia_random_mean"]) == (0.8, 8.0, 17.5)
    assert ia_concat_mean({"sets": [{"a": 2.0}], "concat": None}) == 2.0  # SE: its one table
    assert ia_concat_mean({"sets": [{"a": 2.0}, {"a": 3.0}], "concat": {"a": 4.0}}) == 4.0
    with pytest.raises(ValueError, match="no concatenated IA"):
        ia_concat_mean({"sets": [{"a": 2.0}, {"a": 3.0}], "concat": None})
    assert StudyPoint("dnn", "se-sr", 2, 0).model == "dnn-se-2x" and StudyPoint("dnn", "se-sr", 2, 0).spectral_reg
    with pytest.raises(ValueError, match="unknown nosuch"):
        study_grid(["dnn"], ["se", "nosuch"], [1], 1)
    with pytest.raises(ValueError, match="no 'test_logloss'"):
        make_row(StudyPoint("dnn", "me", 2, 1), {k: v for k, v in summary.items() if k != "test_logloss"}, 1.0)


def test_preset_resolution_and_help_text() -> None:
    from multiembed.analysis.study import PRESETS, resolve_options
    from multiembed.cli.scale import PRESET_HELP

    small = resolve_options({"hidden": 32, "backbones": None}, "small")
    assert small["hidden"] == 32  # explicit wins
    assert small["backbones"] == PRESETS["small"].grid["backbones"]
    assert small["max_steps"] == PRESETS["small"].train["max_steps"]
    paper = resolve_options({}, None)
    assert paper["batch_size"] == 2048 and paper["hidden"] == 400 and paper["scales"] == [1, 2, 3, 4, 10]
    assert paper["output_bias"] == "prior"  # train's default; the presets pin what their results were measured with
    assert {name: resolve_options({}, name)["output_bias"] for name in PRESETS} == dict.fromkeys(PRESETS, "default")
    # The --help text spells every preset out (no torch import at parse time): it must say what the preset sets.
    for name, preset in PRESETS.items():
        text = PRESET_HELP[PRESET_HELP.index(f"{name}: "):]
        for key, value in {**preset.train, **{k: v for k, v in preset.grid.items()}}.items():
            if key == "device":
                continue
            shown = ",".join(str(v) for v in value) if isinstance(value, list) else str(value)
            assert f"--{key.replace('_', '-')} {shown} " in text or f"--{key.replace('_', '-')} {shown}," in text, key
        assert preset.data_hint.replace(" --out DATA", "") in text


# ------------------------------------------------------------------------------------------- torchx component
def load_components() -> ModuleType:
    spec = importlib.util.spec_from_file_location("torchx_components", REPO / "torchx_components.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TestScalingStudyComponent(ComponentTestCase):
    def test_component_validates(self) -> None:
        self.validate(load_components(), "scaling_study")

    def test_command_line(self) -> None:
        app = load_components().scaling_study("--lr", "0.002", data="d", out="o", preset="small", gpu=1)
        (role,) = app.roles
        command = role.args[-1]
        # torchrun through multiembed.cli.launch (a failed job ends with the worker's one-line error).
        assert command.startswith("python -m multiembed.cli.launch torchrun ") and "--nproc_per_node 1" in command
        assert command.endswith("-m multiembed.cli scale --data d --out o --preset small --lr 0.002")
        assert role.resource.gpu == 1
        full = load_components().scaling_study(
            data="d", out="o", backbones="dcnv2,dnn", scales="1,2,3,4,10", modes="se,me", seeds=3
        )
        assert full.roles[0].args[-1].endswith(
            "scale --data d --out o --backbones dcnv2,dnn --scales 1,2,3,4,10 --modes se,me --seeds 3"
        )


# ------------------------------------------------------------------------------------------- a tiny real study
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scaling") / "data"
    synth = ["synth", "--rows", "3000", "--out", str(out), "--seed", "4", "--scale", "0.001", "--no-progress"]
    assert cli_main(synth) == 0
    return out


TINY = ["--backbones", "dnn", "--scales", "1,2", "--modes", "se,me", "--seeds", "2", "--batch-size", "256",
        "--hidden", "16", "--epochs", "1", "--max-steps", "3", "--ia-every", "0", "--device", "cpu", "--no-progress"]


def test_tiny_study_writes_every_file_and_resumes(tiny_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    assert cli_main(["scale", "--data", str(tiny_data), "--out", str(out), *TINY]) == 0
    captured = capsys.readouterr()
    assert "8 trained, 0 skipped" in captured.out
    assert "[8/8] dnn-me-2x-seed1: trained" in captured.err
    assert {p.name for p in out.iterdir()} >= {"scaling.csv", "scaling.md", "scaling.png", "runs", "logs"}

    rows = read_csv(out / "scaling.csv")
    keys = [(r["backbone"], r["mode"], r["scale"], r["seed"]) for r in rows]
    assert keys == [("dnn", m, s, k) for m in ("se", "me") for s in (1, 2) for k in (0, 1)]
    for r in rows:
        run = out / "runs" / f"dnn-{r['mode']}-{r['scale']}x-seed{r['seed']}"
        summary = json.loads((run / "summary.json").read_text())
        assert json.loads((run / "config.json").read_text())["options"]["seed"] == r["seed"]
        for column in ("val_auc", "test_auc", "test_logloss", "embedding_params", "dense_params", "samples_per_s"):
            assert r[column] == summary[column], column
        collapse = json.loads((run / "collapse.json").read_text())
        assert collapse["row_normalized"] is True
        assert r["ia_mean"] == pytest.approx(np.mean([v for s in collapse["sets"] for v in s.values()]))
        assert len(collapse["sets"]) == (r["scale"] if r["mode"] == "me" else 1)
        whole = collapse["concat"] if r["mode"] == "me" and r["scale"] > 1 else collapse["sets"][0]
        assert r["ia_concat_mean"] == pytest.approx(np.mean(list(whole.values())))
        assert r["bayes_test_auc"] == summary["bayes_test_auc"]
    # The random-init reference depends on the shape only: SE and ME of one scale share it, and it grows with s.
    random_by_scale = {(r["scale"], r["mode"]): r["ia_random_mean"] for r in rows}
    assert random_by_scale[(2, "se")] == random_by_scale[(2, "me")] > random_by_scale[(1, "se")]
    assert rows[0]["embedding_params"] * 2 == rows[2]["embedding_params"]  # 2x has twice the embeddings

    markdown = (out / "scaling.md").read_text()
    # The tables are those of the CSV's rows (the markdown is a function of scaling.csv).
    assert metric_table(rows, "test_auc", 5) in markdown and metric_table(rows, "ia_mean", 3) in markdown
    assert difference_table(paired_differences(rows)) in markdown and "| DNN | 2x | 2 |" in markdown
    assert "--hidden 16" in markdown and "--max-steps 3" in markdown
    assert matplotlib.image.imread(out / "scaling.png").ndim == 3

    # The IA of a run equals a fresh analysis of its best checkpoint (the study measured the best weights).
    from multiembed.analysis.analyze import analyze_run
    from multiembed.training.distributed import destroy

    run = out / "runs" / "dnn-me-2x-seed1"
    try:
        fresh = analyze_run(run, None, sub_embedding=False, random_init_seed=None, device="cpu")
    finally:
        destroy()
    assert rows[-1]["ia_mean"] == pytest.approx(np.mean([v for s in fresh.collapse.sets for v in s.values()]), rel=1e-9)

    # Rerun: nothing is trained again; a run whose IA was lost is analysed from its best checkpoint.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    (run / "collapse.json").unlink()
    before = (out / "scaling.csv").read_text()
    assert cli_main(["scale", "--data", str(tiny_data), "--out", str(out), *TINY]) == 0
    captured = capsys.readouterr()
    assert "0 trained, 8 skipped" in captured.out and "skipped" in captured.err
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    assert (out / "scaling.csv").read_text() == before

    # Other settings never mix into a finished study.
    changed = [a if a != "16" else "32" for a in TINY]
    assert cli_main(["scale", "--data", str(tiny_data), "--out", str(out), *changed]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("multiembed scale: error: ") and "used --hidden 16 but the study asks for 32" in error
    # A run written before config.json recorded --output-bias had torch's initialisation ("default"), not today's
    # default: it does not count in a study that asks for "prior".
    first = out / "runs" / "dnn-se-1x-seed0" / "config.json"
    record = json.loads(first.read_text())
    assert record["options"].pop("output_bias") == "prior"
    first.write_text(json.dumps(record))
    assert cli_main(["scale", "--data", str(tiny_data), "--out", str(out), *TINY]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "used --output-bias 'default' but the study asks for 'prior'" in error, error


def test_ablation_modes_mesi_se_sr_and_hetero(tiny_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "ablations"
    options = [a if a != "se,me" else "se,mesi,se-sr,hetero" for a in TINY]
    options = [a if a != "1,2" else "2" for a in options]
    options[options.index("--seeds") + 1] = "1"
    assert cli_main(["scale", "--data", str(tiny_data), "--out", str(out), *options, "--spectral-reg", "0.01"]) == 0
    capsys.readouterr()
    recorded = {
        name: json.loads((out / "runs" / f"dnn-{name}-2x-seed0" / "config.json").read_text())["options"]
        for name in ("se", "mesi", "se-sr", "hetero")
    }
    assert recorded["se-sr"]["model"] == "dnn-se-2x" and recorded["se-sr"]["spectral_reg"] == 0.01
    assert recorded["se"]["spectral_reg"] == 0.0 and recorded["mesi"]["model"] == "dnn-mesi-2x"
    # hetero: the backbone first, then the default experts without it (at 1x: SE of the backbone).
    assert recorded["hetero"]["model"] == "hetero-me-2x" and recorded["hetero"]["experts"] == "dnn,dcnv2,ipnn,nfwfm"
    assert recorded["se"]["experts"] == "dcnv2,ipnn,nfwfm,dnn"  # the default: homogeneous runs take no experts
    assert [r["mode"] for r in read_csv(out / "scaling.csv")] == ["se", "mesi", "se-sr", "hetero"]
    markdown = (out / "scaling.md").read_text()
    assert "## MESI - SE test AUC" in markdown and "## SE+SR - SE test AUC" in markdown
    assert "## HETERO - SE test AUC" in markdown and "(hetero runs only, after the backbone)" in markdown
    assert "| DNN SE+SR |" in markdown and "## Gap to the Bayes-optimal test AUC" in markdown
    # Another weight for se-sr is another study: refused; se-sr without a weight is refused.
    assert cli_main(["scale", "--data", str(tiny_data), "--out", str(out), *options, "--spectral-reg", "0.02"]) == 2
    assert "used --spectral-reg 0.01 but the study asks for 0.02" in capsys.readouterr().err
    assert cli_main(["scale", "--data", str(tiny_data), "--out", str(tmp_path / "x"), *options,
                     "--spectral-reg", "0"]) == 2
    assert "--modes se-sr: needs a positive --spectral-reg" in capsys.readouterr().err


def test_bad_study_options_are_refused(tiny_data: Path, tmp_path: Path, capsys) -> None:
    base = ["scale", "--data", str(tiny_data), "--out", str(tmp_path / "s"), "--device", "cpu", "--no-progress"]
    assert cli_main([*base, "--backbones", "nosuch", "--scales", "1", "--seeds", "1"]) == 2
    assert "unknown model name 'nosuch-se-1x'" in capsys.readouterr().err
    assert cli_main([*base, "--backbones", "dnn", "--scales", "1", "--seeds", "0"]) == 2
    assert "--seeds: the number of seeds must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "s" / "runs").exists() or not any((tmp_path / "s" / "runs").iterdir())
