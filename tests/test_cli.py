"""The train, evaluate and info commands, and their error paths."""

import json

import pytest
from click.testing import CliRunner

from sdprune.cli import main
from sdprune.runs import CONFIG_FILE, WEIGHTS_FILE, read_metrics


def invoke(*arguments):
    return CliRunner().invoke(main, [str(argument) for argument in arguments])


def test_evaluate_reproduces_recorded_accuracy(digits_run):
    result = invoke("evaluate", digits_run, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert 0.0 <= report["accuracy"] <= 1.0
    assert report["accuracy"] == pytest.approx(read_metrics(digits_run)[-1]["test_accuracy"])


def test_info_json_lists_blocks(digits_run):
    result = invoke("info", digits_run, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["blocks"]) == 9
    assert report["blocks"][-1]["survival_prob"] == pytest.approx(0.5)
    assert report["params"] > 0 and report["macs"] > 0


def test_info_table(digits_run):
    result = invoke("info", digits_run)
    assert result.exit_code == 0
    assert "blocks kept 9 of 9" in result.output


def test_python_module_entry_point(digits_run):
    import subprocess
    import sys

    completed = subprocess.run([sys.executable, "-m", "sdprune", "info", str(digits_run)], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "resnet20" in completed.stdout


TRAIN_ERRORS = [
    (["--arch", "resnet21"], "'resnet21' is not one of"),
    (["--survival-last", "0"], "--survival-last must be in (0, 1], got 0.0"),
    (["--survival-last", "1.5"], "--survival-last must be in (0, 1], got 1.5"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--lr", "-1"], "--lr must be positive"),
    (["--dataset", "mnist"], "'mnist' is not one of"),
    (["--dataset", "imagefolder"], "--data-dir is required"),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--limit-train", "0"], "--limit-train"),
]


@pytest.mark.parametrize("arguments, message", TRAIN_ERRORS)
def test_train_usage_errors(tmp_path, arguments, message):
    result = invoke("train", "--out", tmp_path / "run", *arguments)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_train_missing_image_folder(tmp_path):
    result = invoke("train", "--dataset", "imagefolder", "--data-dir", tmp_path / "absent", "--out", tmp_path / "run")
    assert result.exit_code == 2
    assert "is not a folder" in result.output


def test_train_cifar10_offline_names_folder(tmp_path):
    result = invoke("train", "--dataset", "cifar10", "--data-dir", tmp_path, "--out", tmp_path / "run")
    assert result.exit_code == 1
    assert str(tmp_path) in result.output and "--download" in result.output


def test_train_refuses_existing_run(digits_run):
    result = invoke("train", "--out", digits_run)
    assert result.exit_code == 2
    assert f"--resume {digits_run}" in result.output


def test_train_divergence_exits_1(tmp_path):
    result = invoke("train", "--lr", "1e12", "--epochs", "1", "--limit-train", "512", "--batch-size", "32", "--out", tmp_path / "run", "--quiet")
    assert result.exit_code == 1
    assert "training loss became nan at epoch 1, step" in result.output


def test_evaluate_missing_run(tmp_path):
    result = invoke("evaluate", tmp_path / "absent")
    assert result.exit_code == 2
    assert "not found" in result.output


@pytest.fixture
def broken_run(digits_run, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        (folder / name).write_bytes((digits_run / name).read_bytes())
    return folder


@pytest.mark.parametrize("command", ["evaluate", "info"])
def test_truncated_weights_exit_1(broken_run, command):
    data = (broken_run / WEIGHTS_FILE).read_bytes()
    (broken_run / WEIGHTS_FILE).write_bytes(data[:100])
    result = invoke(command, broken_run)
    assert result.exit_code == 1
    assert "truncated or corrupt" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_corrupt_model_json_exit_1(broken_run):
    (broken_run / CONFIG_FILE).write_text("{not json")
    result = invoke("info", broken_run)
    assert result.exit_code == 1
    assert "not valid JSON" in result.output


def test_run_without_weights_exit_1(broken_run):
    (broken_run / WEIGHTS_FILE).unlink()
    result = invoke("evaluate", broken_run)
    assert result.exit_code == 1
    assert "model.safetensors is missing" in result.output


def test_evaluate_mismatched_data(digits_run, cifar10_jpg):
    result = invoke("evaluate", digits_run, "--dataset", "imagefolder", "--data-dir", cifar10_jpg, "--limit-test", "10")
    assert result.exit_code == 2
    assert "choose matching --dataset" in result.output


def test_evaluate_val_without_split(digits_run):
    result = invoke("evaluate", digits_run, "--split", "val")
    assert result.exit_code == 2
    assert "--val-split" in result.output


def test_resume_missing_state(tmp_path):
    (tmp_path / "run").mkdir()
    result = invoke("train", "--resume", tmp_path / "run")
    assert result.exit_code == 1
    assert "training_state.pt is missing" in result.output
