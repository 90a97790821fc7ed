"""Tests of `sdprune export onnx`: folding, packing, int8, ORT format and validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper

from sdprune.binarize import binarize_model
from sdprune.cli import main
from sdprune.data import DataConfig, load_data
from sdprune.export import onnx_export
from sdprune.export.folding import FoldedResNet, find_binary_layers
from sdprune.export.packing import pack_binary_kernels, split_binary_kernel
from sdprune.errors import InvalidValueError, RunFolderError
from sdprune.resnet import build_model
from sdprune.runs import save_run

# Few test images and timed runs keep each export under a second or two.
FAST = ["--limit-test", "64", "--latency-runs", "2"]


def randomize_batch_norm(model: torch.nn.Module, seed: int) -> None:
    """Give every batch norm non-trivial statistics, so folding is really exercised."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            channels = module.num_features
            module.running_mean.copy_(torch.rand(channels, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(channels, generator=generator) * 2 - 0.5)
            module.bias.data.copy_(torch.rand(channels, generator=generator) - 0.5)


def binarize_by_hand(model: torch.nn.Module) -> None:
    """Replace each branch kernel by sign(W) * mean |W| per output channel, without parametrize."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Conv2d) and ".branch." in name:
                alpha = module.weight.abs().mean(dim=(1, 2, 3), keepdim=True)
                module.weight.copy_(torch.where(module.weight >= 0, alpha, -alpha))


@pytest.fixture(scope="module")
def digits_data():
    return load_data(DataConfig(dataset="digits"))


def make_run(folder: Path, digits_data, kept_blocks=None, binarize: str | None = None, seed: int = 0) -> Path:
    """Save an untrained resnet20 for digits as a run folder; no training is needed to test export."""
    torch.manual_seed(seed)
    model = build_model("resnet20", num_classes=10, in_channels=1, kept_blocks=kept_blocks)
    randomize_batch_norm(model, seed)
    if binarize == "parametrize":
        binarize_model(model)
    elif binarize == "all":
        binarize_model(model, include_first_and_last=True)
    elif binarize == "by-hand":
        binarize_by_hand(model)
    config = {
        "arch": "resnet20",
        "classes": digits_data.classes,
        "mean": digits_data.mean,
        "std": digits_data.std,
        "input_shape": digits_data.input_shape,
        "data": {"dataset": "digits", "data_dir": None, "val_split": 0, "limit_train": None, "limit_test": None},
        "parent": None,
    }
    save_run(folder, model.eval(), config)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export-runs")
    return {
        "fp32": make_run(root / "fp32", digits_data),
        "pruned": make_run(root / "pruned", digits_data, kept_blocks=[1, 3, 5, 8, 9]),
        "binary": make_run(root / "binary", digits_data, binarize="parametrize"),
        "binary-all": make_run(root / "binary-all", digits_data, binarize="all"),
        "by-hand": make_run(root / "by-hand", digits_data, binarize="by-hand"),
    }


def export(run: Path, output: Path, *options: str):
    return CliRunner().invoke(main, ["export", "onnx", str(run), "-o", str(output), "--quiet", *FAST, *options])


def read_report(model_path: Path) -> dict:
    return json.loads(model_path.with_suffix(".validation.json").read_text())


def optimized_op_types(path: Path, folder: Path) -> set[str]:
    """Return the operator types left after onnxruntime's basic optimizations, constant folding included."""
    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folder / "optimized.onnx")
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {node.op_type for node in onnx.load(str(folder / "optimized.onnx")).graph.node}


def test_folded_module_matches_model(digits_data):
    model = build_model("resnet20", num_classes=10, in_channels=1, kept_blocks=[1, 2, 5, 7]).eval()
    randomize_batch_norm(model, 3)
    images = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        expected = model(images)
        folded = FoldedResNet(model)(images)
    torch.testing.assert_close(folded, expected, atol=1e-5, rtol=1e-5)


def test_fp32_export_matches_pytorch(runs, tmp_path):
    output = tmp_path / "fp32.onnx"
    result = export(runs["fp32"], output)
    assert result.exit_code == 0, result.output
    report = read_report(output)
    assert report["passed"] is True
    assert report["parity"]["max_abs_logit_difference"] <= 1e-4
    assert report["accuracy"]["onnxruntime"] == report["accuracy"]["pytorch"]
    assert report["size"]["bytes"] == output.stat().st_size
    assert set(report["latency_ms"]["median"]) == {"batch_1", "batch_64"}
    assert report["latency_ms"]["threads"] == 1


