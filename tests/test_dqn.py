"""DQN exit agent and its environment: rewards and transitions by hand, the published agent's defects absent
(exit transitions in replay, next state from the next exit, no exploration when deciding, costs from MACs),
seeding, the Q-network's MACs, near-optimal stopping on a record whose P(right | features) is known, and the
gymnasium interface (check_env, stable-baselines3)."""
from __future__ import annotations

import json
from functools import partial

import pytest
import torch

from eelab import testing
from eelab.cli import main
from eelab.errors import EelabError
from eelab.metrics import evaluate
from eelab.policies import DQNPolicy, ExitEnv, exit_features, make_policy, train_dqn
from eelab.policies.dqn import DQNConfig, q_values
from eelab.policies.exit_env import CONTINUE, EXIT, exit_rewards
from eelab.records import ExitRecord
from eelab.testing import record_from_probs, stairs_record

# STAIRS_P (eelab.testing): 3 samples x 3 exits x 3 classes; labels 0, 1, 2. Right at exits:
#   s0: T T T     s1: F T T     s2: F F T
# Costs 1, 1.5, 4 MACs (not proportional to the exit index), full network 3.5.
tiny_record = partial(stairs_record, costs=(1.0, 1.5, 4.0))
random_record = partial(testing.random_record, n=400)  # [N, 4, 5], later exits more often right


# A record with known P(right | features): each sample has a difficulty d; at exit k its top probability is
# M[d][k] whatever happens, and the top class is the label with probability Q[d][k]. Exit k's features then
# reveal d and nothing about whether it is right, so the best any policy can do is the optimal-stopping
# value of the Markov chain (d, k), computed exactly by dynamic programming.
Q = [[0.95, 0.97, 0.98], [0.70, 0.90, 0.93], [0.40, 0.60, 0.90], [0.30, 0.35, 0.40], [0.55, 0.80, 0.85]]
M = [[0.90, 0.93, 0.95], [0.45, 0.55, 0.60], [0.35, 0.40, 0.50], [0.60, 0.65, 0.70], [0.75, 0.80, 0.85]]
REL_COSTS = [0.3, 0.6, 1.0]


def known_record(n: int, seed: int, c: int = 4) -> tuple[ExitRecord, torch.Tensor]:
    """The record above (K = 3, C = 4, costs 0.3, 0.6, 1.0 of full), and each sample's difficulty [N]."""
    gen = torch.Generator().manual_seed(seed)
    d = torch.randint(len(Q), (n,), generator=gen)
    labels = torch.randint(c, (n,), generator=gen)
    q, m = torch.tensor(Q)[d], torch.tensor(M)[d]  # [N, K]
    right = torch.rand(n, 3, generator=gen) < q
    wrong = (labels.unsqueeze(1) + torch.randint(1, c, (n, 3), generator=gen)) % c
    top = torch.where(right, labels.unsqueeze(1), wrong)
    probs = ((1 - m) / (c - 1)).unsqueeze(-1).expand(n, 3, c).clone()
    probs.scatter_(2, top.unsqueeze(-1), m.unsqueeze(-1))
    record = ExitRecord(logits=probs.log(), labels=labels, indices=torch.arange(n),
                        costs=torch.tensor(REL_COSTS, dtype=torch.float64) * 1e6, full_cost=1e6)
    return record, d


def optimal_stopping_value(q: torch.Tensor, rel_costs: torch.Tensor, cost_weight: float) -> torch.Tensor:
    """V(d, 0) by backward induction: V(d, K-1) = r(d, K-1), V(d, k) = max(r(d, k), V(d, k+1)); q [D, K] -> [D]."""
    r = q.double() - cost_weight * rel_costs.double()
    value = r[:, -1]
    for k in range(q.shape[1] - 2, -1, -1):
        value = torch.maximum(r[:, k], value)
    return value


