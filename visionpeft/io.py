"""Adapter files: safetensors with only the adapter's tensors, plus JSON metadata; written atomically.

Tensor keys are ``<module name>/<tensor path inside the adapter>``, independent of the adapter's name, so a file
can be loaded under any name. Metadata: format version, visionpeft version, family, method configs, targets,
class names and the fingerprint of the base model the adapter was trained on.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
import threading
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_bytes
from torch import nn

from . import blockquant
from .inject import (
    adapted_modules,
    delete_adapter,
    fingerprint,
    inject,
    peft_state,
    set_adapter,
)
from .keep_modes import keep_base_mode
from .version import __version__

FORMAT = "visionpeft.adapter.v1"
ROUNDED_KEY = "rounded"  # metadata: which tensors are block-rounded, to how many bits (save_adapter's ``bits``)
SCALE_SUFFIX = ".block_scales"  # the float16 scales of a rounded tensor, beside it
_UMASK_LOCK = threading.Lock()
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"  # pickled torch MAGIC_NUMBER


class AdapterFileError(ValueError):
    """An adapter file is missing, corrupt, or does not fit the model it is loaded onto."""


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (``os.umask`` alone must set it, which
    races with other threads creating files)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def file_mode(path: str | Path) -> int:
    """The permissions a file written to ``path`` gets: the existing file's, else ``0o666`` less the umask (as
    ``open()`` would give; ``tempfile.mkstemp`` alone makes every file 0600)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~_umask()


