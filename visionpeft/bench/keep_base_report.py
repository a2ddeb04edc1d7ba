"""Reports of the keep-base benchmark: ``results.csv``, ``results.md`` and ``keep_base.png`` (base-class mAP vs
new-class mAP, coloured by latency against the plain base)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

COLUMNS = ["name", "kind", "layer", "new_map50_95", "new_vs_recipe", "base_map50_95", "base_map50_95_onnx",
           "base_drop_points", "base_train_map50_95", "base_train_drop_points", "latency_ms", "latency_vs_base",
           "onnx_mb", "adapter_kb", "trainable_pct", "sec_per_epoch"]
HEADERS = ["run", "kind", "L", "new mAP50-95", "x recipe", "base mAP50-95", "base (ONNX)", "base drop (pts)",
           "base, train split", "its drop (pts)", "ms", "x base", "ONNX MB", "adapter KB", "trainable %", "s/epoch"]
REFERENCE = "recipe"  # the plain recipe: the new-class bar is relative to it


def rows(results: dict[str, dict]) -> list[dict]:
    """One flat row per run (the untouched base first), with ratios to the recipe and to the base."""
    base = results.get("base", {})
    recipe = results.get(REFERENCE, {}).get("new_map50_95")
    out = []
    for r in results.values():
        t = r.get("training", {})
        row = {k: r.get(k) for k in COLUMNS}
        row["kind"] = {True: "keep_base", "single": "single path"}.get(r.get("keep_base"), r["kind"])
        row["new_vs_recipe"] = r["new_map50_95"] / recipe if recipe else math.nan
        row["base_drop_points"] = 100 * (base.get("base_map50_95", math.nan) - r["base_map50_95"])
        row["base_train_drop_points"] = 100 * (base.get("base_train_map50_95", math.nan)
                                               - r.get("base_train_map50_95", math.nan))
        row["adapter_kb"] = t.get("task_file_kb") if r["kind"] == "peft" else None
        row["trainable_pct"], row["sec_per_epoch"] = t.get("trainable_pct"), t.get("sec_per_epoch")
        out.append(row)
    return out


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def write_keep_reports(results: dict[str, dict], out_dir: Path, title: str) -> None:
    table = rows(results)
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(table)
    md = [f"# keep_base: {title}", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    md += ["| " + " | ".join(_fmt(r[c]) for c in COLUMNS) + " |" for r in table]
    (out_dir / "results.md").write_text("\n".join(md) + "\n")
    plot(table, out_dir / "keep_base.png", title)


def plot(table: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    points = ax.scatter([r["new_map50_95"] for r in table], [r["base_map50_95"] for r in table],
                        c=[r["latency_vs_base"] for r in table], cmap="viridis", s=60, zorder=3)
    for r in table:
        ax.annotate(f"{r['name']} ({r['latency_vs_base']:.2f}x)", (r["new_map50_95"], r["base_map50_95"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    fig.colorbar(points, ax=ax, label="ONNX latency vs the plain base (1 thread)")
    ax.set_xlabel("new-class mAP50-95")
    ax.set_ylabel("base-class mAP50-95 (merged PyTorch model)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
