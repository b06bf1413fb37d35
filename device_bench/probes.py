"""Host side of `device_bench profile`: which layers a model has, and the small models that time them.

    net = describe(model, example)            # groups, layers (widths as functions of kept counts), shapes
    files = build(specs, formats, cache)      # {probe id: {format: file}}, exported with export's converters

A *probe* is one layer at one (in, out) width pair, alone in a model file: a Conv2d (+ReLU, the
BatchNorm folded away as in the exported network), a Linear, an add, a pool or a global mean, on
an input of the size that layer sees in the network. Converting costs seconds per model, mostly
per op (torch.export and the litert lowering walk every node), so probes are converted in batches:
one torch module holds up to BATCH probes of the same input size as parallel branches (each reads
a channel slice of one input), is converted once per format by the same build functions `python
-m export` uses, and the result is cut into one file per probe (TFLite: the flatbuffer's subgraph
is rewritten to hold one branch; ONNX: onnx.utils.Extractor). Every probe file is kept in a cache
(~/.cache/edgeslim/latency-probes, keyed by the probe, the format and the toolchain versions), so
a second profile of the same model, or of another model with the same layer shapes, converts nothing.

Imports torch, compress and export: host only (the board gets the files, not this module).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import BenchError

PROBE_VERSION = 1  # bump when a probe's construction changes: old cache entries are then unused
BATCH = 48  # probes per conversion: more amortises better, but int8 conversion is O(ops) anyway
BATCH_BYTES = 48 << 20  # fp32 weight bytes per conversion batch (keeps converter memory in check)
SUFFIX = {"tflite": ".tflite", "tflite-int8": ".tflite", "onnx": ".onnx", "onnx-int8": ".onnx"}
GEMM = ("conv2d", "linear")


def default_cache() -> Path:
    base = os.environ.get("EDGESLIM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "edgeslim")
    return Path(base) / "latency-probes"


# --------------------------------------------------------------------------- the network


def _width(cost, li: int, side: str) -> Dict[str, Any]:
    c = cost.c_in[li] if side == "in" else cost.c_out[li]
    a = cost.a_in[li] if side == "in" else cost.a_out[li]
    return {"const": int(round(c)), "groups": {cost.names[g]: int(round(a[g])) for g in np.nonzero(a)[0]}}


def _pair(v) -> List[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(x) for x in v]


def _shape_key(spec: Dict[str, Any]) -> str:
    op, (h, w) = spec["op"], spec["in_hw"]
    k, s, p = (spec.get(x) for x in ("kernel", "stride", "padding"))

    def dims(v) -> str:
        return f"{v[0]}" if v[0] == v[1] else f"{v[0]}x{v[1]}"
    if op in ("conv2d", "depthwise"):
        name = ("dw" if op == "depthwise" else "") + f"conv{k[0]}x{k[1]} s{dims(s)} p{dims(p)}"
        if spec["dilation"] != [1, 1]:
            name += f" d{dims(spec['dilation'])}"
        return f"{name} {h}x{w}"
    if op in ("maxpool", "avgpool"):
        return f"{op}{dims(k)} s{dims(s)} p{dims(p)} {h}x{w}"
    if op == "linear":
        return "linear"
    return f"{op} {h}x{w}"


def describe(model, example, ignore: Sequence[str] = ()) -> Dict[str, Any]:
    """The prunable structure of `model` for a latency table: `groups` (compress.prune.find_groups),
    `layers` (every Conv2d/Linear, and every add / pool / global mean whose width pruning changes,
    in execution order, with `in`/`out` widths as {const, groups: {group: channels per kept}}, as
    compress.prune.ResourceModel has them) and `shapes` (the distinct layer shapes they use)."""
    import torch
    from torch import nn

    from compress.prune import ResourceModel, find_groups

    model = model.eval()
    groups = find_groups(model, example, ignore)
    cost = ResourceModel(model, groups, example)
    rows = {name: i for i, name in enumerate(cost.layer_names)}
    program = torch.export.export(model, (example,))
    widths: Dict[Any, Dict[str, Any]] = {}  # graph node -> its output's channel width
    layers: List[Dict[str, Any]] = []
    shapes: Dict[str, Dict[str, Any]] = {}
    names: Dict[str, int] = {}

    def tensor_args(node):
        return [a for a in node.args if hasattr(a, "meta") and hasattr(a.meta.get("val"), "shape")]

    def add_layer(name, op, spec, w_in, w_out):
        spec = {"op": op, **spec}
        key = _shape_key(spec)
        shapes.setdefault(key, spec)
        base, n = name, names.get(name, 0)
        names[name] = n + 1
        layers.append({"name": base if n == 0 else f"{base}#{n + 1}", "op": op, "shape": key,
                       "in": w_in, "out": w_out})

    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        stack = node.meta.get("nn_module_stack") or {}
        module_name, module_type = list(stack.values())[-1] if stack else ("", "")
        target = str(node.target)
        inputs = tensor_args(node)
        shape_in = tuple(inputs[0].meta["val"].shape) if inputs else ()
        shape_out = tuple(node.meta["val"].shape) if hasattr(node.meta.get("val"), "shape") else ()
        passthrough = widths.get(inputs[0]) if inputs else None
        if "conv2d" in target and module_name in rows:
            m = model.get_submodule(module_name)
            li = rows[module_name]
            depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            spec = {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride), "padding": _pair(m.padding),
                    "dilation": _pair(m.dilation), "in_hw": [int(shape_in[2]), int(shape_in[3])],
                    "out_hw": [int(shape_out[2]), int(shape_out[3])]}
            if isinstance(m.padding, str):
                raise BenchError(f"layer {module_name}: padding={m.padding!r} is not supported by the profile")
            out = _width(cost, li, "out")
            add_layer(module_name, "depthwise" if depthwise else "conv2d", spec,
                      out if depthwise else _width(cost, li, "in"), out)
            widths[node] = out
        elif "linear" in target and module_name in rows:
            li = rows[module_name]
            add_layer(module_name, "linear", {"in_hw": [1, 1]}, _width(cost, li, "in"), _width(cost, li, "out"))
            widths[node] = _width(cost, li, "out")
        elif "batch_norm" in target and module_name in rows:
            widths[node] = _width(cost, rows[module_name], "out")
        elif passthrough is None or len(shape_in) != 4:
            continue
        elif target.startswith(("aten.add.", "aten.add_.", "aten.sub.", "aten.mul.")) and len(inputs) == 2:
            if passthrough["groups"]:
                op = target.split(".")[1].rstrip("_")
                add_layer(module_name + "." + op if module_name else op, "add" if op != "mul" else "mul",
                          {"in_hw": [int(shape_in[2]), int(shape_in[3])]}, passthrough, passthrough)
            widths[node] = passthrough
        elif "max_pool2d" in target or "avg_pool2d" in target and "adaptive" not in target:
            m = model.get_submodule(module_name) if module_name else None
            if not isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
                raise BenchError(f"a functional {target} after {module_name or 'the input'} is not supported by "
                                 "the profile; use nn.MaxPool2d / nn.AvgPool2d")
            if passthrough["groups"]:
                spec = {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
                        "padding": _pair(m.padding), "in_hw": [int(shape_in[2]), int(shape_in[3])],
                        "out_hw": [int(shape_out[2]), int(shape_out[3])], "ceil_mode": bool(m.ceil_mode)}
                add_layer(module_name, "maxpool" if "max" in target else "avgpool", spec, passthrough, passthrough)
            widths[node] = passthrough
        elif "adaptive_avg_pool2d" in target or target.startswith("aten.mean."):
            if passthrough["groups"] and shape_in[2] * shape_in[3] > 1:
                add_layer(module_name or "mean", "mean", {"in_hw": [int(shape_in[2]), int(shape_in[3])]},
                          passthrough, passthrough)
            widths[node] = passthrough
        else:  # activations, copies, flatten: same channels (a Linear after them has its own row)
            widths[node] = passthrough
    return {"groups": [{"name": g.name, "size": int(g.size)} for g in groups], "layers": layers, "shapes": shapes}


def dense_width(width: Dict[str, Any], sizes: Dict[str, int]) -> int:
    return int(width["const"] + sum(a * sizes[g] for g, a in width["groups"].items()))


# --------------------------------------------------------------------------- probe specs


def probe_spec(shape: Dict[str, Any], cin: int, cout: int) -> Dict[str, Any]:
    """One probe: a layer shape at widths (cin, cout); one-width ops use cout for both."""
    if shape["op"] not in GEMM:
        cin = cout
    return {"v": PROBE_VERSION, "shape": shape, "cin": int(cin), "cout": int(cout)}


def null_spec() -> Dict[str, Any]:
    """The cheapest one-op model (an add on one value): what an invoke costs with nothing in it."""
    return probe_spec({"op": "add", "in_hw": [1, 1]}, 1, 1)


def sweep_shape() -> Dict[str, Any]:
    """The layer whose widths are swept to find the runtime's plateaus: a 3x3 conv on 8x8."""
    return {"op": "conv2d", "kernel": [3, 3], "stride": [1, 1], "padding": [1, 1], "dilation": [1, 1],
            "in_hw": [8, 8], "out_hw": [8, 8]}