def replace_file(src: str | Path, dst: str | Path) -> Path:
    """Move ``src`` onto ``dst`` atomically (same file system), keeping the mode ``dst`` had if it existed."""
    os.chmod(src, file_mode(dst))
    os.replace(src, dst)
    return Path(dst)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        replace_file(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def adapter_state_dict(model: nn.Module, adapter_name: str | None = None,
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one adapter (default: the active one), keyed ``<module>/<tensor>``; floating-point tensors
    cast to ``dtype`` if given."""
    name = adapter_name or peft_state(model)["active"]
    out = {}
    for module_name, wrapper in adapted_modules(model):
        if name in wrapper.adapters:
            for k, v in wrapper.adapters[name].state_dict().items():
                cast = dtype if dtype is not None and v.is_floating_point() else v.dtype
                out[f"{module_name}/{k}"] = v.detach().to("cpu", cast, copy=True).contiguous()
    return out


def adapter_metadata(model: nn.Module, adapter_name: str | None = None) -> dict:
    state = peft_state(model)
    name = adapter_name or state["active"]
    if name not in state["adapters"]:
        raise KeyError(f"No adapter named '{name}'. Loaded adapters: {sorted(state['adapters'])}.")
    base = {"base": state["base"]} if state.get("base") else {}  # the base weights' path, set by the trainer
    return {"format": FORMAT, "visionpeft_version": __version__, "family": state["family"], "adapter_name": name,
            "fingerprint": state["fingerprint"], **base, **state["adapters"][name]}


def roundable_keys(model: nn.Module, adapter_name: str | None = None) -> list[str]:
    """File keys of the adapter's tensors that its methods allow to be stored rounded (low-rank factors)."""
    name = adapter_name or peft_state(model)["active"]
    return [f"{m}/{k}" for m, w in adapted_modules(model) if name in w.adapters
            for k in w.adapters[name].roundable_keys()]


def prepared_for_rounding(model: nn.Module, adapter_name: str | None, tensors: dict[str, torch.Tensor],
                          bits: int) -> dict[str, torch.Tensor]:
    """``tensors`` (``adapter_state_dict``'s) as each method wants them before its factors are rounded to ``bits``
    (``Adapter.before_rounding``: LoRA and DoRA move ``B``'s rounding error into ``A``)."""
    name = adapter_name or peft_state(model)["active"]
    out = dict(tensors)
    for module_name, wrapper in adapted_modules(model):
        if name in wrapper.adapters:
            prefix = f"{module_name}/"
            own = {k[len(prefix):]: v for k, v in out.items() if k.startswith(prefix)}
            new = wrapper.adapters[name].before_rounding(own, lambda t: blockquant.round_trip(t, bits))
            out.update({prefix + k: v for k, v in new.items()})
    return out


def round_tensors(tensors: dict[str, torch.Tensor], keys: list[str], bits: int) -> tuple[dict, dict]:
    """``tensors`` with ``keys`` block-rounded (each as ``key`` and ``key + SCALE_SUFFIX``), and the record that
    ``read_adapter`` needs to undo it."""
    out, shapes = dict(tensors), {}
    for key in keys:
        shapes[key] = list(out[key].shape)
        out[key], out[key + SCALE_SUFFIX] = blockquant.quantize(out[key], bits)
    return out, {"bits": bits, "block": blockquant.BLOCK, "tensors": shapes}


def adapter_to_bytes(model: nn.Module, adapter_name: str | None = None, extra: dict | None = None,
                     dtype: torch.dtype | None = None, bits: int | None = None) -> bytes:
    meta = {**adapter_metadata(model, adapter_name), **(extra or {})}
    tensors = adapter_state_dict(model, adapter_name, dtype)
    if bits is not None:
        bits = blockquant.check_bits(bits)
        tensors = prepared_for_rounding(model, adapter_name, tensors, bits)
        tensors, meta[ROUNDED_KEY] = round_tensors(tensors, roundable_keys(model, adapter_name), bits)
    return save_bytes(tensors, metadata={"visionpeft": json.dumps(meta)})


def save_adapter(model: nn.Module, path: str | Path, adapter_name: str | None = None,
                 extra: dict | None = None, dtype: torch.dtype | None = None, bits: int | None = None) -> Path:
    """Save one adapter (default: the active one) to a ``.safetensors`` file, atomically.

    ``dtype=torch.float16`` halves the file (what Ultralytics does to ``best.pt``); loading casts back to the
    model's dtype. Keep float32 (the default) for files a run resumes from. ``bits=4`` (or 8) also stores the
    low-rank factors in blocks of 32 integers with one float16 scale each (llama.cpp's Q4_0 / Q8_0 layout): about
    a third of a float16 file; loading restores float32 factors, equal to the saved ones within half a step of
    their block's scale. Tensors outside the factors (DoRA magnitudes, class outputs, PiSSA's factors) keep
    ``dtype``.
    """
    return atomic_write_bytes(path, adapter_to_bytes(model, adapter_name, extra, dtype, bits))


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and metadata of an adapter file, with a clear error for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"Adapter file not found: '{path}'. Pass the .safetensors file a training run wrote "
                               "(runs/<task>/<name>/weights/best.safetensors).")
    try:
        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("visionpeft")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except (SafetensorError, ValueError, OSError, RuntimeError) as e:
        if _is_torch_checkpoint(path):
            raise AdapterFileError(
                f"'{path}' is a PyTorch checkpoint (.pt), not a visionpeft adapter (.safetensors): pass it as the base "
                "(base=/--base), with the adapter file the training run wrote beside it (weights/best.safetensors), "
                "or pass the run folder (run=/--run runs/detect/<name>).") from e
        raise AdapterFileError(f"'{path}' is not a readable safetensors file (corrupt or truncated?): {e}. "
                               "Re-export or re-download the adapter.") from e
    try:
        meta = json.loads(raw) if raw else None
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"'{path}' has corrupt visionpeft metadata: {e}.") from e
    if not meta or meta.get("format") != FORMAT:
        raise AdapterFileError(f"'{path}' is a safetensors file but not a visionpeft adapter (no '{FORMAT}' "
                               "metadata). Save adapters with visionpeft.save_adapter().")
    if ROUNDED_KEY in meta:
        tensors = unround_tensors(tensors, meta[ROUNDED_KEY], path)
    return tensors, meta


