import json
from dataclasses import replace

import pytest
import torch

import eelab.training as training
from eelab.checkpoint import load_checkpoint
from eelab.errors import EelabError
from eelab.training import TrainConfig, train

from conftest import tiny_config


def _weights(path):
    return torch.load(path / "model.pt", weights_only=True)


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_layout_and_round_trip(tiny_checkpoint):
    ck = tiny_checkpoint
    for f in ("model.pt", "config.json", "history.json", "state.pt"):
        assert (ck / f).is_file()
    assert not list(ck.glob("*.tmp"))                       # atomic writes leave no temp files
    cfg = json.loads((ck / "config.json").read_text())
    assert cfg["factory"] == "tiny_cnn" and cfg["class_names"] == ["blue", "green", "red"]
    assert cfg["input_shape"] == [3, 8, 8] and len(cfg["mean"]) == 3 and cfg["seed"] == 0
    hist = json.loads((ck / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]
    assert len(hist[-1]["cal_acc"]) == 2
    model, _ = load_checkpoint(ck)
    assert _same(model.state_dict(), _weights(ck))
    assert not model.training


def test_same_seed_same_numbers_and_other_seed_differs(tmp_path, tiny_folder):
    train(tiny_config(tiny_folder), tmp_path / "a", progress=False)
    train(tiny_config(tiny_folder), tmp_path / "b", progress=False)
    train(tiny_config(tiny_folder, seed=1), tmp_path / "c", progress=False)
    assert _same(_weights(tmp_path / "a"), _weights(tmp_path / "b"))
    assert not _same(_weights(tmp_path / "a"), _weights(tmp_path / "c"))


def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_folder):
    cfg = tiny_config(tiny_folder, epochs=3)
    train(cfg, tmp_path / "full", progress=False)

    def crash_after_first_epoch(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, callback=crash_after_first_epoch)
    assert json.loads((tmp_path / "cut" / "history.json").read_text())[-1]["epoch"] == 1
    with pytest.raises(EelabError, match="--resume"):
        train(cfg, tmp_path / "cut", progress=False)          # never overwrite a run silently
    # eval_batch_size may change on resume (it only batches the watched cal check): the new value is used
    train(replace(cfg, eval_batch_size=5), tmp_path / "cut", resume=True, progress=False)
    assert _same(_weights(tmp_path / "full"), _weights(tmp_path / "cut"))
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["train"]["eval_batch_size"] == 5
    h_full = json.loads((tmp_path / "full" / "history.json").read_text())
    h_cut = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["train_loss"] for h in h_full] == [h["train_loss"] for h in h_cut]


def test_nan_loss_stops_with_last_checkpoint_intact(tmp_path, tiny_folder, monkeypatch):
    real = training.multi_exit_loss
    calls = {"n": 0}

    def poisoned(*args, **kw):
        calls["n"] += 1
        loss = real(*args, **kw)
        return loss * float("nan") if calls["n"] > 3 else loss   # 3 steps = epoch 1 of 18 images / batch 6

    monkeypatch.setattr(training, "multi_exit_loss", poisoned)
    with pytest.raises(EelabError, match="loss became nan at epoch 2.*epoch 1 .*intact"):
        train(tiny_config(tiny_folder), tmp_path / "r", progress=False)
    st = torch.load(tmp_path / "r" / "state.pt", weights_only=True)
    assert st["epoch"] == 1
    model, _ = load_checkpoint(tmp_path / "r")
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_heads_only_keeps_the_backbone(tmp_path, tiny_folder, tiny_checkpoint):
    train(tiny_config(tiny_folder, heads_only=True, init=str(tiny_checkpoint), epochs=1), tmp_path / "h",
          progress=False)
    before, after = _weights(tiny_checkpoint), _weights(tmp_path / "h")
    stages = [k for k in before if k.startswith("stages.")]
    heads = [k for k in before if k.startswith("heads.") and before[k].is_floating_point()]
    assert stages and all(torch.equal(before[k], after[k]) for k in stages)
    assert any(not torch.equal(before[k], after[k]) for k in heads)
    with pytest.raises(EelabError, match="--init"):
        train(tiny_config(tiny_folder, heads_only=True), tmp_path / "h2", progress=False)