def probe_id(spec: Dict[str, Any], fmt: str, toolchain: Dict[str, Any]) -> str:
    text = json.dumps({"spec": spec, "format": fmt, "toolchain": toolchain}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


# --------------------------------------------------------------------------- torch modules


ELEMENTWISE = ("add", "mul")  # ops litert keeps in NHWC only when they read NHWC


def _branch(spec: Dict[str, Any], nhwc: bool):
    """The torch module of one probe. Conv/pool/linear branches take NCHW (the converter makes
    them NHWC, as in the network); elementwise ones take NHWC when `nhwc` (TFLite), because a
    lone add or mean on an NCHW tensor would be converted between two TRANSPOSEs."""
    import torch
    from torch import nn

    shape, cin, cout = spec["shape"], spec["cin"], spec["cout"]
    op = shape["op"]
    if op in ("conv2d", "depthwise"):
        groups = cin if op == "depthwise" else 1
        conv = nn.Conv2d(cin, cout, shape["kernel"], shape["stride"], shape["padding"], shape["dilation"],
                         groups=groups, bias=True)
        return nn.Sequential(conv, nn.ReLU())
    if op == "linear":
        return nn.Sequential(nn.Flatten(1), nn.Linear(cin, cout))
    if op == "maxpool":
        return nn.MaxPool2d(shape["kernel"], shape["stride"], shape["padding"], ceil_mode=shape.get("ceil_mode", False))
    if op == "avgpool":
        return nn.AvgPool2d(shape["kernel"], shape["stride"], shape["padding"], ceil_mode=shape.get("ceil_mode", False))
    if op == "mean":  # as the networks pool globally (litert makes it a MEAN, quantised like theirs)
        return nn.AdaptiveAvgPool2d(1)

    class Elementwise(nn.Module):  # add (+ the ReLU it carries in a residual block), mul
        def forward(self, x):
            return torch.relu(x + x) if op == "add" else x * x
    return Elementwise()


def _probe_batch(specs: Sequence[Dict[str, Any]], nhwc: bool, anchor: bool = False):
    """Parallel branches reading channel slices of one input: converted once, cut apart after.
    With `nhwc` (TFLite) every 4-D output is NHWC, so the converted graph has no TRANSPOSE.
    `anchor`: one more output last, a 1x1 conv on a one-channel slice, for batches of pooling
    probes only: PT2E quantises a pool only where its input already is (in a network, a conv's
    output), so without a conv reading the input the int8 file stays float. Dropped after the cut."""
    import torch
    from torch import nn

    class ProbeBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.branches = nn.ModuleList([_branch(s, nhwc) for s in specs])
            self.widths = [s["cin"] for s in specs]
            self.channel_last = [nhwc and s["shape"]["op"] in ELEMENTWISE for s in specs]
            self.anchor = nn.Conv2d(1, 1, 1) if anchor else None

        def forward(self, x):
            outs = []
            for width, last, branch in zip(self.widths, self.channel_last, self.branches):
                if last:
                    outs.append(branch(x.permute(0, 2, 3, 1)[..., :width]))
                    continue
                y = branch(x[:, :width])
                outs.append(y.permute(0, 2, 3, 1) if nhwc and y.dim() == 4 else y)
            if self.anchor is not None:
                y = self.anchor(x[:, :1])
                outs.append(y.permute(0, 2, 3, 1) if nhwc else y)
            return tuple(outs)

    torch.manual_seed(int(hashlib.sha256(json.dumps(list(specs), sort_keys=True).encode()).hexdigest()[:8], 16))
    return ProbeBatch().eval()


def _context(program, channels: int, hw: Sequence[int], scratch: Path):
    """An export Context whose examples and calibration batches are random tensors of the probe's
    input (latency does not depend on the values), so export's build functions take it as is."""
    from export.formats import CalibrationReader, Context  # noqa: F401  (Context subclassed below)
    from export.run import Images, Preprocess, Run

    h, w = int(hw[0]), int(hw[1])
    images = Images(np.zeros((8, h, w, 3), np.uint8), np.zeros(8, np.int64))
    run = Run(path=scratch, report={"name": "probe"}, preprocess=Preprocess(1.0, [0.0] * 3, [1.0] * 3, h, w),
              calib=images, test=images)

    class ProbeContext(Context):
        def examples(self, n: int) -> np.ndarray:
            return np.random.default_rng(0).standard_normal((n, h, w, channels)).astype(np.float32)

        def calib_batches(self, layout: str, batch: int = 32, limit: Optional[int] = None):
            for i in range(8):
                x = np.random.default_rng(i).standard_normal((1, h, w, channels)).astype(np.float32)
                yield np.ascontiguousarray(x.transpose(0, 3, 1, 2) if layout == "NCHW" else x)

    return ProbeContext(run=run, program=program, calib_x=images.x, calib_y=images.y, scratch=scratch, max_batch=1)


def export_module(module, channels: int, hw: Sequence[int], fmt: str, out: Path, scratch: Path,
                  check_layout: bool = True) -> None:
    """`module` (input (1, channels, H, W)) -> one `fmt` file, with export's converters.
    check_layout=False: a TRANSPOSE is allowed (probe batches; their cut files are checked)."""
    import torch

    from export.formats import FORMATS, CalibrationReader, prepare_for_quantization, write_onnx_qdq

    example = torch.randn(1, channels, int(hw[0]), int(hw[1]))
    program = torch.export.export(module, (example,))
    ctx = _context(program, channels, hw, scratch)
    ctx.check_layout = check_layout
    if fmt == "onnx-int8":  # export's recipe; the calibration method search needs labelled images
        from onnxruntime.quantization import CalibrationMethod

        prepared = prepare_for_quantization(ctx.fp32_onnx(), scratch)
        write_onnx_qdq(prepared, out, CalibrationReader(ctx, "input", 8), CalibrationMethod.MinMax)
    else:
        FORMATS[fmt].build(ctx, out)


# --------------------------------------------------------------------------- cutting a batch apart


def split_tflite(data: bytes) -> List[bytes]:
    """One model per output of a multi-branch TFLite model: each keeps the ops its output needs,
    back to the channel slice (or graph input) it reads, which becomes its input."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(data, 0)
    sub = model.subgraphs[0]
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    producer = {int(t): i for i, op in enumerate(sub.operators) for t in op.outputs}
    graph_inputs = {int(t) for t in sub.inputs}

    def op_name(i: int) -> str:
        code = model.operatorCodes[sub.operators[i].opcodeIndex]
        return op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "?")

    parts = []
    for out in (int(t) for t in sub.outputs):
        ops, inputs, todo = set(), [], [out]
        while todo:
            t = todo.pop()
            p = producer.get(t)
            if p is None or op_name(p) in ("SLICE", "STRIDED_SLICE"):
                if (p is not None or t in graph_inputs) and t not in inputs:
                    inputs.append(t)
                continue
            if p not in ops:
                ops.add(p)
                todo.extend(int(x) for x in sub.operators[p].inputs if x >= 0)
        parts.append(_one_branch(model, sub, sorted(ops), inputs, out, flatbuffers, schema))
    return parts


def _one_branch(model, sub, ops, inputs, out, flatbuffers, schema) -> bytes:
    new = schema.ModelT()
    new.version, new.description, new.operatorCodes = model.version, model.description, model.operatorCodes
    new.buffers = [schema.BufferT()]  # buffer 0 is the empty sentinel by convention
    tensors, tmap, bmap = [], {}, {0: 0}

    def tensor(t: int) -> int:
        if t < 0:
            return t
        if t not in tmap:
            copied = copy.copy(sub.tensors[t])
            if copied.buffer not in bmap:
                bmap[copied.buffer] = len(new.buffers)
                new.buffers.append(model.buffers[copied.buffer])
            copied.buffer = bmap[copied.buffer]
            tmap[t] = len(tensors)
            tensors.append(copied)
        return tmap[t]

    graph = schema.SubGraphT()
    graph.name, graph.operators = sub.name, []
    for i in ops:
        op = copy.copy(sub.operators[i])
        op.inputs = [tensor(int(x)) for x in op.inputs]
        op.outputs = [tensor(int(x)) for x in op.outputs]
        graph.operators.append(op)
    graph.inputs, graph.outputs = [tensor(t) for t in inputs], [tensor(out)]
    graph.tensors = tensors
    new.subgraphs = [graph]
    builder = flatbuffers.Builder(1 << 16)
    builder.Finish(new.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def split_onnx(path: Path) -> List[bytes]:
    """One model per output of a multi-branch ONNX model, cut at the channel slice it reads."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(path))
    producer = {o: n for n in model.graph.node for o in n.output}
    graph_inputs = {i.name for i in model.graph.input}
    extractor = Extractor(model)
    parts = []
    for output in model.graph.output:
        start, todo, seen = [], [output.name], set()
        while todo:
            t = todo.pop()
            if t in seen:
                continue
            seen.add(t)
            node = producer.get(t)
            if node is None or node.op_type == "Slice":
                if node is not None or t in graph_inputs:
                    start.append(t)
                continue
            todo.extend(i for i in node.input if i)
        parts.append(extractor.extract_model(sorted(set(start)), [output.name]).SerializeToString())
    return parts


def _check_io(data: bytes, fmt: str, spec: Dict[str, Any]) -> None:
    """The cut model reads (cin) and writes (cout) what its spec says, and a TFLite one has no
    TRANSPOSE (export's own check): catches a wrong cut."""
    shape, cin, cout = spec["shape"], spec["cin"], spec["cout"]
    if fmt.startswith("tflite"):
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        from export.formats import check_no_transpose

        with tempfile.TemporaryDirectory(prefix="edgeslim-probe-") as tmp:
            (Path(tmp) / "probe.tflite").write_bytes(data)
            check_no_transpose(Path(tmp) / "probe.tflite")
        it = Interpreter(model_content=data, experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        ins, outs = it.get_input_details(), it.get_output_details()
        got_in, got_out = (list(ins[0]["shape"]), list(outs[0]["shape"])) if len(ins) == len(outs) == 1 else ([], [])
        want_in = [1, *shape["in_hw"], cin] if shape["op"] != "linear" else [1, cin]
        if shape["op"] == "linear" and len(got_in) == 4:  # the flatten may sit inside or outside the cut
            got_in = [got_in[0], int(np.prod(got_in[1:]))]
        channel_out = got_out[-1] if got_out else None
    else:
        import onnx

        graph = onnx.load_from_string(data).graph
        dims = [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in (*graph.input, *graph.output)]
        got_in, channel_out = (dims[0], dims[1][1]) if len(graph.input) == len(graph.output) == 1 else ([], None)
        want_in = [1, cin, *shape["in_hw"]] if shape["op"] != "linear" else [1, cin]
        if shape["op"] == "linear" and len(got_in) == 4:
            got_in = [got_in[0], int(np.prod(got_in[1:]))]
    if shape["op"] == "mean":  # litert reduces the mean probe's input in NCHW (a few microseconds either way)
        got_in, want_in = sorted(int(d) for d in got_in), sorted(want_in)
    if [int(d) for d in got_in] != want_in or channel_out != cout:
        raise BenchError(f"internal error: a cut {fmt} probe reads {got_in} and writes {channel_out} channels, "
                         f"expected {want_in} -> {cout} ({_shape_key(shape)})")


# --------------------------------------------------------------------------- building, with the cache


@dataclass
class Built:
    files: Dict[str, Dict[str, Path]] = field(default_factory=dict)  # spec id -> format -> file
    converted: int = 0  # probe files made now (the rest came from the cache)
    seconds: float = 0.0


def toolchain() -> Dict[str, Any]:
    from export.pipeline import toolchain as export_toolchain

    return {**export_toolchain(), "probe_version": PROBE_VERSION}


def spec_key(spec: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _batches(specs: List[Dict[str, Any]]) -> List[List[Dict[str, Any]]]:
    """Probes of one input size together, at most BATCH and BATCH_BYTES of fp32 weights each."""
    by_input: Dict[str, List[Dict[str, Any]]] = {}
    for s in specs:
        by_input.setdefault(json.dumps(s["shape"]["in_hw"] if s["shape"]["op"] != "linear" else [1, 1]), []).append(s)
    batches = []
    for group in by_input.values():
        group.sort(key=lambda s: s["cin"])
        current, size = [], 0
        for s in group:
            k = s["shape"].get("kernel", [1, 1])
            weight = 4 * s["cin"] * s["cout"] * k[0] * k[1] if s["shape"]["op"] in GEMM else 0
            if current and (len(current) >= BATCH or size + weight > BATCH_BYTES):
                batches.append(current)
                current, size = [], 0
            current.append(s)
            size += weight
        if current:
            batches.append(current)
    return batches


def build(specs: Sequence[Dict[str, Any]], formats: Sequence[str], cache: Path,
          progress: Optional[Callable[[int, str], None]] = None) -> Built:
    """Every probe file for `specs` x `formats`, from the cache or converted now (in batches).
    `progress(n, text)` is told each time n more probe files are ready."""
    import time

    from export.cli import quiet_toolchain

    quiet_toolchain()
    tools = toolchain()
    built = Built()
    start = time.time()
    unique = {spec_key(s): s for s in specs}
    for fmt in formats:
        todo = []
        for key, spec in unique.items():
            path = cache / fmt / (probe_id(spec, fmt, tools) + SUFFIX[fmt])
            built.files.setdefault(key, {})[fmt] = path
            if not path.is_file():
                todo.append(spec)
        if progress and len(unique) - len(todo):
            progress(len(unique) - len(todo), f"{fmt}: {len(unique) - len(todo)} probes from the cache")
        for batch in _batches(todo):
            _build_batch(batch, fmt, cache, tools)
            built.converted += len(batch)
            if progress:
                progress(len(batch), f"{fmt}: converted {len(batch)} probes ({_shape_key(batch[0]['shape'])} ...)")
    built.seconds = time.time() - start
    return built


def _build_batch(batch: List[Dict[str, Any]], fmt: str, cache: Path, tools: Dict[str, Any]) -> None:
    from .files import write_bytes_atomic

    # One channel more than any branch reads, so that every branch reads a real slice: a branch on
    # the whole input next to sliced ones gets conflicting int8 scales (litert refuses the PAD).
    channels = max(s["cin"] for s in batch) + 1
    hw = batch[0]["shape"]["in_hw"] if batch[0]["shape"]["op"] != "linear" else [1, 1]
    anchor = fmt == "tflite-int8" and not any(s["shape"]["op"] in GEMM for s in batch)
    module = _probe_batch(batch, nhwc=fmt.startswith("tflite"), anchor=anchor)
    with tempfile.TemporaryDirectory(prefix="edgeslim-probes-") as scratch:
        out = Path(scratch) / ("batch" + SUFFIX[fmt])
        try:
            export_module(module, channels, hw, fmt, out, Path(scratch), check_layout=False)
        except BenchError:
            raise
        except Exception as e:
            if len(batch) > 1:  # the converter trips over some mix of branches: convert the halves
                half = len(batch) // 2
                _build_batch(batch[:half], fmt, cache, tools)
                _build_batch(batch[half:], fmt, cache, tools)
                return
            spec = batch[0]
            raise BenchError(f"converting the {fmt} probe {_shape_key(spec['shape'])} {spec['cin']}->{spec['cout']} "
                             f"failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}", exit_code=1) from None
        parts = split_tflite(out.read_bytes()) if fmt.startswith("tflite") else split_onnx(out)
    if anchor:
        parts = parts[:-1]
    if len(parts) != len(batch):
        raise BenchError(f"internal error: {len(batch)} {fmt} probes converted into {len(parts)} outputs")
    for spec, data in zip(batch, parts):
        _check_io(data, fmt, spec)
        write_bytes_atomic(cache / fmt / (probe_id(spec, fmt, tools) + SUFFIX[fmt]), data)


# --------------------------------------------------------------------------- whole networks


def network_file(model, example, groups, keep: Dict[str, int], fmt: str, cache: Path, identity: Dict[str, Any]) -> Path:
    """`model` with each group cut to its first keep[g] channels (compress.prune.extract), exported
    to `fmt` with export's converters (cached like the probes; `identity` names the model)."""
    import torch

    from compress.prune import extract

    from .files import write_bytes_atomic

    key = {"network": identity, "keep": dict(sorted(keep.items())), "v": PROBE_VERSION}
    path = cache / fmt / ("net-" + probe_id(key, fmt, toolchain()) + SUFFIX[fmt])
    if path.is_file():
        return path
    masks = {}
    for g in groups:
        k = int(keep.get(g.name, g.size))
        mask = torch.zeros(g.size, dtype=torch.bool)
        mask[:k] = True
        masks[g.name] = mask
    slim = extract(model, groups, masks, example).eval()
    with tempfile.TemporaryDirectory(prefix="edgeslim-net-") as scratch:
        out = Path(scratch) / ("net" + SUFFIX[fmt])
        try:
            export_module(slim, int(example.shape[1]), example.shape[2:], fmt, out, Path(scratch))
        except Exception as e:
            raise BenchError(f"exporting the network to {fmt} failed: {type(e).__name__}: "
                             f"{' '.join(str(e).split())[:300]}", exit_code=1) from None
        write_bytes_atomic(path, out.read_bytes())
    return path


def sizes_of(net: Dict[str, Any]) -> Dict[str, int]:
    return {g["name"]: int(g["size"]) for g in net["groups"]}


def widths_at(net: Dict[str, Any], keep: Dict[str, int]) -> List[Tuple[int, int]]:
    """(in, out) of every layer of `net` at kept counts `keep` (others dense)."""
    k = {**sizes_of(net), **keep}
    return [(dense_width(la["in"], k), dense_width(la["out"], k)) for la in net["layers"]]
