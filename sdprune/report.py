"""Terminal tables, JSON and CSV files, and plots of an importance report.

The plots use matplotlib's Agg canvas directly instead of pyplot, so writing
them needs no display and leaves no global figure state behind.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sdprune import atomic

JSON_FILE = "importance.json"
CSV_FILE = "importance.csv"
IMPORTANCE_PLOT = "importance.png"
CURVE_PLOT = "depth_curve.png"

CSV_COLUMNS = (
    "index", "stage", "transition", "survival_prob", "lesion_accuracy", "lesion_accuracy_delta",
    "lesion_loss", "lesion_loss_delta", "contribution_mean", "contribution_stderr", "norm_ratio",
)

TRANSITION_COLOR = "tab:orange"
BLOCK_COLOR = "tab:blue"


def format_importance_table(report: dict[str, Any]) -> str:
    """Lay out the per-block figures and the depth curve as fixed-width text."""
    full = report["full"]
    lines = [
        f"{report.get('run') or 'model'}: {report.get('arch') or 'network'} on {report['images']} "
        f"{report.get('split') or ''} images, full network accuracy {full['accuracy']:.2%}, loss {full['loss']:.4f}",
        "",
        f"{'block':>5} {'stage':>5} {'trans':>5} {'p_l':>5}  {'lesion acc':>10} {'d acc':>7} {'d loss':>8}"
        f"  {'contribution':>16}  {'norm':>6}",
    ]
    for block in report["blocks"]:
        contribution = f"{block['contribution_mean']:+.4f}±{block['contribution_stderr']:.4f}"
        lines.append(
            f"{block['index']:>5} {block['stage']:>5} {'yes' if block['transition'] else '':>5} "
            f"{block['survival_prob']:>5.2f}  {block['lesion_accuracy']:>10.2%} "
            f"{100 * block['lesion_accuracy_delta']:>+7.2f} {block['lesion_loss_delta']:>+8.4f}"
            f"  {contribution:>16}  {block['norm_ratio']:>6.3f}"
        )
    lines.append("d acc: accuracy change in points with only that block removed; contribution: mean loss "
                 "increase when removed from a random sub-network, ± standard error")

    lines += ["", f"{'kept':>4} {'removed':>7} {'accuracy':>9} {'loss':>8} {'params':>10} {'MACs':>13}"]
    for entry in report["curve"]:
        removed = entry["removed_block"] if entry["removed_block"] is not None else "-"
        lines.append(
            f"{entry['blocks_kept']:>4} {removed:>7} {entry['accuracy']:>9.2%} {entry['loss']:>8.4f} "
            f"{entry['params']:>10,} {entry['macs']:>13,}"
        )

    timing = report["timing"]
    if timing.get("sweep_cost_ratio") is not None:
        lines += ["", f"lesion sweep {timing['sweep_seconds']:.2f}s against {timing['plain_seconds']:.2f}s for "
                      f"{timing['plain_passes']} plain passes (ratio {timing['sweep_cost_ratio']:.2f})"]
    return "\n".join(lines)


def write_json(path: Path, report: dict[str, Any]) -> None:
    atomic.write_json(path, report)


def write_csv(path: Path, report: dict[str, Any]) -> None:
    """Write one row per analyzed block with the columns of CSV_COLUMNS."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for block in report["blocks"]:
        writer.writerow(block)
    atomic.write_text(path, buffer.getvalue())


def _save_figure(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    # The temporary file has no .png suffix, so the format is named explicitly.
    atomic.write_with(path, lambda temporary: figure.savefig(temporary, format="png", dpi=120))


def plot_importance(path: Path, report: dict[str, Any]) -> None:
    """Draw per-block bars of lesion accuracy drop, survival contribution and norm ratio."""
    blocks = report["blocks"]
    labels = [str(block["index"]) for block in blocks]
    colors = [TRANSITION_COLOR if block["transition"] else BLOCK_COLOR for block in blocks]
    positions = range(len(blocks))

    figure = Figure(figsize=(max(6.0, 0.35 * len(blocks) + 3.0), 8.0), layout="constrained")
    lesion, contribution, norm = figure.subplots(3, 1, sharex=True)
    lesion.bar(positions, [-100 * block["lesion_accuracy_delta"] for block in blocks], color=colors)
    lesion.set_ylabel("accuracy drop (points)")
    lesion.set_title("Lesion: only this block removed")

    contribution.bar(positions, [block["contribution_mean"] for block in blocks],
                     yerr=[block["contribution_stderr"] for block in blocks], capsize=3, color=colors)
    contribution.set_ylabel("loss increase")
    contribution.set_title(f"Survival contribution, {report['samples']} sub-networks (± standard error)")

    norm.bar(positions, [block["norm_ratio"] for block in blocks], color=colors)
    norm.set_ylabel("||p f(x)|| / ||shortcut(x)||")
    norm.set_title("Branch-to-shortcut norm ratio")
    norm.set_xticks(list(positions), labels)
    norm.set_xlabel("block (orange: transition block)")

    for axes in (lesion, contribution, norm):
        axes.axhline(0.0, color="black", linewidth=0.8)
    _save_figure(figure, path)


def plot_depth_curve(path: Path, report: dict[str, Any]) -> None:
    """Draw accuracy against blocks kept, with parameters and MACs as % of the full network."""
    curve = report["curve"]
    kept = [entry["blocks_kept"] for entry in curve]
    full_params = curve[0]["params"]
    full_macs = curve[0]["macs"]

    figure = Figure(figsize=(7.0, 4.5), layout="constrained")
    accuracy_axes = figure.subplots()
    accuracy_axes.plot(kept, [100 * entry["accuracy"] for entry in curve], marker="o", color="tab:blue",
                       label="accuracy")
    accuracy_axes.set_xlabel("residual blocks kept (greedy removal, cheapest first)")
    accuracy_axes.set_ylabel(f"{report.get('split') or 'evaluation'} accuracy (%)", color="tab:blue")
    accuracy_axes.invert_xaxis()
    accuracy_axes.grid(alpha=0.3)

    cost_axes = accuracy_axes.twinx()
    cost_axes.plot(kept, [100 * entry["params"] / full_params for entry in curve], linestyle="--",
                   color="tab:green", label="parameters")
    cost_axes.plot(kept, [100 * entry["macs"] / full_macs for entry in curve], linestyle=":",
                   color="tab:red", label="MACs")
    cost_axes.set_ylabel("% of the analyzed network")
    cost_axes.set_ylim(0, 105)

    handles = accuracy_axes.get_legend_handles_labels()[0] + cost_axes.get_legend_handles_labels()[0]
    accuracy_axes.legend(handles=handles, loc="lower left")
    accuracy_axes.set_title(f"Depth-accuracy curve ({full_params:,} parameters, {full_macs:,} MACs at full depth)")
    _save_figure(figure, path)


def write_report(folder: Path, report: dict[str, Any]) -> list[Path]:
    """Write importance.json, importance.csv and both plots into `folder`, and return their paths."""
    folder = Path(folder)
    paths = [folder / JSON_FILE, folder / CSV_FILE, folder / IMPORTANCE_PLOT, folder / CURVE_PLOT]
    write_json(paths[0], report)
    write_csv(paths[1], report)
    plot_importance(paths[2], report)
    plot_depth_curve(paths[3], report)
    return paths
