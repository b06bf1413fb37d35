"""The formats, as one table. Each format is a build function (slim model -> one file) and a
reader of that file's conv widths; running it is the runtime's job (export/measure.py)."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from export import measure
from export.errors import ExportError
from export.graph import onnx_conv_out_channels, tflite_conv_out_channels, tflite_ops, tflite_tensor_dtypes
from export.layout import flatten_channels_last
from export.run import Run

ONNX_OPSET = 18
INT8_MAX_CALIB_DROP = 0.01  # try another ONNX calibration method when MinMax loses more than this
CALIB_MEMORY = 1 << 30  # bytes of activations the onnxruntime calibrators may hold


@dataclass
class Context:
    """What every build function gets: the run, the loaded program, calibration images, a scratch dir."""
    run: Run
    program: object  # torch.export.ExportedProgram
    calib_x: np.ndarray  # uint8 NHWC, the --calib training images
    calib_y: np.ndarray
    scratch: Path
    max_batch: int = 1 << 30  # the largest batch the program accepts
    # TFLite builds refuse a TRANSPOSE in the graph. device_bench's latency probes turn this off:
    # their batches transpose the shared input ahead of the channel slices they are cut at.
    check_layout: bool = True
    _fp32_onnx: Path | None = field(default=None, repr=False)

    def examples(self, n: int) -> np.ndarray:
        """n real images (NHWC float32) to trace with: calibration images, else test images."""
        source = self.calib_x if len(self.calib_x) else self.run.test.x
        return self.run.preprocess.normalize(source[:n])

    def sample_nchw(self, n: int = 2):
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.examples(n).transpose(0, 3, 1, 2)))

    def calib_top1(self, fmt: str, file: Path) -> float:
        """Top-1 of a candidate model file on the calibration images, run by the runtime."""
        return measure.top1(measure.load_file(fmt, file, self.run), self.calib_x, self.calib_y)

    def calib_batches(self, layout: str, batch: int = 32, limit: int | None = None):
        images, batch = self.calib_x[:limit], min(batch, self.max_batch)
        for i in range(0, len(images), batch):
            yield self.run.preprocess.normalize(images[i:i + batch], layout)

    def fp32_onnx(self) -> Path:
        """The fp32 ONNX model, built once and shared by `onnx` and `onnx-int8`."""
        if self._fp32_onnx is None:
            self._fp32_onnx = own_folder(self.scratch / "fp32") / "model.onnx"
            build_onnx_fp32(self, self._fp32_onnx)
        return self._fp32_onnx


@dataclass(frozen=True)
class Format:
    file: str
    build: Callable[[Context, Path], dict]  # writes the file, returns extra manifest fields
    conv_channels: Callable[[Path], list[int]]  # output channels of every conv, read from the file
    int8: bool


def own_folder(path: Path) -> Path:
    """A folder for one model file that the runtime loads on its own (export/measure.py)."""
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- ONNX

def build_onnx_fp32(ctx: Context, out: Path) -> dict:
    import onnx
    import onnxsim
    import torch

    raw = ctx.scratch / "raw.onnx"
    # The program already carries the dynamic batch dimension; the exporter keeps it.
    program = torch.onnx.export(ctx.program, (ctx.sample_nchw(),), dynamo=True, opset_version=ONNX_OPSET,
                                input_names=["input"], output_names=["logits"], external_data=False,
                                verbose=False)
    program.save(str(raw), external_data=False)
    model, ok = onnxsim.simplify(onnx.load(str(raw)))
    if not ok:
        raise ExportError("onnxsim could not validate the simplified ONNX model")
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out))
    return {"opset": ONNX_OPSET}


def build_onnx(ctx: Context, out: Path) -> dict:
    shutil.copyfile(ctx.fp32_onnx(), out)
    return {"opset": ONNX_OPSET}


class CalibrationReader:
    """onnxruntime CalibrationDataReader over the calibration images (NCHW float32)."""

    def __init__(self, ctx: Context, input_name: str, images: int):
        self.ctx, self.input_name, self.images = ctx, input_name, images
        self.rewind()

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch}

    def rewind(self):
        self.batches = self.ctx.calib_batches("NCHW", limit=self.images)


def build_onnx_int8(ctx: Context, out: Path) -> dict:
    """Static QDQ int8, per-channel weights. MinMax first; if it loses more than 1 pp top-1 on the
    calibration images, also try Percentile and Entropy and keep the best (judged on calibration
    images only: the test set stays untouched for the reported number)."""
    from onnxruntime.quantization import CalibrationMethod

    prepared = prepare_for_quantization(ctx.fp32_onnx(), ctx.scratch)
    fp32_top1 = ctx.calib_top1("onnx", ctx.fp32_onnx())
    # onnxruntime's calibrators keep every activation of every calibration image in memory (its
    # CalibMaxIntermediateOutputs option drops data in 1.32), so use as many images as fit in CALIB_MEMORY.
    n = max(32, min(len(ctx.calib_x), CALIB_MEMORY // activation_bytes_per_image(prepared)))
    tried: dict[str, float] = {}
    best = None
    for method in (CalibrationMethod.MinMax, CalibrationMethod.Percentile, CalibrationMethod.Entropy):
        candidate = own_folder(ctx.scratch / f"int8_{method.name}") / "model_int8.onnx"
        write_onnx_qdq(prepared, candidate, CalibrationReader(ctx, "input", n), method)
        tried[method.name] = ctx.calib_top1("onnx-int8", candidate)
        if best is None or tried[method.name] > tried[best.name]:
            best = method
        if fp32_top1 - tried[method.name] <= INT8_MAX_CALIB_DROP:
            break
    shutil.copyfile(ctx.scratch / f"int8_{best.name}" / "model_int8.onnx", out)
    return {"calibration": {"images": min(n, len(ctx.calib_x)), "method": best.name.lower(),
                            "fp32_calib_top1": fp32_top1, "calib_top1": {k.lower(): v for k, v in tried.items()}}}


def prepare_for_quantization(fp32: Path, scratch: Path) -> Path:
    """onnxruntime's pre-processing (shape inference, folding) before quantize_static."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = scratch / f"{fp32.stem}_pre.onnx"
    quant_pre_process(str(fp32), str(prepared))
    return prepared


