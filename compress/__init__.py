"""edgeslim's compress: train and prune a CNN to the FLOPs/params target you name.

    import compress
    model = compress.create_model("vgg16", num_classes=10)          # or your own nn.Module
    pruner = compress.Pruner(model, example_input, target="flops=0.5", method="seed",
                             epochs=30, steps_per_epoch=len(loader))
    ... pruner.step() after every backward ...
    slim = pruner.extract()
    compress.save_run("runs/mine", slim, pruner=pruner, calib=..., test=..., classes=..., mean=..., std=...)

See compress/api.py and docs/api.md. Names load on first use, so `python -m compress --help` stays quick.
"""
from importlib import import_module

_WHERE = {"Pruner": "compress.api", "save_run": "compress.api", "accuracy": "compress.api",
          "create_model": "compress.models", "build_model": "compress.models", "list_models": "compress.models",
          "count": "compress.flops", "UserError": "compress.errors"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'compress' has no attribute {name!r}")
