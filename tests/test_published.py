"""Each named dataset loads from small files written here exactly as its publisher ships them, placed as a user
would, and in torchvision's layout; hostile, tampered, truncated and mismatching files are refused in one line."""
import gzip
import hashlib
import io
import json
import pickle
import shutil
import struct
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import eelab.data as data
import eelab.published as published
from eelab.cli import main
from eelab.data import describe_datasets, load_dataset
from eelab.errors import EelabError

NAMES = ("cifar10", "cifar100", "svhn", "mnist", "fashion-mnist", "imagenette")


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """(datasets, shared): an empty $EELAB_DATASETS and an empty shared folder; publisher MD5s not checked."""
    root, shared = tmp_path / "datasets", tmp_path / "shared"
    root.mkdir()
    shared.mkdir()
    monkeypatch.setenv("EELAB_DATASETS", str(root))
    monkeypatch.setattr(data, "_SHARED", shared)
    monkeypatch.setenv("EELAB_NO_VERIFY", "1")   # small test files never match the real files' MD5s
    return root, shared


def _pixels(n, shape, seed):
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def _tar(path, folder, arcname):
    with tarfile.open(path, "w:gz") as tf:
        tf.add(folder, arcname=arcname)
    return path


def _pickle2(obj, path):
    path.write_bytes(pickle.dumps(obj, protocol=2))   # CIFAR's files are Python 2 pickles


def write_cifar10_batches(d, n=2):
    """cifar-10-batches-py/: data_batch_1..5 (n images each), test_batch (n), batches.meta, as the archive holds."""
    d.mkdir(parents=True)
    for i, f in enumerate(["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                           "test_batch"]):
        _pickle2({"batch_label": f, "labels": [(i + j) % 10 for j in range(n)], "data": _pixels(n, (3072,), i),
                  "filenames": [f"img{j}.png" for j in range(n)]}, d / f)
    _pickle2({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": n, "num_vis": 3072},
             d / "batches.meta")
    (d / "readme.html").write_text("<html></html>")
    return d


def write_cifar100_files(d, n_train=6, n_test=3):
    """cifar-100-python/: train, test, meta."""
    d.mkdir(parents=True)
    for split, n, seed in (("train", n_train, 10), ("test", n_test, 11)):
        _pickle2({"filenames": ["x"] * n, "fine_labels": [i * 7 % 100 for i in range(n)],
                  "coarse_labels": [0] * n, "data": _pixels(n, (3072,), seed)}, d / split)
    _pickle2({"fine_label_names": [f"f{i:02d}" for i in range(100)], "coarse_label_names": ["c"] * 20}, d / "meta")
    return d


def write_svhn_mats(d, n_train=5, n_test=3):
    """train_32x32.mat, test_32x32.mat: X [32, 32, 3, N] uint8, y [N, 1] with digit 0 stored as 10."""
    import scipy.io

    d.mkdir(parents=True, exist_ok=True)
    for split, n, seed in (("train", n_train, 20), ("test", n_test, 21)):
        y = np.array([[10 if i % 10 == 0 else i % 10] for i in range(n)], dtype=np.uint8)
        scipy.io.savemat(d / f"{split}_32x32.mat", {"X": _pixels(n, (32, 32, 3), seed).transpose(1, 2, 3, 0), "y": y})
    return d


def write_idx_gz(d, n_train=6, n_test=4):
    """The four published .gz files: gzipped IDX, big-endian headers then uint8 data."""
    d.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 30), ("t10k", n_test, 31)):
        (d / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(
            struct.pack(">IIII", 0x803, n, 28, 28) + _pixels(n, (28, 28), seed).tobytes()))
        (d / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(
            struct.pack(">II", 0x801, n) + bytes((i * 3) % 10 for i in range(n))))
    return d


def write_imagenette_tree(d, per_class=2):
    """imagenette2-160/{train,val}/<wnid>/*.JPEG for two classes."""
    rng = np.random.default_rng(40)
    for split in ("train", "val"):
        for w in ("n01440764", "n03000684"):   # tench, chain saw
            (d / split / w).mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (160, 200, 3), dtype=np.uint8)).save(d / split / w / f"{i}.JPEG")
    return d


