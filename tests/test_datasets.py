"""Each named dataset loads from small files written here in torchvision's on-disk layout (the published forms:
test_published.py)."""
import hashlib
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

import eelab.data as data
import eelab.published as published
from eelab.data import load_dataset, split_train_cal
from eelab.errors import EelabError

# the publishers' md5 sums are those of the real files: tests register the sums of their own small files
_md5 = lambda path: hashlib.md5(path.read_bytes()).hexdigest()  # noqa: E731


def _register(monkeypatch, name, *paths):
    for p in paths:
        monkeypatch.setitem(published.MD5, (name, p.name), _md5(p))


@pytest.fixture
def datasets_dir(tmp_path, monkeypatch):
    """An empty $EELAB_DATASETS, with the shared copies out of sight."""
    root = tmp_path / "datasets"
    root.mkdir()
    monkeypatch.setenv("EELAB_DATASETS", str(root))
    monkeypatch.setattr(data, "_SHARED", tmp_path / "no-shared")
    return root


def _pixels(n, shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def write_cifar100(root, monkeypatch, n_train=12, n_test=4):
    """cifar-100-python/{train,test,meta}: pickled dicts of [N, 3072] uint8 rows and fine labels."""
    d = root / "cifar-100-python"
    d.mkdir()
    names = [f"class{i:02d}" for i in range(100)]
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        with open(d / split, "wb") as f:
            pickle.dump({"data": _pixels(n, (3072,), seed), "fine_labels": [i * 7 % 100 for i in range(n)],
                         "coarse_labels": [0] * n}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names, "coarse_label_names": ["c"] * 20}, f)
    _register(monkeypatch, "cifar100", d / "train", d / "test", d / "meta")
    return d


def write_svhn(root, monkeypatch, n_train=10, n_test=4):
    """svhn/{train,test}_32x32.mat: X [32, 32, 3, N] uint8, y [N, 1] with digit 0 stored as 10."""
    import scipy.io

    d = root / "svhn"
    d.mkdir()
    for split, n, seed in (("train", n_train, 2), ("test", n_test, 3)):
        x = _pixels(n, (32, 32, 3), seed).transpose(1, 2, 3, 0)
        y = np.array([[10 if i % 10 == 0 else i % 10] for i in range(n)], dtype=np.uint8)
        scipy.io.savemat(d / f"{split}_32x32.mat", {"X": x, "y": y})
        _register(monkeypatch, "svhn", d / f"{split}_32x32.mat")
    return d


def write_mnist(root, folder="MNIST", n_train=12, n_test=5):
    """FOLDER/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte: big-endian IDX headers, then uint8 data."""
    d = root / folder / "raw"
    d.mkdir(parents=True)
    for prefix, n, seed in (("train", n_train, 4), ("t10k", n_test, 5)):
        (d / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, n, 28, 28)
                                                        + _pixels(n, (28, 28), seed).tobytes())
        (d / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, n)
                                                        + bytes(i % 10 for i in range(n)))
    return d


def write_imagenette(root, folder="imagenette2-160", per_class=3):
    """FOLDER/{train,val}/<wnid>/*.JPEG for three of Imagenette's classes, non-square like the real ones."""
    wnids = ["n01440764", "n02102040", "n03000684"]   # tench, English springer, chain saw
    rng = np.random.default_rng(6)
    for split in ("train", "val"):
        for w in wnids:
            (root / folder / split / w).mkdir(parents=True)
            for i in range(per_class):
                img = rng.integers(0, 256, size=(160, 213, 3), dtype=np.uint8)
                Image.fromarray(img).save(root / folder / split / w / f"{w}_{i}.JPEG")
    return root / folder


def test_cifar100_loads_from_torchvisions_layout(datasets_dir, monkeypatch):
    write_cifar100(datasets_dir, monkeypatch)
    ds = load_dataset("cifar100", progress=False)
    assert ds.train_images.shape == (12, 3, 32, 32) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (4, 3, 32, 32) and ds.num_classes == 100
    assert ds.train_labels.tolist() == [i * 7 % 100 for i in range(12)]
    # row-major CHW rows, as CIFAR stores them: pixel (c, y, x) is data[c * 1024 + y * 32 + x]
    raw = _pixels(12, (3072,), 0)
    assert ds.train_images[1, 2, 3, 4].item() == raw[1, 2 * 1024 + 3 * 32 + 4]
    assert len(list((data.data_dir() / "cache").glob("cifar100-*.pt"))) == 1   # the decoded cache
    again = load_dataset("cifar100", progress=False)
    assert again.train_images.equal(ds.train_images)


