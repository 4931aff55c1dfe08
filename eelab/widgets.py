"""Live panels for the notebooks: ipywidgets controls wired to precomputed operating points and plotly figures.

A control's callback only looks a row up in a sweep.PolicyGrid (every point fitted on cal and evaluated
on test once) and writes it into FigureWidget traces inside `fig.batch_update()`: no policy is fitted and no
network runs on a move. Each panel builds its figures in their initial state before wiring the controls
(a view created later shows that state). `paper_figures()` redraws a panel's current state with
eelab.plots for export, at one-column or two-column size; ExportControl writes them with a manifest
(paper_provenance() says which records and policies a panel shows, workbench.made_with what made any other
figure or table). Every policy trace takes its family's look from plots.plotly_style, the look the
matplotlib exports take from plots.policy_style, so a family has one colour in every panel and figure.
"""
from __future__ import annotations

import html
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import ipywidgets as widgets
import pandas as pd
import plotly.graph_objects as go
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from . import plots
from .figcheck import figure_problems
from .files import save_json, sha256_file
from .tables import export_table
from .errors import EelabError, EelabWarning
from .policies import Policy, show_value
from .sweep import PolicyGrid, fit_points, precompute_grid
from .workbench import (MadeWith, class_exits, cost_range, export_manifest, frontier_areas, grid_identity,
                        oracle_points, record_identity, risk_table)

# Training curves are one per exit, not per policy: a sequential palette (exit 0 light to the last exit dark).
_EXIT_COLORS = ("#9ecae1", "#6baed6", "#4292c6", "#2171b5", "#08519c", "#08306b")
_WIDE = {"description_width": "initial"}  # a control's label shown in full, never cut to "cost_wei..."
_FIT = widgets.Layout(width="auto")  # a button as wide as its text ("export to figures/", not "export to figur...")
_TABLE_STYLE = "border-spacing: 14px 2px; text-align: right"  # readout tables: room between the columns
_SIZE_CHOICES = (("as drawn", "default"), ("one column, 3.3 in", "column"), ("two columns, 6.9 in", "page"))
_TICK_DECIMALS = 4  # the most decimals a plotly tick label prints (plots' matplotlib ticks print as many)
_AXIS_TITLE = {"rel_macs": "mean MACs / plain network's MACs",
               "rel_ms": "mean latency / plain network's latency (measured, batch 1)"}


