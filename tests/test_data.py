"""compress.data: every CIFAR-10 source (npz, official batches, tar.gz, download), image folders, and the
batch iterator's order, sharding and augmentation. Files are small and written by the tests."""
from __future__ import annotations

import os
import pickle
import tarfile
import zipfile

import numpy as np
import pytest
import torch

from compress import data
from compress.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    batches,
    channel_stats,
    load_cifar10,
    load_dataset,
    load_image_folder,
    subset,
)
from compress.errors import UserError
from tests.data_fixtures import (
    CLASSES,
    cifar_images,
    make_cifar_archive,
    make_tar_gz,
    py2_pickle,
    serve_directory,
    write_cifar_batches,
    write_image,
)

UNREACHABLE = "http://127.0.0.1:9/cifar-10-python.tar.gz"  # the discard port: closed, refuses at once


def user_error(fn, *args, **kw) -> str:
    """Run fn, expect a UserError, return its (one-line) message."""
    with pytest.raises(UserError) as info:
        fn(*args, **kw)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


def write_npz(path, n_train=6, n_test=3, **override):
    x_train, y_train = cifar_images(n_train, 0)
    x_test, y_test = cifar_images(n_test, 1)
    arrays = dict(x_train=x_train, y_train=y_train.astype(np.uint8), x_test=x_test,
                  y_test=y_test.astype(np.uint8), classes=np.array(CLASSES))
    arrays.update(override)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def leftovers(folder):
    """Temp files or folders our writers may leave behind if they are not careful."""
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".part")]


# ---------------------------------------------------------------------------------------------------
# cifar10.npz


def test_npz_real_cifar(small_cifar_dir, cifar_npz):
    ds = load_dataset("cifar10", data_dir=str(small_cifar_dir))
    assert ds.name == "cifar10" and ds.source == str(small_cifar_dir / "cifar10.npz")
    assert ds.x_train.shape == (2000, 32, 32, 3) and ds.x_train.dtype == np.uint8
    assert ds.x_test.shape == (500, 32, 32, 3)
    assert ds.y_train.dtype == np.int64 and ds.y_test.dtype == np.int64
    assert ds.classes[:2] == ["airplane", "automobile"] and ds.num_classes == 10
    assert ds.image_shape == (3, 32, 32)
    assert ds.mean == CIFAR10_MEAN == (0.4914, 0.4822, 0.4465)
    assert ds.std == CIFAR10_STD == (0.2470, 0.2435, 0.2616)
    with np.load(cifar_npz) as z:
        np.testing.assert_array_equal(ds.x_test, z["x_test"][:500])
        np.testing.assert_array_equal(ds.y_train, z["y_train"][:2000])
    # The published constants are the statistics of the real training images.
    mean, std = channel_stats(ds.x_train)
    np.testing.assert_allclose(mean, CIFAR10_MEAN, atol=0.01)
    np.testing.assert_allclose(std, CIFAR10_STD, atol=0.01)


