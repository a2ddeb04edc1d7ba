"""On the device: apply visionpeft patches to a deployed base ONNX model with numpy and onnx only.

    python -m visionpeft.edge apply base.onnx crops.vpatch -o crops.onnx
    python -m visionpeft.edge info crops.vpatch
    python -m visionpeft.edge switch base.onnx crops.vpatch weeds.vpatch   # switch times and memory (onnxruntime)

Nothing here imports torch, Ultralytics or the rest of visionpeft (``visionpeft/__init__.py`` skips its training API
when torch is missing), so a device needs ``pip install numpy onnx`` and this package, or the single file
``visionpeft/edge/apply.py`` (``python apply.py apply ...``). Patches are written by ``visionpeft-export --patch``.
``Fleet`` (``fleet.py``, needs onnxruntime too) holds one base model and switches adapters at run time.
"""

from .apply import FORMAT, PatchError, apply_patch, describe, load_onnx, read_recipe


def __getattr__(name: str):
    if name == "Fleet":  # imported on use: it needs onnxruntime, which apply/info do not
        from .fleet import Fleet

        return Fleet
    raise AttributeError(f"module 'visionpeft.edge' has no attribute '{name}'")


__all__ = ["FORMAT", "Fleet", "PatchError", "apply_patch", "describe", "load_onnx", "read_recipe"]
