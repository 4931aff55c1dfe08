"""Widget callbacks in plain pytest: set a control's value, and the figures hold what eelab.metrics computes
for that value; a move fits nothing and decides nothing; training grows the curves epoch by epoch; export
writes files."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from conftest import tiny_config
from matplotlib.figure import Figure

from eelab import testing, widgets
from eelab.errors import EelabError
from eelab.metrics import evaluate, oracle_frontier, pareto_front
from eelab.policies import Policy, RiskPolicy, make_policy
from eelab.sweep import precompute_grid
from eelab.records import latency_record

random_record = partial(testing.random_record, sha="cd" * 32, meta={"class_names": list("vwxyz")})


@pytest.fixture(scope="module")
def pair():
    return random_record(seed=1), random_record(seed=2)


@pytest.fixture(scope="module")
def latency(pair):
    profile = {"stages": [{"cumulative_ms": ms} for ms in (0.2, 0.7, 0.9, 1.6)], "plain_ms": 1.5}
    return latency_record(pair[1], profile)


@pytest.fixture(scope="module")
def grids(pair, latency):
    cal, test = pair
    return {name: precompute_grid(name, cal, test, latency=latency, max_points=15)
            for name in ("static", "threshold", "patience", "budget", "risk", "oracle")}


def trace(fig, name):
    return next(t for t in fig.data if t.name == name)


def no_fitting_or_deciding(monkeypatch):
    """From here on, fitting or deciding any policy fails the test: a slider only reads caches."""
    monkeypatch.setattr(Policy, "fit", lambda *a, **k: pytest.fail("a slider move fitted a policy"))
    monkeypatch.setattr(Policy, "decide", lambda *a, **k: pytest.fail("a slider move ran a policy"))


def test_threshold_slider_shows_what_metrics_compute(pair, grids, monkeypatch):
    cal, test = pair
    panel = widgets.PolicySliderPanel(grids["threshold"], static=grids["static"], classes=True)
    slider = panel.sliders["threshold"]["threshold"]
    expected = {}
    for value in (slider.options[2][1], slider.options[9][1], slider.options[-1][1]):  # the metrics, computed apart
        expected[value] = evaluate(test, make_policy("threshold", threshold=value).fit(cal).decide(test))
    no_fitting_or_deciding(monkeypatch)
    for value, m in expected.items():
        slider.value = value
        point = trace(panel.frontier, "threshold (selected)")
        assert point.x == pytest.approx([m["rel_macs"]]) and point.y == pytest.approx([m["accuracy"]])
        assert list(trace(panel.exit_figure, "threshold").y) == pytest.approx(m["exit_fractions"])
        assert [list(row) for row in trace(panel.class_figure, "threshold").z] == m["per_class_exit_fractions"]
        assert f"{m['accuracy']:.2%}" in panel.readout.value and f"{m['compute_saved']:+.1%}" in panel.readout.value
    oracle = oracle_frontier(test)
    assert list(trace(panel.frontier, "oracle frontier").y) == oracle["accuracy"].tolist()
    assert list(trace(panel.frontier, "static exits").x) == grids["static"].table["rel_macs"].tolist()


def test_two_grids_on_one_plot_move_independently(grids):
    panel = widgets.PolicySliderPanel([grids["threshold"], grids["patience"]])
    before = trace(panel.frontier, "threshold (selected)").x
    panel.sliders["patience"]["patience"].value = 1
    assert trace(panel.frontier, "threshold (selected)").x == before
    row = grids["patience"].table.loc[grids["patience"].find(patience=1)]
    assert trace(panel.frontier, "patience (selected)").x == (row["rel_macs"],)
    assert panel.selected_policy("patience").params["patience"] == 1


def test_save_button_writes_the_selected_policy_for_eelab_predict(grids, pair, tmp_path):
    from eelab.policies import load_policy

    panel = widgets.PolicySliderPanel([grids["threshold"], grids["budget"]], save_to=tmp_path / "policies")
    value = grids["budget"].values("budget")[4]
    panel.sliders["budget"]["budget"].value = value
    panel.save_button.click()
    saved = load_policy(tmp_path / "policies" / "budget.pt")
    assert saved.params["budget"] == value and "saved" in panel.saved.value
    test = pair[1]
    assert torch.equal(saved.decide(test), grids["budget"].exits[grids["budget"].find(budget=value)])
    assert (tmp_path / "policies" / "threshold.pt").is_file()


def test_initial_state_is_the_family_default_and_latency_axis_works(grids):
    panel = widgets.PolicySliderPanel(grids["threshold"], x="rel_ms")
    assert panel.sliders["threshold"]["threshold"].value == min(grids["threshold"].values("threshold"),
                                                                key=lambda v: abs(v - 0.9))
    row = grids["threshold"].table.loc[panel.selected()]
    assert trace(panel.frontier, "threshold (selected)").x == (row["rel_ms"],)


def test_risk_sliders_show_the_guarantee_and_the_realised_test_risk(pair, monkeypatch):
    cal, test = pair
    grid = precompute_grid("risk", cal, test, {"epsilon": [0.02, 0.05, 0.1, 0.2], "delta": [0.05, 0.2]})
    panel = widgets.RiskControlPanel(grid)
    fresh = RiskPolicy(epsilon=0.1, delta=0.2).fit(cal)  # computed apart, before the sliders move
    m = evaluate(test, fresh.decide(test))
    correct = test.logits.argmax(-1) == test.labels.unsqueeze(1)
    exits = fresh.decide(test)
    risk = float((correct[:, -1] & ~correct[torch.arange(test.n), exits]).double().mean())
    no_fitting_or_deciding(monkeypatch)
    panel.sliders["risk"]["epsilon"].value = 0.1
    panel.sliders["risk"]["delta"].value = 0.2
    assert trace(panel.frontier, "risk (selected)").y == pytest.approx([m["accuracy"]])
    assert trace(panel.risk_figure, "selected").y == pytest.approx([risk])
    assert list(trace(panel.risk_figure, "test risk").x) == [0.02, 0.05, 0.1, 0.2]  # this delta's line
    assert fresh.guarantee().replace(">", "&gt;").replace("<", "&lt;") in panel.guarantee.value
    assert f"{risk:.2%}" in panel.guarantee.value


def test_cost_toggle_switches_every_trace_to_measured_latency(grids, latency, monkeypatch):
    panel = widgets.ComparePoliciesPanel(grids)
    macs = trace(panel.figure, "threshold").x
    assert list(macs) == pareto_front(grids["threshold"].table)["rel_macs"].tolist()
    no_fitting_or_deciding(monkeypatch)
    panel.cost.value = "rel_ms"
    front = pareto_front(grids["threshold"].table, x="rel_ms")
    assert list(trace(panel.figure, "threshold").x) == front["rel_ms"].tolist()
    assert list(trace(panel.figure, "oracle frontier").x) == oracle_frontier(latency)["rel_macs"].tolist()  # in ms
    exits = grids["budget"].exits[3]
    assert trace(panel.figure, "budget (all points)").x[3] == pytest.approx(evaluate(latency, exits)["rel_macs"])
    assert "latency" in panel.figure.layout.xaxis.title.text
    panel.cost.value = "rel_macs"
    assert trace(panel.figure, "threshold").x == macs


def test_paper_figures_follow_the_panel_state(grids):
    panel = widgets.PolicySliderPanel(grids["budget"], static=grids["static"])
    panel.sliders["budget"]["budget"].value = grids["budget"].values("budget")[2]
    figures = panel.paper_figures()
    assert set(figures) == {"frontier", "exit_distribution"} and all(isinstance(f, Figure) for f in figures.values())
    table = panel.paper_tables()["operating_points"]
    assert table.loc[0, "budget"] == grids["budget"].values("budget")[2]
    compare = widgets.ComparePoliciesPanel(grids)
    assert set(compare.paper_figures()) == {"frontiers"} and "area_latency" in compare.paper_tables()["areas"]


def test_export_button_writes_figures_and_tables(grids, tmp_path):
    panel = widgets.PolicySliderPanel(grids["threshold"])
    control = widgets.ExportControl(panel, {"table": grids["static"].table}, folder=tmp_path / "figures", prefix="t_")
    control.button.click()
    names = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert "t_frontier.pdf" in names and "t_exit_distribution.svg" in names and "t_table.tex" in names
    assert "t_operating_points.csv" in names and "wrote 10 files" in control.output.value


def test_training_panel_grows_curves_each_epoch_then_records(tiny_folder, tiny_checkpoint, tmp_path):
    panel = widgets.TrainingPanel(tiny_checkpoint, runs=tmp_path / "runs", config=tiny_config(tiny_folder))
    assert len(panel.curves.data) == 2 and len(panel.curves.data[0].x) == 2  # the checkpoint's history first
    panel.epochs.value = 3
    panel.name.value = "mine"
    seen = []
    panel.progress.observe(lambda change: seen.append([len(t.x) for t in panel.curves.data]), names="value")
    panel.button.click()
    out = tmp_path / "runs" / "mine"
    assert panel.checkpoint == out and "done" in panel.status.value
    assert all((out / name).is_file() for name in ("model.pt", "history.json", "cal.pt", "test.pt"))
    assert seen[:3] == [[1, 1], [2, 2], [3, 3]]  # one more point on each exit's curve per epoch
    assert panel.progress.value == panel.progress.max == 5
    from eelab.training import read_history
    history = read_history(out)
    assert list(panel.curves.data[1].y) == [row["cal_acc"][1] for row in history]
    panel.button.click()  # the same name again: refused in the status line, not raised into the void
    assert "already holds a training run" in panel.status.value and not panel.button.disabled


def test_training_panel_without_a_checkpoint_starts_empty(tmp_path):
    panel = widgets.TrainingPanel(tmp_path / "nothing", runs=tmp_path / "runs")
    assert panel.curves.data == () and "no checkpoint to show yet" in panel.status.value
    panel.name.value = "../escape"
    panel.button.click()
    assert "plain folder name" in panel.status.value


def test_dqn_panel_draws_training_live_then_finds_the_agents_again(pair, tmp_path, monkeypatch):
    cal, test = pair
    panel = widgets.DQNTrainingPanel(cal, test, cost_weights=[0.1, 0.8], params={"steps": 60}, cache=tmp_path,
                                     every=20)
    shown = []  # what the exit figure showed at each report, while training ran
    panel.exit_figure.data[0].on_change(lambda bars, y: shown.append(list(y)), "y")
    grid = panel.train()
    assert [t.name for t in panel.reward_figure.data] == ["lambda=0.1", "lambda=0.8"]
    for trace, policy in zip(panel.reward_figure.data, grid.policies):
        rows = policy.info["trace"]
        assert list(trace.x) == [20, 40, 60] and list(trace.y) == [r["greedy_reward"] for r in rows]
    assert len(shown) == 6 and shown[-1] == grid.policies[1].info["trace"][-1]["exit_fractions"]
    # the grid holds the agents scored on test, as metrics.evaluate scores them
    for i, policy in enumerate(grid.policies):
        m = evaluate(test, policy.decide(test), overhead=policy.overhead_macs(test.k, test.c))
        assert grid.table.loc[i, "accuracy"] == m["accuracy"] and grid.table.loc[i, "rel_macs"] == m["rel_macs"]
    assert grid.params == ["cost_weight"] and panel.progress.value == 2
    # a second panel on the same cache trains nothing and draws the stored curves; 04's grid finds them too
    monkeypatch.setattr("eelab.policies.dqn.train_dqn", lambda *a, **k: pytest.fail("an agent was retrained"))
    again = widgets.DQNTrainingPanel(cal, test, cost_weights=[0.1, 0.8], params={"steps": 60}, cache=tmp_path)
    assert again.train().table["accuracy"].tolist() == grid.table["accuracy"].tolist()
    assert [list(t.y) for t in again.reward_figure.data] == [list(t.y) for t in panel.reward_figure.data]
    found = precompute_grid("dqn", cal, test, [{"cost_weight": 0.1, "steps": 60}], cache=tmp_path)
    assert found.table.loc[0, "accuracy"] == grid.table.loc[0, "accuracy"]
    assert set(panel.paper_figures()) == {"dqn_training"}
    with pytest.raises(EelabError, match="hidden"):
        widgets.DQNTrainingPanel(cal, test, params={"hidden": 0})
