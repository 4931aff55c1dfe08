"""Datasets as their publishers ship them: the accepted file forms, checksums, safe unpacking, safe readers.

Every named dataset lies on disk in one of a few forms: the files exactly as the publisher ships them
(cifar-10-python.tar.gz, train-images-idx3-ubyte.gz, train_32x32.mat, imagenette2-160.tgz, ...), or the layout
torchvision's own download leaves (cifar-10-batches-py/, MNIST/raw/, ...). Archives are unpacked once, safely
and atomically; the CIFAR pickles go through a restricted unpickler, IDX and .mat files through numpy/scipy, so
no file found on disk can run code. data.py decides where to look and caches what these readers return.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import os
import pickle
import posixpath
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .errors import EelabError

try:  # numpy 2 moved the pickle helpers to numpy._core; CIFAR's own files name numpy.core
    from numpy._core import multiarray as _multiarray, numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray, numeric as _numeric  # type: ignore[no-redef]


@dataclass(frozen=True)
class Form:
    """One way a dataset's files lie on disk: all of `files` (a trailing / marks a folder) in one of `folders`."""

    kind: str                     # "published" (as downloaded), "torchvision" (its download's layout), "unpacked"
    files: tuple[str, ...]
    folders: tuple[str, ...] = ("",)
    unpacks_to: str = ""          # a published archive: the folder it holds, unpacked once into data/

    def describe(self) -> str:
        """The accepted names as one phrase, e.g. 'cifar-100-python/train, ... (torchvision's layout)'."""
        if len(self.folders) == 1:
            names = ", ".join(f"{self.folders[0]}/{f}" if self.folders[0] else f for f in self.files)
            return f"{names} ({KINDS[self.kind]})"
        where = " or ".join(f"{f}/" if f else "the folder itself" for f in self.folders)
        return f"{', '.join(self.files)} ({KINDS[self.kind]}, in {where})"


KINDS = {"published": "as published", "torchvision": "torchvision's layout", "unpacked": "unpacked"}


_IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR10_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                    "batches.meta")
_IMAGENETTE = ("imagenette2-160", "imagenette2-320", "imagenette2")   # smallest first: the first found is used

# name -> forms, tried in this order in each search folder: ready-to-read layouts before archives to unpack
FORMS: dict[str, tuple[Form, ...]] = {
    "cifar10-jpeg": (Form("unpacked", ("train/", "test/"), ("cifar10-jpeg",)),
                     Form("published", ("cifar10-jpeg.tar.gz",), unpacks_to="cifar10-jpeg")),
    "cifar10": (Form("torchvision", _CIFAR10_BATCHES, ("cifar-10-batches-py",)),
                Form("published", ("cifar-10-python.tar.gz",), unpacks_to="cifar-10-batches-py")),
    "cifar100": (Form("torchvision", ("train", "test", "meta"), ("cifar-100-python",)),
                 Form("published", ("cifar-100-python.tar.gz",), unpacks_to="cifar-100-python")),
    # SVHN ships bare .mat files, read as they are; eelab's torchvision download gives them a folder of their own
    "svhn": (Form("torchvision", ("train_32x32.mat", "test_32x32.mat"), ("svhn",)),
             Form("published", ("train_32x32.mat", "test_32x32.mat"))),
    # MNIST and Fashion-MNIST ship files of the same names: Fashion-MNIST's need a folder of their own
    "mnist": (Form("torchvision", _IDX, ("MNIST/raw",)),
              Form("published", tuple(f + ".gz" for f in _IDX), ("", "mnist", "MNIST/raw"))),
    "fashion-mnist": (Form("torchvision", _IDX, ("FashionMNIST/raw",)),
                      Form("published", tuple(f + ".gz" for f in _IDX), ("fashion-mnist", "FashionMNIST/raw"))),
    "imagenette": (Form("torchvision", ("train/", "val/"), _IMAGENETTE),
                   *(Form("published", (f"{v}.tgz",), unpacks_to=v) for v in _IMAGENETTE)),
}

