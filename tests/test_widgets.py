"""Widget callbacks in plain pytest: set a control's value, and the figures hold what eelab.metrics computes
for that value; a move fits nothing and decides nothing; training grows the curves epoch by epoch; export
writes files."""
from __future__ import annotations

import hashlib
import json
from datetime import datetime
from functools import partial

import ipywidgets
import pandas as pd
import pytest
import torch
from conftest import tiny_config
from matplotlib.figure import Figure

from eelab import plots, testing, widgets, workbench
from eelab.errors import EelabError, EelabWarning
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
    compare.cost.value = "rel_ms"  # whatever the toggle shows, both cost axes are exported
    figures = compare.paper_figures()
    assert set(figures) == {"frontiers", "frontiers_latency"} and "area_latency" in compare.paper_tables()["areas"]
    assert "MACs" in figures["frontiers"].axes[0].get_xlabel()
    assert "latency" in figures["frontiers_latency"].axes[0].get_xlabel()


def test_export_button_writes_figures_and_tables(grids, tmp_path):
    panel = widgets.PolicySliderPanel(grids["threshold"])
    control = widgets.ExportControl(panel, {"table": grids["static"].table}, folder=tmp_path / "figures", prefix="t_")
    control.button.click()
    names = sorted(p.name for p in (tmp_path / "figures").iterdir())
    assert "t_frontier.pdf" in names and "t_exit_distribution.svg" in names and "t_table.tex" in names
    assert "t_operating_points.csv" in names and "t_manifest.json" in names
    assert "wrote 11 files" in control.output.value and len(names) == 11  # 3 + 3 + 2 + 2, and the manifest


def export_set_of_04(pair, latency, grids, folder):
    """Notebook 04's export: the compare and risk panels, and its figures and tables (operating_points too)."""
    cal, test = pair
    risk_grid = precompute_grid("risk", cal, test, {"epsilon": [0.05, 0.1, 0.2], "delta": [0.1, 0.2]})
    compare = widgets.ComparePoliciesPanel(grids)
    risk = widgets.RiskControlPanel(risk_grid, static=grids["static"])
    figure = plots.plot_exit_distribution({"threshold": [0.5, 0.2, 0.2, 0.1]})
    table = pd.DataFrame({"policy": ["threshold"], "accuracy": [0.5]})
    return widgets.ExportControl(compare, risk, {"class_accuracy": figure, "operating_points": table,
                                                 "summary": table}, folder=folder, prefix="04_",
                                 records=[cal, test]), risk


def test_04_export_writes_each_file_once_and_counts_what_is_on_disk(pair, latency, grids, tmp_path):
    control, risk = export_set_of_04(pair, latency, grids, tmp_path / "figures")
    risk.sliders["risk"]["epsilon"].value = 0.1
    control.button.click()  # the button and export() are one path
    on_disk = sorted(p.name for p in (tmp_path / "figures").iterdir())
    reported = control.output.value.split(": ", 1)[1].split(", ")
    assert control.output.value.startswith(f"wrote {len(on_disk)} files: ")
    assert sorted(reported) == on_disk and len(set(reported)) == len(reported)  # no file written twice
    manifest = json.loads((tmp_path / "figures" / "04_manifest.json").read_text())
    listed = [f["name"] for f in manifest["files"]]
    assert sorted(listed + ["04_manifest.json"]) == on_disk
    for f in manifest["files"]:
        assert f["sha256"] == hashlib.sha256((tmp_path / "figures" / f["name"]).read_bytes()).hexdigest()
    # the two operating_points tables kept apart by source; both cost axes; the risk figure and table
    for name in ("04_operating_points.csv", "04_risk_operating_points.csv", "04_frontiers.pdf",
                 "04_frontiers_latency.pdf", "04_risk.png", "04_risk.csv", "04_areas.tex"):
        assert name in on_disk, " ".join(on_disk)
    again = control.export()  # a second export rewrites the same files, never more
    assert sorted(p.name for p in again) == on_disk == sorted(p.name for p in (tmp_path / "figures").iterdir())


