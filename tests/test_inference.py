import pytest
import torch
from PIL import Image

from eelab.data import load_dataset
from eelab.errors import EelabError
from eelab.inference import EarlyExitPredictor, benchmark_inference, profile_checkpoint
from eelab.policies import make_policy, score_logits
from eelab.records import record_checkpoint


@pytest.fixture(scope="module")
def test_images(tiny_checkpoint):
    import json
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    return load_dataset(cfg["dataset"], progress=False).test_images


@pytest.mark.parametrize("threshold", [0.0, 0.4, 0.55, 0.7, 1.0])
def test_live_matches_the_record(tiny_checkpoint, test_images, threshold):
    rec = record_checkpoint(tiny_checkpoint, "test", progress=False)
    policy = make_policy("threshold", threshold=threshold)
    want = policy.decide(rec)
    got = EarlyExitPredictor.from_checkpoint(tiny_checkpoint, policy).predict(test_images)
    # exits identical wherever the score is clearly away from the threshold
    score0 = score_logits(rec.logits[:, 0], "max_prob")
    clear = (score0 - threshold).abs() > 1e-4
    assert torch.equal(got["exits"][clear], want[clear])
    at_exit = rec.logits[torch.arange(rec.n), got["exits"]]
    torch.testing.assert_close(got["logits"], at_exit, atol=1e-4, rtol=0)
    assert torch.equal(got["macs"], rec.costs[got["exits"]])


@pytest.mark.parametrize("policy", ["threshold", "static"])
def test_batch_equals_one_at_a_time(tiny_checkpoint, test_images, policy):
    rec = record_checkpoint(tiny_checkpoint, "test", progress=False)
    median = float(score_logits(rec.logits[:, 0], "max_prob").median())  # about half the images stop at exit 0
    params = {"threshold": median} if policy == "threshold" else {"exit": 0}
    pred = EarlyExitPredictor.from_checkpoint(tiny_checkpoint, policy, params)
    batch = pred.predict(test_images)
    for i in range(test_images.shape[0]):  # one image takes the batch-1 path: the same step loop, leaner
        one = pred.predict(test_images[i:i + 1])
        assert one["exits"].item() == batch["exits"][i].item() and one["macs"].item() == batch["macs"][i].item()
        torch.testing.assert_close(one["logits"][0], batch["logits"][i], atol=1e-5, rtol=0)
    assert len(set(batch["exits"].tolist())) > 1 or policy == "static"  # the comparison covers several exits