# The publishers' MD5s of their files, as torchvision records them (torchvision/datasets/{cifar,svhn,mnist,
# imagenette}.py): (dataset, file name) -> md5. cifar10-jpeg is the team's own re-packaging and has none.
MD5: dict[tuple[str, str], str] = {
    ("cifar10", "cifar-10-python.tar.gz"): "c58f30108f718f92721af3b95e74349a",
    ("cifar10", "data_batch_1"): "c99cafc152244af753f735de768cd75f",
    ("cifar10", "data_batch_2"): "d4bba439e000b95fd0a9bffe97cbabec",
    ("cifar10", "data_batch_3"): "54ebc095f3ab1f0389bbae665268c751",
    ("cifar10", "data_batch_4"): "634d18415352ddfa80567beed471001a",
    ("cifar10", "data_batch_5"): "482c414d41f54cd18b22e5b47cb7c3cb",
    ("cifar10", "test_batch"): "40351d587109b95175f43aff81a1287e",
    ("cifar10", "batches.meta"): "5ff9c542aee3614f3951f8cda6e48888",
    ("cifar100", "cifar-100-python.tar.gz"): "eb9058c3a382ffc7106e4002c42a8d85",
    ("cifar100", "train"): "16019d7e3df5f24257cddd939b257f8d",
    ("cifar100", "test"): "f0ef6b0ae62326f3e7ffdfab6717acfc",
    ("cifar100", "meta"): "7973b15100ade9c7d40fb424638fde48",
    ("svhn", "train_32x32.mat"): "e26dedcc434d2e4c54c9b2d4a06d8373",
    ("svhn", "test_32x32.mat"): "eb5a983be6a315427106f1b164d9cef3",
    ("mnist", "train-images-idx3-ubyte.gz"): "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    ("mnist", "train-labels-idx1-ubyte.gz"): "d53e105ee54ea40749a09fcbcd1e9432",
    ("mnist", "t10k-images-idx3-ubyte.gz"): "9fb629c4189551a2d022fa330f9573f3",
    ("mnist", "t10k-labels-idx1-ubyte.gz"): "ec29112dd5afa0611ce80d1b7f02629c",
    ("fashion-mnist", "train-images-idx3-ubyte.gz"): "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ("fashion-mnist", "train-labels-idx1-ubyte.gz"): "25c81989df183df01b3e8a0aad5dffbe",
    ("fashion-mnist", "t10k-images-idx3-ubyte.gz"): "bef4ecab320f06d8554ea6380940ec79",
    ("fashion-mnist", "t10k-labels-idx1-ubyte.gz"): "bb300cfdad3c16e7a12a480ee83cd310",
    ("imagenette", "imagenette2-160.tgz"): "e793b78cc4c9e9a4ccc0c1155377a412",
    ("imagenette", "imagenette2-320.tgz"): "3df6f0d01a2c9592104656642f5e78a3",
    ("imagenette", "imagenette2.tgz"): "fe2fc210e6bb7c5664d602c3cd71e612",
}

# Where each publisher serves its files (a download fetches FORMS' published files from here, the first one
# of imagenette), and the folder of data/ they go into.
URLS: dict[str, tuple[str, str]] = {
    "cifar10": ("https://www.cs.toronto.edu/~kriz/", ""),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/", ""),
    "svhn": ("http://ufldl.stanford.edu/housenumbers/", "svhn"),
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "mnist"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/", "fashion-mnist"),
    "imagenette": ("https://s3.amazonaws.com/fast-ai-imageclas/", ""),
}

CLASS_NAMES = {  # as torchvision names them; CIFAR's come from the files' own meta
    "mnist": ["0 - zero", "1 - one", "2 - two", "3 - three", "4 - four", "5 - five", "6 - six", "7 - seven",
              "8 - eight", "9 - nine"],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
    "svhn": [str(i) for i in range(10)],
}


@dataclass(frozen=True)
class Found:
    """Where a dataset was found: its name, the form it is in, and the folder holding the form's files."""

    name: str
    form: Form
    folder: Path

    @property
    def paths(self) -> list[Path]:
        """The form's files (or folders) inside `folder`."""
        return [self.folder / f.rstrip("/") for f in self.form.files]


def _present(path: Path, entry: str) -> bool:
    return (path / entry.rstrip("/")).is_dir() if entry.endswith("/") else (path / entry).is_file()


def locate(name: str, dirs: list[Path], forms: tuple[Form, ...] | None = None) -> Found | None:
    """The first place in `dirs` (in order) holding every file of one of the dataset's forms, else None."""
    for d in dirs:
        for form in forms or FORMS[name]:
            for folder in form.folders:
                if all(_present(d / folder, f) for f in form.files):
                    return Found(name, form, d / folder)
    return None


def unpacked_form(name: str, found: Found) -> Form:
    """The ready-to-read form that the published archive `found` unpacks into (data/<unpacks_to>/...)."""
    return next(f for f in FORMS[name] if f.kind != "published" and found.form.unpacks_to in f.folders)