def test_data_dir_defaults_to_env_then_cache(tmp_path, monkeypatch):
    write_npz(tmp_path / "cifar10.npz")
    monkeypatch.setenv("EDGESLIM_DATA", str(tmp_path))
    assert load_dataset("cifar10").source == str(tmp_path / "cifar10.npz")
    monkeypatch.delenv("EDGESLIM_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.default_data_dir() == tmp_path / "home" / ".cache" / "edgeslim"


@pytest.mark.parametrize("override, words", [
    (dict(x_train=np.zeros((6, 32, 32, 3), np.float32)), "x_train is float32"),
    (dict(x_test=np.zeros((3, 28, 28, 3), np.uint8)), "x_test is uint8 (3, 28, 28, 3)"),
    (dict(y_train=np.full(6, 10, np.uint8)), "labels in [10, 10]"),
    (dict(y_test=np.zeros(2, np.uint8)), "y_test is uint8 (2,)"),
    (dict(y_test=np.zeros(3, np.float32)), "y_test is float32"),
    (dict(classes=np.array(CLASSES[:9])), "9 class names"),
    (dict(y_train=None), "missing y_train"),
    (dict(classes=np.array(CLASSES, dtype=object)), "pickled objects"),
])
def test_npz_validation(tmp_path, override, words):
    write_npz(tmp_path / "cifar10.npz", **override)
    message = user_error(load_dataset, "cifar10", data_dir=tmp_path, download=False)
    assert words in message and str(tmp_path / "cifar10.npz") in message


@pytest.mark.parametrize("keep", [0.5, 0.98, 30])
def test_npz_truncated(tmp_path, keep):
    full = tmp_path / "full.npz"
    np.savez_compressed(full, **write_npz(tmp_path / "x.npz"))
    content = full.read_bytes()
    cut = int(len(content) * keep) if isinstance(keep, float) else keep
    (tmp_path / "cifar10.npz").write_bytes(content[:cut])
    message = user_error(load_dataset, "cifar10", data_dir=tmp_path, download=False)
    assert str(tmp_path / "cifar10.npz") in message and "corrupt" in message


def test_npz_corrupt_member(tmp_path):
    """A bit flip inside a compressed member: the CRC or zlib catches it."""
    path = tmp_path / "cifar10.npz"
    np.savez_compressed(path, **write_npz(tmp_path / "x.npz", n_train=200))
    content = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("x_train.npy")
    middle = info.header_offset + 100 + info.compress_size // 2
    content[middle] ^= 0xFF
    path.write_bytes(bytes(content))
    assert str(path) in user_error(load_dataset, "cifar10", data_dir=tmp_path, download=False)


def test_users_own_npz(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "parts.npz"
    x_train = rng.integers(0, 256, (5, 16, 12, 3), dtype=np.uint8)
    np.savez(path, x_train=x_train, y_train=np.array([0, 1, 2, 0, 1]),
             x_test=rng.integers(0, 256, (2, 16, 12, 3), dtype=np.uint8), y_test=np.array([2, 2], np.int32),
             classes=np.array(["bolt", "nut", "washer"]))
    ds = load_dataset(str(path))
    assert ds.classes == ["bolt", "nut", "washer"] and ds.image_shape == (3, 16, 12) and ds.name == str(path)
    assert ds.y_test.dtype == np.int64 and (ds.mean, ds.std) == channel_stats(x_train)
    np.savez(path, x_train=x_train, y_train=np.array([0, 1, 3, 0, 1]), x_test=x_train, y_test=np.zeros(5, int),
             classes=np.array(["bolt", "nut", "washer"]))
    assert "labels in [0, 3], expected 0..2" in user_error(load_dataset, str(path))


def test_unknown_dataset_and_bad_arguments(tmp_path):
    assert "unknown dataset 'imagenet'" in user_error(load_dataset, "imagenet")
    assert "--data-dir" in user_error(load_dataset, "folder")
    (tmp_path / "file").write_text("x")
    assert "is a file" in user_error(load_dataset, "cifar10", data_dir=tmp_path / "file")
    assert "--image-size" in user_error(load_dataset, "cifar10", data_dir=tmp_path, image_size=64)


# ---------------------------------------------------------------------------------------------------
# cifar-10-batches-py (official python pickles)


def test_fixture_pickles_are_python2_style(tmp_path):
    """The test batches reference numpy exactly as the official files do, and plain pickle reads them."""
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(folder)
    raw = (folder / "data_batch_1").read_bytes()
    assert raw.startswith(b"\x80\x02") and b"cnumpy.core.multiarray\n_reconstruct\n" in raw
    assert b"_codecs" not in raw  # Python 3 would have pickled bytes through _codecs.encode
    batch = pickle.loads(raw, encoding="latin1")
    assert batch["data"].dtype == np.uint8 and batch["data"].shape == (4, 3072)
    assert isinstance(batch["labels"], list)


def test_batches_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    expected = write_cifar_batches(folder, per_batch=4, n_test=5)
    ds = load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert ds.source == str(folder) and ds.classes == CLASSES
    for key in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(ds, key), expected[key])
    assert ds.x_train.flags.c_contiguous and ds.x_test.flags.c_contiguous and ds.y_test.dtype == np.int64
    # Row layout, checked by hand: byte 1 of a row is red at (0, 1), byte 1024+32 is green at (1, 0).
    rows = pickle.loads((folder / "test_batch").read_bytes(), encoding="latin1")["data"]
    assert ds.x_test[2, 0, 1, 0] == rows[2, 1] and ds.x_test[2, 1, 0, 1] == rows[2, 1024 + 32]
    assert ds.x_test[2, 31, 31, 2] == rows[2, 3071]


def test_npz_wins_over_batches_folder(tmp_path):
    write_cifar_batches(tmp_path / "cifar-10-batches-py")
    write_npz(tmp_path / "cifar10.npz", n_train=7)
    assert len(load_dataset("cifar10", data_dir=tmp_path).x_train) == 7


def exploit(kind: str, marker) -> bytes:
    """A pickle that creates ``marker`` when plain pickle loads it."""
    if kind == "os.system":  # the classic protocol-0 exploit, written by hand
        return f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    if kind == "posix.system":  # what Python 3 writes for a __reduce__ returning os.system
        class Exploit:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))
        return pickle.dumps({"data": Exploit(), "labels": [0]}, protocol=2)
    code = f"open('{marker}', 'w').close()".encode()  # builtins.eval, protocol 2
    return b"\x80\x02cbuiltins\neval\nX" + len(code).to_bytes(4, "little") + code + b"\x85R."


