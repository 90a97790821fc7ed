"""Shared fixtures: tiny models and the real CIFAR-10 JPEG folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CIFAR10_JPG_VARIABLE = "SDPRUNE_CIFAR10_JPG"
DEFAULT_CIFAR10_JPG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg"


@pytest.fixture(scope="session")
def cifar10_jpg() -> Path:
    """Return the CIFAR-10 JPEG folder, or skip when it is not on this machine."""
    folder = Path(os.environ.get(CIFAR10_JPG_VARIABLE, DEFAULT_CIFAR10_JPG))
    if not (folder / "train").is_dir() or not (folder / "test").is_dir():
        pytest.skip(f"CIFAR-10 JPEG folder not found at {folder}: set {CIFAR10_JPG_VARIABLE}")
    return folder


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """Train resnet20 on digits for 2 epochs once per session and return its run folder."""
    from click.testing import CliRunner

    from sdprune.cli import main

    folder = tmp_path_factory.mktemp("runs") / "digits-r20"
    result = CliRunner().invoke(main, ["train", "--epochs", "2", "--out", str(folder), "--quiet", "--seed", "1"])
    assert result.exit_code == 0, result.output
    return folder
