"""Export a run folder to one self-contained ONNX file, optionally int8 and ORT format.

Pipeline: find binary layers, fold batch norm and p_l, emit the graph, quantize
(int8 only), pack binary kernels, attach metadata, check, write atomically.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable

import numpy as np
import onnx
from onnx import helper

from sdprune import atomic
from sdprune.errors import InvalidValueError
from sdprune.export.folding import FoldedResNet, find_binary_layers
from sdprune.export.graph import MIN_OPSET, build_graph
from sdprune.export.metadata import ExportMetadata
from sdprune.export.ort_format import save_ort_format
from sdprune.export.packing import pack_binary_kernels
from sdprune.export.quantize import quantize_int8
from sdprune.resnet import CifarResNet
from sdprune.runs import Run

logger = logging.getLogger(__name__)

QUANTIZATIONS = ("int8",)
# The newest opset onnxruntime 1.32 runs; newer opsets would make files mobile builds reject.
MAX_OPSET = 23


@dataclass(frozen=True)
class ExportConfig:
    """Output path and form of an export."""

    output: Path
    quantize: str | None = None
    calibration_images: int = 256
    ort: bool = False
    opset: int = MIN_OPSET

    def __post_init__(self) -> None:
        if Path(self.output).suffix != ".onnx":
            raise InvalidValueError(f"--output must end in .onnx, got {self.output}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise InvalidValueError(f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}")
        if self.calibration_images < 1:
            raise InvalidValueError(f"--calibration-images must be at least 1, got {self.calibration_images}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise InvalidValueError(
                f"--opset must be between {MIN_OPSET} (BitShift, BitwiseAnd) and {MAX_OPSET}, got {self.opset}"
            )


@dataclass(frozen=True)
class ExportResult:
    """The files written and the metadata they carry."""

    onnx_path: Path
    ort_path: Path | None
    metadata: ExportMetadata


def default_output(run_path: str | Path, quantize: str | None = None) -> Path:
    """Return exports/<run folder name>[-int8].onnx."""
    name = Path(run_path).resolve().name
    return Path("exports") / f"{name}{'-' + quantize if quantize else ''}.onnx"


def finish_model(model: onnx.ModelProto, metadata: ExportMetadata) -> onnx.ModelProto:
    """Return a copy of `model` with `metadata` as metadata_props and the oldest IR version the opset allows."""
    finished = onnx.ModelProto()
    finished.CopyFrom(model)
    model = finished
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, metadata.to_properties())
    model.producer_name = "sdprune"
    # The lowest IR version keeps the file loadable by older mobile runtimes.
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    return model


def serialized_size(model: onnx.ModelProto, metadata: ExportMetadata, fields: tuple[str, ...]) -> int:
    """Return the file size of `model` with `metadata` whose `fields` hold that size itself."""
    size = 0
    # The size fields' own digits count; two rounds settle it unless the digit count changes.
    for _ in range(3):
        candidate = finish_model(model, replace(metadata, **{name: size for name in fields}))
        measured = candidate.ByteSize()
        if measured == size:
            break
        size = measured
    return size


def unpruned_network(model: CifarResNet) -> CifarResNet:
    """Build the same architecture with every block kept; untrained, used to measure sizes."""
    specs = [replace(spec, kept=True) for spec in model.specs]
    return CifarResNet(specs, num_classes=model.num_classes, in_channels=model.in_channels).eval()


def base_metadata(run: Run, binary_layers: list[str], precision: str) -> ExportMetadata:
    config = run.config
    model = run.model
    return ExportMetadata(
        classes=list(run.classes),
        input_shape=list(run.input_shape),
        mean=[float(value) for value in config["mean"]],
        std=[float(value) for value in config["std"]],
        arch=config.get("arch"),
        kept_blocks=model.kept_indices,
        removed_blocks=[spec.index for spec in model.specs if not spec.kept],
        binary_layers=binary_layers,
        source_run=str(Path(run.path).resolve()),
        parent_run=config.get("parent"),
        dataset=(config.get("data") or {}).get("dataset"),
        precision=precision,
        fp32_bytes=0,
        unpruned_fp32_bytes=0,
    )


def write_onnx(model: onnx.ModelProto, path: Path) -> None:
    """Check `model` and write it as one file, atomically; raise before anything is written."""
    onnx.checker.check_model(model, full_check=True)
    # Serializing in memory keeps every tensor inside the file: no NAME.onnx.data beside it.
    atomic.write_bytes(path, model.SerializeToString())


def export_run(
    run: Run, config: ExportConfig, calibration_batches: Iterable[np.ndarray] | None = None
) -> ExportResult:
    """Export `run` as `config` specifies and return the paths written.

    `calibration_batches` (float32 NCHW arrays of training images) is required
    for int8. A failure leaves no file at the destination.
    """
    if config.quantize == "int8" and calibration_batches is None:
        raise InvalidValueError("int8 quantization needs calibration images")

    binary_layers = find_binary_layers(run.model, run.config.get("binary_layers"))
    binary_weights = [f"{name}.weight" for name in binary_layers]
    folded = FoldedResNet(run.model, set(binary_layers))
    float_graph = build_graph(folded, list(run.input_shape), config.opset)

    if config.quantize == "int8":
        precision = "int8"
    else:
        precision = "fp32+binary" if binary_layers else "fp32"
    metadata = base_metadata(run, binary_layers, precision)
    # Sizes count the metadata too, as each of these exports would carry it.
    unpruned_model = unpruned_network(run.model)
    unpruned_graph = build_graph(FoldedResNet(unpruned_model), list(run.input_shape), config.opset)
    unpruned_metadata = replace(
        metadata, precision="fp32", binary_layers=[], kept_blocks=unpruned_model.kept_indices, removed_blocks=[]
    )
    unpruned_bytes = serialized_size(unpruned_graph, unpruned_metadata, ("fp32_bytes", "unpruned_fp32_bytes"))
    fp32_metadata = replace(metadata, precision="fp32", binary_layers=[], unpruned_fp32_bytes=unpruned_bytes)
    metadata = replace(
        metadata,
        unpruned_fp32_bytes=unpruned_bytes,
        fp32_bytes=serialized_size(float_graph, fp32_metadata, ("fp32_bytes",)),
    )

    graph = float_graph
    if config.quantize == "int8":
        logger.info("calibrating int8 ranges")
        graph = quantize_int8(float_graph, calibration_batches, excluded_weights=binary_weights)
    graph = pack_binary_kernels(graph, binary_weights)
    model = finish_model(graph, metadata)

    output = Path(config.output)
    write_onnx(model, output)
    ort_path = None
    if config.ort:
        ort_path = output.with_suffix(".ort")
        save_ort_format(output, ort_path)
    return ExportResult(onnx_path=output, ort_path=ort_path, metadata=metadata)
