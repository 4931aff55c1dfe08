"""ONNX export: the exported runner decides through run_policy like eelab, and refuses incomplete exports."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from eelab.cli import main  # noqa: E402
from eelab.data import prepare  # noqa: E402
from eelab.errors import EelabError  # noqa: E402
from eelab.export import OnnxEarlyExit, export_model, export_onnx, read_export  # noqa: E402
from eelab.files import sha256_file  # noqa: E402
from eelab.inference import EarlyExitPredictor  # noqa: E402
from eelab.models import add_confidence_branches, measure_costs  # noqa: E402
from eelab.policies import make_policy  # noqa: E402
from eelab.records import ExitRecord  # noqa: E402
from eelab.testing import tiny_net, tiny_record_of  # noqa: E402

REFERENCE = Path(__file__).resolve().parents[1] / "checkpoints" / "ee_cnn-cifar10-jpeg"
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
LIVE = [("threshold", {"threshold": 0.6}), ("patience", {"patience": 2}), ("patience", {"patience": 3})]


def _config(net, classes: int = 5) -> dict:
    costs, full_cost = measure_costs(net, (3, 8, 8))
    return {"input_shape": [3, 8, 8], "mean": MEAN, "std": STD, "class_names": [f"c{i}" for i in range(classes)],
            "costs": costs.tolist(), "full_cost": full_cost}


def _images(n: int, seed: int = 0, size: int = 8) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """(net, its config, an ONNX export directory of it)."""
    net = tiny_net()
    out = tmp_path_factory.mktemp("onnx") / "tiny"
    export_model(net, _config(net), out)
    return net, _config(net), out


@pytest.mark.parametrize("name,params", LIVE)
def test_onnx_runner_matches_record_and_predictor(tiny_export, name, params):
    net, cfg, out = tiny_export
    images = _images(96)
    record = tiny_record_of(net, prepare(images, MEAN, STD))
    policy = make_policy(name, **params)
    runner = OnnxEarlyExit(out, policy)
    got = runner.predict(images)
    want = EarlyExitPredictor(net, cfg, policy).predict(images)
    decided = policy.decide(record)
    assert torch.equal(got["exits"], decided) and torch.equal(got["exits"], want["exits"])
    assert len(set(decided.tolist())) > 1  # the policy really splits the batch, so rows shrink
    assert torch.allclose(got["logits"], record.logits[torch.arange(96), decided], atol=1e-4)
    assert torch.allclose(got["macs"], want["macs"])
    one = torch.cat([runner.predict(images[i:i + 1])["exits"] for i in range(12)])  # the batch-1 path
    assert torch.equal(one, decided[:12])
    rows = []  # streamed: every stage on full batches of 16 gathered across input pieces of 7, in input order
    streamed = list(runner.stream(images.split(7), batch=16, wait=1, trace=lambda e: rows.append(e["rows"])))
    assert [o.index for o in streamed] == list(range(96)) and max(rows) <= 16 and rows.count(16) > 0
    assert [o.exit for o in streamed] == decided.tolist()
    assert torch.allclose(torch.stack([o.logits for o in streamed]), got["logits"], atol=1e-4)
    assert [o.macs for o in streamed] == want["macs"].tolist()


def test_onnx_runner_with_an_exit_ensemble_matches_the_ensembled_record(tiny_export):
    from eelab.ensemble import ExitEnsemble

    net, cfg, out = tiny_export
    images = _images(96, seed=4)
    ens = ExitEnsemble(torch.tensor([[0.25, 0, 0, 0], [0.3, 0.9, 0, 0], [0.2, 0.0, 1.1, 0], [0.1, 0.2, 0.1, 1.0]],
                                    dtype=torch.float64), torch.zeros(4, 5, dtype=torch.float64),
                       torch.empty(0, dtype=torch.long), {"split": None})
    record = ens.apply(tiny_record_of(net, prepare(images, MEAN, STD), meta={"split": "test"}))
    policy = make_policy("threshold", threshold=0.6)
    runner = OnnxEarlyExit(out, policy, ensemble=ens)
    got = runner.predict(images)
    decided = policy.decide(record)
    assert len(set(decided.tolist())) > 1
    assert torch.equal(got["exits"], decided)
    streamed = list(runner.stream(images.split(5), batch=8))  # the ensemble's past travels through the queues
    assert [o.exit for o in streamed] == decided.tolist()
    assert torch.allclose(torch.stack([o.logits for o in streamed]), got["logits"], atol=1e-4)
    assert torch.equal(got["exits"], EarlyExitPredictor(net, cfg, policy, ensemble=ens).predict(images)["exits"])
    assert torch.allclose(got["logits"], record.logits[torch.arange(96), decided], atol=1e-4)
    assert torch.allclose(got["macs"], record.costs[decided])
    fitted = make_policy("risk", epsilon=0.1).fit(record)  # fitted on ensembled outputs: refused without them
    with pytest.raises(EelabError, match="used without that ensemble"):
        OnnxEarlyExit(out, fitted)


def test_onnx_plain_network_matches_last_exit(tiny_export):
    net, _, out = tiny_export
    images = _images(10, seed=3)
    plain = torch.from_numpy(OnnxEarlyExit(out).forward_plain(images))
    assert torch.allclose(plain, net.forward_plain(prepare(images, MEAN, STD)), atol=1e-4)


def test_export_with_confidence_branches_runs_the_confidence_policy(tmp_path):
    net = add_confidence_branches(tiny_net(seed=1), 3)
    cfg = _config(net)
    meta = export_model(net, cfg, tmp_path / "conf")
    assert {f"confidence_{k}.onnx" for k in range(4)} <= set(meta["files"]) and meta["has_confidence"]
    images = _images(80, seed=2)
    with torch.no_grad():
        logits, conf = net.forward_with_confidences(prepare(images, MEAN, STD))
    record = ExitRecord(logits=logits, labels=logits[:, -1].argmax(-1), indices=torch.arange(80),
                        costs=torch.tensor(cfg["costs"], dtype=torch.float64), full_cost=cfg["full_cost"],
                        confidences=conf)
    # about half leave at exit 0; the threshold sits mid-way in the widest gap near the median, so no sample lies
    # within ONNX-vs-torch rounding of it (at the median itself, one sample flipped now and then)
    s = conf[:, 0].sort().values
    i = 30 + int((s[31:51] - s[30:50]).argmax())
    policy = make_policy("confidence", threshold=float(s[i] + s[i + 1]) / 2)
    got = OnnxEarlyExit(tmp_path / "conf", policy).predict(images)
    decided = policy.decide(record)
    assert torch.equal(got["exits"], decided) and len(set(decided.tolist())) > 1
    assert torch.equal(got["exits"], EarlyExitPredictor(net, cfg, policy).predict(images)["exits"])


def test_confidence_policy_on_an_export_without_branches_is_one_line(tiny_export):
    with pytest.raises(EelabError, match="no confidence branches"):
        OnnxEarlyExit(tiny_export[2], make_policy("confidence"))


def test_truncated_or_foreign_export_is_a_one_line_error(tiny_export, tmp_path, tiny_checkpoint):
    net, cfg, out = tiny_export
    bad = tmp_path / "bad"
    export_model(net, cfg, bad)
    graph, whole = bad / "head_1.onnx", (bad / "head_1.onnx").read_bytes()
    graph.write_bytes(whole[:100])  # truncated
    with pytest.raises(EelabError, match="damaged: head_1.onnx") as e:
        OnnxEarlyExit(bad)
    assert "\n" not in str(e.value)
    graph.write_bytes(whole)
    (bad / "stage_2.onnx").unlink()
    with pytest.raises(EelabError, match="incomplete: stage_2.onnx is missing"):
        read_export(bad)
    (bad / "export.json").unlink()  # an export that never finished
    with pytest.raises(EelabError, match="not an eelab ONNX export"):
        read_export(bad)
    with pytest.raises(EelabError, match="not an eelab ONNX export"):
        read_export(tiny_checkpoint)  # a checkpoint directory is not an export
    (bad / "export.json").write_text(json.dumps({"format": "something else", "files": {}}))
    with pytest.raises(EelabError, match="not an eelab ONNX export manifest"):
        read_export(bad)


def test_cli_export_of_a_checkpoint(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(tiny_checkpoint), "--format", "onnx", "--out", str(out), "--policy", "threshold",
                 "--param", "threshold=0.7", "--json"]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["checkpoint_sha256"] == sha256_file(tiny_checkpoint / "model.pt")
    assert meta["policy"]["params"]["threshold"] == 0.7 and (out / "policy.pt").is_file()
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    assert meta["mean"] == cfg["mean"] and meta["class_names"] == cfg["class_names"] and meta["costs"] == cfg["costs"]
    runner = OnnxEarlyExit(out)  # the policy shipped with the export
    assert runner.policy.params["threshold"] == 0.7
    images = _images(9, seed=4)
    pred = EarlyExitPredictor.from_checkpoint(tiny_checkpoint, runner.policy)
    got, want = runner.predict(images), pred.predict(images)
    assert torch.equal(got["exits"], want["exits"])
    assert torch.allclose(got["logits"], want["logits"], atol=1e-4)
    # the same checkpoint again may reuse the directory; the policy it no longer ships is removed
    assert main(["export", str(tiny_checkpoint), "--format", "onnx", "--out", str(out)]) == 0
    assert not (out / "policy.pt").exists() and read_export(out)["policy"] is None


def test_export_refuses_a_foreign_non_empty_directory_before_working(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(tiny_checkpoint), "--format", "onnx", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "not empty" in err and err.count("\n") == 1 and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(EelabError, match="is a file"):
        export_onnx(tiny_checkpoint, out / "notes.txt")
    export_onnx(tiny_checkpoint, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and read_export(out)["num_exits"] == 2


@pytest.mark.skipif(not (REFERENCE / "model.pt").is_file(), reason="reference checkpoint not present")
def test_reference_export_gives_eelabs_exits(tmp_path):
    export_onnx(REFERENCE, tmp_path / "ref")
    policy = make_policy("threshold", threshold=0.5)  # random images are unsure: a low bar spreads the exits
    images = _images(300, seed=5, size=32)
    got = OnnxEarlyExit(tmp_path / "ref", policy).predict(images)
    want = EarlyExitPredictor.from_checkpoint(REFERENCE, policy).predict(images)
    assert torch.equal(got["exits"], want["exits"]) and len(set(want["exits"].tolist())) > 1
    assert torch.allclose(got["logits"], want["logits"], atol=1e-4)
