"""On the device: apply visionpeft patches to a deployed base ONNX model with numpy and onnx only.

    python -m visionpeft.edge apply base.onnx crops.vpatch -o crops.onnx
    python -m visionpeft.edge info crops.vpatch

Nothing here imports torch, Ultralytics or the rest of visionpeft (``visionpeft/__init__.py`` skips its training API
when torch is missing), so a device needs ``pip install numpy onnx`` and this package, or the single file
``visionpeft/edge/apply.py`` (``python apply.py apply ...``). Patches are written by ``visionpeft-export --patch``.
"""

from .apply import FORMAT, PatchError, apply_patch, describe, load_onnx, read_recipe

__all__ = ["FORMAT", "PatchError", "apply_patch", "describe", "load_onnx", "read_recipe"]
