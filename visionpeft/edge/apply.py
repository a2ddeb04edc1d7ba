"""Apply a visionpeft patch to a deployed base ONNX model, with numpy and onnx only (no torch, no Ultralytics).

A patch (``.vpatch``) turns the ONNX export of a base model into the ONNX export of that base with an adapter
merged in, without shipping the base's weights again. It is an ONNX ``ModelProto`` used as a data container (parsed,
never executed; no pickle): the merged model's graph and metadata, the tensors stored whole (new class outputs,
changed biases), the adapter's low-rank factors, and a JSON recipe (metadata key ``visionpeft.patch``) saying how
each initializer of the merged model is rebuilt. Exports fold Conv+BN into ``W_f = s * W`` (``s`` per output
channel), so the factors are folded the same way:

- ``base``: the base file's tensor, unchanged (the bulk of the bytes, never shipped);
- ``patch``: stored in the patch;
- ``lora``: ``W_f' = ratio * W_f + c * (B @ A)`` with ``c = s' * alpha / r``, ``ratio = s' / s`` (1 unless the
  adapter changed the BatchNorm: ``s'`` is the merged model's fold scale);
- ``dora``: ``W_f' = g * V / ||V||`` per output channel, ``V = W_f + c * (B @ A)``, ``c = s * alpha / r`` and
  ``g = s' * m * sign(s)``: DoRA's ``m * (W + dW) / ||W + dW||`` folded, with ``W = W_f / s`` cancelled out.

``A`` is stored as ``(groups, r, fan_in)`` and ``B`` as ``(groups, out / groups, r)``, so grouped and depthwise
convs compose like dense ones. Factors of an adapter file that stored them in 4-bit blocks (``peft.file_bits: 4``)
travel in those blocks (format v2): signed integers in blocks of 32 values, one float16 scale each (llama.cpp's
Q4_0 layout, two values to a byte, low nibble first, offset by 8; 8-bit blocks, Q8_0, are read too), restored here
to the very floats the adapter file holds. The patch records a hash of every base tensor it reads: another base is
refused.

Runs as ``python -m visionpeft.edge apply base.onnx crops.vpatch -o crops.onnx``, or as a copy of this one file
(``python visionpeft_edge.py apply ...``): it imports nothing else of visionpeft.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

FORMAT = "visionpeft.patch.v2"  # v2: factors may be stored in integer blocks ("blocks" in their recipe entry)
READS = ("visionpeft.patch.v1", FORMAT)
BLOCK = 32  # values per block of a rounded factor, one float16 scale each
RECIPE_KEY = "visionpeft.patch"  # metadata_props key of the recipe; absent from the patched model
FACTOR_PREFIX = "vpatch/"  # names of the patch's own tensors (factors, per-channel vectors)
KINDS = ("base", "patch", "lora", "dora")
FLOATS = {"float32": np.float32, "float16": np.float16}


class PatchError(ValueError):
    """A patch or base file is missing, corrupt, or the patch was made for another base."""


def load_onnx(path: str | Path, what: str) -> onnx.ModelProto:
    """An ONNX protobuf (model or patch) read as data: external tensor files are refused, never opened."""
    path = Path(path)
    if not path.is_file():
        raise PatchError(f"{what} '{path}' not found: pass the path of an existing file.")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise PatchError(f"{what} '{path}' is not a readable ONNX file ({type(e).__name__}): pass the "
                         f"{'.vpatch file visionpeft-export --patch wrote' if what == 'patch' else '.onnx model'}."
                         ) from None
    external = [t.name for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise PatchError(f"{what} '{path}' keeps {len(external)} tensors in external files (e.g. '{external[0]}'), "
                         "which are never read: use a self-contained ONNX file.")
    return proto


def read_recipe(patch: onnx.ModelProto, source: str = "patch") -> dict:
    """The patch's JSON recipe, checked for shape (not yet against a base)."""
    props = {p.key: p.value for p in patch.metadata_props}
    if RECIPE_KEY not in props:
        raise PatchError(f"'{source}' is not a visionpeft patch (no '{RECIPE_KEY}' metadata): pass the .vpatch "
                         "file visionpeft-export --patch wrote.")
    try:
        recipe = json.loads(props[RECIPE_KEY])
    except json.JSONDecodeError:
        recipe = None
    if not isinstance(recipe, dict) or recipe.get("format") not in READS:
        found = recipe.get("format") if isinstance(recipe, dict) else "unreadable"
        raise PatchError(f"'{source}' has patch format '{found}', this applier reads {' and '.join(READS)}: use "
                         "the visionpeft version that wrote the patch.")
    entries, base = recipe.get("initializers"), recipe.get("base")
    if not isinstance(entries, list) or not isinstance(base, dict) or not isinstance(base.get("sha256"), str):
        raise PatchError(f"'{source}' has a corrupt recipe (no initializer list or base hash): write it again.")
    for e in entries:
        if not (isinstance(e, dict) and isinstance(e.get("name"), str) and e.get("kind") in KINDS
                and (e["kind"] == "patch" or isinstance(e.get("base"), str))):
            raise PatchError(f"'{source}' has a corrupt recipe entry {str(e)[:80]!r}: write the patch again.")
    return recipe


