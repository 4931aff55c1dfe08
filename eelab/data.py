"""Datasets by name, the seeded cal split, the decoded-tensor cache, tensor augmentation, offline rules.

Datasets are looked for in $EELAB_DATASETS, then data/, then ../shared/datasets/ (unpacked once into
data/), then downloaded by torchvision when online. Images live in memory as uint8 [N, ch, H, W]; the
torchvision datasets (cifar10, cifar100, svhn, mnist, fashion-mnist, imagenette) are read by torchvision's
own loaders, in their own on-disk formats, and decoded once into the cache.
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


# ----------------------------------------------------------------------------- torchvision datasets

# name -> (files torchvision reads, below its root; subfolders of a search dir tried as that root, the first one
# also where a download goes). SVHN keeps its .mat files directly in its root, so eelab gives it a folder of its
# own; the others bring their own folder (cifar-100-python/, MNIST/raw/, FashionMNIST/raw/).
_TORCHVISION_LAYOUT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "cifar100": (("cifar-100-python/train", "cifar-100-python/test", "cifar-100-python/meta"), ("",)),
    "svhn": (("train_32x32.mat", "test_32x32.mat"), ("svhn", "")),
    "mnist": (("MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-labels-idx1-ubyte",
               "MNIST/raw/t10k-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte"), ("",)),
    "fashion-mnist": (("FashionMNIST/raw/train-images-idx3-ubyte", "FashionMNIST/raw/train-labels-idx1-ubyte",
                       "FashionMNIST/raw/t10k-images-idx3-ubyte", "FashionMNIST/raw/t10k-labels-idx1-ubyte"), ("",)),
}
# Imagenette variants as torchvision names them, smallest first: the first found on disk is used, and a download
# fetches the 160 px one (94 MB), plenty for the default 64 x 64 images.
_IMAGENETTE_VARIANTS = (("160px", "imagenette2-160"), ("320px", "imagenette2-320"), ("full", "imagenette2"))
IMAGENETTE_SIZE = 64  # default side of imagenette images: shorter side resized to this, then centre-cropped


def _torchvision_root(name: str) -> tuple[Path, bool]:
    """(root to give torchvision, download?) for a torchvision dataset: found on disk, else data/ when online."""
    files, subs = _TORCHVISION_LAYOUT[name]
    for d in search_dirs():
        for sub in subs:
            if all((d / sub / f).is_file() for f in files):
                return d / sub, False
    looked = ", ".join(str(Path(subs[0]) / f) for f in files)
    if _offline():
        raise EelabError(f"dataset {name} not found (looked for {looked} in "
                         f"{', '.join(str(d) for d in search_dirs())}) and EELAB_OFFLINE is set; go online to let "
                         f"torchvision download it into {data_dir() / subs[0]}, or copy those files there")
    return data_dir() / subs[0], True


def _torchvision_call(name: str, root: Path, download: bool, make):
    """Run a torchvision dataset constructor, turning its failures into one-line errors."""
    try:
        return make()
    except Exception as e:  # torchvision raises RuntimeError for bad files and many types for network trouble
        if download:
            raise EelabError(f"dataset {name} not found in {', '.join(str(d) for d in search_dirs())} and the "
                             f"torchvision download into {root} failed ({type(e).__name__}); go online, or copy the "
                             f"dataset's files into {root}") from None
        raise EelabError(f"dataset {name} in {root} is incomplete or fails torchvision's checksum "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:80]}); delete it and let torchvision "
                         "download it again, or copy a complete copy there") from None


def _files_key(name: str, files: list[Path], extra: str = "") -> str:
    """Cache key of a dataset: its name, options and every file's path, size and mtime (a new file rebuilds it)."""
    h = hashlib.sha256(f"{name}|{extra}|{CACHE_VERSION}".encode())
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()


def _open_torchvision(name: str, root: Path, train: bool, download: bool):
    """torchvision's own dataset object for one split of cifar100, svhn, mnist or fashion-mnist."""
    import torchvision.datasets as tvd

    if name == "svhn":
        split = "train" if train else "test"
        return _torchvision_call(name, root, download, lambda: tvd.SVHN(str(root), split=split, download=download))
    cls = {"cifar100": tvd.CIFAR100, "mnist": tvd.MNIST, "fashion-mnist": tvd.FashionMNIST}[name]
    return _torchvision_call(name, root, download, lambda: cls(str(root), train=train, download=download))


def _load_torchvision_arrays(name: str, progress: bool) -> Dataset:
    """cifar100, svhn, mnist, fashion-mnist through torchvision's own loaders -> uint8 [N, ch, H, W]."""
    root, download = _torchvision_root(name)
    if download:  # fetch first, so the cache is keyed on the files as they will be found from now on
        for train in (True, False):
            _open_torchvision(name, root, train, download=True)

    def build() -> Dataset:
        tr, te = _open_torchvision(name, root, True, False), _open_torchvision(name, root, False, False)
        if name == "cifar100":
            to_t = lambda a: torch.from_numpy(np.asarray(a)).permute(0, 3, 1, 2).contiguous()  # noqa: E731  HWC->CHW
            parts = (to_t(tr.data), torch.tensor(tr.targets), to_t(te.data), torch.tensor(te.targets), list(tr.classes))
        elif name == "svhn":
            to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731  already [N, 3, 32, 32]
            parts = (to_t(tr.data), torch.from_numpy(tr.labels), to_t(te.data), torch.from_numpy(te.labels),
                     [str(i) for i in range(10)])
        else:  # grayscale stays one channel: every factory takes in_channels from the dataset
            parts = (tr.data.unsqueeze(1).contiguous(), tr.targets.clone(), te.data.unsqueeze(1).contiguous(),
                     te.targets.clone(), list(tr.classes))
        x_tr, y_tr, x_te, y_te, classes = parts
        return Dataset(name, x_tr.to(torch.uint8), y_tr.to(torch.int64), x_te.to(torch.uint8), y_te.to(torch.int64),
                       classes, str(root))

    files = [root / f for f in _TORCHVISION_LAYOUT[name][0]]
    return _cached(name, _files_key(name, files), build, progress)