def write_onnx_qdq(prepared: Path, out: Path, reader, method) -> None:
    """The int8 ONNX recipe (also used for device_bench's latency probes): static QDQ, int8
    activations, per-channel int8 weights, calibrated with `method` on `reader`'s batches."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    extra = {"CalibMovingAverage": False}
    if method == CalibrationMethod.Percentile:
        extra["CalibPercentile"] = 99.999
    quantize_static(str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                    extra_options=extra)


def activation_bytes_per_image(model_file: Path) -> int:
    """float32 bytes of all intermediate tensors for one image (shapes from quant_pre_process)."""
    import onnx

    graph = onnx.load(str(model_file)).graph
    total = 0
    for info in [*graph.value_info, *graph.output]:
        dims = [d.dim_value for d in info.type.tensor_type.shape.dim[1:]]
        total += 4 * int(np.prod(dims)) if dims and all(dims) else 0
    return max(total, 1)


# ---------------------------------------------------------------- TFLite

def channel_last(ctx: Context):
    """The slim model behind an NHWC input. litert folds the layout change into the convolutions;
    flattens of multi-pixel feature maps are rewritten channel-last (export/layout.py) so the
    converted graph has no TRANSPOSE (checked after conversion)."""
    import litert_torch

    module = ctx.program.module()
    flatten_channels_last(module)
    # The program was exported in eval mode (BatchNorm uses running stats, no dropout); only the
    # flag says "training", and the unlifted module refuses .eval(), so clear the flag directly.
    wrapped = litert_torch.to_channel_last_io(module, args=[0])
    for m in wrapped.modules():
        m.training = False
    return wrapped


def sample_nhwc(ctx: Context, n: int = 1):
    import torch

    return torch.from_numpy(np.ascontiguousarray(ctx.examples(n)))


def build_tflite(ctx: Context, out: Path) -> dict:
    import litert_torch

    litert_torch.convert(channel_last(ctx), (sample_nhwc(ctx),)).export(str(out))
    if ctx.check_layout:
        check_no_transpose(out)
    return {}


def build_tflite_int8(ctx: Context, out: Path) -> dict:
    """PT2E static quantization (int8 per-channel weights, int8 activations) in torch, then litert
    lowers the QDQ graph to full-integer TFLite with int8 input and output."""
    import litert_torch
    import torch
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import quantize_pt2e

    # Calibrate in batches: re-export with a batch range inside the program's own.
    dynamic = None if ctx.max_batch < 2 else (({0: torch.export.Dim("batch", min=1, max=min(ctx.max_batch, 4096))},),)
    graph = torch.export.export(channel_last(ctx), (sample_nhwc(ctx, min(2, ctx.max_batch)),),
                                dynamic_shapes=dynamic).module()
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    mark_sources(graph)
    graph = quantize_pt2e.prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for x in ctx.calib_batches("NHWC"):
            graph(torch.from_numpy(x))
    graph = quantize_pt2e.convert_pt2e(graph, fold_quantize=False)
    for m in graph.modules():  # eval-mode program; see channel_last
        m.training = False
    litert_torch.convert(graph, (sample_nhwc(ctx),),
                         quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(out))
    if ctx.check_layout:
        check_no_transpose(out)
    # Every tensor, the input and output included: a float anywhere means it is not full-integer.
    # (Not file_specs: the latency profile converts multi-output probe batches with this function.)
    floats = tflite_tensor_dtypes(out) - {"int8", "int32"}
    if floats:
        raise ExportError(f"{out.name}: not full-integer (int8 input and output expected), the graph still has "
                          f"{', '.join(sorted(floats))} tensors")
    return {"calibration": {"images": len(ctx.calib_x), "method": "pt2e-histogram"}}


def mark_sources(graph) -> None:
    """Tell the PT2E annotators what each aten op came from.

    litert's quantizer finds adds, add+ReLU, pools and concatenations by the `source_fn_stack` that
    an eager-mode export records. A program loaded from model.pt2 and re-exported has lost it, so
    those ops would stay float (DEQUANTIZE -> float ADD -> QUANTIZE). Stamping the source an eager
    export would have written restores full-integer graphs.
    """
    import torch

    aten = torch.ops.aten
    sources = {aten.add.Tensor: torch.add, aten.add_.Tensor: torch.add, aten.mul.Tensor: torch.mul,
               aten.relu.default: torch.nn.ReLU, aten.relu_.default: torch.nn.ReLU,
               aten.max_pool2d.default: torch.nn.MaxPool2d, aten.cat.default: torch.cat,
               aten.adaptive_avg_pool2d.default: torch.nn.AdaptiveAvgPool2d}
    for node in graph.graph.nodes:
        if node.op == "call_function" and node.target in sources and "source_fn_stack" not in node.meta:
            node.meta["source_fn_stack"] = [(node.name, sources[node.target])]


def check_no_transpose(file: Path) -> None:
    ops = tflite_ops(file)
    if "TRANSPOSE" in ops:
        raise ExportError(f"{file.name}: the converted graph has {ops.count('TRANSPOSE')} TRANSPOSE op(s); "
                          "the NHWC model should need none")


FORMATS: dict[str, Format] = {
    "onnx": Format(file="model.onnx", build=build_onnx, conv_channels=onnx_conv_out_channels, int8=False),
    "onnx-int8": Format(file="model_int8.onnx", build=build_onnx_int8, conv_channels=onnx_conv_out_channels,
                        int8=True),
    "tflite": Format(file="model.tflite", build=build_tflite, conv_channels=tflite_conv_out_channels, int8=False),
    "tflite-int8": Format(file="model_int8.tflite", build=build_tflite_int8, conv_channels=tflite_conv_out_channels,
                          int8=True),
}
