"""The interpreters: LiteRT (ai-edge-litert), the older tflite-runtime, and ONNX Runtime.

A backend is imported only when a model is loaded with it, so `import runtime` stays light. Each
session wraps one interpreter behind the same small surface: `run(x)` = one invoke on an
already-preprocessed input, returning the raw output.

Threads. TFLite interpreters are not thread-safe (set_tensor/invoke/get_tensor share the
interpreter's buffers), so a TFLiteSession holds one interpreter and a lock: concurrent callers
are serialised and each gets its own result; `threads` still parallelises inside one invoke.
One interpreter (not one per thread) keeps memory flat on small boards. ONNX Runtime's
`InferenceSession.run` is thread-safe, so OnnxSession runs concurrently without a lock.

Batches. The exported TFLite models usually have a fixed batch of 1 (their reshape before the
classifier is baked for it), so resizing the input tensor would be unsafe: a TFLiteSession
resizes only when the model's shape signature says the batch is dynamic (-1); otherwise
`fixed_batch` is set and `Model.predict` loops over the images. ONNX models take any batch.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import struct
import threading
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from .errors import BundleError, InputError

# Preference order when the user does not name one.
BACKENDS = ("ai-edge-litert", "tflite-runtime", "onnxruntime")
_MODULE = {"ai-edge-litert": "ai_edge_litert", "tflite-runtime": "tflite_runtime", "onnxruntime": "onnxruntime"}
_KIND = {"ai-edge-litert": "tflite", "tflite-runtime": "tflite", "onnxruntime": "onnx"}
# What to install, with the pinned version runtime/pyproject.toml's extra holds (from a checkout).
_PIP = {"ai-edge-litert": 'pip install ai-edge-litert   (pinned, from an edgeslim checkout: pip install "./runtime[litert]")',
        "tflite-runtime": 'pip install "numpy<2" tflite-runtime   (pinned, from an edgeslim checkout: '
                          'pip install "./runtime[tflite-runtime]")',
        "onnxruntime": 'pip install onnxruntime   (pinned, from an edgeslim checkout: pip install "./runtime[onnx]")'}


def format_kind(fmt: str) -> str:
    """'tflite' or 'onnx': which family of interpreter a bundle format needs."""
    return "tflite" if fmt.startswith("tflite") else "onnx"


def is_installed(backend: str) -> bool:
    # find_spec looks the package up without importing it (and without its native libraries).
    try:
        return importlib.util.find_spec(_MODULE[backend]) is not None
    except (ImportError, ValueError):
        return False


def installed_backends() -> List[str]:
    return [b for b in BACKENDS if is_installed(b)]


def backends_for(fmt: str) -> List[str]:
    """The backends that can run a format, preferred first (installed or not)."""
    return [b for b in BACKENDS if _KIND[b] == format_kind(fmt)]


def install_hint(fmt: str) -> str:
    """The pip command that makes `fmt` runnable."""
    return _PIP[backends_for(fmt)[0]]


def import_backend(backend: str) -> Any:
    """The backend's module that holds the interpreter class. A package that is present but does
    not import (the usual case: tflite-runtime 2.14 built for numpy 1.x under numpy 2) is a
    BundleError saying so, not a traceback."""
    name = _MODULE[backend] + ("" if backend == "onnxruntime" else ".interpreter")
    if backend == "tflite-runtime":
        _check_tflite_runtime_numpy()
    try:
        return importlib.import_module(name)
    except Exception as e:  # ImportError, or AttributeError/RuntimeError from a numpy ABI mismatch
        raise BundleError(f"{backend} is installed but does not import ({_one_line(e)}); "
                          f"reinstall it: {_PIP[backend]}") from None


def _check_tflite_runtime_numpy() -> None:
    """tflite-runtime (last release 2.14) is compiled against numpy 1.x: under numpy 2 it imports
    with a warning and then fails inside the interpreter. Say so before that happens."""
    from importlib import metadata

    try:
        version = metadata.version("tflite-runtime")
    except metadata.PackageNotFoundError:
        return
    major_minor = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if major_minor <= (2, 14) and int(np.__version__.split(".")[0]) >= 2:
        raise BundleError(f"tflite-runtime {version} needs numpy<2 but numpy {np.__version__} is installed: "
                          'pip install "numpy<2" (or use ai-edge-litert: pip install ai-edge-litert)')


def choose_backend(fmt: str, backend: Optional[str] = None) -> str:
    """The backend that will run `fmt`: the named one (checked) or the first installed one that
    imports (a broken install falls through to the next)."""
    if backend not in (None, "auto"):
        if backend not in BACKENDS:
            raise BundleError(f"unknown backend {backend!r}; backends are {', '.join(BACKENDS)}")
        if _KIND[backend] != format_kind(fmt):
            raise BundleError(f"backend {backend} cannot run {fmt} models; use one of "
                              f"{', '.join(backends_for(fmt))}")
        if not is_installed(backend):
            raise BundleError(f"backend {backend} is not installed: {_PIP[backend]}")
        import_backend(backend)
        return backend
    broken = None
    for b in backends_for(fmt):
        if is_installed(b):
            try:
                import_backend(b)
                return b
            except BundleError as e:
                broken = broken or e
    if broken is not None:
        raise broken
    raise BundleError(f"no interpreter for {fmt} models is installed: {install_hint(fmt)}")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")


class Session:
    """What a Model needs from an interpreter."""

    backend: str
    backend_version: str
    input_name: str
    input_dtype: np.dtype
    input_shape: Tuple[int, ...]  # the model's input shape; -1 where the batch is dynamic
    fixed_batch: Optional[int]  # None = any batch in one invoke
    input_quant: Optional[Tuple[float, int]]  # (scale, zero_point) of an integer input
    output_name: str
    output_dtype: np.dtype
    output_shape: Tuple[int, ...]
    output_quant: Optional[Tuple[float, int]]

    def run(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def invoker(self, x: np.ndarray) -> Callable[[], None]:
        """A no-argument callable doing one invoke on `x`, which is placed once: no copy in or
        out per call. For timing single layers (device_bench profile), where copying a wide
        activation tensor would cost as much as the layer."""
        raise NotImplementedError


def _quant(details: dict) -> Optional[Tuple[float, int]]:
    """(scale, zero_point) of a per-tensor quantised TFLite tensor, None for float tensors."""
    if np.dtype(details["dtype"]) == np.float32:
        return None
    qp = details.get("quantization_parameters") or {}
    scales, zps = np.asarray(qp.get("scales", [])), np.asarray(qp.get("zero_points", []))
    if scales.size != 1 or zps.size != 1:
        scale, zp = details.get("quantization", (0.0, 0))
        if not scale:
            raise BundleError("the model's integer input/output has no per-tensor quantisation")
        return float(scale), int(zp)
    return float(scales[0]), int(zps[0])


def _signature(details: dict) -> Tuple[int, ...]:
    """A TFLite tensor's shape with -1 where it is dynamic (the shape signature, when there is one)."""
    signature = details.get("shape_signature")
    signature = details["shape"] if signature is None or len(signature) == 0 else signature
    return tuple(int(s) for s in signature)


