"""DDP under torchrun: two CPU ranks (gloo) train resnet20 on a small CIFAR-10 subset."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from sdprune.cli import main
from sdprune.depth import draw_gates, gate_generator, survival_probabilities
from sdprune.distributed import parameter_digest
from sdprune.resnet import build_model
from sdprune.runs import CONFIG_FILE, METRICS_FILE, STATE_FILE, WEIGHTS_FILE, load_run

RANKS = 2
BATCH_SIZE = 32
TRAIN_IMAGES = 256
TEST_IMAGES = 64
SURVIVAL_LAST = 0.1
# DistributedSampler gives each rank TRAIN_IMAGES / RANKS images.
STEPS = TRAIN_IMAGES // RANKS // BATCH_SIZE
BLOCKS = 9


def gate_history(seed: int) -> list[list[bool]]:
    """Return the gates of every step of the one-epoch run, as training draws them."""
    survival = torch.tensor(survival_probabilities("linear", BLOCKS, SURVIVAL_LAST))
    return [draw_gates(survival, gate_generator(seed, step)) for step in range(STEPS)]


def pick_seed() -> int:
    """Return the first seed under which some block's gate is closed at every step."""
    for seed in range(100):
        if any(not any(gates[position] for gates in gate_history(seed)) for position in range(BLOCKS)):
            return seed
    raise AssertionError("no seed in 0..99 closes a block at every step")


SEED = pick_seed()


