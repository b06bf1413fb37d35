"""Run an exported artifact with its real runtime and read its graph.

A runner takes uint8 NHWC RGB images and returns float32 logits, doing exactly what a board
would do: normalise, transpose for NCHW models, quantize the input of an int8 model and
dequantize its output.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.run import Preprocess

BATCH = 250


@dataclass
class TensorInfo:
    name: str
    shape: list[int]  # -1 for a dynamic dimension
    dtype: str
    scale: float | None = None  # set for a quantized tensor
    zero_point: int | None = None

    def as_manifest(self, layout: str | None, kind: str | None = None) -> dict:
        d = {"name": self.name, "shape": self.shape}
        if layout:
            d["layout"] = layout
        d["dtype"] = self.dtype
        if kind:
            d["kind"] = kind
        if self.scale is not None:
            d["quantization"] = {"scale": self.scale, "zero_point": self.zero_point}
        return d


class OnnxRunner:
    layout = "NCHW"

    @staticmethod
    def conv_out_channels(file: Path) -> list[int]:
        return onnx_conv_out_channels(file)

    def __init__(self, file: Path, preprocess: Preprocess):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.session = ort.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        self.preprocess = preprocess
        i, o = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input = TensorInfo(i.name, [d if isinstance(d, int) else -1 for d in i.shape], "float32")
        self.output = TensorInfo(o.name, [d if isinstance(d, int) else -1 for d in o.shape], "float32")

    def __call__(self, x_uint8: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(x_uint8), BATCH):
            x = self.preprocess(x_uint8[i:i + BATCH]).transpose(0, 3, 1, 2)
            out.append(self.session.run([self.output.name], {self.input.name: np.ascontiguousarray(x)})[0])
        return np.concatenate(out).astype(np.float32)


class TfliteRunner:
    """Runs a batch-1 TFLite model. Batches of BATCH images are used when the graph resizes to them and
    gives the same logits as batch 1 (a RESHAPE with a constant batch of 1 does not); else one by one."""
    layout = "NHWC"

    @staticmethod
    def conv_out_channels(file: Path) -> list[int]:
        return tflite_conv_out_channels(file)

    def __init__(self, file: Path, preprocess: Preprocess):
        self.file, self.preprocess = file, preprocess
        self.single = self._interpreter()
        self.input = tensor_info(self.single.get_input_details()[0])
        self.output = tensor_info(self.single.get_output_details()[0])
        self.batched = None  # an interpreter resized to BATCH, once proven to agree with batch 1
        self.checked = False

    def _interpreter(self, batch: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(self.file))
        if batch is not None:
            shape = [batch, *it.get_input_details()[0]["shape"][1:]]
            it.resize_tensor_input(it.get_input_details()[0]["index"], shape, strict=False)
        it.allocate_tensors()
        return it

    def _quantize(self, x_uint8: np.ndarray) -> np.ndarray:
        x = self.preprocess(x_uint8)
        if self.input.scale is not None:  # int8 input: quantize as the board will
            x = np.clip(np.round(x / self.input.scale) + self.input.zero_point, -128, 127).astype(np.int8)
        return x

    @staticmethod
    def _invoke(it, x: np.ndarray) -> np.ndarray:
        it.set_tensor(it.get_input_details()[0]["index"], x)
        it.invoke()
        return it.get_tensor(it.get_output_details()[0]["index"]).copy()

    def _dequantize(self, y: np.ndarray) -> np.ndarray:
        if self.output.scale is not None:
            y = (y.astype(np.float32) - self.output.zero_point) * self.output.scale
        return y.astype(np.float32)

    def _try_batched(self, x: np.ndarray) -> None:
        self.checked = True
        try:
            it = self._interpreter(BATCH)
            y = self._invoke(it, x)
        except (RuntimeError, ValueError):
            return
        ones = np.concatenate([self._invoke(self.single, x[i:i + 1]) for i in range(min(4, len(x)))])
        if y.shape[0] == BATCH and np.array_equal(y[:len(ones)], ones):
            self.batched = it

    def __call__(self, x_uint8: np.ndarray) -> np.ndarray:
        out = []
        for i in range(0, len(x_uint8), BATCH):
            x = self._quantize(x_uint8[i:i + BATCH])
            if len(x) == BATCH and not self.checked:
                self._try_batched(x)
            if len(x) == BATCH and self.batched is not None:
                out.append(self._invoke(self.batched, x))
            else:
                out += [self._invoke(self.single, x[j:j + 1]) for j in range(len(x))]
        return self._dequantize(np.concatenate(out))


def tensor_info(detail: dict) -> TensorInfo:
    scale, zero_point = detail["quantization"]
    dtype = np.dtype(detail["dtype"]).name
    shape = [int(d) for d in detail.get("shape_signature", detail["shape"])]
    if dtype in ("int8", "uint8", "int16") and scale != 0.0:
        return TensorInfo(detail["name"], shape, dtype, float(scale), int(zero_point))
    return TensorInfo(detail["name"], shape, dtype)


# ---------------------------------------------------------------- graph inspection

def tflite_ops(file: Path) -> list[str]:
    """Operator names in execution order, without XNNPACK folding them into one DELEGATE node."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(file),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return [op["op_name"] for op in it._get_ops_details()]


def tflite_tensor_dtypes(file: Path) -> set[str]:
    """dtypes of every tensor in the graph (a full-integer model has only int8 and int32 biases/shapes)."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(file),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return {np.dtype(t["dtype"]).name for t in it.get_tensor_details()}


def tflite_conv_out_channels(file: Path) -> list[int]:
    """Output channels of every CONV_2D / DEPTHWISE_CONV_2D, read from the filter tensors."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(file),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    shapes = {t["index"]: [int(s) for s in t["shape"]] for t in it.get_tensor_details()}
    channels = []
    for op in it._get_ops_details():
        if op["op_name"] == "CONV_2D":  # filter OHWI
            channels.append(shapes[int(op["inputs"][1])][0])
        elif op["op_name"] == "DEPTHWISE_CONV_2D":  # filter 1HW(C*multiplier)
            channels.append(shapes[int(op["inputs"][1])][3])
    return channels


def onnx_conv_out_channels(file: Path) -> list[int]:
    """Output channels of every Conv, from its weight (fp32 initializer or behind a DequantizeLinear)."""
    import onnx

    model = onnx.load(str(file))
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    channels = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w = node.input[1]
        while w not in inits and w in producer:  # QDQ: Conv <- DequantizeLinear <- int8 initializer
            w = producer[w].input[0]
        channels.append(inits[w][0])
    return channels
