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
# # 01 · Train the classifiers
#
# A multi-exit network is trained once and every exit of it is recorded once, on the cal and the test
# split (an *exit record*); everything in notebooks 02-04 is a function of those records. This notebook
# shows the reference checkpoint: its per-exit accuracy and cost, its training curves, and test images
# with the exit each took. The **train** button trains a new run into `runs/NAME/` (git-ignored) and
# records it there.
#
# Everything this notebook can change is in the next cell. `REFERENCE` picks the committed reference (the
# strong ee_airnet by default, or the seed project's ee_cnn); `EELAB_CHECKPOINT` points it at another
# checkpoint directory; `EELAB_SMOKE=1` is the quick run the tests use.

# %% tags=["parameters"]
import os

import eelab
from eelab import plots, tables, widgets, workbench
from eelab.records import load_records
from eelab.sweep import precompute_grid

REFERENCE = os.environ.get("EELAB_REFERENCE", "strong")  # committed reference: "strong" (ee_airnet) or "ee_cnn"
CHECKPOINT = os.environ.get("EELAB_CHECKPOINT") or str(workbench.reference_checkpoint(REFERENCE, "../checkpoints"))
SMOKE = os.environ.get("EELAB_SMOKE", "0") == "1"  # quick run: fewer samples and examples
RUNS = "../runs"                   # where the train button writes new runs (git-ignored)
FIGURES = os.environ.get("EELAB_FIGURES", "../figures")  # where the export writes figures, tables, a manifest
EXPORT = os.environ.get("EELAB_EXPORT", "0") == "1"  # export when the notebook ends (`eelab figures` sets it)
FIGURE_SIZE = os.environ.get("EELAB_FIGURE_SIZE", "default")  # exports: "column", "page" or "default" (as drawn)
LIMIT = 2000 if SMOKE else None    # a seeded random subset of LIMIT samples of each record (None: all)
EXAMPLE_POLICY = {"threshold": 0.9}  # the max-prob threshold policy the example images are decided with
N_EXAMPLES = 8 if SMOKE else 24
THRESHOLD_POINTS = 12 if SMOKE else None  # thin the threshold grid to this many points (None: all)
# the published system the reference is shown beside (none for a checkpoint of your own), on the original CIFAR-10
PUBLISHED = None if os.environ.get("EELAB_CHECKPOINT") else workbench.REFERENCE_PUBLISHED[REFERENCE]

# %% [markdown]
# ## Train (optional)
#
# The curves show the checkpoint's per-exit accuracy on cal after each epoch: watched, never used to pick
# an epoch (the checkpoint is the last one). Choose a model, dataset and epochs and press **train**: the
# curves grow epoch by epoch, then the cal and test records are written into the run. Training the
# reference recipe takes hours on a laptop CPU; `train images` trains on a seeded subset for a quick look.

# %%
trainer = widgets.TrainingPanel(CHECKPOINT, runs=RUNS)
trainer

# %% [markdown]
# ## Per-exit accuracy and cost
#
# The cells below read `trainer.checkpoint`: the reference, or your run once it has trained (re-run them
# then). Costs are measured MACs to reach each exit, heads on the way included, relative to the plain
# network (the same backbone with only its last head). The crosses are the published accuracies of the
# system the reference follows (the early-exit-cnn project's per exit for ee_cnn; airbench94's one exit,
# without test-time augmentation, for the strong reference): theirs, on the original CIFAR-10, not on this
# JPEG copy.

# %%
checkpoint = trainer.checkpoint
cal, test = workbench.with_progress("loading the cal and test records", load_records, checkpoint, limit=LIMIT)
exits = workbench.exit_table(cal, test)
tables.show_table(exits)

# %%
profile_figure = plots.plot_exit_profile(
    exits, published=workbench.PUBLISHED[PUBLISHED]["exit_accuracy"] if PUBLISHED else None,
    published_label=f"{PUBLISHED} (theirs, CIFAR-10)")
