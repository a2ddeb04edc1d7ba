"""Edge benchmark (issue 16): adapter switching on one device, edge formats, INT8 next to Ultralytics' own.

    python scripts/bench_edge.py --run runs/detect/crops            # every part, ~10 min on 2 idle cores
    python scripts/bench_edge.py --run runs/detect/crops --parts int8 --threads 1 2

Writes ``<out>/results.md`` (the tables) and one csv per part (``fleet.csv``, ``formats.csv``, ``int8.csv``) into
``--out`` (default ``runs/benchmark/edge``). Timings are only meaningful on an otherwise idle machine: every file
of a table is timed in turn, so load shifts all alike, but threads compete with other processes.

- fleet: one base ONNX and N = 1, 3, 10 patches (the run's adapter, and for N > 1 variants of it with perturbed
  factors: same size and structure) held by ``visionpeft.edge.Fleet``, each configuration in its own process with
  torch blocked (a device's memory): switch time, RSS, bytes on disk, against N merged ONNX files loaded from disk.
- formats: OpenVINO FP32 / INT8 (NNCF) and NCNN FP32 of the merged adapter through the Ultralytics exporter:
  size, parity to the unmerged model, latency, mAP50-95 (``--val``) against the merged PyTorch model.
- int8: visionpeft's INT8 ONNX and Ultralytics' (``quantize=8``), both calibrated on the same number of *train*
  images, on the merged adapter (its dataset), on the adapters of ``--int8-runs`` and on the plain base
  (``--base-data``, default coco128); with several models, a mean row per file kind.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

FLEET_SIZES = (1, 3, 10)
BLOCK_TORCH = """
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"torch", "torchvision", "ultralytics", "timm"}:
            raise ModuleNotFoundError(f"No module named '{name}' (edge benchmark: a device has no torch)", name=name)
sys.meta_path.insert(0, _Blocked())
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/bench_edge.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="training run folder (default: the newest runs/detect/*/weights/best.safetensors)")
    p.add_argument("--parts", default="fleet,formats,int8", help="comma-separated: fleet, formats, int8")
    p.add_argument("--imgsz", type=int, help="image size (default: the run's)")
    p.add_argument("--data", help="the adapter's dataset (default: the run's)")
    p.add_argument("--base-data", default="coco128", help="dataset for the plain base's INT8 rows (default coco128)")
    p.add_argument("--int8-runs", nargs="*", default=[], metavar="RUN",
                   help="more training runs whose merged adapters get INT8 rows too (each on its own dataset): an "
                        "mAP drop of a few tenths is quantization luck on one model, a mean over models is not")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="onnxruntime/OpenVINO/NCNN threads")
    p.add_argument("--runs", type=int, default=50, help="timed runs per file (median)")
    p.add_argument("--calib", type=int, default=128, help="INT8 calibration images (train split)")
    p.add_argument("--adapters", type=int, nargs="+", default=list(FLEET_SIZES), help="fleet sizes N")
    p.add_argument("--no-val", dest="val", action="store_false", help="skip mAP (validation is most of the time)")
    p.add_argument("--out", default="runs/benchmark/edge", help="output folder")
    return p


