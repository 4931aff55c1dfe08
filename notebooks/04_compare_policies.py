# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · Compare the exit policies
#
# Every registered policy on one accuracy-versus-cost plot, against the oracle frontier (the best any exit
# assignment can do: a bound, since it reads the labels) and the static exits. Every policy is fitted on the
# cal record and scored on the test record; every operating point is computed once below, so the controls
# redraw at once. Then risk control with its guarantee, per-class behaviour, calibration, and a summary table.
#
# Everything this notebook can change is in the next cell. `REFERENCE` picks the committed reference (the
# strong ee_airnet by default, or the seed project's ee_cnn); `EELAB_CHECKPOINT` points it at another
# checkpoint directory (with `cal.pt` and `test.pt`); `EELAB_SMOKE=1` is the quick run the tests use.

# %% tags=["parameters"]
import os

import eelab
from eelab import plots, tables, widgets, workbench
from eelab.records import latency_record, load_records
from eelab.sweep import precompute_grid, precompute_grids

REFERENCE = os.environ.get("EELAB_REFERENCE", "strong")  # committed reference: "strong" (ee_airnet) or "ee_cnn"
CHECKPOINT = os.environ.get("EELAB_CHECKPOINT") or str(workbench.reference_checkpoint(REFERENCE, "../checkpoints"))
SMOKE = os.environ.get("EELAB_SMOKE", "0") == "1"  # quick run: fewer samples, thinner grids
FIGURES = os.environ.get("EELAB_FIGURES", "../figures")  # where the export writes figures, tables, a manifest
EXPORT = os.environ.get("EELAB_EXPORT", "0") == "1"  # export when the notebook ends (`eelab figures` sets it)
FIGURE_SIZE = os.environ.get("EELAB_FIGURE_SIZE", "default")  # exports: "column", "page" or "default" (as drawn)
LIMIT = 2000 if SMOKE else None        # a seeded random subset of LIMIT samples of each record (None: all)
GRID_POINTS = 12 if SMOKE else None    # thin each policy's default grid to this many points (None: all)
LEARNED = ["alpha", "dqn"]             # families fitted by training a small network (minutes): cached in FITTED
COMPARE = [name for name in eelab.POLICIES if not (SMOKE and name in LEARNED)]  # every registered family
FITTED = None if SMOKE else "../runs/fitted"  # fitted policies are saved here and reused (git-ignored)
RISK_EPSILONS = [0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3]  # tolerated accuracy loss vs. last exit
RISK_DELTAS = [0.05, 0.1, 0.2]         # allowed probability (over cal draws) that the risk exceeds epsilon
PROFILE_ROUNDS = 3 if SMOKE else 20    # timing rounds per stage for the latency axis (median)
TOLERANCE = 0.01                       # matched accuracy: the last exit's cal accuracy minus this
BUDGET = 0.5                           # matched compute: at most this share of the plain network's MACs, on cal
PATTERN_POLICY = "threshold"           # whose per-class exit pattern is shown
SPLIT_POLICY = "threshold"             # whose exits the edge/cloud split table counts (at matched accuracy)
N_BINS = 15                            # reliability-diagram bins
SEED_CHECKPOINTS = []                  # the same recipe trained with other seeds: mean and spread in the summary
ENSEMBLE_SEEDS = [0] if SMOKE else [0, 1, 2]  # ensembled exits: one ensemble per seeded half of cal

# %% [markdown]
# ## Records and timings
#
# The exit records hold every exit's logits for every cal and test sample; nothing below runs the network
# except `profile_checkpoint`, which times each stage and head at batch 1 for the latency axis.

# %%
cal, test = workbench.with_progress("loading the cal and test records", load_records, CHECKPOINT, limit=LIMIT)
profile = workbench.with_progress("timing each stage and head at batch 1", eelab.profile_checkpoint, CHECKPOINT,
                                  rounds=PROFILE_ROUNDS)
latency = latency_record(test, profile)
tables.show_table(workbench.exit_table(cal, test))

