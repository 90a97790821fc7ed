"""Shared pieces of the command line: the group, error mapping, data options, output."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import click

from sdprune.data import DATASETS, DataConfig
from sdprune.errors import InvalidValueError, SdpruneError

DATA_DIR_VARIABLE = "SDPRUNE_DATA_DIR"


class UsageFailure(click.ClickException):
    """A usage error shown as one line, exit 2."""

    exit_code = 2


class Group(click.Group):
    """A click group that reports every error as one line without a traceback.

    Usage errors (bad options, out-of-range values, missing paths) exit 2;
    failures (corrupt files, diverged training, I/O errors) exit 1.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InvalidValueError as error:
            raise UsageFailure(str(error)) from error
        except SdpruneError as error:
            raise click.ClickException(str(error)) from error
        except OSError as error:
            where = f"{error.filename}: " if error.filename else ""
            raise click.ClickException(f"{where}{error.strerror or error}") from error

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as error:
            # Click prints usage and a hint on separate lines; one line is easier to act on.
            command = error.ctx.command_path if error.ctx else "sdprune"
            click.echo(f"Error: {error.format_message()} (see '{command} --help')", err=True)
            sys.exit(error.exit_code)
        except click.ClickException as error:
            error.show()
            sys.exit(error.exit_code)
        except click.exceptions.Exit as error:
            sys.exit(error.exit_code)
        except click.Abort:
            click.echo("Aborted.", err=True)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


def configure_logging(quiet: bool) -> None:
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)


def data_options(for_training: bool = False) -> Callable:
    """Add the data options that every command reading images shares.

    Commands other than train default each data option to what the run recorded.
    """

    def decorate(function: Callable) -> Callable:
        options = [
            click.option("--dataset", type=click.Choice(DATASETS), default="digits" if for_training else None,
                         help="Data set: digits (bundled, offline), imagefolder, cifar10, cifar100 or svhn."
                         + ("" if for_training else " Default: the one the run was trained on.")),
            click.option("--data-dir", type=click.Path(file_okay=False), envvar=DATA_DIR_VARIABLE,
                         help=f"Folder of the data set (imagefolder: with train/ and test/ or val/). "
                         f"Default: ${DATA_DIR_VARIABLE}" + ("." if for_training else ", else the run's.")),
            click.option("--download", is_flag=True, help="Download cifar10, cifar100 or svhn into --data-dir when missing."),
            click.option("--limit-train", type=click.IntRange(min=1), default=None,
                         help="Use a class-balanced subset of this many training images."),
            click.option("--limit-test", type=click.IntRange(min=1), default=None,
                         help="Use a class-balanced subset of this many test images."),
            click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True,
                         help="Images per mini-batch (per process under torchrun)."),
            click.option("--workers", type=click.IntRange(min=0), default=None,
                         help="Data-loader worker processes. Default: 0 for digits, else up to 4."),
        ]
        if for_training:
            options.append(click.option("--val-split", type=click.IntRange(min=0), default=0, show_default=True,
                                        help="Hold out this many training images (class-balanced) for validation."))
        for option in reversed(options):
            function = option(function)
        return function

    return decorate


def make_data_config(options: dict[str, Any], run_config: dict[str, Any] | None = None) -> DataConfig:
    """Build a DataConfig from command options, filling gaps from a run's record.

    The run's validation split is always kept so that its held-out images stay
    out of any training-image use.
    """
    recorded = (run_config or {}).get("data") or {}
    dataset = options.get("dataset") or recorded.get("dataset") or "digits"
    data_dir = options.get("data_dir")
    if data_dir is None and dataset == recorded.get("dataset"):
        data_dir = recorded.get("data_dir")
    limit_train = options.get("limit_train")
    if limit_train is None and dataset == recorded.get("dataset"):
        limit_train = recorded.get("limit_train")
    limit_test = options.get("limit_test")
    if limit_test is None and dataset == recorded.get("dataset"):
        limit_test = recorded.get("limit_test")
    val_split = options.get("val_split")
    if val_split is None:
        val_split = recorded.get("val_split", 0) if dataset == recorded.get("dataset") else 0
    return DataConfig(
        dataset=dataset,
        data_dir=data_dir,
        download=bool(options.get("download")),
        limit_train=limit_train,
        limit_test=limit_test,
        val_split=val_split,
        batch_size=options.get("batch_size") or 128,
        workers=options.get("workers"),
    )


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2))


def run_folder_argument(function: Callable) -> Callable:
    return click.argument("run", type=click.Path(path_type=Path))(function)



# Less free space than this cannot hold even a small run's checkpoint and its temporary copy.
MINIMUM_FREE_BYTES = 64 * 1024 * 1024


def check_writable(path: Path, is_file: bool = False) -> None:
    """Fail before any work starts when the output location cannot be written.

    Creates the output folder (or the file's folder), writes and removes a probe
    file, and checks that at least MINIMUM_FREE_BYTES are free there.
    """
    folder = Path(path).parent if is_file else Path(path)
    existed = folder.is_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
        free = shutil.disk_usage(folder).free
        # A command that fails later should not leave an empty output folder behind.
        if not existed:
            folder.rmdir()
    except OSError as error:
        raise InvalidValueError(f"cannot write to {folder} ({error.strerror or error}): choose another output location") from error
    if free < MINIMUM_FREE_BYTES:
        raise InvalidValueError(
            f"only {free // 1024 ** 2} MiB free under {folder}: free at least {MINIMUM_FREE_BYTES // 1024 ** 2} MiB "
            "or choose another output location"
        )