def torchrun_train(arguments: list[str]) -> subprocess.CompletedProcess:
    """Run `sdprune train` in RANKS CPU processes under torchrun and return the finished process."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(RANKS),
        "-m", "sdprune", "train", *arguments,
    ]
    # One thread per rank keeps two ranks from fighting over the cores.
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    environment.pop("WORLD_SIZE", None)
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def small_cifar10(tmp_path_factory, cifar10_jpg) -> Path:
    """Copy the first JPEGs of each class into a small image folder.

    Each rank scans the folder and estimates its mean and std, which takes seconds
    on all 60,000 files and a fraction of a second on these.
    """
    folder = tmp_path_factory.mktemp("cifar10-small")
    # Enough per class for the class-balanced subsets of TRAIN_IMAGES and TEST_IMAGES.
    for split, count in (("train", math.ceil(TRAIN_IMAGES / 10)), ("test", math.ceil(TEST_IMAGES / 10))):
        for class_folder in sorted((cifar10_jpg / split).iterdir()):
            target = folder / split / class_folder.name
            target.mkdir(parents=True)
            for image in sorted(class_folder.iterdir())[:count]:
                shutil.copyfile(image, target / image.name)
    return folder


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, small_cifar10) -> tuple[Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("ddp") / "run"
    result = torchrun_train([
        "--dataset", "imagefolder", "--data-dir", str(small_cifar10),
        "--limit-train", str(TRAIN_IMAGES), "--limit-test", str(TEST_IMAGES), "--batch-size", str(BATCH_SIZE),
        "--arch", "resnet20", "--survival-last", str(SURVIVAL_LAST), "--epochs", "1", "--seed", str(SEED),
        "--workers", "0", "--device", "cpu", "--out", str(folder),
    ])
    return folder, result


def test_ranks_end_with_identical_weights(ddp_run):
    folder, _ = ddp_run
    training = json.loads((folder / CONFIG_FILE).read_text())["training"]
    assert training["world_size"] == RANKS
    # Training compares every rank's parameter digest after each epoch and fails on a
    # difference. The digest it recorded must be the digest of the saved weights.
    assert training["parameters_sha256"] == parameter_digest(load_run(folder).model).hex()


def test_run_folder_complete(ddp_run):
    folder, result = ddp_run
    for name in (CONFIG_FILE, WEIGHTS_FILE, METRICS_FILE, STATE_FILE):
        assert (folder / name).is_file(), name
    assert not list(folder.glob(".*.tmp"))
    metrics = [json.loads(line) for line in (folder / METRICS_FILE).read_text().splitlines()]
    assert [line["epoch"] for line in metrics] == [1]
    training = json.loads((folder / CONFIG_FILE).read_text())["training"]
    assert training["global_batch_size"] == BATCH_SIZE * RANKS
    assert training["finished"]


def test_log_states_global_batch_once(ddp_run):
    _, result = ddp_run
    assert f"global batch {BATCH_SIZE * RANKS} ({BATCH_SIZE} x {RANKS} processes)" in result.stdout
    # Only rank 0 prints.
    assert result.stdout.count("global batch") == 1
    assert result.stdout.count("wrote ") == 1


def test_evaluate_reads_ddp_run(ddp_run):
    folder, _ = ddp_run
    result = CliRunner().invoke(main, ["evaluate", str(folder), "--device", "cpu", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.output)
    assert evaluation["images"] == TEST_IMAGES
    assert 0.0 <= evaluation["accuracy"] <= 1.0


def test_always_skipped_block_unchanged(ddp_run):
    folder, _ = ddp_run
    history = gate_history(SEED)
    never_run = [position for position in range(BLOCKS) if not any(gates[position] for gates in history)]
    ran = [position for position in range(BLOCKS) if any(gates[position] for gates in history)]
    assert never_run and ran

    torch.manual_seed(SEED)
    initial = build_model("resnet20", 10, 3, "linear", SURVIVAL_LAST).state_dict()
    trained = load_run(folder).model.state_dict()
    for position in never_run:
        names = [name for name in initial if name.startswith(f"blocks.{position}.")]
        assert names
        for name in names:
            # With weight decay and momentum, any optimizer update would move these bits.
            assert torch.equal(trained[name], initial[name]), f"{name} changed though block {position + 1} never ran"
    for position in ran:
        name = f"blocks.{position}.branch.0.weight"
        assert not torch.equal(trained[name], initial[name]), f"{name} did not change though block {position + 1} ran"


def test_resume_under_torchrun(ddp_run, tmp_path):
    folder, _ = ddp_run
    resumed = tmp_path / "resumed"
    shutil.copytree(folder, resumed)
    # Turn the finished one-epoch run into a two-epoch run stopped after its first epoch.
    state = torch.load(resumed / STATE_FILE, weights_only=True)
    train_config = json.loads(state["train_config"])
    train_config["epochs"] = 2
    state["train_config"] = json.dumps(train_config)
    torch.save(state, resumed / STATE_FILE)

    result = torchrun_train(["--resume", str(resumed)])
    assert result.stdout.count("resuming after epoch 1") == 1
    metrics = [json.loads(line) for line in (resumed / METRICS_FILE).read_text().splitlines()]
    assert [line["epoch"] for line in metrics] == [1, 2]
    training = json.loads((resumed / CONFIG_FILE).read_text())["training"]
    assert training["epochs_completed"] == 2
    assert training["world_size"] == RANKS
    assert training["parameters_sha256"] == parameter_digest(load_run(resumed).model).hex()
    assert training["parameters_sha256"] != json.loads((folder / CONFIG_FILE).read_text())["training"]["parameters_sha256"]


def test_sync_bn_on_cpu_under_torchrun_rejected(tmp_path):
    result = CliRunner().invoke(
        main, ["train", "--sync-bn", "--device", "cpu", "--epochs", "1", "--out", str(tmp_path / "run")],
        env={"WORLD_SIZE": "2"},
    )
    assert result.exit_code == 2
    assert "--sync-bn needs CUDA" in result.output


def test_compile_keeps_weight_names(tmp_path):
    from sdprune.data import DataConfig
    from sdprune.train import TrainConfig, Trainer

    data = DataConfig(limit_train=64, limit_test=32)
    compiled = Trainer(TrainConfig(epochs=1, compile=True), data, tmp_path, torch.device("cpu"), quiet=True)
    plain = build_model("resnet20", 10, 1)
    assert list(compiled.model.state_dict()) == list(plain.state_dict())


def test_parameter_digest_sees_one_bit():
    model = build_model("resnet20")
    before = parameter_digest(model)
    assert parameter_digest(model) == before
    with torch.no_grad():
        weight = model.classifier.bias
        weight[0] = torch.nextafter(weight[0], torch.tensor(1.0))
    assert parameter_digest(model) != before
