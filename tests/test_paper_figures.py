"""Paper-grade figures and tables (#13): every figure the notebooks export, drawn from the committed reference
records at one-column and two-column size, prints as it is (no text off the canvas, no two series alike, tick
labels that print their values, legends off the data, TrueType fonts in the PDF, text kept in the SVG); every
table the notebooks export prints as LaTeX a paper can use."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest
import torch
from matplotlib.ticker import MultipleLocator, PercentFormatter

from eelab import figcheck, plots, tables, workbench
from eelab.checkpoint import read_history
from eelab.records import latency_record, load_records
from eelab.sweep import precompute_grid
from eelab.workbench import Examples

CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "ee_cnn-cifar10-jpeg"
CHEAP = ["threshold", "patience", "budget", "static"]
# a batch-1 profile of the reference network's shape (ms and activation bytes per stage), as profile_checkpoint gives
PROFILE = {"batch": 1, "threads": 1, "plain_ms": 2.1,
           "stages": [{"exit": k, "cumulative_ms": ms, "activation_bytes": b}
                      for k, (ms, b) in enumerate([(0.42, 65536), (0.97, 32768), (1.55, 16384), (2.13, 8192)])]}


def reference_data() -> dict:
    """Reference records (a seeded 1000-sample subset), cheap families' grids and the notebooks' tables."""
    cal, test = load_records(CHECKPOINT, limit=1000)
    latency = latency_record(test, PROFILE)
    grids = {name: precompute_grid(name, cal, test, latency=latency, max_points=10) for name in CHEAP}
    risk = precompute_grid("risk", cal, test, {"epsilon": [0.01, 0.02, 0.05, 0.075, 0.1, 0.2, 0.3],
                                               "delta": [0.05, 0.1, 0.2]})
    return {"cal": cal, "test": test, "grids": grids, "risk": risk}


@pytest.fixture(scope="module")
def data():
    return reference_data()


def _fronts(grids, x):
    """The compare panel's frontiers: the cheap families' fronts, plus learned families' members (alpha seeds,
    dqn cost_weights) as literal shifted copies of threshold's front (training them takes minutes)."""
    fronts = {name: g.front(x=x) for name, g in grids.items() if name != "static"}
    base = fronts["threshold"]
    for i, shift in enumerate([0.004, -0.006]):
        fronts[f"alpha {i + 1}" if i else "alpha"] = base.assign(accuracy=base["accuracy"] - shift)
        fronts[f"dqn cost_weight={0.1 * (i + 1):g}"] = base.assign(accuracy=base["accuracy"] - 2 * shift,
                                                             **{x: base[x] * (1.02 + 0.02 * i)})
    return fronts


DQN_TRACES = {f"dqn cost_weight={w:g}": [{"step": s, "greedy_reward": 0.6 + 0.2 * w - 0.3 / (1 + s / 100)
                                           + 0.01 * (s % 3),
                                           "exit_fractions": [0.2 + 0.3 * w, 0.3, 0.3 - 0.2 * w, 0.2 - 0.1 * w]}
                                          for s in range(25, 1001, 25)] for w in (0.05, 0.1, 0.3, 0.6)}
ALPHA_SENSITIVITY = pd.DataFrame({"alpha": [0.0, 0.001, 0.01, 0.05, 0.1, 0.5], "n_seeds": [3] * 6,
                                  "accuracy": [0.905, 0.903, 0.898, 0.874, 0.85, 0.78],
                                  "accuracy_std": [0.002, 0.003, 0.004, 0.01, 0.012, 0.02],
                                  "compute_saved": [-0.002, 0.08, 0.21, 0.38, 0.47, 0.61],
                                  "compute_saved_std": [0.0, 0.01, 0.02, 0.03, 0.02, 0.01],
                                  "cal_accuracy": [0.9, 0.899, 0.894, 0.87, 0.851, 0.776]})


