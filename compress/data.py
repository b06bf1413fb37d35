"""Datasets for compress, held in memory as uint8 NHWC RGB; augmentation happens per batch on tensors.

Two kinds of dataset:

* ``cifar10``, looked for under the data dir (``--data-dir``, else ``$EDGESLIM_DATA``, else
  ``~/.cache/edgeslim``) in this order: ``cifar10.npz`` (x_train, y_train, x_test, y_test, classes),
  the extracted official ``cifar-10-batches-py/`` folder, the official ``cifar-10-python.tar.gz``
  (md5-checked, extracted safely), and last a download of that archive into the data dir.
* an image folder of the user's own data: ``ROOT/train/<class>/*.png|jpg`` and ``ROOT/test/<class>/*``
  (``val/`` is taken for ``test/``). Without a test split (``ROOT/train/`` alone, or class folders
  directly under ROOT) a seeded, per-class holdout of ``test_fraction`` of the images is the test set.

``batches`` turns the arrays into normalised float batches: shuffled with (seed, epoch), sharded
per rank, pad-4 random crop + horizontal flip done as one gather on uint8 tensors.
"""
from __future__ import annotations

import hashlib
import http.client
import math
import os
import pickle
import posixpath
import shutil
import tarfile
import tempfile
import urllib.request
import warnings
import zipfile
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from compress.errors import UserError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"  # published next to the archive
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_NPZ = "cifar10.npz"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test", "classes")
DATASETS = ("cifar10", "folder")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # uint8 (N, H, W, 3) RGB
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    mean: tuple[float, float, float]  # of x/255, per channel
    std: tuple[float, float, float]
    source: str = ""  # the file or folder the images came from

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one network input."""
        return (3, *self.x_train.shape[1:3])


# ---------------------------------------------------------------------------------------------------
# Entry points


def default_data_dir() -> Path:
    return Path(os.environ.get("EDGESLIM_DATA") or "~/.cache/edgeslim").expanduser()


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = True, *,
                 image_size: int | tuple[int, int] | None = None, test_fraction: float = 0.2,
                 seed: int = 0) -> Dataset:
    """``cifar10``; ``folder`` with ``data_dir`` = the image folder; or ``name`` = the path of an image
    folder or of an npz in the cifar10.npz layout (any image size and number of classes).

    ``image_size``, ``test_fraction`` and ``seed`` apply to image folders (see load_image_folder).
    """
    if name == "cifar10":
        if image_size not in (None, 32, (32, 32)):
            raise UserError(f"--image-size {image_size} is for image folders; cifar10 images are 32x32")
        return load_cifar10(data_dir if data_dir is not None else default_data_dir(), download=download)
    if name == "folder":
        if data_dir is None:
            raise UserError("dataset 'folder' needs --data-dir ROOT with ROOT/train/<class>/*.png|jpg")
        return load_image_folder(data_dir, image_size=image_size, test_fraction=test_fraction, seed=seed)
    path = Path(name).expanduser()
    if path.is_dir():
        return load_image_folder(path, image_size=image_size, test_fraction=test_fraction, seed=seed)
    if path.suffix == ".npz" and path.is_file():
        return load_npz_dataset(path)
    raise UserError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}, or the path of an image "
                    "folder or .npz file")


def subset(ds: Dataset, train: int | None = None, test: int | None = None) -> Dataset:
    """The first ``train`` training and ``test`` test images (None keeps all); mean/std stay the full set's."""
    def first(x, y, n, split):
        if n is None:
            return x, y
        if not 0 < n <= len(x):
            raise UserError(f"--{split}-subset {n}: must be between 1 and the {len(x)} {split} images")
        return x[:n], y[:n]
    x_train, y_train = first(ds.x_train, ds.y_train, train, "train")
    x_test, y_test = first(ds.x_test, ds.y_test, test, "test")
    return replace(ds, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


# ---------------------------------------------------------------------------------------------------
# CIFAR-10


def load_cifar10(data_dir: str | os.PathLike, download: bool = True, *, url: str | None = None,
                 md5: str | None = None) -> Dataset:
    """Find CIFAR-10 in ``data_dir`` (npz, batches folder, tar.gz), else download the archive there.

    ``url`` and ``md5`` default to CIFAR10_URL / CIFAR10_MD5 (read at call time, so tests can swap them).
    """
    url = url or CIFAR10_URL
    md5 = md5 or CIFAR10_MD5
    data_dir = Path(data_dir).expanduser()
    if data_dir.exists() and not data_dir.is_dir():
        raise UserError(f"data dir {data_dir} is a file, not a folder")
    npz, folder, archive = data_dir / CIFAR10_NPZ, data_dir / CIFAR10_FOLDER, data_dir / CIFAR10_ARCHIVE

    if npz.is_file():
        arrays, source = read_npz(npz), npz
    elif folder.is_dir():
        arrays, source = read_cifar_batches(folder), folder
    elif archive.is_file():
        arrays, source = read_cifar_batches(extract_cifar_archive(archive, md5)), archive
    else:
        where = (f"put {CIFAR10_NPZ} (x_train, y_train, x_test, y_test, classes), the extracted "
                 f"{CIFAR10_FOLDER}/ folder, or {CIFAR10_ARCHIVE} from {url} in {data_dir} "
                 f"(or point --data-dir / EDGESLIM_DATA at them)")
        if not download:
            raise UserError(f"CIFAR-10 not found and downloads are off: {where}")
        try:
            download_file(url, archive, md5)
        except (OSError, http.client.HTTPException) as e:  # URLError, socket errors, timeouts
            raise UserError(f"CIFAR-10 not found and downloading {url} failed ({_one_line(e)}): {where}") from None
        arrays, source = read_cifar_batches(extract_cifar_archive(archive, md5)), archive

    _check_arrays(arrays, source, image_hw=(32, 32), num_classes=10)
    x_train, y_train, x_test, y_test, classes = arrays
    return Dataset("cifar10", np.ascontiguousarray(x_train), y_train.astype(np.int64),
                   np.ascontiguousarray(x_test), y_test.astype(np.int64), classes,
                   mean=CIFAR10_MEAN, std=CIFAR10_STD, source=str(source))


def load_npz_dataset(path: str | os.PathLike) -> Dataset:
    """A user's arrays in the cifar10.npz layout; mean/std are measured on x_train."""
    path = Path(path).expanduser()
    arrays = read_npz(path)
    x_train = arrays[0]
    if x_train.ndim != 4:
        raise UserError(f"{path}: x_train is {x_train.dtype} {x_train.shape}, expected uint8 (N, H, W, 3) RGB")
    _check_arrays(arrays, path, image_hw=x_train.shape[1:3], num_classes=len(arrays[4]))
    x_train, y_train, x_test, y_test, classes = arrays
    return Dataset(str(path), x_train, y_train.astype(np.int64), x_test, y_test.astype(np.int64), classes,
                   *channel_stats(x_train), source=str(path))


def read_npz(path: Path) -> tuple:
    """(x_train, y_train, x_test, y_test, classes) from an npz, loaded without pickle."""
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in NPZ_KEYS if k not in z.files]
            if missing:
                raise UserError(f"{path}: missing {', '.join(missing)} (expected arrays {', '.join(NPZ_KEYS)})")
            x_train, y_train, x_test, y_test, classes = (z[k] for k in NPZ_KEYS)
    except UserError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise UserError(f"{path}: cannot read this npz: corrupt, truncated or holding pickled objects "
                        f"({_one_line(e)})") from None
    if classes.dtype.kind not in "US" or classes.ndim != 1:
        raise UserError(f"{path}: classes must be a 1-D array of strings, got {classes.dtype} {classes.shape}")
    names = [c.decode() if isinstance(c, bytes) else str(c) for c in classes.tolist()]
    return x_train, y_train, x_test, y_test, names


