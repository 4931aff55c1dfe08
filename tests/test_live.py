"""Live early exit equals deciding on the record, for K = 4 exits and stateful policies (one loop: run_policy)."""
import pytest
import torch

from eelab.policies import Param, Policy, make_policy, run_policy
from eelab.records import ExitRecord

# the K=4 tiny net, its images, records, policies and predictor are the `live*` fixtures of conftest.py


@pytest.mark.parametrize("name", ["patience", "budget", "threshold", "dqn"])  # threshold: one per exit
@pytest.mark.parametrize("batch", [1, 64])
def test_live_equals_decide_on_the_record(live, live_policy, live_predictor, name, batch):
    _, images, record, _ = live
    policy = live_policy(name)
    want = policy.decide(record)
    assert len(set(want.tolist())) >= 2, "the comparison must cover several exits"
    pred = live_predictor(policy)
    outs = [pred.predict(images[s:s + batch]) for s in range(0, images.shape[0], batch)]
    exits, logits = torch.cat([o["exits"] for o in outs]), torch.cat([o["logits"] for o in outs])
    assert torch.equal(exits, want)
    torch.testing.assert_close(logits, record.logits[torch.arange(record.n), want], atol=1e-4, rtol=0)
    assert torch.equal(torch.cat([o["macs"] for o in outs]), pred.costs[want])


def test_live_runs_each_stage_only_on_the_samples_still_running(live, live_predictor):
    net, images, record, _ = live
    policy = make_policy("patience", patience=2)
    want = policy.decide(record)
    seen = []
    hooks = [stage.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0])) for stage in net.stages]
    try:
        live_predictor(policy).predict(images)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == [int((want >= k).sum()) for k in range(record.k)]


class _IdPolicy(Policy):
    """Carries each sample's id (planted in logit 0) in its state and checks it against the rows it is shown."""

    name = "id"
    PARAMS = {"period": Param(4, "int", "", lo=1)}

    def step(self, k, logits_k, state):
        ids = logits_k[:, 0].long()
        if state is not None:
            assert torch.equal(state["id"], ids), f"state rows do not follow the samples at exit {k}"
            assert torch.equal(state["seen"], torch.full_like(ids, k)), "state lost a step"
        # stop a different subset at each exit, so rows shrink at every step
        stop = (ids + k) % self.params["period"] == 0
        return stop, {"id": ids, "seen": torch.full_like(ids, k + 1)}


def test_stateful_state_follows_its_samples_across_three_shrinks():
    n, k = 40, 5
    logits = torch.zeros(n, k, 3)
    logits[:, :, 0] = torch.arange(n, dtype=torch.float32).unsqueeze(1)  # each sample's id at every exit
    record = ExitRecord(logits=logits, labels=torch.zeros(n, dtype=torch.long), indices=torch.arange(n),
                        costs=torch.arange(1.0, k + 1, dtype=torch.float64), full_cost=float(k))
    fetched = []

    def fetch(j, rows):
        fetched.append(rows.clone())
        return record.logits[rows, j]

    exits = run_policy(_IdPolicy(), k, fetch, n)
    sizes = [r.numel() for r in fetched]
    assert sizes[0] == n and all(a > b > 0 for a, b in zip(sizes, sizes[1:4])), sizes  # three shrinks, survivors left
    # the slow obvious loop: each sample on its own
    for i in range(n):
        want = next((j for j in range(k - 1) if (i + j) % 4 == 0), k - 1)
        assert exits[i] == want
    assert torch.equal(exits, _IdPolicy().decide(record))