class PolicySliderPanel(widgets.VBox):
    """Sliders over precomputed policy grids: accuracy, compute saved, the exit distribution and the point on
    the frontier (with the oracle frontier and the static exits) follow each slider at once.

    grids: one PolicyGrid or several (e.g. alpha and max-prob threshold on one plot), one slider per grid
    parameter that varies; static: the static-exit grid, drawn as labelled squares; oracle: draw
    metrics.oracle_frontier of the test record; x: the cost column (rel_macs, or rel_ms with latency);
    classes: also a per-class exit heatmap of the first grid's selected point; save_to: a folder for a
    "save policy" button writing each grid's selected (fitted) policy as NAME.pt, the file `eelab predict`
    and `eelab bench` take with --policy.
    """

    export_label = "sliders"  # ExportControl prefixes a clashing file name with it

    def __init__(self, grids: PolicyGrid | Sequence[PolicyGrid], static: PolicyGrid | None = None,
                 oracle: bool = True, x: str = "rel_macs", classes: bool = False, title: str | None = None,
                 save_to: str | Path | None = None):
        grids = [grids] if isinstance(grids, PolicyGrid) else list(grids)
        if not grids:
            raise EelabError("a slider panel needs at least one policy grid")
        self.grids: dict[str, PolicyGrid] = {}
        for grid in grids:
            self.grids[grid.name if grid.name not in self.grids else f"{grid.name} {len(self.grids)}"] = grid
        self.static, self.x, self.title = static, x, title
        first = grids[0]
        if x not in first.table:
            raise EelabError(f"the grids have no {x} column; give latency= to precompute_grid for rel_ms")
        self.oracle = oracle_points(first, x) if oracle else None
        self.sliders: dict[str, dict[str, widgets.SelectionSlider]] = {
            name: {param: _slider(param, grid.values(param), _initial_value(grid, param)) for param in grid.params}
            for name, grid in self.grids.items()}
        self.selection = {name: self._lookup(name) for name in self.grids}
        self.styles = _family_styles(self.grids)
        # figures in their initial state first, then the wiring
        self.frontier = self._frontier_figure()
        self.exit_figure = self._exit_figure()
        self.class_figure = self._class_figure() if classes else None
        self.readout = widgets.HTML(self._readout())
        for name, sliders in self.sliders.items():
            for slider in sliders.values():
                slider.observe(lambda change, name=name: self._on_slide(name), names="value")
        controls = [widgets.HTML(f"<b>{html.escape(title)}</b>")] if title else []
        # a grid's name labels its row unless its one slider already says it ("alpha", not "alpha  alpha")
        controls += [widgets.HBox(([] if list(sliders) == [name] else
                                   [widgets.Label(name, layout=widgets.Layout(width="auto", min_width="90px"))])
                                  + list(sliders.values()))
                     for name, sliders in self.sliders.items() if sliders]
        self.save_to = None if save_to is None else Path(save_to)
        if self.save_to is not None:
            self.save_button = widgets.Button(description="save policy", icon="save", layout=_FIT,
                                              tooltip=f"write the selected policies into {self.save_to}/")
            self.saved = widgets.HTML()
            self.save_button.on_click(lambda button: self._on_save())
            controls.append(widgets.HBox([self.save_button, self.saved]))
        figures = [self.frontier, self.exit_figure] + ([self.class_figure] if self.class_figure is not None else [])
        super().__init__([*controls, self.readout, widgets.HBox(figures[:2]), *figures[2:]])

    def selected(self, name: str | None = None) -> int:
        """Row of the grid (default: the first) that the sliders point at."""
        return self.selection[name or next(iter(self.grids))]

    def selected_policy(self, name: str | None = None) -> Policy:
        """The fitted Policy the sliders point at (e.g. to save it for `eelab predict`)."""
        key = name or next(iter(self.grids))
        return self.grids[key].policies[self.selection[key]]

    def save_policies(self) -> list[Path]:
        """Write each grid's selected policy to save_to/NAME.pt (Policy.save); returns the files."""
        if self.save_to is None:
            raise EelabError("this panel has no save_to folder; give save_to= to save policies")
        return [self.grids[name].policies[i].save(self.save_to / f"{_file_name(name)}.pt")
                for name, i in self.selection.items()]

    def _on_save(self) -> None:
        try:
            paths = self.save_policies()
            self.saved.value = "saved " + ", ".join(f"<code>{html.escape(str(p))}</code>" for p in paths) + \
                " (use with <code>eelab predict CHECKPOINT IMAGE --policy FILE</code>)"
        except (EelabError, OSError) as e:
            self.saved.value = f"<span style='color:#b00'>not saved: {html.escape(str(e))}</span>"

    def paper_figures(self, size: str | float | None = None) -> dict[str, Figure]:
        """The panel's current state as matplotlib figures (eelab.plots), for export; size: "column", "page",
        inches, or None / "default" (each plot's own default)."""
        x, sized = self.x, _sized(size)
        selected = {name: dict(grid.table.loc[self.selection[name], [x, "accuracy"]])
                    for name, grid in self.grids.items()}
        figures = {
            "frontier": plots.plot_frontiers({name: grid.table for name, grid in self.grids.items()},
                                             oracle=self.oracle, static=None if self.static is None else
                                             self.static.table, selected=selected, x=x, **sized),
            "exit_distribution": plots.plot_exit_distribution(
                {name: grid.points[self.selection[name]]["exit_fractions"] for name, grid in self.grids.items()},
                **sized),
        }
        if self.class_figure is not None:
            name, grid = next(iter(self.grids.items()))
            point = grid.points[self.selection[name]]
            figures["class_exits"] = plots.plot_class_heatmap(class_exits(point), title=grid.table.at[
                self.selection[name], "label"], **sized)
        return figures

    def paper_tables(self) -> dict[str, pd.DataFrame]:
        """The selected operating points, one row per grid (test metrics, cal columns)."""
        rows = [grid.table.loc[self.selection[name]].rename(name) for name, grid in self.grids.items()]
        return {"operating_points": pd.DataFrame(rows).rename_axis("grid").reset_index()}

    def paper_provenance(self) -> dict[str, list]:
        """What an export's manifest says of this panel: its records, and each grid with the selected policy."""
        policies = [{**grid_identity(grid, self.selection[name]), "grid": name} for name, grid in self.grids.items()]
        return {"records": _grid_records(self.grids.values()), "policies": policies}

    # ---- wiring ---------------------------------------------------------------------------------
    def _lookup(self, name: str) -> int:
        return self.grids[name].find(**{param: s.value for param, s in self.sliders[name].items()})

    def _on_slide(self, name: str) -> None:
        self.selection[name] = self._lookup(name)
        self._draw(name)

    def _draw(self, name: str) -> None:
        """Write grid `name`'s selected row into every figure (cached values only)."""
        grid, i = self.grids[name], self.selection[name]
        row, point = grid.table.loc[i], grid.points[i]
        with self.frontier.batch_update():
            trace = _trace(self.frontier, f"{name} (selected)")
            trace.x, trace.y, trace.text = [float(row[self.x])], [float(row["accuracy"])], [row["label"]]
        with self.exit_figure.batch_update():
            _trace(self.exit_figure, name).y = list(point["exit_fractions"])
        if self.class_figure is not None and name == next(iter(self.grids)):
            with self.class_figure.batch_update():
                heat = _trace(self.class_figure, name)
                heat.z = point["per_class_exit_fractions"]
            self.class_figure.layout.title.text = f"exit fractions by class: {row['label']}"
        self.readout.value = self._readout()

    # ---- figures in their initial state ---------------------------------------------------------
    def _frontier_figure(self) -> go.FigureWidget:
        traces = []
        if self.oracle is not None:
            traces.append(_oracle_trace(self.oracle[self.x].tolist(), self.oracle["accuracy"].tolist()))
        if self.static is not None:
            traces.append(_static_trace(self.static, self.x))
        for name, grid in self.grids.items():
            rows, style = grid.table.sort_values(self.x, kind="stable"), self.styles[name]
            traces.append(go.Scatter(x=rows[self.x].tolist(), y=rows["accuracy"].tolist(), name=name,
                                     mode="lines+markers", text=rows["label"].tolist(), opacity=0.55,
                                     line=style["line"], marker={**style["marker"], "size": 5},
                                     hovertemplate="%{text}<br>acc %{y:.2%}, cost %{x:.1%}<extra></extra>"))
        for name, grid in self.grids.items():
            row = grid.table.loc[self.selection[name]]
            traces.append(go.Scatter(x=[float(row[self.x])], y=[float(row["accuracy"])], name=f"{name} (selected)",
                                     mode="markers", text=[row["label"]], showlegend=False,
                                     marker={**self.styles[name]["marker"], "size": 14,
                                             "line": {"width": 1.5, "color": "black"}},
                                     hovertemplate="%{text}<br>acc %{y:.2%}, cost %{x:.1%}<extra></extra>"))
        return _figure(traces, x_title=_AXIS_TITLE.get(self.x, self.x), y_title="test accuracy",
                       meta="eelab:frontier", width=560)

    def _exit_figure(self) -> go.FigureWidget:
        traces = []
        for name, grid in self.grids.items():
            point = grid.points[self.selection[name]]
            traces.append(go.Bar(x=list(range(point["k"])), y=list(point["exit_fractions"]), name=name,
                                 marker={"color": self.styles[name]["marker"]["color"]}))
        fig = _figure(traces, x_title="exit", y_title="fraction of test samples", meta="eelab:exits", width=380, x=None)
        fig.update_layout(barmode="group", xaxis={"dtick": 1, "tickformat": "d"}, yaxis={"range": [0, 1]})
        return fig

    def _class_figure(self) -> go.FigureWidget:
        name, grid = next(iter(self.grids.items()))
        point = grid.points[self.selection[name]]
        heat = go.Heatmap(z=point["per_class_exit_fractions"], x=[f"exit {k}" for k in range(point["k"])],
                          y=point["class_names"], zmin=0, zmax=1, colorscale="Viridis", name=name,
                          texttemplate="%{z:.0%}", showscale=False)
        fig = _figure([heat], x_title="", y_title="", meta="eelab:classes", width=520, x=None, y=None)
        fig.update_layout(height=120 + 22 * len(point["class_names"]), yaxis={"autorange": "reversed"},
                          title={"text": f"exit fractions by class: {grid.table.at[self.selection[name], 'label']}"})
        return fig

    def _readout(self) -> str:
        rows = []
        for name, grid in self.grids.items():
            row = grid.table.loc[self.selection[name]]
            extra = f"{float(row['rel_ms']):.1%}" if "rel_ms" in row else ""
            rows.append(f"<tr><td>{html.escape(name)}</td><td>{html.escape(str(row['label']))}</td>"
                        f"<td>{row['accuracy']:.2%}</td><td>{row['compute_saved']:+.1%}</td>"
                        f"<td>{row['mean_macs'] / 1e6:.2f} M</td><td>{row['effectiveness']:.2f}</td>"
                        f"<td>{row['cal_accuracy']:.2%}</td>" + (f"<td>{extra}</td>" if extra else "") + "</tr>")
        latency = "<th>latency / plain</th>" if any("rel_ms" in g.table for g in self.grids.values()) else ""
        return (f"<table class='eelab-readout' style='{_TABLE_STYLE}'><tr><th>grid</th><th>policy</th><th>test accuracy</th>"
                "<th>compute saved</th><th>mean MACs</th><th>effectiveness</th><th>cal accuracy</th>"
                f"{latency}</tr>{''.join(rows)}</table>")


