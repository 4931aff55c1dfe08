"""A DQN exit agent after the early-exit-cnn project, done right: Double DQN on the episodes of ExitEnv.

The agent sees exit_features of the current exit only and chooses continue or exit; the last exit forces
an exit; the terminal reward is 1[right] - cost_weight * costs[k] / full_cost with gamma = 1 (exit_env).
The costs charged include the Q-network's own MACs at every exit it is evaluated. Training: Double DQN
(the online network picks the next action, a target network synced every target_every updates values it),
every transition stored in replay (exit transitions and forced last exits included, each next state from
the exit it moved to), epsilon-greedy exploration only while training. Deciding is greedy and
deterministic: exit when Q(exit) > Q(continue). cost_weight traces a frontier.

The published agent's defects, avoided here: exit transitions never reached replay; the state after
"continue" was taken from the exit just left; exploration stayed on at test time; "compute saved" came
from the exit index while every block still ran.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..data import MAX_SEED
from ..errors import EelabError
from ..metrics import charged_costs
from ..models import count_macs
from ..records import ExitRecord
from .base import Param, Policy, State
from .exit_env import CONTINUE, EXIT, ExitEnv
from .features import NUM_CONFIDENCE_FEATURES, exit_features


@dataclass(frozen=True)
class DQNConfig:
    """How the agent trains. Defaults fit a few-thousand-sample cal record in about a second or two on a CPU.

    steps: gradient updates, one per step of `parallel` episodes run side by side (so about
    steps * parallel / 2 episodes in all); epsilon decays linearly from epsilon_start to epsilon_end over the
    first explore_fraction of the steps; replay_size transitions are kept (oldest dropped first).
    """

    hidden: int = 32
    steps: int = 600
    lr: float = 3e-3
    batch_size: int = 512
    parallel: int = 256
    replay_size: int = 65536
    target_every: int = 25
    epsilon_start: float = 1.0
    epsilon_end: float = 0.05
    explore_fraction: float = 0.5
    seed: int = 0


@dataclass
class DQNRun:
    """What train_dqn returns: the online Q-network's weights, the replay memory, and the training trace.

    replay: obs [R, F], action [R] int64, reward [R], next_obs [R, F], done [R] bool, index [R] (sample),
    exit [R] (exit where the action was taken), oldest first. losses: TD loss per update.
    """

    weights: dict[str, torch.Tensor]
    replay: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    episodes: int = 0
    seconds: float = 0.0


def q_values(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Q(state, continue) and Q(state, exit): features x [B, F] -> [B, 2] (columns CONTINUE, EXIT).

    weights: w0 [F, H], b0 [H], w1 [H, H], b1 [H], w2 [H, 2], b2 [2] (two hidden ReLU layers).
    """
    h = torch.relu(torch.addmm(weights["b0"], x, weights["w0"]))
    h = torch.relu(torch.addmm(weights["b1"], h, weights["w1"]))
    return torch.addmm(weights["b2"], h, weights["w2"])


def greedy_actions(q: torch.Tensor) -> torch.Tensor:
    """The greedy action of each row of Q [B, 2]: EXIT where Q(exit) > Q(continue), else CONTINUE; int64 [B]."""
    return (q[:, EXIT] > q[:, CONTINUE]).long()


