"""Data sources: loaders that turn an on-disk layout into labelled uint8 NHWC images.

Every loader takes its root folder as an argument: the project never hard-codes where a user keeps a
data set. ``DATA_SOURCES`` names each supported layout with a small descriptor (classes, image size,
normalisation statistics, the environment variable that may hold its root), so configs can refer to a
source by name. Clean loaders are called ``loader(root, split=split)`` (keyword: the generic image
folder's second positional argument is its size); pre-corrupted ones ``loader(root, corruption, severity)``.

Why one module of ~465 lines: six loaders of one shape (root in, labelled uint8 images out) and their
registry; each is short, and together they are the list of layouts a config may name.
"""
from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from cema_ray.data.cache import cache_file, cache_key, cached_arrays, files_fingerprint
from cema_ray.errors import ConfigError, DataError
from cema_ray.registry import Registry

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".webp")

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------------------------ the containers

@dataclass
class LabeledImages:
    """A labelled image set held in memory (or memory-mapped): uint8 (N, H, W, C), int64 labels."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(f"images must be uint8 (N, H, W, C); got {self.images.dtype} {self.images.shape}")
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"{self.images.shape[0]} images but labels of shape {self.labels.shape}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def take(self, indices: Sequence[int] | np.ndarray) -> "LabeledImages":
        """A copy of the selected samples (reads only those rows of a memory-mapped array)."""
        idx = np.asarray(indices, dtype=np.int64)
        return LabeledImages(np.array(self.images[idx]), self.labels[idx].copy(), list(self.classes))


class ImageFolderImages:
    """Lazy image set for big folder trees: keeps paths, decodes only what ``take`` asks for.

    ``size`` makes every image size x size: the shorter side is resized to ``size`` (bilinear), then
    the centre is cropped. With ``size=None`` images are returned as stored and must all match.
    """

    def __init__(self, files: Sequence[str | os.PathLike], labels: Sequence[int] | np.ndarray,
                 classes: list[str], size: int | None = None, mode: str = "RGB") -> None:
        self.files = [Path(f) for f in files]
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        if len(self.files) != len(self.labels):
            raise DataError(f"{len(self.files)} files but {len(self.labels)} labels")
        if size is not None and size < 1:
            raise ConfigError(f"image size must be a positive integer or None; got {size!r}")
        if mode not in ("RGB", "L"):
            raise ConfigError(f"image mode must be 'RGB' or 'L'; got {mode!r}")
        self.size = size
        self.mode = mode

    def __len__(self) -> int:
        return len(self.files)

    def take(self, indices: Sequence[int] | np.ndarray) -> LabeledImages:
        idx = np.asarray(indices, dtype=np.int64)
        arrays = [_decode(self.files[i], self.mode, self.size) for i in idx]
        shape = (0, self.size or 0, self.size or 0, 3 if self.mode == "RGB" else 1)
        images = _stack_same_size(arrays, [self.files[i] for i in idx]) if arrays else np.zeros(shape, np.uint8)
        return LabeledImages(images, self.labels[idx].copy(), list(self.classes))


# ----------------------------------------------------------------------------------- Fashion-MNIST

def load_fashion_mnist(root: str | os.PathLike, split: str = "test") -> LabeledImages:
    """Fashion-MNIST from IDX files: Debian's ``*-ubyte.gz`` or torchvision's ``FashionMNIST/raw``."""
    prefix = {"train": "train", "test": "t10k"}[_check_split(split)]
    root = _existing_dir(root, "Fashion-MNIST root")
    images = _read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"), ndim=3)
    labels = _read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"), ndim=1)
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split} in {root}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"Fashion-MNIST {split} in {root}: label {labels.max()} outside 0..9")
    return LabeledImages(images[..., None].copy(), labels.astype(np.int64), list(FASHION_MNIST_CLASSES))


def _find_idx(root: Path, stem: str) -> Path:
    candidates = [root / f"{stem}.gz", root / stem, root / "FashionMNIST" / "raw" / stem,
                  root / "FashionMNIST" / "raw" / f"{stem}.gz"]
    for c in candidates:
        if c.is_file():
            return c
    raise DataError(f"IDX file '{stem}' not found; looked for: {', '.join(str(c) for c in candidates)}")


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse an IDX file (big-endian header: 0, 0, dtype 0x08 = ubyte, ndim, then ndim int32 sizes)."""
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic {raw[:4].hex() or 'empty'})")
    if raw[2] != 0x08:
        raise DataError(f"{path}: IDX element type 0x{raw[2]:02x}, only 0x08 (unsigned byte) is supported")
    if raw[3] != ndim:
        raise DataError(f"{path}: IDX file has {raw[3]} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path}: truncated or padded IDX file: header says {dims} = {expected} bytes of "
                        f"data, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header).reshape(dims)


def _read_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: unreadable or truncated file ({exc})") from exc


# --------------------------------------------------------------------------- CIFAR-10, image folder

def load_cifar10_folder(root: str | os.PathLike, split: str = "test",
                        cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> LabeledImages:
    """``<root>/{train,test}/<class>/*.jpg`` decoded to uint8, cached as .npz (class names = sorted folders)."""
    split_dir = _existing_dir(Path(root) / _check_split(split), "CIFAR-10 image folder")
    files, labels, classes = _scan_class_folders(split_dir)
    fingerprint = files_fingerprint(files)
    key = cache_key(str(split_dir.resolve()), split, fingerprint, classes)
    path = cache_file(cache_dir, f"cifar10-folder-{split}", key)

    def build() -> dict[str, np.ndarray]:
        images = _decode_all(files, "RGB", f"decoding {split_dir}")
        return {"images": images, "labels": labels, "classes": np.array(classes)}

    arrays = cached_arrays(path, build, use_cache)
    return LabeledImages(arrays["images"], arrays["labels"], [str(c) for c in arrays["classes"]])


def _scan_class_folders(folder: Path) -> tuple[list[Path], np.ndarray, list[str]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class sub-folders (expected <class>/<image> files)")
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        found = sorted(p for p in (folder / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        files.extend(found)
        labels.extend([label] * len(found))
    if not files:
        raise DataError(f"{folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its class folders")
    return files, np.asarray(labels, dtype=np.int64), classes


def _decode(path: Path, mode: str, size: int | None = None) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            if size is not None:
                img = _resize_center_crop(img, size)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc})") from exc
    return arr[..., None] if arr.ndim == 2 else arr


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    if min(w, h) != size:
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = img.size
    left, top = int(round((w - size) / 2.0)), int(round((h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def _decode_all(files: Sequence[Path], mode: str, desc: str) -> np.ndarray:
    from tqdm import tqdm

    arrays = [_decode(f, mode) for f in tqdm(files, desc=desc, unit="img", mininterval=2.0, disable=None)]
    return _stack_same_size(arrays, files)


def _stack_same_size(arrays: list[np.ndarray], files: Sequence[Path]) -> np.ndarray:
    first = arrays[0].shape
    for arr, f in zip(arrays, files):
        if arr.shape != first:
            raise DataError(f"{f}: image of shape {arr.shape}, but {files[0]} has {first}; "
                            f"pass a fixed size to resize them")
    return np.stack(arrays)


# ------------------------------------------------------------------------- CIFAR-10, python batches

_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


def _numpy_reconstruct() -> Callable[..., Any]:
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _RestrictedUnpickler(pickle.Unpickler):
    """Loads CIFAR batch pickles, which may only rebuild numpy arrays: anything else is refused."""

    def __init__(self, fh: Any, path: Path) -> None:
        super().__init__(fh, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            allowed = ", ".join(f"{m}.{n}" for m, n in sorted(_PICKLE_ALLOWED))
            raise DataError(f"{self._path}: pickle references {module}.{name}, which is not allowed "
                            f"(allowed: {allowed})")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        return {"ndarray": np.ndarray, "dtype": np.dtype}[name]


def _load_pickle(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"CIFAR-10 batch file not found: {path}")
    try:
        with open(path, "rb") as fh:
            return _RestrictedUnpickler(fh, path).load()
    except DataError:
        raise
    except Exception as exc:  # a malformed pickle can raise almost anything
        raise DataError(f"{path}: unreadable CIFAR-10 batch file ({type(exc).__name__}: {exc})") from exc


def load_cifar10_batches(root: str | os.PathLike, split: str = "test") -> LabeledImages:
    """torchvision's ``cifar-10-batches-py`` (root may be that folder or its parent)."""
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}[_check_split(split)]
    root = _existing_dir(root, "CIFAR-10 batches root")
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    images, labels = [], []
    for name in names:
        batch = _load_pickle(folder / name)
        try:
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            lab = np.asarray(batch[b"labels"], dtype=np.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{folder / name}: not a CIFAR-10 batch (needs b'data' and b'labels')") from exc
        if data.ndim != 2 or data.shape[1] != 3072 or len(lab) != len(data):
            raise DataError(f"{folder / name}: data {data.shape} / labels {lab.shape}, expected (N, 3072) / (N,)")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(lab)
    classes = list(CIFAR10_CLASSES)
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        meta = _load_pickle(meta_path)
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(b"label_names", classes)]
    return LabeledImages(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels), classes)


# ------------------------------------------------------------------------------ pre-corrupted sets

def load_cifar10_c(root: str | os.PathLike, corruption: str, severity: int) -> LabeledImages:
    """RobustBench CIFAR-10-C: ``<corruption>.npy`` (5N, 32, 32, 3), severity s = rows (s-1)N..sN (mmap)."""
    _check_severity(severity)
    root = _existing_dir(root, "CIFAR-10-C root")
    path = root / f"{corruption}.npy"
    if not path.is_file():
        known = sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels")
        raise DataError(f"CIFAR-10-C file not found: {path}; available corruptions: {', '.join(known) or 'none'}")
    images = _load_npy(path, mmap=True)
    labels = _load_npy(root / "labels.npy", mmap=False)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) % 5:
        raise DataError(f"{path}: expected uint8 (5N, H, W, 3), got {images.dtype} {images.shape}")
    n = len(images) // 5
    if len(labels) not in (n, 5 * n):
        raise DataError(f"{root / 'labels.npy'}: {len(labels)} labels, expected {n} or {5 * n}")
    lab = labels[(severity - 1) * n:severity * n] if len(labels) == 5 * n else labels
    return LabeledImages(images[(severity - 1) * n:severity * n], lab.astype(np.int64), list(CIFAR10_CLASSES))


def check_cifar10_c_files(root: str | os.PathLike, corruptions: Sequence[str]) -> None:
    """Every ``<corruption>.npy`` a stream needs and ``labels.npy`` exist with the layout the loader expects.

    Reads only the .npy headers (shape and dtype), so a config check costs milliseconds, not the 150 MB a
    corruption file holds; raises a DataError naming the first file at fault.
    """
    root = Path(root).expanduser()
    present = sorted(p.stem for p in root.glob("*.npy") if p.stem != "labels")
    rows = None
    for name in dict.fromkeys(corruptions):
        path = root / f"{name}.npy"
        if not path.is_file():
            raise DataError(f"CIFAR-10-C file not found: {path} (the stream needs '{name}'); "
                            f"present: {', '.join(present) or 'no .npy files'}")
        shape, dtype = _npy_header(path)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] % 5:
            raise DataError(f"{path}: expected uint8 (5N, H, W, 3) (5 severities of N images), "
                            f"got {dtype} {shape}")
        if rows is not None and shape[0] != rows:
            raise DataError(f"{path}: {shape[0]} rows, the other corruption files have {rows}")
        rows = shape[0]
    labels = root / "labels.npy"
    if not labels.is_file():
        raise DataError(f"CIFAR-10-C file not found: {labels} (the labels of every corruption file)")
    shape, dtype = _npy_header(labels)
    if len(shape) != 1 or dtype.kind not in "iu" or (rows is not None and shape[0] not in (rows, rows // 5)):
        raise DataError(f"{labels}: expected integer labels (N,) or (5N,) matching the corruption files "
                        f"({rows} rows), got {dtype} {shape}")


def _npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(fh)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable .npy file ({exc})") from exc
    return tuple(int(d) for d in shape), np.dtype(dtype)


def check_imagenet_c_folders(root: str | os.PathLike, corruptions: Sequence[str]) -> None:
    """Every ``<corruption>`` folder a stream needs exists (its severities are read when the stream starts)."""
    root = Path(root).expanduser()
    for name in dict.fromkeys(corruptions):
        if not (root / name).is_dir():
            present = sorted(d.name for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
            raise DataError(f"ImageNet-C folder not found: {root / name} (the stream needs '{name}'); "
                            f"present: {', '.join(present) or 'none'}")


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable .npy file ({exc})") from exc


def load_imagenet_c(root: str | os.PathLike, corruption: str, severity: int, size: int = 224) -> ImageFolderImages:
    """ImageNet-C: ``<root>/<corruption>/<severity>/<wnid>/*.JPEG``, lazy; classes = sorted wnids."""
    _check_severity(severity)
    root = _existing_dir(root, "ImageNet-C root")
    folder = root / corruption / str(severity)
    if not folder.is_dir():
        known = sorted(d.name for d in root.iterdir() if d.is_dir())
        raise DataError(f"ImageNet-C folder not found: {folder}; corruptions present: {', '.join(known) or 'none'}")
    files, labels, classes = _scan_class_folders(folder)
    return ImageFolderImages(files, labels, classes, size=size)


def load_image_folder(root: str | os.PathLike, size: int | None = None, split: str | None = None,
                      mode: str = "RGB") -> ImageFolderImages:
    """Generic ``<root>[/<split>]/<class>/*.<ext>`` image folder, lazy."""
    folder = _existing_dir(Path(root) / split if split else root, "image folder")
    files, labels, classes = _scan_class_folders(folder)
    return ImageFolderImages(files, labels, classes, size=size, mode=mode)


# ------------------------------------------------------------------------------------ small checks

def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}'; allowed: {', '.join(SPLITS)}")
    return split


def _check_severity(severity: int) -> None:
    if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or not 1 <= severity <= 5:
        raise ConfigError(f"severity {severity!r} is not allowed; allowed: 1, 2, 3, 4, 5")


def _existing_dir(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataError(f"{what} not found: {p} is not a folder")
    return p


# ---------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class DataSourceInfo:
    """What a config needs to know about a source before loading it."""

    name: str
    kind: str  # "clean" (corrupted on the fly) or "corrupted" (ships its corrupted domains)
    loader: Callable[..., Any]
    num_classes: int | None
    image_size: int | None
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    description: str
    env_var: str
    default_root: str | None = None
    # pre-corrupted sources: (root, corruption names) -> None, raising DataError; run by the config check
    check_files: Callable[[Path, Sequence[str]], None] | None = None

    def resolve_root(self, root: str | os.PathLike | None = None) -> Path:
        """Explicit root, else the environment variable, else the default root."""
        chosen = root if root is not None else os.environ.get(self.env_var) or self.default_root
        if chosen is None:
            raise ConfigError(f"data source '{self.name}' needs a root folder: set data.root in the config "
                              f"or the environment variable {self.env_var}")
        return Path(chosen).expanduser()


DATA_SOURCES: Registry[DataSourceInfo] = Registry("data source")

_FMNIST_STATS = ((0.2860,), (0.3530,))
_CIFAR_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

for _info in (
    DataSourceInfo("fashion-mnist", "clean", load_fashion_mnist, 10, 28, 1, *_FMNIST_STATS,
                   "Fashion-MNIST IDX files (Debian dataset-fashion-mnist or torchvision raw layout)",
                   "CEMA_FASHION_MNIST_ROOT", DEFAULT_FASHION_MNIST_ROOT),
    DataSourceInfo("cifar10-folder", "clean", load_cifar10_folder, 10, 32, 3, *_CIFAR_STATS,
                   "CIFAR-10 as {train,test}/<class>/*.jpg, decoded once and cached as .npz",
                   "CEMA_CIFAR10_ROOT"),
    DataSourceInfo("cifar10-batches", "clean", load_cifar10_batches, 10, 32, 3, *_CIFAR_STATS,
                   "CIFAR-10 python batches (torchvision's cifar-10-batches-py)", "CEMA_CIFAR10_BATCHES_ROOT"),
    DataSourceInfo("image-folder", "clean", load_image_folder, None, None, 3, *_IMAGENET_STATS,
                   "generic <root>/<split>/<class>/*.<ext> image folder, decoded lazily",
                   "CEMA_IMAGE_FOLDER_ROOT"),
    DataSourceInfo("cifar10-c", "corrupted", load_cifar10_c, 10, 32, 3, *_CIFAR_STATS,
                   "CIFAR-10-C (RobustBench <corruption>.npy + labels.npy)", "CEMA_CIFAR10C_ROOT",
                   check_files=check_cifar10_c_files),
    DataSourceInfo("imagenet-c", "corrupted", load_imagenet_c, 1000, 224, 3, *_IMAGENET_STATS,
                   "ImageNet-C <corruption>/<severity>/<wnid>/*.JPEG, decoded lazily", "CEMA_IMAGENETC_ROOT",
                   check_files=check_imagenet_c_folders),
):
    DATA_SOURCES.register(_info.name, _info)
