"""Paper figures: each plot draws exactly the data it is given (no metric computed inside), and export writes
vector PDF and SVG plus PNG, and tables as CSV and LaTeX, offline and without a browser."""
from __future__ import annotations

import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from eelab import plots, tables
from eelab.workbench import Examples

FRONT = pd.DataFrame({"rel_macs": [0.6, 0.3, 0.9], "accuracy": [0.8, 0.7, 0.85]})
ORACLE = pd.DataFrame({"rel_macs": [0.3, 0.5, 1.0], "accuracy": [0.7, 0.9, 0.9]})
STATIC = pd.DataFrame({"exit": [0, 1], "rel_macs": [0.3, 1.02], "accuracy": [0.6, 0.84]})


def test_frontiers_draw_the_given_points():
    fig = plots.plot_frontiers({"threshold": FRONT}, oracle=ORACLE, static=STATIC,
                               selected={"threshold": {"rel_macs": 0.6, "accuracy": 0.8}})
    assert isinstance(fig, Figure)
    lines = {line.get_label(): line for line in fig.axes[0].lines}
    assert list(lines["threshold"].get_xdata()) == [0.3, 0.6, 0.9]  # sorted by cost, values untouched
    assert list(lines["threshold"].get_ydata()) == [0.7, 0.8, 0.85]
    assert list(lines["oracle frontier (bound)"].get_ydata()) == [0.7, 0.9, 0.9]
    assert list(lines["static exits"].get_xdata()) == [0.3, 1.02]
    assert [t.get_text() for t in fig.axes[0].texts] == ["exit 0", "exit 1"]
    assert fig.axes[0].get_xlabel() == "mean MACs / plain network's MACs"


def test_exit_distribution_and_profile_draw_the_given_numbers():
    fig = plots.plot_exit_distribution({"a": [0.5, 0.25, 0.25], "b": [0.1, 0.2, 0.7]})
    heights = sorted(round(p.get_height(), 6) for p in fig.axes[0].patches if p.get_height() > 0)
    assert heights == sorted([0.5, 0.25, 0.25, 0.1, 0.2, 0.7])
    table = pd.DataFrame({"exit": [0, 1], "rel_macs": [0.4, 1.01], "cal_accuracy": [0.6, 0.8],
                          "test_accuracy": [0.62, 0.79]})
    fig = plots.plot_exit_profile(table, published=[0.64, 0.84], published_label="theirs")
    ax, cost = fig.axes
    assert sorted(round(p.get_height(), 6) for p in ax.patches if p.get_height() > 0) == [0.6, 0.62, 0.79, 0.8]
    assert list(cost.lines[0].get_ydata()) == [0.4, 1.01]
    assert "theirs" in [t.get_text() for t in fig.legends[0].get_texts()]  # one legend, below the axes


def test_tables_and_histograms_plot():
    classes = pd.DataFrame({"exit 0": [0.5, 1.0], "exit 1": [0.5, 0.0]}, index=["cat", "dog"])
    fig = plots.plot_class_heatmap(classes, title="exits")
    assert [t.get_text() for t in fig.axes[0].texts] == ["50%", "50%", "100%", "0%"]
    bins = pd.DataFrame({"exit": [0, 0, 1], "bin": [0, 1, 0], "lo": [0, 0.5, 0], "hi": [0.5, 1, 0.5],
                         "count": [2, 3, 0], "confidence": [0.3, 0.8, float("nan")], "accuracy": [0.5, 1.0, float("nan")]})
    fig = plots.plot_reliability(bins)
    assert len(fig.axes) == 2 and [round(p.get_height(), 6) for p in fig.axes[0].patches] == [0.5, 1.0]
    conf = pd.DataFrame({"exit": [0, 0, 1, 1], "confidence": [0.2, 0.9, 0.5, 0.6], "correct": [False, True, True, True]})
    assert len(plots.plot_confidence(conf).axes) == 2
    history = [{"epoch": 1, "train_loss": 2.0, "cal_acc": [0.3, 0.4]}, {"epoch": 2, "train_loss": 1.5, "cal_acc": [0.4, 0.6]}]
    fig = plots.plot_training(history)
    assert [list(line.get_ydata()) for line in fig.axes[0].lines] == [[0.3, 0.4], [0.4, 0.6]]
    risk = pd.DataFrame({"epsilon": [0.05, 0.1, 0.05, 0.1], "delta": [0.1, 0.1, 0.2, 0.2], "test_risk": [0.03, 0.08, 0.04, 0.09]})
    assert len(plots.plot_risk(risk).axes[0].lines) == 3