def test_graph_is_folded_and_self_contained(runs, tmp_path):
    output = tmp_path / "model.onnx"
    assert export(runs["fp32"], output, "--no-validate").exit_code == 0
    model = onnx.load(str(output))
    onnx.checker.check_model(model, full_check=True)
    op_types = [node.op_type for node in model.graph.node]
    assert "BatchNormalization" not in op_types
    assert "Mul" not in op_types
    assert op_types.count("Conv") == 19
    assert model.opset_import[0].version >= 18
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    assert all(tensor.data_location != onnx.TensorProto.EXTERNAL for tensor in model.graph.initializer)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]


def test_dynamic_batch_runs(runs, tmp_path):
    output = tmp_path / "model.onnx"
    assert export(runs["fp32"], output, "--no-validate").exit_code == 0
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    for batch in (1, 3, 17):
        logits = session.run(None, {"images": np.zeros((batch, 1, 8, 8), np.float32)})[0]
        assert logits.shape == (batch, 10)


def test_metadata_present(runs, tmp_path):
    output = tmp_path / "pruned.onnx"
    assert export(runs["pruned"], output, "--no-validate").exit_code == 0
    properties = {entry.key: json.loads(entry.value) for entry in onnx.load(str(output)).metadata_props}
    assert properties["classes"] == [str(digit) for digit in range(10)]
    assert properties["input_shape"] == [1, 8, 8]
    assert len(properties["mean"]) == 1
    assert len(properties["std"]) == 1
    assert properties["kept_blocks"] == [1, 3, 5, 8, 9]
    assert properties["removed_blocks"] == [2, 4, 6, 7]
    assert properties["arch"] == "resnet20"
    assert properties["source_run"] == str(runs["pruned"].resolve())
    assert properties["binary_layers"] == []
    assert properties["precision"] == "fp32"


def test_pruned_export_is_smaller(runs, tmp_path):
    output = tmp_path / "pruned.onnx"
    result = export(runs["pruned"], output)
    assert result.exit_code == 0, result.output
    report = read_report(output)
    assert report["parity"]["passed"] is True
    assert report["size"]["ratio_to_unpruned_fp32"] < 0.7
    assert report["size"]["fp32_bytes"] == output.stat().st_size
    op_types = [node.op_type for node in onnx.load(str(output)).graph.node]
    # Block 4 opens stage 2 and is pruned; its shortcut still pools and pads.
    assert op_types.count("AveragePool") == 2
    assert op_types.count("Pad") == 2


@pytest.mark.parametrize("name", ["binary", "by-hand", "binary-all"])
def test_binary_export_packs_bits(runs, tmp_path, name):
    output = tmp_path / f"{name}.onnx"
    result = export(runs[name], output)
    assert result.exit_code == 0, result.output
    report = read_report(output)
    assert report["parity"]["max_abs_logit_difference"] <= 1e-4
    assert report["precision"] == "fp32+binary"
    assert report["size"]["ratio_to_fp32"] < 1 / 15

    model = onnx.load(str(output))
    packed = [tensor for tensor in model.graph.initializer if tensor.data_type == onnx.TensorProto.UINT8
              and tensor.name == "binary.bits"]
    assert len(packed) == 1
    properties = {entry.key: json.loads(entry.value) for entry in model.metadata_props}
    assert len(properties["binary_layers"]) == (20 if name == "binary-all" else 18)
    # onnxruntime folds the unpacking nodes away: inference is plain Conv.
    assert not {"BitShift", "BitwiseAnd", "Split"} & optimized_op_types(output, tmp_path)


def test_packing_round_trip_is_exact():
    generator = torch.Generator().manual_seed(0)
    kernels = {}
    graph = onnx.helper.make_graph([], "kernels", [], [])
    for name, shape in [("a", (4, 3, 3, 3)), ("b", (4, 3, 3, 3)), ("c", (8, 4, 1, 1)), ("d", (5, 7))]:
        weight = torch.randn(shape, generator=generator)
        alpha = weight.abs().flatten(1).mean(dim=1).view(-1, *[1] * (len(shape) - 1))
        kernels[name] = torch.where(weight >= 0, alpha, -alpha).numpy()
        graph.initializer.append(numpy_helper.from_array(kernels[name], name))
        graph.output.append(onnx.helper.make_tensor_value_info(f"{name}.out", onnx.TensorProto.FLOAT, list(shape)))
        graph.node.append(onnx.helper.make_node("Identity", [name], [f"{name}.out"]))
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)])

    packed = pack_binary_kernels(model, list(kernels))
    onnx.checker.check_model(packed, full_check=True)
    session = onnxruntime.InferenceSession(packed.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {})
    for (name, expected), actual in zip(kernels.items(), outputs):
        np.testing.assert_array_equal(actual, expected, err_msg=name)