def test_distillation_and_half_weights(tmp_path, tiny_folder):
    train(tiny_config(tiny_folder, distill=0.5, epochs=1, optimizer="adamw", schedule="cosine", lr=None),
          tmp_path / "d", progress=False, half_weights=True)
    w = _weights(tmp_path / "d")
    assert w["stages.0.0.weight"].dtype == torch.float16
    model, _ = load_checkpoint(tmp_path / "d")
    assert next(model.parameters()).dtype == torch.float32


def test_half_weights_keep_values_beyond_fp16_in_fp32(tmp_path):
    from eelab.checkpoint import save_checkpoint
    from eelab.testing import tiny_net

    net = tiny_net(num_exits=2, num_classes=3, seed=0)
    with torch.no_grad():  # a batch-norm-like buffer of an unsettled net, past fp16's 65504
        next(net.parameters()).fill_(1e6)
    save_checkpoint(tmp_path, net, {"format": "x"}, [], {}, half_weights=True)
    weights = torch.load(tmp_path / "model.pt", weights_only=True)
    big, *rest = weights.values()
    assert big.dtype == torch.float32 and torch.isfinite(big).all() and float(big.max()) == 1e6
    assert {w.dtype for w in rest if w.is_floating_point()} == {torch.float16}


def test_multi_exit_loss_hand_computed():
    logits = torch.zeros(2, 2, 3)                   # uniform predictions: CE = log 3 at every exit
    labels = torch.tensor([0, 1])
    loss = training.multi_exit_loss(logits, labels, torch.tensor([0.5, 1.0]))
    assert loss.item() == pytest.approx(1.5 * torch.log(torch.tensor(3.0)).item(), rel=1e-6)
    # distilling identical uniform exits adds nothing
    assert training.multi_exit_loss(logits, labels, torch.tensor([0.5, 1.0]), distill=1.0).item() == \
        pytest.approx(loss.item(), rel=1e-6)


def test_precision_choice():
    cpu = torch.device("cpu")
    assert training.choose_precision("fp32", cpu) is None
    assert training.choose_precision("bf16", cpu) == torch.bfloat16
    assert training.choose_precision("auto", cpu, bf16_flags=["avx512_bf16"]) == torch.bfloat16
    assert training.choose_precision("auto", cpu, bf16_flags=[]) is None
    auto = training.choose_precision("auto", cpu)
    assert auto == (torch.bfloat16 if training.cpu_bf16_flags() else None)
    with pytest.raises(EelabError, match="CUDA"):
        training.choose_precision("fp16", cpu)


def test_bf16_flags_read_from_cpuinfo():
    zen = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
    xeon_icelake = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
    spr = "processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n"
    assert training.cpu_bf16_flags(xeon_icelake) == []
    assert training.cpu_bf16_flags(zen) == ["avx512_bf16"]
    assert training.cpu_bf16_flags(spr)[:2] == ["amx_bf16", "avx512_bf16"]
    assert "avx512_bf16" not in training.cpu_bf16_flags("model name\t: avx512_bf16 in a name, not a flag\n")


def test_bad_options_are_clear(tmp_path, tiny_folder):
    with pytest.raises(EelabError, match="--train-samples 10000 is more than the 18 training images"):
        train(tiny_config(tiny_folder, train_samples=10_000), tmp_path / "x", progress=False)
    with pytest.raises(EelabError, match="loss-weights needs 2"):
        train(tiny_config(tiny_folder, loss_weights=(1.0,)), tmp_path / "y", progress=False)


