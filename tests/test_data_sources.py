"""Loaders for every on-disk layout, built as tiny trees in tmp_path; plus the real Fashion-MNIST if present."""
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cema_ray.data import sources
from cema_ray.data.sources import (
    DATA_SOURCES, DEFAULT_FASHION_MNIST_ROOT, ImageFolderImages, LabeledImages, load_cifar10_batches,
    load_cifar10_c, load_cifar10_folder, load_fashion_mnist, load_image_folder, load_imagenet_c,
)
from cema_ray.errors import ConfigError, DataError

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------- helpers

def idx_bytes(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def fmnist_arrays(n: int = 6) -> tuple[np.ndarray, np.ndarray]:
    images = (np.arange(n * 28 * 28) % 251).astype(np.uint8).reshape(n, 28, 28)
    return images, (np.arange(n) % 10).astype(np.uint8)


def write_image(path: Path, value: tuple[int, ...], size: tuple[int, int] = (32, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, value).save(path)


# ----------------------------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_debian_gz_layout(tmp_path):
    images, labels = fmnist_arrays()
    for prefix in ("train", "t10k"):
        (tmp_path / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
        (tmp_path / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    data = load_fashion_mnist(tmp_path, "test")
    assert data.images.shape == (6, 28, 28, 1) and data.images.dtype == np.uint8
    np.testing.assert_array_equal(data.images[..., 0], images)
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert data.classes[0] == "T-shirt/top" and len(data.classes) == 10
    assert len(load_fashion_mnist(tmp_path, "train")) == 6


def test_fashion_mnist_torchvision_raw_layout(tmp_path):
    images, labels = fmnist_arrays(4)
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (raw / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    data = load_fashion_mnist(tmp_path, "train")
    np.testing.assert_array_equal(data.images[..., 0], images)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path, "test")


def test_truncated_idx_names_the_file(tmp_path):
    images, labels = fmnist_arrays()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images)[:-100])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DataError, match="truncated") as err:
        load_fashion_mnist(tmp_path, "test")
    assert str(tmp_path / "t10k-images-idx3-ubyte") in str(err.value)


def test_truncated_gzip_names_the_file(tmp_path):
    images, labels = fmnist_arrays()
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(images))[:-30])
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DataError) as err:
        load_fashion_mnist(tmp_path, "test")
    assert str(path) in str(err.value)


def test_idx_bad_magic_and_count_mismatch(tmp_path):
    images, labels = fmnist_arrays()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + idx_bytes(images)[4:])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    with pytest.raises(DataError, match="0x0d"):
        load_fashion_mnist(tmp_path, "test")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(images[:5]))
    with pytest.raises(DataError, match="5 images but 6 labels"):
        load_fashion_mnist(tmp_path, "test")


def test_missing_folder_and_bad_split(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError) as err:
        load_fashion_mnist(missing, "test")
    assert str(missing) in str(err.value)
    with pytest.raises(ConfigError, match="train, test"):
        load_fashion_mnist(tmp_path, "val")


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_ROOT).is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    data = load_fashion_mnist(DEFAULT_FASHION_MNIST_ROOT, "test")
    assert data.images.shape == (10000, 28, 28, 1)
    assert sorted(np.unique(data.labels).tolist()) == list(range(10))
    assert np.bincount(data.labels).tolist() == [1000] * 10


# ----------------------------------------------------------------------------- CIFAR-10 folder

def make_cifar_folder(root: Path) -> None:
    for split in ("train", "test"):
        for k, cls in enumerate(["cat", "airplane", "dog"]):  # not sorted on purpose
            for i in range(2):
                write_image(root / split / cls / f"{i:04d}.png", (40 * k, 10 * i, 200))
    write_image(root / "test" / "dog" / "0002.jpg", (128, 128, 128))


