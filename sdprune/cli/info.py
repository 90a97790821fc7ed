"""`sdprune info`: the architecture of a run, block by block."""

from __future__ import annotations

import click

from sdprune.binarize import model_size_bytes
from sdprune.cli.common import print_json, run_folder_argument
from sdprune.resnet import count_macs, count_parameters
from sdprune.runs import load_run


def describe(run) -> dict:
    model = run.model
    return {
        "run": str(run.path),
        "arch": run.config.get("arch"),
        "classes": run.classes,
        "input_shape": run.input_shape,
        "params": count_parameters(model),
        "macs": count_macs(model, run.input_shape),
        "kept_blocks": model.kept_indices,
        "blocks": [spec.to_dict() for spec in model.specs],
        "parent": run.config.get("parent"),
        "training": run.config.get("training"),
        "size": model_size_bytes(model),
    }


@click.command()
@run_folder_argument
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
def info(run, as_json) -> None:
    """Show a run's blocks with survival probabilities, parameters and MACs."""
    summary = describe(load_run(run))
    if as_json:
        print_json(summary)
        return

    click.echo(f"{summary['run']}: {summary['arch']}, {len(summary['classes'])} classes, input {summary['input_shape']}")
    click.echo(f"parameters {summary['params']:,}  MACs per image {summary['macs']:,}  "
               f"blocks kept {len(summary['kept_blocks'])} of {len(summary['blocks'])}")
    click.echo(f"{'block':>5} {'stage':>5} {'channels':>10} {'stride':>6} {'p_l':>6} {'kept':>5}")
    for block in summary["blocks"]:
        channels = f"{block['in_channels']}->{block['out_channels']}"
        click.echo(f"{block['index']:>5} {block['stage']:>5} {channels:>10} {block['stride']:>6} "
                   f"{block['survival_prob']:>6.3f} {'yes' if block['kept'] else 'no':>5}")

    size = summary["size"]
    binary_layers = sum(layer["binary"] for layer in size["layers"])
    click.echo(f"weights {size['float32_bytes']:,} bytes in float32, {size['packed_bytes']:,} bytes with binary "
               f"weights at 1 bit ({binary_layers} of {len(size['layers'])} layers binary)")
    click.echo(f"{'layer':<22} {'type':<7} {'weights':>8} {'kind':<6} {'bytes':>8}")
    for layer in size["layers"]:
        kind = "binary" if layer["binary"] else "float"
        click.echo(f"{layer['name']:<22} {layer['type']:<7} {layer['weights']:>8} {kind:<6} {layer['bytes']:>8}")
