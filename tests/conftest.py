"""Shared fixtures: a tiny image-folder dataset written by the tests, and an isolated data/ folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ("red", "green", "blue")


def write_image_folder(root: Path, n_train: int = 24, n_test: int = 9, size: int = 8, seed: int = 0) -> Path:
    """An image folder of 3 colour classes (noisy, learnable): root/{train,test}/<class>/NNNN.png."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n // len(CLASSES)):
                img = rng.integers(0, 90, size=(size, size, 3))
                img[:, :, c] += 150
                Image.fromarray(img.astype(np.uint8)).save(d / f"{i:04d}.png")
    return root


@pytest.fixture(autouse=True)
def _isolated_data(tmp_path_factory, monkeypatch):
    """Every test gets its own data/ (caches, unpacked datasets) and no downloads."""
    monkeypatch.setenv("EELAB_DATA", str(tmp_path_factory.mktemp("data")))
    monkeypatch.setenv("EELAB_OFFLINE", "1")
    monkeypatch.delenv("EELAB_DATASETS", raising=False)
    torch.set_num_threads(1)  # tiny models: one thread is faster and deterministic


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """Path of a tiny 3-class 8x8 image folder with train/ (24) and test/ (9)."""
    return write_image_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_folder) -> Path:
    """A 2-exit tiny_cnn trained 2 epochs on tiny_folder (cal 6 images)."""
    import os

    from eelab.training import train

    os.environ["EELAB_DATA"] = str(tmp_path_factory.mktemp("ckdata"))
    out = tmp_path_factory.mktemp("ckpt") / "run"
    torch.set_num_threads(1)
    train(tiny_config(tiny_folder), out, progress=False)
    return out


def tiny_config(folder: Path, **changes):
    """TrainConfig of a 2-exit tiny_cnn on an image folder, a few seconds on one core."""
    from dataclasses import replace

    from eelab.models import ModelConfig
    from eelab.training import TrainConfig

    cfg = TrainConfig(model=ModelConfig(name="tiny_cnn", widths=(4, 8), head="mlp", head_hidden=8),
                      dataset=f"folder:{folder}", epochs=2, batch_size=6, cal_size=6, lr=0.05, eval_batch_size=7)
    return replace(cfg, **changes)


# ---- a tiny K=4 network run live (tests/test_live.py, tests/test_stream.py) ----------------------------------
LIVE_MEAN, LIVE_STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def _live_images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


@pytest.fixture(scope="session")
def live():
    """(tiny K=4 net, uint8 images [64, 3, 8, 8], its exit record on them, a cal record on 256 other images)."""
    from eelab.data import prepare
    from eelab.testing import tiny_net, tiny_record_of

    net = tiny_net(num_exits=4, num_classes=5, seed=1)
    images = _live_images(64, 2)
    record = tiny_record_of(net, prepare(images, LIVE_MEAN, LIVE_STD))
    cal = tiny_record_of(net, prepare(_live_images(256, 3), LIVE_MEAN, LIVE_STD))
    return net, images, record, cal


@pytest.fixture(scope="session")
def live_policy(live):
    """name -> a fresh live-capable policy (patience, budget, threshold per exit, dqn), fitted where it learns
    anything on the cal record of other images: a threshold fitted on these very images would lie exactly on
    one image's score."""
    from eelab.policies import make_policy

    cal = live[3]
    makers = {"patience": lambda: make_policy("patience", patience=2),
              "budget": lambda: make_policy("budget", budget=0.55).fit(cal),
              "threshold": lambda: make_policy("threshold", thresholds=[0.55, 0.5, 0.45]),
              "dqn": lambda: make_policy("dqn", cost_weight=1.0, steps=150, batch_size=64).fit(cal)}
    return lambda name: makers[name]()


@pytest.fixture(scope="session")
def live_predictor(live):
    """(policy, **options such as ensemble=) -> an EarlyExitPredictor of the live net, configured as its checkpoint
    would be."""
    from eelab.inference import EarlyExitPredictor

    record = live[2]
    config = {"costs": record.costs.tolist(), "class_names": [str(c) for c in range(record.c)],
              "mean": LIVE_MEAN, "std": LIVE_STD, "input_shape": [3, 8, 8]}
    return lambda policy, **options: EarlyExitPredictor(live[0], config, policy, **options)
