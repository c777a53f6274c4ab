"""The comparison's PNG plots (matplotlib, headless Agg backend)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from hf_tuningfree.compare.results import Row, Verdict, curves, outcome

FIGSIZE = (8, 5)
DPI = 100


def _seed0(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seeds = sorted({r["run"]["seed"] for r in results})
    return [r for r in results if r["run"]["seed"] == seeds[0] and r.get("status") == "ok"]


def plot_lr_sweep(rows: list[Row], v: Verdict, path: Path) -> Path:
    """Final eval loss against AdamW's learning rate; each tuning-free optimizer a horizontal line.
    The picture that answers the question."""
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    grid = sorted(
        (r for r in rows if r.role in ("adamw-grid", "adamw-default") and r.lr), key=lambda r: r.lr
    )
    finite = [r for r in grid if math.isfinite(r.eval_loss)]
    ax.plot([r.lr for r in finite], [r.eval_loss for r in finite], "o-", color="black",
            label="AdamW (tuned over the grid)")  # fmt: skip
    for r in grid:
        if not math.isfinite(r.eval_loss):
            ax.axvline(r.lr, color="black", alpha=0.15)
            ax.annotate(outcome(r), (r.lr, ax.get_ylim()[1]), rotation=90, va="top", fontsize=7)
    cmap = plt.get_cmap("tab10")
    styles = ("--", "-.", ":")  # 10 colours x 3 styles: 30 distinguishable lines
    for i, r in enumerate(x for x in rows if x.role == "tuning-free"):
        if math.isfinite(r.eval_loss):
            ax.axhline(
                r.eval_loss, color=cmap(i % 10), linestyle=styles[(i // 10) % len(styles)],
                label=f"{r.label} {r.eval_loss:.4g} (untuned)",
            )  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("AdamW learning rate")
    ax.set_ylabel("final eval loss")
    ax.set_title("Untuned optimizers (lines) vs AdamW over its learning-rate grid", fontsize=10)
    # the legend beside the axes: the lines it names span the whole width
    fig.subplots_adjust(left=0.09, right=0.68, bottom=0.11, top=0.92)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.savefig(path)
    plt.close(fig)
    return path


def _plot_curves(results, key: str, ylabel: str, title: str, path: Path, log_y: bool) -> Path:
    fig, ax = plt.subplots(figsize=FIGSIZE, dpi=DPI)
    cmap = plt.get_cmap("tab20")
    for i, r in enumerate(_seed0(results)):
        pts = curves(r)[key]
        if pts:
            xs, ys = zip(*pts, strict=True)
            style = "-" if r["run"]["role"] == "tuning-free" else ":"
            ax.plot(xs, ys, style, color=cmap(i % 20), label=r["label"], linewidth=1.2)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_all(
    results: list[dict[str, Any]], rows: list[Row], v: Verdict, output_dir: Path
) -> dict[str, Path]:
    return {
        "plot_lr_sweep": plot_lr_sweep(rows, v, output_dir / "lr_sweep.png"),
        "plot_loss_curves": _plot_curves(
            results, "train", "training loss", "Training loss (solid: tuning-free)",
            output_dir / "loss_curves.png", log_y=False,
        ),
        "plot_eval_curves": _plot_curves(
            results, "eval", "eval loss", "Evaluation loss",
            output_dir / "eval_curves.png", log_y=False,
        ),
        "plot_step_sizes": _plot_curves(
            results, "step_size", "effective step size",
            "Effective step size (d*lr, DoG's eta, learned lr; AdamW: the scheduled lr)",
            output_dir / "step_sizes.png", log_y=True,
        ),
    }  # fmt: skip
