"""`sdprune export onnx`: write a run as a compact ONNX file and validate it with onnxruntime."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import click
import numpy as np
import torch

from sdprune.cli.common import Group, check_writable, configure_logging, data_options, make_data_config, run_folder_argument
from sdprune.cli.validate import show_report, validation_options
from sdprune.data import DataBundle, load_data
from sdprune.errors import InvalidValueError, SdpruneError
from sdprune.export.onnx_export import MIN_OPSET, QUANTIZATIONS, ExportConfig, default_output, export_run
from sdprune.runs import Run, load_run
from sdprune.validate import ValidationConfig, validate_model, write_report

# Calibration images are drawn with this seed, so two exports of a run calibrate alike.
CALIBRATION_SEED = 0


@click.group(cls=Group)
def export() -> None:
    """Export a run for deployment."""


def calibration_batches(bundle: DataBundle, count: int, batch_size: int) -> Iterator[np.ndarray]:
    """Return batches of `count` random training images, evaluation transform, as float32 arrays.

    Checks `count` at once; the images are read as the batches are consumed.
    """
    dataset = bundle.train_plain
    if count > len(dataset):
        raise InvalidValueError(
            f"--calibration-images {count} exceeds the {len(dataset)} training images: choose at most {len(dataset)}"
        )
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(CALIBRATION_SEED))[:count]
    subset = torch.utils.data.Subset(dataset, order.tolist())
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, num_workers=0)
    return (images.numpy() for images, _ in loader)


def numpy_batches(bundle: DataBundle):
    for images, labels in bundle.loader("test"):
        yield images.numpy(), labels.numpy()


def torch_reference(run: Run):
    """Return a function from images to the PyTorch model's eval-mode logits."""
    model = run.model.eval()

    def forward(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(images)).numpy()

    return forward


def describe_data(bundle: DataBundle) -> dict:
    return {"classes": bundle.classes, "input_shape": bundle.input_shape, "mean": bundle.mean, "std": bundle.std}


@export.command()
@run_folder_argument
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="ONNX file to write. Default: exports/<run folder name>[-int8].onnx.")
@click.option("--quantize", type=click.Choice(QUANTIZATIONS), default=None,
              help="Store weights and activations as int8 (static, per-channel weights, QDQ format).")
@click.option("--calibration-images", type=int, default=256, show_default=True,
              help="Training images used to calibrate int8 activation ranges.")
@click.option("--ort", "write_ort", is_flag=True, help="Also write NAME.ort, the ORT format ONNX Runtime Mobile loads.")
@click.option("--opset", type=int, default=MIN_OPSET, show_default=True, help="ONNX opset version, 18 or newer.")
@click.option("--validate/--no-validate", "run_validation", default=True, show_default=True,
              help="Check parity, accuracy, size and latency with onnxruntime after writing.")
@validation_options
@data_options()
@click.option("--quiet", is_flag=True, help="Print nothing but errors and the validation table.")
def onnx(run, output, quantize, calibration_images, write_ort, opset, run_validation,
         tolerance, max_accuracy_drop, threads, latency_runs, as_json, quiet, **options) -> None:
    """Export RUN to ONNX with batch norm and test-time scaling folded into the convolutions.

    Binary layers are stored as packed sign bits; the file is self-contained.
    Validation results go to NAME.validation.json beside the model, and the
    command exits 1 when parity or the accuracy drop is out of bounds.
    """
    configure_logging(quiet)
    if tolerance is None:
        # An int8 model cannot match float logits to 1e-4, so only its accuracy is judged.
        tolerance = None if quantize else 1e-4
    validation = ValidationConfig(tolerance=tolerance, max_accuracy_drop=max_accuracy_drop,
                                  threads=threads, latency_runs=latency_runs)
    config = ExportConfig(output=output or default_output(run, quantize), quantize=quantize,
                          calibration_images=calibration_images, ort=write_ort, opset=opset)

    loaded = load_run(run)
    check_writable(config.output, is_file=True)
    bundle = None
    if quantize or run_validation:
        bundle = load_data(make_data_config(options, loaded.config))
    calibration = None
    if quantize:
        calibration = calibration_batches(bundle, calibration_images, bundle.config.batch_size)

    result = export_run(loaded, config, calibration)
    written = [result.onnx_path] + ([result.ort_path] if result.ort_path else [])
    if not quiet:
        for path in written:
            click.echo(f"wrote {path} ({path.stat().st_size:,} bytes, {result.metadata.precision})", err=True)
    if not run_validation:
        return

    failures = []
    for path in written:
        report = validate_model(path, numpy_batches(bundle), validation, torch_reference(loaded), describe_data(bundle))
        report_file = write_report(report)
        show_report(report, report_file, as_json)
        failures.extend(f"{path}: {failure}" for failure in report.failures)
    if failures:
        raise SdpruneError(f"validation failed: {'; '.join(failures)}")
