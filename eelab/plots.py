"""Paper figures from plain data (tables and lists that eelab.metrics and eelab.workbench return), and export.

Every plot_* returns a matplotlib Figure and computes no metric; export_figure writes vector PDF and SVG plus
PNG, export_table CSV and LaTeX, with no browser. Figures are made through pyplot and closed at once, so a
notebook shows each exactly once (as the cell's value) and nothing piles up in pyplot's registry.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, PercentFormatter

# Style applied inside each plot call (rc_context), never set globally at import.
_STYLE = {"figure.dpi": 110, "savefig.dpi": 200, "axes.spines.top": False, "axes.spines.right": False,
          "axes.grid": True, "grid.alpha": 0.3, "font.size": 9, "axes.titlesize": 10, "legend.fontsize": 8,
          "legend.frameon": False}
_PALETTE = sns.color_palette("colorblind", 10)
_AXIS = {"rel_macs": "mean MACs / plain network's MACs", "rel_ms": "mean latency / plain network's latency",
         "mean_macs": "mean MACs per image", "mean_ms": "mean latency per image (ms)",
         "compute_saved": "compute saved (MACs)", "accuracy": "test accuracy"}


def plot_frontiers(frontiers: Mapping[str, pd.DataFrame], oracle: pd.DataFrame | None = None,
                   static: pd.DataFrame | None = None, selected: Mapping[str, Mapping[str, float]] | None = None,
                   x: str = "rel_macs", y: str = "accuracy", title: str | None = None) -> Figure:
    """Accuracy against cost: one line per policy frontier, the oracle frontier dashed, static exits as
    labelled squares, selected operating points as large dots.

    frontiers {policy: rows with columns x and y (e.g. a Pareto front)}; oracle: metrics.oracle_frontier
    rows; static: rows of the static exits (column `exit` labels them); selected {policy: {x:, y:}}.
    x and y are fractions (shown as percent).
    """
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(5.2, 3.6), layout="constrained")
        if oracle is not None and len(oracle):
            ax.plot(oracle[x], oracle[y], "--", color="0.45", lw=1.2, label="oracle frontier (bound)",
                    drawstyle="steps-post")
        for i, (name, rows) in enumerate(frontiers.items()):
            rows = rows.sort_values(x, kind="stable")
            ax.plot(rows[x], rows[y], "-o", ms=2.5, lw=1.4, color=_PALETTE[i % 10], label=name)
            if selected and name in selected:
                ax.plot(selected[name][x], selected[name][y], "o", ms=8, color=_PALETTE[i % 10],
                        mec="black", mew=0.8, zorder=5)
        if static is not None and len(static):
            ax.plot(static[x], static[y], "s", color="black", ms=5, label="static exits", zorder=4)
            for _, row in static.iterrows():
                ax.annotate(f"exit {int(row['exit'])}", (row[x], row[y]), textcoords="offset points",
                            xytext=(4, -10), fontsize=7)
        ax.set_xlabel(_AXIS.get(x, x))
        ax.set_ylabel(_AXIS.get(y, y))
        _percent(ax, x_too=x.startswith("rel_") or x == "compute_saved")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
        if title:
            ax.set_title(title)
    return _closed(fig)


def plot_exit_distribution(fractions: Mapping[str, Sequence[float]], title: str | None = None) -> Figure:
    """Grouped bars of the fraction of test samples leaving at each exit, one group per exit, one bar per policy.

    fractions {policy: [K] fractions} (metrics.evaluate's exit_fractions).
    """
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(4.6, 3.0), layout="constrained")
        _exit_bars(ax, fractions, _PALETTE[:len(fractions)], "fraction of test samples")
        if title:
            ax.set_title(title)
    return _closed(fig)


def plot_exit_profile(table: pd.DataFrame, published: Sequence[float] | None = None,
                      published_label: str = "published") -> Figure:
    """Per exit: accuracy on cal and test as bars, and each exit's MACs relative to the plain network as a line.

    table: rows exit, rel_macs, cal_accuracy, test_accuracy (workbench.exit_table); published: per-exit
    accuracies someone else reports, drawn as crosses and labelled as theirs.
    """
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(5.0, 3.2), layout="constrained")
        long = table.melt(id_vars="exit", value_vars=["cal_accuracy", "test_accuracy"], var_name="split",
                          value_name="accuracy").replace({"cal_accuracy": "cal", "test_accuracy": "test"})
        sns.barplot(long, x="exit", y="accuracy", hue="split", ax=ax, palette=_PALETTE[:2])
        if published is not None:
            ax.plot(range(len(published)), published, "x", color="black", ms=7, mew=1.5, label=published_label)
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.25)  # headroom above the bars for the legend
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        _percent(ax)
        cost = ax.twinx()
        cost.plot(range(len(table)), table["rel_macs"], "-D", color=_PALETTE[3], ms=4, label="MACs / plain")
        cost.set_ylabel("MACs to reach the exit / plain network")
        top = max(1.0, float(table["rel_macs"].max()))
        cost.set_ylim(0, 1.25 * top)  # the same headroom as the accuracy axis
        cost.set_yticks([i / 5 for i in range(int(top * 5 + 1e-9) + 1)])
        cost.grid(False)
        _percent(cost)
        lines = ax.get_legend_handles_labels()
        more = cost.get_legend_handles_labels()
        ax.legend(lines[0] + more[0], lines[1] + more[1], loc="upper left", ncols=2)
    return _closed(fig)


def plot_class_heatmap(table: pd.DataFrame, title: str | None = None, fmt: str = ".0%",
                       cmap: str = "viridis") -> Figure:
    """A heatmap of a classes x columns table of fractions (per-class accuracy by policy, or exit fractions)."""
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(1.2 + 0.8 * table.shape[1], 0.8 + 0.32 * table.shape[0]),
                               layout="constrained")
        sns.heatmap(table, annot=True, fmt=fmt, cmap=cmap, vmin=0, vmax=1, ax=ax, cbar=False,
                    annot_kws={"fontsize": 7})
        ax.grid(False)
        ax.tick_params(axis="x", rotation=0)
        if title:
            ax.set_title(title)
    return _closed(fig)


def plot_reliability(bins: pd.DataFrame, title: str | None = None) -> Figure:
    """Reliability diagrams, one panel per exit: accuracy against mean confidence per bin, the diagonal for a
    calibrated exit, bar widths the bins. bins: workbench.reliability_bins rows."""
    exits = sorted(bins["exit"].unique())
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(exits), figsize=(2.3 * len(exits), 2.6), layout="constrained",
                                 sharey=True, squeeze=False)
        for ax, k in zip(axes[0], exits):
            rows = bins[(bins["exit"] == k) & (bins["count"] > 0)]
            ax.bar(rows["lo"], rows["accuracy"], width=rows["hi"] - rows["lo"], align="edge",
                   color=_PALETTE[0], edgecolor="white", lw=0.5, label="accuracy")
            ax.plot(rows["confidence"], rows["accuracy"], "o", ms=3, color="black", label="bin mean confidence")
            ax.plot([0, 1], [0, 1], "--", color="0.5", lw=1)
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1)
            ax.set_title(f"exit {k}")
            ax.set_xlabel("confidence (max prob)")
        axes[0][0].set_ylabel("accuracy")
        axes[0][0].legend(loc="upper left")
        if title:
            fig.suptitle(title)
    return _closed(fig)


def plot_confidence(confidences: pd.DataFrame, title: str | None = None) -> Figure:
    """Per-exit histograms of max-prob confidence, right and wrong predictions stacked.

    confidences: rows exit, confidence, correct (workbench.exit_confidences).
    """
    exits = sorted(confidences["exit"].unique())
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(exits), figsize=(2.3 * len(exits), 2.5), layout="constrained",
                                 sharey=True, squeeze=False)
        for ax, k in zip(axes[0], exits):
            rows = confidences[confidences["exit"] == k].replace({"correct": {True: "right", False: "wrong"}})
            sns.histplot(rows, x="confidence", hue="correct", hue_order=["right", "wrong"], multiple="stack",
                         bins=20, binrange=(0, 1), ax=ax, palette=[_PALETTE[2], _PALETTE[3]], legend=k == exits[0])
            ax.set_title(f"exit {k}")
            ax.set_xlabel("confidence (max prob)")
        axes[0][0].set_ylabel("test samples")
        if title:
            fig.suptitle(title)
    return _closed(fig)


def plot_training(history: Sequence[Mapping[str, Any]], title: str | None = None) -> Figure:
    """Training curves: per-exit accuracy on cal by epoch (left) and the training loss (right).

    history: per-epoch rows with epoch, train_loss and cal_acc [K] (eelab.read_history).
    """
    with plt.rc_context(_STYLE):
        fig, (acc, loss) = plt.subplots(1, 2, figsize=(7.0, 2.8), layout="constrained")
        epochs = [row["epoch"] for row in history]
        k = max((len(row.get("cal_acc", [])) for row in history), default=0)
        for j in range(k):
            acc.plot(epochs, [row["cal_acc"][j] for row in history], "-o", ms=3, color=_PALETTE[j % 10],
                     label=f"exit {j}")
        acc.set_xlabel("epoch")
        acc.xaxis.set_major_locator(MaxNLocator(integer=True))
        loss.xaxis.set_major_locator(MaxNLocator(integer=True))
        acc.set_ylabel("cal accuracy (watched, never selected on)")
        _percent(acc)
        if k:
            acc.legend(loc="lower right")
        loss.plot(epochs, [row["train_loss"] for row in history], "-o", ms=3, color="black")
        loss.set_xlabel("epoch")
        loss.set_ylabel("training loss (sum over exits)")
        if title:
            fig.suptitle(title)
    return _closed(fig)


def plot_examples(examples: Any, columns: int = 8) -> Figure:
    """A grid of test images titled with the exit each took and its prediction (red when wrong).

    examples: a workbench.Examples; without images (dataset absent) the figure says how to get them.
    """
    with plt.rc_context(_STYLE):
        if examples.images is None:
            fig, ax = plt.subplots(figsize=(7.0, 1.2), layout="constrained")
            ax.axis("off")
            ax.text(0, 0.5, _wrap("Test images not shown: " + examples.message, 110), va="center", fontsize=8)
            plt.close(fig)
            return fig
        n = examples.images.shape[0]
        rows = -(-n // columns)
        fig, axes = plt.subplots(rows, columns, figsize=(1.1 * columns, 1.5 * rows), layout="constrained",
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
            ax.set_title(f"exit {examples.exits[i]}: {names[examples.predictions[i]]}{truth}", fontsize=7,
                         color="tab:red" if wrong else "black")
    return _closed(fig)


def plot_risk(table: pd.DataFrame, title: str | None = None) -> Figure:
    """Realised test risk against the risk level epsilon, one line per delta, with risk = epsilon dashed.

    table: workbench.risk_table rows (epsilon, delta, test_risk).
    """
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(4.4, 3.2), layout="constrained")
        for i, (delta, rows) in enumerate(table.groupby("delta", sort=True)):
            rows = rows.sort_values("epsilon")
            ax.plot(rows["epsilon"], rows["test_risk"], "-o", ms=3, color=_PALETTE[i % 10],
                    label=f"test risk, delta={delta:g}")
        top = float(table["epsilon"].max())
        ax.plot([0, top], [0, top], "--", color="0.4", lw=1, label="risk = epsilon (the bound on cal draws)")
        ax.set_xlabel("epsilon (tolerated accuracy loss vs. last exit)")
        ax.set_ylabel("realised risk on test")
        _percent(ax, x_too=True)
        ax.legend(loc="upper left")
        if title:
            ax.set_title(title)
    return _closed(fig)


def plot_sensitivity(table: pd.DataFrame, param: str, title: str | None = None) -> Figure:
    """Test accuracy (left axis) and compute saved (right axis) against one parameter, mean with a band of
    one standard deviation over seeds where there are several.

    table: workbench.sensitivity_table rows (param, accuracy[_std], compute_saved[_std]).
    """
    rows = table.sort_values(param)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(4.8, 3.2), layout="constrained")
        saved = ax.twinx()
        for axis, key, color, label in ((ax, "accuracy", _PALETTE[0], "test accuracy"),
                                        (saved, "compute_saved", _PALETTE[1], "compute saved (MACs)")):
            axis.plot(rows[param], rows[key], "-o", ms=3, color=color, label=label)
            spread = rows[f"{key}_std"].fillna(0.0)
            axis.fill_between(rows[param], rows[key] - spread, rows[key] + spread, color=color, alpha=0.2, lw=0)
            axis.set_ylabel(label, color=color)
            _percent(axis)
        saved.grid(False)
        saved.spines["right"].set_visible(True)
        ax.set_xlabel(param)
        n = int(rows["n_seeds"].max()) if "n_seeds" in rows and len(rows) else 1
        ax.set_title(title or (f"sensitivity to {param}" + (f" (mean and std over {n} seeds)" if n > 1 else "")))
    return _closed(fig)


def plot_dqn_training(traces: Mapping[str, Sequence[Mapping[str, Any]]], title: str | None = None) -> Figure:
    """DQN training, one colour per agent: the greedy agent's mean reward on cal against gradient updates
    (left), and where the trained agent leaves (right, exit fractions of cal samples at the last report).

    traces {agent label: DQNPolicy.info["trace"] rows (step, greedy_reward, exit_fractions)}.
    """
    with plt.rc_context(_STYLE):
        fig, (reward, exits) = plt.subplots(1, 2, figsize=(7.6, 3.0), layout="constrained")
        final = {}
        for i, (name, rows) in enumerate(traces.items()):
            if not rows:
                continue
            reward.plot([r["step"] for r in rows], [r["greedy_reward"] for r in rows], "-", lw=1.3,
                        color=_PALETTE[i % 10], label=name)
            final[name] = rows[-1]["exit_fractions"]
        reward.set_xlabel("gradient update")
        reward.set_ylabel("greedy mean reward on cal")
        if final:
            palette = [_PALETTE[i % 10] for i, name in enumerate(traces) if name in final]
            _exit_bars(exits, final, palette, "fraction of cal samples (trained agent)", legend=False)
            reward.legend(loc="lower right", ncols=2)
        if title:
            fig.suptitle(title)
    return _closed(fig)


def plot_split(table: pd.DataFrame, title: str | None = None) -> Figure:
    """An edge/cloud split per split point: images answered on the device and device ms (left), bytes sent (right).

    table: workbench.split_table rows (split_after, local_share, device_ms, mean_device_ms, bytes_fp32,
    bytes_bf16, bytes_int8, mean_bytes_fp32).
    """
    with plt.rc_context(_STYLE):
        fig, (left, right) = plt.subplots(1, 2, figsize=(8.4, 3.8), layout="constrained")
        k = table["split_after"]
        left.bar(k, table["local_share"], color=_PALETTE[0], alpha=0.7, label="answered on the device")
        left.set_ylim(0, 1)
        left.set_xlabel("split after stage k")
        left.set_ylabel("share of images")
        left.xaxis.set_major_locator(MaxNLocator(integer=True))
        _percent(left)
        ms = left.twinx()
        ms.plot(k, table["device_ms"], "-D", ms=4, color=_PALETTE[3], label="device ms, image going on")
        ms.plot(k, table["mean_device_ms"], "--o", ms=4, color=_PALETTE[2], label="device ms, mean per image")
        ms.set_ylim(0, 1.1 * float(table["device_ms"].max()))
        ms.set_ylabel("device time per image (ms)")
        ms.grid(False)
        lines, more = left.get_legend_handles_labels(), ms.get_legend_handles_labels()
        # legends below the panels: inside, they cover bars or the twin axis' ticks
        left.legend(lines[0] + more[0], lines[1] + more[1], loc="upper center", bbox_to_anchor=(0.5, -0.2),
                    frameon=False)
        for i, (col, name) in enumerate([("bytes_fp32", "fp32"), ("bytes_bf16", "bf16"), ("bytes_int8", "int8")]):
            right.bar(k + (i - 1) * 0.27, table[col], width=0.27, color=_PALETTE[4 + i], label=f"{name}, if sent")
        right.plot(k, table["mean_bytes_fp32"], "-o", ms=4, color="black", label="fp32, mean sent per image")
        right.set_xlabel("split after stage k")
        right.set_ylabel("bytes per image")
        right.xaxis.set_major_locator(MaxNLocator(integer=True))
        right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=2, frameon=False)
        if title:
            fig.suptitle(title)
    return _closed(fig)


def export_figure(fig: Figure, name: str, folder: str | Path = "figures") -> list[Path]:
    """Write a figure as folder/name.pdf and .svg (vector, text kept as text) and .png; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    # fonttype 42 / "none" keep text editable in PDF and SVG; no dates, so re-exports diff cleanly
    with plt.rc_context({"pdf.fonttype": 42, "svg.fonttype": "none", "svg.hashsalt": "eelab"}):
        for ext, meta in (("pdf", {"CreationDate": None}), ("svg", {"Date": None}), ("png", {})):
            path = folder / f"{name}.{ext}"
            fig.savefig(path, format=ext, metadata=meta)  # constrained layout already fits the labels
            paths.append(path)
    return paths


def export_table(table: pd.DataFrame, name: str, folder: str | Path = "figures", caption: str | None = None,
                 float_format: str = "{:.4f}") -> list[Path]:
    """Write a table as folder/name.csv (full precision) and folder/name.tex (booktabs); returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv, tex = folder / f"{name}.csv", folder / f"{name}.tex"
    table.to_csv(csv, index=False)
    styler = table.style.hide(axis="index").format(float_format.format, subset=table.select_dtypes("floating").columns,
                                                   na_rep="--")
    styler = styler.format_index(lambda c: str(c).replace("_", " "), axis=1)
    tex.write_text(styler.to_latex(hrules=True, caption=caption, position_float="centering" if caption else None,
                                   environment="table" if caption else None))
    return [csv, tex]


# ---- helpers ------------------------------------------------------------------------------------
def _exit_bars(ax: Any, fractions: Mapping[str, Sequence[float]], palette: Sequence[Any], ylabel: str,
               legend: bool = True) -> None:
    """Grouped bars on ax: one group per exit, one bar per entry of fractions {name: [K] fractions}."""
    frame = pd.DataFrame([{"policy": name, "exit": k, "fraction": f}
                          for name, values in fractions.items() for k, f in enumerate(values)])
    sns.barplot(frame, x="exit", y="fraction", hue="policy", ax=ax, palette=list(palette), legend=legend)
    ax.set_xlabel("exit")
    ax.set_ylabel(ylabel)
    _percent(ax)


def _percent(ax: Any, x_too: bool = False) -> None:
    """Show fractions as percent on the y axis (and x)."""
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    if x_too:
        ax.xaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))


def _closed(fig: Figure) -> Figure:
    """The figure, closed in pyplot: nothing shows twice in a notebook, and the figure is still drawn and saved."""
    plt.close(fig)
    return fig


def _wrap(text: str, width: int) -> str:
    """Text broken into lines of at most `width` characters."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


__all__ = ["export_figure", "export_table", "plot_class_heatmap", "plot_confidence", "plot_examples",
           "plot_dqn_training", "plot_exit_distribution", "plot_exit_profile", "plot_frontiers", "plot_reliability",
           "plot_risk", "plot_sensitivity", "plot_split", "plot_training"]
