"""Hostile and broken input across all commands: one line, the right exit code, nothing lost."""

import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from sdprune.cli import main
from sdprune.runs import CONFIG_FILE, STATE_FILE, WEIGHTS_FILE


def invoke(*arguments):
    return CliRunner().invoke(main, [str(argument) for argument in arguments])


def assert_one_line_error(result, exit_code, *fragments):
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    for fragment in fragments:
        assert fragment in result.output


class Payload:
    """Pickles to a call that creates `marker`, the way a malicious checkpoint would run code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def write_payload(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"epoch": 1, "model": Payload(str(marker))}))


def copy_run(source: Path, destination: Path) -> Path:
    shutil.copytree(source, destination)
    return destination


@pytest.fixture(scope="module")
def exported(digits_run, tmp_path_factory):
    path = tmp_path_factory.mktemp("exports") / "digits.onnx"
    result = invoke("export", "onnx", digits_run, "-o", path, "--no-validate", "--quiet")
    assert result.exit_code == 0, result.output
    return path


# Every command, a bad value, and what the one-line message must name.
BadArgument = namedtuple("BadArgument", "arguments fragments")
BAD_ARGUMENTS = {
    "train epochs": BadArgument(["train", "--epochs", "0"], ["--epochs", "0"]),
    "train rule": BadArgument(["train", "--survival-rule", "cubic"], ["--survival-rule", "cubic"]),
    "evaluate split": BadArgument(["evaluate", "{run}", "--split", "holdout"], ["--split", "holdout"]),
    "evaluate missing run": BadArgument(["evaluate", "{missing}"], ["{missing}", "not found"]),
    "info missing run": BadArgument(["info", "{missing}"], ["{missing}", "not found"]),
    "analyze samples": BadArgument(["analyze", "{run}", "--samples", "1"], ["--samples", "1"]),
    "prune depth zero": BadArgument(["prune", "{run}", "--keep-depth", "0", "--out", "{out}"], ["--keep-depth", "between 1 and 9", "got 0"]),
    "prune depth too big": BadArgument(["prune", "{run}", "--keep-depth", "10", "--out", "{out}"], ["--keep-depth", "between 1 and 9", "got 10"]),
    "prune no target": BadArgument(["prune", "{run}", "--out", "{out}"], ["--keep-depth"]),
    "prune two targets": BadArgument(["prune", "{run}", "--keep-depth", "3", "--keep-ratio", "0.5", "--out", "{out}"], ["--keep-depth", "--keep-ratio"]),
    "prune strategy": BadArgument(["prune", "{run}", "--keep-depth", "3", "--strategy", "random", "--out", "{out}"], ["--strategy", "random"]),
    "export quantize": BadArgument(["export", "onnx", "{run}", "--quantize", "int4"], ["--quantize", "int4"]),
    "export missing run": BadArgument(["export", "onnx", "{missing}"], ["{missing}", "not found"]),
    "validate missing file": BadArgument(["validate", "{missing}.onnx"], ["{missing}.onnx"]),
    "benchmark steps": BadArgument(["benchmark", "train", "--steps", "0"], ["--steps", "0"]),
    "demo keep depth": BadArgument(["demo", "--keep-depth", "50", "--out", "{out}"], ["--keep-depth", "50"]),
    "unknown command": BadArgument(["shrink"], ["shrink"]),
}


@pytest.mark.parametrize("case", BAD_ARGUMENTS.values(), ids=BAD_ARGUMENTS.keys())
def test_bad_argument_exits_2(case, digits_run, tmp_path):
    values = {"run": digits_run, "missing": tmp_path / "absent", "out": tmp_path / "out"}
    arguments = [argument.format(**values) for argument in case.arguments]
    result = invoke(*arguments)
    assert_one_line_error(result, 2, *[fragment.format(**values) for fragment in case.fragments])


def test_pickle_weights_never_run(digits_run, tmp_path):
    folder = copy_run(digits_run, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    write_payload(folder / WEIGHTS_FILE, marker)
    for command in ("evaluate", "info"):
        assert_one_line_error(invoke(command, folder), 1, "model.safetensors")
    assert not marker.exists()


def test_pickle_training_state_never_runs(digits_run, tmp_path):
    folder = copy_run(digits_run, tmp_path / "run")
    marker = tmp_path / "payload-ran"
    write_payload(folder / STATE_FILE, marker)
    assert_one_line_error(invoke("train", "--resume", folder), 1, "unsafe or invalid")
    assert not marker.exists()


def test_pickle_importance_report_never_runs(digits_run, tmp_path):
    report = tmp_path / "importance.json"
    marker = tmp_path / "payload-ran"
    write_payload(report, marker)
    result = invoke("prune", digits_run, "--keep-depth", "5", "--importance", report, "--out", tmp_path / "out")
    assert result.exit_code in (1, 2)
    assert "importance.json" in result.output
    assert "Traceback" not in result.output
    assert not marker.exists()
    assert not (tmp_path / "out" / WEIGHTS_FILE).exists()


def test_pickle_onnx_file_rejected(tmp_path):
    model = tmp_path / "model.onnx"
    marker = tmp_path / "payload-ran"
    write_payload(model, marker)
    assert_one_line_error(invoke("validate", model), 1, str(model))
    assert not marker.exists()


def test_truncated_onnx_exit_1(exported, tmp_path):
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(exported.read_bytes()[: exported.stat().st_size // 3])
    assert_one_line_error(invoke("validate", damaged), 1, str(damaged))


def test_corrupt_config_exit_1_everywhere(digits_run, tmp_path):
    folder = copy_run(digits_run, tmp_path / "run")
    (folder / CONFIG_FILE).write_text('{"format": "sdprune-run", "blocks": [')
    for arguments in (["evaluate", folder], ["info", folder], ["analyze", folder],
                      ["prune", folder, "--keep-depth", "3", "--out", tmp_path / "out"],
                      ["export", "onnx", folder, "-o", tmp_path / "x.onnx"]):
        assert_one_line_error(invoke(*arguments), 1, "model.json")


def test_output_under_a_file_rejected_early(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = invoke("train", "--out", blocker / "run")
    assert_one_line_error(result, 2, str(blocker / "run"))


def test_full_disk_rejected_before_work(tmp_path, monkeypatch):
    from sdprune.cli import common

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(common.shutil, "disk_usage", lambda path: usage._replace(free=1024 * 1024))
    result = invoke("train", "--out", tmp_path / "run", "--epochs", "1")
    assert_one_line_error(result, 2, "MiB free")
    assert not (tmp_path / "run" / WEIGHTS_FILE).exists()


def run_and_kill(command, ready, seconds=240):
    """Start `command`, wait until `ready()` is true, then kill -9 it."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + seconds
        while not ready() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    return environment


