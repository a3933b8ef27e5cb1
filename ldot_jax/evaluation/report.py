"""The report of a two-stage evaluation (two_stage.py): the Report, its Markdown table, the
recall-versus-latency plot, and writing them to a directory.

    report, paths = two_stage.evaluate_workdir(workdir, reranker_dir)
    print(report_lib.table(report))                   # one row per stage (and M)
    report_lib.write(report, out_dir)                 # report.json, report.md, the plot
"""

from __future__ import annotations

import dataclasses
import json
import logging

from ldot_jax.core import fileutil, paths
from ldot_jax.evaluation import recall

log = logging.getLogger(__name__)

KS = recall.KS
CAPTION_TRUE_COLUMNS = {"ct_ir_r1": "CT IR R@1", "ct_ir_r5": "CT IR R@5",
                        "ct_tr_r1": "CT TR R@1", "ct_ar": "CT AR"}


@dataclasses.dataclass
class Report:
    """rows: one per stage {stage, m, metrics, ms {t2i, i2t}, speedup {t2i, i2t}};
    all_pairs: the baseline's timing ({} without a re-ranker); queries {t2i, i2t}: how many
    were evaluated; corpus {images, captions}: the split's sizes; alpha: the fused rows' α
    (None: no fused rows); alpha_choice: how α was chosen {split, queries, m, ir_r1: {α: IR
    R@1}} (None: not)."""

    rows: list[dict]
    all_pairs: dict
    queries: dict
    corpus: dict
    alpha: float | None = None
    alpha_choice: dict | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, default=float)


def table(report: Report) -> str:
    """A Markdown table of the report."""
    # Caption-true recall (data/scenes_truth.py) when the rows have it.
    true = [k for k in CAPTION_TRUE_COLUMNS if all(k in r["metrics"] for r in report.rows)]
    head = ("| stage | M | IR R@1 | IR R@5 | IR R@10 | TR R@1 | TR R@5 | TR R@10 | AR | "
            + "".join(f"{CAPTION_TRUE_COLUMNS[k]} | " for k in true)
            + "ms/query t→i | ms/query i→t | speed-up t→i | speed-up i→t |")
    lines = [head, "|" + "---|" * (13 + len(true))]
    for r in report.rows:
        m = r["metrics"]
        speed = r.get("speedup", {})
        lines.append("| " + " | ".join([
            r["stage"], str(r["m"] or "–"),
            *(f"{m[f'{d}_r{k}']:.1f}" for d in ("ir", "tr") for k in KS), f"{m['ar']:.1f}",
            *(f"{m[k]:.1f}" for k in true),
            f"{r['ms']['t2i']:.3f}", f"{r['ms']['i2t']:.3f}",
            *(f"{speed[d]:,.0f}×" if d in speed else "–" for d in ("t2i", "i2t"))]) + " |")
    if report.all_pairs:
        a = report.all_pairs
        lines.append("| all pairs (cross-encoder) | all | " + "| " * (7 + len(true))
                     + f"{a['t2i']:.1f} | {a['i2t']:.1f} | 1× | 1× |")
        lines.append("")
        lines.append(f"All pairs: {a['label']}; {a['ms_per_pair']:.4f} ms per pair.")
    lines.append(f"Queries: {report.queries['t2i']:,} captions (IR), {report.queries['i2t']:,} "
                 f"images (TR) over {report.corpus['images']:,} images and "
                 f"{report.corpus['captions']:,} captions.")
    if true:
        lines.append("Caption-true (CT) recall: a hit when the top K holds an image the "
                     "caption is true of (IR) / a caption true of the image (TR).")
    if report.alpha_choice:
        c = report.alpha_choice
        lines.append(f"α of the fused rows chosen on {c['split']} ({c['queries']:,} caption "
                     f"queries, IR R@1 at M={c['m']}): " + ", ".join(
                         f"α={a} {r:.1f}" for a, r in c["ir_r1"].items()) + ".")
    return "\n".join(lines)


def plot(report: Report, path: str) -> str | None:
    """Recall-versus-latency (IR R@1 and AR against ms per caption query, log scale)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install ldot_jax[bench])")
        return None
    # One panel per metric; each stage a series (the re-ranked ones joined over M), so the
    # re-ranker alone and fused are told apart at the same latency.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    stages = list(dict.fromkeys(r["stage"] for r in report.rows))
    markers = dict(zip(stages, "os^Dvp<>"))
    for ax, (metric, name) in zip(axes, (("ir_r1", "IR R@1"), ("ar", "AR"))):
        for stage in stages:
            rows = [r for r in report.rows if r["stage"] == stage]
            xs = [r["ms"]["t2i"] for r in rows]
            ys = [r["metrics"][metric] for r in rows]
            ax.plot(xs, ys, marker=markers[stage], linestyle="-" if len(rows) > 1 else "",
                    label=stage)
            for r, x, y in zip(rows, xs, ys):
                if r["m"] is not None:
                    ax.annotate(f"M={r['m']}", (x, y), textcoords="offset points",
                                xytext=(4, 3), fontsize=7)
        if report.all_pairs:
            ax.axvline(report.all_pairs["t2i"], color="gray", linestyle="--",
                       label="all pairs (extrapolated)")
        ax.set_xscale("log")
        ax.set_xlabel("ms per caption query (batched, CPU)")
        ax.set_ylabel(f"{name} (%)")
        ax.set_title(f"{name} vs latency")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Two-stage retrieval: {report.queries['t2i']:,} caption queries over "
                 f"{report.corpus['images']:,} images")
    fig.tight_layout()
    with fileutil.atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path


def write(report: Report, out_dir: str) -> dict[str, str]:
    """report.json, report.md and recall_latency.png in out_dir (each written atomically)."""
    paths.make_dirs(out_dir)
    written = {"json": paths.join(out_dir, "report.json"),
               "md": paths.join(out_dir, "report.md")}
    fileutil.atomic_write_text(written["json"], report.to_json())
    fileutil.atomic_write_text(written["md"], table(report) + "\n")
    picture = plot(report, paths.join(out_dir, "recall_latency.png"))
    if picture:
        written["png"] = picture
    return written