def newest_run() -> Path:
    runs = sorted(Path("runs/detect").glob("*/weights/best.safetensors"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError("No training run found under runs/detect: pass --run <run folder>, e.g. after python "
                                "scripts/train.py --cfg crops.yaml.")
    return runs[-1].parent.parent


def write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


def markdown(rows: list[dict], columns: dict[str, str]) -> str:
    """A markdown table of ``rows`` with ``{header: key}`` columns (floats to 4 significant places)."""
    def cell(v):
        if v is None or v == "":
            return "-"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in columns.values()) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- fleet
FLEET_WORKER = """
import json, sys, time
import numpy as np
from visionpeft.edge.fleet import Fleet, rss_mb
spec = json.loads(sys.argv[1])
start = rss_mb()
out = {"rss_start_mb": start}
x = np.random.default_rng(0).random((1, 3, spec["imgsz"], spec["imgsz"]), dtype=np.float32)
if spec["mode"] == "disk":  # the baseline: each task is a full merged ONNX file, loaded from disk
    import onnxruntime as ort
    ort.disable_telemetry_events()
    def load(path):
        o = ort.SessionOptions(); o.intra_op_num_threads = spec["threads"]; o.log_severity_level = 3
        return ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    live = []
    times = []
    for _ in range(spec["rounds"]):
        for p in spec["merged"]:
            t = time.perf_counter(); s = load(p); times.append(time.perf_counter() - t)
            s.run(None, {"images": x})
            if spec["keep"] > 1 and len(live) < spec["keep"]:
                live.append(s)
    out["switch_ms"] = out["build_ms"] = 1000 * float(np.median(times))
else:
    t = time.perf_counter()
    fleet = Fleet(spec["base"], threads=spec["threads"], keep=spec["keep"])
    names = [fleet.add(p, name=str(i)) for i, p in enumerate(spec["patches"])]
    out["hold_s"] = time.perf_counter() - t
    first, later = [], []
    for r in range(spec["rounds"] + 1):
        for n in names:
            t = time.perf_counter(); session = fleet.use(n); dt = time.perf_counter() - t
            session.run(None, {"images": x})
            (first if r == 0 else later).append(dt)
    out["build_ms"] = 1000 * float(np.median(first))  # a session built from the patch and the base in memory
    out["switch_ms"] = 1000 * float(np.median(later))  # later switches: rebuilt (keep 1, N > 1) or cached
out["rss_mb"] = rss_mb()
print("RESULT " + json.dumps(out))
"""


def _worker(spec: dict, site: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path.cwd())])}
    run = subprocess.run([sys.executable, "-c", FLEET_WORKER, json.dumps(spec)], env=env, capture_output=True,
                         text=True)
    line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
    if run.returncode or line is None:
        raise RuntimeError(f"fleet worker failed ({spec['mode']}, N={len(spec.get('patches') or spec['merged'])}): "
                           f"{run.stderr.strip().splitlines()[-1:]}")
    return json.loads(line[7:])


def variants(patch: Path, n: int, folder: Path) -> list[Path]:
    """``patch`` and ``n - 1`` variants of it: the adapter factors scaled by 1 + 10 % noise (seeded)."""
    import onnx
    from onnx import numpy_helper

    from ..edge.apply import FACTOR_PREFIX

    out = [patch]
    proto = onnx.load(str(patch))
    for k in range(1, n):
        rng = np.random.default_rng(k)
        v = onnx.ModelProto()
        v.CopyFrom(proto)
        for t in v.graph.initializer:
            if t.name.startswith(FACTOR_PREFIX) and t.name.rsplit("/", 1)[-1] in ("A", "B"):
                a = numpy_helper.to_array(t)
                t.CopyFrom(numpy_helper.from_array((a * (1 + 0.1 * rng.standard_normal(a.shape))).astype(a.dtype),
                                                   t.name))
        path = folder / f"{patch.stem}_v{k}.vpatch"
        path.write_bytes(v.SerializeToString())
        out.append(path)
    return out