def _figure(name: str, size: str, d) -> plt.Figure:
    cal, test, grids = d["cal"], d["test"], d["grids"]
    if name == "exit_profile":
        return plots.plot_exit_profile(workbench.exit_table(cal, test), published=workbench.PUBLISHED[
            "early-exit-cnn"]["exit_accuracy"], published_label="published (CIFAR-10)", size=size)
    if name == "exit_profile_strong":  # the strong reference's crosses: airbench94's one (last) exit
        return plots.plot_exit_profile(workbench.exit_table(cal, test), published=workbench.PUBLISHED[
            "airbench94"]["exit_accuracy"], published_label="airbench94 (theirs, CIFAR-10)", size=size)
    if name == "references":
        table = workbench.reference_table({n: CHECKPOINT.parent / f for n, f in workbench.REFERENCES.items()},
                                          limit=1000)
        air = workbench.PUBLISHED["airbench94"]
        return plots.plot_reference_exits(table, published={"airbench94 (theirs, CIFAR-10)": (air["macs"],
                                                                                           air["accuracy"])},
                                          size=size)
    if name == "training":
        return plots.plot_training(read_history(CHECKPOINT), size=size)
    if name == "examples":
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 255, (16, 3, 32, 32), dtype=torch.uint8, generator=gen)
        labels = test.labels[:16].tolist()
        preds = test.logits[:16, 0].argmax(-1).tolist()
        return plots.plot_examples(Examples(images=images, labels=labels, predictions=preds,
                                            exits=[i % 4 for i in range(16)], class_names=test.class_names), size=size)
    if name == "examples_missing":
        return plots.plot_examples(Examples(images=None, labels=[0], predictions=[0], exits=[0], class_names=["a"],
                                            message="dataset cifar10-jpeg not found in $EELAB_DATASETS, data/ or "
                                                    "../shared/datasets/; put cifar10-jpeg.tar.gz in data/"), size=size)
    if name in ("frontiers", "frontiers_latency"):
        x = "rel_macs" if name == "frontiers" else "rel_ms"
        selected = {n: {x: float(f[x].iloc[len(f) // 2]), "accuracy": float(f["accuracy"].iloc[len(f) // 2])}
                    for n, f in _fronts(grids, x).items()}
        return plots.plot_frontiers(_fronts(grids, x), oracle=workbench.oracle_points(grids["threshold"], x),
                                    static=grids["static"].table, selected=selected, x=x, size=size)
    if name == "exit_distribution":
        return plots.plot_exit_distribution({n: g.points[len(g) // 2]["exit_fractions"] for n, g in grids.items()},
                                            size=size)
    if name == "sensitivity":
        return plots.plot_sensitivity(ALPHA_SENSITIVITY, "alpha", size=size)
    if name == "sensitivity_threshold":
        return plots.plot_sensitivity(workbench.sensitivity_table(grids["threshold"], "threshold"), "threshold",
                                      size=size)
    if name == "class_accuracy":
        points = workbench.matched_points(grids, accuracy=workbench.target_accuracy(cal, 0.01))
        return plots.plot_class_heatmap(workbench.class_table(points), title="per-class test accuracy", size=size)
    if name == "class_exits":
        point = grids["threshold"].points[5]
        return plots.plot_class_heatmap(workbench.class_exits(point), title="where each class exits: threshold",
                                        size=size)
    if name == "dqn_training":
        return plots.plot_dqn_training(DQN_TRACES, title="DQN training on cal", size=size)
    if name == "risk":
        return plots.plot_risk(workbench.risk_table(d["risk"]), size=size)
    if name == "split":
        g = grids["threshold"]
        return plots.plot_split(workbench.split_table(PROFILE, test, g.exits[5]),
                                title=f"edge/cloud split: {g.table.at[5, 'label']}", size=size)
    if name == "confidence":
        return plots.plot_confidence(workbench.exit_confidences(test), size=size)
    if name == "reliability":
        return plots.plot_reliability(workbench.reliability_bins(test, 15), size=size)
    raise KeyError(name)


FIGURES = ["exit_profile", "exit_profile_strong", "references", "training", "examples", "examples_missing", "frontiers", "frontiers_latency",
           "exit_distribution", "sensitivity", "sensitivity_threshold", "class_accuracy", "class_exits",
           "dqn_training", "risk", "split", "confidence", "reliability"]


@pytest.mark.parametrize("size", ["column", "page"])
@pytest.mark.parametrize("name", FIGURES)
def test_every_notebook_figure_prints_as_it_is(name, size, data, tmp_path):
    fig = _figure(name, size, data)
    assert fig.get_size_inches()[0] == pytest.approx(plots.SIZES[size])
    assert figcheck.figure_problems(fig) == []
    # the checker's findings, checked here by hand too: texts inside the canvas, at least 7 pt
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        box = ax.get_tightbbox(renderer)  # every drawn tick label, axis label, title and annotation of ax
        assert box.x0 >= -1 and box.y0 >= -1 and box.x1 <= fig.bbox.x1 + 1 and box.y1 <= fig.bbox.y1 + 1, name
    for legend in fig.legends:
        box = legend.get_window_extent(renderer)
        assert box.x0 >= -1 and box.x1 <= fig.bbox.x1 + 1 and box.y0 >= -1, name
        assert all(t.get_fontsize() >= 7 for t in legend.get_texts())
    pdf, svg, png = plots.export_figure(fig, name, tmp_path)
    assert "Type3" not in figcheck.pdf_font_types(pdf) and figcheck.pdf_font_types(pdf)
    if shutil.which("pdffonts"):
        listing = subprocess.run(["pdffonts", str(pdf)], capture_output=True, text=True, check=True).stdout
        assert "Type 3" not in listing and "TrueType" in listing, listing
    assert b"<text" in svg.read_bytes() and png.stat().st_size > 1000


def test_families_keep_their_look_and_members_differ(data):
    fig = _figure("frontiers", "column", data)
    lines = {line.get_label(): line for line in fig.axes[0].lines if not line.get_label().startswith("_")}
    for name in ("threshold", "patience", "budget", "alpha", "dqn cost_weight=0.1"):
        assert lines[name].get_color() == plots.policy_style(name)["color"]
    assert lines["alpha 2"].get_color() == lines["alpha"].get_color()
    assert (lines["alpha 2"].get_marker(), lines["alpha 2"].get_linestyle()) != \
           (lines["alpha"].get_marker(), lines["alpha"].get_linestyle())
    colors = {plots.FAMILY_STYLES[f]["color"] for f in plots.FAMILY_STYLES}
    assert len(colors) == len(plots.FAMILY_STYLES)  # one colour per family
    looks = {(s["marker"], str(s["linestyle"])) for s in (plots.policy_style("risk", i) for i in range(8))}
    assert len(looks) == 8  # members of one family never repeat within 8
    assert plots.plotly_style("dqn", 1)["marker"]["color"] == plots.FAMILY_STYLES["dqn"]["color"]


def test_risk_lines_that_coincide_are_one_entry_that_says_so():
    table = pd.DataFrame({"epsilon": [0.05, 0.1] * 3, "delta": [0.05, 0.05, 0.1, 0.1, 0.2, 0.2],
                          "test_risk": [0.03, 0.08, 0.03, 0.08, 0.04, 0.09]})
    fig = plots.plot_risk(table)
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels[0] == "test risk, delta=0.05, 0.1 (identical)" and labels[1] == "test risk, delta=0.2"
    assert figcheck.figure_problems(fig) == []


# ---- the checker finds what the figures before #13 had ------------------------------------------------
def _bare(width=3.3, height=2.5, layout="constrained"):
    fig, ax = plt.subplots(figsize=(width, height), layout=layout)
    plt.close(fig)
    return fig, ax


def test_checker_finds_rounded_percent_ticks():
    fig, ax = _bare()
    ax.plot([0.7, 0.8], [0.7, 0.9])
    ax.yaxis.set_major_locator(MultipleLocator(0.025))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))  # what the figures did: 72.5% printed 72%
    problems = figcheck.figure_problems(fig)
    assert any("does not print its value 0.725" in p for p in problems), problems
    assert any("repeat" in p for p in problems) or any("'72%'" in p or "'73%'" in p for p in problems)


def test_checker_finds_cut_text_alike_series_and_covering_legends():
    fig, ax = _bare()
    ax.plot([0, 1], [0, 1], "-o", color="C1", label="patience")
    ax.plot([0, 1], [1, 0], "-o", color="C1", label="risk")
    ax.set_ylabel("cal accuracy (watched, never selected on) " * 2)
    ax.legend(loc="center")
    problems = figcheck.figure_problems(fig)
    assert any("outside the canvas" in p and "cal accuracy" in p for p in problems), problems
    assert any("'patience' and 'risk' look the same" in p for p in problems), problems
    assert any("legend covers data" in p for p in problems), problems
    fig, ax = _bare(layout=None)  # no layout engine to make room: as a label at the canvas' edge is cut
    ax.bar([0, 1], [0.9, 0.9], label="accuracy")
    ax.annotate("exit 3", (1.3, 0.5), xytext=(60, 0), textcoords="offset points", annotation_clip=False)
    ax.legend(loc="upper left")
    problems = figcheck.figure_problems(fig)
    assert any("'exit 3' lies outside the canvas (right)" in p for p in problems), problems
    assert any("legend covers data" in p for p in problems), problems


def test_checker_finds_panels_running_into_each_other():
    fig, (a, b) = plt.subplots(1, 2, figsize=(2.5, 1.5))
    plt.close(fig)
    a.set_title("the first panel's long title")
    b.set_title("and the second one's")
    problems = figcheck.figure_problems(fig)
    assert any("of neighbouring axes overlap" in p for p in problems), problems


def test_checker_reads_slanted_tick_labels_as_they_are_drawn():
    """Slanted labels are judged by their own turned rectangles, not their wider upright extents: shingled
    labels that do not touch pass (the per-class heatmap at one-column width, six policies), and labels drawn
    over each other are found, slanted or upright."""
    table = pd.DataFrame([[0.9] * 6] * 10, columns=["static", "threshold", "patience", "budget", "risk", "oracle"],
                         index=[f"class {i}" for i in range(10)])
    heatmap = plots.plot_class_heatmap(table, size="column")
    assert any(t.get_rotation() for t in heatmap.axes[0].get_xticklabels())  # the case in point: slanted
    assert figcheck.figure_problems(heatmap) == []
    for rotation in (0, 10):  # at 10 degrees the long labels lie over each other
        fig, ax = plt.subplots(figsize=(2.5, 2.5), layout="constrained")
        ax.bar(range(6), [1] * 6)
        ax.set_xticks(range(6), [f"a very long label {i}" for i in range(6)], rotation=rotation, fontsize=9)
        assert "x tick labels overlap each other" in " ".join(figcheck.figure_problems(fig)), rotation
        plt.close(fig)


def test_checker_passes_a_clean_figure_and_export_refuses_a_faulty_one(tmp_path):
    fig = plots.plot_exit_distribution({"threshold": [0.5, 0.25, 0.25], "patience": [0.1, 0.2, 0.7]})
    assert figcheck.figure_problems(fig) == []
    bad, ax = _bare()
    ax.plot([0, 1], [0, 1], color="C0", label="a")
    ax.plot([0, 1], [1, 0], color="C0", label="b")
    with pytest.raises(plots.EelabError, match=r"figure bad is not ready to print: series 'a' and 'b'"):
        plots.export_figure(bad, "bad", tmp_path)
    assert not (tmp_path / "bad.pdf").exists()
    plots.export_figure(bad, "bad", tmp_path, check=False)  # on request, written as it is


def test_pdf_font_types_sees_type3(tmp_path):
    fig, ax = _bare()
    ax.set_title("type three")
    with plt.rc_context({"pdf.fonttype": 3}):
        fig.savefig(tmp_path / "t3.pdf")
    assert "Type3" in figcheck.pdf_font_types(tmp_path / "t3.pdf")
    (pdf, *_) = plots.export_figure(fig, "t42", tmp_path)
    assert "Type3" not in figcheck.pdf_font_types(pdf)


# ---- tables ---------------------------------------------------------------------------------------------
def _tables(d):
    cal, test, grids = d["cal"], d["test"], d["grids"]
    target = workbench.target_accuracy(cal, 0.01)
    rows = [g.table.loc[len(g) // 2].rename(n) for n, g in grids.items()]
    sweep_like = dict(grids)
    return {
        "exit_table": workbench.exit_table(cal, test),
        "sensitivity": workbench.sensitivity_table(grids["threshold"], "threshold"),
        "alpha_sensitivity": ALPHA_SENSITIVITY,
        "summary": workbench.summarize_policies(sweep_like),
        "summary_seeds": workbench.summarize_policies([sweep_like, sweep_like]),
        "operating_points": workbench.operating_points(grids, accuracy=target),
        "split_table": workbench.split_table(PROFILE, test, grids["threshold"].exits[5]),
        "risk": workbench.risk_table(d["risk"]),
        "areas": workbench.frontier_areas(grids, ["rel_macs", "rel_ms"], oracle=False).rename(
            columns={"rel_macs": "area_macs", "rel_ms": "area_latency"}).rename_axis("policy").reset_index(),
        "panel_operating_points": pd.DataFrame(rows).rename_axis("grid").reset_index(),
        "sweep_with_seed": grids["threshold"].table.assign(seed=0.0, steps=200.0),
    }


_NUMBER = re.compile(r"(?<![\w.])-?\d[\d,]*(?:\.(\d+))?")


@pytest.mark.parametrize("name", ["exit_table", "sensitivity", "alpha_sensitivity", "summary", "summary_seeds",
                                  "operating_points", "split_table", "risk", "areas", "panel_operating_points",
                                  "sweep_with_seed"])
def test_every_notebook_table_prints_as_latex(name, data, tmp_path):
    table = _tables(data)[name]
    csv, tex = tables.export_table(table, name, tmp_path, caption=f"{name} of the reference checkpoint")
    pd.testing.assert_frame_equal(pd.read_csv(csv), table.reset_index(drop=True), check_dtype=False,
                                  check_exact=False, rtol=1e-12)  # full precision kept
    text = tex.read_text()
    assert text.count("\\toprule") == text.count("\\midrule") == text.count("\\bottomrule") == 1
    assert text.count("{") == text.count("}") - text.count("\\}") + text.count("\\{")  # braces balance
    body = text.split("\\midrule")[1].split("\\bottomrule")[0]
    spec = re.search(r"\\begin\{tabular\}\{([lr]+)\}", text).group(1)
    header = text.split("\\toprule")[1].split("\\midrule")[0]
    for line in [header, *body.strip().splitlines()]:
        assert line.strip().endswith("\\\\")
        assert line.count("&") - line.count("\\&") == len(spec) - 1, line  # as many cells as columns
    cells = [c.strip() for line in body.strip().splitlines() for c in line.rstrip("\\ \n").split("&")]
    for cell in cells:
        if "(" in cell or "=" in cell:  # a policy label, e.g. threshold(threshold=0.3923)
            continue
        for match in _NUMBER.finditer(cell.replace("\\textbf{", "").replace("}", "")):
            assert match.group(1) is None or len(match.group(1)) <= 3, cell  # no raw floats
    assert not re.search(r"\d\.0000|\d{7,}", body)  # no 39586304.0000, MACs in millions
    for col, unit in (("accuracy", "test accuracy (\\%)"), ("macs", "MACs (M)"), ("mean_macs", "mean MACs (M)"),
                      ("device_ms", "device time (ms)"), ("n_seeds", "seeds"), ("exit", "exit")):
        if col in table and not (col == "exit" and "label" in table):  # a label's parameter: the label says it
            assert unit in header, (col, header)


def test_table_formats_by_hand():
    table = pd.DataFrame({"policy": ["threshold", "risk_ltt & co"], "label": ["threshold(threshold=0.5)", "risk(epsilon=5%)"],
                          "threshold": [0.5, float("nan")], "seed": [0.0, 1.0], "steps": [200.0, 200.0],
                          "macs": [39586304.0, 96343040.0], "accuracy": [0.8971, 0.9], "accuracy_std": [0.0123, None],
                          "mean_ms": [1.23456, 2.0]})
    text = tables.latex_table(table, best={"accuracy": "max", "macs": "min"})
    rows = text.split("\\midrule\n")[1].split("\n\\bottomrule")[0].splitlines()
    assert rows[0] == ("threshold & threshold(threshold=0.5) & 0 & 200 & \\textbf{39.6} & 89.7 $\\pm$ 1.2 & 1.23 \\\\")
    assert rows[1] == "risk\\_ltt \\& co & risk(epsilon=5\\%) & 1 & 200 & 96.3 & \\textbf{90.0} & 2.00 \\\\"
    assert "policy & setting & seed & steps & MACs (M) & test accuracy (\\%) & mean latency (ms) \\\\" in text
    assert "\\begin{tabular}{llrrrrr}" in text  # the raw threshold column is left to the label
    with pytest.raises(plots.EelabError, match="best names column 'area'"):
        tables.latex_table(table, best={"area": "max"})


def test_a_notebook_shows_a_table_as_its_latex_prints_it():
    table = pd.DataFrame({"policy": ["threshold", "alpha"], "label": ["threshold=0.9", "alpha=0.5"],
                          "accuracy": [0.8971, 0.88], "accuracy_std": [float("nan"), 0.0123],
                          "mean_macs": [39586304.0, 5e7], "seed": [0.0, 1.0], "compute_saved": [-0.012, 0.4]})
    shown = tables.show_table(table, best={"accuracy": "max"})
    cells = shown.data
    assert list(cells.columns) == ["policy", "setting", "test accuracy (%)", "mean MACs (M)", "seed",
                                   "compute saved (%)"]
    assert cells.values.tolist() == [["threshold", "threshold=0.9", "89.7", "39.6", "0", "\u22121.2"],
                                     ["alpha", "alpha=0.5", "88.0 \u00b1 1.2", "50.0", "1", "40.0"]]
    html = shown.to_html()
    assert html.count("font-weight: bold") == 1 and "39586304" not in html
    assert table["mean_macs"].iloc[0] == 39586304.0  # the DataFrame keeps full precision