def accepted(name: str) -> str:
    """Every file name the dataset is accepted under, form by form, as one phrase."""
    forms = sorted(FORMS[name], key=lambda f: f.kind != "published")   # what users download, first
    return " or ".join(f.describe() for f in forms)


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file below a folder."""
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ----------------------------------------------------------------------------- checksums

def _md5(path: Path, progress: bool) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc=f"md5 {path.name}",
                                     disable=not progress, leave=False) as bar:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def checksum_problem(name: str, path: Path, progress: bool = False) -> str | None:
    """None when `path` matches its publisher's MD5 (or none is documented), else what is wrong, in one line."""
    want = MD5.get((name, path.name))
    if want is None or not path.is_file():
        return None
    got = _md5(path, progress)
    if got == want:
        return None
    return (f"{path} does not match its publisher's MD5 ({want}, got {got}, {path.stat().st_size:,} bytes): "
            "most likely a truncated download; download it again, or set EELAB_NO_VERIFY=1 to use a re-packaged "
            "copy as it is")


# ----------------------------------------------------------------------------- archives

def _escapes(m: tarfile.TarInfo) -> bool:
    """Whether a member would be written, or would link, outside the folder it is unpacked into."""
    def outside(p: str) -> bool:
        p = posixpath.normpath(p)
        return p.startswith("/") or p == ".." or p.startswith("../")

    if outside(m.name) or not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
        return True   # devices and fifos have no place in a dataset either
    if m.issym():  # a symlink's target is relative to the link's own folder
        return m.linkname.startswith("/") or outside(posixpath.join(posixpath.dirname(m.name), m.linkname))
    return m.islnk() and outside(m.linkname)   # a hardlink's target is relative to the archive's root


def _check_tail(tf: tarfile.TarFile, archive: Path) -> None:
    """Refuse an archive whose member list ended early: tarfile takes a damaged header for the end, so everything
    after the last member read must be the end-of-archive zero blocks (reading it to the end also runs gzip's
    CRC check)."""
    tf.fileobj.seek(tf.offset)
    while chunk := tf.fileobj.read(1 << 20):
        if chunk.strip(b"\0"):
            raise EelabError(f"{archive} is corrupt: its member list breaks off at byte {tf.offset} of the unpacked "
                             "stream with data after it; delete it and download it again from its publisher")


def unpack_archive(archive: Path, into: Path, progress: bool) -> None:
    """Unpack a tar archive into the new folder `into`, all or nothing.

    Every member is checked before anything is written (no absolute path, `..` or link may leave `into`);
    members go into a temp folder beside `into`, which is renamed into place only when all are out, so an
    interrupted unpack leaves no folder a later run would trust. The archive's one top folder becomes `into`.
    """
    into.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".unpack-{into.name}-", dir=into.parent))
    try:
        try:
            with tarfile.open(archive) as tf:
                members = tf.getmembers()   # reads to the end: a truncated archive fails here, before writing
                _check_tail(tf, archive)
                if not any(m.isfile() for m in members):
                    raise EelabError(f"{archive} holds no files; delete it and download it again from its publisher")
                bad = next((m.name for m in members if _escapes(m)), None)
                if bad is not None:
                    raise EelabError(f"{archive} holds a member {bad!r} that would land outside {into}; refusing to "
                                     "unpack it: get the archive from its publisher again")
                for m in tqdm(members, desc=f"unpack {archive.name}", unit="file", disable=not progress):
                    tf.extract(m, tmp, filter="data")   # the stdlib's own check too
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError, ValueError) as e:
            raise EelabError(f"{archive} is corrupt or truncated ({type(e).__name__}: {str(e)[:80]}); delete it and "
                             "download it again from its publisher") from None
        tops = [p for p in tmp.iterdir()]
        os.replace(tops[0] if len(tops) == 1 and tops[0].is_dir() else tmp, into)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- readers