def place_published(name, where, tmp):
    """The dataset's files as its publisher ships them, placed in the folder `where`."""
    if name == "cifar10":
        _tar(where / "cifar-10-python.tar.gz", write_cifar10_batches(tmp / "c10"), "cifar-10-batches-py")
    elif name == "cifar100":
        _tar(where / "cifar-100-python.tar.gz", write_cifar100_files(tmp / "c100"), "cifar-100-python")
    elif name == "svhn":
        write_svhn_mats(where)
    elif name == "mnist":
        write_idx_gz(where)
    elif name == "fashion-mnist":
        write_idx_gz(where / "fashion-mnist")
    else:
        _tar(where / "imagenette2-160.tgz", write_imagenette_tree(tmp / "inet"), "imagenette2-160")


def place_torchvision(name, where, tmp):
    """The dataset in the layout torchvision's own download leaves, in the folder `where`."""
    if name == "cifar10":
        write_cifar10_batches(where / "cifar-10-batches-py")
    elif name == "cifar100":
        write_cifar100_files(where / "cifar-100-python")
    elif name == "svhn":
        write_svhn_mats(where / "svhn")
    elif name in ("mnist", "fashion-mnist"):
        raw = where / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
        for f in write_idx_gz(tmp / "gz").iterdir():   # torchvision unpacks each .gz beside it
            raw.mkdir(parents=True, exist_ok=True)
            (raw / f.stem).write_bytes(gzip.decompress(f.read_bytes()))
    else:
        write_imagenette_tree(where / "imagenette2-160")


EXPECT = {  # name -> (train shape, test shape, first train labels)
    "cifar10": ((10, 3, 32, 32), (2, 3, 32, 32), [0, 1, 1, 2]),
    "cifar100": ((6, 3, 32, 32), (3, 3, 32, 32), [0, 7, 14, 21]),
    "svhn": ((5, 3, 32, 32), (3, 3, 32, 32), [0, 1, 2, 3]),
    "mnist": ((6, 1, 28, 28), (4, 1, 28, 28), [0, 3, 6, 9]),
    "fashion-mnist": ((6, 1, 28, 28), (4, 1, 28, 28), [0, 3, 6, 9]),
    "imagenette": ((4, 3, 64, 64), (4, 3, 64, 64), [0, 0, 1, 1]),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("place", ["datasets", "data", "shared"])
def test_published_files_load_and_match_the_torchvision_layout(dirs, tmp_path, monkeypatch, name, place):
    root, shared = dirs
    where = {"datasets": root, "data": data.data_dir(), "shared": shared}[place]
    where.mkdir(parents=True, exist_ok=True)
    place_published(name, where, tmp_path / "src")
    ds = load_dataset(name, progress=False)
    train_shape, test_shape, labels = EXPECT[name]
    assert ds.train_images.shape == train_shape and ds.test_images.shape == test_shape
    assert ds.train_images.dtype == torch.uint8 and ds.train_labels.dtype == torch.int64
    assert ds.train_labels[:4].tolist() == labels
    if name == "cifar10":   # batches in order; rows are CHW: pixel (c, y, x) is data[c * 1024 + y * 32 + x]
        assert ds.train_images[3, 2, 3, 4].item() == _pixels(2, (3072,), 1)[1, 2 * 1024 + 3 * 32 + 4]
        assert ds.class_names[:2] == ["c0", "c1"]
    if name == "svhn":      # written [N, H, W, C]
        assert ds.train_images[3, 1, 5, 7].item() == _pixels(5, (32, 32, 3), 20)[3, 5, 7, 1]
    if name == "mnist":
        assert ds.test_images[1, 0].numpy().tolist() == _pixels(4, (28, 28), 31)[1].tolist()
        assert ds.class_names[0] == "0 - zero"
    if name == "imagenette":
        assert ds.class_names == ["tench", "chain saw"]
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "imagenette": "imagenette2-160"}
    if name in folder:      # archives are unpacked once into data/, with no temp folder left behind
        assert (data.data_dir() / folder[name]).is_dir()
    assert not list(data.data_dir().glob(".unpack-*"))

    # the same dataset in torchvision's layout, in a fresh data/, gives the same tensors
    tv = tmp_path / "tv"
    tv.mkdir()
    place_torchvision(name, tv, tmp_path / "src2")
    monkeypatch.setenv("EELAB_DATASETS", str(tv))
    monkeypatch.setenv("EELAB_DATA", str(tmp_path / "fresh-data"))
    monkeypatch.setattr(data, "_SHARED", tmp_path / "nowhere")
    again = load_dataset(name, progress=False)
    assert again.train_images.equal(ds.train_images) and again.test_labels.equal(ds.test_labels)
    assert again.class_names == ds.class_names
    assert not (tmp_path / "fresh-data" / folder.get(name, "x")).exists()   # read in place, nothing unpacked


