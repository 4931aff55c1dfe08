"""Paper figures from plain data (tables and lists that eelab.metrics and eelab.workbench return), and export.

Every plot_* returns a matplotlib Figure and computes no metric; export_figure writes vector PDF and SVG plus
PNG with no browser (tables: eelab.tables). Figures are made through pyplot and closed at once, so a
notebook shows each exactly once (as the cell's value) and nothing piles up in pyplot's registry.

Paper grade: every figure takes size="column" (3.3 in wide) or "page" (6.9 in, two columns) or a width in
inches, and is drawn at that final size with fonts of 7-8 pt; policy families keep one colour, marker and line
style in every figure (policy_style, plotly_style for the widgets); legends sit below the axes, off the data;
percent ticks print their exact values; redraw(fig, size) draws a plot_* figure again at another size.
export_figure refuses a figure that eelab.figcheck.figure_problems finds a problem in (text off the canvas,
series that look the same, tick labels that round, legends over data) or whose PDF would embed a Type 3 font,
unless check=False.
"""
from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import Formatter, MaxNLocator

from .errors import EelabError
from .figcheck import figure_problems, pdf_font_types

# Style applied inside each plot call (rc_context), never set globally at import. Sizes are final print sizes:
# 8 pt labels, 7 pt ticks and legends. Type 42 (TrueType) fonts in PDF, text kept as text in SVG.
_STYLE = {"figure.dpi": 150, "savefig.dpi": 300, "axes.spines.top": False, "axes.spines.right": False,
          "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5, "font.size": 8, "axes.titlesize": 8,
          "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7, "legend.fontsize": 7,
          "figure.titlesize": 8, "legend.frameon": False, "lines.linewidth": 1.2, "lines.markersize": 4,
          "axes.linewidth": 0.6, "xtick.major.width": 0.6, "ytick.major.width": 0.6, "hatch.linewidth": 0.5,
          "pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none", "mathtext.fontset": "dejavusans",
          "figure.constrained_layout.h_pad": 0.03, "figure.constrained_layout.w_pad": 0.03}
SIZES: dict[str, float] = {"column": 3.3, "page": 6.9}  # figure widths in inches: one column, two columns

# One look per policy family, the same in every matplotlib figure and plotly panel (widgets use policy_style
# too). Colours: Okabe-Ito (colour-blind safe) plus Tol's wine and indigo; each family also has its own marker
# and line style, so a greyscale print still tells them apart. Members of one family (risk's deltas, dqn's
# cost_weights, alpha's seeds) keep the family's colour and step through other markers and line styles.
FAMILY_STYLES: dict[str, dict[str, Any]] = {
    "threshold": {"color": "#0072B2", "marker": "o", "linestyle": "-"},
    "patience": {"color": "#E69F00", "marker": "s", "linestyle": (0, (5, 2))},
    "budget": {"color": "#009E73", "marker": "^", "linestyle": (0, (5, 2, 1, 2))},
    "risk": {"color": "#D55E00", "marker": "D", "linestyle": (0, (1, 1.5))},
    "alpha": {"color": "#CC79A7", "marker": "v", "linestyle": (0, (8, 2))},
    "dqn": {"color": "#56B4E9", "marker": "P", "linestyle": (0, (3, 1, 1, 1, 1, 1))},
    "confidence": {"color": "#882255", "marker": "X", "linestyle": (0, (2, 2))},
    "ensemble": {"color": "#332288", "marker": "h", "linestyle": (0, (6, 1, 1, 1))},
    "static": {"color": "#000000", "marker": "s", "linestyle": "none"},
    "oracle": {"color": "#777777", "marker": "*", "linestyle": (0, (4, 2))},
}
_OTHER_COLORS = ("#44AA99", "#999933", "#AA4499", "#117733", "#88CCEE", "#DDCC77")  # Tol's muted, for other names
_OTHER_MARKERS = ("p", "<", ">", "d", "H", "8")
_MEMBER_STYLES = ("-", (0, (5, 2)), (0, (1, 1.5)), (0, (5, 2, 1, 2)), (0, (8, 2)), (0, (3, 1, 1, 1, 1, 1)),
                  (0, (2, 2)), (0, (6, 1, 1, 1)))
