"""The verification report of an export, typed, and the result ``export`` returns.

The fields are the keys of ``<file>.verify.json``; ``ExportReport.to_dict`` writes them in the order those files
have always had (measurements that were not taken are left out), so report files and benchmark tables keep their
form. ``ExportReport.table`` is what the CLI log and ``str(result)`` show.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..io import atomic_write_bytes


@dataclass
class Parity:
    """Differences of an export's first output from the unmerged PyTorch model's on the same images."""

    max_abs: float
    mean_abs: float
    output_scale: float  # the reference output's largest magnitude
    max_rel: float  # max_abs / output_scale: what the parity checks compare
    box_max_abs: float  # rows 0-3, box pixels
    score_max_abs: float  # the class score rows


@dataclass
class Check:
    """One pass/fail criterion: ``value`` measured against ``limit``."""

    ok: bool
    value: float
    limit: float


@dataclass
class Accuracy:
    """mAP through Ultralytics val."""

    map50_95: float
    map50: float


@dataclass
class FileReport:
    """One exported file or model folder, or the plain base's export it is compared with (no parity)."""

    file: str
    size_mb: float
    nodes: int | None = None  # ONNX files only
    initializers: int | None = None
    parity: Parity | None = None
    extra_nodes: int | None = None  # the fp32 file's nodes beyond the base export's
    latency_ms: float | None = None  # median; None when timing was skipped (runs=0)
    size_vs_fp32: float | None = None
    latency_vs_fp32: float | None = None
    latency_vs_base: float | None = None
    map50_95: float | None = None  # with val
    map50: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class ExportReport:
    """What an export was checked for and how it did. ONNX reports compare every precision written with the plain
    base's export; an edge format's (``format`` set: openvino, ncnn) holds its one model folder."""

    imgsz: list[int]
    threads: int | None
    runs: int
    exports: dict[str, FileReport]  # ONNX: by precision ("fp32", "int8"); edge formats: by quantize value ("8")
    checks: dict[str, Check] = field(default_factory=dict)
    pytorch: Accuracy | None = None  # the merged PyTorch model's mAP, with val
    adapter: str | None = None
    images: list[str] = field(default_factory=list)  # ONNX: the parity images
    base: FileReport | None = None  # ONNX: the plain base's export
    methods: list[str] = field(default_factory=list)  # ONNX: the adapter's PEFT methods
    mergeable: bool | None = None  # ONNX
    adapter_file: str | None = None  # ONNX
    format: str | None = None  # edge formats only
    precision: str | None = None  # edge formats only

    @property
    def ok(self) -> bool:
        """Whether every check passed."""
        return all(c.ok for c in self.checks.values())

    def to_dict(self) -> dict:
        """The report as ``<file>.verify.json`` holds it."""
        if self.format:
            head = {"adapter": self.adapter, "format": self.format, "precision": self.precision,
                    "imgsz": list(self.imgsz)}
        else:
            head = {"adapter": self.adapter, "methods": self.methods, "mergeable": self.mergeable,
                    "base": self.base.to_dict() if self.base else None, "adapter_file": self.adapter_file,
                    "imgsz": list(self.imgsz), "images": self.images}
        out = {**head, "threads": self.threads, "runs": self.runs,
               "exports": {k: e.to_dict() for k, e in self.exports.items()},
               "checks": {k: asdict(c) for k, c in self.checks.items()}}
        if self.pytorch is not None:
            out["pytorch"] = asdict(self.pytorch)
        return {**out, "ok": self.ok}

    def write(self, path: str | Path) -> Path:
        """Write the JSON report (atomically)."""
        return atomic_write_bytes(path, (json.dumps(self.to_dict(), indent=2) + "\n").encode())

    def table(self) -> str:
        """The report as a few lines: a fixed-width table, one row per file (ONNX), or one line (edge format),
        then one line per check."""
        lines = self._edge_lines() if self.format else self._onnx_rows()
        for name, c in self.checks.items():
            lines.append(f"{'PASS' if c.ok else 'FAIL'} {name}: {c.value:.3g} (limit {c.limit:.3g})")
        return "\n".join(lines)

    def _onnx_rows(self) -> list[str]:
        def num(v, fmt):
            return "-" if v is None else format(v, fmt)

        rows = [("file", "MB", "nodes", "inits", "max|d|", "mean|d|", "rel", "ms", "x fp32", "x base", "mAP50-95")]
        b = self.base
        if b:
            rows.append((f"base: {Path(b.file).name}", num(b.size_mb, ".2f"), str(b.nodes), str(b.initializers),
                         "-", "-", "-", num(b.latency_ms, ".2f"), "-", "1.00", "-"))
        for precision, e in self.exports.items():
            p = e.parity
            nodes = f"{e.nodes} (+{e.extra_nodes})" if e.extra_nodes is not None else str(e.nodes)
            rows.append((f"{precision}: {Path(e.file).name}", num(e.size_mb, ".2f"), nodes, str(e.initializers),
                         num(p.max_abs, ".2e"), num(p.mean_abs, ".2e"), num(p.max_rel, ".1e"),
                         num(e.latency_ms, ".2f"), num(e.latency_vs_fp32, ".2f"), num(e.latency_vs_base, ".2f"),
                         num(e.map50_95, ".4f")))
        if self.pytorch is not None:
            rows.append(("pytorch (merged)", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                         num(self.pytorch.map50_95, ".4f")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                for r in rows]

    def _edge_lines(self) -> list[str]:
        e = next(iter(self.exports.values()))
        p = e.parity
        return [f"{self.format} {self.precision}: {Path(e.file).name}  {e.size_mb:.2f} MB  "
                f"max|d| {p.max_abs:.2e} (rel. {p.max_rel:.1e})  "
                + (f"{e.latency_ms:.2f} ms ({self.threads} threads)  " if e.latency_ms is not None else "")
                + (f"mAP50-95 {e.map50_95:.4f}" if e.map50_95 is not None else "")
                + (f" (PyTorch {self.pytorch.map50_95:.4f})" if self.pytorch is not None else "")]


@dataclass
class ExportResult:
    """What ``export`` wrote, and the verification report (``None`` when verification was skipped)."""

    file: Path  # the requested export
    files: dict[str, Path]  # every export written, by precision: {"fp32": ..., "int8": ...}
    adapter: str
    base_file: Path | None = None  # the plain base model's export the files were compared with
    report: ExportReport | None = None
    report_file: Path | None = None
    metadata: dict = field(default_factory=dict)  # the visionpeft metadata stored in the files

    @property
    def ok(self) -> bool:
        """Whether every verification check passed (True when nothing was verified)."""
        return self.report is None or self.report.ok

    def __str__(self) -> str:
        return self.report.table() if self.report else "\n".join(str(f) for f in self.files.values())