def test_kill_during_prune_finetuning_then_resume(digits_run, tmp_path):
    out = tmp_path / "pruned"
    command = [sys.executable, "-m", "sdprune", "prune", str(digits_run), "--keep-depth", "5", "--strategy", "last",
               "--finetune-epochs", "3", "--out", str(out), "--quiet"]
    environment = run_and_kill(command, lambda: (out / STATE_FILE).exists())
    assert not list(out.glob("*.json.tmp"))

    completed = subprocess.run([sys.executable, "-m", "sdprune", "prune", "--resume", str(out), "--quiet"],
                               env=environment, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert (out / "prune_report.json").exists()
    result = invoke("evaluate", out, "--json")
    assert result.exit_code == 0, result.output


def test_kill_during_export_leaves_no_partial_model(digits_run, tmp_path):
    output = tmp_path / "model.onnx"
    command = [sys.executable, "-m", "sdprune", "export", "onnx", str(digits_run), "-o", str(output), "--quiet"]
    started = time.monotonic()
    # Kill once the exporter is well under way but before validation could finish.
    run_and_kill(command, lambda: time.monotonic() - started > 4 or any(tmp_path.glob(".model.onnx*")))
    if output.exists():
        onnx.checker.check_model(onnx.load(str(output)))

    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    onnx.checker.check_model(onnx.load(str(output)))


@pytest.mark.parametrize("command", ["prune", "export"])
def test_full_disk_rejected_for_prune_and_export(command, digits_run, tmp_path, monkeypatch):
    from sdprune.cli import common

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(common.shutil, "disk_usage", lambda path: usage._replace(free=1024 * 1024))
    if command == "prune":
        result = invoke("prune", digits_run, "--keep-depth", "5", "--strategy", "last", "--out", tmp_path / "out")
    else:
        result = invoke("export", "onnx", digits_run, "-o", tmp_path / "out" / "model.onnx")
    assert_one_line_error(result, 2, "MiB free")
    assert not (tmp_path / "out").exists()