def read_cifar_batches(folder: Path) -> tuple:
    """(x_train, y_train, x_test, y_test, classes) from the official python batches (pickles)."""
    needed = (*CIFAR10_TRAIN_BATCHES, "test_batch", "batches.meta")
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise UserError(f"{folder}: missing {', '.join(missing)} (an extracted {CIFAR10_ARCHIVE} has all of "
                        f"{', '.join(needed)})")
    train = [_read_cifar_batch(folder / f) for f in CIFAR10_TRAIN_BATCHES]
    x_test, y_test = _read_cifar_batch(folder / "test_batch")
    meta = _str_keys(unpickle_cifar(folder / "batches.meta"), folder / "batches.meta")
    names = meta.get("label_names")
    if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
        raise UserError(f"{folder / 'batches.meta'}: no label_names list")
    classes = [n.decode() if isinstance(n, bytes) else n for n in names]
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            x_test, y_test, classes)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _str_keys(unpickle_cifar(path), path)
    data, labels = batch.get("data"), batch.get("labels")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: 'data' is not a uint8 (N, 3072) array")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise UserError(f"{path}: 'labels' is not a list of {len(data)} labels")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{path}: 'labels' are not integers") from None
    # Each row is the red plane, then green, then blue, each 32x32 row-major: CHW -> HWC.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


