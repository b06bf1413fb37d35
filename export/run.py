"""Read a run folder (docs/formats.md §1): report.json, model.pt2, calib.npz, test.npz.

model.pt2 is opened without trusting pickle: torch.export.load unpickles some payloads with
weights_only=False, so every pickled member is first proven to load with weights_only=True.
The run's preprocessing is the runtime's own Preprocess: torch, calibration and the board all
see images normalised by the same code.
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.errors import UserError
from runtime.bundle import Preprocess

REPORT_KEYS = ("name", "classes", "input", "num_classes")


@dataclass
class Images:
    x: np.ndarray  # uint8 (N, H, W, 3) RGB
    y: np.ndarray  # int64 (N,)


@dataclass
class Run:
    path: Path
    report: dict
    preprocess: Preprocess
    calib: Images
    test: Images

    @property
    def name(self) -> str:
        return str(self.report["name"])

    def load_program(self):
        """The slim model as a torch.export.ExportedProgram (pickle payloads checked first) and the
        largest batch it accepts."""
        program = load_program_safely(self.path / "model.pt2")
        return program, batch_limit(program)


def read_report(path: Path) -> dict:
    file = path / "report.json"
    if not file.is_file():
        raise UserError(f"{path} is not a run folder: report.json is missing")
    try:
        report = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(report, dict):
        raise UserError(f"{file} is not a JSON object")
    missing = [k for k in REPORT_KEYS if k not in report]
    if missing:
        raise UserError(f"{file} lacks {', '.join(missing)}")
    inp = report["input"]
    try:
        _, c, h, w = inp["shape"]
        float(inp["scale"])
        if len(inp["mean"]) != c or len(inp["std"]) != c or c != 3:
            raise ValueError("mean/std must have one value per RGB channel")
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{file}: bad 'input' section ({e})") from None
    return report


def read_images(file: Path, x_key: str = "x", y_key: str = "y") -> Images:
    try:
        with np.load(file, allow_pickle=False) as z:
            x, y = z[x_key], z[y_key].astype(np.int64)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"cannot read {x_key}/{y_key} images from {file} ({e})") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3 or len(x) != len(y) or len(x) == 0:
        raise UserError(f"{file}: {x_key} must be uint8 (N, H, W, 3) with one label each, got {x.dtype} {x.shape}")
    return Images(x, y)


def open_run(path: Path, data_dir: Path | None = None, need_calib: bool = True) -> Run:
    """Validate the run folder and load its images. Does not load the model yet (see Run.load_program).
    Calibration images are required only when an int8 format is asked for."""
    if not path.is_dir():
        raise UserError(f"run folder {path} does not exist")
    report = read_report(path)
    check_program_archive(path / "model.pt2")
    inp = report["input"]
    pre = Preprocess(scale=float(inp["scale"]), mean=tuple(float(v) for v in inp["mean"]),
                     std=tuple(float(v) for v in inp["std"]), height=int(inp["shape"][2]), width=int(inp["shape"][3]))

    dataset = data_dir / f"{report.get('dataset', 'cifar10')}.npz" if data_dir else None
    if data_dir is not None and not dataset.is_file():
        raise UserError(f"--data-dir {data_dir} has no {dataset.name}")
    if (path / "calib.npz").is_file():
        calib = read_images(path / "calib.npz")
    elif dataset is not None:
        calib = read_images(dataset, "x_train", "y_train")
        # The same kind of sample compress would have drawn: random training images, fixed seed.
        pick = np.sort(np.random.default_rng(0).permutation(len(calib.x))[:4096])
        calib = Images(calib.x[pick], calib.y[pick])
    elif need_calib:
        raise UserError(f"no calibration images: {path}/calib.npz is missing and no --data-dir was given")
    else:
        calib = Images(np.zeros((0, pre.height, pre.width, 3), np.uint8), np.zeros(0, np.int64))
    if (path / "test.npz").is_file():
        test = read_images(path / "test.npz")
    elif dataset is not None:
        test = read_images(dataset, "x_test", "y_test")
    else:
        raise UserError(f"no test images: {path}/test.npz is missing and no --data-dir was given")
    for what, images in (("calibration", calib), ("test", test)):
        if len(images.x) and images.x.shape[1:3] != (pre.height, pre.width):
            raise UserError(f"{what} images are {images.x.shape[1:3]}, the model takes {pre.height}x{pre.width}")
    return Run(path=path, report=report, preprocess=pre, calib=calib, test=test)


def check_program_archive(file: Path) -> None:
    """Refuse anything but a torch.export archive whose pickled members are plain tensors."""
    import torch  # here, not at module level: the CLI parses arguments without paying for torch

    if not file.is_file():
        raise UserError(f"{file} is missing")
    if not zipfile.is_zipfile(file):
        raise UserError(f"{file} is not a torch.export .pt2 archive (not a zip file)")
    try:
        with zipfile.ZipFile(file) as z:
            names = z.namelist()
            roots = {n.split("/", 1)[0] for n in names}
            if len(roots) != 1 or not any(n.endswith("/archive_format") for n in names):
                raise UserError(f"{file} is not a torch.export .pt2 archive")
            root = roots.pop() + "/"
            raw = set()  # members holding raw tensor bytes (no pickle) per the payload configs
            for n in names:
                if n.endswith(("_weights_config.json", "_constants_config.json")):
                    folder = n.rsplit("/", 1)[0] + "/"
                    for meta in json.loads(z.read(n))["config"].values():
                        name = meta["path_name"]
                        if name.startswith(("custom_obj_", "opaque_obj_")):
                            raise UserError(f"{file} holds a pickled Python object ({name}); refusing to load it")
                        if not meta.get("use_pickle", False):
                            raw.add(folder + name)
            for n in names:
                rel = n[len(root):]
                if n in raw or n.endswith("/") or rel.endswith(".json") or not rel.startswith("data/"):
                    continue  # raw tensor bytes, JSON, or archive metadata: nothing is unpickled
                try:
                    torch.load(io.BytesIO(z.read(n)), weights_only=True)
                except Exception as e:  # any failure means: not provably plain tensors
                    raise UserError(f"{file}: member {rel} is not a plain tensor payload; refusing to "
                                    f"unpickle it ({type(e).__name__})") from None
    except (zipfile.BadZipFile, KeyError, ValueError, TypeError, OSError) as e:
        raise UserError(f"{file} is a corrupt .pt2 archive ({type(e).__name__}: {e})") from None


def load_program_safely(file: Path):
    import torch

    check_program_archive(file)
    try:
        return torch.export.load(str(file))
    except Exception as e:  # a truncated or hand-edited archive fails in many ways inside torch
        raise UserError(f"{file} could not be loaded by torch.export.load ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None


def batch_limit(program) -> int:
    """The largest batch the program accepts. Its batch dimension must be dynamic and admit 1
    (docs/formats.md §1): TFLite is traced at batch 1, evaluation runs in batches."""
    import torch
    from torch.utils._sympy.numbers import int_oo

    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    batch = node.meta["val"].shape[0]
    if not isinstance(batch, torch.SymInt):
        raise UserError(f"model.pt2 has a fixed batch of {batch}; it must be exported with a dynamic batch dimension")
    limits = program.range_constraints.get(batch.node.expr)
    low, high = (limits.lower, limits.upper) if limits is not None else (1, 1 << 30)
    if low > 1:
        raise UserError(f"model.pt2 accepts batches of {low} to {high}; it must accept a batch of 1")
    return 1 << 30 if high == int_oo else int(high)

