"""Datasets by name, the seeded cal split, the decoded-tensor cache, tensor augmentation, offline rules.

Datasets are looked for in $EELAB_DATASETS, then data/, then ../shared/datasets/ (unpacked once into
data/), then downloaded by torchvision when online. Images live in memory as uint8 [N, ch, H, W].
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .errors import EelabError
from .files import load_torch, save_torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CACHE_VERSION = 1
_ROOT = Path(__file__).resolve().parent.parent
_SHARED = _ROOT.parent / "shared" / "datasets"  # the team's offline copies, beside the project


@dataclass(frozen=True)
class Dataset:
    """A labelled image dataset held as decoded uint8 tensors.

    train_images [N_train, ch, H, W] uint8, train_labels [N_train] int64, test_* likewise;
    class_names [C]; source names where the images came from.
    """

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    class_names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        """C."""
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(ch, H, W) of every image."""
        return tuple(self.train_images.shape[1:])


# ----------------------------------------------------------------------------- where things live

def data_dir() -> Path:
    """eelab's own data folder: $EELAB_DATA, else data/ in the source tree, else ./data."""
    if os.environ.get("EELAB_DATA"):
        return Path(os.environ["EELAB_DATA"])
    if (_ROOT / "pyproject.toml").exists():
        return _ROOT / "data"
    return Path.cwd() / "data"


def search_dirs() -> list[Path]:
    """Folders searched for datasets, in order: $EELAB_DATASETS, data/, ../shared/datasets/."""
    dirs = []
    if os.environ.get("EELAB_DATASETS"):
        dirs.append(Path(os.environ["EELAB_DATASETS"]))
    dirs.append(data_dir())
    dirs.append(_SHARED)
    return dirs


def _offline() -> bool:
    return os.environ.get("EELAB_OFFLINE", "") not in ("", "0")


# ----------------------------------------------------------------------------- decoding

def load_image(path: str | Path, size: tuple[int, int] | None = None, channels: int = 3) -> torch.Tensor:
    """Decode one image file -> uint8 [channels, H, W], converted to RGB (3) or L (1), resized to size (H, W)."""
    path = Path(path)
    if not path.is_file():
        raise EelabError(f"image {path} does not exist; check the path")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if size is not None and (im.height, im.width) != tuple(size):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise EelabError(f"{path} cannot be decoded as an image ({type(e).__name__}); give a JPEG/PNG/... file") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def _list_image_folder(split_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise EelabError(f"{split_dir} has no class folders; an image folder needs {split_dir}/<class>/<image>")
    files, labels = [], []
    for i, c in enumerate(classes):
        for f in sorted((split_dir / c).iterdir()):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(i)
    if not files:
        raise EelabError(f"{split_dir} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    return files, labels, classes


def _decode_folder(split_dir: Path, size: tuple[int, int] | None, channels: int | None,
                   progress: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    files, labels, classes = _list_image_folder(split_dir)
    if size is None or channels is None:
        with Image.open(files[0]) as im:
            size = size or (im.height, im.width)
            channels = channels or (1 if im.mode in ("L", "1", "I;16", "I") else 3)
    images = torch.empty(len(files), channels, *size, dtype=torch.uint8)
    for i, f in enumerate(tqdm(files, desc=f"decode {split_dir.name}", unit="img", disable=not progress)):
        images[i] = load_image(f, size, channels)
    return images, torch.tensor(labels, dtype=torch.int64), classes


def _cache_path(name: str, key: str) -> Path:
    slug = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)[:60]
    return data_dir() / "cache" / f"{slug}-{key[:16]}.pt"


def _cached(name: str, key: str, build, progress: bool) -> Dataset:
    """Load the decoded tensors for (name, key) from data/cache, or build and store them once."""
    path = _cache_path(name, key)
    if path.exists():
        try:
            d = load_torch(path, "dataset cache", "it is rebuilt automatically")
            if d.get("cache_version") == CACHE_VERSION:
                return Dataset(name=name, train_images=d["train_images"], train_labels=d["train_labels"],
                               test_images=d["test_images"], test_labels=d["test_labels"],
                               class_names=list(d["class_names"]), source=d["source"])
        except EelabError:
            pass  # a damaged cache is rebuilt, never trusted
    ds = build()
    save_torch({"cache_version": CACHE_VERSION, "train_images": ds.train_images, "train_labels": ds.train_labels,
                "test_images": ds.test_images, "test_labels": ds.test_labels, "class_names": ds.class_names,
                "source": ds.source}, path)
    return ds


def _folder_key(root: Path, size, channels) -> str:
    h = hashlib.sha256(f"{root.resolve()}|{size}|{channels}|{CACHE_VERSION}".encode())
    for split in ("train", "test"):
        for f in sorted((root / split).rglob("*")):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.relative_to(root)}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()


def _load_folder(name: str, root: Path, size, channels, progress: bool) -> Dataset:
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise EelabError(f"image folder {root} has no {split}/ subfolder; lay it out as "
                             f"{root}/train/<class>/<image> and {root}/test/<class>/<image>")

    def build() -> Dataset:
        tr, trl, classes = _decode_folder(root / "train", size, channels, progress)
        te, tel, classes_te = _decode_folder(root / "test", tuple(tr.shape[2:]), tr.shape[1], progress)
        if classes_te != classes:
            raise EelabError(f"{root}/train and {root}/test have different class folders; make them match")
        return Dataset(name, tr, trl, te, tel, classes, str(root))

    return _cached(name, _folder_key(root, size, channels), build, progress)


# ----------------------------------------------------------------------------- named datasets

def _find(names: list[str]) -> Path | None:
    for d in search_dirs():
        for n in names:
            if (d / n).exists():
                return d / n
    return None


def _unpack(archive: Path, into: Path, progress: bool) -> None:
    """Extract a .tar.gz into `into` atomically: extract beside it, then rename the folder in."""
    into.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=into.parent))
    try:
        with tarfile.open(archive) as tf:
            members = tf.getmembers()
            for m in tqdm(members, desc=f"unpack {archive.name}", unit="file", disable=not progress):
                tf.extract(m, tmp, filter="data")
        inner = tmp / into.name
        os.replace(inner if inner.is_dir() else tmp, into)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cifar10_jpeg(progress: bool) -> Dataset:
    root = _find(["cifar10-jpeg"])
    if root is None or not (root / "train").is_dir():
        archive = _find(["cifar10-jpeg.tar.gz"])
        if archive is None:
            raise EelabError(
                "dataset cifar10-jpeg not found (looked for cifar10-jpeg/ and cifar10-jpeg.tar.gz in "
                f"{', '.join(str(d) for d in search_dirs())}); it is not downloadable: put the archive in one "
                "of those folders, or use --dataset cifar10 (torchvision download)")
        root = data_dir() / "cifar10-jpeg"
        if not root.is_dir():
            _unpack(archive, root, progress)
    return _load_folder("cifar10-jpeg", root, (32, 32), 3, progress)


