"""Streamed early exit: the same answers as the record and as batch-by-batch predict, in input order, bounded."""
import pytest
import torch

from eelab.errors import EelabError
from eelab.policies import POLICIES, make_policy
from eelab.testing import random_record

# parameters that keep each family fast and its decisions spread over several exits
FAST = {"alpha": {"steps": 30}, "dqn": {"steps": 60, "batch_size": 64}, "static": {"exit": 1},
        "threshold": {"threshold": 0.6, "temperature": True}, "patience": {"patience": 2}, "budget": {"budget": 0.6}}


@pytest.mark.parametrize("name", sorted(set(POLICIES) - {"oracle"}))
def test_every_live_policy_decides_each_row_on_its_own(name):
    """Row independence, which streaming relies on: a batch decides as its rows one at a time."""
    cal, test = (random_record(200, k=4, seed=s, confidences=True, difficulty=True) for s in (0, 1))
    policy = make_policy(name, **FAST.get(name, {}))
    if policy.needs_fit():
        policy.fit(cal)
    together = policy.decide(test.subset(slice(0, 60)))
    alone = torch.cat([policy.decide(test.subset([i])) for i in range(60)])
    assert torch.equal(together, alone)
    assert len(set(together.tolist())) >= 2 or name == "static"


def test_oracle_is_the_one_policy_that_does_not_run_live():
    with pytest.raises(EelabError, match="only decides on exit records"):
        make_policy("oracle").step(0, torch.zeros(2, 3), None)


@pytest.mark.parametrize("name", ["threshold", "patience", "budget", "dqn"])
@pytest.mark.parametrize("batch,wait,feed", [(16, 0, 1), (16, 3, 5), (64, 1, 70), (7, 100, 3)])
def test_stream_equals_the_record_and_predict(live, live_policy, live_predictor, name, batch, wait, feed):
    _, images, record, _ = live
    policy = live_policy(name)
    want = policy.decide(record)
    assert len(set(want.tolist())) >= 2, "the comparison must cover several exits"
    pred = live_predictor(policy)
    pieces = [images[s:s + feed] for s in range(0, images.shape[0], feed)]
    if feed == 1:
        pieces = [p[0] for p in pieces]  # single images [ch, H, W]
    out = list(pred.stream(iter(pieces), batch=batch, wait=wait))
    assert [o.index for o in out] == list(range(images.shape[0]))  # input order
    exits, logits = torch.tensor([o.exit for o in out]), torch.stack([o.logits for o in out])
    assert torch.equal(exits, want)
    torch.testing.assert_close(logits, record.logits[torch.arange(record.n), want], atol=1e-4, rtol=0)
    by_batch = [pred.predict(images[s:s + batch]) for s in range(0, images.shape[0], batch)]
    assert torch.equal(exits, torch.cat([b["exits"] for b in by_batch]))
    torch.testing.assert_close(logits, torch.cat([b["logits"] for b in by_batch]), atol=1e-4, rtol=0)
    assert [o.macs for o in out] == pred.costs[want].tolist()


@pytest.mark.parametrize("wait", [0, 2, 10**6])
def test_stream_is_bounded(live, live_predictor, wait):
    """No stage runs on more than a batch, fewer than two batches wait before any stage, and an image is
    answered at most `wait` input batches after it arrived; with nothing flushed early, every stage runs at
    full batch until the stream ends."""
    net, images, record, _ = live
    images = torch.cat([images] * 3)  # 210 images
    batch, pulled, events = 8, [0], []
    pred = live_predictor(make_policy("patience", patience=2))

    def one_by_one():
        for img in images:
            pulled[0] += 1
            yield img

    rows_seen = []
    hooks = [stage.register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[0])) for stage in net.stages]
    try:
        out = []
        for o in pred.stream(one_by_one(), batch=batch, wait=wait,
                             trace=lambda e: events.append({**e, "pulled": pulled[0]})):
            assert pulled[0] <= (o.index // batch + 1 + min(wait, 10**3)) * batch  # answered in bounded time
            out.append(o)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(out) == images.shape[0] and max(rows_seen) <= batch and len(rows_seen) == len(events)
    assert all(e["rows"] <= batch and max(e["queued"]) < 2 * batch for e in events)
    assert sum(e["rows"] for e in events if e["stage"] == 0) == images.shape[0]
    assert max(max(e["queued"][1:]) for e in events) >= batch  # the bound above was reached, not vacuous
    if wait == 0:  # flushed every input batch: each stage runs once per input batch at most, as predict does
        assert sum(e["rows"] < batch for e in events if e["stage"] > 0) > 0
    if wait == 10**6:
        assert all(e["rows"] == batch for e in events if e["pulled"] < images.shape[0])


def test_stream_takes_any_iterable_and_refuses_what_is_no_image(live, live_predictor):
    _, images, _, _ = live
    pred = live_predictor(make_policy("threshold", threshold=0.5))
    assert list(pred.stream([], batch=4)) == []
    assert len(list(pred.stream(images.split(9), batch=4))) == images.shape[0]
    with pytest.raises(EelabError, match="uint8 images"):
        list(pred.stream([images.float()], batch=4))
    with pytest.raises(EelabError, match="batch >= 1"):
        list(pred.stream(images, batch=0))


def test_ideal_streaming_saving_by_hand():
    """Perfect streaming saves what the stages the images skip cost at full batch: stages of 4 / 2 / 1 / 1 ms
    (heads 0.5 ms each, plain 8.5 ms), half the images leaving at exit 0 and the rest at exit 3, cost
    (4 + 0.5) + 0.5 (2 + 0.5 + 1 + 0.5 + 1 + 0.5) = 7.25 ms."""
    from eelab.inference import ideal_streaming_saving

    profile = {"plain_ms": 8.5, "stages": [{"stage_ms": t, "head_ms": 0.5} for t in (4.0, 2.0, 1.0, 1.0)]}
    assert ideal_streaming_saving(profile, [0.5, 0.0, 0.0, 0.5]) == pytest.approx(1 - 7.25 / 8.5)
    assert ideal_streaming_saving(profile, [0.0, 0.0, 0.0, 1.0]) == pytest.approx(1 - 10.0 / 8.5)  # every head is paid for
    assert ideal_streaming_saving(profile, [1.0, 0.0, 0.0, 0.0]) == pytest.approx(1 - 4.5 / 8.5)
    with pytest.raises(EelabError, match="3 exit fractions for a profile of 4 stages"):
        ideal_streaming_saving(profile, [0.5, 0.5, 0.0])
