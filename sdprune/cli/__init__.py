"""The `sdprune` command line."""

from __future__ import annotations

import click

from sdprune import __version__
from sdprune.cli.analyze import analyze
from sdprune.cli.benchmark import benchmark
from sdprune.cli.common import Group
from sdprune.cli.demo import demo
from sdprune.cli.evaluate import evaluate
from sdprune.cli.export import export
from sdprune.cli.info import info
from sdprune.cli.prune import prune
from sdprune.cli.train import train
from sdprune.cli.validate import validate


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sdprune")
def main() -> None:
    """Stochastic-depth ResNets: train, measure which blocks matter, prune and export."""


main.add_command(demo)
main.add_command(train)
main.add_command(evaluate)
main.add_command(analyze)
main.add_command(info)
main.add_command(prune)
main.add_command(benchmark)
main.add_command(export)
main.add_command(validate)
