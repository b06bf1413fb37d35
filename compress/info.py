"""`python -m compress info`: the FLOPs and parameters of a network, as one JSON object.

    python -m compress info --model vgg16
    python -m compress info --model resnet56 --width 0.5 --num-classes 100
    python -m compress info --model path/to/nets.py:make_net --input-size 64

FLOPs are multiply-accumulates (see compress.flops), for one image of the given size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict

from compress.errors import UserError
from compress.flops import count
from compress.models import build_model, list_models


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, through the same path as every other user error
        raise UserError(message)


def make_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m compress info",
                description="Print a network's FLOPs (MACs) and parameters as one JSON object.")
    p.add_argument("--model", required=True,
                   help=f"zoo name ({', '.join(list_models())}) or package.module:factory "
                        f"or path/to/file.py:factory")
    p.add_argument("--width", type=float, default=1.0, help="channel width multiplier (default 1.0)")
    p.add_argument("--num-classes", type=int, default=10, help="classifier outputs (default 10)")
    p.add_argument("--input-size", type=int, default=32, help="square input side in pixels (default 32)")
    p.add_argument("--channels", type=int, default=3, help="input channels (default 3)")
    return p


def info(model_spec: str, width: float = 1.0, num_classes: int = 10, input_size: int = 32,
         channels: int = 3) -> dict:
    if input_size < 1 or channels < 1:
        raise UserError(f"--input-size and --channels must be positive, got {input_size} and {channels}")
    model = build_model(model_spec, num_classes=num_classes, width=width)
    input_shape = (1, channels, input_size, input_size)
    try:
        counts = count(model, input_shape)
    except Exception as exc:  # e.g. an input too small for five pools
        reason = " ".join(str(exc).split())[:300]
        raise UserError(f"{model_spec} fails on input {list(input_shape)}: {type(exc).__name__}: {reason}") from exc
    return {
        "model": model_spec,
        "width": width,
        "num_classes": num_classes,
        "input_shape": list(input_shape),
        "flops": counts.flops,
        "flops_unit": "MAC",
        "params": counts.params,
        "layers": [asdict(layer) for layer in counts.layers],
    }


def main(argv=None) -> int:
    try:
        args = make_parser().parse_args(argv)
        result = info(args.model, args.width, args.num_classes, args.input_size, args.channels)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        print(to_json(result), flush=True)
    except BrokenPipeError:  # `... | head`: the reader has all it wanted
        sys.stdout = open(os.devnull, "w")  # so shutdown does not flush into the closed pipe
    return 0


def to_json(result: dict) -> str:
    """Valid JSON laid out for people: one line per key, one line per layer."""
    head = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in result.items() if k != "layers"]
    layers = ",\n".join(f"  {json.dumps(layer)}" for layer in result["layers"])
    return "{\n" + ",\n".join(head) + ',\n "layers": [\n' + layers + "\n ]\n}"


if __name__ == "__main__":
    sys.exit(main())