def test_packing_rejects_float_kernel():
    with pytest.raises(InvalidValueError, match="not a binary kernel"):
        split_binary_kernel("w", np.array([[0.5, -0.5, 0.25]], dtype=np.float32))


def test_listed_layer_must_be_binary(digits_data):
    model = build_model("resnet20", num_classes=10, in_channels=1).eval()
    with pytest.raises(RunFolderError, match="blocks.0.branch.0"):
        find_binary_layers(model, ["blocks.0.branch.0"])
    with pytest.raises(RunFolderError, match="no such convolution or classifier"):
        find_binary_layers(model, ["blocks.0.branch.1"])


def test_int8_export_is_qdq_and_runs(runs, tmp_path):
    output = tmp_path / "int8.onnx"
    # The untrained model's accuracy is near chance, so the drop is not judged here.
    result = export(runs["fp32"], output, "--quantize", "int8", "--calibration-images", "32",
                    "--max-accuracy-drop", "100")
    assert result.exit_code == 0, result.output
    report = read_report(output)
    assert report["precision"] == "int8"
    assert report["parity"]["tolerance"] is None
    assert report["size"]["ratio_to_fp32"] <= 1 / 3
    op_types = {node.op_type for node in onnx.load(str(output)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= op_types


def test_int8_keeps_binary_kernels_packed(runs, tmp_path):
    output = tmp_path / "int8-binary.onnx"
    result = export(runs["binary"], output, "--quantize", "int8", "--calibration-images", "32",
                    "--max-accuracy-drop", "100")
    assert result.exit_code == 0, result.output
    op_types = {node.op_type for node in onnx.load(str(output)).graph.node}
    assert {"BitShift", "QuantizeLinear"} <= op_types
    assert read_report(output)["size"]["ratio_to_fp32"] < 1 / 15


def test_ort_format_written_and_validated(runs, tmp_path):
    output = tmp_path / "binary.onnx"
    result = export(runs["binary"], output, "--ort")
    assert result.exit_code == 0, result.output
    ort_path = tmp_path / "binary.ort"
    assert ort_path.is_file()
    report = json.loads((tmp_path / "binary.ort.validation.json").read_text())
    assert report["format"] == "ort"
    assert report["parity"]["passed"] is True
    # Saved without constant folding, the packed bits stay packed: far below the fp32 size.
    assert ort_path.stat().st_size < report["size"]["fp32_bytes"] / 8
    session = onnxruntime.InferenceSession(str(ort_path), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["precision"]) == "fp32+binary"


def test_parity_failure_exits_1(runs, tmp_path):
    output = tmp_path / "strict.onnx"
    result = export(runs["fp32"], output, "--tolerance", "1e-30")
    assert result.exit_code == 1
    assert "parity" in result.output
    assert "exceeds the tolerance" in result.output
    assert read_report(output)["passed"] is False


def test_missing_run_exits_2(tmp_path):
    result = export(tmp_path / "absent", tmp_path / "x.onnx")
    assert result.exit_code == 2
    assert "not found" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_output_must_end_in_onnx(runs, tmp_path):
    result = export(runs["fp32"], tmp_path / "model.bin", "--no-validate")
    assert result.exit_code == 2
    assert "--output must end in .onnx" in result.output


def test_failed_export_keeps_previous_file(runs, tmp_path, monkeypatch):
    output = tmp_path / "model.onnx"
    output.write_bytes(b"previous")

    def fail(*arguments, **keywords):
        raise OSError("disk full")

    monkeypatch.setattr(onnx_export, "pack_binary_kernels", fail)
    result = export(runs["fp32"], output, "--no-validate")
    assert result.exit_code == 1
    assert output.read_bytes() == b"previous"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model.onnx"]


def test_default_output_name(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["export", "onnx", str(runs["fp32"]), "--no-validate", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "exports" / "fp32.onnx").is_file()



def test_too_many_calibration_images_exits_2(runs, tmp_path):
    result = export(runs["fp32"], tmp_path / "int8.onnx", "--quantize", "int8", "--calibration-images", "100000")
    assert result.exit_code == 2
    assert "--calibration-images 100000 exceeds" in result.output
    assert not (tmp_path / "int8.onnx").exists()
