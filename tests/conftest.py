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