def test_cifar10_jpeg_in_both_forms(dirs, tmp_path):
    from conftest import write_image_folder

    root, _ = dirs
    src = write_image_folder(tmp_path / "src" / "cifar10-jpeg", n_train=3, n_test=3, size=32)
    _tar(root / "cifar10-jpeg.tar.gz", src, "cifar10-jpeg")
    ds = load_dataset("cifar10-jpeg", progress=False)
    assert ds.train_images.shape == (3, 3, 32, 32) and (data.data_dir() / "cifar10-jpeg" / "test").is_dir()
    (root / "cifar10-jpeg.tar.gz").unlink()
    shutil.copytree(src, root / "cifar10-jpeg")   # the unpacked folder, found as it is
    assert load_dataset("cifar10-jpeg", progress=False).train_images.equal(ds.train_images)


def test_mnist_gz_in_torchvisions_raw_folder(dirs, tmp_path):
    root, _ = dirs
    write_idx_gz(root / "MNIST" / "raw")   # torchvision keeps the .gz beside what it unpacks
    assert load_dataset("mnist", progress=False).train_images.shape == (6, 1, 28, 28)


def test_unpacked_once_then_loaded_from_the_cache(dirs, tmp_path, monkeypatch):
    root, _ = dirs
    place_published("cifar10", root, tmp_path / "src")
    first = load_dataset("cifar10", progress=False)
    assert len(list((data.data_dir() / "cache").glob("cifar10-*.pt"))) == 1

    def no_more(*a, **k):
        raise AssertionError("unpacked twice")

    monkeypatch.setattr(published, "unpack_archive", no_more)
    monkeypatch.setattr(published, "read_arrays", no_more)   # the decoded cache answers
    assert load_dataset("cifar10", progress=False).train_images.equal(first.train_images)


def test_an_interrupted_unpack_leaves_nothing_a_later_run_trusts(dirs, tmp_path, monkeypatch):
    root, _ = dirs
    place_published("cifar100", root, tmp_path / "src")
    real_extract, calls = tarfile.TarFile.extract, []

    def extract_then_die(self, member, *a, **k):
        calls.append(member)
        if len(calls) == 3:
            raise KeyboardInterrupt   # the user pressed Ctrl-C halfway
        return real_extract(self, member, *a, **k)

    monkeypatch.setattr(tarfile.TarFile, "extract", extract_then_die)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("cifar100", progress=False)
    assert list(data.data_dir().iterdir()) == []   # no half-unpacked cifar-100-python/, no temp folder
    monkeypatch.setattr(tarfile.TarFile, "extract", real_extract)
    assert load_dataset("cifar100", progress=False).train_images.shape == (6, 3, 32, 32)


def _hostile_tar(path, member: tarfile.TarInfo, payload=b"pwned"):
    with tarfile.open(path, "w:gz") as tf:
        ok = tarfile.TarInfo("cifar-10-batches-py/readme.html")
        ok.size = 2
        tf.addfile(ok, io.BytesIO(b"hi"))
        member.size = len(payload) if member.isfile() else 0
        tf.addfile(member, io.BytesIO(payload) if member.isfile() else None)
    return path


