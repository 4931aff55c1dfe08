"""eelab.testing keeps its promises: seeded records whose later exits are more often right, the hand-made
tables' right/wrong patterns, and a seeded tiny net whose exits disagree."""
from __future__ import annotations

import pytest
import torch

from eelab.testing import random_record, stairs_record, tiny_inputs, tiny_net, tiny_record, tiny_record_of


def right(rec) -> list[list[int]]:
    return (rec.logits.argmax(-1) == rec.labels[:, None]).int().tolist()


def test_random_record_is_seeded_and_later_exits_are_more_often_right():
    a = random_record(seed=1)
    assert torch.equal(a.logits, random_record(seed=1).logits)
    assert not torch.equal(a.logits, random_record(seed=2).logits)
    accuracy = torch.tensor(right(a)).double().mean(0).tolist()
    assert accuracy == sorted(accuracy) and accuracy[-1] - accuracy[0] > 0.3
    assert a.costs.tolist() == pytest.approx([0.3e6, 0.5667e6, 0.8333e6, 1.1e6], rel=1e-4) and a.full_cost == 1e6
    with_conf = random_record(seed=1, confidences=True, sha="ab" * 32)  # drawn last: the logits stay the same
    assert torch.equal(with_conf.logits, a.logits) and with_conf.confidences.shape == (300, 4)
    assert with_conf.meta == {"checkpoint_sha256": "ab" * 32} and a.confidences is None
    gen = torch.Generator().manual_seed(1)  # a generator: consecutive records from one stream
    first, second = random_record(seed=gen), random_record(seed=gen)
    assert torch.equal(first.logits, a.logits) and not torch.equal(second.logits, a.logits)


def test_hand_made_tables_are_right_where_their_comments_say():
    assert right(tiny_record()) == [[1, 1, 1], [0, 1, 1], [0, 0, 1], [1, 0, 0]]
    assert right(stairs_record()) == [[1, 1, 1], [0, 1, 1], [0, 0, 1]]
    assert tiny_record().costs.tolist() == [1.0, 2.0, 4.0] and tiny_record().full_cost == 3.5


def test_tiny_net_is_seeded_and_its_exits_disagree():
    state = torch.random.get_rng_state()
    net = tiny_net(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global random state is left alone
    x = tiny_inputs(64)
    with torch.no_grad():
        logits = net(x)
        assert logits.shape == (64, 4, 5) and torch.equal(tiny_net(seed=0)(x), logits)
        assert not torch.equal(tiny_net(seed=1)(x), logits)
    pred, top = logits.argmax(-1), logits.softmax(-1).amax(-1)
    assert all((pred[:, k] != pred[:, -1]).any() for k in range(3))
    stop = top[:, :-1] >= 0.7  # a max-prob threshold leaves samples at every exit
    exits = torch.where(stop.any(1), stop.int().argmax(1), 3)
    assert (torch.bincount(exits, minlength=4) > 0).all(), exits.tolist()
    rec = tiny_record_of(net, x)
    assert torch.equal(rec.logits, logits) and torch.equal(rec.labels, pred[:, -1])
    assert rec.costs.tolist() == sorted(rec.costs.tolist()) and rec.costs[-1] > rec.full_cost  # heads cost MACs