@pytest.mark.parametrize("changes, message", [
    ({"optimizer": "adam"}, "unknown optimizer 'adam'; use one of sgd, adamw"),
    ({"schedule": "step"}, "unknown schedule 'step'; use one of onecycle, cosine"),
    ({"precision": "fp8"}, "unknown precision 'fp8'; use one of auto, fp32, bf16, fp16"),
    ({"epochs": 0}, "--epochs must be at least 1, got 0"),
    ({"batch_size": 1}, "--batch-size must be at least 2"),
    ({"lr": -0.1}, "--lr must be above 0, got -0.1"),
    ({"label_smoothing": 1.0}, "--label-smoothing must be in [0, 1), got 1.0"),
    ({"loss_weights": (1.0, -1.0)}, "--loss-weights must be one value of at least 0 per exit"),
    ({"train_samples": 0}, "--train-samples must be at least 1, got 0"),
    ({"cal_size": -1}, "--cal-size must be at least 0, got -1"),
    ({"cost_weight": -1.0}, "--cost-weight must be at least 0"),
    ({"heads_only": True}, "--heads-only trains heads on a trained backbone: pass --init CHECKPOINT"),
    ({"plain": True, "distill": 0.5}, "--plain trains the last exit alone; drop --loss-weights and --distill"),
    ({"objective": "eenet", "plain": True}, "drop --plain/--heads-only"),
])
def test_config_refuses_bad_values_when_made(changes, message):
    with pytest.raises(EelabError) as e:
        TrainConfig(**changes)
    assert message in str(e.value) and "\n" not in str(e.value)
    TrainConfig.from_dict(TrainConfig().to_dict())          # the defaults pass, and survive a round trip


def test_resume_refuses_a_changed_config_and_takes_the_original_one(tmp_path, tiny_folder, monkeypatch):
    monkeypatch.chdir(tiny_folder.parent)
    cfg = tiny_config(tiny_folder, epochs=1, dataset=f"folder:{tiny_folder.name}")   # a relative path
    train(cfg, tmp_path / "r", progress=False)
    for changed, flags in [({"lr": 0.01}, "--lr"), ({"epochs": 2, "seed": 3}, "--epochs, --seed"),
                           ({"model": replace(cfg.model, head="linear")}, "--head"),
                           ({"augment": False}, "--no-augment")]:
        with pytest.raises(EelabError, match=f"but {flags} changed; drop (it|them) or train into a new --out"):
            train(replace(cfg, **changed), tmp_path / "r", resume=True, progress=False)
    # the config as first given (relative folder, default classes and channels) resolves to the saved one
    saved = json.loads((tmp_path / "r" / "config.json").read_text())["train"]
    assert saved["model"]["num_classes"] == 3 and saved["dataset"] == f"folder:{tiny_folder.resolve()}"
    assert cfg.model.num_classes == 10
    before = _weights(tmp_path / "r")
    train(cfg, tmp_path / "r", resume=True, progress=False)                  # a finished run: nothing to do
    assert _same(before, _weights(tmp_path / "r"))
    with pytest.raises(EelabError, match="nothing to resume"):
        train(cfg, tmp_path / "none", resume=True, progress=False)


# ---- the fast recipe's options (issue #14): any model can use them; ee_airnet is built for them -------------------
def test_triangle_schedule_warms_up_then_decays():
    f = [training.triangle(step, total_steps=100) for step in range(101)]
    assert f[0] == pytest.approx(0.2) and f[23] == pytest.approx(1.0) and f[100] == pytest.approx(0.07)
    assert all(a < b for a, b in zip(f[:23], f[1:24])) and all(a > b for a, b in zip(f[23:100], f[24:]))


def test_alternate_flips_flip_each_image_every_other_epoch():
    e0, e1, e2 = (training.alternate_flips(1000, epoch, seed=0) for epoch in range(3))
    assert torch.equal(e0, ~e1) and torch.equal(e0, e2) and 400 < int(e0.sum()) < 600
    assert not torch.equal(e0, training.alternate_flips(1000, 0, seed=1))


