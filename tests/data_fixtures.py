"""Small real files in the layouts compress.data reads: CIFAR-10 python batches written byte for byte
the way Python 2 cPickle wrote the official ones, the tar.gz around them, image folders, and a local
HTTP server to download from."""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# ---------------------------------------------------------------------------------------------------
# Python 2 protocol-2 pickles, as the official CIFAR-10 batches are: a dict with str keys, a list of
# int labels and a numpy uint8 array pickled through numpy.core.multiarray._reconstruct with its raw
# bytes as a Python 2 str (BINSTRING), which Python 3 reads back with encoding="latin1".


def py2_pickle(obj) -> bytes:
    out = io.BytesIO()
    out.write(b"\x80\x02")  # PROTO 2
    _py2_save(obj, out)
    out.write(b".")  # STOP
    return out.getvalue()


def _py2_save(obj, out: io.BytesIO) -> None:
    if obj is None:
        out.write(b"N")
    elif isinstance(obj, bool):
        out.write(b"\x88" if obj else b"\x89")  # NEWTRUE / NEWFALSE
    elif isinstance(obj, int):
        out.write(b"J" + struct.pack("<i", obj))  # BININT
    elif isinstance(obj, (str, bytes)):  # a Python 2 str: raw bytes
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        out.write((b"U" + bytes([len(raw)])) if len(raw) < 256 else (b"T" + struct.pack("<I", len(raw))))
        out.write(raw)
    elif isinstance(obj, tuple):
        out.write(b"(")  # MARK
        for item in obj:
            _py2_save(item, out)
        out.write(b"t")  # TUPLE
    elif isinstance(obj, list):
        out.write(b"](")  # EMPTY_LIST MARK
        for item in obj:
            _py2_save(item, out)
        out.write(b"e")  # APPENDS
    elif isinstance(obj, dict):
        out.write(b"}(")  # EMPTY_DICT MARK
        for key, value in obj.items():
            _py2_save(key, out)
            _py2_save(value, out)
        out.write(b"u")  # SETITEMS
    elif isinstance(obj, np.ndarray):
        assert obj.dtype == np.uint8
        # _reconstruct(ndarray, (0,), 'b') then __setstate__((1, shape, dtype, fortran, rawdata))
        out.write(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")  # GLOBAL x2
        _py2_save((0,), out)
        _py2_save("b", out)
        out.write(b"\x87R")  # TUPLE3 REDUCE
        out.write(b"(")
        _py2_save(1, out)
        _py2_save(tuple(obj.shape), out)
        out.write(b"cnumpy\ndtype\n")  # dtype('u1', 0, 1) + its state, as numpy 1.x on Python 2 wrote it
        _py2_save(("u1", 0, 1), out)
        out.write(b"R")
        _py2_save((3, "|", None, None, None, -1, -1, 0), out)
        out.write(b"b")  # BUILD
        _py2_save(False, out)
        _py2_save(np.ascontiguousarray(obj).tobytes(), out)
        out.write(b"tb")  # TUPLE BUILD
    else:
        raise TypeError(type(obj))


def cifar_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n random uint8 (32, 32, 3) images and labels 0..9."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def to_official_rows(x: np.ndarray) -> np.ndarray:
    """NHWC images -> the official (N, 3072) rows: the red 32x32 plane, then green, then blue."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(len(x), 3072)


def write_cifar_batches(folder: Path, per_batch: int = 4, n_test: int = 5, seed: int = 0) -> dict:
    """Write data_batch_1..5, test_batch, batches.meta into folder; return the images they hold (NHWC)."""
    folder.mkdir(parents=True, exist_ok=True)
    x_train, y_train = cifar_images(5 * per_batch, seed)
    x_test, y_test = cifar_images(n_test, seed + 1)
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        batch = {"batch_label": f"training batch {i + 1} of 5", "labels": y_train[part].tolist(),
                 "data": to_official_rows(x_train[part]),
                 "filenames": [f"img_{j}.png" for j in range(per_batch)]}
        (folder / f"data_batch_{i + 1}").write_bytes(py2_pickle(batch))
    (folder / "test_batch").write_bytes(py2_pickle(
        {"batch_label": "testing batch 1 of 1", "labels": y_test.tolist(), "data": to_official_rows(x_test),
         "filenames": [f"t_{j}.png" for j in range(n_test)]}))
    (folder / "batches.meta").write_bytes(py2_pickle(
        {"num_cases_per_batch": per_batch, "label_names": CLASSES, "num_vis": 3072}))
    (folder / "readme.html").write_text("<meta>CIFAR-10</meta>")
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def make_tar_gz(archive: Path, entries: list[tuple[tarfile.TarInfo, bytes | None]]) -> str:
    """Write a tar.gz of (member, content) pairs; return its md5."""
    with tarfile.open(archive, "w:gz") as tar:
        for info, content in entries:
            if content is not None:
                info.size = len(content)
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return hashlib.md5(archive.read_bytes()).hexdigest()


def make_cifar_archive(archive: Path, workdir: Path, **kw) -> tuple[str, dict]:
    """A cifar-10-python.tar.gz laid out like the official one; returns (md5, images it holds)."""
    folder = workdir / "cifar-10-batches-py"
    images = write_cifar_batches(folder, **kw)
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    return hashlib.md5(archive.read_bytes()).hexdigest(), images


# ---------------------------------------------------------------------------------------------------
# A local HTTP server (real sockets, real urllib) for the download path.


@contextlib.contextmanager
def serve_directory(directory: Path):
    """Serve directory on http://127.0.0.1:PORT/ from a thread; yields the base URL."""
    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


# ---------------------------------------------------------------------------------------------------
# Image folders


def write_image(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path)