def test_cifar10_folder_decodes_sorted_classes_and_caches(tmp_path, monkeypatch):
    root, cache = tmp_path / "cifar", tmp_path / "cache"
    make_cifar_folder(root)
    data = load_cifar10_folder(root, "test", cache_dir=cache)
    assert data.classes == ["airplane", "cat", "dog"]
    assert data.images.shape == (7, 32, 32, 3) and data.labels.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert data.images[2, 5, 5].tolist() == [0, 0, 200]  # cat = second sorted class, pixel from the png
    assert abs(int(data.images[6, 5, 5, 0]) - 128) <= 2  # the jpg, lossy
    assert len(list(cache.glob("cifar10-folder-test-*.npz"))) == 1

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(sources, "_decode", no_decode)
    again = load_cifar10_folder(root, "test", cache_dir=cache)
    np.testing.assert_array_equal(again.images, data.images)
    assert again.classes == data.classes and again.labels.tolist() == data.labels.tolist()


def test_cifar10_folder_cache_is_invalidated_by_a_new_file(tmp_path):
    root, cache = tmp_path / "cifar", tmp_path / "cache"
    make_cifar_folder(root)
    assert len(load_cifar10_folder(root, "test", cache_dir=cache)) == 7
    write_image(root / "test" / "cat" / "0009.png", (1, 2, 3))
    assert len(load_cifar10_folder(root, "test", cache_dir=cache)) == 8
    assert len(list(cache.glob("*.npz"))) == 2


def test_cifar10_folder_errors(tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "x" / "test")):
        load_cifar10_folder(tmp_path / "x", "test", cache_dir=tmp_path / "c")
    (tmp_path / "empty" / "test" / "cat").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        load_cifar10_folder(tmp_path / "empty", "test", cache_dir=tmp_path / "c")
    write_image(tmp_path / "mixed" / "test" / "a" / "0.png", (0, 0, 0), (32, 32))
    write_image(tmp_path / "mixed" / "test" / "b" / "0.png", (0, 0, 0), (16, 16))
    with pytest.raises(DataError, match="shape"):
        load_cifar10_folder(tmp_path / "mixed", "test", use_cache=False)


# --------------------------------------------------------------------------- CIFAR-10 batches

def make_cifar_batches(folder: Path) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        arr = g.integers(0, 256, (3, 3072), dtype=np.uint8)
        data[name] = arr
        batch = {b"batch_label": name.encode(), b"labels": [1, 2, 9], b"data": arr,
                 b"filenames": [b"a.png", b"b.png", b"c.png"]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    meta = {b"label_names": [c.encode() for c in sources.CIFAR10_CLASSES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))
    return data


def test_cifar10_batches_layout(tmp_path):
    raw = make_cifar_batches(tmp_path / "cifar-10-batches-py")
    test = load_cifar10_batches(tmp_path, "test")  # parent folder accepted
    assert test.images.shape == (3, 32, 32, 3) and test.labels.tolist() == [1, 2, 9]
    # row layout: 1024 red, 1024 green, 1024 blue values, each row-major 32 x 32
    assert test.images[1, 4, 7, 2] == raw["test_batch"][1, 2 * 1024 + 4 * 32 + 7]
    assert test.classes[9] == "truck"
    train = load_cifar10_batches(tmp_path / "cifar-10-batches-py", "train")
    assert len(train) == 15
    np.testing.assert_array_equal(train.images[12:], load_cifar10_batches(tmp_path, "train").images[12:])


class Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_restricted_unpickler_refuses_os_system(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(marker)}, protocol=4))
    with pytest.raises(DataError, match="system.*not allowed") as err:
        load_cifar10_batches(tmp_path, "test")
    assert str(folder / "test_batch") in str(err.value)
    assert not marker.exists()