def check_tflite_structure(data: bytes) -> None:
    """Bounds-check the parts of a TFLite flatbuffer the interpreter dereferences first (root
    table, subgraphs, operator codes, weight buffers). tflite-runtime 2.14 does not verify the
    flatbuffer and segfaults on a truncated file; this turns that into a BundleError.
    Raises ValueError with what is out of bounds. Cost: a few struct reads per table (tensors,
    operators, buffers), never per weight byte, so ~1 ms for a model with hundreds of tensors."""
    n = len(data)

    def u32(pos: int) -> int:
        if pos < 0 or pos + 4 > n:
            raise ValueError(f"offset {pos} is past the end ({n} bytes)")
        return struct.unpack_from("<I", data, pos)[0]

    def table(pos: int) -> Tuple[int, List[int]]:
        """(table position, field offsets) of the table at pos."""
        vtable = pos - struct.unpack_from("<i", data, pos)[0] if 0 <= pos <= n - 4 else -1
        if vtable < 0 or vtable + 4 > n:
            raise ValueError(f"table at {pos} has no valid vtable")
        vsize = struct.unpack_from("<H", data, vtable)[0]
        if vsize < 4 or vtable + vsize > n:
            raise ValueError(f"vtable at {vtable} is cut off")
        return pos, [struct.unpack_from("<H", data, vtable + i)[0] for i in range(4, vsize - 1, 2)]

    def field(tab: Tuple[int, List[int]], i: int) -> Optional[int]:
        pos, fields = tab
        return pos + fields[i] if i < len(fields) and fields[i] else None

    def vector(tab: Tuple[int, List[int]], i: int, elem: int) -> range:
        """Element positions of vector field i (empty if absent), after bounds checks. A range,
        not a list: a weight buffer's vector has one element per byte."""
        at = field(tab, i)
        if at is None:
            return range(0)
        start = at + u32(at)
        count = u32(start)
        if start + 4 + count * elem > n:
            raise ValueError(f"vector at {start} ({count} x {elem} bytes) runs past the end")
        return range(start + 4, start + 4 + count * elem, elem)

    def tables(tab: Tuple[int, List[int]], i: int) -> List[Tuple[int, List[int]]]:
        return [table(p + u32(p)) for p in vector(tab, i, 4)]

    if n < 16 or data[4:8] != b"TFL3":
        raise ValueError("no TFL3 identifier")
    model = table(u32(0))
    tables(model, 1)  # operator codes
    for sub in tables(model, 2):  # subgraphs: tensors, inputs, outputs, operators
        tables(sub, 0)
        vector(sub, 1, 4)
        vector(sub, 2, 4)
        tables(sub, 3)
    for buf in tables(model, 4):  # buffers: inline data, or (offset, size) into the file
        vector(buf, 0, 1)
        off_at, size_at = field(buf, 1), field(buf, 2)
        if off_at is not None and size_at is not None and off_at + 8 <= n and size_at + 8 <= n:
            offset, size = struct.unpack_from("<Q", data, off_at)[0], struct.unpack_from("<Q", data, size_at)[0]
            if size and offset + size > n:
                raise ValueError(f"weight buffer at {offset} (+{size} bytes) is past the end")


