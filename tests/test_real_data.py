"""Training on a small subset of the real CIFAR-10 JPEGs, including a kill -9 and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from sdprune.cli import main
from sdprune.runs import CONFIG_FILE, METRICS_FILE, STATE_FILE, WEIGHTS_FILE, read_metrics


def test_train_then_evaluate_on_cifar10_jpg(cifar10_jpg, tmp_path):
    folder = tmp_path / "r20"
    common = ["--dataset", "imagefolder", "--data-dir", str(cifar10_jpg), "--limit-test", "100"]
    result = CliRunner().invoke(main, ["train", *common, "--epochs", "1", "--limit-train", "300", "--out", str(folder), "--quiet"])
    assert result.exit_code == 0, result.output

    recorded = read_metrics(folder)[-1]["test_accuracy"]
    result = CliRunner().invoke(main, ["evaluate", str(folder), *common, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["accuracy"] == pytest.approx(recorded)
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["classes"][0] == "airplane"
    assert config["input_shape"] == [3, 32, 32]


def wait_for(condition, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def test_kill_during_training_then_resume(cifar10_jpg, tmp_path):
    folder = tmp_path / "killed"
    command = [sys.executable, "-m", "sdprune", "train", "--dataset", "imagefolder", "--data-dir", str(cifar10_jpg),
               "--limit-train", "256", "--limit-test", "64", "--batch-size", "32", "--epochs", "3",
               "--workers", "0", "--out", str(folder), "--quiet"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=environment)
    try:
        assert wait_for(lambda: (folder / STATE_FILE).exists(), 240), "epoch 1 did not finish in time"
        # Epoch 2 is now running: kill without any chance to clean up.
        time.sleep(0.5)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    finished_before = len(read_metrics(folder))
    assert finished_before >= 1

    completed = subprocess.run(command[:-3] + ["--resume", str(folder), "--quiet"], env=environment, timeout=300)
    assert completed.returncode == 0
    assert [line["epoch"] for line in read_metrics(folder)] == [1, 2, 3]
    assert sorted(path.name for path in folder.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE, STATE_FILE])