def test_cifar10_batches_missing_file(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    with pytest.raises(DataError, match="test_batch"):
        load_cifar10_batches(tmp_path, "test")


# ---------------------------------------------------------------------------------- CIFAR-10-C

def test_cifar10_c_severity_slices(tmp_path):
    n = 4
    images = np.repeat(np.arange(1, 6, dtype=np.uint8), n)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
    np.save(tmp_path / "fog.npy", images)
    np.save(tmp_path / "labels.npy", np.tile(np.array([3, 1, 4, 1], dtype=np.uint8), 5))
    data = load_cifar10_c(tmp_path, "fog", 3)
    assert len(data) == n and set(np.unique(data.images)) == {3}
    assert data.labels.dtype == np.int64 and data.labels.tolist() == [3, 1, 4, 1]
    assert data.take([2, 0]).labels.tolist() == [4, 3]
    with pytest.raises(DataError, match="available corruptions: fog"):
        load_cifar10_c(tmp_path, "snow", 1)
    with pytest.raises(ConfigError, match="severity 6"):
        load_cifar10_c(tmp_path, "fog", 6)


def test_cifar10_c_rejects_wrong_shape(tmp_path):
    np.save(tmp_path / "fog.npy", np.zeros((7, 32, 32, 3), np.uint8))
    np.save(tmp_path / "labels.npy", np.zeros(7, np.uint8))
    with pytest.raises(DataError, match="5N"):
        load_cifar10_c(tmp_path, "fog", 1)


# ---------------------------------------------------------------------------- folders, lazily

def test_imagenet_c_folders_lazy_resize_and_crop(tmp_path, monkeypatch):
    for k, wnid in enumerate(["n02", "n01"]):
        for i in range(3):
            write_image(tmp_path / "fog" / "3" / wnid / f"ILSVRC2012_val_{k}{i}.JPEG", (60 * k, 0, 0), (40, 30))
    data = load_imagenet_c(tmp_path, "fog", 3, size=16)
    assert isinstance(data, ImageFolderImages) and len(data) == 6
    assert data.classes == ["n01", "n02"] and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    calls = []
    real = sources._decode
    monkeypatch.setattr(sources, "_decode", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    part = data.take([4, 0])
    assert len(calls) == 2  # only the requested files are decoded
    assert part.images.shape == (2, 16, 16, 3) and part.labels.tolist() == [1, 0]
    assert abs(int(part.images[1, 8, 8, 0]) - 60) <= 3  # n01 holds the (60, 0, 0) images
    with pytest.raises(DataError, match="corruptions present: fog"):
        load_imagenet_c(tmp_path, "snow", 3)


def test_generic_image_folder_with_split_and_native_size(tmp_path):
    for cls in ("b", "a"):
        write_image(tmp_path / "val" / cls / "x.png", (10, 20, 30), (12, 12))
    data = load_image_folder(tmp_path, split="val")
    assert data.classes == ["a", "b"]
    assert data.take([1]).images.shape == (1, 12, 12, 3)
    assert data.take([]).images.shape == (0, 0, 0, 3)


def test_labeled_images_validates():
    with pytest.raises(DataError, match="uint8"):
        LabeledImages(np.zeros((2, 4, 4, 1), np.float32), np.zeros(2), ["a"])
    with pytest.raises(DataError, match="labels"):
        LabeledImages(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3), ["a"])


# -------------------------------------------------------------------------------------- registry

def test_registry_names_and_descriptors():
    assert DATA_SOURCES.names() == sorted(["fashion-mnist", "cifar10-folder", "cifar10-batches", "image-folder",
                                           "cifar10-c", "imagenet-c"])
    fm = DATA_SOURCES.get("fashion-mnist")
    assert (fm.kind, fm.num_classes, fm.image_size, fm.channels) == ("clean", 10, 28, 1)
    assert len(fm.mean) == len(fm.std) == 1
    assert DATA_SOURCES.get("cifar10-c").kind == "corrupted" and DATA_SOURCES.get("cifar10-c").loader is load_cifar10_c
    with pytest.raises(ConfigError, match="unknown data source 'mnist'"):
        DATA_SOURCES.get("mnist")


def test_resolve_root_precedence(monkeypatch, tmp_path):
    info = DATA_SOURCES.get("cifar10-folder")
    monkeypatch.delenv("CEMA_CIFAR10_ROOT", raising=False)
    with pytest.raises(ConfigError, match="CEMA_CIFAR10_ROOT"):
        info.resolve_root()
    monkeypatch.setenv("CEMA_CIFAR10_ROOT", str(tmp_path))
    assert info.resolve_root() == tmp_path
    assert info.resolve_root("/explicit") == Path("/explicit")
    monkeypatch.delenv("CEMA_FASHION_MNIST_ROOT", raising=False)
    assert DATA_SOURCES.get("fashion-mnist").resolve_root() == Path(DEFAULT_FASHION_MNIST_ROOT)