def bench_fleet(adapter: Path, imgsz: int, sizes: list[int], threads: int, rounds: int, work: Path) -> list[dict]:
    from ..edge import apply_patch
    from ..export.patch import export_patch

    result = export_patch(adapter=adapter, imgsz=imgsz, out=work / "crops.vpatch")
    patches = variants(result.file, max(sizes), work)
    merged = []
    for p in patches:
        merged.append(work / f"{p.stem}.onnx")
        apply_patch(result.base_file, p, merged[-1])
    site = work / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(textwrap.dedent(BLOCK_TORCH))
    rows = []
    base_mb = result.base_file.stat().st_size / 2**20
    for n in sizes:
        ps, ms = [str(p) for p in patches[:n]], [str(m) for m in merged[:n]]
        common = {"imgsz": imgsz, "threads": threads, "rounds": rounds}
        cases = [("fleet, keep 1 session", {"mode": "fleet", "keep": 1, "base": str(result.base_file), "patches": ps}),
                 (f"fleet, keep {n} sessions", {"mode": "fleet", "keep": n, "base": str(result.base_file),
                                                "patches": ps}),
                 ("merged ONNX from disk, 1 session", {"mode": "disk", "keep": 1, "merged": ms}),
                 (f"merged ONNX from disk, {n} sessions", {"mode": "disk", "keep": n, "merged": ms})]
        for label, spec in cases:
            if n == 1 and label.endswith("sessions"):
                continue  # keep N == keep 1
            r = _worker({**common, **spec}, site)
            disk = (base_mb + sum(Path(p).stat().st_size for p in ps) / 2**20) if spec["mode"] == "fleet" else \
                sum(Path(m).stat().st_size for m in ms) / 2**20
            rows.append({"N": n, "setup": label, "build_ms": r["build_ms"], "switch_ms": r["switch_ms"],
                         "rss_mb": r["rss_mb"],
                         "rss_over_start_mb": r["rss_mb"] - r["rss_start_mb"], "disk_mb": disk, "threads": threads})
    return rows


# -------------------------------------------------------------------------------------------------------- formats
def bench_formats(adapter: Path, imgsz: int, data: Path, threads: list[int], runs: int, calib: int, val: bool,
                  work: Path) -> list[dict]:
    from ..export import formats
    from ..export.pipeline import export
    from ..export.verify import latency_ms

    onnx_result = export(adapter=adapter, imgsz=imgsz, data=data, out=work / "onnx", verify=True, val=val, runs=0)
    fp32, torch_acc = onnx_result.report.exports["fp32"], onnx_result.report.pytorch
    rows = [{"format": "ONNX (onnxruntime)", "precision": "fp32", "path": onnx_result.files["fp32"],
             "size_mb": fp32.size_mb, "max_rel": fp32.parity.max_rel, "map50_95": fp32.map50_95,
             "pytorch_map50_95": torch_acc.map50_95 if torch_acc else None}]
    for fmt, quantize in (("openvino", 32), ("openvino", 8), ("ncnn", 32)):
        r = export(adapter=adapter, imgsz=imgsz, data=data, out=work / "edge", format=fmt, quantize=quantize,
                   verify=True, val=val, runs=0, calib=calib)
        e, torch_acc = next(iter(r.report.exports.values())), r.report.pytorch
        rows.append({"format": {"openvino": "OpenVINO", "ncnn": "NCNN"}[fmt], "precision": r.metadata["precision"],
                     "path": r.file, "size_mb": e.size_mb, "max_rel": e.parity.max_rel, "map50_95": e.map50_95,
                     "pytorch_map50_95": torch_acc.map50_95 if torch_acc else None})
    for t in threads:
        onnx_ms = latency_ms([rows[0]["path"]], (imgsz, imgsz), runs=runs, threads=t)
        edge_ms = formats.latency([r["path"] for r in rows[1:]], (imgsz, imgsz), runs=runs, threads=t)
        for r, ms in zip(rows, onnx_ms + edge_ms, strict=True):
            r[f"ms_{t}t"] = ms
    for r in rows:
        r["path"] = str(r["path"])
        if r.get("map50_95") is not None and r.get("pytorch_map50_95") is not None:
            r["map_drop_points"] = 100 * (r["pytorch_map50_95"] - r["map50_95"])
    return rows