# %% [markdown]
# ## Every policy's frontier
#
# The one slow cell: each grid point is fitted on cal and evaluated on test once, with a progress bar per
# family. Fitted policies are saved in `FITTED` and found again next time (notebooks 02 and 03 fill the same
# folder), so the learned families train only on the first run. A family these records cannot feed (e.g.
# confidence, without learned confidences) is left out with a one-line note.

# %%
grids = precompute_grids(COMPARE, cal, test, latency=latency, max_points=GRID_POINTS, cache=FITTED)

# %% [markdown]
# Lines are each policy's Pareto front on test, faint dots every grid point. The toggle prices the same exits
# in measured milliseconds instead of MACs: where they disagree, MACs are not the whole story.

# %%
compare = widgets.ComparePoliciesPanel(grids, title="accuracy against cost, fitted on cal, reported on test")
compare

# %% [markdown]
# ## Risk control
#
# The risk policy picks the cheapest max-prob threshold lambda for which, on cal, the accuracy lost against
# the last exit stays below epsilon with probability at least 1 - delta (Learn-then-Test). The slider shows
# the guarantee the fitted lambda carries and the risk it actually has on test.

# %%
risk_grid = precompute_grid("risk", cal, test, {"epsilon": RISK_EPSILONS, "delta": RISK_DELTAS})
risk = widgets.RiskControlPanel(risk_grid, static=grids.get("static"), title="risk control (Learn-then-Test)")
risk

# %% [markdown]
# ## Per class, at matched accuracy
#
# Each policy at its cheapest grid point whose cal accuracy is within `TOLERANCE` of the last exit's;
# reported on test.

# %%
target = workbench.target_accuracy(cal, TOLERANCE)
matched = workbench.operating_points(grids, accuracy=target)
tables.show_table(matched, columns=["policy", "label", "accuracy", "compute_saved", "mean_macs", "cal_accuracy",
                                     "rel_ms"])

# %%
points = workbench.matched_points(grids, accuracy=target)
class_figure = plots.plot_class_heatmap(workbench.class_table(points), title="per-class test accuracy")
class_figure

# %%
pattern_figure = plots.plot_class_heatmap(workbench.class_exits(points[PATTERN_POLICY]),
                                          title=f"where each class exits: {PATTERN_POLICY}")
pattern_figure

# %% [markdown]
# ## Where to split between an edge device and the cloud
#
# Split after stage k: the device runs stages and heads 0..k (timed in the profile above, batch 1) and sends the
# activation leaving stage k for the images the policy lets go on. Per split point: device time, bytes per
# image (fp32, bf16, int8), and the share of test images `SPLIT_POLICY`, at matched accuracy, answers on the
# device.

# %%
split_point = workbench.matched_point(grids[SPLIT_POLICY], accuracy=target)
split = workbench.split_table(profile, test, grids[SPLIT_POLICY].exits[split_point])
tables.show_table(split)

# %%
split_figure = plots.plot_split(split, title=f"edge/cloud split: {grids[SPLIT_POLICY].table.at[split_point, 'label']}")
split_figure

# %% [markdown]
# ## Confidence and calibration per exit

# %%
confidence_figure = plots.plot_confidence(workbench.exit_confidences(test))
confidence_figure

# %%
reliability_figure = plots.plot_reliability(workbench.reliability_bins(test, N_BINS))
reliability_figure

# %% [markdown]
# ## Ensembled exits
#
# Zero Time Waste's geometric ensemble: exit k answers with a weighted sum of the log-probabilities of exits
# 0..k plus a per-class bias (weights >= 0). Each ensemble is fitted on a seeded half of cal; the threshold
# policy is then fitted on the other half and scored on test, so no policy is fitted on the rows the ensemble
# saw. Per exit on test: what the ensembles change (mean over `ENSEMBLE_SEEDS`). Exit 0 has nothing to combine
# with; its ensemble only rescales it (a temperature and a class bias).

# %%
ensembles = workbench.ensemble_runs(cal, test, ENSEMBLE_SEEDS, max_points=GRID_POINTS, cache=FITTED)
ensemble_changes = workbench.ensemble_table(test, [next(iter(run.values())).test for run in ensembles])
tables.show_table(ensemble_changes)