def unround_tensors(tensors: dict[str, torch.Tensor], record: object, path: Path) -> dict[str, torch.Tensor]:
    """Float32 tensors back from a file's block-rounded ones (``round_tensors``' record)."""
    try:
        bits, shapes = record["bits"], record["tensors"]
        if record.get("block") != blockquant.BLOCK or not isinstance(shapes, dict):
            raise ValueError(f"a block of {record.get('block')} values, where this version reads "
                             f"{blockquant.BLOCK}")
        out = dict(tensors)
        for key, shape in shapes.items():
            if not (isinstance(shape, list) and all(isinstance(n, int) and n >= 0 for n in shape)):
                raise ValueError(f"tensor '{key}' has no valid shape ({shape!r})")
            if key not in out or key + SCALE_SUFFIX not in out:
                raise ValueError(f"tensor '{key}' or its scales are missing")
            try:
                out[key] = blockquant.dequantize(out[key], out.pop(key + SCALE_SUFFIX), bits, shape)
            except ValueError as e:
                raise ValueError(f"tensor '{key}': {e}") from None
    except (TypeError, KeyError, ValueError) as e:
        raise AdapterFileError(f"'{path}' has corrupt rounded tensors ({e}). Save the adapter again "
                               "(visionpeft.save_adapter).") from None
    return out


def _is_torch_checkpoint(path: Path) -> bool:
    """Whether ``path`` is ``torch.save`` output: a zip archive, or the legacy format (a pickled magic number)."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
    return head == _LEGACY_TORCH_MAGIC or zipfile.is_zipfile(path)


def check_fingerprint(model: nn.Module, meta: dict, path: str | Path) -> None:
    state = getattr(model, "visionpeft", None)
    actual = state["fingerprint"] if state else fingerprint(model)
    expected = meta["fingerprint"]
    if actual != expected:
        raise AdapterFileError(
            f"Adapter '{path}' was trained on another base model.\n"
            f"  expected base fingerprint: {expected}\n"
            f"  this model's fingerprint:  {actual}\n"
            f"Load the base model the adapter was trained from (its source: {meta.get('base', 'unknown')})."
        )


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], adapter_name: str,
                         source: str = "This adapter") -> None:
    """Copy tensors keyed ``<module>/<tensor>`` (as in adapter files) into ``model``'s adapter ``adapter_name``,
    in place, so optimizers keep their references."""
    wrappers = {n: w for n, w in adapted_modules(model) if adapter_name in w.adapters}
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module_name, _, tensor_name = key.partition("/")
        per_module.setdefault(module_name, {})[tensor_name] = value
    per_module = {m: wrappers[m].adapters[adapter_name].upgrade_state(sd) if m in wrappers else sd
                  for m, sd in per_module.items()}
    found = {f"{m}/{k}" for m, sd in per_module.items() for k in sd}
    expected = {f"{m}/{k}" for m, w in wrappers.items() for k in w.adapters[adapter_name].state_dict()}
    if found != expected:
        missing, unexpected = sorted(expected - found)[:5], sorted(found - expected)[:5]
        raise AdapterFileError(f"{source} does not fit this model: missing {missing}, unexpected {unexpected}.")
    for module_name, sd in per_module.items():
        try:
            wrappers[module_name].adapters[adapter_name].load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise AdapterFileError(f"{source} does not fit this model at '{module_name}': {e}") from e


def load_adapter(model: nn.Module, path: str | Path, adapter_name: str | None = None,
                 activate: bool = True, keep_base: bool | None = None) -> nn.Module:
    """Load an adapter file onto ``model`` (the same base it was trained on), under ``adapter_name``.

    ``keep_base``: whether merging keeps the base classes beside the adapter's; ``None``: as the file records.
    """
    tensors, meta = read_adapter(path)
    check_fingerprint(model, meta, path)
    name = adapter_name or meta["adapter_name"]
    previous = getattr(model, "visionpeft", {}).get("active")
    keep_base = keep_base_mode(meta.get("keep_base")) if keep_base is None else keep_base
    inject(model, meta["configs"], adapter_name=name, names=meta.get("names"), keep_base=keep_base)
    try:
        load_adapter_tensors(model, tensors, name, source=f"'{path}'")
    except AdapterFileError:
        delete_adapter(model, name)  # leave the model as it was
        raise
    set_adapter(model, name if activate else previous)
    return model