def test_examples_show_images_or_say_how_to_get_them():
    images = torch.randint(0, 255, (3, 3, 8, 8), dtype=torch.uint8)
    ex = Examples(images=images, labels=[0, 1, 1], predictions=[0, 0, 1], exits=[0, 2, 1], class_names=["a", "b"])
    fig = plots.plot_examples(ex, columns=2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles[0].startswith("exit 0\na") and "(is b)" in titles[1]
    missing = Examples(images=None, labels=[0], predictions=[0], exits=[0], class_names=["a"],
                       message="dataset cifar10-jpeg not found; put the archive in data/")
    fig = plots.plot_examples(missing)
    assert "put the archive in data/" in fig.axes[0].texts[0].get_text().replace("\n", " ")


def test_export_figure_writes_pdf_svg_and_png(tmp_path):
    fig = plots.plot_exit_distribution({"a": [0.5, 0.5]})
    paths = plots.export_figure(fig, "dist", tmp_path / "figures")
    assert [p.name for p in paths] == ["dist.pdf", "dist.svg", "dist.png"]
    heads = [p.read_bytes()[:64] for p in paths]
    assert heads[0].startswith(b"%PDF") and b"<svg" in paths[1].read_bytes()[:600]
    assert heads[2].startswith(b"\x89PNG")
    assert b"fraction of test samples" in paths[1].read_bytes()  # SVG text stays text
    first = paths[1].read_bytes()
    plots.export_figure(fig, "dist", tmp_path / "figures")
    assert paths[1].read_bytes() == first  # no dates or random ids: a re-export diffs clean


def test_export_table_writes_csv_and_latex(tmp_path):
    table = pd.DataFrame({"policy": ["threshold", "risk_ltt"], "n_seeds": [1, 1], "area": [0.81234567, float("nan")]})
    csv, tex = tables.export_table(table, "summary", tmp_path, caption="Summary")
    pd.testing.assert_frame_equal(pd.read_csv(csv), table)
    text = tex.read_text()
    assert "\\toprule" in text and "81.2" in text and "--" in text and "seeds" in text  # area in percent
    assert "\\caption{Summary}" in text


@pytest.mark.parametrize("fronts", [{}, {"a": FRONT.iloc[:0]}])
def test_empty_inputs_still_give_a_figure(fronts):
    assert isinstance(plots.plot_frontiers(fronts), Figure)


def test_sensitivity_and_dqn_training_draw_the_given_numbers():
    table = pd.DataFrame({"alpha": [0.5, 0.0], "n_seeds": [3, 3], "accuracy": [0.8, 0.9], "accuracy_std": [0.01, 0.02],
                          "compute_saved": [0.5, 0.1], "compute_saved_std": [float("nan"), 0.0]})
    fig = plots.plot_sensitivity(table, "alpha")
    acc, saved = fig.axes
    assert list(acc.lines[0].get_xdata()) == [0.0, 0.5] and list(acc.lines[0].get_ydata()) == [0.9, 0.8]
    assert list(saved.lines[0].get_ydata()) == [0.1, 0.5] and "3 seeds" in acc.get_title()
    traces = {"dqn cost_weight=0.1": [{"step": 25, "greedy_reward": 0.5, "exit_fractions": [0.2, 0.8]},
                                      {"step": 50, "greedy_reward": 0.6, "exit_fractions": [0.3, 0.7]}],
              "dqn cost_weight=1": [{"step": 25, "greedy_reward": 0.1, "exit_fractions": [0.9, 0.1]}]}
    fig = plots.plot_dqn_training(traces)
    reward, exits = fig.axes
    assert [list(line.get_ydata()) for line in reward.lines] == [[0.5, 0.6], [0.1]]
    assert [p.get_height() for p in exits.patches] == [0.3, 0.7, 0.9, 0.1]  # each agent's last report


def test_split_draws_the_given_table():
    table = pd.DataFrame({"split_after": [0, 1, 2], "device_ms": [1.0, 3.0, 6.0], "bytes_fp32": [400, 200, 40],
                          "bytes_bf16": [200, 100, 20], "bytes_int8": [100, 50, 10], "local_share": [0.5, 0.75, 1.0],
                          "local_accuracy": [1.0, 0.66, 0.75], "mean_device_ms": [1.0, 2.0, 2.75],
                          "mean_bytes_fp32": [200.0, 50.0, 0.0]})
    fig = plots.plot_split(table, title="split")
    assert isinstance(fig, Figure)
    left, right, ms = fig.axes
    assert [round(p.get_height(), 6) for p in left.patches] == [0.5, 0.75, 1.0]
    assert list(ms.lines[0].get_ydata()) == [1.0, 3.0, 6.0] and list(ms.lines[1].get_ydata()) == [1.0, 2.0, 2.75]
    assert sorted(p.get_height() for p in right.patches) == sorted([400, 200, 40, 200, 100, 20, 100, 50, 10])
    assert list(right.lines[0].get_ydata()) == [200.0, 50.0, 0.0]
