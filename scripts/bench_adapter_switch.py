"""What switching adapters costs in ``visionpeft.YOLO``: loading the base, the first switch to an adapter (merge
into a copy of the base) and later switches (the cached copy); medians of 7, two DoRA r8 adapters on yolo11n.

    python scripts/bench_adapter_switch.py        (run it alone on the machine: it times)
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import visionpeft as vp


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = vp.load_base("yolo11n.pt")
        files = []
        for name, names in (("crops", ["crop", "weed"]), ("coco", None)):
            vp.inject(base, vp.DoraConfig(r=8, alpha=16), adapter_name=name, names=names)
            files.append(vp.save_adapter(base, Path(tmp) / f"{name}.safetensors"))
        load, first, cached = [], [], []
        for _ in range(7):
            t = time.perf_counter()
            model = vp.YOLO("yolo11n.pt")
            load.append(time.perf_counter() - t)
            for f in files:
                model.load_adapter(f)
            t = time.perf_counter()
            model.set_adapter("crops")
            first.append(time.perf_counter() - t)
            model.set_adapter("coco")
            t = time.perf_counter()
            model.set_adapter("crops")
            cached.append(time.perf_counter() - t)
    ms = {k: 1000 * statistics.median(v) for k, v in (("load", load), ("first", first), ("cached", cached))}
    print(f"base load {ms['load']:.0f} ms, first switch {ms['first']:.0f} ms, cached switch {ms['cached']:.1f} ms")


if __name__ == "__main__":
    main()
