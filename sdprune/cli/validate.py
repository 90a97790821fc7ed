"""`sdprune validate`: check an exported .onnx or .ort file with onnxruntime alone."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import click

from sdprune.cli.common import data_options, make_data_config, print_json
from sdprune.data import load_data
from sdprune.errors import SdpruneError
from sdprune.validate import ValidationConfig, ValidationReport, open_session, read_metadata, validate_model, write_report


def validation_options(function: Callable) -> Callable:
    """Add the options that set validation limits and measurements."""
    options = [
        click.option("--tolerance", type=float, default=None,
                     help="Largest allowed absolute logit difference against PyTorch. "
                     "Default: 1e-4, not judged for int8."),
        click.option("--max-accuracy-drop", type=float, default=1.0, show_default=True,
                     help="Largest allowed accuracy drop against PyTorch, in percentage points."),
        click.option("--threads", type=int, default=1, show_default=True,
                     help="onnxruntime intra-op threads for the latency measurement."),
        click.option("--latency-runs", type=int, default=20, show_default=True,
                     help="Timed inferences per batch size; the median is reported."),
        click.option("--json", "as_json", is_flag=True, help="Print the validation report as JSON."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def format_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f} (1/{1 / value:.1f})"


def show_report(report: ValidationReport, report_file: Path, as_json: bool) -> None:
    """Print a report as a table, or as JSON with `as_json`."""
    if as_json:
        print_json(report.to_dict())
        return
    size, accuracy, parity, latency = report.size, report.accuracy, report.parity, report.latency_ms
    rows = [
        ("model", f"{report.model} ({report.format}, {report.precision})"),
        ("size", f"{size['bytes']:,} bytes in {len(size['files'])} file(s)"),
        ("vs fp32 of this run", f"{size['fp32_bytes']:,} bytes, ratio {format_ratio(size['ratio_to_fp32'])}"),
        ("vs unpruned fp32", f"{size['unpruned_fp32_bytes']:,} bytes, ratio {format_ratio(size['ratio_to_unpruned_fp32'])}"),
    ]
    if parity is not None:
        limit = "not judged" if parity["tolerance"] is None else f"tolerance {parity['tolerance']:.0e}"
        rows.append(("parity", f"max |logit diff| {parity['max_abs_logit_difference']:.3g} ({limit}, "
                               f"{parity['images']} images, max |logit| {parity['max_abs_pytorch_logit']:.3g})"))
    line = f"onnxruntime {accuracy['onnxruntime']:.2%}"
    if accuracy["pytorch"] is not None:
        line += (f", PyTorch {accuracy['pytorch']:.2%}, drop {accuracy['drop_points']:.2f} points "
                 f"(allowed {accuracy['max_drop_points']:g})")
    rows.append(("accuracy", f"{line} on {accuracy['images']} images"))
    medians = ", ".join(f"{name.replace('_', ' ')} {value:.2f} ms" for name, value in latency["median"].items())
    rows.append(("latency (median)", f"{medians}; {latency['threads']} thread(s), {latency['runs']} runs"))
    rows.append(("result", "passed" if report.passed else "FAILED: " + "; ".join(report.failures)))
    rows.append(("report", str(report_file)))

    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        click.echo(f"{name:<{width}}  {value}")


@click.command()
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@validation_options
@data_options()
def validate(model, tolerance, max_accuracy_drop, threads, latency_runs, as_json, **options) -> None:
    """Check MODEL (.onnx or .ort from sdprune export onnx) with onnxruntime on test data.

    Reads preprocessing and classes from the file's metadata. The run folder
    and PyTorch model are not needed, so parity and the accuracy drop are not
    measured. Writes NAME.validation.json beside the model.
    """
    metadata = read_metadata(open_session(model), model)
    validation = ValidationConfig(tolerance=tolerance, max_accuracy_drop=max_accuracy_drop,
                                  threads=threads, latency_runs=latency_runs)
    bundle = load_data(make_data_config(options, {"data": {"dataset": metadata.dataset}}))
    batches = ((images.numpy(), labels.numpy()) for images, labels in bundle.loader("test"))
    data = {"classes": bundle.classes, "input_shape": bundle.input_shape, "mean": bundle.mean, "std": bundle.std}

    report = validate_model(model, batches, validation, reference=None, data=data)
    report_file = write_report(report)
    show_report(report, report_file, as_json)
    if not report.passed:
        raise SdpruneError(f"validation failed: {model}: {'; '.join(report.failures)}")
