"""`sdprune analyze`: how much each residual block of a run matters, and the depth-accuracy curve."""

from __future__ import annotations

from pathlib import Path

import click

from sdprune.cli.common import check_writable, data_options, make_data_config, print_json, run_folder_argument
from sdprune.cli.evaluate import check_data_matches
from sdprune.data import load_data
from sdprune.importance import analyze_model
from sdprune.progress import progress
from sdprune.report import format_importance_table, write_report
from sdprune.runs import load_run
from sdprune.train import resolve_device

ANALYSIS_FOLDER = "analysis"


@click.command()
@run_folder_argument
@data_options()
@click.option("--samples", type=click.IntRange(min=2), default=20, show_default=True,
              help="Random sub-networks drawn to estimate each block's survival contribution (at least 2).")
@click.option("--seed", type=int, default=None,
              help="Seed of the sub-network draws. Default: the seed the run was trained with, else 0.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help=f"Folder for importance.json, importance.csv and the plots. Default: RUN/{ANALYSIS_FOLDER}.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print importance.json to stdout instead of the table.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors; the files are still written.")
def analyze(run, samples, seed, out, device, as_json, quiet, **options) -> None:
    """Measure each block's lesion effect, survival contribution and norm ratio, and the depth curve.

    Uses the run's validation split when it was trained with --val-split,
    otherwise the test split.
    """
    device = resolve_device(device)
    loaded = load_run(run, device)
    bundle = load_data(make_data_config(options, loaded.config))
    check_data_matches(loaded, bundle)

    folder = out if out is not None else Path(run) / ANALYSIS_FOLDER
    check_writable(folder)

    split = "val" if bundle.val is not None else "test"
    if split == "test" and not quiet:
        click.echo(f"warning: {run} has no validation split (train with --val-split N), so the test set is "
                   "used to choose blocks and its accuracy after pruning will be optimistic", err=True)
    if seed is None:
        seed = int(loaded.config.get("seed") or 0)

    show_progress = not quiet and not as_json
    report = analyze_model(
        loaded.model, bundle.loader(split), device, samples=samples, seed=seed,
        progress=lambda items, total, description: progress(items, total, description, enabled=show_progress),
        split=split, run=str(run),
    )
    paths = write_report(folder, report)

    if as_json:
        print_json(report)
    elif not quiet:
        click.echo(format_importance_table(report))
        click.echo(f"wrote {', '.join(str(path) for path in paths)}")