# ----------------------------------------------------------------------------------------------------------- int8
def ultralytics_int8(model, src_name: str, data: Path, imgsz: int, calib: int, folder: Path) -> Path:
    """Ultralytics' own INT8 ONNX export (``quantize=8``) of a plain model, calibrated on its train split."""
    import copy

    from ultralytics.engine.exporter import Exporter

    from ..export.formats import _fraction
    from ..export.onnx import _quiet, telemetry_off
    from ..integrations.ultralytics import set_export_name

    telemetry_off()
    m = copy.deepcopy(model).cpu()
    set_export_name(m, folder / f"{src_name}.pt")
    overrides = {"format": "onnx", "imgsz": imgsz, "batch": 1, "device": "cpu", "quantize": 8, "simplify": True,
                 "data": str(data), "split": "train", "fraction": _fraction(data, calib), "verbose": False,
                 "mode": "export", "nms": None, "dynamic": False}
    with _quiet():
        return Path(Exporter(overrides=overrides)(model=m))


def bench_int8(label: str, model, data: Path, imgsz: int, threads: list[int], runs: int, calib: int, val: bool,
               work: Path) -> list[dict]:
    """FP32 ONNX, visionpeft INT8 and Ultralytics INT8 of one plain (merged) model: size, latency, mAP."""
    from ..export.images import letterbox, split_images
    from ..export.onnx import export_onnx
    from ..export.quantize import to_int8
    from ..export.verify import latency_ms, val_onnx, val_torch

    folder = work / label.replace(" ", "_")
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = export_onnx(model, folder / "fp32.onnx", imgsz=imgsz)
    t = time.perf_counter()
    ours = to_int8(fp32, folder / "visionpeft_int8.onnx",
                   [letterbox(p, (imgsz, imgsz)) for p in split_images(data, "train", calib)])
    ours_s = time.perf_counter() - t
    t = time.perf_counter()
    theirs = ultralytics_int8(model, "ultralytics", data, imgsz, calib, folder)
    theirs_s = time.perf_counter() - t
    files = {"FP32 ONNX": fp32, "visionpeft INT8": ours, "Ultralytics INT8 (quantize=8)": theirs}
    rows = [{"model": label, "file": k, "size_mb": Path(v).stat().st_size / 2**20} for k, v in files.items()]
    rows[1]["quantize_s"], rows[2]["quantize_s"] = ours_s, theirs_s
    for t in threads:
        for r, ms in zip(rows, latency_ms(list(files.values()), (imgsz, imgsz), runs=runs, threads=t), strict=True):
            r[f"ms_{t}t"] = ms
            r[f"x_fp32_{t}t"] = ms / rows[0][f"ms_{t}t"] if rows[0].get(f"ms_{t}t") else None
    if val:
        torch_map = val_torch(model, data, imgsz)["map50_95"]
        for r, path in zip(rows, files.values(), strict=True):
            r["map50_95"] = val_onnx(path, data)["map50_95"]
            r["pytorch_map50_95"] = torch_map
            r["map_drop_points"] = 100 * (torch_map - r["map50_95"])
    return rows


def int8_means(rows: list[dict]) -> list[dict]:
    """One row per file kind with the mean over the models benchmarked (latency ratios, mAP drop), when > 1 model."""
    models = {r["model"] for r in rows}
    if len(models) < 2:
        return []
    means = []
    for kind in dict.fromkeys(r["file"] for r in rows):
        same = [r for r in rows if r["file"] == kind]
        row = {"model": f"mean of {len(same)} models", "file": kind}
        for key in [k for k in same[0] if k.startswith("x_fp32_") or k in ("size_mb", "map_drop_points")]:
            values = [r[key] for r in same if r.get(key) is not None]
            row[key] = float(np.mean(values)) if len(values) == len(same) else None
        means.append(row)
    return means


