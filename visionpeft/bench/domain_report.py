"""The multi-domain table: per domain x method, mAP50-95 over seeds and its ratio to full fine-tuning of the same
seed; per method, the geometric mean of those ratios over domains and the worst domain; one plot.

Ratios are per seed (a method's run against the full fine-tuning run of the same domain and seed, which shares its
seeded data order), then averaged; their min-max shows how far a one-seed ratio can be trusted.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from statistics import fmean

ROW_COLUMNS = ["domain", "method", "kind", "epochs", "imgsz", "train_images", "seeds", "n_seeds", "map_mean",
               "map_min", "map_max", "ratio_mean", "ratio_min", "ratio_max", "n_ratios", "sec_per_epoch",
               "trainable_pct"]
SUMMARY_COLUMNS = ["method", "n_domains", "geomean_ratio", "worst_domain", "worst_ratio", "domains_missing"]
NAN = float("nan")


def geometric_mean(values: list[float]) -> float:
    """The geometric mean (0 if any value is 0: a method that failed on one domain does not average it away)."""
    if not values:
        return NAN
    if min(values) <= 0:
        return 0.0
    return math.exp(fmean(math.log(v) for v in values))


def aggregate(results: list[dict], reference: str) -> list[dict]:
    """One row per (domain, method), in the order first seen in ``results``.

    ``results``: worker results, each with ``domain``, ``method`` and ``seed``; ``reference``: the full fine-tuning
    method that ratios divide by (same domain and seed).
    """
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["domain"], r["method"]), []).append(r)
    ref = {(r["domain"], r["seed"]): r["mAP50-95"] for r in results if r["method"] == reference}
    rows = []
    for (domain, method), runs in groups.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        maps = [r["mAP50-95"] for r in runs]
        ratios = [r["mAP50-95"] / ref[domain, r["seed"]] for r in runs if ref.get((domain, r["seed"]), 0) > 0]
        first = runs[0]
        rows.append({
            "domain": domain, "method": method, "kind": first["kind"], "epochs": first.get("epochs"),
            "imgsz": first.get("imgsz"), "train_images": first.get("train_images"),
            "seeds": " ".join(str(r["seed"]) for r in runs), "n_seeds": len(runs),
            "map_mean": fmean(maps), "map_min": min(maps), "map_max": max(maps),
            "ratio_mean": fmean(ratios) if ratios else NAN, "ratio_min": min(ratios, default=NAN),
            "ratio_max": max(ratios, default=NAN), "n_ratios": len(ratios),
            "sec_per_epoch": fmean(r["sec_per_epoch"] for r in runs), "trainable_pct": first["trainable_pct"],
        })
    return rows


def summarize(rows: list[dict], reference: str, domains: list[str]) -> list[dict]:
    """Per method but the reference: geometric mean of its mean ratios over the domains that have one, and the
    worst domain. ``domains_missing`` lists the domains without a ratio yet (the mean is partial until it is empty).
    """
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != reference))
    out = []
    for method in methods:
        ratios = {r["domain"]: r["ratio_mean"] for r in rows if r["method"] == method and r["n_ratios"]}
        worst = min(ratios, key=ratios.get) if ratios else ""
        out.append({"method": method, "n_domains": len(ratios), "geomean_ratio": geometric_mean(list(ratios.values())),
                    "worst_domain": worst, "worst_ratio": ratios.get(worst, NAN),
                    "domains_missing": " ".join(d for d in domains if d not in ratios)})
    return out


def _spread(mean: float, lo: float, hi: float, digits: int) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" + (f" ({lo:.{digits}f}-{hi:.{digits}f})" if hi > lo else "")


def markdown(rows: list[dict], summary: list[dict], title: str) -> str:
    md = [f"# {title}", "",
          "mAP50-95: mean over seeds (min-max); x full: mean of the per-seed ratios to full fine-tuning (min-max).",
          "", "| domain | budget | method | seeds | mAP50-95 | x full | sec/epoch | trainable % |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        budget = f"{r['epochs']} ep x {r['imgsz']} px, {r['train_images']} img"
        md.append(f"| {r['domain']} | {budget} | {r['method']} | {r['seeds']} | "
                  f"{_spread(r['map_mean'], r['map_min'], r['map_max'], 4)} | "
                  f"{_spread(r['ratio_mean'], r['ratio_min'], r['ratio_max'], 3)} | {r['sec_per_epoch']:.1f} | "
                  f"{r['trainable_pct']:.1f} |")
    md += ["", "Per method: geometric mean of x full over the domains, and the worst domain.", "",
           "| method | domains | geometric mean x full | worst domain (x full) |", "|---|---|---|---|"]
    for s in summary:
        missing = f" (missing: {s['domains_missing']})" if s["domains_missing"] else ""
        worst = f"{s['worst_domain']} ({s['worst_ratio']:.3f})" if s["worst_domain"] else "-"
        md.append(f"| {s['method']} | {s['n_domains']}{missing} | {s['geomean_ratio']:.3f} | {worst} |")
    return "\n".join(md) + "\n"


def write_domain_reports(results: list[dict], reference: str, domains: list[str], out_dir: Path,
                         model: str) -> tuple[list[dict], list[dict]]:
    """``results_domains.csv`` (one row per domain x method), ``summary_domains.csv``, ``results_domains.md``
    (both tables) and ``ratio_by_domain.png`` in ``out_dir``; returns the rows and the summary."""
    rows = aggregate(results, reference)
    summary = summarize(rows, reference, domains)
    title = f"Multi-domain benchmark ({model}): mAP50-95 and its ratio to full fine-tuning"
    for name, columns, data in [("results_domains.csv", ROW_COLUMNS, rows),
                                ("summary_domains.csv", SUMMARY_COLUMNS, summary)]:
        with open(out_dir / name, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(data)
    (out_dir / "results_domains.md").write_text(markdown(rows, summary, title))
    plot_ratios(rows, summary, reference, domains, out_dir / "ratio_by_domain.png",
                f"{model}: mAP50-95 / full fine-tuning (mean, min-max over seeds)")
    return rows, summary


def plot_ratios(rows: list[dict], summary: list[dict], reference: str, domains: list[str], path: Path,
                title: str) -> None:
    """x full per domain per method (a marker at the mean, a bar over the seeds' min-max), a line at 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    geo = {s["method"]: s["geomean_ratio"] for s in summary}
    methods = list(geo)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(domains)), 4.5))
    ax.axhline(1.0, color="crimson", lw=1, ls="--", label=f"{reference} (full fine-tuning)")
    width = 0.6 / max(len(methods), 1)
    for j, method in enumerate(methods):
        pts = [(domains.index(r["domain"]), r) for r in rows
               if r["method"] == method and r["n_ratios"] and r["domain"] in domains]
        if not pts:
            continue
        x = [i + (j - (len(methods) - 1) / 2) * width for i, _ in pts]
        y = [r["ratio_mean"] for _, r in pts]
        err = [[r["ratio_mean"] - r["ratio_min"] for _, r in pts], [r["ratio_max"] - r["ratio_mean"] for _, r in pts]]
        ax.errorbar(x, y, yerr=err, fmt="o", capsize=3,
                    label=f"{method} (geometric mean {geo[method]:.3f}, {len(pts)}/{len(domains)} domains)")
    budgets = {r["domain"]: f"\n{r['epochs']} ep x {r['imgsz']} px\n{r['train_images']} img" for r in rows}
    ax.set_xticks(range(len(domains)), [d + budgets.get(d, "") for d in domains], fontsize=8)
    ax.set_xlim(-0.5, len(domains) - 0.5)
    ax.set_ylabel("x full fine-tuning (same seed)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
