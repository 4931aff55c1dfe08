import pytest
import torch
from torch import nn

from eelab.errors import EelabError
from eelab.models import ModelConfig, MultiExitNet, build_model, count_parameters, measure_costs


def _hand_model() -> MultiExitNet:
    stages = [nn.Conv2d(1, 2, 3, padding=1, bias=False), nn.Conv2d(2, 4, 3, padding=1, bias=False)]
    heads = [nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3)),
             nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))]
    return MultiExitNet(stages, heads)


def test_costs_match_hand_count():
    # stage0: 4x4 outputs x 2 channels x (3x3x1) = 288; head0: 32 x 3 = 96
    # stage1: 4x4 x 4 x (3x3x2) = 1152; head1: 4 x 3 = 12 (pooling is free)
    costs, full = measure_costs(_hand_model(), (1, 4, 4))
    assert costs.tolist() == [288 + 96, 288 + 96 + 1152 + 12]
    assert full == 288 + 1152 + 12


def test_ee_cnn_shape_costs_and_parameters():
    m = build_model(ModelConfig())
    costs, full = measure_costs(m, (3, 32, 32))
    assert 200e6 < full < 215e6                       # ~209 M MACs
    frac = (costs / full).tolist()
    for got, want in zip(frac, [0.19, 0.46, 0.73, 1.0]):
        assert abs(got - want) < 0.015
    assert all(a < b for a, b in zip(costs, costs[1:]))
    assert full < costs[-1] < 1.05 * full              # heads 0..2 cost something
    assert 4.5e6 < count_parameters(m) < 6.5e6
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 4, 10)
    torch.testing.assert_close(m.forward_plain(x), out[:, -1])


@pytest.mark.parametrize("head", ["linear", "mlp", "conv"])
def test_heads_change_cost_not_shape(head):
    m = build_model(ModelConfig(name="tiny_cnn", widths=(4, 8), head=head, head_hidden=8, num_classes=5)).eval()
    assert m(torch.randn(3, 3, 8, 8)).shape == (3, 2, 5)


def test_unknown_factory_and_head_are_one_line_errors():
    with pytest.raises(EelabError, match="unknown model 'nope'.*ee_cnn"):
        build_model(ModelConfig(name="nope"))
    with pytest.raises(EelabError, match="unknown head kind"):
        build_model(ModelConfig(head="huge"))


def test_model_config_round_trip_and_unknown_field():
    cfg = ModelConfig(widths=(8, 16), head="linear")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(EelabError, match="unknown field"):
        ModelConfig.from_dict({**cfg.to_dict(), "depth": 3})