class RiskControlPanel(PolicySliderPanel):
    """Epsilon and delta sliders over a precomputed risk-policy grid: the guarantee the fitted lambda carries,
    its realised risk on test against epsilon, and the operating point on the frontier.

    grid: precompute_grid("risk", cal, test, {"epsilon": [...], "delta": [...]}) (a product grid).
    """

    export_label = "risk"

    def __init__(self, grid: PolicyGrid, static: PolicyGrid | None = None, oracle: bool = True,
                 x: str = "rel_macs", title: str | None = None):
        self.risk = risk_table(grid)
        super().__init__([grid], static=static, oracle=oracle, x=x, title=title)
        self.guarantee = widgets.HTML(self._guarantee())
        self.risk_figure = self._risk_figure()
        self.children = (*self.children[:-1], self.guarantee,
                         widgets.HBox([self.frontier, self.risk_figure]), self.exit_figure)

    def _draw(self, name: str) -> None:
        super()._draw(name)
        i, rows = self.selection[name], self._same_delta()
        with self.risk_figure.batch_update():
            line = _trace(self.risk_figure, "test risk")
            line.x, line.y = rows["epsilon"].tolist(), rows["test_risk"].tolist()
            line.name = "test risk"
            current = _trace(self.risk_figure, "selected")
            current.x, current.y = [float(self.risk.at[i, "epsilon"])], [float(self.risk.at[i, "test_risk"])]
        self.guarantee.value = self._guarantee()

    def _same_delta(self) -> pd.DataFrame:
        i = self.selected()
        same = self.risk[(self.risk["delta"] == self.risk.at[i, "delta"]) & (self.risk["mode"] == self.risk.at[i, "mode"])]
        return same.sort_values("epsilon", kind="stable")

    def _risk_figure(self) -> go.FigureWidget:
        i, rows = self.selected(), self._same_delta()
        top = float(self.risk["epsilon"].max())
        style = self.styles[next(iter(self.grids))]
        traces = [go.Scatter(x=[0, top], y=[0, top], mode="lines", name="risk = epsilon",
                             line={"dash": "dash", "color": "#777777"}, hoverinfo="skip"),
                  go.Scatter(x=rows["epsilon"].tolist(), y=rows["test_risk"].tolist(), mode="lines+markers",
                             name="test risk", line=style["line"], marker={**style["marker"], "size": 6}),
                  go.Scatter(x=[float(self.risk.at[i, "epsilon"])], y=[float(self.risk.at[i, "test_risk"])],
                             mode="markers", name="selected", showlegend=False,
                             marker={**style["marker"], "size": 14, "line": {"width": 1.5, "color": "black"}})]
        return _figure(traces, x_title="epsilon (tolerated accuracy loss vs. last exit)",
                       y_title="realised risk on test", meta="eelab:risk", width=420)

    def _guarantee(self) -> str:
        row = self.risk.loc[self.selected()]
        ok = row["test_risk"] <= row["epsilon"]
        return (f"<b>guarantee</b> (fitted on cal): {html.escape(row['guarantee'])} &nbsp;·&nbsp; cal risk "
                f"{row['cal_risk']:.2%} &nbsp;·&nbsp; <b>realised test risk {row['test_risk']:.2%}</b> "
                f"({'within' if ok else 'above'} epsilon = {row['epsilon']:.2%})")

    def paper_figures(self, size: str | float | None = None) -> dict[str, Figure]:
        return {**super().paper_figures(size), "risk": plots.plot_risk(self.risk, **_sized(size))}

    def paper_tables(self) -> dict[str, pd.DataFrame]:
        return {**super().paper_tables(), "risk": self.risk}