def test_one_image_stops_without_running_later_stages(tiny_checkpoint, test_images):
    pred = EarlyExitPredictor.from_checkpoint(tiny_checkpoint, "threshold", {"threshold": 0.0})
    seen = []
    hook = pred.model.stages[1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    assert pred.predict(test_images[:1])["exits"].tolist() == [0] and seen == []
    pred.policy = make_policy("threshold", threshold=1.0)
    out = pred.predict(test_images[:1])
    hook.remove()
    assert out["exits"].tolist() == [pred.model.num_exits - 1] and seen == [1]


def test_later_stages_run_only_for_survivors(tiny_checkpoint, test_images):
    pred = EarlyExitPredictor.from_checkpoint(tiny_checkpoint, "threshold", {"threshold": 0.0})
    seen = []
    hook = pred.model.stages[1].register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    out = pred.predict(test_images)
    assert (out["exits"] == 0).all() and seen == []            # everyone stopped at exit 0: stage 1 never ran
    pred.policy = make_policy("threshold", threshold=1.0)       # no one stops early
    pred.predict(test_images[:3])
    hook.remove()
    assert seen == [3]


def test_predict_files_converts_and_rejects(tiny_checkpoint, tmp_path):
    Image.new("L", (31, 17), 128).save(tmp_path / "gray.png")
    Image.new("RGBA", (5, 5), (255, 0, 0, 10)).save(tmp_path / "red.png")
    (tmp_path / "junk.jpg").write_bytes(b"\x00" * 50)
    pred = EarlyExitPredictor.from_checkpoint(tiny_checkpoint)
    out = pred.predict_files([tmp_path / "gray.png", tmp_path / "red.png"])
    assert [p.class_name in ("blue", "green", "red") for p in out] == [True, True]
    assert all(0 < p.confidence <= 1 and p.exit in (0, 1) and p.macs > 0 for p in out)
    with pytest.raises(EelabError, match="junk.jpg cannot be decoded"):
        pred.predict_files([tmp_path / "junk.jpg"])


def test_policy_needing_cal_says_how_to_get_it(tiny_checkpoint):
    with pytest.raises(EelabError, match="cal.pt"):
        EarlyExitPredictor.from_checkpoint(tiny_checkpoint, "budget")


def test_bench_and_profile_report_every_figure(tiny_checkpoint):
    b = benchmark_inference(tiny_checkpoint, "threshold", {"threshold": 0.5}, n_latency=4, n_throughput=9,
                            batch=4, rounds=2)
    assert b["batch1"]["plain_ms_per_image"] > 0 and b["batch1"]["early_ms_per_image"] > 0
    assert -1 < b["batch1"]["mac_saving"] < 1 and abs(sum(b["exit_fractions"]) - 1) < 1e-9
    assert b["batch4"]["plain_images_per_s"] > 0
    s = benchmark_inference(tiny_checkpoint, "threshold", {"threshold": 0.5}, n_latency=0, n_throughput=9,
                            batch=4, rounds=2, stream=True)["stream4"]
    assert s["time_saving_ideal"] < 1 and s["peak_stage_rows"] <= 4
    assert s["ratio_ideal"] == pytest.approx(s["time_saving_ideal"] / s["mac_saving"])
    p = profile_checkpoint(tiny_checkpoint, rounds=2)
    assert [s["activation_shape"] for s in p["stages"]] == [[4, 4, 4], [8, 2, 2]]
    assert p["stages"][0]["activation_bytes"] == 4 * 4 * 4 * 4
    assert p["stages"][0]["stage_macs"] == 8 * 8 * 27 * 4      # conv3x3 3->4 on 8x8
    assert p["stages"][1]["cumulative_ms"] > p["stages"][0]["cumulative_ms"]


def test_cli_predict_bench_profile(tiny_checkpoint, tmp_path, capsys):
    import json as _json

    from eelab.cli import main
    from eelab.policies import make_policy as _make

    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "b.png")
    assert main(["predict", str(tiny_checkpoint), str(tmp_path / "b.png"), "--param", "threshold=0.0",
                 "--json"]) == 0
    out = _json.loads(capsys.readouterr().out)
    assert out["predictions"][0]["exit"] == 0 and out["predictions"][0]["source"].endswith("b.png")
    assert main(["bench", str(tiny_checkpoint), "--images", "3", "--batch", "4", "--batch-images", "9",
                 "--rounds", "1", "--json"]) == 0
    assert "batch4" in _json.loads(capsys.readouterr().out)
    assert main(["profile", str(tiny_checkpoint), "--rounds", "2", "--json"]) == 0
    assert len(_json.loads(capsys.readouterr().out)["stages"]) == 2
    # errors: a file that is no image, a checkpoint that is not eelab's, a policy fitted on another model
    (tmp_path / "x.jpg").write_text("no")
    for argv, match in ([["predict", str(tiny_checkpoint), str(tmp_path / "x.jpg")], "cannot be decoded"],
                        [["predict", str(tmp_path), str(tmp_path / "b.png")], "config.json"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and match in err, err
    pol = _make("threshold", threshold=0.5)
    pol.info = {"checkpoint_sha256": "f" * 64}
    pol.save(tmp_path / "p.pt")
    assert main(["predict", str(tiny_checkpoint), str(tmp_path / "b.png"), "--policy", str(tmp_path / "p.pt")]) == 1
    assert "refit" in capsys.readouterr().err


# ----------------------------------------------------------------------------- precision

def test_auto_precision_is_bf16_only_on_a_cpu_with_native_bf16():
    from eelab import device, training
    from eelab.device import inference_precision

    assert training.cpu_bf16_flags is device.cpu_bf16_flags  # one answer, importable from both
    assert inference_precision("auto", "cpu", bf16_flags=[]) == "fp32"
    assert inference_precision("auto", "cpu", bf16_flags=["amx_bf16"]) == "bf16"
    assert inference_precision("auto", "cuda", bf16_flags=["amx_bf16"]) == "fp32"
    assert [inference_precision(p, "cpu", bf16_flags=[]) for p in ("fp32", "bf16")] == ["fp32", "bf16"]
    with pytest.raises(EelabError, match="unknown precision 'fp16'"):
        inference_precision("fp16")


def test_bf16_casts_a_copy_once_and_answers_in_fp32():
    from eelab.data import prepare
    from eelab.testing import tiny_net, tiny_record_of

    net = tiny_net(num_exits=4, num_classes=5, seed=1)
    images = torch.randint(0, 256, (200, 3, 8, 8), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    record = tiny_record_of(net, prepare(images, [0.5] * 3, [0.25] * 3))
    config = {"costs": record.costs.tolist(), "class_names": list("abcde"), "mean": [0.5] * 3, "std": [0.25] * 3,
              "input_shape": [3, 8, 8]}
    policy = make_policy("threshold", threshold=0.5)
    fp32 = EarlyExitPredictor(net, config, policy)
    bf16 = EarlyExitPredictor(net, config, policy, precision="bf16")
    assert {p.dtype for p in bf16.model.stages.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in bf16.model.heads.parameters()} == {torch.float32}  # heads decide: kept in fp32
    assert {p.dtype for p in net.parameters()} == {torch.float32} and fp32.model is net  # the caller's net is kept
    a, b = fp32.predict(images), bf16.predict(images)
    assert b["logits"].dtype == torch.float32
    assert float((a["exits"] == b["exits"]).double().mean()) >= 0.9
    torch.testing.assert_close(b["logits"], record.logits[torch.arange(record.n), b["exits"]], atol=0.1, rtol=0.05)
    streamed = list(bf16.stream(images, batch=32))
    assert [o.index for o in streamed] == list(range(200))
    assert sum(o.exit == int(e) for o, e in zip(streamed, b["exits"])) >= 196  # bf16 rounding differs by batch


def test_folding_batch_norms_keeps_the_outputs():
    """conv-BN, and conv-max-pool-BN with positive scales, fold into the conv; a negative scale behind a pool
    (max does not commute with it) and a training-mode BN are left alone."""
    from torch import nn

    from eelab.device import fold_batch_norms

    torch.manual_seed(0)

    def bn(n, sign=1.0):
        b = nn.BatchNorm2d(n)
        with torch.no_grad():
            b.weight.copy_(sign * (0.5 + torch.rand(n)))
            b.bias.normal_()
            b.running_mean.normal_()
            b.running_var.uniform_(0.5, 2.0)
        return b.eval()

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), bn(4), nn.ReLU(),
                        nn.Conv2d(4, 5, 3, bias=False), nn.MaxPool2d(2), bn(5), nn.GELU(),
                        nn.Conv2d(5, 6, 1), nn.MaxPool2d(2), bn(6, sign=-1.0)).eval()
    x = torch.randn(2, 3, 12, 12)
    want = net(x)
    folded = fold_batch_norms(net)
    assert [type(m).__name__ for m in folded][1] == "Identity" and [type(m).__name__ for m in folded][5] == "Identity"
    assert isinstance(folded[9], nn.BatchNorm2d)  # negative scales behind a max-pool: not folded
    torch.testing.assert_close(folded(x), want, atol=1e-5, rtol=1e-5)
    training = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))  # train mode: batch statistics, no fold
    assert isinstance(fold_batch_norms(training)[1], nn.BatchNorm2d)