# Everything the official batches reference: they were written by Python 2 cPickle (protocol 2) and
# hold dicts, lists, strings, ints and numpy uint8 arrays. numpy 2 renamed numpy.core to numpy._core.
_CIFAR_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _CifarUnpickler(pickle.Unpickler):
    """Loads the official CIFAR-10 batches and nothing else: any other global is refused."""

    def __init__(self, file, path: Path):
        super().__init__(file, encoding="latin1")  # Python 2 str -> str, as numpy expects for array data
        self.path = path

    def find_class(self, module, name):
        try:
            return _CIFAR_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise UserError(f"refusing to unpickle {module}.{name} in {self.path}: official CIFAR-10 "
                            "batches hold only numpy arrays, lists and strings") from None


def unpickle_cifar(path: Path):
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as e:  # a damaged pickle can raise almost anything; the file is the story
        raise UserError(f"{path}: corrupt or truncated CIFAR-10 batch ({type(e).__name__}: {_one_line(e)})") from None


def _str_keys(obj, path: Path) -> dict:
    """The batches' keys are Python 2 str; accept them as str or bytes."""
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a CIFAR-10 batch (a {type(obj).__name__}, not a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def extract_cifar_archive(archive: Path, md5: str | None = None) -> Path:
    """Check the archive's md5, extract it into a temp folder next to it, rename its batches folder in."""
    md5 = md5 or CIFAR10_MD5
    got = file_md5(archive)
    if got != md5:
        raise UserError(f"{archive}: md5 is {got}, expected {md5} (the official {CIFAR10_ARCHIVE}); "
                        "the file is damaged or not CIFAR-10: delete it and retry")
    dest = archive.parent / CIFAR10_FOLDER
    try:
        tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=archive.parent))
    except OSError as e:
        raise UserError(f"{archive}: cannot extract next to it ({_one_line(e)})") from None
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                _check_tar_member(m, archive)
            if hasattr(tarfile, "data_filter"):  # Python >= 3.9.17 / 3.11.4: a second line of defence
                tar.extractall(tmp, members=members, filter="data")
            else:
                tar.extractall(tmp, members=members)
        extracted = tmp / CIFAR10_FOLDER
        if not extracted.is_dir():
            raise UserError(f"{archive}: no {CIFAR10_FOLDER}/ folder inside")
        try:
            os.rename(extracted, dest)
        except OSError:
            if not dest.is_dir():  # else another process (a DDP rank) extracted it first: use theirs
                raise
    except UserError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise UserError(f"{archive}: cannot extract ({_one_line(e)})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _check_tar_member(member: tarfile.TarInfo, archive: Path) -> None:
    name = member.name
    normal = posixpath.normpath(name)
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or normal == ".." or \
            normal.startswith("../") or ".." in Path(name).parts:
        raise UserError(f"{archive}: unsafe path {name!r} in the archive; refusing to extract")
    if member.issym() or member.islnk():  # the official archive has none; no link can escape if none is made
        raise UserError(f"{archive}: {name!r} is a link ({member.linkname!r}); refusing to extract")
    if not (member.isfile() or member.isdir()):
        raise UserError(f"{archive}: {name!r} is not a regular file or folder; refusing to extract")


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)  # a checksum, not security
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_file(url: str, dest: Path, md5: str, timeout: float = 30.0) -> None:
    """Download to a temp file next to ``dest`` with a progress bar, check md5, rename into place.

    Network failures raise OSError (URLError, socket errors); a wrong md5 raises UserError.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        digest = hashlib.md5(usedforsecurity=False)  # a checksum, not security
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"download {dest.name}") as bar:
                for chunk in iter(lambda: response.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != md5:
            raise UserError(f"{url}: downloaded file has md5 {digest.hexdigest()}, expected {md5}; "
                            f"not saved as {dest}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------------------------------
# Image folders


def load_image_folder(root: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                      test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """A user's images, ``ROOT/{train,test|val}/<class>/*`` or ``ROOT[/train]/<class>/*`` + seeded holdout.

    Every image is decoded to RGB uint8. ``image_size`` (N or (H, W)) resizes all of them; without it
    all images must have the size of the first training image (first class, first name). Each split is put in a seeded random order so that
    ``subset`` (the first N) mixes the classes. mean/std are measured on the training images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist")
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test fraction {test_fraction} must be between 0 and 1")
    test_dir = next((root / s for s in ("test", "val") if (root / s).is_dir()), None)
    train_dir = root / "train" if (root / "train").is_dir() else root
    if test_dir is not None and train_dir == root:
        raise UserError(f"{root} has {test_dir.name}/ but no train/ folder next to it")
    train_files = _class_images(train_dir, required=True)
    classes = sorted(train_files)
    if test_dir is not None:
        test_files = _class_images(test_dir, required=False)
        unknown = sorted(set(test_files) - set(classes))
        if unknown:
            raise UserError(f"{test_dir}: classes {', '.join(unknown)} have no folder in {train_dir}")
    else:
        train_files, test_files = _holdout(train_files, test_fraction, seed)
        if not any(test_files.values()):
            raise UserError(f"{train_dir}: too few images to hold out a test set; add a {root / 'test'} folder")

    rng = np.random.default_rng(seed)
    splits = []
    for files in (train_files, test_files):
        pairs = [(p, classes.index(c)) for c in sorted(files) for p in files[c]]
        order = rng.permutation(len(pairs))
        splits.append([pairs[i] for i in order])
    first = train_files[classes[0]][0]
    size = _target_size(image_size, first)
    x_train, y_train = _decode_images(splits[0], size, None if image_size else first, "train")
    x_test, y_test = _decode_images(splits[1], size, None if image_size else first, "test")
    mean, std = channel_stats(x_train)
    return Dataset(str(root), x_train, y_train, x_test, y_test, classes, mean, std, source=str(root))