def tflite_interpreter(backend: str, model_bytes: bytes, threads: int, name: str, delegates: bool = True) -> Any:
    """A TFLite interpreter with its tensors allocated, after the structure check: the one place
    an interpreter is made (sessions here; export's graph checks too). delegates=False uses the
    builtin kernels only, so the operator list is the graph's own, not one XNNPACK DELEGATE node."""
    try:
        check_tflite_structure(model_bytes)
    except (ValueError, struct.error) as e:
        raise BundleError(f"{name} is not a model {backend} can load: truncated or corrupt TFLite file ({e})") from None
    module = import_backend(backend)
    kwargs = {} if delegates else {
        "experimental_op_resolver_type": module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES}
    try:
        interpreter = module.Interpreter(model_content=model_bytes, num_threads=threads, **kwargs)
        interpreter.allocate_tensors()
    except Exception as e:  # ValueError for a bad model; SystemError etc. from a broken install
        raise BundleError(f"{name} is not a model {backend} can load: {_one_line(e)}") from None
    return interpreter


class TFLiteSession(Session):
    def __init__(self, backend: str, model_bytes: bytes, threads: int, name: str):
        self._interp = tflite_interpreter(backend, model_bytes, threads, name)
        self.backend = backend
        self.backend_version = str(getattr(importlib.import_module(_MODULE[backend]), "__version__", "?"))
        inputs, outputs = self._interp.get_input_details(), self._interp.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(f"{name} has {len(inputs)} inputs / {len(outputs)} outputs; "
                              "expected one image input and one logits output")
        self._in, self._out = inputs[0], outputs[0]
        self.input_name, self.output_name = str(self._in["name"]), str(self._out["name"])
        self.input_dtype, self.output_dtype = np.dtype(self._in["dtype"]), np.dtype(self._out["dtype"])
        self.input_shape, self.output_shape = _signature(self._in), _signature(self._out)
        self.fixed_batch = None if self.input_shape[0] == -1 else self.input_shape[0]
        self._batch = int(self._in["shape"][0])  # the batch the tensors are allocated for now
        self.input_quant, self.output_quant = _quant(self._in), _quant(self._out)
        self._lock = threading.Lock()

    def run(self, x: np.ndarray) -> np.ndarray:
        with self._lock:
            try:
                if x.shape[0] != self._batch:  # only reachable for a dynamic batch (checked by Model)
                    self._interp.resize_tensor_input(self._in["index"], list(x.shape), strict=True)
                    self._interp.allocate_tensors()
                    self._batch = x.shape[0]
                self._interp.set_tensor(self._in["index"], x)
                self._interp.invoke()
                return self._interp.get_tensor(self._out["index"])  # a copy, safe after unlock
            except (ValueError, RuntimeError) as e:
                raise InputError(f"{self.backend} could not run the input {x.dtype}{list(x.shape)}: "
                                 f"{_one_line(e)}") from None

    def invoker(self, x: np.ndarray) -> Callable[[], None]:
        self.run(x)  # checks x and leaves it in the input tensor
        return self._interp.invoke


