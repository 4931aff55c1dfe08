"""EENets confidence branches: the cost-aware objective, branch costs, training and records."""
import pytest
import torch
from torch import nn

from eelab.errors import EelabError
from eelab.models import ModelConfig, MultiExitNet, add_confidence_branches, build_model, measure_costs
from eelab.records import record_checkpoint
from eelab.checkpoint import load_checkpoint
from eelab.training import eenet_loss, train

from conftest import tiny_config


def test_eenet_loss_by_hand():
    # K = 2, C = 2, one sample of class 0: p0 = (0.8, 0.2), p1 = (0.6, 0.4), h0 = 0.25, costs (0.5, 1.0)
    logits = torch.log(torch.tensor([[[0.8, 0.2], [0.6, 0.4]]]))
    h = torch.tensor([[0.25, 0.9]])                      # h of the last exit is never used
    costs = torch.tensor([0.5, 1.0])
    y0 = 0.25 * 0.8 + 0.75 * 0.6                         # 0.65
    c0 = 0.25 * 0.5 + 0.75 * 1.0                         # 0.875
    got = eenet_loss(logits, h, torch.tensor([0]), costs, cost_weight=0.3)
    assert got.item() == pytest.approx(-torch.log(torch.tensor(y0)).item() + 0.3 * c0, rel=1e-6)
    # confident early exits lower the cost term: its gradient pushes h0 up when exit 0 is cheaper
    h.requires_grad_(True)
    eenet_loss(logits, h, torch.tensor([0]), costs, cost_weight=10.0).backward()
    assert h.grad[0, 0] < 0 and h.grad[0, 1] == 0


def test_confidence_branch_costs_by_hand():
    stages = [nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.Conv2d(2, 4, 3, padding=1, bias=False)]
    heads = [nn.Sequential(nn.Flatten(), nn.Linear(32, 3)), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                                           nn.Linear(4, 3))]
    m = add_confidence_branches(MultiExitNet(stages, heads), in_channels=1)
    costs, full = measure_costs(m, (1, 4, 4))
    # as test_models' hand count, plus the branches: Linear(2, 1) = 2 MACs at exit 0, Linear(4, 1) = 4 at exit 1
    assert costs.tolist() == [288 + 96 + 2, 288 + 96 + 2 + 1152 + 12 + 4]
    assert full == 288 + 1152 + 12
    logits, conf = m.forward_with_confidences(torch.randn(5, 1, 4, 4))
    assert logits.shape == (5, 2, 3) and conf.shape == (5, 2) and ((conf > 0) & (conf < 1)).all()


def test_eenet_fine_tune_from_a_plain_checkpoint_and_record(tmp_path, tiny_folder, tiny_checkpoint):
    cfg = tiny_config(tiny_folder, objective="eenet", cost_weight=0.5, init=str(tiny_checkpoint), epochs=1)
    train(cfg, tmp_path / "ee", progress=False)
    model, conf_cfg = load_checkpoint(tmp_path / "ee")
    assert model.has_confidence and conf_cfg["model"]["confidence"] is True
    rec = record_checkpoint(tmp_path / "ee", "test", progress=False)
    assert rec.confidences is not None and rec.confidences.shape == (rec.n, 2)
    assert ((rec.confidences > 0) & (rec.confidences < 1)).all()
    plain = record_checkpoint(tiny_checkpoint, "test", progress=False)
    assert rec.costs[0] > plain.costs[0] and rec.full_cost == plain.full_cost   # branches cost MACs
    with pytest.raises(EelabError, match="unknown objective"):
        train(tiny_config(tiny_folder, objective="magic"), tmp_path / "x", progress=False)
    with pytest.raises(EelabError, match="cost-weight"):
        train(tiny_config(tiny_folder, objective="eenet", cost_weight=-1.0), tmp_path / "y", progress=False)


def test_model_config_with_confidence_round_trips():
    cfg = ModelConfig(name="tiny_cnn", widths=(4, 8), head_hidden=8, confidence=True)
    m = build_model(cfg)
    assert m.has_confidence and ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert not build_model(ModelConfig(name="tiny_cnn", widths=(4, 8))).has_confidence


def _conf_record():
    from eelab.records import ExitRecord
    logits = torch.zeros(4, 3, 2)
    conf = torch.tensor([[0.9, 0.1, 0.2], [0.2, 0.6, 0.0], [0.1, 0.2, 0.3], [0.5, 0.9, 0.9]])
    return ExitRecord(logits, torch.zeros(4, dtype=torch.long), torch.arange(4), torch.tensor([1.0, 2.0, 3.0]),
                      3.0, {}, confidences=conf)


def test_confidence_policy_by_hand_and_in_the_registry():
    from eelab.policies import POLICIES, make_policy
    assert "confidence" in POLICIES
    rec = _conf_record()
    assert make_policy("confidence").decide(rec).tolist() == [0, 1, 2, 0]          # first h_k >= 0.5
    assert make_policy("confidence", threshold=0.85).decide(rec).tolist() == [0, 2, 2, 1]
    with pytest.raises(EelabError, match="lacks"):
        make_policy("confidence").decide(rec.subset(slice(None)).__class__(
            rec.logits, rec.labels, rec.indices, rec.costs, rec.full_cost, {}))


def test_live_confidence_matches_the_record(tmp_path, tiny_folder, tiny_checkpoint):
    from eelab.data import load_dataset
    from eelab.inference import EarlyExitPredictor
    from eelab.policies import make_policy
    train(tiny_config(tiny_folder, objective="eenet", cost_weight=0.2, init=str(tiny_checkpoint), epochs=1),
          tmp_path / "ee", progress=False)
    rec = record_checkpoint(tmp_path / "ee", "test", progress=False)
    thr = float(rec.confidences[:, 0].median())
    policy = make_policy("confidence", threshold=thr)
    want = policy.decide(rec)
    _, cfg = load_checkpoint(tmp_path / "ee")
    got = EarlyExitPredictor.from_checkpoint(tmp_path / "ee", policy).predict(
        load_dataset(cfg["dataset"], progress=False).test_images)
    clear = (rec.confidences[:, 0] - thr).abs() > 1e-4
    assert torch.equal(got["exits"][clear], want[clear]) and clear.sum() >= rec.n - 2
    with pytest.raises(EelabError, match="no confidence"):
        EarlyExitPredictor.from_checkpoint(tiny_checkpoint, "confidence")
