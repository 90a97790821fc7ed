"""`sdprune train`: train a stochastic-depth ResNet into a run folder."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import fields
from pathlib import Path
from typing import Callable

import click

from sdprune import distributed, runs
from sdprune.cli.common import check_writable, configure_logging, data_options, make_data_config
from sdprune.data import DataConfig
from sdprune.depth import SURVIVAL_RULES
from sdprune.errors import InvalidValueError
from sdprune.resnet import ARCHITECTURES
from sdprune.train import SCHEDULES, EpochMetrics, TrainConfig, Trainer, default_run_folder, resolve_device


def format_epoch(metrics: EpochMetrics) -> str:
    line = (
        f"epoch {metrics.epoch:3d}  lr {metrics.lr:.4g}  train loss {metrics.train_loss:.4f} "
        f"acc {metrics.train_accuracy:.2%}  test loss {metrics.test_loss:.4f} acc {metrics.test_accuracy:.2%}"
    )
    if metrics.val_accuracy is not None:
        line += f"  val acc {metrics.val_accuracy:.2%}"
    return line + f"  blocks/step {metrics.mean_blocks_run:.2f}  {metrics.seconds:.1f}s"


def resumed_configs(folder: Path) -> tuple[TrainConfig, DataConfig]:
    """Read the configs a run was started with from its training state."""
    state = runs.load_training_state(folder)
    try:
        train_values = json.loads(state["train_config"])
        data_values = json.loads(state["data_config"])
        train_config = TrainConfig(**{f.name: train_values[f.name] for f in fields(TrainConfig) if f.name in train_values})
        data_config = DataConfig(**{f.name: data_values[f.name] for f in fields(DataConfig) if f.name in data_values})
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise runs.RunFolderError(f"{folder / runs.STATE_FILE} lacks a readable training config: {error}") from error
    return train_config, data_config


@click.command()
@click.option("--arch", type=click.Choice(list(ARCHITECTURES)), default="resnet20", show_default=True,
              help="CIFAR ResNet depth (6n+2 layers).")
@click.option("--survival-rule", type=click.Choice(SURVIVAL_RULES), default="linear", show_default=True,
              help="How survival probability falls with depth; none trains at constant depth.")
@click.option("--survival-last", type=float, default=0.5, show_default=True,
              help="Survival probability p_L of the last block (linear) or of every block (uniform), in (0, 1].")
@click.option("--epochs", type=int, default=10, show_default=True, help="Training epochs, at least 1.")
@click.option("--lr", type=float, default=0.1, show_default=True, help="Initial learning rate of SGD.")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum (Nesterov).")
@click.option("--weight-decay", type=float, default=1e-4, show_default=True, help="L2 weight decay.")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="step", show_default=True,
              help="step: lr divided by 10 at 50% and 75% of the epochs; cosine: cosine decay to 0.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of weights, shuffling and gates.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda or cuda:N.")
@click.option("--sync-bn", is_flag=True, help="Under torchrun, synchronize batch-norm statistics across processes.")
@click.option("--compile", "compile_branches", is_flag=True, help="torch.compile each residual branch (off by default).")
@data_options(for_training=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run folder to write. Default: models/<arch>-<dataset>-<time>.")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Continue the run in this folder from its last finished epoch, with its saved settings.")
@click.option("--quiet", is_flag=True, help="Print nothing but errors.")
def train(**options) -> None:
    """Train a stochastic-depth ResNet and write a run folder.

    Under torchrun (torchrun --nproc_per_node N -m sdprune train ...) each process
    trains a DistributedDataParallel replica; only rank 0 writes files.
    """
    configure_logging(options["quiet"])
    device = resolve_device(options["device"])

    if options["resume"] is not None:
        out = options["resume"]
        config, data_config = resumed_configs(out)
        # Worker count is a property of this machine, not of the run, so it may change on resume.
        if options["workers"] is not None:
            data_config = dataclasses.replace(data_config, workers=options["workers"])
    else:
        config = TrainConfig(
            arch=options["arch"], survival_rule=options["survival_rule"], survival_last=options["survival_last"],
            epochs=options["epochs"], lr=options["lr"], momentum=options["momentum"],
            weight_decay=options["weight_decay"], schedule=options["schedule"], seed=options["seed"],
            sync_bn=options["sync_bn"], compile=options["compile_branches"],
        )
        data_config = make_data_config(options)
        out = options["out"] or default_run_folder(config.arch, data_config.dataset)
        if (out / runs.STATE_FILE).exists():
            raise InvalidValueError(f"{out} already holds a training run: add --resume {out} or choose another --out")

    check_writable(out)
    echo = (lambda text: None) if options["quiet"] else (lambda text: click.echo(text))
    try:
        trainer = Trainer(config, data_config, out, device, quiet=options["quiet"],
                          on_epoch=lambda metrics: echo(format_epoch(metrics)))
        run_trainer(trainer, resume=options["resume"] is not None, echo=echo)
    finally:
        # Leaving the process group explicitly lets NCCL and gloo release their connections cleanly.
        distributed.shutdown()


def run_trainer(trainer: Trainer, resume: bool, echo: Callable[[str], None]) -> None:
    """Restore a resumed run, state the setup on rank 0, and train to the configured epochs."""
    config, data_config, out = trainer.config, trainer.data_config, trainer.out
    if resume:
        trainer.restore()
        if trainer.start_epoch >= config.epochs:
            if trainer.context.is_main:
                echo(f"{out} already finished all {config.epochs} epochs; nothing to do")
            return

    if trainer.context.is_main:
        world = trainer.context.world_size
        echo(
            f"training {config.arch} ({len(trainer.model.blocks)} blocks, rule {config.survival_rule}, "
            f"p_L {config.survival_last}) on {data_config.dataset}: {len(trainer.bundle.train)} training images, "
            f"{len(trainer.bundle.test)} test images, device {trainer.device}, "
            f"global batch {data_config.batch_size * world} ({data_config.batch_size} x {world} processes)"
            + (f", resuming after epoch {trainer.start_epoch}" if trainer.start_epoch else "")
        )
    history = trainer.fit()
    if trainer.context.is_main and history:
        echo(f"wrote {out} (test accuracy {history[-1].test_accuracy:.2%})")