def greedy_exits(weights: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """Where a greedy agent leaves each of N samples: features [N, K, F] -> exits int64 [N] (the last forced)."""
    n, k, f = features.shape
    with torch.no_grad():
        stop = greedy_actions(q_values(weights, features[:, :-1].reshape(-1, f))).view(n, k - 1) == EXIT
    return torch.cat([stop, torch.ones(n, 1, dtype=torch.bool)], dim=1).int().argmax(dim=1)


def train_dqn(env: ExitEnv, config: DQNConfig = DQNConfig(),
              callback: Callable[[dict[str, Any]], None] | None = None, every: int = 25) -> DQNRun:
    """Train a Double DQN agent on an ExitEnv, many episodes at a time; seeded by config.seed.

    callback, every `every` updates and after the last: {step, steps, episodes, epsilon, loss (mean TD loss
    since the last report), train_reward (mean reward of the exploring episodes finished since then, nan if
    none), greedy_reward (mean reward of the greedy agent over every sample of the env, no exploration) and
    exit_fractions [K] (where the greedy agent leaves)}, for live plots. It draws no random numbers, so a run
    with a callback equals one without.
    """
    start = time.perf_counter()
    if every < 1:
        raise EelabError(f"train_dqn reports every `every` updates; it must be at least 1, got {every}")
    gen = torch.Generator().manual_seed(config.seed)
    f, p, cap = env.observation_space.shape[0], config.parallel, config.replay_size
    # The network trains on standardised features (far better conditioned: confidences bunch near 1), and the
    # affine map is folded into its first layer at the end, so the fitted network reads raw features.
    seen = env.features[:, :-1].reshape(-1, f)  # every state a decision is taken in
    mean, std = seen.mean(0), seen.std(0)
    std = torch.where(std > 1e-6, std.clamp_min(1e-2), torch.ones_like(std))
    online = {key: value.requires_grad_() for key, value in _init_q(f, config.hidden, gen).items()}
    target = {key: value.detach().clone() for key, value in online.items()}
    optimizer = torch.optim.Adam(list(online.values()), lr=config.lr, foreach=True)
    # the learning rate decays linearly to a tenth, so late updates average the Bernoulli rewards' noise out
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - 0.9 * min(1.0, i / config.steps))
    # replay, one row per transition: obs [F], next_obs [F], reward, action, done (packed: one gather per
    # update); sample index and exit kept beside it so a run can be inspected
    memory = torch.zeros(cap, 2 * f + 3)
    where = torch.zeros(cap, 2, dtype=torch.long)
    stored, losses, episodes = 0, [], 0
    finished, reward_sum, reported = 0, 0.0, 0  # exploring episodes finished since the last report
    index = torch.randint(env.num_samples, (p,), generator=gen)
    at = torch.zeros(p, dtype=torch.long)  # each episode's current exit
    explore_steps = max(1.0, config.explore_fraction * config.steps)
    for t in range(config.steps):
        # act: epsilon-greedy, in training only
        epsilon = config.epsilon_start + (config.epsilon_end - config.epsilon_start) * min(1.0, t / explore_steps)
        obs = (env.observe(index, at) - mean) / std
        with torch.no_grad():
            greedy = greedy_actions(q_values(online, obs))
        explore = torch.rand(p, generator=gen) < epsilon
        action = torch.where(explore, torch.randint(2, (p,), generator=gen), greedy)
        reward, done, nxt = env.advance(index, at, action)
        # store every transition: continue, exit, and continue into the forced last exit alike; the next
        # state is the exit moved to (for a finished episode it is never bootstrapped from)
        slots = (stored + torch.arange(p)) % cap
        memory[slots] = torch.cat([obs, (env.observe(index, nxt) - mean) / std, reward.unsqueeze(1),
                                   action.unsqueeze(1).float(), done.unsqueeze(1).float()], dim=1)
        where[slots] = torch.stack([index, at], dim=1)
        stored += p
        episodes += int(done.sum())
        finished, reward_sum = finished + int(done.sum()), reward_sum + float(reward.sum())
        index = torch.where(done, torch.randint(env.num_samples, (p,), generator=gen), index)
        at = torch.where(done, torch.zeros_like(at), nxt)
        # learn: Double DQN with gamma = 1 (the online network picks the next action, the target values it)
        if min(stored, cap) < config.batch_size:
            continue  # (a report falls due only after an update, and the first one comes before step `every`)
        batch = memory[torch.randint(min(stored, cap), (config.batch_size,), generator=gen)]
        s, s2 = batch[:, :f], batch[:, f:2 * f]
        r, a, d = batch[:, 2 * f], batch[:, 2 * f + 1].long(), batch[:, 2 * f + 2]
        with torch.no_grad():
            a2 = greedy_actions(q_values(online, s2))
            y = r + (1 - d) * q_values(target, s2).gather(1, a2.unsqueeze(1)).squeeze(1)
        q = q_values(online, s).gather(1, a.unsqueeze(1)).squeeze(1)
        loss = torch.nn.functional.mse_loss(q, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if len(losses) % config.target_every == 0:
            target = {key: value.detach().clone() for key, value in online.items()}
        if callback is not None and ((t + 1) % every == 0 or t + 1 == config.steps):
            exits = greedy_exits(online, (env.features - mean) / std)
            callback({"step": t + 1, "steps": config.steps, "episodes": episodes, "epsilon": epsilon,
                      "loss": sum(losses[reported:]) / max(len(losses) - reported, 1),
                      "train_reward": reward_sum / finished if finished else math.nan,
                      "greedy_reward": float(env.rewards[torch.arange(env.num_samples), exits].mean()),
                      "exit_fractions": (torch.bincount(exits, minlength=env.num_exits).double()
                                         / env.num_samples).tolist()})
            finished, reward_sum, reported = 0, 0.0, len(losses)
    order = torch.arange(stored - min(stored, cap), stored) % cap  # oldest first
    rows, place = memory[order], where[order]
    replay = {"obs": rows[:, :f] * std + mean, "next_obs": rows[:, f:2 * f] * std + mean, "reward": rows[:, 2 * f],
              "action": rows[:, 2 * f + 1].long(), "done": rows[:, 2 * f + 2].bool(), "index": place[:, 0],
              "exit": place[:, 1]}
    with torch.no_grad():  # ((x - m) / s) W + b = x (W / s) + (b - (m / s) W)
        weights = {key: value.detach().clone() for key, value in online.items()}
        weights["b0"] = weights["b0"] - (mean / std) @ weights["w0"]
        weights["w0"] = weights["w0"] / std.unsqueeze(1)
    return DQNRun(weights=weights, replay=replay, losses=losses, episodes=episodes,
                  seconds=time.perf_counter() - start)


class DQNPolicy(Policy):
    """Exit where the fitted Q-network values exiting above continuing (greedy, deterministic)."""

    name = "dqn"
    PARAMS = {
        "cost_weight": Param(0.3, "float", "reward = 1[right] - cost_weight * MACs / full MACs", lo=0),
        "hidden": Param(DQNConfig.hidden, "int", "hidden units of the Q-network's two layers", lo=1, hi=4096),
        "steps": Param(DQNConfig.steps, "int", "gradient updates (each after a step of 256 parallel episodes)", lo=1,
                       hi=100_000),
        "lr": Param(DQNConfig.lr, "float", "Adam learning rate", lo=0, hi=10, open_lo=True),
        "batch_size": Param(DQNConfig.batch_size, "int", "transitions per update, drawn from replay (at most the "
                            "replay memory)", lo=1, hi=DQNConfig.replay_size),
        "target_every": Param(DQNConfig.target_every, "int", "updates between target-network syncs", lo=1,
                              hi=100_000),
        "epsilon_end": Param(DQNConfig.epsilon_end, "float", "final exploration rate while training", lo=0, hi=1),
        "seed": Param(DQNConfig.seed, "int", "seed of the weights, episodes, exploration and replay draws",
                      lo=0, hi=MAX_SEED),
    }
    FITTED = ("w0", "b0", "w1", "b1", "w2", "b2")

    def config(self) -> DQNConfig:
        """The training config these parameters describe."""
        return DQNConfig(**{key: value for key, value in self.params.items() if key != "cost_weight"})

    def make_env(self, cal: ExitRecord) -> ExitEnv:
        """The environment this policy trains on: cal's episodes, costs charged with the Q-network's MACs."""
        costs = charged_costs(cal.costs, self.overhead_macs(cal.k, cal.c))
        return ExitEnv(cal, self.params["cost_weight"], costs)

    def fit(self, cal: ExitRecord, callback: Callable[[dict[str, Any]], None] | None = None,
            every: int = 25) -> "DQNPolicy":
        """Fit on a cal record; callback as train_dqn's (live plots). The reports are kept in info["trace"]."""
        self._callback, self._every = callback, every
        try:
            return super().fit(cal)
        finally:
            self._callback = None

    def _fit(self, cal: ExitRecord) -> dict[str, torch.Tensor]:
        if cal.k < 2:
            raise EelabError("policy dqn needs a record with at least 2 exits; with one there is nothing to decide")
        trace: list[dict[str, Any]] = []
        user = getattr(self, "_callback", None)

        def report(row: dict[str, Any]) -> None:
            trace.append(row)
            if user is not None:
                user(row)

        run = train_dqn(self.make_env(cal), self.config(), callback=report, every=getattr(self, "_every", 25))
        self.info.update(fit_seconds=run.seconds, episodes=run.episodes, trace=trace,
                         final_loss=float(sum(run.losses[-50:]) / max(len(run.losses[-50:]), 1)))
        return run.weights

    def overhead_macs(self, num_exits: int, num_classes: int) -> torch.Tensor:
        """MACs of one Q-network evaluation at every exit but the last (features have no matmul and count 0)."""
        f, h = NUM_CONFIDENCE_FEATURES + num_exits, self.params["hidden"]
        dummy = _init_q(f, h, torch.Generator().manual_seed(0))
        macs, _ = count_macs(lambda: q_values(dummy, torch.zeros(1, f)))
        out = torch.full((num_exits,), macs, dtype=torch.float64)
        out[-1] = 0.0
        return out

    def check_exits(self, num_exits: int) -> None:
        super().check_exits(num_exits)
        want = NUM_CONFIDENCE_FEATURES + num_exits
        if self.fitted["w0"].shape[0] != want:
            raise EelabError(f"policy dqn reads {self.fitted['w0'].shape[0]} features but a record with "
                             f"K={num_exits} exits gives {want}; fit it on a cal record of the same model")

    def step(self, k: int, logits_k: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        num_exits = self.fitted["w0"].shape[0] - NUM_CONFIDENCE_FEATURES
        q = q_values(self.fitted, exit_features(k, logits_k, num_exits))
        return greedy_actions(q) == EXIT, state

    @classmethod
    def grid(cls, cal: ExitRecord) -> list[dict[str, Any]]:
        """Nine cost weights from 0 (accuracy only) to 1.5 (cost dominates); other parameters at their defaults."""
        return [{"cost_weight": w} for w in (0.0, 0.05, 0.15, 0.3, 0.45, 0.6, 0.8, 1.1, 1.5)]


def _init_q(f: int, hidden: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Seeded initial Q-network weights (PyTorch's Linear init: uniform within 1 / sqrt(fan_in))."""
    def uniform(*shape: int, fan_in: int) -> torch.Tensor:
        return (torch.rand(*shape, generator=gen) * 2 - 1) / math.sqrt(fan_in)
    return {"w0": uniform(f, hidden, fan_in=f), "b0": uniform(hidden, fan_in=f),
            "w1": uniform(hidden, hidden, fan_in=hidden), "b1": uniform(hidden, fan_in=hidden),
            "w2": uniform(hidden, 2, fan_in=hidden), "b2": uniform(2, fan_in=hidden)}
