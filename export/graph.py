"""Read an artifact's graph: its operators, tensor dtypes and conv widths.

TFLite graphs are read through the runtime's interpreter factory with the builtin kernels only
(no XNNPACK), so the operator list is the graph's own rather than one DELEGATE node.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.backends import tflite_interpreter


def _tflite(file: Path):
    return tflite_interpreter("ai-edge-litert", file.read_bytes(), 1, file.name, delegates=False)


def tflite_ops(file: Path) -> list[str]:
    """Operator names in execution order."""
    return [op["op_name"] for op in _tflite(file)._get_ops_details()]


def tflite_tensor_dtypes(file: Path) -> set[str]:
    """dtypes of every tensor in the graph (a full-integer model has only int8 and int32 biases/shapes)."""
    return {np.dtype(t["dtype"]).name for t in _tflite(file).get_tensor_details()}


def tflite_conv_out_channels(file: Path) -> list[int]:
    """Output channels of every CONV_2D / DEPTHWISE_CONV_2D, read from the filter tensors."""
    it = _tflite(file)
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
