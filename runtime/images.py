"""Images in: files (.png/.jpg/... via Pillow, .png also without it, .npy) and numpy arrays,
checked and turned into one uint8 (N, H, W, 3) RGB batch.

The rules are strict on purpose: a wrong size, channel count or dtype is an InputError, never a
silent fix, because a silently squashed or rescaled image gives a confident wrong answer. The
one conversion done quietly is decoding an image *file* to RGB (a grayscale or RGBA PNG is still
a picture of the thing); resizing happens only when asked (`resize=True`, needs Pillow).
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any, List, Tuple

import numpy as np

from .errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def _pillow() -> Any:
    try:
        from PIL import Image
    except ImportError:
        return None
    return Image


# --------------------------------------------------------------------------- files

def read_image_file(path: Any) -> np.ndarray:
    """One file as uint8: (H, W, 3) for an image, whatever the array holds for .npy."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            return np.load(p, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise InputError(f"{p}: not a readable .npy array ({e})") from None
    if suffix not in IMAGE_SUFFIXES:
        raise InputError(f"{p}: unknown file type {suffix or '(none)'}; pass an image ({', '.join(IMAGE_SUFFIXES)}) or .npy")
    image_lib = _pillow()
    if image_lib is not None:
        try:
            with image_lib.open(p) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise InputError(f"{p}: not a readable image ({e.__class__.__name__})") from None
    if suffix == ".png":
        return read_png(p)
    raise InputError(f"{p}: reading {suffix} files needs Pillow: pip install pillow (or pass .png / .npy)")


