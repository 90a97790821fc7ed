"""The analyze command: its four output files, JSON output, pruned runs and error paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sdprune.cli import main
from sdprune.importance import model_signature
from sdprune.resnet import build_model
from sdprune.runs import CONFIG_FILE, load_run, save_run

DIGITS_CONFIG = {
    "arch": "resnet20",
    "classes": [str(digit) for digit in range(10)],
    "input_shape": [1, 8, 8],
    "mean": [0.3],
    "std": [0.4],
    "seed": 2,
    "data": {"dataset": "digits", "data_dir": None, "val_split": 0, "limit_train": None, "limit_test": 30},
}

# Small batches and few images keep each analysis to a few seconds on a CPU.
FAST = ("--samples", "2", "--batch-size", "16")


def invoke(*arguments):
    return CliRunner().invoke(main, [str(argument) for argument in arguments])


def make_run(folder: Path, kept_blocks=None, data: dict | None = None) -> Path:
    """Save an untrained digits resnet20 as a run folder without training it."""
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, in_channels=1, kept_blocks=kept_blocks)
    save_run(folder, model, {**DIGITS_CONFIG, "data": {**DIGITS_CONFIG["data"], **(data or {})}})
    return folder


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory) -> tuple[Path, Path, object]:
    run = make_run(tmp_path_factory.mktemp("runs") / "r20")
    result = invoke("analyze", run, *FAST)
    return run, run / "analysis", result


def test_analyze_writes_four_files(analyzed):
    run, folder, result = analyzed
    assert result.exit_code == 0, result.output
    for name in ("importance.json", "importance.csv", "importance.png", "depth_curve.png"):
        assert (folder / name).is_file(), name
    assert f"wrote {folder / 'importance.json'}" in result.stdout


def test_analyze_json_has_every_block(analyzed):
    run, folder, _ = analyzed
    report = json.loads((folder / "importance.json").read_text())
    assert report["run"] == str(run)
    assert report["arch"] == "resnet20"
    assert report["num_blocks"] == 9
    assert report["split"] == "test"
    assert report["images"] == 30
    assert report["seed"] == 2, "the seed defaults to the run's"
    assert report["model_signature"] == model_signature(load_run(run).model)
    assert [block["index"] for block in report["blocks"]] == list(range(1, 10))
    for block in report["blocks"]:
        for key in ("lesion_accuracy_delta", "lesion_loss_delta", "contribution_mean", "contribution_stderr",
                    "norm_ratio", "survival_prob", "stage", "transition"):
            assert key in block, key
    assert [entry["blocks_kept"] for entry in report["curve"]] == list(range(9, 0, -1))
    assert len(report["removal_order"]) == 8


def test_analyze_table_and_test_set_warning(analyzed):
    _, _, result = analyzed
    assert "contribution" in result.stdout
    assert "lesion sweep" in result.stdout
    assert "no validation split" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_analyze_json_flag_prints_report(tmp_path):
    run = make_run(tmp_path / "run", kept_blocks=[1, 4, 7])
    result = invoke("analyze", run, *FAST, "--json", "--quiet", "--out", tmp_path / "out", "--seed", "5")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["seed"] == 5
    assert report == json.loads((tmp_path / "out" / "importance.json").read_text())
    assert result.stderr == ""


def test_analyze_uses_validation_split(tmp_path):
    run = make_run(tmp_path / "run", kept_blocks=[1, 4, 7], data={"val_split": 50})
    result = invoke("analyze", run, *FAST, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "importance.json").read_text())
    assert report["split"] == "val"
    assert report["images"] == 50
    assert "no validation split" not in result.stderr


def test_analyze_accepts_pruned_run(tmp_path):
    run = make_run(tmp_path / "run", kept_blocks=[1, 2, 4, 6, 9])
    result = invoke("analyze", run, *FAST, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "importance.json").read_text())
    assert [block["index"] for block in report["blocks"]] == [1, 2, 4, 6, 9]
    assert [entry["blocks_kept"] for entry in report["curve"]] == [5, 4, 3, 2, 1]
    assert set(report["removal_order"]) <= {1, 2, 4, 6, 9}


def test_missing_run_folder_exits_2(tmp_path):
    result = invoke("analyze", tmp_path / "absent")
    assert result.exit_code == 2
    assert "not found" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_corrupt_model_json_exits_1(tmp_path):
    run = make_run(tmp_path / "run")
    (run / CONFIG_FILE).write_text("{ truncated")
    result = invoke("analyze", run)
    assert result.exit_code == 1
    assert "not valid JSON" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("samples", ["1", "0", "many"])
def test_bad_samples_exits_2(tmp_path, samples):
    result = invoke("analyze", tmp_path, "--samples", samples)
    assert result.exit_code == 2
    assert "--samples" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_mismatched_dataset_exits_2(tmp_path, cifar10_jpg):
    run = make_run(tmp_path / "run")
    result = invoke("analyze", run, "--dataset", "imagefolder", "--data-dir", cifar10_jpg, "--limit-test", "10")
    assert result.exit_code == 2
    assert "choose matching --dataset" in result.output
    assert len(result.output.strip().splitlines()) == 1
