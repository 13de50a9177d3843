"""A training run's report folder, OUT/report/: metrics.json (held-out figures, training summary, the loss and
validation curves) and curves.png (training loss per step; validation figures over steps; for classification
the held-out confusion matrix).

Written by training.output into the adapter's temporary folder, after the manifest and before the folder is
renamed into place: the adapter and its report appear together or not at all. The manifest lists only the
adapter's own files (plain files, not this folder), so the report changes no hash. matplotlib's Agg backend
draws without a display, and is imported here only, when a report is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapters import Manifest
from training.loop import LoopStats

REPORT_FOLDER = "report"
METRICS_FILE = "metrics.json"
PLOT_FILE = "curves.png"
SMOOTHING_WINDOW = 10  # steps in the moving average drawn over the raw training loss
PLOT_DPI = 100
PANEL_SIZE = (5.0, 3.6)  # inches per panel
LOSS_FIGURES = ("loss",)  # drawn on the left axis; other validation figures (accuracy, f1) on the right


def report_data(manifest: Manifest, stats: LoopStats) -> dict[str, Any]:
    """What metrics.json holds: the manifest's figures plus the per-step curves."""
    config = manifest.train_config
    return {
        "task": config.get("task", manifest.task), "base": manifest.base_name, "data": config.get("data"),
        "method": manifest.method, "labels": list(manifest.labels), "metrics": manifest.metrics,
        "curves": {"train_loss": [round(x, 6) for x in stats.losses],
                   "validation": [dict(v) for v in stats.validations]},
    }


def write_report(folder: Path, manifest: Manifest, stats: LoopStats) -> Path:
    """Write `folder`/report/ (the adapter folder being written, not yet in place) and return its path."""
    report = Path(folder) / REPORT_FOLDER
    report.mkdir()
    data = report_data(manifest, stats)
    (report / METRICS_FILE).write_text(json.dumps(data, indent=2, sort_keys=True))
    plot_curves(stats, data["metrics"].get("held_out", {}), data["labels"], report / PLOT_FILE)
    return report


def moving_average(values: list[float] | tuple[float, ...], window: int) -> list[float]:
    """Trailing mean over up to `window` values (shorter at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_curves(stats: LoopStats, held_out: dict[str, Any], labels: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    matrix = held_out.get("confusion_matrix")
    panels = 3 if matrix else 2
    fig, axes = plt.subplots(1, panels, figsize=(PANEL_SIZE[0] * panels, PANEL_SIZE[1]), dpi=PLOT_DPI)
    steps = list(range(1, len(stats.losses) + 1))
    loss_ax = axes[0]
    loss_ax.plot(steps, stats.losses, color="tab:blue", alpha=0.35, linewidth=1, label="per step")
    loss_ax.plot(steps, moving_average(stats.losses, SMOOTHING_WINDOW), color="tab:blue", label=f"mean of {SMOOTHING_WINDOW}")
    loss_ax.set(title="training loss", xlabel="optimizer step", ylabel="loss")
    loss_ax.legend(loc="upper right", fontsize="small")
    _plot_validation(axes[1], stats, held_out)
    if matrix:
        _plot_confusion(axes[2], matrix, labels)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_validation(ax: Any, stats: LoopStats, held_out: dict[str, Any]) -> None:
    ax.set(title="validation", xlabel="optimizer step")
    if not stats.validations:  # no --eval-every: the held-out figures before (step 0) and after training
        points = _held_out_points(stats, held_out)
        for name, xs, ys in points:
            ax.plot(xs, ys, marker="o", label=name)
        ax.text(0.5, 0.02, "no validation during training (--eval-every N)", transform=ax.transAxes,
                ha="center", fontsize="small", color="gray")
        if points:
            ax.legend(loc="best", fontsize="small")
        return
    steps = [v["step"] for v in stats.validations]
    names = [k for k in stats.validations[0] if k != "step" and k != "perplexity"]
    right = ax.twinx() if any(n not in LOSS_FIGURES for n in names) else None
    for name in names:
        target = ax if name in LOSS_FIGURES else right
        target.plot(steps, [v[name] for v in stats.validations], marker="o", label=name,
                    color="tab:red" if name in LOSS_FIGURES else None)
    ax.set_ylabel("loss")
    if stats.best_step is not None:
        ax.axvline(stats.best_step, color="gray", linestyle="--", linewidth=1, label=f"best (step {stats.best_step})")
    handles = ax.get_legend_handles_labels()
    if right is not None:
        right.set_ylabel("score")
        extra = right.get_legend_handles_labels()
        handles = (handles[0] + extra[0], handles[1] + extra[1])
    ax.legend(*handles, loc="best", fontsize="small")


def _held_out_points(stats: LoopStats, held_out: dict[str, Any]) -> list[tuple[str, list[int], list[float]]]:
    if "base" in held_out and "adapter" in held_out:  # completion / pretrain: loss of the base, then the adapter
        return [("held-out loss", [0, stats.steps], [held_out["base"]["loss"], held_out["adapter"]["loss"]])]
    return [(name, [stats.steps], [held_out[name]]) for name in ("accuracy", "f1_macro") if name in held_out]


def _plot_confusion(ax: Any, matrix: list[list[int]], labels: list[str]) -> None:
    ax.imshow(matrix, cmap="Blues")
    ax.set(title="held-out confusion matrix", xlabel="predicted", ylabel="true",
           xticks=range(len(labels)), yticks=range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize="small")
    ax.set_yticklabels(labels, fontsize="small")
    peak = max((max(row) for row in matrix), default=0)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