_MEMBER_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "h", "<", ">")
# (marker, line style) pairs for family members: all distinct, none a family's own pair
_MEMBER_LOOKS = [look for look in ((_MEMBER_MARKERS[i % 10], _MEMBER_STYLES[(i + i // 10) % 8]) for i in range(80))
                 if look not in {(f["marker"], f["linestyle"]) for f in FAMILY_STYLES.values()}]
_HATCHES = ("", "////", "....", "xxxx", "\\\\\\\\", "oo", "++", "--", "||", "**")  # bars: greyscale tells them apart


def policy_family(name: str) -> str:
    """The family a series name belongs to: 'alpha', 'alpha 1', 'alpha seed=2', 'dqn cost_weight=0.3' -> its first
    word when that is a known family, else the whole name."""
    first = str(name).strip().split(" ")[0].split("=")[0].split("(")[0].lower()
    return first if first in FAMILY_STYLES else str(name)


def policy_style(name: str, member: int = 0) -> dict[str, Any]:
    """matplotlib style {color, marker, linestyle} of a policy series: its family's colour, marker and line
    style; member > 0 (the member-th series of one family in a figure) keeps the colour and takes a (marker,
    line style) pair of its own: never a family's own pair, distinct within a family, and apart from other
    families' first members. Names of no known family get colours and markers of their own (stable per name)."""
    family = policy_family(name)
    if family in FAMILY_STYLES:
        style = dict(FAMILY_STYLES[family])
        slot = list(FAMILY_STYLES).index(family)
    else:
        h = sum(ord(c) * (i + 1) for i, c in enumerate(family))
        style = {"color": _OTHER_COLORS[h % len(_OTHER_COLORS)], "marker": _OTHER_MARKERS[h % len(_OTHER_MARKERS)],
                 "linestyle": "-"}
        slot = h
    if member:
        style["marker"], style["linestyle"] = _MEMBER_LOOKS[(slot * 7 + member - 1) % len(_MEMBER_LOOKS)]
    return style


_PLOTLY_MARKERS = {"o": "circle", "s": "square", "^": "triangle-up", "D": "diamond", "v": "triangle-down",
                   "P": "cross", "X": "x", "h": "hexagon", "*": "star", "p": "pentagon", "<": "triangle-left",
                   ">": "triangle-right", "d": "diamond-tall", "H": "hexagon2", "8": "octagon"}


def plotly_style(name: str, member: int = 0) -> dict[str, Any]:
    """The same look as policy_style for a plotly trace: {"line": {color, dash}, "marker": {color, symbol}}."""
    style = policy_style(name, member)
    ls = style["linestyle"]
    if ls in ("-", "none"):
        dash = "solid"
    else:
        dash = ",".join(f"{v * 2:g}px" for v in ls[1])  # matplotlib dashes are in line widths (~2 px here)
    return {"line": {"color": style["color"], "dash": dash},
            "marker": {"color": style["color"], "symbol": _PLOTLY_MARKERS.get(style["marker"], "circle")}}


def _styles(names: Sequence[str]) -> list[dict[str, Any]]:
    """policy_style of each series of one figure, members numbered within each family in order."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        family = policy_family(name)
        out.append(policy_style(name, seen.get(family, 0)))
        seen[family] = seen.get(family, 0) + 1
    return out


def _redrawable(plot: Callable[..., Figure]) -> Callable[..., Figure]:
    """plot_* as it is, keeping its call on the figure it returns, so redraw() can draw the figure again at
    another size (an export at column or page width of figures a notebook drew at their default size)."""
    @functools.wraps(plot)
    def drawn(*args: Any, **kwargs: Any) -> Figure:
        fig = plot(*args, **kwargs)
        fig._eelab_call = (drawn, args, kwargs)
        return fig
    return drawn


def redraw(fig: Figure, size: str | float | None) -> Figure:
    """The figure drawn again by the plot_* call that made it, at size ("column", "page" or a width in inches);
    size None or "default", or a figure no plot_* drew, gives fig itself."""
    call = getattr(fig, "_eelab_call", None)
    if size in (None, "default") or call is None:
        return fig
    plot, args, kwargs = call
    bound = inspect.signature(plot).bind(*args, **kwargs)
    bound.arguments["size"] = size
    return plot(*bound.args, **bound.kwargs)


_AXIS = {"rel_macs": "mean MACs / plain network's MACs", "rel_ms": "mean latency / plain network's latency",
         "mean_macs": "mean MACs per image", "mean_ms": "mean latency per image (ms)",
         "compute_saved": "compute saved (MACs)", "accuracy": "test accuracy"}


@_redrawable
def plot_frontiers(frontiers: Mapping[str, pd.DataFrame], oracle: pd.DataFrame | None = None,
                   static: pd.DataFrame | None = None, selected: Mapping[str, Mapping[str, float]] | None = None,
                   x: str = "rel_macs", y: str = "accuracy", title: str | None = None,
                   size: str | float = "column") -> Figure:
    """Accuracy against cost: one line per policy frontier (policy_style), the oracle frontier dashed, static
    exits as labelled squares, selected operating points as large dots.

    frontiers {policy: rows with columns x and y (e.g. a Pareto front)}; oracle: metrics.oracle_frontier
    rows; static: rows of the static exits (column `exit` labels them); selected {policy: {x:, y:}}.
    x and y are fractions (shown as percent). size: "column", "page" or a width in inches.
    """
    width = _width(size)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(width, width * (0.78 if width < 5 else 0.5)), layout="constrained")
        if oracle is not None and len(oracle):
            ax.plot(oracle[x], oracle[y], color=FAMILY_STYLES["oracle"]["color"], lw=1.0,
                    linestyle=FAMILY_STYLES["oracle"]["linestyle"], label="oracle frontier (bound)",
                    drawstyle="steps-post")
        for (name, rows), style in zip(frontiers.items(), _styles(list(frontiers))):
            rows = rows.sort_values(x, kind="stable")
            ax.plot(rows[x], rows[y], ms=3, mfc="white", mew=0.9, label=name, **style)
            if selected and name in selected:
                ax.plot(selected[name][x], selected[name][y], marker=style["marker"], ms=7, color=style["color"],
                        mec="black", mew=0.8, zorder=5, linestyle="none", label=f"_{name} selected")
        if static is not None and len(static):
            look = FAMILY_STYLES["static"]
            ax.plot(static[x], static[y], marker=look["marker"], color=look["color"], linestyle="none", ms=4,
                    label="static exits", zorder=4)
        ax.set_xlabel(_AXIS.get(x, x))
        ax.set_ylabel(_AXIS.get(y, y))
        pct_x = x.startswith("rel_") or x == "compute_saved"
        _ticks(ax, x="pct" if pct_x else "num", y="pct")
        if static is not None and len(static):
            _label_points(ax, static[x].tolist(), static[y].tolist(), [f"exit {int(e)}" for e in static["exit"]])
        _legend_below(fig, ax, width)
        if title:
            ax.set_title(_wrap(title, width))
    return _closed(fig)


@_redrawable
def plot_exit_distribution(fractions: Mapping[str, Sequence[float]], title: str | None = None,
                           size: str | float = "column") -> Figure:
    """Grouped bars of the fraction of test samples leaving at each exit, one group per exit, one bar per policy.

    fractions {policy: [K] fractions} (metrics.evaluate's exit_fractions). size: "column", "page" or inches.
    """
    width = _width(size)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(width, width * (0.75 if width < 5 else 0.38)), layout="constrained")
        _exit_bars(ax, fractions, [s["color"] for s in _styles(list(fractions))], "fraction of test samples")
        _legend_below(fig, ax, width)
        if title:
            ax.set_title(_wrap(title, width))
    return _closed(fig)


@_redrawable
def plot_exit_profile(table: pd.DataFrame, published: Sequence[float] | None = None,
                      published_label: str = "published", size: str | float = "column") -> Figure:
    """Per exit: accuracy on cal and test as bars, and each exit's MACs relative to the plain network as a line.

    table: rows exit, rel_macs, cal_accuracy, test_accuracy (workbench.exit_table); published: per-exit
    accuracies someone else reports, drawn as crosses and labelled as theirs. size: "column", "page" or inches.
    """
    width = _width(size)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(width, width * (0.8 if width < 5 else 0.42)), layout="constrained")
        exits = np.arange(len(table))
        bar = 0.38
        ax.bar(exits - bar / 2, table["cal_accuracy"], width=bar, color="#BBBBBB", edgecolor="black", lw=0.4,
               hatch="////", label="cal accuracy")
        ax.bar(exits + bar / 2, table["test_accuracy"], width=bar, color="#4477AA", edgecolor="black", lw=0.4,
               label="test accuracy")
        if published is not None:
            ax.plot(range(len(published)), published, "x", color="black", ms=6, mew=1.3, linestyle="none",
                    label=published_label)
        ax.set_xlabel("exit")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1)
        ax.set_xticks(exits)
        _ticks(ax, x="num", y="pct")
        cost = ax.twinx()
        cost.plot(exits, table["rel_macs"], marker="D", linestyle=(0, (4, 1.5)), color="#AA3377", ms=3.5,
                  label="MACs / plain network")
        cost.set_ylabel("MACs / plain network")
        top = max(1.0, float(table["rel_macs"].max()))
        cost.set_ylim(0, 1.05 * top)
        cost.set_yticks([i / 5 for i in range(int(top * 5 + 1e-9) + 1)])
        cost.grid(False)
        cost.spines["right"].set_visible(True)
        _ticks(cost, y="pct")
        _legend_below(fig, [ax, cost], width)
    return _closed(fig)


@_redrawable
def plot_reference_exits(table: pd.DataFrame, published: Mapping[str, tuple[float, float]] | None = None,
                         size: str | float = "column") -> Figure:
    """Test accuracy against MACs of every exit of several networks, one line each, each point labelled with its
    exit: references side by side on one cost scale.

    table: rows reference, exit, macs, test_accuracy (workbench.reference_table); published: {label: (MACs,
    accuracy)} someone else reports, drawn as crosses labelled as theirs. size: "column", "page" or inches.
    """
    width = _width(size)
    names = list(dict.fromkeys(table["reference"]))
    looks = [("#4477AA", "o", "-"), ("#EE6677", "s", (0, (5, 2))), ("#228833", "^", (0, (1, 1.5))),
             ("#CCBB44", "D", (0, (5, 2, 1, 2)))]
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(width, width * (0.72 if width < 5 else 0.4)), layout="constrained")
        for i, name in enumerate(names):
            rows = table[table["reference"] == name]
            color, marker, line = looks[i % len(looks)]
            ax.plot(rows["macs"] / 1e6, rows["test_accuracy"], color=color, marker=marker, linestyle=line,
                    label=str(name))
        for j, (label, (macs, acc)) in enumerate((published or {}).items()):
            ax.plot([macs / 1e6], [acc], "x" if j % 2 == 0 else "+", color="black", ms=6, mew=1.3,
                    linestyle="none", label=label)
        ax.set_xlabel("MACs per image to the exit (M)")
        ax.set_ylabel("test accuracy")
        ax.margins(y=0.14)  # room for the exit numbers above and below the outermost points
        ax.set_xlim(left=0)
        _ticks(ax, x="num", y="pct")
        for i, name in enumerate(names):  # exit numbers: above-left of the first line's points, below-right after
            rows = table[table["reference"] == name]
            up = i % 2 == 0
            for x, y, e in zip(rows["macs"] / 1e6, rows["test_accuracy"], rows["exit"]):
                ax.annotate(f"{int(e)}", (x, y), textcoords="offset points", xytext=(-4, 4) if up else (5, -5),
                            ha="right" if up else "left", va="bottom" if up else "top", fontsize=7)
        _legend_below(fig, ax, width)
    return _closed(fig)


@_redrawable
def plot_class_heatmap(table: pd.DataFrame, title: str | None = None, fmt: str = ".0%",
                       cmap: str = "viridis", size: str | float | None = None) -> Figure:
    """A heatmap of a classes x columns table of fractions (per-class accuracy by policy, or exit fractions).

    size: "column", "page" or inches; default "column" up to 5 columns, else "page".
    """
    width = _width(size if size is not None else ("column" if table.shape[1] <= 5 else "page"))
    longest = max((len(str(c)) for c in table.columns), default=1)
    rotate = _text_inches(longest, 7) > 0.9 * (width - 1.0) / max(table.shape[1], 1)
    height = 0.5 + 0.2 * table.shape[0] + (0.06 * longest if rotate else 0.2) + (0.25 if title else 0)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
        sns.heatmap(table, annot=True, fmt=fmt, cmap=cmap, vmin=0, vmax=1, ax=ax, cbar=False,
                    annot_kws={"fontsize": 7})
        ax.grid(False)
        ax.set_xlabel(table.columns.name or "")
        ax.set_ylabel(table.index.name or "")
        ax.tick_params(axis="x", rotation=35 if rotate else 0, length=0)
        ax.tick_params(axis="y", rotation=0, length=0)
        if rotate:
            for label in ax.get_xticklabels():
                label.set_ha("right")
                label.set_rotation_mode("anchor")
        if title:
            ax.set_title(_wrap(title, width))
    return _closed(fig)


@_redrawable
def plot_reliability(bins: pd.DataFrame, title: str | None = None, size: str | float = "page") -> Figure:
    """Reliability diagrams, one panel per exit: accuracy against mean confidence per bin, the diagonal for a
    calibrated exit, bar widths the bins. bins: workbench.reliability_bins rows. size: "column" (two panels a
    row), "page" (up to four a row) or inches."""
    exits = sorted(bins["exit"].unique())
    width = _width(size)
    with plt.rc_context(_STYLE):
        fig, axes, ncols = _panels(len(exits), width, sharey=True)
        for ax, k in zip(axes, exits):
            rows = bins[(bins["exit"] == k) & (bins["count"] > 0)]
            ax.bar(rows["lo"], rows["accuracy"], width=rows["hi"] - rows["lo"], align="edge",
                   color="#88CCEE", edgecolor="white", lw=0.4, label="accuracy in the bin")
            ax.plot(rows["confidence"], rows["accuracy"], "o", ms=2.5, color="black", linestyle="none",
                    label="bin's mean confidence")
            ax.plot([0, 1], [0, 1], linestyle=(0, (4, 2)), color="0.4", lw=0.8, label="calibrated")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_xticks([0, 0.5, 1])
            ax.set_yticks([0, 0.25, 0.5, 0.75, 1])
            ax.set_title(f"exit {k}")
            _ticks(ax, x="pct", y="pct")
        _finish_panels(fig, axes, ncols, width, "confidence (max prob)", "accuracy", title)
    return _closed(fig)


@_redrawable
def plot_confidence(confidences: pd.DataFrame, title: str | None = None, size: str | float = "page") -> Figure:
    """Per-exit histograms of max-prob confidence, right and wrong predictions stacked.

    confidences: rows exit, confidence, correct (workbench.exit_confidences). size: "column", "page" or inches.
    """
    exits = sorted(confidences["exit"].unique())
    width = _width(size)
    with plt.rc_context(_STYLE):
        fig, axes, ncols = _panels(len(exits), width, sharey=True)
        for ax, k in zip(axes, exits):
            rows = confidences[confidences["exit"] == k]
            right = rows.loc[rows["correct"].astype(bool), "confidence"].to_numpy(float)
            wrong = rows.loc[~rows["correct"].astype(bool), "confidence"].to_numpy(float)
            ax.hist([right, wrong], bins=20, range=(0, 1), stacked=True, color=["#44AA99", "#CC6677"],
                    edgecolor="white", lw=0.3, hatch=None, label=["right", "wrong"])
            for patch in ax.containers[1]:  # wrong: hatched, so a greyscale print still tells them apart
                patch.set_hatch("////")
            ax.set_title(f"exit {k}")
            ax.set_xlim(0, 1)
            ax.set_xticks([0, 0.5, 1])
            _ticks(ax, x="pct", y="num")
        _finish_panels(fig, axes, ncols, width, "confidence (max prob)", "test samples", title)
    return _closed(fig)


_EXIT_COLORS = ("#332288", "#117733", "#DDAA33", "#AA3377", "#44AA99", "#882255", "#999933", "#6699CC")


@_redrawable
def plot_training(history: Sequence[Mapping[str, Any]], title: str | None = None,
                  size: str | float = "page") -> Figure:
    """Training curves: per-exit accuracy on cal by epoch (first panel) and the training loss (second).

    history: per-epoch rows with epoch, train_loss and cal_acc [K] (eelab.read_history). size: "column"
    (panels stacked), "page" (side by side) or inches.
    """
    width = _width(size)
    with plt.rc_context(_STYLE):
        if width < 5:
            fig, (acc, loss) = plt.subplots(2, 1, figsize=(width, width * 1.25), layout="constrained", sharex=True)
        else:
            fig, (acc, loss) = plt.subplots(1, 2, figsize=(width, width * 0.4), layout="constrained")
        epochs = [row["epoch"] for row in history]
        k = max((len(row.get("cal_acc", [])) for row in history), default=0)
        for j in range(k):
            acc.plot(epochs, [row["cal_acc"][j] for row in history], marker=_MEMBER_MARKERS[j % 10], ms=3,
                     linestyle=_MEMBER_STYLES[j % 8], color=_EXIT_COLORS[j % 8], label=f"exit {j}",
                     markevery=max(1, len(epochs) // 12))
        acc.set_ylabel("cal accuracy (watched only)")
        loss.plot(epochs, [row["train_loss"] for row in history], "-", color="black", lw=1.2,
                  label="training loss (sum over exits)")
        loss.set_ylabel("training loss (sum over exits)")
        for ax in (acc, loss) if width >= 5 else (loss,):
            ax.set_xlabel("epoch")
        for ax in (acc, loss):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        _ticks(acc, x="num", y="pct")
        _ticks(loss, x="num", y="num")
        _legend_below(fig, acc, width)
        if title:
            fig.suptitle(_wrap(title, width))
    return _closed(fig)


@_redrawable
def plot_examples(examples: Any, columns: int | None = None, size: str | float = "page") -> Figure:
    """A grid of test images titled with the exit each took and its prediction (red, with "(is ...)", when wrong).

    examples: a workbench.Examples; without images (dataset absent) the figure says how to get them.
    columns: images a row (default: about 0.85 in each). size: "column", "page" or inches.
    """
    width = _width(size)
    columns = columns or max(2, round(width / 0.85))
    with plt.rc_context(_STYLE):
        if examples.images is None:
            text = "Test images not shown: " + examples.message
            lines = _wrap(text, width, fontsize=7).count("\n") + 1
            fig, ax = plt.subplots(figsize=(width, 0.2 + 0.14 * lines), layout="constrained")
            ax.axis("off")
            ax.text(0, 0.5, _wrap(text, width, fontsize=7), va="center", fontsize=7)
            return _closed(fig)
        n = examples.images.shape[0]
        rows = -(-n // columns)
        cell = width / columns
        fig, axes = plt.subplots(rows, columns, figsize=(width, rows * (cell + 0.5)), layout="constrained",
                                 squeeze=False)
        names = examples.class_names
        for i, ax in enumerate(axes.flat):
            ax.axis("off")
            if i >= n:
                continue
            image = examples.images[i].permute(1, 2, 0).numpy()
            ax.imshow(image[:, :, 0] if image.shape[2] == 1 else image, cmap="gray" if image.shape[2] == 1 else None)
            wrong = examples.predictions[i] != examples.labels[i]
            truth = f"\n(is {names[examples.labels[i]]})" if wrong else "\n"
            ax.set_title(f"exit {examples.exits[i]}\n{names[examples.predictions[i]]}{truth}", fontsize=7,
                         color="#BB0000" if wrong else "black")
    return _closed(fig)


@_redrawable
def plot_risk(table: pd.DataFrame, title: str | None = None, size: str | float = "column") -> Figure:
    """Realised test risk against the risk level epsilon, one line per delta (risk family, one marker and dash
    per delta, hollow markers of falling size so coinciding points stay visible; deltas whose lines coincide
    everywhere are one line labelled so), with risk = epsilon dashed.

    table: workbench.risk_table rows (epsilon, delta, test_risk). size: "column", "page" or inches.
    """
    width = _width(size)
    groups: list[tuple[list[float], pd.DataFrame]] = []
    for delta, rows in table.groupby("delta", sort=True):
        rows = rows.sort_values("epsilon", kind="stable")
        for deltas, other in groups:  # the same line as an earlier delta: one entry that says so
            if len(other) == len(rows) and np.allclose(other["epsilon"].to_numpy(float), rows["epsilon"].to_numpy(float)) \
                    and np.allclose(other["test_risk"].to_numpy(float), rows["test_risk"].to_numpy(float)):
                deltas.append(float(delta))
                break
        else:
            groups.append(([float(delta)], rows))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(width, width * (0.78 if width < 5 else 0.45)), layout="constrained")
        for i, (deltas, rows) in enumerate(groups):
            style = policy_style("risk", i)
            label = (f"test risk, delta={deltas[0]:g}" if len(deltas) == 1 else
                     f"test risk, delta={', '.join(f'{d:g}' for d in deltas)} (identical)")
            ax.plot(rows["epsilon"], rows["test_risk"], ms=max(3.0, 6.5 - 1.5 * i), mfc="none", mew=1.0,
                    label=label, zorder=3 + i, **style)
        top = float(table["epsilon"].max()) if len(table) else 1.0
        ax.plot([0, top], [0, top], linestyle=(0, (4, 2)), color="0.45", lw=0.9,
                label="risk = epsilon (the bound on cal draws)")
        ax.set_xlabel("epsilon (tolerated accuracy loss vs. last exit)")
        ax.set_ylabel("realised risk on test")
        _ticks(ax, x="pct", y="pct")
        _legend_below(fig, ax, width)
        if title:
            ax.set_title(_wrap(title, width))
    return _closed(fig)


@_redrawable
def plot_sensitivity(table: pd.DataFrame, param: str, title: str | None = None,
                     size: str | float = "column") -> Figure:
    """Test accuracy (left axis) and compute saved (right axis) against one parameter, mean with a band of
    one standard deviation over seeds where there are several.

    table: workbench.sensitivity_table rows (param, accuracy[_std], compute_saved[_std]). size: "column",
    "page" or inches.
    """
    rows = table.sort_values(param)
    width = _width(size)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(width, width * (0.8 if width < 5 else 0.45)), layout="constrained")
        saved = ax.twinx()
        for axis, key, color, marker, dash, label in (
                (ax, "accuracy", "#222222", "o", "-", "test accuracy"),
                (saved, "compute_saved", "#117733", "s", (0, (4, 1.5)), "compute saved (MACs)")):
            axis.plot(rows[param], rows[key], marker=marker, linestyle=dash, ms=3, color=color, label=label)
            spread = rows[f"{key}_std"].fillna(0.0) if f"{key}_std" in rows else 0.0 * rows[key]
            axis.fill_between(rows[param], rows[key] - spread, rows[key] + spread, color=color, alpha=0.15, lw=0)
            axis.set_ylabel(label, color=color)
            _ticks(axis, x="num", y="pct")
        saved.grid(False)
        saved.spines["right"].set_visible(True)
        ax.set_xlabel(param)
        n = int(rows["n_seeds"].max()) if "n_seeds" in rows and len(rows) else 1
        ax.set_title(_wrap(title or (f"sensitivity to {param}" + (f" (mean and std over {n} seeds)" if n > 1 else "")),
                           width))
        _legend_below(fig, [ax, saved], width)
    return _closed(fig)


@_redrawable
def plot_dqn_training(traces: Mapping[str, Sequence[Mapping[str, Any]]], title: str | None = None,
                      size: str | float = "page") -> Figure:
    """DQN training, one style per agent (dqn's colour, a marker and dash each): the greedy agent's mean reward
    on cal against gradient updates (left), and where the trained agent leaves (right, exit fractions of cal
    samples at the last report, hatched per agent).

    traces {agent label: DQNPolicy.info["trace"] rows (step, greedy_reward, exit_fractions)}. size: "column"
    (panels stacked), "page" (side by side) or inches.
    """
    width = _width(size)
    with plt.rc_context(_STYLE):
        fig, (reward, exits) = _two_panels(width, stacked=1.2, side=0.4)
        final, colors = {}, []
        for i, (name, rows) in enumerate(traces.items()):
            if not rows:
                continue
            style = policy_style("dqn", i)
            reward.plot([r["step"] for r in rows], [r["greedy_reward"] for r in rows], lw=1.1, ms=3,
                        markevery=max(1, len(rows) // 8), label=name, **style)
            final[name] = rows[-1]["exit_fractions"]
            colors.append(style["color"])
        reward.set_xlabel("gradient update")
        reward.set_ylabel("greedy mean reward on cal")
        _ticks(reward, x="num", y="num")
        if final:
            _exit_bars(exits, final, colors, "fraction of cal samples")
        exits.set_title("trained agents: where cal samples exit")
        reward.set_title("greedy reward during training")
        _legend_below(fig, reward, width)
        if title:
            fig.suptitle(_wrap(title, width))
    return _closed(fig)


@_redrawable
def plot_split(table: pd.DataFrame, title: str | None = None, size: str | float = "page") -> Figure:
    """An edge/cloud split per split point: images answered on the device and device ms (left), bytes sent (right).

    table: workbench.split_table rows (split_after, local_share, device_ms, mean_device_ms, bytes_fp32,
    bytes_bf16, bytes_int8, mean_bytes_fp32). size: "column" (panels stacked), "page" or inches.
    """
    width = _width(size)
    with plt.rc_context(_STYLE):
        fig, (left, right) = _two_panels(width, stacked=1.35, side=0.42)
        k = table["split_after"].to_numpy()
        left.bar(k, table["local_share"], color="#BBBBBB", edgecolor="black", lw=0.4, label="answered on the device")
        left.set_ylim(0, 1)
        left.set_xlabel("split after stage k")
        left.set_ylabel("share of images")
        left.set_xticks(k)
        _ticks(left, x="num", y="pct")
        ms = left.twinx()
        ms.plot(k, table["device_ms"], marker="D", linestyle="-", ms=3.5, color="#332288",
                label="device ms, image going on")
        ms.plot(k, table["mean_device_ms"], marker="o", linestyle=(0, (4, 1.5)), ms=3.5, color="#AA3377",
                label="device ms, mean per image")
        ms.set_ylim(0, 1.1 * float(table["device_ms"].max()))
        ms.set_ylabel("device time per image (ms)")
        ms.grid(False)
        ms.spines["right"].set_visible(True)
        _ticks(ms, y="num")
        for i, (col, name) in enumerate([("bytes_fp32", "fp32"), ("bytes_bf16", "bf16"), ("bytes_int8", "int8")]):
            right.bar(k + (i - 1) * 0.27, table[col], width=0.27, color=("#444444", "#999999", "#DDDDDD")[i],
                      edgecolor="black", lw=0.4, hatch=("", "////", "....")[i], label=f"{name}, if sent")
        right.plot(k, table["mean_bytes_fp32"], marker="o", linestyle="-", ms=3.5, color="#CC6677",
                   label="fp32, mean sent per image")
        right.set_xlabel("split after stage k")
        right.set_ylabel("bytes per image")
        right.set_xticks(k)
        _ticks(right, x="num", y="num")
        _legend_below(fig, [left, ms, right], width)
        if title:
            fig.suptitle(_wrap(title, width))
    return _closed(fig)


# ---- export ---------------------------------------------------------------------------------------
def export_figure(fig: Figure, name: str, folder: str | Path = "figures", check: bool = True) -> list[Path]:
    """Write a figure as folder/name.pdf and .svg (vector, text kept as text) and .png (300 dpi); returns the paths.

    check: refuse (EelabError naming the figure and its first problem) a figure figure_problems finds fault with,
    or whose PDF would embed a Type 3 font.
    """
    if check:
        problems = figure_problems(fig)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise EelabError(f"figure {name} is not ready to print: {problems[0]}{more}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    # fonttype 42 / "none" keep text editable in PDF and SVG; no dates, so re-exports diff cleanly
    with plt.rc_context({"pdf.fonttype": 42, "ps.fonttype": 42, "svg.fonttype": "none", "svg.hashsalt": "eelab"}):
        for ext, meta in (("pdf", {"CreationDate": None}), ("svg", {"Date": None}), ("png", {})):
            path = folder / f"{name}.{ext}"
            fig.savefig(path, format=ext, metadata=meta, dpi=300 if ext == "png" else None)
            paths.append(path)
    if check and "Type3" in pdf_font_types(paths[0]):
        raise EelabError(f"figure {name}: its PDF embeds a Type 3 font (mathtext or a bitmap font); use plain text")
    return paths


# ---- helpers ------------------------------------------------------------------------------------


class _Number(Formatter):
    """Tick values printed exactly: as few decimals as every tick needs (at most 4), times scale, with suffix
    (percent: scale 100, "%"); thousands separated by commas; a true minus sign."""

    def __init__(self, scale: float = 1.0, suffix: str = ""):
        self.scale, self.suffix, self.decimals = scale, suffix, 0

    def set_locs(self, locs: Sequence[float]) -> None:
        self.decimals = _decimals([v * self.scale for v in locs])

    def __call__(self, x: float, pos: int | None = None) -> str:
        v = x * self.scale
        text = f"{abs(v):,.{self.decimals}f}"
        sign = "\u2212" if v < 0 and float(text.replace(",", "")) != 0 else ""
        return f"{sign}{text}{self.suffix}"


def _decimals(values: Sequence[float], most: int = 4) -> int:
    """The fewest decimals (at most `most`) that print every value exactly."""
    finite = [v for v in values if math.isfinite(v)]
    for d in range(most + 1):
        if all(abs(round(v, d) - v) <= 1e-9 * max(1.0, abs(v)) for v in finite):
            return d
    return most


def _ticks(ax: Any, x: str | None = None, y: str | None = None) -> None:
    """Exact tick labels on ax: "pct" (fractions as percent) or "num" for each named axis; automatic locators
    become steps of 1, 2 or 5 times a power of ten (fixed or integer locators are kept)."""
    from matplotlib.ticker import AutoLocator

    for axis, kind in ((ax.xaxis, x), (ax.yaxis, y)):
        if kind is None:
            continue
        if type(axis.get_major_locator()) is AutoLocator:
            axis.set_major_locator(MaxNLocator("auto", steps=[1, 2, 5, 10]))
        axis.set_major_formatter(_Number(100.0, "%") if kind == "pct" else _Number())


def _width(size: str | float) -> float:
    """A figure width in inches: "column" (3.3), "page" (6.9) or a number of inches."""
    if isinstance(size, str):
        if size not in SIZES:
            raise EelabError(f"size must be one of {', '.join(SIZES)} or a width in inches, got {size!r}")
        return SIZES[size]
    if not 1.0 <= float(size) <= 20.0:
        raise EelabError(f"a figure width must be between 1 and 20 inches, got {size}")
    return float(size)


def _text_inches(chars: int, fontsize: float) -> float:
    """About how wide `chars` characters of DejaVu Sans at fontsize pt print, in inches."""
    return chars * fontsize * 0.56 / 72


def _legend_below(fig: Figure, axes: Any, width: float) -> None:
    """One legend for the figure, below the axes (constrained layout makes room), so it never covers data:
    entries of axes (one or a list, twin axes too) in order, in as many columns as fit the width; the figure
    grows by the legend's height, so the plot keeps its size."""
    handles, labels = [], []
    for ax in axes if isinstance(axes, (list, tuple)) else [axes]:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels and not label.startswith("_"):
                handles.append(h)
                labels.append(label)
    if not labels:
        return
    renderer = fig.canvas.get_renderer()
    for ncols in range(len(labels), 0, -1):  # the most columns whose legend fits the width, measured
        legend = fig.legend(handles, labels, loc="outside lower center", ncols=ncols, handlelength=2.2,
                            columnspacing=1.0, borderaxespad=0.2)
        if ncols == 1 or legend.get_window_extent(renderer).width <= fig.bbox.width - 0.1 * fig.dpi:
            break
        legend.remove()
    rows = -(-len(labels) // ncols)
    fig.set_figheight(fig.get_figheight() + 0.16 * rows + 0.06)


def _panels(n: int, width: float, sharey: bool = False) -> tuple[Figure, list[Any], int]:
    """n small panels: up to 4 a row on a page, 2 in a column; returns the figure, the n axes and the columns."""
    ncols = max(1, min(n, 4 if width >= 5 else 2))
    rows = -(-n // ncols)
    panel = width / ncols
    fig, grid = plt.subplots(rows, ncols, figsize=(width, rows * panel * 0.95 + 0.45), layout="constrained",
                             sharey=sharey, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        fig.delaxes(ax)
    return fig, axes[:n], ncols


def _two_panels(width: float, stacked: float, side: float) -> tuple[Figure, Any]:
    """Two panels: stacked in a column-wide figure (height stacked x width), side by side in a wider one
    (height side x width)."""
    if width < 5:
        return plt.subplots(2, 1, figsize=(width, width * stacked), layout="constrained")
    return plt.subplots(1, 2, figsize=(width, width * side), layout="constrained")


def _finish_panels(fig: Figure, axes: list[Any], ncols: int, width: float, xlabel: str, ylabel: str,
                   title: str | None) -> None:
    """Axis labels on the outer panels only (x on the lowest of each column, y on the first of each row), the
    legend below the panels, the title wrapped to the figure's width."""
    for i, ax in enumerate(axes):
        if i + ncols >= len(axes):  # the lowest panel of its column
            ax.set_xlabel(xlabel)
    for ax in axes[::ncols]:
        ax.set_ylabel(ylabel)
    _legend_below(fig, axes[0], width)
    if title:
        fig.suptitle(_wrap(title, width))


def _label_points(ax: Any, xs: Sequence[float], ys: Sequence[float], labels: Sequence[str]) -> None:
    """Small labels beside points, turned inwards near the axes' edges so no label leaves the plot."""
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    for x, y, label in zip(xs, ys, labels):
        fx = (x - x0) / (x1 - x0) if x1 != x0 else 0.5
        fy = (y - y0) / (y1 - y0) if y1 != y0 else 0.5
        right = fx > 0.75
        low = fy < 0.2
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(-5 if right else 5, 5 if low else -5),
                    ha="right" if right else "left", va="bottom" if low else "top", fontsize=7)


def _exit_bars(ax: Any, fractions: Mapping[str, Sequence[float]], colors: Sequence[Any], ylabel: str) -> None:
    """Grouped bars on ax: one group per exit, one bar per entry of fractions {name: [K] fractions}, each
    series its colour and its own hatch (greyscale still separates them)."""
    n = max(len(fractions), 1)
    k = max((len(v) for v in fractions.values()), default=0)
    bar = 0.8 / n
    for i, (name, values) in enumerate(fractions.items()):
        ax.bar(np.arange(len(values)) + (i - (n - 1) / 2) * bar, list(values), width=bar, color=colors[i],
               edgecolor="black", lw=0.4, hatch=_HATCHES[i % len(_HATCHES)], label=name)
    ax.set_xticks(range(k))
    ax.set_xlabel("exit")
    ax.set_ylabel(ylabel)
    _ticks(ax, x="num", y="pct")


def _closed(fig: Figure) -> Figure:
    """The figure, closed in pyplot: nothing shows twice in a notebook, and the figure is still drawn and saved."""
    plt.close(fig)
    return fig


def _wrap(text: str, width: float, fontsize: float = 8) -> str:
    """Text broken into lines that fit `width` inches at fontsize pt."""
    import textwrap

    chars = max(10, int((width - 0.15) / _text_inches(1, fontsize)))
    return "\n".join(textwrap.wrap(text, chars))


__all__ = ["FAMILY_STYLES", "SIZES", "export_figure", "plot_class_heatmap", "plot_confidence", "plot_dqn_training",
           "plot_examples", "plot_exit_distribution", "plot_exit_profile", "plot_frontiers", "plot_reference_exits",
           "plot_reliability", "plot_risk",
           "plot_sensitivity", "plot_split", "plot_training", "plotly_style", "policy_family", "policy_style", "redraw"]
