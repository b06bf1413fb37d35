"""edgeslim runtime: run an exported bundle on the device with numpy and one interpreter.

    from runtime import load
    model = load("dist/vgg16-f76")            # format="auto", threads=None (all cores)
    probs = model.predict(images)             # uint8 (H, W, 3) or (N, H, W, 3) RGB -> (N, classes)

Never imports torch or the other edgeslim packages; the interpreter is imported on load().
"""
from .bundle import FORMATS, Bundle, read_bundle
from .errors import BundleError, InputError, RuntimeUserError
from .model import Model, load, softmax

__all__ = ["FORMATS", "Bundle", "BundleError", "InputError", "Model", "RuntimeUserError", "load",
           "read_bundle", "softmax"]
