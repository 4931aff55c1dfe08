"""The issue's acceptance run on the real CIFAR-10 JPEG copy: 1 epoch on 2,000 images, then a test record."""
import json
import os

import pytest
import torch

import eelab.data as data
from eelab.cli import main
from eelab.records import load_record

pytestmark = pytest.mark.slow


@pytest.fixture
def real_data(monkeypatch):
    if data._find(["cifar10-jpeg", "cifar10-jpeg.tar.gz"]) is None and not (data._SHARED / "cifar10-jpeg.tar.gz").exists():
        pytest.skip("cifar10-jpeg is not on this machine (../shared/datasets/cifar10-jpeg.tar.gz)")
    monkeypatch.delenv("EELAB_DATA", raising=False)   # unpack and cache once in the project's data/
    torch.set_num_threads(os.cpu_count() or 1)


def test_train_one_epoch_then_record_the_test_split(real_data, tmp_path, capsys):
    out = tmp_path / "ee"
    assert main(["train", "--model", "ee_cnn", "--dataset", "cifar10-jpeg", "--epochs", "1",
                 "--train-samples", "2000", "--out", str(out), "--quiet", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["history"][0]["cal_acc"][-1] > 0.1        # above chance after one short epoch
    assert main(["record", str(out), "--split", "test", "--out", str(tmp_path / "test.pt"), "--quiet"]) == 0
    rec = load_record(tmp_path / "test.pt")
    assert rec.logits.shape == (10_000, 4, 10)
    assert rec.labels.bincount().tolist() == [1000] * 10
    assert all(a < b for a, b in zip(rec.costs, rec.costs[1:]))
    assert rec.full_cost < rec.costs[-1] < 1.05 * rec.full_cost
    assert 200e6 < rec.full_cost < 215e6
    assert rec.meta["dataset"] == "cifar10-jpeg" and rec.meta["class_names"][0] == "airplane"
