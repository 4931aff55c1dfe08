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
# # 03 · Train a DQN exit agent
#
# At each exit the agent sees that exit's confidence features only and chooses continue or exit; the last
# exit forces an exit; the reward is 1[correct] - cost_weight x MACs spent / plain network's MACs (the Q-network's
# own MACs included), with no discount. Double DQN with a target network, every transition in replay,
# exploration only while training, greedy when deciding (after the early-exit-cnn project, without its
# defects). The episodes run over the **cal** record, thousands at a time; each cost_weight gives one agent and one
# point on the frontier, scored on **test**.
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
SMOKE = os.environ.get("EELAB_SMOKE", "0") == "1"  # quick run: fewer samples, agents and updates
FIGURES = os.environ.get("EELAB_FIGURES", "../figures")  # where the export writes figures, tables, a manifest
EXPORT = os.environ.get("EELAB_EXPORT", "0") == "1"  # export when the notebook ends (`eelab figures` sets it)
FIGURE_SIZE = os.environ.get("EELAB_FIGURE_SIZE", "default")  # exports: "column", "page" or "default" (as drawn)
POLICY_DIR = "../runs/policies"        # the save button writes the selected agent here (git-ignored)
FITTED = None if SMOKE else "../runs/fitted"  # trained agents are saved here and reused (notebook 04 too)
LIMIT = 2000 if SMOKE else None        # a seeded random subset of LIMIT samples of each record (None: all)
COST_WEIGHTS = [0.05, 0.3, 1.1] if SMOKE else None  # one agent per cost_weight (None: the family's nine)
AGENT = {"steps": 150} if SMOKE else {}  # other DQN parameters (steps, hidden, lr, seed, ...); {}: defaults
REPORT_EVERY = 25                      # gradient updates between points on the live curves
THRESHOLD_POINTS = 12 if SMOKE else None  # thin the threshold grid to this many points (None: all)

# %% [markdown]
# ## Records

# %%
cal, test = workbench.with_progress("loading the cal and test records", load_records, CHECKPOINT, limit=LIMIT)
tables.show_table(workbench.exit_table(cal, test))

# %% [markdown]
# ## Training, live
#
# Left: the greedy agent's mean reward on cal (no exploration) every `REPORT_EVERY` updates, one curve per
# cost_weight. Right: where the agent in training leaves. Agents found in `FITTED` are drawn from their stored
# trace instead of trained again. The button trains again after you change the cell above.

# %%
trainer = widgets.DQNTrainingPanel(cal, test, cost_weights=COST_WEIGHTS, params=AGENT, cache=FITTED,
                                   every=REPORT_EVERY)
trainer

# %%
dqn = trainer.train()
threshold = precompute_grid("threshold", cal, test, max_points=THRESHOLD_POINTS, cache=FITTED)
static = precompute_grid("static", cal, test)

# %% [markdown]
# ## Pick an agent
#
# The cost_weight slider picks the agent; its point on the frontier, its exit distribution and where each class
# leaves follow at once, beside the max-prob threshold policy and the oracle frontier. "save policy" writes
# the selected agent (and threshold) into `POLICY_DIR` for `eelab predict` and `eelab bench`.

# %%
panel = widgets.PolicySliderPanel([dqn, threshold], static=static, classes=True, save_to=POLICY_DIR,
                                  title="DQN agents against the max-prob threshold (fitted on cal, test shown)")
panel

# %% [markdown]
# ## The agents against the threshold
#
# Area under each test frontier, accuracy at matched compute and compute saved at matched accuracy (chosen
# on cal). For a spread over seeds, train agents with other `seed`s in `AGENT` (`benchmarks/learned_policies.py`
# trains three).

# %%
summary = workbench.summarize_policies({"dqn": dqn, "threshold": threshold})
tables.show_table(summary)

# %%
training_figure = plots.plot_dqn_training(trainer.traces, title="DQN training on cal")
training_figure

# %% [markdown]
# ## Export
#
# Writes the training curves, the panel's current state and the summary into `FIGURES`, at the size the
# menu beside the button picks (`FIGURE_SIZE` first), with `03_manifest.json` beside them (checkpoint,
# records, every agent and its parameters, eelab version and commit, and per file its sha256 and the
# policies and constants that made it). `eelab figures 03 --out DIR` does the same without a browser, from
# the agents cached in `FITTED`.

# %%
agents = {"COST_WEIGHTS": COST_WEIGHTS, "AGENT": AGENT, "LIMIT": LIMIT}
made_with = {"dqn": workbench.made_with(REPORT_EVERY=REPORT_EVERY, **agents),
             "sliders": workbench.made_with(THRESHOLD_POINTS=THRESHOLD_POINTS, **agents),
             "summary": workbench.made_with(dqn, threshold, THRESHOLD_POINTS=THRESHOLD_POINTS, **agents)}

# %%
exporter = widgets.ExportControl(trainer, panel, {"summary": summary}, folder=FIGURES, prefix="03_",
                                 checkpoint=CHECKPOINT, made_with=made_with, size=FIGURE_SIZE)
exporter

# %%
if EXPORT:
    exporter.export()
