"""Exit policies: a literal registry of families, and how to make or load one by name or file.

base (Param, Policy, run_policy), params (parsing), files (policy files), features (what learned policies
read of an exit), and one module per family.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import EelabError
from ..records import ExitRecord
from .alpha import AlphaPolicy, fit_alpha_grid
from .base import Param, Policy, decide_step, run_policy, state_rows
from .budget import BudgetPolicy
from .confidence import ConfidencePolicy
from .dqn import DQNConfig, DQNPolicy, train_dqn
from .exit_env import ExitEnv
from .features import exit_features, record_features
from .files import load_policy_file
from .oracle import OraclePolicy
from .params import show_value
from .patience import PatiencePolicy
from .risk import RiskPolicy
from .static import StaticPolicy
from .threshold import ThresholdPolicy, first_exits, score_logits

POLICIES: dict[str, type[Policy]] = {
    "static": StaticPolicy,
    "threshold": ThresholdPolicy,
    "patience": PatiencePolicy,
    "budget": BudgetPolicy,
    "risk": RiskPolicy,
    "oracle": OraclePolicy,
    "alpha": AlphaPolicy,
    "dqn": DQNPolicy,
    "confidence": ConfidencePolicy,
}


def make_policy(name_or_file: str | Path, **params: Any) -> Policy:
    """A policy from a registry name and parameters (strings from the CLI are parsed), or a saved file."""
    name = str(name_or_file)
    if name in POLICIES:
        return POLICIES[name](**params)
    if Path(name).is_file() or name.endswith(".pt"):
        if params:
            raise EelabError(f"parameters ({', '.join(params)}) cannot change the saved policy {name}; "
                             f"give a policy name instead, or drop the parameters")
        return load_policy(name)
    raise EelabError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)} or give a saved policy file")


def load_policy(path: str | Path) -> Policy:
    """Read a policy saved with Policy.save (one-line EelabError for a missing, foreign or damaged file)."""
    return load_policy_file(path, POLICIES)


def default_grid(name: str, cal: ExitRecord) -> list[dict[str, Any]]:
    """Default sweep grid of a registered family on a cal record: a list of parameter dicts."""
    if name not in POLICIES:
        raise EelabError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}")
    return POLICIES[name].grid(cal)


__all__ = ["POLICIES", "AlphaPolicy", "BudgetPolicy", "ConfidencePolicy", "DQNConfig", "DQNPolicy", "ExitEnv",
           "OraclePolicy", "Param", "PatiencePolicy", "Policy", "RiskPolicy", "StaticPolicy", "ThresholdPolicy",
           "decide_step", "default_grid", "exit_features", "first_exits", "fit_alpha_grid", "load_policy",
           "make_policy", "record_features", "run_policy", "score_logits", "show_value", "state_rows", "train_dqn"]