def test_export_manifest_traces_records_and_policies(pair, latency, grids, tmp_path):
    control, risk = export_set_of_04(pair, latency, grids, tmp_path / "out")
    risk.sliders["risk"]["epsilon"].value = 0.2
    risk.sliders["risk"]["delta"].value = 0.1
    written = control.export()
    manifest = json.loads(written[-1].read_text())
    assert written[-1].name == "04_manifest.json" and manifest["checkpoint_sha256"] == "cd" * 32
    assert manifest["eelab_version"] and datetime.fromisoformat(manifest["date"]).utcoffset().total_seconds() == 0
    assert manifest["git_commit"] is None or len(manifest["git_commit"]) == 40
    splits = sorted((r["n"], r["cost_unit"]) for r in manifest["records"])
    assert splits == [(300, "MACs"), (300, "MACs"), (300, "ms")]  # cal, test and test priced in ms, once each
    chosen = next(p for p in manifest["policies"] if p["source"] == "risk")
    assert chosen["selected"]["params"]["epsilon"] == 0.2 and chosen["selected"]["params"]["delta"] == 0.1
    assert chosen["parameters"]["epsilon"] == [0.05, 0.1, 0.2] and "lambda" in chosen["selected"]["fitted"]
    compared = {p["grid"] for p in manifest["policies"] if p["source"] == "compare"}
    assert compared == set(grids)


def test_export_refuses_a_clash_before_writing_anything(grids, tmp_path):
    table = grids["static"].table
    control = widgets.ExportControl({"summary": table}, {"summary": table}, folder=tmp_path / "f")
    with pytest.raises(EelabError, match="nothing written.*summary"):
        control.export()
    control.button.click()
    assert "export failed" in control.output.value and not (tmp_path / "f").exists()


def test_manifest_says_per_file_which_policies_and_constants_made_it(pair, grids, tmp_path):
    """02's sensitivity comes from every seed's grid, 04's matched table from each grid's matched point, 01's
    examples from one fitted policy: each file's manifest entry names them and the notebook constants."""
    cal, test = pair
    seeds = [precompute_grid("threshold", cal, test, max_points=n, name="threshold") for n in (5, 7, 9)]
    target = workbench.target_accuracy(cal, 0.2)
    fitted = make_policy("threshold", threshold=0.9).fit(cal)
    panel = widgets.PolicySliderPanel(grids["threshold"])
    figure = plots.plot_exit_distribution({"threshold": [0.5, 0.2, 0.2, 0.1]})
    made_with = {"sensitivity": workbench.made_with(seeds, SEEDS=[0, 1, 2], ALPHAS=[0.0, 0.5]),
                 "matched": workbench.made_with(grids, accuracy=target, TOLERANCE=0.2),
                 "examples": workbench.made_with(fitted, EXAMPLE_POLICY={"threshold": 0.9}),
                 "sliders": workbench.made_with(THRESHOLD_POINTS=15)}
    control = widgets.ExportControl(panel, {"sensitivity": seeds[0].table, "matched": grids["static"].table,
                                            "examples": figure, "plain": grids["static"].table},
                                    folder=tmp_path, prefix="m_", records=[cal, test], made_with=made_with)
    manifest = json.loads(control.export()[-1].read_text())
    entries = {f["name"]: f["made_with"] for f in manifest["files"]}
    assert set(entries) == {f["name"] for f in manifest["files"]}  # every file says what made it
    sensitivity = entries["m_sensitivity.csv"]
    assert sensitivity["constants"] == {"SEEDS": [0, 1, 2], "ALPHAS": [0.0, 0.5]}
    assert [p["points"] for p in sensitivity["policies"]] == [5, 7, 9]  # every seed's grid, not seed 0's alone
    assert entries["m_sensitivity.tex"] == sensitivity
    matched = entries["m_matched.csv"]
    assert matched["matched_at"] == {"accuracy": pytest.approx(target)} and matched["constants"] == {"TOLERANCE": 0.2}
    for entry in matched["policies"]:
        row = workbench.matched_point(grids[entry["grid"]], accuracy=target)
        assert (entry["selected"] or {}).get("row") == row
        if row is not None:
            policy = grids[entry["grid"]].policies[row]
            assert entry["selected"]["params"] == json.loads(json.dumps(dict(policy.params)))
    assert entries["m_examples.pdf"]["policies"] == [{"source": "examples", "family": "threshold",
                                                       "params": {**fitted.params, "threshold": 0.9},
                                                       "fitted": json.loads(json.dumps(fitted.summary()))}]
    assert entries["m_plain.csv"] == {"policies": [], "constants": {}}
    # a panel's files: the policy it shows (its selected point), and what made_with adds under its label
    frontier = entries["m_frontier.pdf"]
    assert frontier["constants"] == {"THRESHOLD_POINTS": 15}
    assert [(p["source"], p["selected"]["row"]) for p in frontier["policies"]] == [("sliders", panel.selected())]
    # the manifest's policy list holds them all, each saying where it is used
    sources = [p["source"] for p in manifest["policies"]]
    assert sources.count("sensitivity") == 3 and sources.count("matched") == len(grids) and "examples" in sources