def test_svhn_loads_with_digit_zero_as_label_zero(datasets_dir, monkeypatch):
    write_svhn(datasets_dir, monkeypatch)
    ds = load_dataset("svhn", progress=False)
    assert ds.train_images.shape == (10, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
    assert ds.train_labels.tolist() == list(range(10)) and ds.class_names == [str(i) for i in range(10)]
    x = _pixels(10, (32, 32, 3), 2)           # [N, H, W, C] as written
    assert ds.train_images[3, 1, 5, 7].item() == x[3, 5, 7, 1]


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_grayscale_datasets_keep_one_channel(datasets_dir, name, folder):
    write_mnist(datasets_dir, folder)
    ds = load_dataset(name, progress=False)
    assert ds.train_images.shape == (12, 1, 28, 28) and ds.test_images.shape == (5, 1, 28, 28)
    assert ds.image_shape == (1, 28, 28) and ds.num_classes == 10
    assert ds.train_images[2, 0].numpy().tolist() == _pixels(12, (28, 28), 4)[2].tolist()
    assert ds.test_labels.tolist() == [0, 1, 2, 3, 4]
    assert (ds.class_names[0] == "0 - zero") == (name == "mnist")
    resized = load_dataset(name, image_size=32, progress=False)
    assert resized.train_images.shape == (12, 1, 32, 32)


def test_imagenette_folder_layout_resized_and_cropped(datasets_dir):
    write_imagenette(datasets_dir)
    ds = load_dataset("imagenette", progress=False)
    assert data.IMAGENETTE_SIZE == 64
    assert ds.train_images.shape == (9, 3, 64, 64) and ds.test_images.shape == (9, 3, 64, 64)
    assert ds.class_names == ["tench", "English springer", "chain saw"]
    assert ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    small = load_dataset("imagenette", image_size=16, progress=False)
    assert small.train_images.shape == (9, 3, 16, 16)
    assert len(list((data.data_dir() / "cache").glob("imagenette-*.pt"))) == 2   # one cache per size


def test_each_dataset_gets_a_seeded_cal_split(datasets_dir):
    write_mnist(datasets_dir, n_train=12)
    ds = load_dataset("mnist", progress=False)
    train, cal = split_train_cal(ds.train_images.shape[0], 4, seed=0)
    assert train.numel() == 8 and cal.equal(split_train_cal(12, 4, seed=0)[1])


@pytest.mark.parametrize("name,expect", [
    ("cifar100", "cifar-100-python/train"), ("svhn", "svhn/train_32x32.mat"),
    ("mnist", "MNIST/raw/train-images-idx3-ubyte"), ("fashion-mnist", "FashionMNIST/raw/train-images-idx3-ubyte"),
    ("imagenette", "imagenette2-160")])
def test_missing_dataset_is_one_line_naming_where_and_what_to_do(datasets_dir, name, expect):
    with pytest.raises(EelabError) as e:
        load_dataset(name, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and f"dataset {name} not found" in msg and expect in msg
    assert str(datasets_dir) in msg and "EELAB_OFFLINE" in msg and "go online" in msg


def test_unknown_and_corrupt_datasets_are_one_line(datasets_dir, monkeypatch):
    with pytest.raises(EelabError, match="unknown dataset 'cifar1000'.*cifar100.*imagenette"):
        load_dataset("cifar1000")
    write_cifar100(datasets_dir, monkeypatch)
    monkeypatch.setitem(published.MD5, ("cifar100", "train"), "0" * 32)   # a file that fails the checksum
    with pytest.raises(EelabError, match=r"cifar-100-python/train does not match its publisher's MD5.*download it "
                                         r"again.*EELAB_NO_VERIFY=1") as e:
        load_dataset("cifar100", progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(EelabError, match="image size must be a positive"):
        load_dataset("mnist", image_size=0)
