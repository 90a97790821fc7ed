"""Check an exported model under onnxruntime: parity, accuracy, size and latency.

Everything here runs on numpy arrays and onnxruntime sessions and reads the
model's own metadata, so any exported .onnx or .ort file can be checked without
its run folder. The PyTorch model enters only as an optional reference function.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import onnxruntime

from sdprune import atomic
from sdprune.errors import InvalidValueError
from sdprune.export.metadata import ExportFileError, ExportMetadata

REPORT_SUFFIX = ".validation.json"
LATENCY_SEED = 0
WARMUP_RUNS = 3

Reference = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class ValidationConfig:
    """Pass limits and measurement settings.

    `tolerance` bounds the largest absolute logit difference against the
    reference; None reports the difference without judging it (int8 models are
    judged by accuracy). `max_accuracy_drop` is in percentage points.
    """

    tolerance: float | None = 1e-4
    max_accuracy_drop: float = 1.0
    threads: int = 1
    latency_runs: int = 20
    latency_batches: tuple[int, ...] = (1, 64)

    def __post_init__(self) -> None:
        if self.tolerance is not None and not self.tolerance > 0:
            raise InvalidValueError(f"--tolerance must be positive, got {self.tolerance}")
        if not self.max_accuracy_drop >= 0:
            raise InvalidValueError(f"--max-accuracy-drop must be 0 or more points, got {self.max_accuracy_drop}")
        if self.threads < 1:
            raise InvalidValueError(f"--threads must be at least 1, got {self.threads}")
        if self.latency_runs < 1:
            raise InvalidValueError(f"--latency-runs must be at least 1, got {self.latency_runs}")


@dataclass
class ValidationReport:
    """The figures of one validated model file; `failures` names each figure out of bounds."""

    model: str
    format: str
    precision: str
    source_run: str
    size: dict[str, Any]
    accuracy: dict[str, Any]
    parity: dict[str, Any] | None
    latency_ms: dict[str, Any]
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


def open_session(path: str | Path, threads: int | None = None) -> onnxruntime.InferenceSession:
    """Open `path` (.onnx or .ort) on the CPU; `threads` None lets onnxruntime choose."""
    path = Path(path)
    if not path.is_file():
        raise InvalidValueError(f"model file {path} not found: pass a file written by sdprune export onnx")
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime's load errors (Fail, InvalidProtobuf, ...) derive from Exception only
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ExportFileError(f"{path} is not a loadable ONNX or ORT model ({first_line}): export it again") from error


def read_metadata(session: onnxruntime.InferenceSession, path: str | Path) -> ExportMetadata:
    return ExportMetadata.from_properties(session.get_modelmeta().custom_metadata_map, str(path))


def model_files(path: str | Path) -> list[Path]:
    """List every file the model needs: the model and any external data files it references."""
    path = Path(path)
    files = [path]
    if path.suffix != ".onnx":
        return files
    import onnx

    model = onnx.load_model(str(path), load_external_data=False)
    locations = set()
    for initializer in model.graph.initializer:
        if initializer.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(entry.value for entry in initializer.external_data if entry.key == "location")
    files.extend(path.parent / location for location in sorted(locations))
    return files


def measure_size(path: str | Path, metadata: ExportMetadata) -> dict[str, Any]:
    """Return the total size in bytes of the model's files and its ratios to the fp32 exports."""
    files = model_files(path)
    total = sum(file.stat().st_size for file in files)
    return {
        "bytes": total,
        "files": [str(file) for file in files],
        "fp32_bytes": metadata.fp32_bytes,
        "ratio_to_fp32": total / metadata.fp32_bytes if metadata.fp32_bytes else None,
        "unpruned_fp32_bytes": metadata.unpruned_fp32_bytes,
        "ratio_to_unpruned_fp32": total / metadata.unpruned_fp32_bytes if metadata.unpruned_fp32_bytes else None,
    }


def measure_latency(
    session: onnxruntime.InferenceSession, metadata: ExportMetadata, batch: int, runs: int
) -> float:
    """Return the median wall time in milliseconds of `runs` inferences on a random batch."""
    images = np.random.default_rng(LATENCY_SEED).standard_normal((batch, *metadata.input_shape)).astype(np.float32)
    feed = {metadata.input_name: images}
    for _ in range(WARMUP_RUNS):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def check_data(metadata: ExportMetadata, classes: list[str], input_shape: list[int],
               mean: list[float], std: list[float]) -> None:
    """Raise InvalidValueError when the data is not what the model was exported for."""
    if list(classes) != list(metadata.classes):
        raise InvalidValueError(
            f"the data has classes {classes[:5]}..., the model expects {metadata.classes[:5]}...: "
            "choose the --dataset the model was trained on"
        )
    if list(input_shape) != list(metadata.input_shape):
        raise InvalidValueError(
            f"the data has images of shape {input_shape}, the model expects {metadata.input_shape}: "
            "choose the --dataset the model was trained on"
        )
    if not (np.allclose(mean, metadata.mean, atol=1e-4) and np.allclose(std, metadata.std, atol=1e-4)):
        raise InvalidValueError(
            f"the data is normalized with mean {mean} and std {std}, the model with {metadata.mean} and "
            f"{metadata.std}: choose the --dataset and --data-dir the model was trained on"
        )