def test_records_and_policy_files_carry_their_precision(tiny_checkpoint, tmp_path):
    from eelab.inference import PrecisionNote
    from eelab.policies import load_policy

    assert record_checkpoint(tiny_checkpoint, "cal", progress=False).meta["precision"] == "fp32"
    cal = record_checkpoint(tiny_checkpoint, "cal", progress=False, precision="bf16")
    assert cal.meta["precision"] == "bf16" and cal.logits.dtype == torch.float32
    policy = make_policy("budget", budget=0.8).fit(cal)
    policy.save(tmp_path / "p.pt")
    loaded = load_policy(tmp_path / "p.pt")
    assert loaded.info["precision"] == "bf16"
    with pytest.warns(PrecisionNote, match="fitted on bf16 records and predicts at fp32"):
        EarlyExitPredictor.from_checkpoint(tiny_checkpoint, loaded)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error", PrecisionNote)
        EarlyExitPredictor.from_checkpoint(tiny_checkpoint, loaded, precision="bf16")
        EarlyExitPredictor.from_checkpoint(tiny_checkpoint, "threshold", precision="bf16")  # nothing fitted


def test_cli_precision_and_stream(tiny_checkpoint, tmp_path, capsys):
    import json as _json

    from eelab.cli import main

    assert main(["record", str(tiny_checkpoint), "--split", "cal", "--out", str(tmp_path / "cal.pt"), "--quiet",
                 "--precision", "bf16", "--json"]) == 0
    assert _json.loads(capsys.readouterr().out)["precision"] == "bf16"
    assert main(["evaluate", str(tmp_path / "cal.pt"), "--policy", "budget", "--param", "budget=0.8",
                 "--cal", str(tmp_path / "cal.pt"), "--save-policy", str(tmp_path / "p.pt"), "--json"]) == 0
    capsys.readouterr()
    for i in range(5):
        Image.new("RGB", (8, 8), (0, 40 * i, 255)).save(tmp_path / f"{i}.png")
    files = [str(tmp_path / f"{i}.png") for i in range(5)]
    assert main(["predict", str(tiny_checkpoint), *files, "--policy", str(tmp_path / "p.pt"), "--batch", "2",
                 "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "note:" in captured.err and "bf16" in captured.err
    out = _json.loads(captured.out)
    assert [p["source"] for p in out["predictions"]] == files and out["precision"] == "fp32"
    assert main(["predict", str(tiny_checkpoint), *files, "--policy", str(tmp_path / "p.pt"), "--precision",
                 "bf16"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.count("\n") == 5
    assert main(["bench", str(tiny_checkpoint), "--images", "2", "--batch", "4", "--batch-images", "9",
                 "--rounds", "1", "--stream", "--precision", "bf16", "--json"]) == 0
    r = _json.loads(capsys.readouterr().out)
    assert r["precision"] == "bf16" and r["stream4"]["peak_stage_rows"] <= 4 and r["stream4"]["peak_queued_bytes"] > 0
    assert main(["profile", str(tiny_checkpoint), "--rounds", "1", "--precision", "bf16", "--json"]) == 0
    assert _json.loads(capsys.readouterr().out)["stages"][0]["activation_bytes"] == 4 * 4 * 4 * 2
