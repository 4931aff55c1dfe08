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
# # 02 · Tune the alpha gates
#
# A small gate per exit reads that exit's confidence features (sorted top probabilities, entropy, margin,
# the exit index) and gives the probability of stopping there (after LEENet). The gates are trained on the
# **cal** record to (1 - alpha) x expected cross-entropy + alpha x expected normalised cost; a sample leaves
# at the first gate over 0.5. Alpha is the one knob: every alpha below is fitted once (on cal) and scored on
# test, so the slider redraws at once. Beside it, the max-prob threshold policy the gates must beat, and the
# oracle frontier (a bound: it reads the labels). The gates' own MACs are charged to their cost.
#
# Everything this notebook can change is in the next cell. `REFERENCE` picks the committed reference (the
# strong ee_airnet by default, or the seed project's ee_cnn); `EELAB_CHECKPOINT` points it at another
# checkpoint directory (with `cal.pt` and `test.pt`); `EELAB_SMOKE=1` is the quick run the tests use.

# %% tags=["parameters"]
import os

from eelab import plots, tables, widgets, workbench
from eelab.records import load_records
from eelab.sweep import precompute_grid

REFERENCE = os.environ.get("EELAB_REFERENCE", "strong")  # committed reference: "strong" (ee_airnet) or "ee_cnn"
CHECKPOINT = os.environ.get("EELAB_CHECKPOINT") or str(workbench.reference_checkpoint(REFERENCE, "../checkpoints"))
SMOKE = os.environ.get("EELAB_SMOKE", "0") == "1"  # quick run: fewer samples, alphas and seeds
FIGURES = os.environ.get("EELAB_FIGURES", "../figures")  # where the export writes figures, tables, a manifest
EXPORT = os.environ.get("EELAB_EXPORT", "0") == "1"  # export when the notebook ends (`eelab figures` sets it)
FIGURE_SIZE = os.environ.get("EELAB_FIGURE_SIZE", "default")  # exports: "column", "page" or "default" (as drawn)
POLICY_DIR = "../runs/policies"        # the save button writes the selected policies here (git-ignored)
FITTED = None if SMOKE else "../runs/fitted"  # fitted gates are saved here and reused (notebook 04 too)
LIMIT = 2000 if SMOKE else None        # a seeded random subset of LIMIT samples of each record (None: all)
ALPHAS = [0.0, 0.25, 0.5, 0.75, 1.0] if SMOKE else [round(0.05 * i, 2) for i in range(21)]
SEEDS = [0, 1] if SMOKE else [0, 1, 2]  # gate initialisations: sensitivity is mean and spread over these
GATE_STEPS = 50 if SMOKE else 200      # full-batch Adam steps per fit
THRESHOLD_POINTS = 12 if SMOKE else None  # thin the threshold grid to this many points (None: all)
TOLERANCE = 0.01                       # matched accuracy: the last exit's cal accuracy minus this
BUDGET = 0.5                           # matched compute: at most this share of the plain network's MACs, on cal

# %% [markdown]
# ## Records
#
# Every exit's logits for every cal and test sample; nothing below runs the network.

# %%
cal, test = workbench.with_progress("loading the cal and test records", load_records, CHECKPOINT, limit=LIMIT)
tables.show_table(workbench.exit_table(cal, test))

# %% [markdown]
# ## Fit every alpha, for every seed, on cal
#
# The one slow cell: the alphas of one seed are fitted in one batched run (seconds), then each is scored on
# test; progress bars say which. With `FITTED` set, the gates are saved and found again next time.

# %%
alpha_runs = [precompute_grid("alpha", cal, test, {"alpha": ALPHAS, "seed": [seed], "steps": [GATE_STEPS]},
                              name="alpha", cache=FITTED) for seed in SEEDS]
threshold = precompute_grid("threshold", cal, test, max_points=THRESHOLD_POINTS, cache=FITTED)
static = precompute_grid("static", cal, test)

# %% [markdown]
# ## The sliders
#
# Alpha (seed 0's gates) and the max-prob threshold, each with its point on one frontier plot, the exit
# distribution and the accuracy and compute saved on test. "save policy" writes both selected policies into
# `POLICY_DIR`, as files `eelab predict CHECKPOINT IMAGE --policy FILE` and `eelab bench` take.

# %%
panel = widgets.PolicySliderPanel([alpha_runs[0], threshold], static=static, save_to=POLICY_DIR,
                                  title="alpha gates against the max-prob threshold (fitted on cal, test shown)")
panel

# %% [markdown]
# ## How sensitive is accuracy to alpha?
#
# LEENet's own results jump between nearby alphas. Here: test accuracy and compute saved against alpha, mean
# and standard deviation over the gate seeds, and `jump`, the change in mean accuracy from the previous alpha.

# %%
sensitivity = workbench.sensitivity_table(alpha_runs, "alpha")
tables.show_table(sensitivity)

# %%
sensitivity_figure = plots.plot_sensitivity(sensitivity, "alpha")
sensitivity_figure

# %% [markdown]
# ## Do the gates beat a tuned threshold?
#
# Area under each test frontier, test accuracy at matched compute (`BUDGET`) and compute saved at matched
# accuracy (`TOLERANCE`), both chosen on cal; mean and spread over the gate seeds (the threshold has no seed).
# A learned policy that loses to the threshold is a finding, not a failure.

# %%
summary = workbench.summarize_policies([{"alpha": run, "threshold": threshold} for run in alpha_runs],
                                       tolerance=TOLERANCE, budget=BUDGET)
tables.show_table(summary)

# %% [markdown]
# ## Export
#
# Writes the panel's current state, the sensitivity figure and the tables as PDF, SVG and PNG, CSV and
# LaTeX into `FIGURES`, at the size the menu beside the button picks (`FIGURE_SIZE` first), with
# `02_manifest.json` beside them (checkpoint, records, every policy and its parameters, eelab version and
# commit, and per file its sha256 and what made it: the sensitivity and the summary come from the gates of
# every seed in `SEEDS`). `eelab figures 02 --out DIR` does the same without a browser, from the fits cached
# in `FITTED`.

# %%
gates = {"ALPHAS": ALPHAS, "GATE_STEPS": GATE_STEPS, "LIMIT": LIMIT}  # the panel shows seed 0's, the rest all SEEDS'
made_with = {"alpha_sensitivity": workbench.made_with(alpha_runs, SEEDS=SEEDS, **gates),
             "sensitivity": workbench.made_with(alpha_runs, SEEDS=SEEDS, **gates),
             "summary": workbench.made_with(alpha_runs, threshold, SEEDS=SEEDS, TOLERANCE=TOLERANCE, BUDGET=BUDGET,
                                            THRESHOLD_POINTS=THRESHOLD_POINTS, **gates),
             "sliders": workbench.made_with(THRESHOLD_POINTS=THRESHOLD_POINTS, **gates)}

# %%
exporter = widgets.ExportControl(panel, {"alpha_sensitivity": sensitivity_figure, "sensitivity": sensitivity,
                                         "summary": summary}, folder=FIGURES, prefix="02_", checkpoint=CHECKPOINT,
                                 made_with=made_with, size=FIGURE_SIZE)
exporter

# %%
if EXPORT:
    exporter.export()