# ---- the environment -------------------------------------------------------------------------------------
def test_rewards_and_transitions_by_hand():
    rec = tiny_record()
    env = ExitEnv(rec, cost_weight=0.5)
    # reward = 1[right] - 0.5 * costs[k] / 3.5, from the MACs, not from the exit index
    want = torch.tensor([[1, 1, 1], [0, 1, 1], [0, 0, 1]]) - 0.5 * torch.tensor([1.0, 1.5, 4.0]) / 3.5
    torch.testing.assert_close(env.rewards, want.float())
    index, k = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 0, 1, 1])
    reward, done, nxt = env.advance(index, k, torch.tensor([EXIT, CONTINUE, EXIT, CONTINUE]))
    # s0 exits at 0; s1 continues to exit 1 (reward 0, goes on); s2 exits at 1; s1 continues from exit 1 into
    # the last exit, which forces an exit: the episode ends with the last exit's reward
    assert done.tolist() == [True, False, True, True] and nxt.tolist() == [0, 1, 1, 2]
    torch.testing.assert_close(reward, torch.stack([want[0, 0], torch.tensor(0.0), want[2, 1], want[1, 2]]).float())
    torch.testing.assert_close(env.observe(index, nxt), torch.stack(
        [exit_features(j, rec.logits[i:i + 1, j], 3)[0] for i, j in zip(index.tolist(), nxt.tolist())]))
    with pytest.raises(EelabError, match="last exit"):
        env.advance(torch.tensor([0]), torch.tensor([2]), torch.tensor([CONTINUE]))


def test_one_episode_through_the_gymnasium_interface():
    env = ExitEnv(tiny_record(), cost_weight=0.5)
    obs, info = env.reset(options={"index": 1})
    assert obs.dtype.name == "float32" and env.observation_space.contains(obs) and info == {"index": 1, "exit": 0}
    obs, reward, terminated, truncated, info = env.step(CONTINUE)
    assert (reward, terminated, truncated, info["exit"]) == (0.0, False, False, 1)
    torch.testing.assert_close(torch.from_numpy(obs), exit_features(1, tiny_record().logits[1:2, 1], 3)[0])
    _, reward, terminated, _, info = env.step(EXIT)
    assert terminated and info["exit"] == 1 and reward == pytest.approx(1 - 0.5 * 1.5 / 3.5)
    one_exit = ExitRecord(logits=torch.zeros(2, 1, 3), labels=torch.zeros(2, dtype=torch.long), indices=torch.arange(2),
                          costs=torch.ones(1, dtype=torch.float64), full_cost=1.0)
    with pytest.raises(EelabError, match="at least 2 exits"):
        ExitEnv(one_exit, 0.1)


def test_gymnasium_check_env_passes():
    from gymnasium.utils.env_checker import check_env

    check_env(ExitEnv(random_record(n=50), cost_weight=0.2), skip_render_check=True)


def test_stable_baselines3_dqn_learns_when_to_stop_on_the_env():
    sb3 = pytest.importorskip("stable_baselines3")
    # K = 2, costs 0.1 and 1 of full. Even samples: exit 0 right and sure (0.95); odd: exit 0 wrong and unsure
    # (0.4); the last exit always right. Cost weight 0.5, so rewards (exit 0, last exit) are (0.95, 0.5) for
    # even and (-0.05, 0.5) for odd samples: stop the sure ones, go on with the unsure ones (mean 0.725); the
    # best single action earns 0.5 (always continue), always exiting 0.45.
    probs = [[[0.95, 0.03, 0.02], [0.8, 0.1, 0.1]], [[0.4, 0.35, 0.25], [0.1, 0.8, 0.1]]] * 50
    rec = record_from_probs(probs, [0, 1] * 50, costs=(0.1, 1.0), full_cost=1.0)
    env = ExitEnv(rec, cost_weight=0.5)
    model = sb3.DQN("MlpPolicy", env, learning_rate=3e-3, learning_starts=100, buffer_size=2000, train_freq=1,
                    exploration_fraction=0.5, seed=0, verbose=0, policy_kwargs={"net_arch": [16]}, device="cpu")
    model.learn(total_timesteps=600)  # each of sb3 seeds 0..13 learns it in 600 steps
    actions = torch.as_tensor(model.predict(env.features[:, 0].numpy(), deterministic=True)[0])
    rewards = torch.where(actions == EXIT, torch.tensor([0.95, -0.05] * 50), torch.tensor(0.5))  # by hand
    assert float(rewards.mean()) > 0.5 + 0.2, actions.tolist()  # above any fixed action: it reads the state
    assert actions.tolist() == [EXIT, CONTINUE] * 50