def read_png(path: Path) -> np.ndarray:
    """A small PNG decoder (stdlib zlib + numpy) so boards without Pillow can read PNGs:
    8-bit, non-interlaced, gray / RGB / palette / gray+alpha / RGBA; alpha is dropped (as Pillow's
    convert("RGB") does)."""
    data = Path(path).read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise InputError(f"{path}: not a PNG file")
    pos, idat, palette, header = 8, [], None, None
    try:
        while pos < len(data):
            length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
            chunk = data[pos + 8:pos + 8 + length]
            if len(chunk) != length:
                raise InputError(f"{path}: truncated PNG")
            pos += 12 + length
            if ctype == b"IHDR":
                header = struct.unpack(">IIBBBBB", chunk)
            elif ctype == b"PLTE":
                palette = np.frombuffer(chunk, np.uint8).reshape(-1, 3)
            elif ctype == b"IDAT":
                idat.append(chunk)
            elif ctype == b"IEND":
                break
        if header is None:
            raise InputError(f"{path}: PNG without a header")
        width, height, depth, color, _, _, interlace = header
        channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(color)
        if depth != 8 or interlace != 0 or channels is None:
            raise InputError(f"{path}: only 8-bit non-interlaced PNGs can be read without Pillow: pip install pillow")
        raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8)
    except (struct.error, zlib.error):
        raise InputError(f"{path}: corrupt PNG") from None
    stride = width * channels
    if raw.size != height * (stride + 1):
        raise InputError(f"{path}: corrupt PNG (wrong amount of pixel data)")
    rows = raw.reshape(height, stride + 1)
    out = np.zeros((height, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(height):
        out[y] = prev = _unfilter(int(rows[y, 0]), rows[y, 1:], prev, channels, path)
    pixels = out.reshape(height, width, channels)
    if color == 3:
        if palette is None:
            raise InputError(f"{path}: palette PNG without a palette")
        return palette[np.minimum(pixels[..., 0], len(palette) - 1)]
    if channels <= 2:  # gray (+ alpha)
        return np.repeat(pixels[..., :1], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


def _unfilter(kind: int, line: np.ndarray, prev: np.ndarray, bpp: int, path: Path) -> np.ndarray:
    """Undo one PNG row filter (RFC 2083 §6). All arithmetic is modulo 256."""
    if kind == 0:
        return line.copy()
    if kind == 2:  # Up
        return (line + prev).astype(np.uint8)
    if kind == 1:  # Sub: a running sum per channel, which numpy's uint8 cumsum does modulo 256
        return np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
    if kind not in (3, 4):
        raise InputError(f"{path}: corrupt PNG (filter type {kind})")
    cur = [0] * len(line)  # Average and Paeth depend on the byte just decoded: plain loop
    up = prev.tolist()
    for i, v in enumerate(line.tolist()):
        left = cur[i - bpp] if i >= bpp else 0
        if kind == 3:
            cur[i] = (v + (left + up[i]) // 2) & 255
        else:
            upleft = up[i - bpp] if i >= bpp else 0
            p = left + up[i] - upleft
            pa, pb, pc = abs(p - left), abs(p - up[i]), abs(p - upleft)
            pred = left if pa <= pb and pa <= pc else (up[i] if pb <= pc else upleft)
            cur[i] = (v + pred) & 255
    return np.asarray(cur, np.uint8)


# --------------------------------------------------------------------------- arrays

def check_array(a: Any, what: str = "images") -> np.ndarray:
    """A uint8 (N, H, W, 3) batch from an (H, W, 3) image or an (N, H, W, 3) batch, or InputError."""
    if not isinstance(a, np.ndarray):
        raise InputError(f"{what} must be a numpy array, a file path or a list of them, got {type(a).__name__}")
    if a.dtype != np.uint8:
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            raise InputError(f"{what} contain NaN or Inf; images must be uint8 RGB pixels 0..255")
        hint = (" (pass the raw pixels; the runtime applies scale/mean/std itself)" if a.dtype.kind in "fc"
                else "; convert with .astype(np.uint8) if the values are 0..255")
        raise InputError(f"{what} must be uint8 RGB pixels 0..255, got {a.dtype}{hint}")
    if a.ndim == 3:
        a = a[None]
    if a.ndim != 4:
        raise InputError(f"{what} must be an HxWx3 image or an NxHxWx3 batch, got shape {a.shape}")
    if a.shape[0] == 0:
        raise InputError(f"{what}: the batch is empty")
    if a.shape[-1] != 3:
        if a.shape[1] == 3:
            raise InputError(f"{what} have shape {a.shape}, which looks channels-first; pass HWC "
                             "(height, width, RGB) - the runtime transposes for NCHW models itself")
        raise InputError(f"{what} have {a.shape[-1]} channels, the model takes RGB (3); convert the "
                         "image to RGB first")
    return a


def fit_size(batch: np.ndarray, height: int, width: int, resize: bool, what: str = "images") -> np.ndarray:
    """The batch at the model's size: unchanged, or resized with Pillow when `resize` is True."""
    h, w = batch.shape[1:3]
    if (h, w) == (height, width):
        return batch
    if not resize:
        raise InputError(f"{what} are {w}x{h} (WxH), the model takes {width}x{height}; resize them "
                         "or pass resize=True (CLI: --resize)")
    image_lib = _pillow()
    if image_lib is None:
        raise InputError("resize=True needs Pillow: pip install pillow")
    return np.stack([np.asarray(image_lib.fromarray(im).resize((width, height), image_lib.BILINEAR))
                     for im in batch])


def to_batch(images: Any, height: int, width: int, resize: bool = False) -> np.ndarray:
    """images (array, path, or a list of arrays/paths) -> uint8 (N, height, width, 3), C-contiguous."""
    if isinstance(images, (str, Path)):
        items: List[Tuple[Any, str]] = [(read_image_file(images), str(images))]
    elif isinstance(images, (list, tuple)):
        if not images:
            raise InputError("no images given")
        items = [(read_image_file(i), str(i)) if isinstance(i, (str, Path)) else (i, f"image {n}")
                 for n, i in enumerate(images)]
    else:
        items = [(images, "images")]
    parts = [fit_size(check_array(a, what), height, width, resize, what) for a, what in items]
    batch = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return np.ascontiguousarray(batch)

