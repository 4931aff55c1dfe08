"""Datasets by name, the seeded cal split, the decoded-tensor cache, tensor augmentation, offline rules.

Datasets are looked for in $EELAB_DATASETS, then data/, then ../shared/datasets/, as their publishers ship them
or in the layout torchvision's download leaves (published.py knows the forms); archives are unpacked once into
data/, and when the files are nowhere and EELAB_OFFLINE is unset, the publisher's files are downloaded into data/.
Images live in memory as uint8 [N, ch, H, W], decoded once into data/cache/ by eelab's own safe readers.
"""
from __future__ import annotations

import hashlib
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import published
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
    check_image_path(path)
    try:
        with _open_image(path) as im:
            im = im.convert("RGB" if channels == 3 else "L")
            if size is not None and (im.height, im.width) != tuple(size):
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(im, dtype=np.uint8)
    except EelabError:
        raise
    except Exception as e:  # Pillow raises many types for damaged files; all are the file's fault
        raise EelabError(f"{path} cannot be decoded as an image ({type(e).__name__}); give a JPEG/PNG/... file") from None
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def check_image_path(path: str | Path) -> None:
    """One-line errors for a path that is no image file: missing, a directory, a FIFO or device, empty."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise EelabError(f"image {path} does not exist; check the path") from None
    except OSError as e:
        raise EelabError(f"image {path} cannot be read ({e.strerror or type(e).__name__}); check the path") from None
    if stat.S_ISDIR(st.st_mode):
        raise EelabError(f"image {path} is a directory, not an image file; give the image files inside it")
    if not stat.S_ISREG(st.st_mode):
        raise EelabError(f"image {path} is not a regular file (a FIFO, socket or device); give an image file")
    if st.st_size == 0:
        raise EelabError(f"image {path} is empty (0 bytes); give a JPEG/PNG/... file, or delete it")


def _open_image(path: Path) -> "Image.Image":
    """Image.open with a header that declares too many pixels (a decompression bomb) refused in one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise EelabError(f"image {path} declares more than {Image.MAX_IMAGE_PIXELS} pixels in its header (a "
                             "decompression bomb, or a huge image); give a smaller image") from None