class ComparePoliciesPanel(widgets.VBox):
    """Every policy's frontier on one accuracy-versus-cost plot with the oracle frontier and the static exits,
    a toggle switching the cost axis from MACs to measured latency, and the area under each frontier.

    grids {name: PolicyGrid} (a grid named static is drawn as exits, one named oracle as a star); latency
    is offered when every grid has rel_ms (precompute_grid(..., latency=latency_record(test, profile))).
    """

    export_label = "compare"

    def __init__(self, grids: Mapping[str, PolicyGrid], oracle: bool = True, title: str | None = None):
        if not grids:
            raise EelabError("the compare panel needs at least one policy grid")
        self.grids = dict(grids)
        first = next(iter(self.grids.values()))
        units = [("MACs", "rel_macs")]
        if all(g.latency is not None for g in self.grids.values()):
            units.append(("measured latency", "rel_ms"))
        self.cost = widgets.ToggleButtons(options=units, value="rel_macs", description="cost axis",
                                          style={**_WIDE, "button_width": "auto"})
        self.styles = _family_styles(self.grids)
        # both axes' fronts, oracle frontiers and areas are computed once, here
        self.fronts = {x: {name: grid.front(x=x) for name, grid in self.grids.items()} for _, x in units}
        self.oracles = {x: oracle_points(first, x) for _, x in units} if oracle else {}
        self.areas = frontier_areas(self.grids, [x for _, x in units], oracle=oracle)
        self.figure = self._figure("rel_macs")
        self.summary = widgets.HTML(self._summary())
        self.cost.observe(lambda change: self._on_cost(), names="value")
        head = [widgets.HTML(f"<b>{html.escape(title)}</b>")] if title else []
        super().__init__([*head, self.cost, self.figure, self.summary])

    def paper_figures(self, size: str | float | None = None) -> dict[str, Figure]:
        """Frontiers on every cost axis the panel offers, whatever the toggle shows (eelab.plots), for export:
        frontiers (MACs) and frontiers_latency (measured latency, when the grids have it); size as
        PolicySliderPanel.paper_figures'."""
        static = self.grids["static"].table if "static" in self.grids else None
        figures = {}
        for x, fronts in self.fronts.items():
            fronts = {n: f for n, f in fronts.items() if n not in ("static", "oracle")}
            name = "frontiers" if x == "rel_macs" else "frontiers_latency"
            figures[name] = plots.plot_frontiers(fronts, oracle=self.oracles.get(x), static=static, x=x,
                                                 **_sized(size))
        return figures

    def paper_provenance(self) -> dict[str, list]:
        """What an export's manifest says of this panel: its records and every grid's parameters."""
        return {"records": _grid_records(self.grids.values()),
                "policies": [{**grid_identity(grid), "grid": name} for name, grid in self.grids.items()]}

    def paper_tables(self) -> dict[str, pd.DataFrame]:
        """Area under each frontier on each cost axis."""
        table = self.areas.drop(index="oracle frontier", errors="ignore")
        table = table.rename(columns={"rel_macs": "area_macs", "rel_ms": "area_latency"})
        return {"areas": table.rename_axis("policy").reset_index()}

    def _on_cost(self) -> None:
        x = self.cost.value
        with self.figure.batch_update():
            for name, data in self._trace_data(x).items():
                trace = _trace(self.figure, name)
                trace.x, trace.y = data["x"], data["y"]
                if "text" in data:
                    trace.text = data["text"]
            self.figure.layout.xaxis.title.text = _AXIS_TITLE[x]
        self.summary.value = self._summary()

    def _trace_data(self, x: str) -> dict[str, dict[str, list]]:
        """x, y (and text) of every trace on cost axis x, from the cached fronts and tables."""
        data = {}
        if x in self.oracles:
            data["oracle frontier"] = {"x": self.oracles[x][x].tolist(), "y": self.oracles[x]["accuracy"].tolist()}
        for name, grid in self.grids.items():
            if name in ("static", "oracle"):
                data[name] = {"x": grid.table[x].tolist(), "y": grid.table["accuracy"].tolist()}
                continue
            front = self.fronts[x][name]
            data[name] = {"x": front[x].tolist(), "y": front["accuracy"].tolist(), "text": front["label"].tolist()}
            data[f"{name} (all points)"] = {"x": grid.table[x].tolist(), "y": grid.table["accuracy"].tolist(),
                                            "text": grid.table["label"].tolist()}
        return data

    def _figure(self, x: str) -> go.FigureWidget:
        data, traces = self._trace_data(x), []
        if "oracle frontier" in data:
            traces.append(_oracle_trace(**data["oracle frontier"]))
        for name in (n for n in self.grids if n not in ("static", "oracle")):
            style = self.styles[name]
            traces.append(go.Scatter(**data[f"{name} (all points)"], name=f"{name} (all points)", mode="markers",
                                     marker={**style["marker"], "size": 4}, opacity=0.3, showlegend=False,
                                     hovertemplate="%{text}<br>acc %{y:.2%}, cost %{x:.1%}<extra></extra>"))
            traces.append(go.Scatter(**data[name], name=name, mode="lines+markers", line=style["line"],
                                     marker={**style["marker"], "size": 6},
                                     hovertemplate="%{text}<br>acc %{y:.2%}, cost %{x:.1%}<extra></extra>"))
        if "static" in self.grids:
            traces.append(_static_trace(self.grids["static"], x, name="static"))
        if "oracle" in self.grids:
            traces.append(go.Scatter(**data["oracle"], name="oracle", mode="markers",
                                     marker={**plots.plotly_style("oracle")["marker"], "size": 12}))
        return _figure(traces, x_title=_AXIS_TITLE[x], y_title="test accuracy", meta="eelab:compare", width=760,
                       height=460)

    def _summary(self) -> str:
        x = self.cost.value
        lo, hi = cost_range(next(iter(self.grids.values())), x)
        areas = self.areas[x]
        # an area is the mean accuracy over the cost range: a percentage, as the exported table prints it
        cells = "".join(f"<tr><td>{html.escape(name)}</td><td>{area:.2%}</td></tr>" for name, area in areas.items()
                        if name != "oracle frontier")
        bound = (f"<tr><td>oracle frontier (bound)</td><td>{areas['oracle frontier']:.2%}</td></tr>"
                 if "oracle frontier" in areas else "")
        return (f"<table class='eelab-readout' style='{_TABLE_STYLE}'><tr><th>policy</th>"
                f"<th>area under frontier over cost {lo:.0%} to {hi:.0%} (mean test accuracy)"
                f"</th></tr>{cells}{bound}</table>")


class TrainingPanel(widgets.VBox):
    """Model, dataset and epochs controls and a train button that trains a new run into runs/NAME/ (progress
    bar; per-exit cal accuracy curves growing each epoch), then writes its cal and test records there.

    checkpoint: the run shown first (its history.json curves); after training, `checkpoint` is the new run.
    config: the TrainConfig the controls start from (default: the checkpoint's, else TrainConfig()).
    record_limit: record a seeded subset of N samples of each split (smoke runs).
    """

    def __init__(self, checkpoint: str | Path, runs: str | Path = "runs", config: Any = None,
                 record_limit: int | None = None):
        from .data import DATASETS
        from .models import FACTORIES
        from .checkpoint import read_checkpoint_config, read_history
        from .training import TrainConfig

        self.checkpoint, self.runs, self.record_limit = Path(checkpoint), Path(runs), record_limit
        try:
            saved = read_checkpoint_config(self.checkpoint)
            history = read_history(self.checkpoint)
            shown = f"showing {html.escape(str(self.checkpoint))} ({len(history)} epochs)"
        except EelabError as e:
            saved, history, shown = None, [], f"no checkpoint to show yet: {html.escape(str(e))}"
        if config is None:
            config = TrainConfig.from_dict(saved["train"]) if saved else TrainConfig()
        self.config = config
        self.model = widgets.Dropdown(options=sorted(set(FACTORIES) | {config.model.name}), value=config.model.name,
                                      description="model", style=_WIDE)
        self.dataset = widgets.Combobox(options=[d for d in DATASETS if d != "folder:PATH"], value=config.dataset,
                                        description="dataset", ensure_option=False, style=_WIDE,
                                        placeholder="cifar10-jpeg, cifar10, folder:PATH, ...")
        self.epochs = widgets.IntSlider(value=config.epochs, min=1, max=max(100, config.epochs), description="epochs",
                                        style=_WIDE)
        self.train_samples = widgets.IntText(value=config.train_samples or 0, description="train images (0: all)",
                                             tooltip="0: the whole train split (minus cal)", style=_WIDE)
        self.name = widgets.Text(value=self._default_name(), description="run name", style=_WIDE)
        self.button = widgets.Button(description=f"train into {self.runs.name}/NAME", button_style="primary",
                                     icon="play", layout=_FIT)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="progress", style=_WIDE)
        self.status = widgets.HTML(shown)
        self.curves = self._curves(history)
        for control in (self.model, self.dataset, self.epochs):
            control.observe(lambda change: setattr(self.name, "value", self._default_name()), names="value")
        self.button.on_click(lambda button: self._on_click())
        super().__init__([widgets.HBox([self.model, self.dataset]), widgets.HBox([self.epochs, self.train_samples]),
                          widgets.HBox([self.name, self.button]), self.progress, self.status, self.curves])

    def train(self) -> Path:
        """Train runs/NAME with the controls' settings, then record its cal and test splits; returns the run."""
        from .training import train_and_record

        name = self.name.value.strip()
        if not name or "/" in name or name.startswith("."):
            raise EelabError(f"run name {name!r} must be a plain folder name (it goes under {self.runs}/)")
        out = self.runs / name
        cfg = self._train_config()
        self.progress.max, self.progress.value = cfg.epochs + 2, 0
        self._history: list[dict] = []
        with self.curves.batch_update():  # keep the traces (a shown figure updates them in place), empty them
            for trace in self.curves.data:
                trace.x, trace.y = [], []
        self.status.value = f"training {html.escape(str(out))} ..."
        train_and_record(cfg, out, self.record_limit, callback=self._on_epoch, on_split=self._on_split)
        self.progress.value += 1  # the test split's record is written
        self.checkpoint = out
        self.status.value = (f"done: {html.escape(str(out))} with cal.pt and test.pt. Re-run the cells below: "
                             f"they read this panel's checkpoint, which is now this run.")
        return out

    def _on_split(self, split: str) -> None:
        """Recording callback: the previous step is done, say which split is recorded now."""
        if split == "test":
            self.progress.value += 1  # the cal split's record is written
        self.status.value = f"recording the {split} split of {html.escape(str(self.runs / self.name.value.strip()))} ..."

    def _train_config(self):
        """The starting TrainConfig with the controls' model, dataset, epochs and train images."""
        samples = int(self.train_samples.value)
        return replace(self.config, model=replace(self.config.model, name=self.model.value),
                       dataset=self.dataset.value.strip(), epochs=int(self.epochs.value),
                       train_samples=samples if samples > 0 else None, init=None, heads_only=False)

    def _on_click(self) -> None:
        self.button.disabled = True
        try:
            self.train()
        except EelabError as e:  # a callback's exception would vanish into the log: show it here
            self.status.value = f"<span style='color:#b00'>not trained: {html.escape(str(e))}</span>"
        finally:
            self.button.disabled = False

    def _on_epoch(self, row: dict) -> None:
        """Training callback: one more point on every exit's curve and one more step of the bar."""
        self._history.append(row)
        epochs = [r["epoch"] for r in self._history]
        accs = [r.get("cal_acc", []) for r in self._history]
        k = len(accs[-1])
        with self.curves.batch_update():
            while len(self.curves.data) < k:
                j = len(self.curves.data)
                self.curves.add_scatter(x=[], y=[], mode="lines+markers", name=f"exit {j}",
                                        line={"color": _exit_color(j, k)})
            for j in range(k):
                self.curves.data[j].x, self.curves.data[j].y = epochs, [a[j] for a in accs]
        self.progress.value = len(self._history)
        self.status.value = (f"epoch {row['epoch']}/{self.epochs.value}: loss {row['train_loss']:.3f}, cal accuracy "
                             + " / ".join(f"{a:.1%}" for a in accs[-1]))

    def _curves(self, history: list[dict]) -> go.FigureWidget:
        k = max((len(r.get("cal_acc", [])) for r in history), default=0)
        traces = [go.Scatter(x=[r["epoch"] for r in history], y=[r["cal_acc"][j] for r in history],
                             mode="lines+markers", name=f"exit {j}", line={"color": _exit_color(j, k)})
                  for j in range(k)]
        return _figure(traces, x_title="epoch", y_title="cal accuracy (watched, never selected on)",
                       meta="eelab:training", width=620, x="num")

    def _default_name(self) -> str:
        raw = f"{self.model.value}-{self.dataset.value}-{self.epochs.value}ep"
        return re.sub(r"[^A-Za-z0-9._-]+", "_", raw.replace("folder:", "folder-")).strip("_")