def test_made_with_refuses_names_the_export_does_not_write(grids, tmp_path):
    control = widgets.ExportControl({"summary": grids["static"].table}, folder=tmp_path / "f",
                                    made_with={"sumary": workbench.made_with(SEEDS=[0])})
    with pytest.raises(EelabError, match="nothing written.*sumary.*summary"):
        control.export()
    assert not (tmp_path / "f").exists()
    with pytest.raises(EelabError, match="grids, fitted policies"):
        workbench.made_with("threshold")


@pytest.mark.parametrize("size,width", [("column", 3.3), ("page", 6.9)])
def test_export_draws_every_figure_at_the_chosen_size(grids, pair, tmp_path, size, width):
    risk = widgets.RiskControlPanel(precompute_grid("risk", *pair, {"epsilon": [0.05, 0.1], "delta": [0.1]}))
    compare = widgets.ComparePoliciesPanel({name: grids[name] for name in ("threshold", "patience")})
    drawn = plots.plot_training([{"epoch": e, "train_loss": 1 / e, "cal_acc": [0.5, 0.6 + e / 100]}
                                 for e in (1, 2, 3)])  # a page-wide figure by default
    control = widgets.ExportControl(risk, compare, {"training": drawn}, folder=tmp_path, size=size)
    assert control.size.value == size
    manifest = json.loads(control.export()[-1].read_text())
    widths = {f["name"]: f["size_inches"][0] for f in manifest["files"] if f["name"].endswith(".pdf")}
    assert set(widths) == {"frontier.pdf", "exit_distribution.pdf", "risk.pdf", "frontiers.pdf",
                           "frontiers_latency.pdf", "training.pdf"}
    assert set(widths.values()) == {width} and manifest["size"] == size
    assert all(problems == [] for problems in manifest["figure_problems"].values()), manifest["figure_problems"]
    control.size.value = "default"  # the menu: each figure as drawn, the notebook's figure untouched
    manifest = json.loads(control.export()[-1].read_text())
    sizes = {f["name"]: f["size_inches"][0] for f in manifest["files"] if f["name"].endswith(".pdf")}
    assert sizes["training.pdf"] == 6.9 and sizes["frontier.pdf"] == 3.3
    assert tuple(drawn.get_size_inches()) == pytest.approx((6.9, drawn.get_size_inches()[1]))
    with pytest.raises(EelabError, match="column, page"):
        widgets.ExportControl(risk, size="poster")