def _model_and_average():
    """Two batch norms: the model's weights 3 and 7 batches counted, the average's weights 1."""
    model, avg = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        model.weight.fill_(3.0)
        avg.weight.fill_(1.0)
    model.num_batches_tracked.fill_(7)
    return model, avg


def test_update_ema_hand_computed():
    model, ema = _model_and_average()
    training.update_ema(ema, model, decay=0.75)
    assert ema.weight.tolist() == [1.5, 1.5] and int(ema.num_batches_tracked) == 7  # 0.75 x 1 + 0.25 x 3
    assert model.weight.tolist() == [3.0, 3.0]  # the model is left alone


def test_update_lookahead_hand_computed_pulls_the_model_back():
    model, slow = _model_and_average()
    training.update_lookahead(slow, model, decay=0.75)
    assert slow.weight.tolist() == [1.5, 1.5] and model.weight.tolist() == [1.5, 1.5]  # the model is pulled back
    assert int(slow.num_batches_tracked) == 7
    with torch.no_grad():
        model.weight.fill_(5.0)
    training.update_lookahead(slow, model, decay=1.0)  # the end of the run: the slow weights, unchanged
    assert model.weight.tolist() == [1.5, 1.5]
    assert training.lookahead_decay(0, 100) == 0.0  # at first the slow copy jumps to the model
    assert training.lookahead_decay(50, 100) == pytest.approx(0.95 ** 5 / 8)
    assert training.lookahead_decay(100, 100) == pytest.approx(0.95 ** 5)
    with pytest.raises(EelabError, match="--ema and --lookahead are two weight averages"):
        training.TrainConfig(ema=0.9, lookahead=5)
    with pytest.raises(EelabError, match="--lookahead must be at least 0"):
        training.TrainConfig(lookahead=-1)


def test_lookahead_run_ends_on_its_slow_weights_and_resumes_the_same(tmp_path, tiny_folder):
    from eelab.models import ModelConfig

    cfg = tiny_config(tiny_folder, model=ModelConfig(name="ee_airnet", widths=(8, 16, 16), head_hidden=8),
                      image_size=16, epochs=3, whiten=True, lookahead=2, flip="alternate", translate=2,
                      schedule="triangle", momentum=0.85)
    train(cfg, tmp_path / "full", progress=False)
    state = torch.load(tmp_path / "full" / "state.pt", weights_only=True)
    saved = _weights(tmp_path / "full")
    assert _same(saved, state["slow"]) and _same(state["model"], state["slow"])  # the last step put it there
    plain = replace(cfg, lookahead=0)
    train(plain, tmp_path / "none", progress=False)
    assert not _same(saved, _weights(tmp_path / "none"))  # look-ahead changed the weights

    def crash_after_first_epoch(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, callback=crash_after_first_epoch)
    train(cfg, tmp_path / "cut", resume=True, progress=False)  # the slow copy comes back from state.pt
    assert _same(saved, _weights(tmp_path / "cut"))


def test_whitening_makes_the_patch_covariance_the_identity():
    from eelab.models import ModelConfig, build_model

    g = torch.Generator().manual_seed(0)
    base = torch.rand(64, 1, 16, 16, generator=g)
    images = (255 * torch.cat([base, 0.5 * base + 0.5 * torch.rand(64, 1, 16, 16, generator=g),
                               torch.rand(64, 1, 16, 16, generator=g)], 1)).to(torch.uint8)  # correlated channels
    model = build_model(ModelConfig(name="ee_airnet", widths=(8, 16, 16)))
    conv = training.whiten_first_conv(model, images, [0.5] * 3, [0.25] * 3, eps=0.0)
    assert conv.out_channels == 24 and not conv.weight.requires_grad and conv.bias.requires_grad
    from eelab.data import prepare

    x = prepare(images, [0.5] * 3, [0.25] * 3).double()
    out = torch.nn.functional.conv2d(x, conv.weight.double())[:, :12]  # the 12 whitened channels
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12)
    torch.testing.assert_close(flat.T @ flat / flat.shape[0], torch.eye(12, dtype=torch.float64), atol=1e-6, rtol=0)
    with pytest.raises(EelabError, match="--whiten needs a first conv"):
        training.whiten_first_conv(build_model(ModelConfig(name="tiny_cnn", widths=(4, 8))), images, [0.5] * 3,
                                   [0.25] * 3)


