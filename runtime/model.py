"""`load` a bundle and run it: uint8 RGB images in, class probabilities out.

    model = load("dist/vgg16-f76", format="tflite-int8", threads=1)
    probs = model.predict(images)        # (N, classes) float32
    label, p = model.classify("cat.png")
    x = model.preprocess(images)         # the artifact's own input tensor
    raw = model.run(x)                   # one interpreter invoke, raw output (what device_bench times)

Preprocessing is the training one, from the manifest: x = (uint8 * scale - mean) / std per RGB
channel, transposed to NCHW for ONNX models, and for int8 TFLite quantised with the model's input
scale/zero_point (round half to even, clipped); int8 outputs are dequantised, then softmax.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from .backends import (
    BACKENDS,
    Session,
    backends_for,
    choose_backend,
    format_kind,
    install_hint,
    is_installed,
    open_session,
)
from .bundle import FORMATS, Artifact, Bundle, TensorSpec, read_bundle, read_checked
from .errors import BundleError, InputError
from .images import to_batch

# Integer input/output scales may differ from the manifest's rounded copy by float noise only.
_QUANT_RTOL = 1e-5


def pick_format(bundle: Bundle, backend: Optional[str] = None) -> str:
    """format="auto": the first of FORMATS (tflite-int8 > tflite > onnx-int8 > onnx) that the
    bundle has and that an installed backend (or the named one) can run."""
    for fmt in FORMATS:
        if fmt in bundle.artifacts:
            runners = backends_for(fmt)
            if backend in runners or (backend in (None, "auto") and any(is_installed(b) for b in runners)):
                return fmt
    have = ", ".join(bundle.artifacts)
    if backend not in (None, "auto"):
        raise BundleError(f"backend {backend!r} runs none of this bundle's models ({have})")
    raise BundleError(f"no installed interpreter runs this bundle's models ({have}): "
                      f"{install_hint(next(iter(bundle.artifacts)))}")


class Model:
    """One bundle artifact loaded into one interpreter. Use `load()` to make one."""

    def __init__(self, bundle: Bundle, artifact: Artifact, session: Session, resize: bool):
        self.bundle, self.artifact, self._session = bundle, artifact, session
        self.resize = resize
        self.load_seconds: Dict[str, float] = {}  # set by load(): where the cold start went
        self._check_session()

    # ---- what it is
    @property
    def format(self) -> str:
        return self.artifact.format

    @property
    def backend(self) -> str:
        return self._session.backend

    @property
    def backend_version(self) -> str:
        return self._session.backend_version

    @property
    def manifest(self) -> Dict[str, Any]:
        return self.bundle.manifest

    @property
    def classes(self) -> List[str]:
        return self.bundle.classes

    @property
    def input_shape(self) -> Tuple[int, ...]:
        """The artifact's input shape, -1 where the batch is dynamic."""
        return self._session.input_shape

    @property
    def input_dtype(self) -> np.dtype:
        return self._session.input_dtype

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch one `run` must get (TFLite models exported with batch 1), None = any."""
        return self._session.fixed_batch

    def __repr__(self) -> str:
        return (f"Model({self.bundle.name!r}, format={self.format!r}, backend={self.backend!r} "
                f"{self.backend_version}, input={self.input_dtype}{list(self.input_shape)})")

    def _check_session(self) -> None:
        """The file must be the model the manifest describes: same input dtype, layout/size and
        quantisation. The interpreter's own quantisation is what is then used."""
        spec, s, name = self.artifact.input, self._session, self.artifact.path.name
        if s.input_dtype != np.dtype(spec.dtype):
            raise BundleError(f"{name} takes {s.input_dtype} input, manifest.json says {spec.dtype}")
        if len(s.input_shape) != 4 or s.input_shape[1:] != spec.shape[1:]:
            raise BundleError(f"{name} takes input {list(s.input_shape)}, manifest.json says {list(spec.shape)}")
        for what, q, sp in (("input", s.input_quant, spec), ("output", s.output_quant, self.artifact.output)):
            if (q is None) != (sp.scale is None):
                raise BundleError(f"{name}: the {what} quantisation does not match manifest.json")
            if q is not None and (abs(q[0] - sp.scale) > _QUANT_RTOL * sp.scale or q[1] != sp.zero_point):
                raise BundleError(f"{name}: {what} quantisation {q} does not match manifest.json "
                                  f"({sp.scale}, {sp.zero_point})")

    # ---- the pipeline
    def images(self, images: Any) -> np.ndarray:
        """Images/paths -> the checked uint8 (N, H, W, 3) batch the model will see."""
        pre = self.bundle.preprocess
        return to_batch(images, pre.height, pre.width, resize=self.resize)

    def preprocess(self, images: Any) -> np.ndarray:
        """uint8 RGB images (HWC, NHWC, paths) -> this artifact's input tensor (a batch)."""
        x = self.bundle.preprocess.normalize(self.images(images), self.artifact.input.layout)
        q = self._session.input_quant
        if q is not None:
            return quantize(x, q[0], q[1], self._session.input_dtype)
        return x

    def run(self, x: np.ndarray) -> np.ndarray:
        """ONE interpreter invoke on an already-preprocessed input; the raw output (int8 for
        tflite-int8, float32 logits otherwise). Checks shape/dtype/finiteness, nothing else."""
        return self.bind(x)()

    def bind(self, x: np.ndarray) -> Callable[[], np.ndarray]:
        """Check `x` once and return a no-argument callable doing exactly one invoke on it.
        For timing loops: the checks of run() cost a few microseconds, which is noise on a real
        model but not on a tiny one, so a benchmark calls the bound function instead."""
        if not isinstance(x, np.ndarray):
            raise InputError(f"run() takes a numpy array from preprocess(), got {type(x).__name__}")
        if x.dtype != self._session.input_dtype:
            raise InputError(f"run() needs {self._session.input_dtype} input (from preprocess()), got {x.dtype}")
        want = self._session.input_shape
        if x.ndim != len(want) or x.shape[1:] != want[1:]:
            raise InputError(f"run() needs input shaped {list(want)}, got {list(x.shape)}")
        if self.fixed_batch is not None and x.shape[0] != self.fixed_batch:
            raise InputError(f"{self.artifact.path.name} runs a batch of exactly {self.fixed_batch} per invoke, "
                             f"got {x.shape[0]}; predict() loops over larger batches")
        if x.shape[0] == 0:
            raise InputError("run() got an empty batch")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            raise InputError("run() input contains NaN or Inf")
        x = np.ascontiguousarray(x)
        session_run = self._session.run
        return lambda: session_run(x)

    def dequantize(self, raw: np.ndarray) -> np.ndarray:
        """Raw output -> float32 logits."""
        q = self._session.output_quant
        if q is None:
            return raw.astype(np.float32, copy=False)
        return dequantize(raw, q[0], q[1])

    def logits(self, images: Any, batch_size: Optional[int] = None) -> np.ndarray:
        """Images -> float32 logits (N, classes), in chunks of the model's fixed batch (TFLite)
        or `batch_size` (default 32) for models that take any batch."""
        x = self.preprocess(images)
        step = self.fixed_batch or max(1, int(batch_size or 32))
        if self.fixed_batch is not None and len(x) % step:
            raise InputError(f"{len(x)} images do not split into batches of {step}")
        chunks = [self.dequantize(self.run(x[i:i + step])) for i in range(0, len(x), step)]
        return np.concatenate(chunks) if len(chunks) > 1 else chunks[0]

    def predict(self, images: Any, batch_size: Optional[int] = None) -> np.ndarray:
        """uint8 RGB image (H, W, 3), batch (N, H, W, 3), path or list of paths -> float32
        probabilities (N, classes). Safe to call from many threads."""
        return softmax(self.logits(images, batch_size))

    def classify(self, image: Any) -> Tuple[str, float]:
        """One image (array, .png/.jpg/.npy path) -> (class name, probability)."""
        probs = self.predict(image)
        if len(probs) != 1:
            raise InputError(f"classify() takes one image, got {len(probs)}; use predict() for batches")
        k = int(np.argmax(probs[0]))
        return self.classes[k], float(probs[0, k])

    def top(self, probs: np.ndarray, k: int = 3) -> List[List[Tuple[str, float]]]:
        """The k most likely (class, probability) pairs of each row of `probs`."""
        k = max(1, min(k, probs.shape[1]))
        order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(row[j])) for j in idx] for row, idx in zip(probs, order)]


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype: Any) -> np.ndarray:
    """q = clip(round_half_even(x / scale) + zero_point) in the integer dtype's range."""
    info = np.iinfo(dtype)
    q = np.rint(x / np.float32(scale)) + zero_point  # np.rint rounds half to even
    return np.ascontiguousarray(np.clip(q, info.min, info.max), dtype=dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((q.astype(np.float32) - np.float32(zero_point)) * np.float32(scale)).astype(np.float32)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def load(path: Any, format: str = "auto", threads: Optional[int] = None, backend: Optional[str] = None,
         resize: bool = False) -> Model:
    """Load a bundle folder (dist/NAME) for inference.

    format: "auto" (tflite-int8 > tflite > onnx-int8 > onnx, the first the bundle has and an
        installed backend runs) or one of those names.
    threads: interpreter threads (TFLite num_threads / ORT intra_op_num_threads); None = all cores.
    backend: "ai-edge-litert" | "tflite-runtime" | "onnxruntime"; None = the first installed
        (in that order) that runs the format.
    resize: resize images of another size with Pillow instead of refusing them.
    The artifact's sha256 is checked before the interpreter sees it.
    """
    if backend not in (None, "auto") and backend not in BACKENDS:
        raise BundleError(f"unknown backend {backend!r}; backends are {', '.join(BACKENDS)}")
    started = time.perf_counter()
    bundle = read_bundle(path)
    if format in (None, "auto"):
        format = pick_format(bundle, backend)
    artifact = bundle.artifact(format)
    data = read_checked(artifact.path, artifact.sha256, artifact.size)
    checked = time.perf_counter()
    chosen = choose_backend(format, backend)  # imports the interpreter's module
    imported = time.perf_counter()
    model = Model(bundle, artifact, open_session(chosen, data, threads, artifact.path.name), resize=bool(resize))
    model.load_seconds = {"bundle": checked - started, "backend_import": imported - checked,
                          "interpreter": time.perf_counter() - imported}
    return model


def file_specs(path: Any, format: str, backend: Optional[str] = None) -> Tuple[TensorSpec, TensorSpec]:
    """The input and output of a model file, as the interpreter that runs it reports them, in the
    manifest's terms (export writes a bundle's artifact entries from this)."""
    path = Path(path)
    layout = "NCHW" if format_kind(format) == "onnx" else "NHWC"
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror or e}") from None
    s = open_session(choose_backend(format, backend), data, 1, path.name)
    in_scale, in_zp = s.input_quant or (None, None)
    out_scale, out_zp = s.output_quant or (None, None)
    inp = TensorSpec(name=s.input_name, shape=s.input_shape, dtype=s.input_dtype.name, layout=layout,
                     scale=in_scale, zero_point=in_zp)
    out = TensorSpec(name=s.output_name, shape=s.output_shape, dtype=s.output_dtype.name, kind="logits",
                     scale=out_scale, zero_point=out_zp)
    return inp, out