def test_redraw_draws_a_figure_again_at_another_size():
    fig = plots.plot_exit_distribution({"threshold": [0.5, 0.2, 0.2, 0.1], "patience": [0.1, 0.2, 0.3, 0.4]},
                                       title="where they leave")
    page = plots.redraw(fig, "page")
    assert page is not fig and page.get_size_inches()[0] == 6.9 and fig.get_size_inches()[0] == 3.3
    labels = [t.get_text() for t in page.legends[0].get_texts()]
    assert labels == [t.get_text() for t in fig.legends[0].get_texts()] == ["threshold", "patience"]
    assert plots.redraw(page, "column").get_size_inches()[0] == 3.3 and plots.redraw(fig, "default") is fig
    other = Figure()  # a figure no plot_* drew is exported as it is
    assert plots.redraw(other, "page") is other


def test_a_faulty_figure_is_written_and_its_problems_reported(grids, tmp_path):
    import matplotlib.pyplot as plt

    faulty, ax = plt.subplots(figsize=(3.3, 2))
    ax.plot([0, 1], [0, 1], color="k", label="a")
    ax.plot([0, 1], [1, 0], color="k", label="b")  # two series alike: colour, marker and line style
    ax.text(1.4, 0.5, "far outside the canvas", transform=ax.transAxes)
    plt.close(faulty)
    control = widgets.ExportControl({"faulty": faulty, "table": grids["static"].table}, folder=tmp_path, prefix="f_")
    with pytest.warns(EelabWarning, match="f_faulty is not ready to print"):
        written = control.export()
    assert (tmp_path / "f_faulty.pdf").is_file() and len(written) == 3 + 2 + 1
    problems = json.loads((tmp_path / "f_manifest.json").read_text())["figure_problems"]["f_faulty"]
    assert problems and "check f_faulty" in control.output.value
    control.output.value = ""
    control.button.click()  # the button shows them below it (its warnings would go to no cell)
    assert "check f_faulty" in control.output.value and "wrote 6 files" in control.output.value


def test_export_moves_a_progress_bar(grids, tmp_path):
    panel = widgets.PolicySliderPanel(grids["threshold"])
    control = widgets.ExportControl(panel, {"table": grids["static"].table}, folder=tmp_path)
    assert control.progress.layout.visibility == "hidden"
    seen = []
    control.progress.observe(lambda change: seen.append(change["new"]), names="value")
    control.export(progress=False)
    # one step per source drawn, per figure or table written (3 of the panel's, 1 table), and the manifest
    assert seen == list(range(1, 2 + 4 + 2)) and control.progress.max == 2 + 4 + 1
    assert control.progress.layout.visibility == "hidden"


@pytest.mark.parametrize("kind", ["pct", "num"])
def test_plotly_tick_labels_print_their_values(kind, grids, pair):
    """Plotly steps linear ticks by 1, 2 or 5 times a power of ten and takes the first tickformatstop whose
    dtickrange holds the step; each step's format must print every tick exactly (d3 formats emulated)."""
    if kind == "pct":  # a frontier's accuracy axis
        axis = widgets.PolicySliderPanel(grids["threshold"]).frontier.layout.yaxis
    else:  # the DQN panel's reward axis
        axis = widgets.DQNTrainingPanel(*pair, cost_weights=[0.1]).reward_figure.layout.yaxis
    stops = [{"dtickrange": list(stop.dtickrange), "value": stop.value} for stop in axis.tickformatstops]

    def label(value: float, fmt: str) -> str:
        decimals = int(fmt.strip(",.%f"))
        return f"{value * 100:.{decimals}f}%" if fmt.endswith("%") else f"{value:,.{decimals}f}"

    def chosen(dtick: float) -> str:
        return next(s["value"] for s in stops if (s["dtickrange"][0] is None or s["dtickrange"][0] <= dtick)
                    and (s["dtickrange"][1] is None or dtick <= s["dtickrange"][1]))

    for power in range(-6, 2):
        for base in (1, 2, 5):
            dtick = base * 10.0 ** power
            if kind == "pct" and dtick < 1e-4 or kind == "num" and dtick < 1e-3:
                continue  # finer than the four decimals a label prints
            fmt = chosen(dtick)
            values = [round(i * dtick, 12) for i in range(-3, 12)]
            labels = [label(v, fmt) for v in values]
            assert len(set(labels)) == len(labels), (dtick, fmt, labels)
            scale = 100 if kind == "pct" else 1
            assert all(float(t.rstrip("%").replace(",", "")) == pytest.approx(v * scale, abs=1e-9)
                       for t, v in zip(labels, values)), (dtick, fmt, labels)
    if kind == "pct":  # the audit's case: ticks 0.5 % apart
        assert [label(v, chosen(0.005)) for v in (0.005, 0.01, 0.015)] == ["0.5%", "1.0%", "1.5%"]