_ORT_DTYPES = {"tensor(float)": np.dtype(np.float32), "tensor(int8)": np.dtype(np.int8),
               "tensor(uint8)": np.dtype(np.uint8)}


class OnnxSession(Session):
    def __init__(self, model_bytes: bytes, threads: int, name: str):
        ort = import_backend("onnxruntime")
        self.backend, self.backend_version = "onnxruntime", str(ort.__version__)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: no optimizer chatter on the board's console
        try:
            self._sess = ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception classes (Fail, InvalidGraph, ...)
            raise BundleError(f"{name} is not a model onnxruntime can load: {_one_line(e)}") from None
        inputs, outputs = self._sess.get_inputs(), self._sess.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise BundleError(f"{name} has {len(inputs)} inputs / {len(outputs)} outputs; "
                              "expected one image input and one logits output")
        for what, node in (("input", inputs[0]), ("output", outputs[0])):
            if node.type not in _ORT_DTYPES:
                raise BundleError(f"{name}: {what} type {node.type} is not supported")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.input_dtype, self.output_dtype = _ORT_DTYPES[inputs[0].type], _ORT_DTYPES[outputs[0].type]
        self.input_shape, self.output_shape = _ort_shape(inputs[0]), _ort_shape(outputs[0])
        self.fixed_batch = None if self.input_shape[0] == -1 else self.input_shape[0]
        self.input_quant = self.output_quant = None  # ONNX QDQ models take and return float32

    def run(self, x: np.ndarray) -> np.ndarray:
        try:
            return self._sess.run([self.output_name], {self.input_name: x})[0]
        except Exception as e:  # onnxruntime's own exception types
            raise InputError(f"onnxruntime could not run the input {x.dtype}{list(x.shape)}: {_one_line(e)}") from None

    def invoker(self, x: np.ndarray) -> Callable[[], None]:
        ort = import_backend("onnxruntime")
        y = self.run(x)
        x = np.ascontiguousarray(x)
        binding = self._sess.io_binding()
        binding.bind_cpu_input(self._in_name, x)
        out = ort.OrtValue.ortvalue_from_numpy(np.empty_like(y))
        binding.bind_ortvalue_output(self._out_name, out)
        sess, held = self._sess, (x, out)  # the binding points into x and out: keep them alive

        def invoke(held=held) -> None:
            sess.run_with_iobinding(binding)
        return invoke


def _ort_shape(node: Any) -> Tuple[int, ...]:
    """An ONNX Runtime input/output shape with -1 for symbolic ('batch') or unknown dimensions."""
    return tuple(s if isinstance(s, int) and s > 0 else -1 for s in node.shape)


def open_session(backend: str, model_bytes: bytes, threads: Optional[int], name: str) -> Session:
    """An interpreter for `model_bytes` (the file called `name`, for messages)."""
    n = default_threads() if threads is None else threads
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"threads must be a positive integer, got {threads!r}")
    if _KIND[backend] == "tflite":
        return TFLiteSession(backend, model_bytes, n, name)
    return OnnxSession(model_bytes, n, name)


def open_model(path: Any, fmt: str, threads: Optional[int] = None, backend: Optional[str] = None) -> Session:
    """One model file outside a bundle, in the interpreter `load` would give it (latency probes:
    device_bench profile times single layers this way). No manifest, so no input checks."""
    from pathlib import Path
    from types import SimpleNamespace

    path = Path(path)
    chosen = choose_backend(fmt, backend)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise BundleError(f"cannot read {path}: {e.strerror}") from None
    return open_session(chosen, data, threads, SimpleNamespace(path=path))


def default_threads() -> int:
    """All cores this process may use (the board is usually dedicated to the model)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def describe(backend: str) -> Tuple[bool, Optional[str]]:
    """(installed, version), from the package metadata: no native code is loaded."""
    if not is_installed(backend):
        return False, None
    from importlib import metadata

    try:
        return True, metadata.version(backend)
    except metadata.PackageNotFoundError:  # importable but not pip-installed (e.g. on PYTHONPATH)
        return True, None