def _link(name, target, kind=tarfile.SYMTYPE):
    m = tarfile.TarInfo(name)
    m.type, m.linkname = kind, target
    return m


@pytest.mark.parametrize("member", [
    tarfile.TarInfo("../../x"), tarfile.TarInfo("cifar-10-batches-py/../../../x"), tarfile.TarInfo("/tmp/x-abs"),
    _link("cifar-10-batches-py/evil", "../../../x"), _link("cifar-10-batches-py/evil", "/etc/passwd"),
    _link("cifar-10-batches-py/evil", "../../x", tarfile.LNKTYPE)], ids=lambda m: f"{m.type}-{m.name}")
def test_a_hostile_archive_is_refused_without_writing_anything(dirs, tmp_path, member):
    root, _ = dirs
    _hostile_tar(root / "cifar-10-python.tar.gz", member)
    with pytest.raises(EelabError, match=r"cifar-10-python\.tar\.gz holds a member .* outside") as e:
        load_dataset("cifar10", progress=False)
    assert "\n" not in str(e.value)
    assert list(data.data_dir().iterdir()) == []     # nothing unpacked, no temp folder left
    for p in (tmp_path / "x", data.data_dir().parent / "x", data.data_dir().parent.parent / "x"):
        assert not p.exists()


@pytest.mark.parametrize("name,file", [("cifar10", "cifar-10-python.tar.gz"), ("imagenette", "imagenette2-160.tgz"),
                                       ("cifar10-jpeg", "cifar10-jpeg.tar.gz")])
def test_a_truncated_archive_is_one_line_naming_the_file(dirs, tmp_path, name, file):
    from conftest import write_image_folder

    root, _ = dirs
    if name == "cifar10-jpeg":
        _tar(root / file, write_image_folder(tmp_path / "src", n_train=3, n_test=3, size=32), "cifar10-jpeg")
    else:
        place_published(name, root, tmp_path / "src")
    raw = (root / file).read_bytes()
    (root / file).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(EelabError, match=rf"{file.replace('.', '[.]')} is corrupt or truncated.*download it again") as e:
        load_dataset(name, progress=False)
    assert "\n" not in str(e.value) and list(data.data_dir().iterdir()) == []