# ---- the published agent's defects are absent --------------------------------------------------------------
def test_replay_holds_every_transition_with_the_next_exits_state():
    rec = random_record(n=100, k=4)
    env = ExitEnv(rec, cost_weight=0.3)
    run = train_dqn(env, DQNConfig(steps=20, parallel=64, batch_size=64, seed=3))
    r = run.replay
    assert r["obs"].shape[0] == 20 * 64  # one stored transition per decision taken, none dropped
    torch.testing.assert_close(r["obs"], env.features[r["index"], r["exit"]])
    exits = r["action"] == EXIT
    assert exits.any() and r["done"][exits].all()  # exit transitions are stored, as terminal ones
    torch.testing.assert_close(r["reward"][exits], env.rewards[r["index"][exits], r["exit"][exits]])
    cont = r["action"] == CONTINUE
    forced = cont & (r["exit"] == rec.k - 2)  # continuing into the last exit ends there
    assert forced.any() and r["done"][forced].all()
    torch.testing.assert_close(r["reward"][forced], env.rewards[r["index"][forced], rec.k - 1])
    going = cont & ~forced
    assert going.any() and not r["done"][going].any() and (r["reward"][going] == 0).all()
    # the state after "continue" is the next exit's, never the exit just left
    torch.testing.assert_close(r["next_obs"][cont], env.features[r["index"][cont], r["exit"][cont] + 1])
    assert not torch.equal(r["next_obs"][going], r["obs"][going])
    assert run.episodes == int(r["done"].sum())


def test_deciding_is_greedy_and_deterministic():
    cal, test = random_record(seed=1), random_record(seed=2)
    policy = DQNPolicy(cost_weight=0.2, steps=60).fit(cal)
    torch.manual_seed(0)
    first = policy.decide(test)
    torch.manual_seed(1)  # no hidden randomness: a different global seed changes nothing
    assert torch.equal(policy.decide(test), first) and torch.equal(policy.decide(test), first)
    # greedy by hand: the first exit whose Q(exit) beats Q(continue), the last exit otherwise
    greedy = []
    for i in range(test.n):
        for k in range(test.k):
            q = q_values(policy.fitted, exit_features(k, test.logits[i:i + 1, k], test.k))[0]
            if k == test.k - 1 or q[EXIT] > q[CONTINUE]:
                greedy.append(k)
                break
    assert first.tolist() == greedy


def test_same_seed_same_agent_and_exits():
    cal, test = random_record(seed=3), random_record(seed=4)
    a, b = (DQNPolicy(cost_weight=0.1, steps=50, seed=7).fit(cal) for _ in range(2))
    assert all(torch.equal(a.fitted[key], b.fitted[key]) for key in a.fitted)
    assert torch.equal(a.decide(test), b.decide(test))
    c = DQNPolicy(cost_weight=0.1, steps=50, seed=8).fit(cal)
    assert not torch.equal(a.fitted["w0"], c.fitted["w0"])


def test_q_network_macs_by_hand_and_charged_to_the_costs():
    rec = tiny_record()
    policy = DQNPolicy(hidden=4, steps=20).fit(rec)
    f = 5 + 3  # confidence features and a one-hot of 3 exits
    per_exit = f * 4 + 4 * 4 + 4 * 2  # three matmuls: F x H, H x H, H x 2
    assert policy.overhead_macs(3, 3).tolist() == [per_exit, per_exit, 0.0]  # no decision at the last exit
    exits = policy.decide(rec)
    m = evaluate(rec, exits, overhead=policy.overhead_macs(rec.k, rec.c))
    charged = [1.0 + per_exit, 1.5 + 2 * per_exit, 4.0 + 2 * per_exit]
    assert m["exit_macs"] == charged
    assert m["mean_macs"] == pytest.approx(sum(charged[k] for k in exits.tolist()) / 3)
    # the agent's own reward charges the same MACs
    env = policy.make_env(rec)
    torch.testing.assert_close(env.rewards, exit_rewards(rec, policy.params["cost_weight"], torch.tensor(charged)))


