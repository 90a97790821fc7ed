"""Tests of `sdprune validate` and the onnxruntime checks in sdprune.validate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from sdprune.cli import main
from sdprune.data import DataConfig, load_data
from sdprune.errors import InvalidValueError
from sdprune.export.metadata import ExportFileError
from sdprune.export.onnx_export import ExportConfig, export_run
from sdprune.resnet import build_model
from sdprune.runs import load_run, save_run
from sdprune.validate import (
    ValidationConfig, check_data, measure_size, model_files, open_session, read_metadata, report_path, validate_model,
)

FAST = ["--limit-test", "64", "--latency-runs", "2"]


@pytest.fixture(scope="module")
def digits_data():
    return load_data(DataConfig(dataset="digits", limit_test=64))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, digits_data) -> Path:
    """Export an untrained digits resnet20 and return the .onnx path."""
    folder = tmp_path_factory.mktemp("validate")
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    config = {
        "arch": "resnet20", "classes": digits_data.classes, "mean": digits_data.mean, "std": digits_data.std,
        "input_shape": digits_data.input_shape, "data": {"dataset": "digits"},
    }
    save_run(folder / "run", model, config)
    result = export_run(load_run(folder / "run"), ExportConfig(output=folder / "model.onnx", ort=True))
    return result.onnx_path


def test_validate_command_on_onnx(exported):
    result = CliRunner().invoke(main, ["validate", str(exported), *FAST, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["parity"] is None
    assert report["accuracy"]["pytorch"] is None
    assert report["accuracy"]["images"] == 64
    assert report["size"]["bytes"] == exported.stat().st_size
    assert report["latency_ms"]["median"]["batch_64"] > 0
    assert json.loads(report_path(exported).read_text()) == report


def test_validate_command_on_ort(exported):
    ort_path = exported.with_suffix(".ort")
    result = CliRunner().invoke(main, ["validate", str(ort_path), *FAST])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output
    assert "latency" in result.output
    assert (exported.parent / "model.ort.validation.json").is_file()


def test_corrupt_model_exits_1(tmp_path):
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage that is no protobuf")
    result = CliRunner().invoke(main, ["validate", str(corrupt)])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "not a loadable ONNX or ORT model" in result.output


def test_missing_model_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["validate", str(tmp_path / "absent.onnx")])
    assert result.exit_code == 2
    assert "not found" in result.output


def test_model_without_metadata_exits_1(tmp_path):
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["images"], ["logits"])], "plain",
        [onnx.helper.make_tensor_value_info("images", onnx.TensorProto.FLOAT, [1, 2])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 2])],
    )
    path = tmp_path / "plain.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(path))
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 1
    assert "no sdprune export metadata" in result.output


def test_size_counts_external_data(exported, tmp_path):
    model = onnx.load(str(exported))
    split = tmp_path / "split.onnx"
    onnx.save(model, str(split), save_as_external_data=True, location="split.onnx.data", size_threshold=1024)
    files = model_files(split)
    assert [path.name for path in files] == ["split.onnx", "split.onnx.data"]
    metadata = read_metadata(open_session(split), split)
    size = measure_size(split, metadata)
    assert size["bytes"] == sum(path.stat().st_size for path in files)
    assert size["bytes"] > exported.stat().st_size


def test_parity_and_accuracy_figures(exported, digits_data):
    session = open_session(exported)
    metadata = read_metadata(session, exported)
    batches = [(images.numpy(), labels.numpy()) for images, labels in digits_data.loader("test")]

    def shifted(images: np.ndarray) -> np.ndarray:
        logits = session.run(None, {"images": images})[0]
        return logits + 0.5

    report = validate_model(exported, batches, ValidationConfig(latency_runs=1), reference=shifted)
    assert report.parity["max_abs_logit_difference"] == pytest.approx(0.5, abs=1e-5)
    assert report.accuracy["drop_points"] == pytest.approx(0.0)
    assert not report.passed
    assert len(report.failures) == 1
    assert report.failures[0].startswith("parity")
    assert metadata.input_shape == [1, 8, 8]


def test_accuracy_drop_fails(exported, digits_data):
    images, labels = next(iter(digits_data.loader("test")))
    images, labels = images.numpy(), labels.numpy()

    def perfect(batch: np.ndarray) -> np.ndarray:
        return np.eye(10, dtype=np.float32)[labels]

    config = ValidationConfig(tolerance=None, latency_runs=1)
    report = validate_model(exported, [(images, labels)], config, reference=perfect)
    assert report.parity["passed"] is None
    assert report.accuracy["pytorch"] == 1.0
    assert any(failure.startswith("accuracy") for failure in report.failures)


def test_data_mismatch_rejected(exported):
    metadata = read_metadata(open_session(exported), exported)
    with pytest.raises(InvalidValueError, match="shape"):
        check_data(metadata, metadata.classes, [3, 32, 32], metadata.mean, metadata.std)
    with pytest.raises(InvalidValueError, match="normalized"):
        check_data(metadata, metadata.classes, metadata.input_shape, [0.5], metadata.std)
    with pytest.raises(InvalidValueError, match="classes"):
        check_data(metadata, ["cat", "dog"], metadata.input_shape, metadata.mean, metadata.std)


def test_invalid_validation_config():
    with pytest.raises(InvalidValueError, match="--tolerance"):
        ValidationConfig(tolerance=0)
    with pytest.raises(InvalidValueError, match="--threads"):
        ValidationConfig(threads=0)


def test_open_session_rejects_truncated_file(exported, tmp_path):
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(exported.read_bytes()[:5000])
    with pytest.raises(ExportFileError, match="truncated.onnx"):
        open_session(truncated)