# ----------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from ultralytics.utils import YAML

    from ..datasets import resolve_dataset
    from ..export.pipeline import resolve_inputs
    from ..fonts import ensure_fonts
    from ..inject import merge
    from ..io import load_adapter
    from ..models import load_base

    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - {"fleet", "formats", "int8"}
    if unknown:
        print(f"bench_edge: error: unknown part(s) {sorted(unknown)}: use fleet, formats, int8.", file=sys.stderr)
        return 2
    run = Path(args.run) if args.run else newest_run()
    base, adapter, run_args, _ = resolve_inputs(None, None, run)
    imgsz = int(args.imgsz or run_args.get("imgsz", 320))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_fonts()
    md = [f"# Edge benchmark: {adapter} on {Path(str(base)).name}, imgsz {imgsz}",
          f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs, load average before: "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())} (timings are only meaningful on an idle machine)"]
    with tempfile.TemporaryDirectory(prefix="visionpeft-bench-edge-") as tmp:
        work = Path(tmp)
        data = resolve_dataset(args.data or run_args.get("data"), work) if parts & {"formats", "int8"} else None
        if "fleet" in parts:
            rows = bench_fleet(adapter, imgsz, sorted(set(args.adapters)), args.threads[0], 3, work / "fleet")
            write_csv(out / "fleet.csv", rows)
            md += ["", f"## Several tasks on one device ({args.threads[0]} thread(s); torch blocked in each process)",
                   "", markdown(rows, {"N adapters": "N", "setup": "setup", "first load ms": "build_ms",
                                       "switch ms": "switch_ms",
                                       "RSS MB": "rss_mb", "RSS over start MB": "rss_over_start_mb",
                                       "on disk MB": "disk_mb"})]
        if "formats" in parts:
            rows = bench_formats(adapter, imgsz, data, args.threads, args.runs, args.calib, args.val, work / "fmt")
            write_csv(out / "formats.csv", rows)
            cols = {"format": "format", "precision": "precision", "MB": "size_mb", "max rel. diff": "max_rel"}
            cols.update({f"ms {t}T": f"ms_{t}t" for t in args.threads})
            cols.update({"mAP50-95": "map50_95", "PyTorch merged": "pytorch_map50_95", "drop (points)":
                         "map_drop_points"})
            md += ["", "## Edge formats (merged adapter, Ultralytics exporter)", "", markdown(rows, cols)]
        if "int8" in parts:
            adapted = load_base(base)
            load_adapter(adapted, adapter)
            rows = bench_int8("adapter (merged)", merge(adapted), data, imgsz, args.threads, args.runs, args.calib,
                              args.val, work / "int8")
            for i, extra in enumerate(args.int8_runs):
                extra_base, extra_adapter, extra_args, _ = resolve_inputs(None, None, extra)
                model = load_base(extra_base)
                load_adapter(model, extra_adapter)
                extra_data = resolve_dataset(extra_args.get("data"), work / f"int8_data{i}")
                rows += bench_int8(f"adapter: {Path(str(extra_args.get('data'))).stem}", merge(model), extra_data,
                                   imgsz, args.threads, args.runs, args.calib, args.val, work / f"int8_{i}")
            base_data = resolve_dataset(args.base_data, work / "base_data")
            rows += bench_int8("plain base", load_base(base), base_data, imgsz, args.threads, args.runs, args.calib,
                               args.val, work / "int8")
            rows += int8_means(rows)
            write_csv(out / "int8.csv", rows)
            cols = {"model": "model", "file": "file", "MB": "size_mb"}
            for t in args.threads:
                cols.update({f"ms {t}T": f"ms_{t}t", f"x FP32 {t}T": f"x_fp32_{t}t"})
            cols.update({"mAP50-95": "map50_95", "drop vs PyTorch (points)": "map_drop_points",
                         "quantize s": "quantize_s"})
            md += ["", f"## INT8 ONNX: visionpeft vs Ultralytics (calibration: {args.calib} train images each; "
                   f"plain base on {args.base_data})", "", markdown(rows, cols)]
    (out / "results.md").write_text("\n".join(md) + "\n")
    YAML.save(out / "args.yaml", {**vars(args), "run": str(run), "imgsz": imgsz})
    print("\n".join(md))
    print(f"\nbench_edge: written to {out}/results.md")
    return 0
