"""Several tasks on one device: one base ONNX model held in memory, adapters (patches) switched at run time.

    fleet = Fleet("base.onnx", threads=2)          # the base is read from disk once
    fleet.add("crops.vpatch"); fleet.add("weeds.vpatch")
    boxes = fleet.use("crops").run(None, {"images": x})[0]   # an onnxruntime InferenceSession

A switch never reads a model file: the merged weights are rebuilt from the base tensors in memory and the patch's
factors (``apply.rebuild``), and the session is built from the patch's graph, whose large tensors are declared
external and handed to onnxruntime as in-memory ``OrtValue``s (``SessionOptions.add_external_initializers``).
Tensors the patch takes unchanged from the base are one ``OrtValue`` shared by every session; small ones (shapes,
split sizes) stay inline because onnxruntime's shape inference reads them. This is faster than serializing the
merged model to bytes and parsing it again (which costs more than reading the merged file from disk), and keeps no
merged copy per adapter. ``keep`` live sessions are cached (least recently used dropped): ``keep=1`` holds one
model's worth of weights whatever the number of adapters; a larger ``keep`` trades memory for instant switches.

numpy, onnx and onnxruntime only, like ``apply.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .apply import FACTOR_PREFIX, FLOATS, PatchError, bare_graph, check_base, cli_error, load_onnx, read_recipe, rebuild

#: tensors at least this large (bytes) are handed over in memory; smaller ones stay in the graph for shape inference
EXTERNAL_BYTES = 4096
#: the location the graph's external tensors name: never read, every one is supplied in memory
IN_MEMORY = "visionpeft-in-memory"


@dataclass
class _Held:
    """A patch ready to become a session: its graph with large tensors external, and how to fill them."""

    name: str
    graph: bytes  # the ModelProto, large initializers declared external
    entries: dict[str, dict]  # recipe entries of the external initializers, by name
    stored: dict[str, np.ndarray]  # tensors the patch stores whole (widened back), and the adapter factors
    names: dict[int, str] = field(default_factory=dict)  # class names of the merged model
    size: int = 0  # bytes of the patch file (0 when given as a proto)


def rss_mb() -> float:
    """This process's resident memory in MiB (Linux ``/proc``; elsewhere the peak, from ``resource``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def session_options(threads: int | None = None):
    """onnxruntime options as visionpeft sets them: quiet, ``threads`` intra-op threads (None: all cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


class Fleet:
    """A base ONNX model read once, with patches added and switched by name (see the module docstring).

    ``base``: the device's base model (path or proto; the proto is not kept). ``threads``: onnxruntime intra-op
    threads. ``keep``: live sessions cached. ``providers``: onnxruntime execution providers.
    """

    def __init__(self, base: str | Path | onnx.ModelProto, threads: int | None = None, keep: int = 1,
                 providers: Sequence[str] = ("CPUExecutionProvider",)) -> None:
        import onnxruntime as ort

        if keep < 1:
            raise ValueError(f"keep must be >= 1 (live sessions cached), not {keep}.")
        ort.disable_telemetry_events()
        self.source = "base" if isinstance(base, onnx.ModelProto) else str(base)
        proto = base if isinstance(base, onnx.ModelProto) else load_onnx(base, "base model")
        self._base = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        self._shared: dict[str, object] = {}  # OrtValues of base tensors, shared by every session
        self._held: dict[str, _Held] = {}
        self._sessions: OrderedDict[str, tuple] = OrderedDict()  # name -> (session, arrays it reads)
        self.threads, self.keep, self.providers = threads, keep, list(providers)
        self.active: str | None = None

    @property
    def adapters(self) -> list[str]:
        """Names of the patches held, in the order they were added."""
        return list(self._held)

    def names(self, adapter: str | None = None) -> dict[int, str]:
        """Class names of an adapter's merged model (default: the active one)."""
        return self._get(adapter or self.active).names

    def add(self, patch: str | Path | onnx.ModelProto, name: str | None = None) -> str:
        """Hold a patch (checked against the base now, so a wrong one fails here, not at a switch); its name.

        ``name``: default the adapter name in the patch's metadata, else the file name without its suffix.
        """
        source = "patch" if isinstance(patch, onnx.ModelProto) else str(patch)
        proto = patch if isinstance(patch, onnx.ModelProto) else load_onnx(patch, "patch")
        recipe = read_recipe(proto, source)
        wanted = sorted({e["base"] for e in recipe["initializers"] if e["kind"] != "patch"})
        check_base(recipe, {n: self._base[n] for n in wanted if n in self._base}, self.source)
        props = {p.key: p.value for p in proto.metadata_props}
        if name is None:
            try:
                name = json.loads(props.get("visionpeft", "{}")).get("adapter")
            except json.JSONDecodeError:
                name = None
            name = name or (Path(source).stem if not isinstance(patch, onnx.ModelProto) else "adapter")
        if name in self._held:
            raise PatchError(f"An adapter named '{name}' is already held: pass another name, or remove it first.")
        self._held[name] = self._prepare(name, proto, recipe, props, source)
        if not isinstance(patch, onnx.ModelProto):
            self._held[name].size = Path(patch).stat().st_size
        return name

    def remove(self, name: str) -> None:
        """Forget an adapter and its session (the active one too: then nothing is active)."""
        self._get(name)
        del self._held[name]
        self._sessions.pop(name, None)
        self.active = None if self.active == name else self.active

    def use(self, name: str):
        """Make ``name`` the active adapter; its onnxruntime ``InferenceSession`` (built now unless cached)."""
        held = self._get(name)
        if name in self._sessions:
            self._sessions.move_to_end(name)
        else:
            while len(self._sessions) >= self.keep:  # drop first: peak memory stays at ``keep`` sessions
                self._sessions.popitem(last=False)
            self._sessions[name] = self._session(held)
        self.active = name
        return self._sessions[name][0]

    def run(self, images: np.ndarray, adapter: str | None = None) -> list[np.ndarray]:
        """The outputs of the active adapter's model (or of ``adapter``, which becomes active) for ``images``."""
        session = self.use(adapter or self._active())
        return session.run(None, {session.get_inputs()[0].name: images})

    def _active(self) -> str:
        if self.active is None:
            raise PatchError("No adapter is active: call use(name) first, with one of "
                             f"{self.adapters or 'the patches added with add()'}.")
        return self.active

    def _get(self, name: str | None) -> _Held:
        if name not in self._held:
            raise PatchError(f"No adapter named '{name}' is held: use one of {self.adapters}, or add() its patch.")
        return self._held[name]

    def _prepare(self, name: str, proto: onnx.ModelProto, recipe: dict, props: dict, source: str) -> _Held:
        stored = {t.name: t for t in proto.graph.initializer}
        blocks = {n for e in recipe["initializers"] for k, b in (e.get("blocks") or {}).items() if isinstance(b, dict)
                  for n in (e.get(k), b.get("scales"))}  # 4-bit blocks and their scales: apply.unblock reads them
        arrays = {n: numpy_helper.to_array(t) for n, t in stored.items() if n.startswith(FACTOR_PREFIX)}
        arrays = {n: a if n in blocks else a.astype(np.float32)  # widened once, not at every switch
                  for n, a in arrays.items()}
        graph = bare_graph(proto)
        external: dict[str, dict] = {}
        for e in recipe["initializers"]:
            if e["kind"] == "patch":
                if e["name"] not in stored:
                    raise PatchError(f"The patch '{source}' misses tensor '{e['name']}': it is corrupt; write it "
                                     "again.")
                value = numpy_helper.to_array(stored[e["name"]])
                value = value.astype(FLOATS[e["dtype"]]) if e.get("dtype") in FLOATS else value
                arrays[e["name"]] = value
            else:
                value = self._base[e["base"]]
            if value.dtype.kind == "f" and value.nbytes >= EXTERNAL_BYTES:
                t = graph.graph.initializer.add(name=e["name"], data_type=onnx.helper.np_dtype_to_tensor_dtype(
                    value.dtype), dims=value.shape, data_location=onnx.TensorProto.EXTERNAL)
                t.external_data.add(key="location", value=IN_MEMORY)
                external[e["name"]] = e
            elif e["kind"] in ("lora", "dora"):  # a tiny adapted conv: rebuilt once, inline
                graph.graph.initializer.append(numpy_helper.from_array(rebuild(e, value, arrays), e["name"]))
            else:
                graph.graph.initializer.append(numpy_helper.from_array(value, e["name"]))
        names = {}
        if "names" in props:
            import ast

            try:
                names = ast.literal_eval(props["names"])
            except (ValueError, SyntaxError):
                names = {}
        return _Held(name=name, graph=graph.SerializeToString(), entries=external, stored=arrays,
                     names=names if isinstance(names, dict) else {})

    def _value(self, entry: dict, held: _Held) -> tuple[object, np.ndarray | None]:
        """``(OrtValue, the array it reads or None when shared)`` for one external initializer."""
        from onnxruntime import OrtValue

        kind = entry["kind"]
        if kind == "base":
            key = entry["base"]
            if key not in self._shared:
                self._shared[key] = OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self._base[key]))
            return self._shared[key], None
        if kind == "patch":
            array = np.ascontiguousarray(held.stored[entry["name"]])
        else:
            array = np.ascontiguousarray(rebuild(entry, self._base[entry["base"]], held.stored))
        return OrtValue.ortvalue_from_numpy(array), array

    def _session(self, held: _Held) -> tuple:
        import onnxruntime as ort

        names, values, arrays = [], [], []
        for name, entry in held.entries.items():
            value, array = self._value(entry, held)
            names.append(name)
            values.append(value)
            if array is not None:
                arrays.append(array)
        options = session_options(self.threads)
        if names:
            options.add_external_initializers(names, values)
        session = ort.InferenceSession(held.graph, options, providers=self.providers)
        return session, (values, arrays)  # onnxruntime reads these buffers in place: keep them alive


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m visionpeft.edge switch base.onnx a.vpatch b.vpatch``: switch times and memory on this device."""
    p = argparse.ArgumentParser(prog="python -m visionpeft.edge switch", description="Hold a base ONNX model and "
                                "several patches, switch between them, and report switch time, latency and memory.")
    p.add_argument("base", help="the deployed base model (.onnx)")
    p.add_argument("patches", nargs="+", help="patches (.vpatch) to hold")
    p.add_argument("--rounds", type=int, default=3, help="times each adapter is switched to (default 3)")
    p.add_argument("--keep", type=int, default=1, help="live sessions cached (default 1)")
    p.add_argument("--threads", type=int, default=1, help="onnxruntime threads (default 1; 0: all cores)")
    args = p.parse_args(argv)
    try:
        start_rss = rss_mb()
        start = time.perf_counter()
        fleet = Fleet(args.base, threads=args.threads or None, keep=args.keep)
        loaded = time.perf_counter() - start
        names = [fleet.add(patch, name=Path(patch).stem) for patch in args.patches]
        print(f"base {args.base}: read in {loaded:.2f} s; {len(names)} adapters held: {', '.join(names)}")
        times: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(max(args.rounds, 1)):
            for n in names:
                t = time.perf_counter()
                session = fleet.use(n)
                times[n].append(time.perf_counter() - t)
        x = np.random.default_rng(0).random([d if isinstance(d, int) else 1 for d in session.get_inputs()[0].shape],
                                            dtype=np.float32)
        for n in names:
            session = fleet.use(n)
            feed = {session.get_inputs()[0].name: x}
            session.run(None, feed)
            lat = []
            for _ in range(10):
                t = time.perf_counter()
                session.run(None, feed)
                lat.append(time.perf_counter() - t)
            print(f"{n}: switch {1000 * float(np.median(times[n])):.1f} ms (median of {len(times[n])}), "
                  f"latency {1000 * float(np.median(lat)):.1f} ms, classes {list(fleet.names(n).values())}")
        print(f"memory: {rss_mb():.0f} MiB RSS ({rss_mb() - start_rss:+.0f} MiB for the base, {len(names)} patches "
              f"and {min(args.keep, len(names))} live session(s))")
    except (PatchError, OSError) as e:
        return cli_error(e)
    return 0