def compare_on_data(
    session: onnxruntime.InferenceSession,
    metadata: ExportMetadata,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    reference: Reference | None,
) -> dict[str, Any]:
    """Run `batches` of (images, labels) through the model and, if given, the reference.

    Returns the image count, both accuracies as fractions, the largest absolute
    logit difference and the largest absolute reference logit.
    """
    images_seen = 0
    correct = 0
    reference_correct = 0
    max_difference = 0.0
    max_logit = 0.0
    for images, labels in batches:
        logits = session.run([metadata.output_name], {metadata.input_name: np.ascontiguousarray(images, np.float32)})[0]
        correct += int((logits.argmax(axis=1) == labels).sum())
        images_seen += len(labels)
        if reference is not None:
            expected = reference(images)
            reference_correct += int((expected.argmax(axis=1) == labels).sum())
            max_difference = max(max_difference, float(np.abs(logits - expected).max()))
            max_logit = max(max_logit, float(np.abs(expected).max()))
    if images_seen == 0:
        raise InvalidValueError("the test split has no images: choose another --dataset or a larger --limit-test")
    return {
        "images": images_seen,
        "accuracy": correct / images_seen,
        "reference_accuracy": reference_correct / images_seen if reference is not None else None,
        "max_abs_difference": max_difference if reference is not None else None,
        "max_abs_reference_logit": max_logit if reference is not None else None,
    }


def judge(report: ValidationReport, config: ValidationConfig) -> None:
    """Fill `report.failures` with one sentence per figure out of bounds."""
    parity = report.parity
    if parity is not None and parity["passed"] is False:
        report.failures.append(
            f"parity: largest logit difference {parity['max_abs_logit_difference']:.3g} exceeds the "
            f"tolerance {parity['tolerance']:.3g}"
        )
    accuracy = report.accuracy
    if accuracy["passed"] is False:
        report.failures.append(
            f"accuracy: onnxruntime {accuracy['onnxruntime']:.2%} is {accuracy['drop_points']:.2f} points below "
            f"PyTorch {accuracy['pytorch']:.2%} (allowed {config.max_accuracy_drop:g})"
        )


def validate_model(
    path: str | Path,
    batches: Iterable[tuple[np.ndarray, np.ndarray]],
    config: ValidationConfig,
    reference: Reference | None = None,
    data: dict[str, Any] | None = None,
) -> ValidationReport:
    """Measure the model at `path` on `batches` of (images float32 NCHW, labels int).

    `reference` maps images to the PyTorch model's logits; without it, parity and
    the accuracy drop are not measured. `data`, if given, contains the data set's
    classes, input_shape, mean and std, checked against the model's metadata.
    """
    path = Path(path)
    session = open_session(path)
    metadata = read_metadata(session, path)
    if data is not None:
        check_data(metadata, data["classes"], data["input_shape"], data["mean"], data["std"])

    figures = compare_on_data(session, metadata, batches, reference)

    parity = None
    if reference is not None:
        difference = figures["max_abs_difference"]
        parity = {
            "max_abs_logit_difference": difference,
            # float32 rounding grows with the logits, so their scale puts the difference in context.
            "max_abs_pytorch_logit": figures["max_abs_reference_logit"],
            "tolerance": config.tolerance,
            "images": figures["images"],
            "passed": None if config.tolerance is None else bool(difference <= config.tolerance),
        }
    accuracy: dict[str, Any] = {"onnxruntime": figures["accuracy"], "images": figures["images"],
                                "pytorch": figures["reference_accuracy"], "drop_points": None,
                                "max_drop_points": None, "passed": None}
    if reference is not None:
        drop = (figures["reference_accuracy"] - figures["accuracy"]) * 100.0
        accuracy.update(drop_points=drop, max_drop_points=config.max_accuracy_drop,
                        passed=bool(drop <= config.max_accuracy_drop + 1e-9))

    timing_session = open_session(path, threads=config.threads)
    latency: dict[str, Any] = {"threads": config.threads, "runs": config.latency_runs, "median": {}}
    for batch in config.latency_batches:
        latency["median"][f"batch_{batch}"] = measure_latency(timing_session, metadata, batch, config.latency_runs)

    report = ValidationReport(
        model=str(path),
        format=path.suffix.lstrip("."),
        precision=metadata.precision,
        source_run=metadata.source_run,
        size=measure_size(path, metadata),
        accuracy=accuracy,
        parity=parity,
        latency_ms=latency,
    )
    judge(report, config)
    return report


def report_path(model_path: str | Path) -> Path:
    """Return where the report of `model_path` goes: NAME.validation.json, NAME.ort.validation.json for .ort."""
    model_path = Path(model_path)
    if model_path.suffix == ".onnx":
        return model_path.with_suffix(REPORT_SUFFIX)
    return model_path.with_name(model_path.name + REPORT_SUFFIX)


def write_report(report: ValidationReport) -> Path:
    """Write the report as JSON beside its model, atomically, and return its path."""
    destination = report_path(report.model)
    atomic.write_json(destination, sanitize(report.to_dict()))
    return destination


def sanitize(value: Any) -> Any:
    """Replace NaN and infinities, which JSON cannot hold, with None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: sanitize(item) for key, item in value.items()}
    if isinstance(value, list):
        return [sanitize(item) for item in value]
    return value