def _load_cifar10(progress: bool) -> Dataset:
    import torchvision

    found = _find(["cifar-10-batches-py"])
    root = found.parent if found is not None else data_dir()
    if found is None and _offline():
        raise EelabError(
            "dataset cifar10 not found (looked for cifar-10-batches-py/ in "
            f"{', '.join(str(d) for d in search_dirs())}) and EELAB_OFFLINE is set; go online to let torchvision "
            "download it into data/, or copy cifar-10-batches-py/ there")

    def build() -> Dataset:
        try:
            tr = torchvision.datasets.CIFAR10(str(root), train=True, download=found is None)
            te = torchvision.datasets.CIFAR10(str(root), train=False, download=False)
        except Exception as e:  # network errors come in many types
            raise EelabError(
                f"dataset cifar10 not found in {', '.join(str(d) for d in search_dirs())} and the torchvision "
                f"download failed ({type(e).__name__}); go online, or copy cifar-10-batches-py/ into data/, or "
                "use --dataset cifar10-jpeg") from None
        to_t = lambda a: torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
        return Dataset("cifar10", to_t(tr.data), torch.tensor(tr.targets), to_t(te.data), torch.tensor(te.targets),
                       list(tr.classes), str(root / "cifar-10-batches-py"))

    return _cached("cifar10", hashlib.sha256(f"cifar10|{root.resolve()}".encode()).hexdigest(), build, progress)


DATASETS = ("cifar10-jpeg", "cifar10", "folder:PATH")


def load_dataset(name: str, image_size: int | None = None, progress: bool = True) -> Dataset:
    """Load a dataset by name: cifar10-jpeg, cifar10, or folder:PATH (an image folder with train/ and test/).

    image_size resizes folder images to image_size x image_size (default: the first image's size).
    """
    if name == "cifar10-jpeg":
        return _load_cifar10_jpeg(progress)
    if name == "cifar10":
        return _load_cifar10(progress)
    if name.startswith("folder:"):
        root = Path(name[len("folder:"):]).expanduser()
        if not root.is_dir():
            raise EelabError(f"image folder {root} does not exist; give folder:PATH with PATH/train/<class>/ "
                             "and PATH/test/<class>/")
        size = None if image_size is None else (image_size, image_size)
        return _load_folder(f"folder-{root.name}", root, size, None, progress)
    raise EelabError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------- splits and tensors

def split_train_cal(n_train: int, cal_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of train indices 0..n_train-1 into (train [n_train - cal_size], cal [cal_size]), both sorted."""
    if not 0 <= cal_size < n_train:
        raise EelabError(f"cal size {cal_size} must be between 0 and {n_train - 1} (the train split has "
                         f"{n_train} images); lower --cal-size")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n_train, generator=g)
    return perm[cal_size:].sort().values, perm[:cal_size].sort().values


def channel_stats(images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of uint8 images [N, ch, H, W], on the [0, 1] scale."""
    x = images.float().div_(255)
    return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).tolist()


def prepare(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 [B, ch, H, W] -> normalised float32 [B, ch, H, W]."""
    m = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images.float().div_(255) - m) / s


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True) -> torch.Tensor:
    """Random crop after `pad` reflect padding and horizontal flip, per sample: uint8 [B, ch, H, W] -> same."""
    b, _, h, w = images.shape
    out = images
    if pad > 0:
        padded = torch.nn.functional.pad(images.float(), (pad, pad, pad, pad), mode="reflect")
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
        # gather all crops at once: index grids [B, H, W] into the padded images
        rows = (dy.view(b, 1) + torch.arange(h).view(1, h))  # [B, H]
        cols = (dx.view(b, 1) + torch.arange(w).view(1, w))  # [B, W]
        bi = torch.arange(b).view(b, 1, 1)
        out = padded.permute(0, 2, 3, 1)[bi, rows.view(b, h, 1), cols.view(b, 1, w)].permute(0, 3, 1, 2)
        out = out.to(torch.uint8)
    if flip:
        mask = torch.rand(b, generator=generator) < 0.5
        out = torch.where(mask.view(b, 1, 1, 1), out.flip(3), out)
    return out.contiguous()
