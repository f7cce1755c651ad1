"""The paper's toy experiment (Figure 4): a field trained against a 3-value field collapses; against 100, it does not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from multiembed.analysis import paper_toy
from multiembed.cli import main
from multiembed.collapse import information_abundance, singular_values


@pytest.mark.parametrize("seed", [0, 1])
def test_e1_interacting_with_a_three_value_field_loses_ia(seed: int) -> None:
    low = paper_toy.toy_ia_curve(d3=3, seed=seed, iterations=2000, every=2000)[-1]
    high = paper_toy.toy_ia_curve(d3=100, seed=seed, iterations=2000, every=2000)[-1]
    assert low.iteration == high.iteration == 2000
    assert low.ia <= high.ia - 0.75, (low.ia, high.ia)


def test_closed_form_step_equals_autograd_on_the_sample_list() -> None:
    """Three steps of the grid's closed-form gradient equal autograd's over the 10,000 gathered samples, as the
    specification states them (mean BCE of <e1,e2> + <e1,e3> + <e2,e3>, only E1 trained, lr 1)."""
    e1, partner, constant, labels = paper_toy._toy_problem(d3=3, seed=4)
    n = paper_toy.FIELD_VALUES
    x1 = torch.arange(n).repeat_interleave(n)
    table = e1.clone().requires_grad_()
    for _ in range(3):
        logits = (table[x1] * partner.reshape(n * n, -1)).sum(-1) + constant.reshape(-1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.reshape(-1))
        (grad,) = torch.autograd.grad(loss, table)
        table = (table - grad).detach().requires_grad_()
    curve = paper_toy.toy_ia_curve(d3=3, seed=4, iterations=3, every=3)
    assert curve[-1].ia == pytest.approx(information_abundance(singular_values(table.detach())), abs=1e-9)
    assert curve[-1].loss == pytest.approx(
        float(torch.nn.functional.binary_cross_entropy_with_logits(
            (table.detach()[x1] * partner.reshape(n * n, -1)).sum(-1) + constant.reshape(-1), labels.reshape(-1))),
        abs=1e-9)


def test_problem_is_the_specified_one() -> None:
    e1, partner, constant, labels = paper_toy._toy_problem(d3=3, seed=0)
    assert e1.shape == (100, 10) and partner.shape == (100, 100, 10) and constant.shape == (100, 100)
    assert set(labels.unique().tolist()) == {0.0, 1.0} and 0.45 < float(labels.mean()) < 0.55
    # x3 takes 3 values: the e3 part of every partner lies in a 3-dimensional span.
    e3_part = (partner - partner[:1, :, :]).reshape(-1, 10)
    assert int(torch.linalg.matrix_rank(e3_part)) <= 3


def test_report_round_trips_and_draws_what_it_wrote(tmp_path: Path) -> None:
    points = paper_toy.run_toy([0], iterations=40, every=20)
    record = paper_toy.write_toy_report(points, tmp_path, check_iteration=20)
    assert paper_toy.read_points_csv(tmp_path / "toy.csv") == [
        paper_toy.ToyPoint(p.seed, p.d3, p.iteration, round(p.ia, 6), round(p.loss, 6)) for p in points
    ]
    on_disk = json.loads((tmp_path / "toy.json").read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert on_disk["at_end"]["iteration"] == 40 and set(on_disk["at_check"]["ia"]) == {"d3=3", "d3=100"}
    drawn = paper_toy.plot_toy(points, tmp_path / "again.png")
    assert drawn["d3=3"]["iterations"] == [0, 20, 40]
    assert drawn["d3=100"]["mean"] == [p.ia for p in points if p.d3 == 100]
    assert (tmp_path / "toy.png").stat().st_size > 0


def test_bad_csv_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "toy.csv"
    path.write_text("seed,d3,iteration,ia,loss\n0,3,0,8.1,0.7\n0,3,x,8.0,0.7\n")
    with pytest.raises(ValueError, match=r"toy.csv: line 3"):
        paper_toy.read_points_csv(path)


def test_cli_writes_the_figure_and_refuses_an_unrecorded_check(tmp_path: Path, capsys) -> None:
    assert main(["paper", "fig4", "--out", str(tmp_path), "--seeds", "1", "--iterations", "20", "--every", "10",
                 "--check-iteration", "10"]) == 0
    assert {p.name for p in tmp_path.iterdir()} == {"toy.csv", "toy.json", "toy.png"}
    assert "iteration 10: IA(E1) with D3=3 mean" in capsys.readouterr().out
    assert main(["paper", "fig4", "--out", str(tmp_path / "b"), "--iterations", "20", "--every", "10",
                 "--check-iteration", "15"]) == 2
    assert "--check-iteration 15: must be a recorded iteration" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