def _class_images(folder: Path, required: bool) -> dict[str, list[Path]]:
    """{class: sorted image paths} from folder/<class>/*; hidden entries and other files are skipped."""
    found = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = sorted(p for p in class_dir.iterdir()
                        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
        if images:
            found[class_dir.name] = images
        elif required:
            raise UserError(f"class folder {class_dir} has no images ({'|'.join(IMAGE_SUFFIXES)})")
    if not found:
        raise UserError(f"no images in {folder}: expected {folder}/<class>/*.png|jpg, one folder per class")
    return found


def _holdout(files: dict[str, list[Path]], fraction: float, seed: int):
    """Per class, a seeded ``fraction`` of the images (never all of them) becomes the test set."""
    rng = np.random.default_rng(seed)
    train, test = {}, {}
    for c in sorted(files):
        paths = files[c]
        n_test = min(len(paths) - 1, round(len(paths) * fraction))
        picked = set(rng.permutation(len(paths))[:n_test].tolist())
        test[c] = [p for i, p in enumerate(paths) if i in picked]
        train[c] = [p for i, p in enumerate(paths) if i not in picked]
    return train, test


def _target_size(image_size, first: Path) -> tuple[int, int]:
    """(H, W) every image will have."""
    if image_size is None:
        return _open_rgb(first).shape[:2]
    hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(hw) != 2 or not all(isinstance(v, int) and v > 0 for v in hw):
        raise UserError(f"--image-size {image_size}: must be a positive integer (or H, W)")
    return hw


def _open_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    from PIL import Image, ImageOps  # only image folders need Pillow
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")  # phone photos carry their rotation in EXIF
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except Exception as e:  # Pillow reports bad files with many exception types
        raise UserError(f"{path}: cannot decode image ({type(e).__name__}: {_one_line(e)})") from None


def _decode_images(pairs, size: tuple[int, int], first: Path | None, split: str):
    """Decode into one uint8 array; resize to ``size`` unless sizes must match ``first`` (no --image-size)."""
    x = np.empty((len(pairs), *size, 3), dtype=np.uint8)
    y = np.array([label for _, label in pairs], dtype=np.int64)
    for i, (path, _) in enumerate(tqdm(pairs, desc=f"decode {split} images", unit="img",
                                       disable=len(pairs) < 1000, leave=False)):
        img = _open_rgb(path, None if first else size)
        if img.shape[:2] != tuple(size):
            raise UserError(f"{path} is {img.shape[1]}x{img.shape[0]} but {first} is {size[1]}x{size[0]}; "
                            "pass --image-size N to resize all images to NxN")
        x[i] = img
    return x, y


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of x/255 for uint8 (N, H, W, 3); std floored at 1/255 (no divide by 0)."""
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for i in range(0, len(x), chunk):
        pixels = x[i:i + chunk].reshape(-1, 3).astype(np.float64)
        total += pixels.sum(0)
        total_sq += np.square(pixels).sum(0)
        count += len(pixels)
    mean = total / count / 255.0
    std = np.sqrt(np.maximum(total_sq / count / 255.0**2 - mean**2, 0.0))
    return tuple(float(m) for m in mean), tuple(float(max(s, 1 / 255)) for s in std)


# ---------------------------------------------------------------------------------------------------
# Checks shared by every source


def _check_arrays(arrays: tuple, source: Path, image_hw: tuple[int, int], num_classes: int) -> None:
    x_train, y_train, x_test, y_test, classes = arrays
    if len(classes) != num_classes:
        raise UserError(f"{source}: {len(classes)} class names, expected {num_classes}")
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (*image_hw, 3) or len(x) == 0:
            raise UserError(f"{source}: x_{split} is {x.dtype} {x.shape}, expected uint8 (N, "
                            f"{image_hw[0]}, {image_hw[1]}, 3) RGB with N > 0")
        if y.ndim != 1 or len(y) != len(x) or y.dtype.kind not in "iu":
            raise UserError(f"{source}: y_{split} is {y.dtype} {y.shape}, expected integer ({len(x)},)")
        if y.min() < 0 or y.max() >= num_classes:
            raise UserError(f"{source}: y_{split} has labels in [{y.min()}, {y.max()}], expected 0..{num_classes - 1}")


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---------------------------------------------------------------------------------------------------
# Batches


def batches(x, y, batch_size: int, *, train: bool, seed: int, epoch: int, mean: Sequence[float],
            std: Sequence[float], device="cpu", channels_last: bool = True, rank: int = 0, world_size: int = 1,
            drop_last: bool | None = None) -> Batches:
    """One epoch of (images float32 (B, 3, H, W) normalised, labels int64 (B,)) batches; ``len()`` works.

    train=True: a permutation drawn from (seed, epoch), the same on every rank, cut into ``world_size``
    disjoint equal shards (the remainder is dropped); this rank's shard is augmented with pad-4 random
    crop + horizontal flip drawn from (seed, epoch, rank). drop_last defaults to True.
    train=False: images in order, no augmentation; with world_size > 1 rank r gets images r, r+W, ...
    (every image exactly once). drop_last defaults to False.
    channels_last=True returns NCHW tensors in channels_last memory layout (a free view of NHWC data).
    """
    return Batches(x, y, batch_size, train=train, seed=seed, epoch=epoch, mean=mean, std=std, device=device,
                   channels_last=channels_last, rank=rank, world_size=world_size, drop_last=drop_last)


class Batches:
    """An iterator over one epoch of batches, with ``len()`` = the number of batches."""

    pad = 4

    def __init__(self, x, y, batch_size, *, train, seed, epoch, mean, std, device, channels_last,
                 rank, world_size, drop_last):
        self.x = _uint8_images(x)
        self.y = torch.as_tensor(np.asarray(y)).to(torch.int64)
        n = len(self.x)
        if self.y.shape != (n,):
            raise UserError(f"{n} images but labels of shape {tuple(self.y.shape)}")
        for what, value, low in (("batch size", batch_size, 1), ("seed", seed, 0), ("epoch", epoch, 0),
                                 ("world size", world_size, 1)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise UserError(f"{what} must be an integer >= {low}, got {value!r}")
        if not 0 <= rank < world_size:
            raise UserError(f"rank {rank} is outside world size {world_size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise UserError(f"mean/std need 3 values each with std > 0, got {mean} / {std}")
        self.batch_size, self.train, self.device, self.channels_last = batch_size, train, torch.device(device), channels_last
        drop_last = train if drop_last is None else drop_last

        if train:
            order = torch.randperm(n, generator=_generator(seed, epoch, 0))
            per_rank = n // world_size
            self.index = order[rank * per_rank:(rank + 1) * per_rank]
            # Drawn for the whole epoch up front: a batch's crops depend only on (seed, epoch, rank, batch).
            augment = _generator(seed, epoch, 1, rank)
            self.offsets = torch.randint(0, 2 * self.pad + 1, (len(self.index), 2), generator=augment) - self.pad
            self.flips = torch.randint(0, 2, (len(self.index),), generator=augment).bool()
        else:
            self.index = None if world_size == 1 else torch.arange(rank, n, world_size)
        count = n if self.index is None else len(self.index)
        self.num_batches = count // batch_size if drop_last else math.ceil(count / batch_size)
        if train and self.num_batches == 0:
            raise UserError(f"batch size {batch_size} is larger than the {count} training images per rank; "
                            "lower --batch-size")
        self.count = count

        # (x/255 - mean)/std == x*scale - shift, applied on the last (channel) axis of NHWC data.
        std_t, mean_t = torch.tensor(std, dtype=torch.float32), torch.tensor(mean, dtype=torch.float32)
        self.scale = (1.0 / (255.0 * std_t)).to(self.device)
        self.shift = (mean_t / std_t).to(self.device)
        h, w = self.x.shape[1:3]
        self._rows = torch.arange(h)
        self._cols = torch.arange(w)
        self._cols_flipped = torch.arange(w - 1, -1, -1)
        self._pixels = self.x.view(-1, 3)  # one row per pixel, for the crop gather
        self._step = 0

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._step >= self.num_batches:
            raise StopIteration
        lo = self._step * self.batch_size
        hi = min(lo + self.batch_size, self.count)
        self._step += 1
        if self.train:
            images, labels = self._augmented(lo, hi), self.y[self.index[lo:hi]]
        elif self.index is None:
            images, labels = self.x[lo:hi], self.y[lo:hi]
        else:
            idx = self.index[lo:hi]
            images, labels = self.x.index_select(0, idx), self.y[idx]
        # Move uint8 (4x fewer bytes than float), then normalise where the model runs.
        images = images.to(self.device).float().mul_(self.scale).sub_(self.shift).permute(0, 3, 1, 2)
        if not self.channels_last:
            images = images.contiguous()
        return images, labels.to(self.device)

    def _augmented(self, lo: int, hi: int) -> torch.Tensor:
        """Pad-4 random crop + horizontal flip of images index[lo:hi] as one uint8 gather, (B, H, W, 3)."""
        n, h, w = self.x.shape[:3]
        idx, offsets, flips = self.index[lo:hi], self.offsets[lo:hi], self.flips[lo:hi]
        # Output pixel (i, j) comes from source row oy + i and column ox + j (ox + W-1-j if flipped);
        # a source outside the image is the zero padding.
        rows = offsets[:, :1] + self._rows
        cols = offsets[:, 1:] + torch.where(flips[:, None], self._cols_flipped, self._cols)
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        pixel = (idx[:, None, None] * h + rows.clamp(0, h - 1)[:, :, None]) * w + cols.clamp(0, w - 1)[:, None, :]
        out = self._pixels.index_select(0, pixel.reshape(-1)).view(len(idx), h, w, 3)
        return out.mul_(inside[..., None])


def _uint8_images(x) -> torch.Tensor:
    """A zero-copy tensor view of the images; they are only ever read."""
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():  # a read-only array (mmap) is fine: nothing writes to it
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        t = torch.as_tensor(x).contiguous()
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[-1] != 3:
        raise UserError(f"images must be uint8 (N, H, W, 3), got {t.dtype} {tuple(t.shape)}")
    return t


def _generator(*words: int) -> torch.Generator:
    """A torch generator seeded by hashing the words (seed, epoch, purpose, ...) together."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))