def test_ee_airnet_exits_sit_along_its_cost():
    from eelab.models import ModelConfig, build_model, measure_costs

    costs, full = measure_costs(build_model(ModelConfig(name="ee_airnet")), (3, 32, 32))
    share = (costs / full).tolist()
    assert 110e6 < full < 125e6  # about airbench94's 118 M MACs
    assert all(abs(a - b) < 0.02 for a, b in zip(share, [0.19, 0.47, 0.71, 1.0])), share  # the 20/45/70/100


def test_the_fast_recipe_trains_resumes_and_saves_the_average(tmp_path, tiny_folder):
    from eelab.models import ModelConfig

    cfg = tiny_config(tiny_folder, model=ModelConfig(name="ee_airnet", widths=(8, 16, 16), head_hidden=8),
                      image_size=16, epochs=3, whiten=True, ema=0.8, flip="alternate", translate=2,
                      schedule="triangle", bn_lr_scale=4.0, momentum=0.85, label_smoothing=0.2)
    train(cfg, tmp_path / "full", progress=False)
    state = torch.load(tmp_path / "full" / "state.pt", weights_only=True)
    saved = _weights(tmp_path / "full")
    assert _same(saved, {k: v for k, v in state["ema"].items()})  # the checkpoint is the weight average
    assert not _same(saved, state["model"])
    first = "stages.0.0.weight"
    assert torch.equal(state["model"][first], state["ema"][first])  # the whitening conv stayed as initialised

    def crash_after_first_epoch(row):
        if row["epoch"] == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", progress=False, callback=crash_after_first_epoch)
    train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert _same(saved, _weights(tmp_path / "cut"))


def test_learning_rate_groups_scale_batch_norm_and_early_heads():
    from eelab.models import ModelConfig, build_model
    from eelab.training import TrainConfig, _optimizer

    model = build_model(ModelConfig(name="ee_airnet", widths=(8, 16, 16), head="conv", head_hidden=8))
    cfg = TrainConfig(model=ModelConfig(name="ee_airnet"), lr=0.1, weight_decay=1e-3, bn_lr_scale=4.0,
                      head_lr_scale=0.25, schedule="cosine")  # cosine starts at the peak
    opt, _ = _optimizer(cfg, model, 10)
    where = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(where) == len(trainable) == sum(len(g["params"]) for g in opt.param_groups)  # each in one group
    bn_stage, bn_head = model.stages[1][2], model.heads[0][1]
    assert isinstance(bn_stage, torch.nn.BatchNorm2d) and isinstance(bn_head, torch.nn.BatchNorm2d)
    assert where[id(bn_stage.bias)] == pytest.approx((0.4, 2.5e-4))            # batch norm: x4, decay / 4
    assert where[id(bn_head.bias)] == pytest.approx((0.1, 2.5e-4))             # and in an early head: x4 x 0.25
    assert where[id(model.heads[0][-1].weight)] == pytest.approx((0.025, 1e-3))  # an early head's linear
    assert where[id(model.heads[-1][2].weight)] == pytest.approx((0.1, 1e-3))    # the last exit: the backbone's rate
    assert id(bn_stage.weight) not in where                                    # airbench's fixed scale is not trained
    with pytest.raises(EelabError, match="--head-lr-scale must be above 0"):
        TrainConfig(head_lr_scale=0.0)
