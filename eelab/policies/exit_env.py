"""The exit decision as an episodic environment over an exit record (after the early-exit-cnn project).

One episode is one sample. At exit k < K-1 the agent sees exit_features(k) of that exit's output only and
chooses CONTINUE (0) or EXIT (1). EXIT ends the episode with the terminal reward

    r = 1[exit k is right] - cost_weight * costs[k] / full_cost

(MACs from the record's costs, never from the exit index); CONTINUE moves to exit k+1 and shows its
features, reward 0. The last exit forces an exit, so continuing from exit K-2 ends the episode there with
the last exit's reward. No discounting (gamma = 1): an episode's return is its terminal reward.

ExitEnv is a gymnasium.Env (reset/step, one episode at a time) so any agent can be plugged in, and it
also steps many episodes at once on tensors (observe/advance), which is what makes training fast: the
network never runs, every feature comes from the record.
"""
from __future__ import annotations

from typing import Any

import gymnasium
import numpy as np
import torch

from ..errors import EelabError
from ..metrics import charged_costs
from ..records import ExitRecord
from .features import NUM_CONFIDENCE_FEATURES, record_features

CONTINUE, EXIT = 0, 1


def exit_rewards(record: ExitRecord, cost_weight: float, costs: torch.Tensor | None = None) -> torch.Tensor:
    """Terminal reward of leaving at each exit: float32 [N, K] = 1[right] - cost_weight * costs[k] / full_cost.

    costs [K] MACs per sample (default the record's; a policy passes them with its own overhead charged).
    """
    costs = charged_costs(record.costs if costs is None else torch.as_tensor(costs))
    if costs.shape != (record.k,):
        raise EelabError(f"exit costs must have one value per exit [{record.k}], got {tuple(costs.shape)}")
    right = (record.logits.argmax(dim=-1) == record.labels.unsqueeze(1)).double()
    return (right - cost_weight * costs / record.full_cost).float()


class ExitEnv(gymnasium.Env):
    """Continue-or-exit episodes over the samples of an exit record (module doc); actions 0 = continue, 1 = exit.

    Observation: exit_features of the current exit, float32 [5 + K] in [0, 1]. reset(seed=..., options=
    {"index": i}) starts at exit 0 of sample i (default: a sample drawn with the env's generator).
    """

    metadata = {"render_modes": []}

    def __init__(self, record: ExitRecord, cost_weight: float, costs: torch.Tensor | None = None) -> None:
        if record.k < 2:
            raise EelabError(f"an exit environment needs at least 2 exits, the record has K={record.k}")
        if record.n == 0:
            raise EelabError("an exit environment needs a non-empty record; record a split first")
        self.num_exits, self.num_samples = record.k, record.n
        self.cost_weight = float(cost_weight)
        self.features = record_features(record)  # [N, K, F], exactly what a policy's step computes
        self.rewards = exit_rewards(record, cost_weight, costs)  # [N, K]
        self.observation_space = gymnasium.spaces.Box(0.0, 1.0, (NUM_CONFIDENCE_FEATURES + record.k,), np.float32)
        self.action_space = gymnasium.spaces.Discrete(2)
        self._index, self._exit = 0, 0

    # ---- many episodes at once, on tensors --------------------------------------------------
    def observe(self, index: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Observations of B episodes: sample index [B], current exit k [B] -> features [B, F]."""
        return self.features[index, k]

    def advance(self, index: torch.Tensor, k: torch.Tensor,
                action: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One step of B episodes: index, exit k (< K-1), action [B] -> reward [B], done bool [B], next exit [B].

        A finished episode's next exit is where it left (EXIT: the current one; CONTINUE into the last exit:
        K-1); an unfinished one's is exit + 1, whose features are its next observation.
        """
        if bool((k >= self.num_exits - 1).any()):
            raise EelabError(f"no decision is taken at the last exit ({self.num_exits - 1}): it forces an exit")
        nxt = torch.where(action == EXIT, k, k + 1)
        done = (action == EXIT) | (nxt == self.num_exits - 1)
        reward = torch.where(done, self.rewards[index, nxt], torch.zeros(()))
        return reward, done, nxt

    # ---- gymnasium: one episode at a time ---------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None
              ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        index = (options or {}).get("index")
        if index is None:
            index = int(self.np_random.integers(self.num_samples))
        if not 0 <= int(index) < self.num_samples:
            raise EelabError(f"sample index {index} is outside [0, {self.num_samples - 1}]")
        self._index, self._exit = int(index), 0
        return self._observation(), {"index": self._index, "exit": 0}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self.action_space.contains(int(action)):
            raise EelabError(f"action must be 0 (continue) or 1 (exit), got {action!r}")
        reward, done, nxt = self.advance(torch.tensor([self._index]), torch.tensor([self._exit]),
                                         torch.tensor([int(action)]))
        self._exit = int(nxt[0])
        return self._observation(), float(reward[0]), bool(done[0]), False, {"index": self._index, "exit": self._exit}

    def _observation(self) -> np.ndarray:
        return self.features[self._index, self._exit].numpy().astype(np.float32)