# The only globals a CIFAR python batch names: numpy array reconstruction, and bytes from protocol-2 pickles.
_SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _numeric._frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only dicts, lists, str, bytes, numbers and numpy arrays: no code runs."""

    def find_class(self, module: str, name: str):  # noqa: D401 - pickle API
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name}") from None


def _read_pickle(path: Path) -> dict:
    """A CIFAR batch as a dict with str keys (the files are Python 2 pickles: latin1 strings)."""
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        raise EelabError(f"{path} is not a CIFAR batch: it names {e}, which CIFAR's files never do (a tampered or "
                         "foreign file); refusing to load it: get the archive from its publisher again") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise EelabError(f"{path} is not a readable CIFAR batch ({type(e).__name__}; truncated?); get the archive "
                         "from its publisher again") from None
    if not isinstance(d, dict):
        raise EelabError(f"{path} is not a CIFAR batch (it holds a {type(d).__name__}, not a dict); get the archive "
                         "from its publisher again")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch -> (images uint8 [N, 3, 32, 32], labels int64 [N])."""
    d = _read_pickle(path)
    x, y = d.get("data"), d.get(label_key)
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 \
            or y is None or len(y) != len(x):
        raise EelabError(f"{path} lacks CIFAR's 'data' [N, 3072] uint8 and '{label_key}' [N]; get the archive from "
                         "its publisher again")
    return x.reshape(-1, 3, 32, 32), np.asarray(y, dtype=np.int64)   # rows are CHW, row-major


def read_cifar_names(path: Path, key: str) -> list[str]:
    """The class names a CIFAR meta file lists under `key` [C]."""
    names = _read_pickle(path).get(key)
    if not isinstance(names, list):
        raise EelabError(f"{path} lacks CIFAR's '{key}' list; get the archive from its publisher again")
    return [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's format, gzipped or not) -> uint8 [N, ...]."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise EelabError(f"{path} is corrupt or truncated ({type(e).__name__}); download it again") from None
    ndim = raw[3] if len(raw) >= 4 else 0
    if raw[:3] != b"\x00\x00\x08" or not 1 <= ndim <= 4 or len(raw) < 4 + 4 * ndim:
        raise EelabError(f"{path} is not an IDX file of unsigned bytes (bad header); download it again")
    shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", ndim, 4))   # big-endian sizes after the magic
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise EelabError(f"{path} holds {body.size} bytes of data where its header says {shape}: truncated; "
                         "download it again")
    return body.reshape(shape)


def read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """SVHN's train_32x32.mat / test_32x32.mat -> (images uint8 [N, 3, 32, 32], labels int64 [N], 10 -> 0)."""
    import scipy.io

    try:
        m = scipy.io.loadmat(path, variable_names=("X", "y"))
        x, y = m["X"], m["y"]
    except Exception as e:  # scipy raises many types for damaged files
        raise EelabError(f"{path} is not a readable SVHN .mat file ({type(e).__name__}; truncated?); download it "
                         "again") from None
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise EelabError(f"{path} lacks SVHN's X [32, 32, 3, N] and y [N, 1]; download it again")
    labels = y.astype(np.int64).reshape(-1)
    labels[labels == 10] = 0   # SVHN stores digit 0 as label 10
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1)).astype(np.uint8), labels   # HWCN -> NCHW


def read_arrays(found: Found) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """cifar10, cifar100, svhn, mnist, fashion-mnist from a ready form -> (x_train, y_train, x_test, y_test, names).

    Images uint8 [N, ch, H, W] (mnist and fashion-mnist: 1 channel), labels int64 [N], class names [C].
    """
    p = found.paths
    if found.name == "cifar10":
        parts = [read_cifar_batch(f, "labels") for f in p[:5]]
        x_te, y_te = read_cifar_batch(p[5], "labels")
        return (np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts]), x_te, y_te,
                read_cifar_names(p[6], "label_names"))
    if found.name == "cifar100":
        return (*read_cifar_batch(p[0], "fine_labels"), *read_cifar_batch(p[1], "fine_labels"),
                read_cifar_names(p[2], "fine_label_names"))
    if found.name == "svhn":
        return (*read_svhn_mat(p[0]), *read_svhn_mat(p[1]), CLASS_NAMES["svhn"])
    x_tr, y_tr, x_te, y_te = (read_idx(f) for f in p)
    for x, y, f in ((x_tr, y_tr, p[0]), (x_te, y_te, p[2])):
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise EelabError(f"{f} and its labels file disagree ({x.shape} images, {y.shape} labels); download "
                             "them again")
    return x_tr[:, None], y_tr.astype(np.int64), x_te[:, None], y_te.astype(np.int64), CLASS_NAMES[found.name]


def download(name: str, into: Path) -> None:
    """Fetch the dataset's published files (its first published form) from the publisher into `into`."""
    from torchvision.datasets.utils import download_url

    base, _ = URLS[name]
    form = next(f for f in FORMS[name] if f.kind == "published")
    for f in form.files:
        download_url(base + f, str(into), f, MD5.get((name, f)))