def test_panels_percent_axes_choose_their_format_from_the_step(grids):
    panel = widgets.PolicySliderPanel(grids["threshold"], classes=True)
    assert panel.frontier.layout.yaxis.tickformatstops and panel.frontier.layout.xaxis.tickformatstops
    assert panel.exit_figure.layout.xaxis.tickformat == "d" and not panel.exit_figure.layout.xaxis.tickformatstops
    assert not panel.class_figure.layout.yaxis.tickformatstops  # class names, not numbers
    compare = widgets.ComparePoliciesPanel(grids)
    assert [s.value for s in compare.figure.layout.yaxis.tickformatstops][:2] == [".0%", ".1%"]


def test_panel_traces_take_their_family_style(grids):
    panel = widgets.PolicySliderPanel([grids["threshold"], grids["patience"]], static=grids["static"])
    for name in ("threshold", "patience"):
        style = plots.plotly_style(name)
        assert trace(panel.frontier, name).line.color == style["line"]["color"]
        assert trace(panel.frontier, name).marker.symbol == style["marker"]["symbol"]
        assert trace(panel.frontier, f"{name} (selected)").marker.color == style["marker"]["color"]
        assert trace(panel.exit_figure, name).marker.color == style["marker"]["color"]
    assert trace(panel.frontier, "oracle frontier").line.color == plots.plotly_style("oracle")["line"]["color"]
    compare = widgets.ComparePoliciesPanel(grids)
    for name in ("threshold", "patience", "budget", "risk"):
        assert trace(compare.figure, name).line.color == plots.plotly_style(name)["line"]["color"]
    assert len({trace(compare.figure, n).line.color for n in ("threshold", "patience", "budget", "risk")}) == 4
    two = widgets.PolicySliderPanel([grids["threshold"], grids["threshold"]])  # one family twice: a second look
    first, second = trace(two.frontier, "threshold"), trace(two.frontier, "threshold 1")
    assert first.line.color == second.line.color and first.line.dash != second.line.dash


def test_static_labels_stay_inside_and_labels_are_not_doubled(grids):
    panel = widgets.PolicySliderPanel([grids["threshold"], grids["risk"]], static=grids["static"])
    static = trace(panel.frontier, "static exits")
    last = max(range(len(static.x)), key=lambda i: static.x[i])
    assert static.textposition[last] == "bottom left" and static.text[last] == f"exit {len(static.x) - 1}"
    rows = [box for box in panel.children if isinstance(box, ipywidgets.HBox) and any(
        isinstance(c, ipywidgets.SelectionSlider) for c in box.children)]
    texts = [[c.value if isinstance(c, ipywidgets.Label) else c.description for c in row.children] for row in rows]
    assert texts == [["threshold"], ["risk", *grids["risk"].params]]  # "threshold" once, not "threshold  threshold"
    assert all(s.style.description_width == "initial" for g in panel.sliders.values() for s in g.values())


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
    assert [t.name for t in panel.reward_figure.data] == ["dqn cost_weight=0.1", "dqn cost_weight=0.8"]
    assert [t.line.color for t in panel.reward_figure.data] == [plots.plotly_style("dqn", i)["line"]["color"]
                                                                 for i in range(2)]
    last = grid.policies[1].info["trace"][-1]  # the bars and their title come from the same (last) report
    assert panel.exit_figure.layout.title.text == f"agent dqn cost_weight=0.8 at update {last['step']}"
    assert list(panel.exit_figure.data[0].y) == last["exit_fractions"]
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