# ---- it learns ----------------------------------------------------------------------------------------------
def test_greedy_agent_is_near_the_optimal_stopping_value():
    cal, _ = known_record(4000, seed=0)
    test, d = known_record(4000, seed=1)
    weight = 0.3
    policy = DQNPolicy(cost_weight=weight, steps=600).fit(cal)
    rel = torch.tensor(REL_COSTS, dtype=torch.float64) + policy.overhead_macs(3, 4).cumsum(0) / 1e6
    best = float(optimal_stopping_value(torch.tensor(Q), rel, weight)[d].mean())
    exits = policy.decide(test)
    got = float((torch.tensor(Q, dtype=torch.float64)[d, exits] - weight * rel[exits]).mean())  # expected reward
    assert best == pytest.approx(0.6, abs=0.02)  # (0.86 + 0.72 + 0.60 + 0.21 + 0.62) / 5, minus Q-net MACs
    assert got >= best - 0.02 * abs(best), (got, best, torch.bincount(exits, minlength=3).tolist())


def test_dqn_through_the_cli(tmp_path, capsys):
    random_record(seed=5).save(tmp_path / "test.pt")
    random_record(seed=6).save(tmp_path / "cal.pt")
    code = main(["evaluate", str(tmp_path / "test.pt"), "--policy", "dqn", "--param", "steps=30",
                 "--param", "cost_weight=0.2", "--save-policy", str(tmp_path / "dqn.pt"), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    policy = make_policy(tmp_path / "dqn.pt")
    test = ExitRecord.load(tmp_path / "test.pt")
    want = evaluate(test, policy.decide(test), overhead=policy.overhead_macs(test.k, test.c))
    assert out["mean_macs"] == pytest.approx(want["mean_macs"]) and out["accuracy"] == want["accuracy"]
    assert out["policy_macs"][0] > 0 and out["policy_macs"][-1] == 0
    torch.load(tmp_path / "dqn.pt", weights_only=True)


@pytest.mark.parametrize("params, match", [({"cost_weight": "-1"}, "cost_weight"),
                                           ({"batch_size": "100000"}, r"batch_size .*\[1, 65536\]"),
                                           ({"epsilon_end": "2"}, r"\[0, 1\]")])
def test_bad_parameters_are_one_line_errors(params, match):
    with pytest.raises(EelabError, match=match) as err:
        make_policy("dqn", **params)
    assert "\n" not in str(err.value)


def test_live_reports_change_nothing_and_match_the_fitted_agent():
    cal = random_record(n=600, seed=7)
    rows = []
    live = DQNPolicy(cost_weight=0.4, steps=120).fit(cal, callback=rows.append, every=25)
    quiet = DQNPolicy(cost_weight=0.4, steps=120).fit(cal)
    assert all(torch.equal(live.fitted[key], quiet.fitted[key]) for key in live.fitted)  # no random draws taken
    assert [r["step"] for r in rows] == [25, 50, 75, 100, 120]  # every 25 updates, and after the last
    assert live.info["trace"] == rows and quiet.info["trace"] == rows  # kept with the fit either way
    assert rows[0]["epsilon"] > rows[-1]["epsilon"] and all(r["episodes"] > 0 for r in rows)
    # the last report describes exactly the agent that decides: its exits and its mean reward on cal
    exits = live.decide(cal)
    env = live.make_env(cal)
    fractions = (torch.bincount(exits, minlength=cal.k).double() / cal.n).tolist()
    assert rows[-1]["exit_fractions"] == pytest.approx(fractions, abs=2 / cal.n)
    assert rows[-1]["greedy_reward"] == pytest.approx(float(env.rewards[torch.arange(cal.n), exits].mean()),
                                                      abs=2 / cal.n)
    with pytest.raises(EelabError, match="at least 1"):
        train_dqn(env, DQNConfig(steps=5), callback=rows.append, every=0)
