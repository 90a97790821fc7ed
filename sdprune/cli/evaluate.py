"""`sdprune evaluate`: accuracy and loss of a run on a data split."""

from __future__ import annotations

import click

from sdprune.cli.common import data_options, make_data_config, print_json, run_folder_argument
from sdprune.data import load_data
from sdprune.errors import InvalidValueError
from sdprune.evaluate import evaluate as evaluate_model
from sdprune.runs import load_run
from sdprune.train import resolve_device


def check_data_matches(run, bundle) -> None:
    if len(bundle.classes) != run.model.num_classes or bundle.input_shape[0] != run.model.in_channels:
        raise InvalidValueError(
            f"the data has {len(bundle.classes)} classes of {bundle.input_shape[0]}-channel images, but the model "
            f"expects {run.model.num_classes} classes of {run.model.in_channels}-channel images: choose matching --dataset"
        )


@click.command()
@run_folder_argument
@data_options()
@click.option("--split", type=click.Choice(["test", "val", "train"]), default="test", show_default=True,
              help="Which split to evaluate (val exists when the run was trained with --val-split).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (accuracy as a fraction in 0..1).")
def evaluate(run, split, device, as_json, **options) -> None:
    """Print a run's accuracy and loss on a data split."""
    device = resolve_device(device)
    loaded = load_run(run, device)
    bundle = load_data(make_data_config(options, loaded.config))
    check_data_matches(loaded, bundle)
    if split == "val" and bundle.val is None:
        raise InvalidValueError(f"{run} was trained without --val-split, so it has no val split: use --split test")

    result = evaluate_model(loaded.model, bundle.loader("train_plain" if split == "train" else split), device)
    if as_json:
        print_json({"run": str(run), "split": split, "dataset": bundle.config.dataset, **result.to_dict()})
    else:
        click.echo(f"{run}: {split} accuracy {result.accuracy:.2%}, loss {result.loss:.4f} on {result.images} images")