def base_names(recipe: dict) -> list[str]:
    """The base tensors a recipe reads, sorted (what its base hash covers)."""
    return sorted({e["base"] if e["kind"] != "patch" else None for e in recipe["initializers"]} - {None})


def tensor_digest(tensors: dict[str, np.ndarray], names: Sequence[str]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``tensors[names]`` (in the given order)."""
    h = hashlib.sha256()
    for name in names:
        a = np.ascontiguousarray(tensors[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _made_for(recipe: dict) -> str:
    b = recipe["base"]
    return (f"the {b.get('precision', '?')} ONNX export of '{b.get('model', '?')}' (imgsz {b.get('imgsz', '?')}, "
            f"Ultralytics {b.get('ultralytics', '?')})")


def check_base(recipe: dict, tensors: dict[str, np.ndarray], source: str = "base") -> None:
    """Refuse a base the patch was not made for, naming the difference and the base it needs."""
    names = base_names(recipe)
    missing = [n for n in names if n not in tensors]
    fix = f"apply it to {_made_for(recipe)}, or make a patch for this base (visionpeft-export --patch --base-onnx)"
    if missing:
        raise PatchError(f"'{source}' is not the base this patch was made for: it lacks tensor '{missing[0]}' "
                         f"(and {len(missing) - 1} more); {fix}.")
    want = recipe["base"].get("dtype")
    have = next((str(tensors[n].dtype) for n in names if tensors[n].dtype.kind == "f"), None)
    if want and have and want != have:
        raise PatchError(f"'{source}' holds {have} weights, this patch was made for a {want} base; {fix}.")
    if tensor_digest(tensors, names) != recipe["base"]["sha256"]:
        raise PatchError(f"'{source}' is not the base this patch was made for (its weights differ); {fix}.")


def unblock(data: np.ndarray, scales: np.ndarray, bits: int, shape: Sequence[int]) -> np.ndarray:
    """The float32 tensor stored as integer blocks; the same arithmetic as ``visionpeft.blockquant.dequantize``
    (float32 products of integers and float16 scales), so the result equals the adapter file's factors exactly.
    ``ValueError`` if the parts do not fit together."""
    numel = int(np.prod(shape))
    blocks = -(-numel // BLOCK)
    width, dtype = {8: (BLOCK, np.int8), 4: (BLOCK // 2, np.uint8)}.get(bits, (None, None))
    if width is None or data.dtype != dtype or data.shape != (blocks, width):
        raise ValueError(f"{bits}-bit data of dtype {data.dtype} and shape {data.shape} for {numel} values")
    if scales.dtype != np.float16 or scales.shape != (blocks,) or not np.isfinite(scales).all():
        raise ValueError(f"scales of dtype {scales.dtype} and shape {scales.shape} for {blocks} blocks")
    q = np.stack([data & 15, data >> 4], 2).reshape(blocks, BLOCK).astype(np.int8) - 8 if bits == 4 else data
    return (q.astype(np.float32) * scales.astype(np.float32)[:, None]).reshape(-1)[:numel].reshape(tuple(shape))


def _factor(stored: dict[str, np.ndarray], entry: dict, key: str, shape: tuple | None = None) -> np.ndarray | None:
    name = entry.get(key)
    if name is None:
        return None
    block = (entry.get("blocks") or {}).get(key)
    names = [name] if block is None else [name, block.get("scales") if isinstance(block, dict) else None]
    missing = [n for n in names if not (isinstance(n, str) and n in stored)]
    if missing:
        raise PatchError(f"The patch misses tensor '{missing[0]}' for '{entry['name']}': it is corrupt; write it "
                         "again.")
    if block is None:
        a = stored[name].astype(np.float32, copy=False)  # read only: no copy of a float32 factor
    else:
        try:
            a = unblock(stored[name], stored[block["scales"]], block.get("bits"), block.get("shape"))
        except (TypeError, ValueError) as e:
            raise PatchError(f"The patch's rounded '{name}' is corrupt ({e}): write the patch again.") from None
    if shape is not None and a.shape != shape:
        raise PatchError(f"The patch's '{name}' has shape {a.shape}, '{entry['name']}' needs {shape}: the patch is "
                         "corrupt or for another base.")
    return a


def low_rank(entry: dict, stored: dict[str, np.ndarray], weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(B @ A reshaped like weight, c)`` for a lora/dora entry, with every shape checked."""
    out = weight.shape[0]
    a, b = _factor(stored, entry, "A"), _factor(stored, entry, "B")
    if (a.ndim != 3 or b.ndim != 3 or a.shape[0] != b.shape[0] or a.shape[1] != b.shape[2]
            or a.shape[0] * b.shape[1] != out or a.shape[2] * out != weight.size):
        raise PatchError(f"The patch's factors of '{entry['name']}' ({a.shape}, {b.shape}) do not fit the base "
                         f"weight {weight.shape}: the patch is corrupt or for another base.")
    # einsum, not matmul: numpy's batched matmul loops slowly over depthwise convs' tiny matrices, and BLAS threads
    # stall on a busy device CPU; a plain loop over r (<= 64) is fast enough for every conv of a YOLO model
    return np.einsum("gor,grf->gof", b, a).reshape(weight.shape), _factor(stored, entry, "c", (out,))


def rebuild(entry: dict, weight: np.ndarray, stored: dict[str, np.ndarray]) -> np.ndarray:
    """The merged model's folded conv weight from the base's (float32 math, the base's dtype out)."""
    w = weight.astype(np.float32, copy=False)  # never written to
    delta, c = low_rank(entry, stored, w)
    bcast = (-1,) + (1,) * (w.ndim - 1)
    if entry["kind"] == "lora":
        ratio = _factor(stored, entry, "ratio", (w.shape[0],))
        new = (w if ratio is None else w * ratio.reshape(bcast)) + c.reshape(bcast) * delta
    else:
        v = w + c.reshape(bcast) * delta
        norm = np.sqrt(np.square(v.reshape(len(v), -1), dtype=np.float64).sum(1)).astype(np.float32)
        gain = _factor(stored, entry, "g", (w.shape[0],)) / np.where(norm > 0, norm, 1)
        new = v * gain.reshape(bcast)
    return new.astype(weight.dtype, copy=False)


def bare_graph(patch: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the patch's graph and metadata without its tensors and recipe: the merged model to fill in."""
    graph = onnx.ModelProto()
    graph.CopyFrom(patch)
    del graph.graph.initializer[:]
    keep = [p for p in graph.metadata_props if p.key != RECIPE_KEY]
    del graph.metadata_props[:]
    graph.metadata_props.extend(keep)
    return graph


def apply_patch(base: str | Path | onnx.ModelProto, patch: str | Path | onnx.ModelProto,
                out: str | Path | None = None) -> onnx.ModelProto:
    """The merged model: ``patch`` applied to ``base`` (paths or loaded protos, left unchanged).

    Written atomically to ``out`` if given (never onto the base or the patch themselves).
    """
    base_src = "base" if isinstance(base, onnx.ModelProto) else str(base)
    patch_src = "patch" if isinstance(patch, onnx.ModelProto) else str(patch)
    if out is not None:
        targets = {Path(p).resolve() for p in (base, patch) if not isinstance(p, onnx.ModelProto)}
        if Path(out).resolve() in targets:
            raise PatchError(f"Output '{out}' is the base or the patch itself, which would be lost: pass another "
                             "-o path.")
    base = base if isinstance(base, onnx.ModelProto) else load_onnx(base, "base model")
    patch = patch if isinstance(patch, onnx.ModelProto) else load_onnx(patch, "patch")
    recipe = read_recipe(patch, patch_src)
    base_protos = {t.name: t for t in base.graph.initializer}
    wanted = base_names(recipe)
    tensors = {n: numpy_helper.to_array(base_protos[n]) for n in wanted if n in base_protos}
    check_base(recipe, tensors, base_src)
    stored = {t.name: t for t in patch.graph.initializer}
    factors = {n: numpy_helper.to_array(t) for n, t in stored.items() if n.startswith(FACTOR_PREFIX)}

    merged = bare_graph(patch)
    for e in recipe["initializers"]:
        name, kind = e["name"], e["kind"]
        if kind == "base":
            t = merged.graph.initializer.add()
            t.CopyFrom(base_protos[e["base"]])
            t.name = name
        elif kind == "patch":
            if name not in stored:
                raise PatchError(f"The patch misses tensor '{name}': it is corrupt; write it again.")
            if e.get("dtype") in FLOATS:  # stored as float16 where that was lossless: widen it back
                value = numpy_helper.to_array(stored[name]).astype(FLOATS[e["dtype"]])
                merged.graph.initializer.append(numpy_helper.from_array(value, name))
            else:
                merged.graph.initializer.add().CopyFrom(stored[name])
        else:
            merged.graph.initializer.append(numpy_helper.from_array(rebuild(e, tensors[e["base"]], factors), name))
    if out is not None:
        write_model(merged, out)
    return merged


def write_model(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write ``model`` so that a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    """The process umask, read without setting it where Linux reports it (``os.umask`` races with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def describe(patch: str | Path) -> str:
    """A few lines on a patch: what it makes, from which base, and its parts."""
    proto = load_onnx(patch, "patch")
    recipe = read_recipe(proto, str(patch))
    props = {p.key: p.value for p in proto.metadata_props}
    kinds = {k: sum(e["kind"] == k for e in recipe["initializers"]) for k in KINDS}
    return "\n".join([
        f"{patch}: {Path(patch).stat().st_size / 1e6:.2f} MB, {recipe['format']}",
        f"makes: names {props.get('names', '?')}, imgsz {props.get('imgsz', '?')}",
        f"needs: {_made_for(recipe)}, base sha256 {recipe['base']['sha256'][:16]}",
        "tensors: " + ", ".join(f"{v} {k}" for k, v in kinds.items() if v),
    ])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m visionpeft.edge", description="Apply a visionpeft patch to a base "
                                "ONNX model (numpy and onnx only), or describe a patch.")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("apply", help="write the merged model: base ONNX + patch")
    a.add_argument("base", help="the deployed base model (.onnx)")
    a.add_argument("patch", help="the patch (.vpatch)")
    a.add_argument("-o", "--out", help="output .onnx (default: <patch name>.onnx beside the patch)")
    i = sub.add_parser("info", help="describe a patch")
    i.add_argument("patch")
    args = p.parse_args(argv)
    try:
        if args.command == "info":
            print(describe(args.patch))
            return 0
        out = Path(args.out) if args.out else Path(args.patch).with_suffix(".onnx")
        start = time.perf_counter()
        apply_patch(args.base, args.patch, out)
        print(f"{out}: {out.stat().st_size / 1e6:.2f} MB, from {args.base} + {args.patch} "
              f"({Path(args.patch).stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - start:.2f} s")
    except (PatchError, OSError) as e:
        return cli_error(e)
    return 0


def cli_error(e: BaseException) -> int:
    """The device CLIs' answer to bad input: one line on stderr, exit status 2."""
    print(f"visionpeft.edge: error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