class DQNTrainingPanel(widgets.VBox):
    """Trains one DQN exit agent per cost_weight on the cal record, with live plots: the greedy agent's
    mean reward on cal as the updates go (one curve per cost_weight, each in the dqn family's colour, a line
    style per agent) and where the agent in training leaves.

    train() (or the button) returns the agents' PolicyGrid (fitted on cal, scored on test; also kept as
    .grid) for a PolicySliderPanel, whose cost_weight slider then picks the agent. cost_weights: default
    DQNPolicy.grid's nine; params: other DQNPolicy parameters (steps, hidden, seed, ...); cache: the folder
    sweep.fit_points(..., cache=) uses, so an agent trained here is found again there (notebook 04)
    and here, its stored trace drawn at once instead of training again; every: updates between reports.
    """

    export_label = "dqn"

    def __init__(self, cal: Any, test: Any, cost_weights: Sequence[float] | None = None,
                 params: Mapping[str, Any] | None = None, cache: str | Path | None = None, every: int = 25,
                 latency: Any = None):
        from .policies.dqn import DQNPolicy

        self.cal, self.test, self.latency, self.cache, self.every = cal, test, latency, cache, every
        self.params = dict(params or {})
        grid = DQNPolicy.grid(cal)
        self.cost_weights = [float(p["cost_weight"]) for p in grid] if cost_weights is None else \
            [float(w) for w in cost_weights]
        if not self.cost_weights:
            raise EelabError("DQNTrainingPanel needs at least one cost weight")
        DQNPolicy(cost_weight=self.cost_weights[0], **self.params)  # bad parameters fail here, in one line
        self.traces: dict[str, list[dict]] = {}
        self.grid: PolicyGrid | None = None
        self.progress = widgets.IntProgress(value=0, min=0, max=len(self.cost_weights), description="agents",
                                            style=_WIDE)
        self.status = widgets.HTML(f"{len(self.cost_weights)} agents to train (cost_weight = "
                                   + ", ".join(f"{w:g}" for w in self.cost_weights) + ")")
        self.button = widgets.Button(description="train agents", button_style="primary", icon="play", layout=_FIT)
        self.button.on_click(lambda button: self._on_click())
        self.reward_figure = _figure([], x_title="gradient update", y_title="greedy mean reward on cal",
                                     meta="eelab:dqn-reward", width=520, x="num", y="num")
        self.exit_figure = _figure([go.Bar(x=[f"exit {k}" for k in range(cal.k)], y=[0.0] * cal.k,
                                           name="agent in training",
                                           marker={"color": plots.plotly_style("dqn")["marker"]["color"]})],
                                   x_title="exit", y_title="share of cal samples leaving here",
                                   meta="eelab:dqn-exits", width=420, x=None)
        super().__init__([widgets.HBox([self.button, self.progress]), self.status,
                          widgets.HBox([self.reward_figure, self.exit_figure])])

    def train(self) -> PolicyGrid:
        """Train (or find in the cache) every agent through sweep.fit_points, drawing as it goes; returns their
        PolicyGrid (fitted on cal, scored on test)."""
        from .policies.dqn import DQNPolicy

        labels = [_agent_label(w) for w in self.cost_weights]
        self.progress.value = 0

        def fit(i: int, policy: Policy) -> Policy:
            self.status.value = f"training agent {labels[i]} ({i + 1}/{len(self.cost_weights)}) ..."
            policy.fit(self.cal, callback=lambda row: self._on_report(labels[i], i, row), every=self.every)
            self.progress.value += 1
            return policy

        def found(i: int, policy: Policy) -> None:
            self.status.value = f"agent {labels[i]}: found in the cache, not retrained"
            for row in policy.info.get("trace", []):
                self._on_report(labels[i], i, row)
            self.progress.value += 1

        points = [{"cost_weight": w, **self.params} for w in self.cost_weights]
        policies = fit_points(DQNPolicy, points, self.cal, cache=self.cache, fit=fit, found=found,
                              progress=False)  # the panel's own bar and curves show it
        self.status.value = "scoring the agents on test ..."
        self.grid = precompute_grid(policies, self.cal, self.test, grid=[{"cost_weight": w} for w in self.cost_weights],
                                    name="dqn", latency=self.latency, progress=False)
        self.status.value = (f"{len(policies)} agents ready: fitted on cal, scored on test; pick one with the "
                             f"cost_weight slider below")
        return self.grid

    def paper_figures(self, size: str | float | None = None) -> dict[str, Figure]:
        return {"dqn_training": plots.plot_dqn_training(self.traces, **_sized(size))}

    def paper_provenance(self) -> dict[str, list]:
        """What an export's manifest says of this panel: the records and every agent's parameters."""
        entry: dict[str, Any] = {"grid": "dqn", "family": "dqn", "points": len(self.cost_weights),
                                 "parameters": {"cost_weight": list(self.cost_weights)}, "agent": dict(self.params)}
        if self.grid is not None:
            entry = {**grid_identity(self.grid), "agent": dict(self.params),
                     "agents": [{"params": dict(p.params), "fitted": dict(p.summary())} for p in self.grid.policies]}
        return {"records": [r for r in (self.cal, self.test, self.latency) if r is not None], "policies": [entry]}

    def _on_click(self) -> None:
        self.button.disabled = True
        try:
            self.train()
        except EelabError as e:
            self.status.value = f"<span style='color:#b00'>not trained: {html.escape(str(e))}</span>"
        finally:
            self.button.disabled = False

    def _on_report(self, label: str, i: int, row: Mapping[str, Any]) -> None:
        """One training report: a point on this agent's reward curve, and its current exit distribution."""
        rows = self.traces.setdefault(label, [])
        if rows and row["step"] <= rows[-1]["step"]:  # the same agent drawn again: start its curve anew
            rows.clear()
        rows.append(dict(row))
        with self.reward_figure.batch_update():
            try:
                curve = _trace(self.reward_figure, label)
            except KeyError:
                self.reward_figure.add_scatter(x=[], y=[], mode="lines", name=label,
                                               line=plots.plotly_style("dqn", member=i)["line"])
                curve = self.reward_figure.data[-1]
            curve.x, curve.y = [r["step"] for r in rows], [r["greedy_reward"] for r in rows]
        # title and bars from this one report; inside batch_update a trace reads back its old values, so the
        # title is never read from the trace (it lagged one report: "update 575" over the data of 600)
        title = f"agent {label} at update {row['step']}"
        with self.exit_figure.batch_update():
            bars = self.exit_figure.data[0]
            bars.y = list(row["exit_fractions"])
            bars.name = title
            bars.marker.color = plots.plotly_style("dqn", member=i)["marker"]["color"]
            self.exit_figure.layout.title = {"text": title, "font": {"size": 12}}