profile_figure

# %% [markdown]
# ## The two references side by side
#
# The strong reference (ee_airnet: a fast airbench-style network with four exits, trained in about 20
# minutes on two CPU cores) and the seed project's EE-CNN, kept as its faithful reproduction: every exit's
# test accuracy against the MACs it costs, on one scale. The cross is airbench94's published single exit.

# %%
references = workbench.with_progress(
    "loading both references' records", workbench.reference_table,
    {name: workbench.reference_checkpoint(name, "../checkpoints") for name in workbench.REFERENCES}, limit=LIMIT)
tables.show_table(references)

# %%
references_figure = plots.plot_reference_exits(
    references, published={"airbench94 (theirs, CIFAR-10)": (workbench.PUBLISHED["airbench94"]["macs"],
                                                             workbench.PUBLISHED["airbench94"]["accuracy"])})
references_figure

# %% [markdown]
# ## A first exit policy: the max-prob threshold
#
# A sample leaves at the first exit whose top softmax probability reaches the threshold. Every threshold of
# the grid is applied to cal and scored on test once, so the slider redraws at once: the point on the
# accuracy-versus-MACs plot, against the static exits and the oracle frontier (a bound: it reads the labels),
# and where the test images leave. Notebooks 02-04 put the other policies beside it.

# %%
threshold = precompute_grid("threshold", cal, test, max_points=THRESHOLD_POINTS)
first_policy = widgets.PolicySliderPanel([threshold], static=precompute_grid("static", cal, test),
                                         title="max-prob threshold (applied on cal, test shown)")
first_policy

# %% [markdown]
# ## Training curves

# %%
training_figure = plots.plot_training(eelab.read_history(checkpoint))
training_figure

# %% [markdown]
# ## Test images and the exit each took
#
# Decided by a max-prob threshold policy (exit as soon as the top softmax probability reaches it);
# a red title is a wrong prediction. The images come from the dataset; without it, the cell says how to
# get it, and every figure above still works from the records.

# %%
policy = eelab.make_policy("threshold", **EXAMPLE_POLICY).fit(cal)
examples = workbench.find_examples(test, policy.decide(test), n=N_EXAMPLES)
examples_figure = plots.plot_examples(examples)
examples_figure

# %% [markdown]
# ## Export
#
# Writes the figures (the threshold panel in its current state too) as PDF and SVG (vector) plus PNG, and
# the tables as CSV and LaTeX, into `FIGURES`, at the size the menu beside the button picks (`FIGURE_SIZE`
# first: one column, two columns, or as drawn), with `01_manifest.json` beside them (checkpoint, records,
# eelab version and commit, and per file its sha256 and the policies and constants that made it).
# `eelab figures 01 --out DIR` runs this notebook without a browser and exports through the same code.

# %%
made_with = {"examples": workbench.made_with(policy, EXAMPLE_POLICY=EXAMPLE_POLICY, N_EXAMPLES=N_EXAMPLES),
             "exit_profile": workbench.made_with(PUBLISHED=PUBLISHED, LIMIT=LIMIT),
             "exits": workbench.made_with(LIMIT=LIMIT),
             "references": workbench.made_with(LIMIT=LIMIT), "reference_exits": workbench.made_with(LIMIT=LIMIT),
             "sliders": workbench.made_with(THRESHOLD_POINTS=THRESHOLD_POINTS, LIMIT=LIMIT)}

# %%
exporter = widgets.ExportControl(first_policy, {"exit_profile": profile_figure, "training": training_figure,
                                               "examples": examples_figure, "exits": exits,
                                               "references": references_figure, "reference_exits": references},
                                 folder=FIGURES, prefix="01_", records=[cal, test], checkpoint=checkpoint,
                                 made_with=made_with, size=FIGURE_SIZE)
exporter

# %%
if EXPORT:
    exporter.export()
