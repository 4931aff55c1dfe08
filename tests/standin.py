"""The checkpoint the notebook and browser tests run on: the committed reference when it is there, else a tiny
stand-in (ee_cnn 4-8-8-8 trained 2 epochs on a 3-class 8x8 image folder, with its cal.pt and test.pt)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "checkpoints" / "ee_airnet-cifar10-jpeg"  # the strong reference, the notebooks' default
FILES = ("model.pt", "config.json", "history.json", "cal.pt", "test.pt")


def reference_ready() -> bool:
    """Whether the committed reference checkpoint and its records are all there."""
    return all((REFERENCE / name).is_file() for name in FILES)


def reference_or_standin(root: Path) -> Path:
    """The reference checkpoint, or a stand-in built under root (a few seconds)."""
    return REFERENCE if reference_ready() else make_standin(root)


def make_standin(root: Path) -> Path:
    """Train the stand-in into root/checkpoint and record both splits there; its data caches stay under root."""
    import torch
    from conftest import write_image_folder

    from eelab.models import ModelConfig
    from eelab.records import record_checkpoint
    from eelab.training import TrainConfig, train

    folder = write_image_folder(root / "images", n_train=120, n_test=60, size=8)
    cfg = TrainConfig(model=ModelConfig(name="ee_cnn", widths=(4, 8, 8, 8), head="mlp", head_hidden=8, dropout=0.0),
                      dataset=f"folder:{folder}", epochs=2, batch_size=16, cal_size=30, lr=0.05, eval_batch_size=64)
    out = root / "checkpoint"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with data_dir(root / "data"):
        train(cfg, out, progress=False)
        for split in ("cal", "test"):
            record_checkpoint(out, split, progress=False).save(out / f"{split}.pt")
    torch.set_num_threads(threads)
    return out


@contextmanager
def data_dir(path: Path):
    """EELAB_DATA set to path inside the block (module-scoped fixtures run outside the per-test isolation)."""
    old = os.environ.get("EELAB_DATA")
    os.environ["EELAB_DATA"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("EELAB_DATA", None)
        else:
            os.environ["EELAB_DATA"] = old


def kernel_env(checkpoint: Path, root: Path, smoke: bool = True) -> dict[str, str]:
    """Environment for a notebook kernel on this checkpoint: smoke mode; a stand-in's caches stay under root
    (the reference reads the project's data/, as a user's run does)."""
    env = {key: value for key, value in os.environ.items() if key not in ("EELAB_DATA", "EELAB_DATASETS")}
    env.update(EELAB_CHECKPOINT=str(checkpoint), EELAB_SMOKE="1" if smoke else "0", EELAB_OFFLINE="1")
    if checkpoint != REFERENCE:
        env["EELAB_DATA"] = str(root / "data")
    return env