@pytest.mark.parametrize("name,file", [("mnist", "train-images-idx3-ubyte.gz"), ("svhn", "train_32x32.mat")])
def test_truncated_compressed_files_are_one_line(dirs, tmp_path, name, file):
    root, _ = dirs
    place_published(name, root, tmp_path / "src")
    raw = (root / file).read_bytes()
    (root / file).write_bytes(raw[: len(raw) // 2])
    with pytest.raises(EelabError, match=rf"{file.replace('.', '[.]')} .*(truncated|download it again)") as e:
        load_dataset(name, progress=False)
    assert "\n" not in str(e.value)


def test_a_checksum_mismatch_is_reported_for_a_published_name(dirs, tmp_path, monkeypatch):
    root, _ = dirs
    monkeypatch.delenv("EELAB_NO_VERIFY")
    place_published("cifar10", root, tmp_path / "src")
    archive = root / "cifar-10-python.tar.gz"
    with pytest.raises(EelabError, match=r"cifar-10-python\.tar\.gz does not match its publisher's MD5 "
                                         r"\(c58f30108f718f92721af3b95e74349a.*truncated.*EELAB_NO_VERIFY=1") as e:
        load_dataset("cifar10", progress=False)
    assert "\n" not in str(e.value) and list(data.data_dir().iterdir()) == []   # refused before unpacking
    # the publisher's sums of these very files: verification passes, and checks the unpacked batches as well
    sums = {"cifar-10-python.tar.gz": archive}
    for k, v in sums.items():
        monkeypatch.setitem(published.MD5, ("cifar10", k), hashlib.md5(v.read_bytes()).hexdigest())
    with pytest.raises(EelabError, match=r"cifar-10-batches-py/data_batch_1 does not match"):
        load_dataset("cifar10", progress=False)
    for f in (data.data_dir() / "cifar-10-batches-py").iterdir():
        monkeypatch.setitem(published.MD5, ("cifar10", f.name), hashlib.md5(f.read_bytes()).hexdigest())
    assert load_dataset("cifar10", progress=False).train_images.shape == (10, 3, 32, 32)
    monkeypatch.setenv("EELAB_NO_VERIFY", "1")   # the escape hatch for re-packaged copies
    monkeypatch.setitem(published.MD5, ("cifar10", "data_batch_1"), "0" * 32)
    assert published.checksum_problem("cifar10", data.data_dir() / "cifar-10-batches-py" / "data_batch_1")


class _Payload:
    """What a tampered batch might hold: unpickling it would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


class _EvalPayload(_Payload):
    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


@pytest.mark.parametrize("payload", [_Payload, _EvalPayload])
@pytest.mark.parametrize("form", ["torchvision", "published"])
def test_a_tampered_cifar_batch_cannot_run_code(dirs, tmp_path, payload, form):
    root, _ = dirs
    marker = tmp_path / "marker"
    d = write_cifar10_batches(tmp_path / "src" / "cifar-10-batches-py")
    _pickle2({"data": _pixels(2, (3072,), 0), "labels": [0, 1], "x": payload(marker)}, d / "data_batch_3")
    if form == "published":
        _tar(root / "cifar-10-python.tar.gz", d, "cifar-10-batches-py")
    else:
        shutil.copytree(d, root / "cifar-10-batches-py")
    with pytest.raises(EelabError, match=r"data_batch_3 is not a CIFAR batch: it names (posix|__builtin__)\.(system|eval)"
                                         r".*refusing") as e:
        load_dataset("cifar10", progress=False)
    assert "\n" not in str(e.value) and not marker.exists()
    # the plain pickle.load torchvision uses would have run it: the payload is real
    pickle.loads((d / "data_batch_3").read_bytes(), encoding="latin1")
    assert marker.exists()


def test_real_cifar_pickles_from_python2_and_numpy1_are_admitted(tmp_path):
    # protocol-2 bytes from Python 3, numpy 1's module name, protocol-5 arrays: all plain data
    arr = _pixels(1, (3072,), 0)
    for proto in (2, 4, 5):
        (tmp_path / "b").write_bytes(pickle.dumps({b"data": arr, "labels": [3], "name": b"x"}, protocol=proto))
        x, y = published.read_cifar_batch(tmp_path / "b", "labels")
        assert x.reshape(1, -1).tolist() == arr.tolist() and y.tolist() == [3]
    numpy1 = pickle.dumps({"data": arr, "labels": [1]}, protocol=2).replace(b"numpy._core.multiarray",
                                                                              b"numpy.core.multiarray")
    (tmp_path / "b").write_bytes(numpy1)
    assert published.read_cifar_batch(tmp_path / "b", "labels")[1].tolist() == [1]


@pytest.mark.parametrize("name", NAMES + ("cifar10-jpeg",))
def test_nothing_found_names_every_folder_every_file_and_the_variable(dirs, name):
    root, shared = dirs
    with pytest.raises(EelabError) as e:
        load_dataset(name, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and f"dataset {name} not found" in msg and "$EELAB_DATASETS" in msg
    for d in (root, data.data_dir(), shared):
        assert str(d) in msg
    for form in published.FORMS[name]:
        for f in form.files:
            assert f in msg
    want = {"cifar10": ["cifar-10-python.tar.gz", "cifar-10-batches-py/data_batch_1, cifar-10-batches-py/data_batch_2"],
            "cifar100": ["cifar-100-python.tar.gz", "cifar-100-python/train, cifar-100-python/test, cifar-100-python/meta"],
            "svhn": ["train_32x32.mat, test_32x32.mat (as published)", "svhn/train_32x32.mat, svhn/test_32x32.mat"],
            "mnist": ["train-images-idx3-ubyte.gz", "MNIST/raw/train-images-idx3-ubyte, MNIST/raw/train-labels"],
            "fashion-mnist": ["(as published, in fashion-mnist/ or FashionMNIST/raw/)", "FashionMNIST/raw/t10k-labels-idx1-ubyte"],
            "imagenette": ["imagenette2-160.tgz", "imagenette2-320.tgz", "imagenette2.tgz", "imagenette2-160/"],
            "cifar10-jpeg": ["cifar10-jpeg.tar.gz", "cifar10-jpeg/train/, cifar10-jpeg/test/"]}[name]
    assert all(w in msg for w in want), msg


def test_online_fetches_the_published_files_then_reads_them_safely(dirs, tmp_path, monkeypatch):
    monkeypatch.delenv("EELAB_OFFLINE")
    fetched = []

    def fake_download(name, into):   # stands in for the publisher's server
        fetched.append((name, into))
        place_published(name, into.parent if name == "fashion-mnist" else into, tmp_path / "src")

    monkeypatch.setattr(published, "download", fake_download)
    ds = load_dataset("fashion-mnist", progress=False)
    assert fetched == [("fashion-mnist", data.data_dir() / "fashion-mnist")] and ds.train_images.shape[1] == 1
    assert ds.class_names[0] == "T-shirt/top"

    def failing(name, into):
        raise OSError("no route to host")

    monkeypatch.setattr(published, "download", failing)
    with pytest.raises(EelabError, match=r"dataset svhn not found .* download from http://ufldl.*OSError: no route"):
        load_dataset("svhn", progress=False)


def test_eelab_datasets_reports_found_missing_and_mismatches(dirs, tmp_path, monkeypatch, capsys):
    root, shared = dirs
    monkeypatch.delenv("EELAB_NO_VERIFY")
    place_published("cifar10", root, tmp_path / "src")
    place_published("mnist", data.data_dir(), tmp_path / "src")
    place_torchvision("svhn", shared, tmp_path / "src")
    monkeypatch.setitem(published.MD5, ("svhn", "train_32x32.mat"),
                        hashlib.md5((shared / "svhn" / "train_32x32.mat").read_bytes()).hexdigest())
    monkeypatch.setitem(published.MD5, ("svhn", "test_32x32.mat"),
                        hashlib.md5((shared / "svhn" / "test_32x32.mat").read_bytes()).hexdigest())
    assert main(["datasets", "--json"]) == 1     # the test files do not match CIFAR's or MNIST's MD5s
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(published.FORMS)
    c10 = rows["cifar10"]
    assert c10["found"] and c10["form"] == "published" and c10["folder"] == str(root)
    assert c10["bytes"] == (root / "cifar-10-python.tar.gz").stat().st_size and c10["checksum"] == "MISMATCH"
    assert "does not match its publisher's MD5" in c10["problems"][0] and c10["unpacked_into"] is None
    assert rows["mnist"]["form"] == "published" and rows["mnist"]["folder"] == str(data.data_dir())
    assert rows["svhn"]["form"] == "torchvision" and rows["svhn"]["checksum"] == "ok"
    assert not rows["cifar100"]["found"] and "cifar-100-python.tar.gz" in rows["cifar100"]["accepts"]
    assert rows["cifar100"]["looked_in"] == [str(root), str(data.data_dir()), str(shared)]

    assert main(["datasets", "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "cifar10 " in out and "published" in out and "not checked" in out
    assert "cifar100" in out and "missing" in out and "cifar-100-python.tar.gz" in out and "EELAB_DATASETS" in out
    assert main(["datasets", "--help"]) == 0
    assert "--no-verify" in capsys.readouterr().out
    assert sorted(p.name for p in data.data_dir().iterdir()) == sorted(f + ".gz" for f in published.FORMS["mnist"][0].files)


def test_describe_datasets_sees_an_unpacked_archive(dirs, tmp_path):
    root, _ = dirs
    place_published("cifar100", root, tmp_path / "src")
    load_dataset("cifar100", progress=False)
    row = next(r for r in describe_datasets(verify=False) if r["name"] == "cifar100")
    assert row["form"] == "published" and row["unpacked_into"] == str(data.data_dir() / "cifar-100-python")