def _list_image_folder(split_dir: Path) -> tuple[list[Path], list[int], list[str]]:
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise EelabError(f"{split_dir} has no class folders; an image folder needs {split_dir}/<class>/<image>")
    files, labels = [], []
    for i, c in enumerate(classes):
        found = [f for f in sorted((split_dir / c).iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        if not found:
            raise EelabError(f"class folder {split_dir / c} holds no images ({', '.join(IMAGE_EXTENSIONS)}); add its "
                             "images or remove the folder")
        files += found
        labels += [i] * len(found)
    if len(classes) < 2:
        raise EelabError(f"{split_dir} has one class folder ({classes[0]}); a classifier needs at least two classes, "
                         f"each in {split_dir}/<class>/")
    return files, labels, classes


def _decode_folder(split_dir: Path, size: tuple[int, int] | None, channels: int | None,
                   progress: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    files, labels, classes = _list_image_folder(split_dir)
    if size is None or channels is None:  # the first image decides; it is checked as every image is
        first = load_image(files[0], None, 3)
        with Image.open(files[0]) as im:
            size = size or tuple(first.shape[1:])
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

IMAGENETTE_SIZE = 64  # default side of imagenette images: shorter side resized to this, then centre-cropped
_IMAGENETTE_VARIANTS = {"imagenette2-160": "160px", "imagenette2-320": "320px", "imagenette2": "full"}


def _find(names: list[str]) -> Path | None:
    """The first of `names` present in a search folder (folders in search order), else None."""
    for d in search_dirs():
        for n in names:
            if (d / n).exists():
                return d / n
    return None


def _verify() -> bool:
    return os.environ.get("EELAB_NO_VERIFY", "") in ("", "0")


def _not_found(name: str) -> EelabError:
    """The one-line error for a dataset that is nowhere: every folder searched and every file name accepted."""
    if name == "cifar10-jpeg":
        how = "it is not downloadable: put the archive in one of those folders, or use --dataset cifar10"
    else:
        how = (f"put those files in one of those folders as downloaded, or unset EELAB_OFFLINE and go online to let "
               f"eelab download them from their publisher into {data_dir()}")
    return EelabError(f"dataset {name} not found: looked in {', '.join(str(d) for d in search_dirs())} for "
                      f"{published.accepted(name)}; {how} (or set $EELAB_DATASETS to the folder that holds them)")


def _check(name: str, paths: list[Path], progress: bool) -> None:
    """Refuse the first file that differs from its publisher's MD5, in one line (not with EELAB_NO_VERIFY=1)."""
    if _verify():
        for p in paths:
            problem = published.checksum_problem(name, p, progress)
            if problem:
                raise EelabError(problem)


def _fetch(name: str) -> None:
    """Download the dataset's published files into data/ (online only)."""
    base, sub = published.URLS[name]
    try:
        published.download(name, data_dir() / sub)
    except Exception as e:  # network errors come in many types
        raise EelabError(f"dataset {name} not found in {', '.join(str(d) for d in search_dirs())} and the download "
                         f"from {base} failed ({type(e).__name__}: {' '.join(str(e).split())[:80]}); go online, or "
                         f"put {published.accepted(name)} into {data_dir()} (or into the folder $EELAB_DATASETS "
                         "names)") from None


def _ready(name: str, progress: bool) -> published.Found:
    """Where the dataset's ready-to-read files are: found as they are, unpacked once from an archive, or downloaded."""
    found = published.locate(name, search_dirs())
    if found is None:
        if name == "cifar10-jpeg" or _offline():
            raise _not_found(name)
        _fetch(name)
        found = published.locate(name, search_dirs())
        if found is None:
            raise _not_found(name)
    if not found.form.unpacks_to:
        return found
    archive, target = found.paths[0], data_dir() / found.form.unpacks_to
    if not target.exists():  # unpacked once: the rename into place is the last step, so it exists only when whole
        _check(name, [archive], progress)
        published.unpack_archive(archive, target, progress)
    ready = published.Found(name, published.unpacked_form(name, found), target)
    missing = [str(p) for p in ready.paths if not p.exists()]
    if missing:
        raise EelabError(f"{target} (unpacked from {archive}) lacks {', '.join(missing)}; delete {target} to unpack "
                         "it again, or get the archive from its publisher again")
    return ready


def _files_key(name: str, files: list[Path], extra: str = "") -> str:
    """Cache key of a dataset: its name, options and every file's path, size and mtime (a new file rebuilds it)."""
    h = hashlib.sha256(f"{name}|{extra}|{CACHE_VERSION}".encode())
    for f in sorted(files):
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()


def _load_cifar10_jpeg(progress: bool) -> Dataset:
    return _load_folder("cifar10-jpeg", _ready("cifar10-jpeg", progress).folder, (32, 32), 3, progress)


def _load_arrays(name: str, progress: bool) -> Dataset:
    """cifar10, cifar100, svhn, mnist, fashion-mnist through eelab's own safe readers -> uint8 [N, ch, H, W]."""
    found = _ready(name, progress)

    def build() -> Dataset:
        _check(name, found.paths, progress)
        x_tr, y_tr, x_te, y_te, classes = published.read_arrays(found)
        t = lambda a, dtype: torch.from_numpy(np.array(a, dtype=dtype))  # noqa: E731  a writable, contiguous copy
        return Dataset(name, t(x_tr, np.uint8), t(y_tr, np.int64), t(x_te, np.uint8), t(y_te, np.int64), classes,
                       str(found.folder))

    return _cached(name, _files_key(name, found.paths), build, progress)


def _load_imagenette(image_size: int, progress: bool) -> Dataset:
    """Imagenette (10 ImageNet classes) through torchvision's folder reader, each image resized and centre-cropped."""
    import torchvision.datasets as tvd
    from torchvision import transforms

    folder = _ready("imagenette", progress).folder
    # shorter side to image_size, then the central square: no aspect-ratio distortion
    tf = transforms.Compose([transforms.Resize(image_size, antialias=True), transforms.CenterCrop(image_size),
                             transforms.PILToTensor()])

    def decode(split: str):
        try:
            ds = tvd.Imagenette(str(folder.parent), split=split, size=_IMAGENETTE_VARIANTS[folder.name], transform=tf)
        except Exception as e:  # torchvision raises several types for folders it cannot read
            raise EelabError(f"imagenette in {folder} cannot be read ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:80]}); delete it and put a complete copy there") from None
        if len(ds) == 0:
            raise EelabError(f"imagenette {folder / split} holds no .JPEG images; copy a complete copy there")
        images = torch.empty(len(ds), 3, image_size, image_size, dtype=torch.uint8)
        labels = torch.empty(len(ds), dtype=torch.int64)
        for i in tqdm(range(len(ds)), desc=f"decode imagenette {split}", unit="img", disable=not progress):
            images[i], labels[i] = ds[i]
        return images, labels, [names[0] for names in ds.classes]

    def build() -> Dataset:
        tr, trl, classes = decode("train")
        te, tel, classes_te = decode("val")
        if classes_te != classes:
            raise EelabError(f"imagenette {folder} has other classes in train/ and val/; use a complete copy")
        return Dataset("imagenette", tr, trl, te, tel, classes, str(folder))

    files = [f for split in ("train", "val") for f in (folder / split).rglob("*") if f.is_file()]
    return _cached(f"imagenette-{image_size}", _files_key("imagenette", files, str(image_size)), build, progress)


def describe_datasets(verify: bool | None = None) -> list[dict]:
    """Per named dataset: where it was found, in which form, its size in bytes and checksum, or what is missing.

    verify checks the publishers' MD5s (default: unless EELAB_NO_VERIFY=1); nothing is unpacked or downloaded.
    """
    verify = _verify() if verify is None else verify
    rows = []
    for name in published.FORMS:
        found = published.locate(name, search_dirs())
        if found is None:
            rows.append({"name": name, "found": False, "looked_in": [str(d) for d in search_dirs()],
                         "accepts": published.accepted(name)})
            continue
        problems = [p for p in (published.checksum_problem(name, f) for f in found.paths) if p] if verify else []
        documented = any((name, f.name) in published.MD5 for f in found.paths)
        unpacked = data_dir() / found.form.unpacks_to if found.form.unpacks_to else None
        rows.append({"name": name, "found": True, "form": found.form.kind, "folder": str(found.folder),
                     "files": [str(f) for f in found.paths], "bytes": sum(published.size_of(f) for f in found.paths),
                     "unpacked_into": str(unpacked) if unpacked is not None and unpacked.exists() else None,
                     "checksum": ("not checked" if not verify else "MISMATCH" if problems
                                  else "ok" if documented else "none published"),
                     "problems": problems})
    return rows


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
_SIDES = {"cifar10-jpeg": 32, "cifar10": 32, "cifar100": 32, "svhn": 32, "mnist": 28, "fashion-mnist": 28,
          "imagenette": IMAGENETTE_SIZE}  # square images, as load_dataset gives them by default


def image_side(name: str, image_size: int | None = None) -> int | None:
    """Side in pixels of the square images load_dataset(name, image_size) gives, where it is known without loading
    them; None for an image folder at its own size (its first image decides)."""
    return image_size if image_size is not None else _SIDES.get(name)


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
        return _resize_images(_load_arrays(name, progress), image_size)
    if name in ("cifar100", "svhn", "mnist", "fashion-mnist"):
        return _resize_images(_load_arrays(name, progress), image_size)
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

MAX_SEED = 2**32 - 1  # seed + per-epoch offsets must stay inside torch's 64-bit generator seeds


def check_seed(seed: Any, option: str = "--seed") -> int:
    """The one check of a seed (every command with --seed, and TrainConfig): a whole number in [0, MAX_SEED].
    One-line EelabError naming the option otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= seed <= MAX_SEED:
        raise EelabError(f"{option} must be a whole number in [0, {MAX_SEED}] (eelab offsets it for its generators, "
                         f"which take 64-bit seeds), got {seed!r}")
    return int(seed)


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


def augment(images: torch.Tensor, generator: torch.Generator, pad: int = 4, flip: bool = True,
            flip_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Random crop after `pad` reflect padding and horizontal flip, per sample: uint8 [B, ch, H, W] -> same.

    flip_mask bool [B]: the images to flip (derandomised flipping), instead of a draw from generator."""
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
    if flip_mask is not None:
        out = torch.where(flip_mask.view(b, 1, 1, 1), out.flip(3), out)
    elif flip:
        mask = torch.rand(b, generator=generator) < 0.5
        out = torch.where(mask.view(b, 1, 1, 1), out.flip(3), out)
    return out.contiguous()