# %% [markdown]
# ## Summary
#
# Per policy: area under its test frontier (mean accuracy over the cost range from exit 0 to the plain
# network), test accuracy at matched compute (`BUDGET`), and test compute saved at matched accuracy
# (`TOLERANCE`); mean and sample standard deviation over the checkpoints in `SEED_CHECKPOINTS` too, and for
# `threshold + ensemble` over the ensembles' seeds (each on its own half of cal).

# %%
seed_runs = [precompute_grids(COMPARE, *load_records(path, limit=LIMIT), max_points=GRID_POINTS,
                              cache=FITTED) for path in SEED_CHECKPOINTS]
summary = workbench.summarize_policies([grids, *seed_runs, *ensembles], tolerance=TOLERANCE, budget=BUDGET)
tables.show_table(summary)

# %% [markdown]
# ## Export
#
# Writes the panels' current state and the figures above as PDF, SVG and PNG, and the tables as CSV and
# LaTeX, into `FIGURES`: the frontiers on both cost axes (`04_frontiers`, `04_frontiers_latency`), the risk
# panel's operating point as `04_risk_operating_points`, the ensemble's per-exit changes as `04_ensemble`, and
# `04_manifest.json` (checkpoint, records, every policy and its parameters, eelab version and commit, and per
# file its sha256 and what made it: the policies at their matched points, `TOLERANCE`, `BUDGET`,
# `SPLIT_POLICY`, the ensembles' seeds, ...). The menu beside the button picks the figures' size
# (`FIGURE_SIZE` first). `eelab figures 04 --out DIR` does the same without a browser, from the fits cached in
# `FITTED`.

# %%
at_target = {"accuracy": target, "TOLERANCE": TOLERANCE, "LIMIT": LIMIT}
split_made = workbench.made_with(grids[SPLIT_POLICY], SPLIT_POLICY=SPLIT_POLICY, PROFILE_ROUNDS=PROFILE_ROUNDS,
                                 **at_target)
made_with = {"operating_points": workbench.made_with(grids, **at_target), "split": split_made,
             "class_accuracy": workbench.made_with(grids, **at_target), "split_table": split_made,
             "class_exits": workbench.made_with(grids[PATTERN_POLICY], PATTERN_POLICY=PATTERN_POLICY, **at_target),
             "confidence": workbench.made_with(LIMIT=LIMIT), "reliability": workbench.made_with(N_BINS=N_BINS),
             "ensemble": workbench.made_with(ensembles, ENSEMBLE_SEEDS=ENSEMBLE_SEEDS, GRID_POINTS=GRID_POINTS)}

# %%
made_with.update({
    "summary": workbench.made_with(grids, seed_runs, ensembles, TOLERANCE=TOLERANCE, BUDGET=BUDGET,
                                   SEED_CHECKPOINTS=SEED_CHECKPOINTS, ENSEMBLE_SEEDS=ENSEMBLE_SEEDS,
                                   GRID_POINTS=GRID_POINTS, LIMIT=LIMIT),
    "compare": workbench.made_with(COMPARE=COMPARE, GRID_POINTS=GRID_POINTS, PROFILE_ROUNDS=PROFILE_ROUNDS),
    "risk": workbench.made_with(RISK_EPSILONS=RISK_EPSILONS, RISK_DELTAS=RISK_DELTAS, LIMIT=LIMIT)})

# %%
exporter = widgets.ExportControl(compare, risk, {"class_accuracy": class_figure, "class_exits": pattern_figure,
                                                 "confidence": confidence_figure, "reliability": reliability_figure,
                                                 "split": split_figure, "split_table": split,
                                                 "operating_points": matched, "ensemble": ensemble_changes,
                                                 "summary": summary},
                                 folder=FIGURES, prefix="04_", checkpoint=CHECKPOINT, made_with=made_with,
                                 size=FIGURE_SIZE)
exporter

# %%
if EXPORT:
    exporter.export()