def _load_imagenette(image_size: int, progress: bool) -> Dataset:
    """Imagenette (10 ImageNet classes) through torchvision's loader, each image resized and centre-cropped."""
    import torchvision.datasets as tvd
    from torchvision import transforms

    found = [(d, v, f) for d in search_dirs() for v, f in _IMAGENETTE_VARIANTS
             if (d / f / "train").is_dir() and (d / f / "val").is_dir()]
    if found:
        root, variant, folder = found[0]
    else:
        if _offline():
            raise EelabError(f"dataset imagenette not found (looked for {', '.join(f for _, f in _IMAGENETTE_VARIANTS)}"
                             f"/ with train/ and val/ in {', '.join(str(d) for d in search_dirs())}) and EELAB_OFFLINE "
                             "is set; go online to let torchvision download it into data/, or copy imagenette2-160/ "
                             "there")
        root, (variant, folder) = data_dir(), _IMAGENETTE_VARIANTS[0]
        _torchvision_call("imagenette", root, True, lambda: tvd.Imagenette(str(root), size=variant, download=True))
    # shorter side to image_size, then the central square: no aspect-ratio distortion
    tf = transforms.Compose([transforms.Resize(image_size, antialias=True), transforms.CenterCrop(image_size),
                             transforms.PILToTensor()])

    def decode(split: str):
        ds = _torchvision_call("imagenette", root / folder, False,
                               lambda: tvd.Imagenette(str(root), split=split, size=variant, transform=tf))
        if len(ds) == 0:
            raise EelabError(f"imagenette {root / folder / split} holds no .JPEG images; copy a complete copy there")
        images = torch.empty(len(ds), 3, image_size, image_size, dtype=torch.uint8)
        labels = torch.empty(len(ds), dtype=torch.int64)
        for i in tqdm(range(len(ds)), desc=f"decode imagenette {split}", unit="img", disable=not progress):
            images[i], labels[i] = ds[i]
        return images, labels, [names[0] for names in ds.classes]

    def build() -> Dataset:
        tr, trl, classes = decode("train")
        te, tel, classes_te = decode("val")
        if classes_te != classes:
            raise EelabError(f"imagenette {root / folder} has other classes in train/ and val/; use a complete copy")
        return Dataset("imagenette", tr, trl, te, tel, classes, str(root / folder))

    files = [f for split in ("train", "val") for f in (root / folder / split).rglob("*") if f.is_file()]
    return _cached(f"imagenette-{image_size}", _files_key("imagenette", files, str(image_size)), build, progress)


def _resize_images(ds: Dataset, image_size: int | None) -> Dataset:
    """The dataset with every image resized to image_size x image_size (bilinear, antialiased); as is when None."""
    if image_size is None or ds.image_shape[1:] == (image_size, image_size):
        return ds

    def resize(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], x.shape[1], image_size, image_size, dtype=torch.uint8)
        for s in range(0, x.shape[0], 4096):  # in chunks: the float copy of a whole split would be large
            y = torch.nn.functional.interpolate(x[s:s + 4096].float(), size=(image_size, image_size),
                                                mode="bilinear", antialias=True, align_corners=False)
            out[s:s + 4096] = y.round_().clamp_(0, 255).to(torch.uint8)
        return out

    return Dataset(ds.name, resize(ds.train_images), ds.train_labels, resize(ds.test_images), ds.test_labels,
                   ds.class_names, ds.source)


DATASETS = ("cifar10-jpeg", "cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", "imagenette", "folder:PATH")


def load_dataset(name: str, image_size: int | None = None, progress: bool = True) -> Dataset:
    """Load a dataset by name: cifar10-jpeg, cifar10, cifar100, svhn, mnist, fashion-mnist, imagenette, folder:PATH.

    image_size resizes every image to image_size x image_size; by default images keep their size (folders: the
    first image's), except imagenette, which is IMAGENETTE_SIZE (64). mnist and fashion-mnist have 1 channel.
    """
    if image_size is not None and image_size < 1:
        raise EelabError(f"image size must be a positive number of pixels, got {image_size}")
    if name == "cifar10-jpeg":
        return _resize_images(_load_cifar10_jpeg(progress), image_size)
    if name == "cifar10":
        return _resize_images(_load_cifar10(progress), image_size)
    if name in _TORCHVISION_LAYOUT:
        return _resize_images(_load_torchvision_arrays(name, progress), image_size)
    if name == "imagenette":
        return _load_imagenette(image_size or IMAGENETTE_SIZE, progress)
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
