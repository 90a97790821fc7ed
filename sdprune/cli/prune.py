"""`sdprune prune`: remove residual blocks into a smaller run, then recalibrate and fine-tune."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from sdprune.cli.common import check_writable, configure_logging, data_options, make_data_config, print_json
from sdprune.cli.train import format_epoch
from sdprune.depth import SURVIVAL_RULES
from sdprune.errors import InvalidValueError
from sdprune.prune import STRATEGIES
from sdprune.prune_run import PruneConfig, prune_run, resume_pruning
from sdprune.recalibrate import RECALIBRATION_GATES
from sdprune.runs import load_run
from sdprune.train import resolve_device


def format_report(report: dict[str, Any]) -> list[str]:
    """Return the terminal table of a pruning report, one line per stage."""
    splits = [split for split in ("val", "test") if f"{split}_accuracy" in report["stages"][0]]
    lines = [
        f"{report['parent']} -> {report['out']}: strategy {report['strategy']}, "
        f"kept blocks {report['kept_blocks']}, removed {report['removed_blocks'] or 'none'}",
        f"{'stage':<23} {'blocks':>6} {'params':>10} {'MACs':>12} {'packed bytes':>12}"
        + "".join(f" {split + ' acc':>9} {split + ' loss':>9}" for split in splits),
    ]
    for row in report["stages"]:
        line = f"{row['stage']:<23} {row['blocks']:>6} {row['params']:>10,} {row['macs']:>12,} {row['packed_bytes']:>12,}"
        for split in splits:
            line += f" {row[f'{split}_accuracy']:>9.2%} {row[f'{split}_loss']:>9.4f}"
        lines.append(line)
    return lines


@click.command()
@click.argument("run", type=click.Path(path_type=Path), required=False)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder to write the pruned run and prune_report.json into.")
@click.option("--keep-depth", type=int, default=None,
              help="Target: keep this many residual blocks, from 1 to the blocks the run has.")
@click.option("--keep-ratio", type=float, default=None,
              help="Target: keep this fraction of the run's blocks, rounded half up to a whole block.")
@click.option("--max-accuracy-drop", type=float, default=None,
              help="Target: remove blocks in strategy order while the accuracy (validation split, else test) "
                   "stays within this many percentage points of the unpruned run's.")
@click.option("--strategy", type=click.Choice(STRATEGIES), default="greedy", show_default=True,
              help="Which blocks go first: greedy (the analyzer's re-evaluated removal order), lesion (smallest "
                   "accuracy loss alone), contribution (smallest survival contribution), norm (smallest "
                   "branch-to-shortcut norm ratio), last (deepest) or every-other (LayerDrop's evenly spaced rule).")
@click.option("--importance", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="importance.json of sdprune analyze for this run; without it, greedy, lesion, contribution "
                   "and norm measure importance first.")
@click.option("--samples", type=int, default=20, show_default=True,
              help="Sub-networks sampled to measure survival contributions when no --importance is given.")
@click.option("--recalibrate/--no-recalibrate", default=True, show_default=True,
              help="Re-estimate batch-norm statistics of the pruned network on augmented training images.")
@click.option("--recalibration-images", type=int, default=2000, show_default=True,
              help="Training images used for batch-norm recalibration.")
@click.option("--recalibration-gates", type=click.Choice(RECALIBRATION_GATES), default="open", show_default=True,
              help="Recalibrate with every kept block running, scaled by p_l as at test time (open), or with "
                   "random stochastic-depth gates per batch as in training (random).")
@click.option("--binarize", is_flag=True,
              help="After removal and recalibration, turn every convolution of the kept residual branches into "
                   "a binary-weight convolution (sign(W) times mean |W| per output channel), recalibrate batch norm "
                   "again, and fine-tune (with --finetune-epochs) through the straight-through estimator.")
@click.option("--binarize-all", is_flag=True,
              help="Like --binarize, and binarize the first convolution and the classifier too.")
@click.option("--finetune-epochs", type=int, default=0, show_default=True,
              help="Epochs of fine-tuning after pruning, with the training loop.")
@click.option("--finetune-lr", type=float, default=0.01, show_default=True,
              help="Initial learning rate of fine-tuning (cosine decay over the epochs).")
@click.option("--survival-last", type=float, default=None,
              help="Fine-tune with stochastic depth, p_L of the last kept block in (0, 1]. Default: constant depth.")
@click.option("--survival-rule", type=click.Choice(SURVIVAL_RULES), default="linear", show_default=True,
              help="Survival rule over the kept blocks when --survival-last is given.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of contribution sampling, recalibration images and gates, and fine-tuning.")
@data_options()
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Continue the fine-tuning of the pruned run in this folder with its saved settings.")
@click.option("--json", "as_json", is_flag=True, help="Print prune_report.json instead of the table.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors (and the JSON with --json).")
def prune(run, out, resume, device, as_json, quiet, **options) -> None:
    """Remove residual blocks of RUN into a smaller run, recalibrated and optionally fine-tuned.

    Give exactly one target: --keep-depth, --keep-ratio or --max-accuracy-drop.
    """
    configure_logging(quiet)
    device = resolve_device(device)
    echo = (lambda text: None) if quiet else click.echo
    # With --json, stdout carries only the report, so epoch lines go to stderr.
    progress_echo = (lambda text: None) if quiet else (lambda text: click.echo(text, err=as_json))

    if resume is not None:
        targets = [name for name in ("keep_depth", "keep_ratio", "max_accuracy_drop") if options[name] is not None]
        if run is not None or out is not None or targets:
            raise InvalidValueError(
                f"--resume {resume} continues with the saved settings: leave out RUN, --out and the target options"
            )
        report = resume_pruning(resume, device, quiet, on_epoch=lambda metrics: progress_echo(format_epoch(metrics)))
    else:
        if run is None:
            raise InvalidValueError("RUN is missing: pass the run folder to prune (or --resume DIR)")
        if out is None:
            raise InvalidValueError("--out is missing: pass the folder to write the pruned run into")
        config = PruneConfig(
            strategy=options["strategy"], keep_depth=options["keep_depth"], keep_ratio=options["keep_ratio"],
            max_accuracy_drop=options["max_accuracy_drop"], importance=options["importance"],
            samples=options["samples"], seed=options["seed"], recalibrate=options["recalibrate"],
            recalibration_images=options["recalibration_images"],
            recalibration_gates=options["recalibration_gates"], finetune_epochs=options["finetune_epochs"],
            finetune_lr=options["finetune_lr"], survival_rule=options["survival_rule"],
            survival_last=options["survival_last"],
            binarize=options["binarize"] or options["binarize_all"], binarize_all=options["binarize_all"],
        )
        parent = load_run(run, device)
        check_writable(out)
        data_config = make_data_config(options, parent.config)
        report = prune_run(parent, config, data_config, out, device, quiet,
                           on_epoch=lambda metrics: progress_echo(format_epoch(metrics)))

    if as_json:
        print_json(report)
        return
    for line in format_report(report):
        echo(line)