@pytest.mark.parametrize("kind", ["os.system", "posix.system", "builtins.eval"])
def test_exploits_work_on_plain_pickle(tmp_path, kind):
    """So that the refusals below refuse something real."""
    marker = tmp_path / "pwned"
    pickle.loads(exploit(kind, marker))
    assert marker.exists()


@pytest.mark.parametrize("refused", ["os.system", "posix.system", "builtins.eval"])
@pytest.mark.parametrize("target", ["data_batch_3", "batches.meta"])
def test_malicious_pickle_is_refused(tmp_path, refused, target):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(folder)
    marker = tmp_path / "pwned"
    (folder / target).write_bytes(exploit(refused, marker))
    message = user_error(load_dataset, "cifar10", data_dir=tmp_path, download=False)
    assert message.startswith(f"refusing to unpickle {refused} in {folder / target}")
    assert not marker.exists()


def test_batches_folder_missing_or_truncated(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar_batches(folder)
    raw = (folder / "data_batch_2").read_bytes()
    (folder / "data_batch_2").write_bytes(raw[: len(raw) // 2])
    message = user_error(load_dataset, "cifar10", data_dir=tmp_path, download=False)
    assert message.startswith(f"{folder / 'data_batch_2'}: corrupt or truncated")
    (folder / "data_batch_2").write_bytes(py2_pickle({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}))
    assert "not a uint8 (N, 3072)" in user_error(load_dataset, "cifar10", data_dir=tmp_path, download=False)
    (folder / "data_batch_2").unlink()
    message = user_error(load_dataset, "cifar10", data_dir=tmp_path, download=False)
    assert message.startswith(f"{folder}: missing data_batch_2")


# ---------------------------------------------------------------------------------------------------
# cifar-10-python.tar.gz


def test_archive_md5_match_extracts(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    md5, expected = make_cifar_archive(cache / "cifar-10-python.tar.gz", tmp_path / "src")
    monkeypatch.setattr(data, "CIFAR10_MD5", md5)  # the module constant is read at call time
    ds = load_dataset("cifar10", data_dir=cache, download=False)
    assert ds.source == str(cache / "cifar-10-python.tar.gz")
    np.testing.assert_array_equal(ds.x_train, expected["x_train"])
    np.testing.assert_array_equal(ds.y_test, expected["y_test"])
    assert (cache / "cifar-10-batches-py" / "test_batch").is_file()
    assert (cache / "cifar-10-python.tar.gz").is_file() and leftovers(cache) == []
    # Next time the extracted folder is used.
    assert load_dataset("cifar10", data_dir=cache).source == str(cache / "cifar-10-batches-py")


def test_archive_md5_mismatch(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    md5, _ = make_cifar_archive(archive, tmp_path / "src")
    message = user_error(load_cifar10, tmp_path, download=False)  # checked against the published md5
    assert f"md5 is {md5}, expected c58f30108f718f92721af3b95e74349a" in message and str(archive) in message
    assert not (tmp_path / "cifar-10-batches-py").exists() and leftovers(tmp_path) == []
    assert archive.is_file()  # the user's file is left alone


def _member(name, kind=tarfile.REGTYPE, link=""):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("entries, words", [
    ([(_member("../evil.txt"), b"x")], "unsafe path '../evil.txt'"),
    ([(_member("cifar-10-batches-py/../../evil.txt"), b"x")], "unsafe path"),
    ([(_member("/tmp/edgeslim-evil.txt"), b"x")], "unsafe path '/tmp/edgeslim-evil.txt'"),
    ([(_member("cifar-10-batches-py", tarfile.DIRTYPE), None),
      (_member("cifar-10-batches-py/data_batch_1", tarfile.SYMTYPE, "../../evil.txt"), None)], "is a link"),
    ([(_member("cifar-10-batches-py/test_batch", tarfile.LNKTYPE, "/etc/passwd"), None)], "is a link"),
    ([(_member("cifar-10-batches-py/fifo", tarfile.FIFOTYPE), None)], "not a regular file"),
    ([(_member("something-else/readme", tarfile.REGTYPE), b"x")], "no cifar-10-batches-py/ folder"),
])
def test_archive_unsafe_members_refused(tmp_path, entries, words):
    cache = tmp_path / "cache"
    cache.mkdir()
    archive = cache / "cifar-10-python.tar.gz"
    md5 = make_tar_gz(archive, entries)
    message = user_error(load_cifar10, cache, download=False, md5=md5)
    assert words in message and str(archive) in message
    assert not (tmp_path / "evil.txt").exists() and not os.path.exists("/tmp/edgeslim-evil.txt")
    assert leftovers(cache) == [] and not (cache / "cifar-10-batches-py").exists()


def test_archive_truncated(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    make_cifar_archive(archive, tmp_path / "src")
    archive.write_bytes(archive.read_bytes()[:-200])
    message = user_error(load_cifar10, tmp_path, download=False, md5=data.file_md5(archive))
    assert message.startswith(f"{archive}: cannot extract") and leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# download


def test_offline_says_where_to_put_what(tmp_path):
    message = user_error(load_cifar10, tmp_path / "cache", url=UNREACHABLE)
    assert f"downloading {UNREACHABLE} failed" in message
    for name in ("cifar10.npz", "cifar-10-batches-py/", "cifar-10-python.tar.gz", str(tmp_path / "cache")):
        assert name in message
    assert leftovers(tmp_path / "cache") == []


def test_download_false_does_not_try(tmp_path, monkeypatch):
    def no_network(*args, **kw):
        raise AssertionError("download attempted")
    monkeypatch.setattr(data, "download_file", no_network)
    message = user_error(load_dataset, "cifar10", data_dir=tmp_path, download=False)
    assert "downloads are off" in message and "cifar10.npz" in message


def test_download_from_local_server(tmp_path):
    served = tmp_path / "served"
    served.mkdir()
    md5, expected = make_cifar_archive(served / "cifar-10-python.tar.gz", tmp_path / "src")
    cache = tmp_path / "cache" / "edgeslim"  # created on demand
    with serve_directory(served) as base:
        url = base + "cifar-10-python.tar.gz"
        message = user_error(load_cifar10, cache, url=url, md5="0" * 32)
        assert f"has md5 {md5}, expected {'0' * 32}" in message
        assert not (cache / "cifar-10-python.tar.gz").exists() and leftovers(cache) == []

        ds = load_cifar10(cache, url=url, md5=md5)
    np.testing.assert_array_equal(ds.x_test, expected["x_test"])
    assert data.file_md5(cache / "cifar-10-python.tar.gz") == md5
    assert (cache / "cifar-10-batches-py").is_dir() and leftovers(cache) == []


def test_download_404(tmp_path):
    with serve_directory(tmp_path) as base:
        message = user_error(load_cifar10, tmp_path / "cache", url=base + "nothing-here.tar.gz")
    assert "404" in message and "cifar10.npz" in message


# ---------------------------------------------------------------------------------------------------
# image folders


def solid(color, size=(8, 8)):
    return np.full((*size, 3), color, dtype=np.uint8)


def test_image_folder_train_test(tmp_path):
    rng = np.random.default_rng(0)
    images = {}
    for split, count in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            for i in range(count):
                images[split, cls, i] = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
                write_image(tmp_path / split / cls / f"{i}.png", images[split, cls, i])
    write_image(tmp_path / "train" / "dog" / "gray.png", solid(100, (6, 10)), mode="L")
    write_image(tmp_path / "train" / "dog" / "alpha.png", solid(50, (6, 10)), mode="RGBA")
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    (tmp_path / "train" / "dog" / ".hidden.png").write_bytes(b"junk")

    ds = load_dataset("folder", data_dir=tmp_path)
    assert ds.classes == ["cat", "dog"] and ds.name == str(tmp_path) and ds.source == str(tmp_path)
    assert ds.x_train.shape == (8, 6, 10, 3) and ds.x_test.shape == (4, 6, 10, 3)
    assert ds.y_train.dtype == np.int64 and sorted(ds.y_train.tolist()) == [0, 0, 0, 1, 1, 1, 1, 1]
    # PNG is lossless: every written training image is there with its label.
    stored = {ds.x_train[i].tobytes(): ds.y_train[i] for i in range(len(ds.x_train))}
    for (split, cls, _), img in images.items():
        if split == "train":
            assert stored[img.tobytes()] == ["cat", "dog"].index(cls)
    assert stored[solid(100, (6, 10)).tobytes()] == 1
    mean, std = channel_stats(ds.x_train)
    assert ds.mean == mean and ds.std == std
    np.testing.assert_allclose(ds.mean, (ds.x_train / 255.0).reshape(-1, 3).mean(0))
    np.testing.assert_allclose(ds.std, (ds.x_train / 255.0).reshape(-1, 3).std(0))
    # A path works as the dataset name; the order is seeded, so the same every time.
    again = load_dataset(str(tmp_path))
    np.testing.assert_array_equal(again.x_train, ds.x_train)


def test_image_folder_sizes(tmp_path):
    write_image(tmp_path / "train" / "a" / "0.png", solid(10, (8, 8)))
    write_image(tmp_path / "train" / "a" / "1.jpg", solid(200, (12, 16)))
    write_image(tmp_path / "test" / "a" / "0.png", solid(30, (8, 8)))
    message = user_error(load_image_folder, tmp_path)
    assert f"1.jpg is 16x12 but {tmp_path / 'train' / 'a' / '0.png'} is 8x8" in message
    assert "--image-size" in message
    ds = load_image_folder(tmp_path, image_size=4)
    assert ds.x_train.shape == (2, 4, 4, 3) and ds.x_test.shape == (1, 4, 4, 3)
    assert sorted(ds.x_train[:, 0, 0, 0].tolist()) == [10, pytest.approx(200, abs=3)]
    assert load_image_folder(tmp_path, image_size=(6, 5)).x_train.shape == (2, 6, 5, 3)
    assert "--image-size" in user_error(load_image_folder, tmp_path, image_size=0)


def test_image_folder_holdout(tmp_path):
    for cls, count in (("a", 10), ("b", 5), ("c", 1)):
        for i in range(count):
            write_image(tmp_path / cls / f"{i}.png", solid((i * 20 + ord(cls)) % 256, (4, 4)))
    ds = load_image_folder(tmp_path, test_fraction=0.2, seed=3)
    assert ds.classes == ["a", "b", "c"]
    assert sorted(ds.y_test.tolist()) == [0, 0, 1]  # 20% per class, never a class's only image
    assert sorted(ds.y_train.tolist()) == [0] * 8 + [1] * 4 + [2]
    train = {img.tobytes() for img in ds.x_train}
    assert not train & {img.tobytes() for img in ds.x_test}
    again = load_image_folder(tmp_path, test_fraction=0.2, seed=3)
    np.testing.assert_array_equal(again.x_test, ds.x_test)
    other = load_image_folder(tmp_path, test_fraction=0.2, seed=4)
    assert {img.tobytes() for img in other.x_test} != {img.tobytes() for img in ds.x_test}


def test_image_folder_bad_inputs(tmp_path):
    assert "does not exist" in user_error(load_image_folder, tmp_path / "nope")
    (tmp_path / "empty" / "train" / "cat").mkdir(parents=True)
    assert "has no images" in user_error(load_image_folder, tmp_path / "empty")
    (tmp_path / "none").mkdir()
    assert "no images in" in user_error(load_image_folder, tmp_path / "none")
    write_image(tmp_path / "x" / "train" / "cat" / "0.png", solid(1))
    write_image(tmp_path / "x" / "test" / "cow" / "0.png", solid(1))
    assert "classes cow have no folder" in user_error(load_image_folder, tmp_path / "x")
    (tmp_path / "x" / "test" / "cow" / "0.png").unlink()
    (tmp_path / "x" / "test" / "cat").mkdir()
    (tmp_path / "x" / "test" / "cat" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    message = user_error(load_image_folder, tmp_path / "x")
    assert message.startswith(f"{tmp_path / 'x' / 'test' / 'cat' / 'bad.png'}: cannot decode image")
    write_image(tmp_path / "only" / "cat" / "0.png", solid(1))
    assert "too few images" in user_error(load_image_folder, tmp_path / "only")


# ---------------------------------------------------------------------------------------------------
# subset


def test_subset(tmp_path):
    write_npz(tmp_path / "cifar10.npz", n_train=6, n_test=3)
    ds = load_dataset("cifar10", data_dir=tmp_path)
    small = subset(ds, train=4, test=2)
    np.testing.assert_array_equal(small.x_train, ds.x_train[:4])
    np.testing.assert_array_equal(small.y_test, ds.y_test[:2])
    assert small.mean == ds.mean and small.classes == ds.classes
    assert len(subset(ds, test=1).x_train) == 6
    assert "--train-subset 7" in user_error(subset, ds, train=7)
    assert "--test-subset 0" in user_error(subset, ds, test=0)


# ---------------------------------------------------------------------------------------------------
# batches


def pad_crop_flip_candidates(img: np.ndarray) -> dict[bytes, set]:
    """Every image a pad-4 random crop + optional horizontal flip can make of img -> the (dy, dx, flip) making it."""
    h, w = img.shape[:2]
    padded = np.pad(img, ((4, 4), (4, 4), (0, 0)))
    out = {}
    for dy in range(-4, 5):
        for dx in range(-4, 5):
            crop = padded[4 + dy:4 + dy + h, 4 + dx:4 + dx + w]
            out.setdefault(crop.tobytes(), set()).add((dy, dx, False))
            out.setdefault(crop[:, ::-1].tobytes(), set()).add((dy, dx, True))
    return out


def unnormalise(xb: torch.Tensor, mean, std) -> np.ndarray:
    """Back to uint8 NHWC (exact up to float rounding)."""
    x = xb.permute(0, 2, 3, 1).numpy() * np.array(std) + np.array(mean)
    return np.rint(x * 255).astype(np.uint8)


def images_and_ids(n=40, h=8, w=6):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8), np.arange(n)  # label = image id


MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def test_eval_batches_in_order_exact():
    x, y = images_and_ids(10)
    it = batches(x, y, 4, train=False, seed=0, epoch=0, mean=MEAN, std=STD)
    out = list(it)
    assert len(it) == len(out) == 3 and [len(b[1]) for b in out] == [4, 4, 2]  # the last, short batch too
    xb = torch.cat([b[0] for b in out])
    assert xb.shape == (10, 3, 8, 6) and xb.dtype == torch.float32
    assert out[0][0].is_contiguous(memory_format=torch.channels_last)
    expected = (x.transpose(0, 3, 1, 2) / 255.0 - np.array(MEAN)[:, None, None]) / np.array(STD)[:, None, None]
    np.testing.assert_allclose(xb.numpy(), expected, atol=1e-5)
    assert torch.cat([b[1] for b in out]).tolist() == list(range(10))
    assert out[0][1].dtype == torch.int64
    plain = next(batches(x, y, 4, train=False, seed=0, epoch=0, mean=MEAN, std=STD, channels_last=False))[0]
    assert plain.is_contiguous() and torch.equal(plain, out[0][0])


def test_train_batches_are_crops_and_flips_of_their_images():
    x, y = images_and_ids(40)
    ids, made_by = [], []
    for xb, yb in batches(x, y, 16, train=True, seed=1, epoch=0, mean=MEAN, std=STD):
        assert xb.shape == (16, 3, 8, 6) and xb.is_contiguous(memory_format=torch.channels_last)
        for img, i in zip(unnormalise(xb, MEAN, STD), yb.tolist()):
            candidates = pad_crop_flip_candidates(x[i])
            assert img.tobytes() in candidates  # a crop (zero padded) or flipped crop of image i
            made_by.append(candidates[img.tobytes()])
        ids += yb.tolist()
    assert len(ids) == 32 and len(set(ids)) == 32  # drop_last: 2 full batches, no image twice
    assert ids != sorted(ids)
    # Random images: each output has one explanation. Offsets and flips vary.
    assert all(len(m) == 1 for m in made_by)
    params = [next(iter(m)) for m in made_by]
    assert len({p[:2] for p in params}) > 10 and {p[2] for p in params} == {False, True}


def test_train_batches_deterministic_per_seed_epoch_rank():
    x, y = images_and_ids(40)

    def epoch_of(**kw):
        args = dict(train=True, seed=5, epoch=2, mean=MEAN, std=STD) | kw
        return [(xb.clone(), yb.clone()) for xb, yb in batches(x, y, 8, **args)]

    first, again = epoch_of(), epoch_of()
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    for other in (epoch_of(epoch=3), epoch_of(seed=6)):
        assert [b[1].tolist() for b in other] != [b[1].tolist() for b in first]


def test_ranks_get_disjoint_equal_shards():
    x, y = images_and_ids(43)
    shards = []
    for rank in range(3):
        it = batches(x, y, 4, train=True, seed=0, epoch=1, mean=MEAN, std=STD, rank=rank, world_size=3,
                     drop_last=False)
        assert len(it) == 4  # 43 // 3 = 14 images per rank
        shards.append([i for _, yb in it for i in yb.tolist()])
    assert [len(s) for s in shards] == [14, 14, 14]
    assert len(set(shards[0]) | set(shards[1]) | set(shards[2])) == 42
    # The shards come from one permutation shared by all ranks: rank 0 alone sees the same order.
    single = [i for _, yb in batches(x, y, 4, train=True, seed=0, epoch=1, mean=MEAN, std=STD, drop_last=False)
              for i in yb.tolist()]
    assert shards[0] + shards[1] + shards[2] == single[:42]
    # Eval shards cover every image exactly once.
    seen = [i for r in range(3) for _, yb in batches(x, y, 5, train=False, seed=0, epoch=0, mean=MEAN,
                                                       std=STD, rank=r, world_size=3) for i in yb.tolist()]
    assert sorted(seen) == list(range(43))


def test_batches_bad_arguments():
    x, y = images_and_ids(10)
    common = dict(seed=0, epoch=0, mean=MEAN, std=STD)
    assert "larger than the 10 training images" in user_error(batches, x, y, 16, train=True, **common)
    assert "batch size" in user_error(batches, x, y, 0, train=False, **common)
    assert "rank 2" in user_error(batches, x, y, 4, train=True, rank=2, world_size=2, **common)
    assert "uint8 (N, H, W, 3)" in user_error(batches, x.astype(np.float32), y, 4, train=True, **common)
    assert "labels of shape" in user_error(batches, x, y[:5], 4, train=True, **common)