class ExportControl(widgets.VBox):
    """A button writing figures (PDF, SVG, PNG via plots.export_figure) and tables (CSV, LaTeX) into a folder at a
    chosen figure size, with a manifest beside them ({prefix}manifest.json) so each file can be traced and remade.

    sources: panels (their paper_figures(size) and paper_tables(), drawn at export time, so the export shows the
    sliders' current state; paper_provenance() for the manifest) or dicts {name: matplotlib Figure |
    DataFrame} (a figure a plot_* drew is drawn again at the chosen size, plots.redraw); prefix starts every
    file name. records: exit records the dict sources come from (the panels name theirs); checkpoint: the
    directory they were loaded from, so the manifest gives their file paths. made_with: {name:
    workbench.made_with(...)}, name an exported figure or table (as its file is named, without prefix) or a
    panel's export_label (all of its files): the policies and notebook constants that produced it, written into
    the manifest entry (made_with) of each of its files, beside what a panel shows. size: the size menu's first
    choice: "default" (each figure as drawn), "column" (3.3 in) or "page" (6.9 in).
    A figure figcheck.figure_problems finds fault with is written all the same (the user's data may trip the
    checker), and its problems are kept in the manifest (figure_problems), shown below the button and warned.
    No export writes a file twice: a name two sources give is prefixed with the panel's export_label (the risk
    panel's operating_points become risk_operating_points); a clash that leaves, or a made_with name that is
    not exported, is refused before anything is written. export() and the button run the same code.
    """

    def __init__(self, *sources: Any, folder: str | Path = "figures", prefix: str = "",
                 records: Sequence[Any] = (), checkpoint: str | Path | None = None,
                 made_with: Mapping[str, MadeWith] | None = None, size: str = "default"):
        if size not in [value for _, value in _SIZE_CHOICES]:
            raise EelabError(f"figure size must be one of {', '.join(v for _, v in _SIZE_CHOICES)}, got {size!r}")
        self.sources, self.folder, self.prefix = sources, Path(folder), prefix
        self.records, self.checkpoint = list(records), None if checkpoint is None else Path(checkpoint)
        self.made_with = dict(made_with or {})
        self.button = widgets.Button(description=f"export to {self.folder.name}/", icon="download", layout=_FIT,
                                     tooltip=f"write figures, tables and {prefix}manifest.json into {self.folder}/")
        self.size = widgets.Dropdown(options=_SIZE_CHOICES, value=size, description="figure size", style=_WIDE)
        self.progress = widgets.IntProgress(value=0, min=0, max=1, description="exporting", style=_WIDE,
                                            layout=widgets.Layout(visibility="hidden"))
        self.output = widgets.HTML()
        self.button.on_click(lambda button: self._on_click())
        super().__init__([widgets.HBox([self.button, self.size]), self.progress, self.output])

    @property
    def manifest_path(self) -> Path:
        return self.folder / f"{self.prefix}manifest.json"

    def export(self, progress: bool = True) -> list[Path]:
        """Write every source's figures (at the size menu's size) and tables, then the manifest; returns the files
        written, the manifest last (each once: len(returned) files are on disk, the manifest lists all the others
        with sha256 and, per file, what made it). The control's bar follows the export; progress: a tqdm.auto
        bar too (the button's callback has no cell to show one in, so it uses the control's bar only)."""
        self.progress.value, self.progress.max = 0, len(self.sources) + 1  # drawing; writing is added once planned
        self.progress.layout.visibility = "visible"
        bar = tqdm(total=self.progress.max, desc="drawing the figures", unit="step", leave=False, delay=0.5,
                   disable=not progress)

        def advance(desc: str) -> None:
            bar.set_description(desc, refresh=False)
            bar.update(1)
            self.progress.value += 1

        try:
            plan = self._plan(self.size.value, advance)
            made = self._made_with(plan)  # a made_with name that is not exported is refused before any write
            bar.total = self.progress.max = len(self.sources) + len(plan) + 1
            written, about, problems = self._write(plan, made, advance)
            records, policies = self._provenance()
            manifest = export_manifest(written, records=records, policies=policies, about=about)
            manifest.update(prefix=self.prefix, folder=str(self.folder.resolve()), size=self.size.value,
                            figure_problems=problems)
            save_json(_jsonable(manifest), self.manifest_path)
            written.append(self.manifest_path)
            advance("manifest written")
        finally:
            bar.close()
            self.progress.layout.visibility = "hidden"
        faulty = {name: found for name, found in problems.items() if found}
        for name, found in faulty.items():  # a cell that calls export() shows these; the button shows them below
            warnings.warn(f"figure {name} is not ready to print: {_first(found)}; written all the same, listed "
                          f"in {self.manifest_path.name}", EelabWarning, stacklevel=2)
        self.output.value = f"wrote {len(written)} files: " + ", ".join(html.escape(p.name) for p in written) + \
            "".join(f"<br><span style='color:#b00'>check {html.escape(name)}: {html.escape(_first(found))}</span>"
                    for name, found in faulty.items())
        return written

    def _write(self, plan: list[tuple[str, Any, Any]], made: dict[str, dict[str, Any]],
               advance: Callable[[str], None]) -> tuple[list[Path], dict[str, dict[str, Any]], dict[str, list[str]]]:
        """Write the planned figures and tables: (files, each file's manifest entry additions by file name, each
        figure's figure_problems by prefixed name)."""
        written: list[Path] = []
        about: dict[str, dict[str, Any]] = {}
        problems: dict[str, list[str]] = {}
        for name, item, _ in plan:
            if isinstance(item, Figure):
                # what a reviewer would reject, per figure: written anyway (the user's data may trip the checker)
                problems[self.prefix + name] = figure_problems(item)
                files = plots.export_figure(item, self.prefix + name, self.folder, check=False)
                extra = {"made_with": made[name],
                         "size_inches": [round(float(v), 3) for v in item.get_size_inches()]}
            else:
                files = export_table(item, self.prefix + name, self.folder)
                extra = {"made_with": made[name]}
            about.update({path.name: extra for path in files})
            written += files
            advance(f"wrote {self.prefix}{name}")
        if len(set(written)) != len(written):  # _plan made the names distinct; a writer adding files must not undo it
            raise EelabError(f"export wrote a file twice: {sorted(p.name for p in written if written.count(p) > 1)}")
        return written, about, problems

    def _plan(self, size: str, advance: Callable[[str], None]) -> list[tuple[str, Any, Any]]:
        """(file name without prefix and extension, figure or table, its source) triples, no file twice, built
        before any write (a figure and a table may share a name: name.pdf/.svg/.png and name.csv/.tex differ);
        figures drawn at size."""
        entries = []  # (label of the source or None, name, figure or table, source)
        for source in self.sources:
            label = getattr(source, "export_label", None)
            figures, tables = _exports(source, size)
            entries += [(label, name, item, source) for name, item in (*figures.items(), *tables.items())]
            advance(f"drew {label or 'figures and tables'}")

        def targets(names: list[str]) -> list[set[str]]:
            return [{f"{n}.{ext}" for ext in (("pdf", "svg", "png") if isinstance(e[2], Figure) else ("csv", "tex"))}
                    for n, e in zip(names, entries)]

        def clashes(names: list[str]) -> set[int]:
            files = targets(names)
            return {i for i in range(len(names)) for j in range(len(names)) if i != j and files[i] & files[j]}

        names = [name for _, name, _, _ in entries]
        names = [f"{entries[i][0]}_{n}" if i in clashes(names) and entries[i][0] else n for i, n in enumerate(names)]
        left = clashes(names)
        if left:
            raise EelabError("export refused, nothing written: two sources give the file name(s) "
                             + ", ".join(sorted({self.prefix + names[i] for i in left}))
                             + "; rename one (a dict's keys are its file names)")
        return [(n, e[2], e[3]) for n, e in zip(names, entries)]

    def _made_with(self, plan: list[tuple[str, Any, Any]]) -> dict[str, dict[str, Any]]:
        """{exported name: its made_with entry}: the policies its panel shows (paper_provenance) and, from
        self.made_with under its name or its panel's export_label, further policies and notebook constants."""
        labels = {getattr(s, "export_label", None) for s in self.sources} - {None}
        unknown = sorted(set(self.made_with) - {name for name, _, _ in plan} - labels)
        if unknown:
            raise EelabError(f"export refused, nothing written: made_with names {', '.join(unknown)}, which this "
                             f"export does not write; use one of {', '.join(sorted({n for n, _, _ in plan} | labels))}")
        given = {key: value.identity() for key, value in self.made_with.items()}
        shown = {id(s): self._shown(s) for s in self.sources}
        made = {}
        for name, _, source in plan:
            entry: dict[str, Any] = {"policies": list(shown[id(source)]), "constants": {}}
            for key in dict.fromkeys([getattr(source, "export_label", None), name]):  # each once (risk's risk)
                if key in given:
                    entry["policies"] += [{"source": key, **p} for p in given[key]["policies"]]
                    entry["constants"].update(given[key]["constants"])
                    entry.update({k: v for k, v in given[key].items() if k not in ("policies", "constants")})
            made[name] = entry
        return made

    def _shown(self, source: Any) -> list[dict[str, Any]]:
        """The policies a panel shows (its paper_provenance), each with the panel's label as source; [] for a dict."""
        if not hasattr(source, "paper_provenance"):
            return []
        label = getattr(source, "export_label", type(source).__name__)
        return [{"source": label, **entry} for entry in source.paper_provenance()["policies"]]

    def _provenance(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(records, policies) for the manifest: the given records, the panels' and those of the made_with
        grids, each record once; every policy a panel shows and every made_with policy (source: its name)."""
        records, policies = list(self.records), []
        for source in self.sources:
            if hasattr(source, "paper_provenance"):
                records += source.paper_provenance()["records"]
                policies += self._shown(source)
        for key, value in self.made_with.items():
            records += value.records()
            policies += [{"source": key, **p} for p in value.identity()["policies"]]
        unique = list({id(r): r for r in records}.values())
        return [record_identity(r, self._record_path(r)) for r in unique], policies

    def _record_path(self, record: Any) -> Path | None:
        """checkpoint/SPLIT.pt when that file is there and the record comes from it: the checkpoint's model.pt
        (where there is one to compare), no exit ensemble applied."""
        split = record.meta.get("split")
        if self.checkpoint is None or split not in ("cal", "test") or record.meta.get("ensemble_sha256"):
            return None
        path, weights = self.checkpoint / f"{split}.pt", self.checkpoint / "model.pt"
        recorded_on = record.meta.get("checkpoint_sha256")
        if recorded_on and weights.is_file() and sha256_file(weights) != recorded_on:
            return None  # a record of another checkpoint (e.g. another seed's)
        return path.resolve() if path.is_file() else None

    def _on_click(self) -> None:
        self.button.disabled = True
        try:
            with warnings.catch_warnings():  # shown below the button; a callback's warning goes to no cell
                warnings.simplefilter("ignore", EelabWarning)
                self.export(progress=False)
        except (EelabError, OSError) as e:
            self.output.value = f"<span style='color:#b00'>export failed: {html.escape(str(e))}</span>"
        finally:
            self.button.disabled = False


# ---- helpers ------------------------------------------------------------------------------------
def _exports(source: Any, size: str = "default") -> tuple[dict[str, Figure], dict[str, pd.DataFrame]]:
    """(figures, tables) of a panel or a dict of figures and tables, the figures at size ("default": as drawn)."""
    if hasattr(source, "paper_figures"):
        tables = source.paper_tables() if hasattr(source, "paper_tables") else {}
        return source.paper_figures(**_sized(size)), tables
    if isinstance(source, Mapping):
        return ({k: plots.redraw(v, size) for k, v in source.items() if isinstance(v, Figure)},
                {k: v for k, v in source.items() if isinstance(v, pd.DataFrame)})
    raise EelabError(f"ExportControl cannot export a {type(source).__name__}; give a panel or a dict of figures")


def _first(problems: Sequence[str]) -> str:
    """A figure's first problem, and how many more there are."""
    return problems[0] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")


def _sized(size: str | float | None) -> dict[str, Any]:
    """A plot_* size keyword: {} for None or "default" (the plot's own default), else {"size": size}."""
    return {} if size in (None, "default") else {"size": size}


def _slider(param: str, values: list[Any], value: Any) -> widgets.SelectionSlider:
    """A slider over a grid parameter's values, its name shown in full."""
    return widgets.SelectionSlider(options=[(show_value(v), v) for v in values], value=value, description=param,
                                   continuous_update=True, layout=widgets.Layout(width="440px"), style=_WIDE)


def _initial_value(grid: PolicyGrid, param: str) -> Any:
    """The grid value nearest the family's default for param (else the middle one)."""
    values = grid.values(param)
    spec = type(grid.policies[0]).PARAMS.get(param) if grid.policies else None
    default = getattr(spec, "default", None)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        nums = [v for v in values if isinstance(v, (int, float))]
        if nums:
            return min(nums, key=lambda v: (abs(v - default), v))
    return default if default in values else values[len(values) // 2]


def _file_name(name: str) -> str:
    """A grid name as a plain file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "policy"


def _agent_label(cost_weight: float) -> str:
    """An agent's name in legends: its family first, so plots.policy_style gives it dqn's colour."""
    return f"dqn cost_weight={cost_weight:g}"


def _family_styles(grids: Mapping[str, PolicyGrid]) -> dict[str, dict[str, Any]]:
    """{grid name: plots.plotly_style}: each grid in its family's look; a second grid of one family (e.g. two
    alpha seeds) keeps the colour with the next member's line style and marker."""
    seen: dict[str, int] = {}
    styles = {}
    for name in grids:
        family = plots.policy_family(name)
        styles[name] = plots.plotly_style(name, member=seen.get(family, 0))
        seen[family] = seen.get(family, 0) + 1
    return styles


def _grid_records(grids: Any) -> list[Any]:
    """The cal, test and latency records of some grids, each once."""
    records = [r for g in grids for r in (g.cal, g.test, g.latency) if r is not None]
    return list({id(r): r for r in records}.values())


def _exit_color(j: int, k: int) -> str:
    """Exit j of k on the sequential palette, the last exit darkest."""
    n = len(_EXIT_COLORS)
    return _EXIT_COLORS[min(n - 1, round(j * (n - 1) / max(k - 1, 1)))]


def _jsonable(value: Any) -> Any:
    """value with tuples as lists, non-finite floats as None and other objects (tensors, paths) as plain
    values or text, so the manifest is strict JSON."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def _trace(fig: go.FigureWidget, name: str) -> Any:
    """The trace of a figure with this name."""
    for trace in fig.data:
        if trace.name == name:
            return trace
    raise KeyError(f"no trace named {name!r}")


def _static_trace(grid: PolicyGrid, x: str, name: str = "static exits") -> go.Scatter:
    """The static exits as labelled squares; the costliest one's label sits to its left, inside the plot (to
    its right, "exit 3" was cut at the figure's edge)."""
    xs = grid.table[x].tolist()
    right = max(xs, default=0.0)
    return go.Scatter(x=xs, y=grid.table["accuracy"].tolist(), name=name, mode="markers+text",
                      text=[f"exit {int(e)}" for e in grid.table["exit"]], cliponaxis=False,
                      textposition=["bottom left" if v >= right else "bottom right" for v in xs],
                      marker={**plots.plotly_style("static")["marker"], "size": 8},
                      hovertemplate="%{text}<br>acc %{y:.2%}, cost %{x:.1%}<extra></extra>")


def _oracle_trace(x: list, y: list) -> go.Scatter:
    """The oracle frontier (a bound: it reads the labels), in the oracle family's look."""
    return go.Scatter(x=x, y=y, name="oracle frontier", mode="lines", hoverinfo="skip",
                      line={**plots.plotly_style("oracle")["line"], "shape": "hv"})


def _figure(traces: list, x_title: str, y_title: str, meta: str, width: int, height: int = 360,
            x: str | None = "pct", y: str | None = "pct") -> go.FigureWidget:
    """A FigureWidget with eelab's layout; meta names it for the browser test; x and y: each axis's tick labels
    (_tick_format: "pct", "num" or None)."""
    fig = go.FigureWidget(data=traces)
    fig.update_layout(template="plotly_white", width=width, height=height, meta=meta,
                      margin={"l": 60, "r": 10, "t": 30, "b": 50}, legend={"orientation": "h", "y": -0.25},
                      xaxis={"title": {"text": x_title}, **_tick_format(x)},
                      yaxis={"title": {"text": y_title}, **_tick_format(y)})
    return fig


def _tick_format(kind: str | None) -> dict[str, Any]:
    """Plotly tick labels that print their values exactly, as plots' matplotlib ticks do: plotly steps linear
    ticks by 1, 2 or 5 times a power of ten, so the step (dtick) picks the decimals (tickformatstops), and ticks
    0.5 % apart read 0.5%, 1.0%, 1.5%, never 0%, 1%, 2%. kind: "pct" (fractions as percent), "num", or None
    (categories, shown as given)."""
    if kind is None:
        return {"tickformat": "", "tickformatstops": []}
    scale = 100.0 if kind == "pct" else 1.0
    stops = []
    for decimals in range(_TICK_DECIMALS + 1):  # a step of 10^-d (in printed units) and above needs d decimals
        lo = None if decimals == _TICK_DECIMALS else round(0.95 * 10.0 ** -decimals / scale, 12)  # 0.95: slack
        hi = None if decimals == 0 else round(0.95 * 10.0 ** (1 - decimals) / scale, 12)
        stops.append({"dtickrange": [lo, hi], "value": f".{decimals}%" if kind == "pct" else f",.{decimals}f"})
    return {"tickformat": stops[0]["value"], "tickformatstops": stops}


__all__ = ["ComparePoliciesPanel", "DQNTrainingPanel", "ExportControl", "PolicySliderPanel", "RiskControlPanel", "TrainingPanel"]
