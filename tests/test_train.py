"""The training loop: schedule, resume, divergence."""

import json

import pytest
import torch

from sdprune import runs
from sdprune.data import DataConfig
from sdprune.errors import TrainingDivergedError
from sdprune.train import TrainConfig, Trainer, learning_rate

DATA = DataConfig(dataset="digits", limit_train=256, limit_test=64, batch_size=64)


class StopAfterFirstEpoch(Exception):
    pass


def stop_after_first(metrics):
    raise StopAfterFirstEpoch


def test_step_schedule_divides_at_half_and_three_quarters():
    config = TrainConfig(epochs=8, lr=0.1)
    assert [round(learning_rate(config, epoch), 6) for epoch in range(8)] == [0.1] * 4 + [0.01] * 2 + [0.001] * 2


def test_cosine_schedule_decays():
    config = TrainConfig(epochs=4, lr=0.1, schedule="cosine")
    rates = [learning_rate(config, epoch) for epoch in range(4)]
    assert rates[0] == pytest.approx(0.1)
    assert rates == sorted(rates, reverse=True)


def test_resume_matches_uninterrupted_run(tmp_path):
    config = TrainConfig(epochs=2, seed=5)
    straight = Trainer(config, DATA, tmp_path / "straight", torch.device("cpu"), quiet=True)
    straight.fit()

    interrupted = Trainer(config, DATA, tmp_path / "resumed", torch.device("cpu"), quiet=True, on_epoch=stop_after_first)
    with pytest.raises(StopAfterFirstEpoch):
        interrupted.fit()
    resumed = Trainer(config, DATA, tmp_path / "resumed", torch.device("cpu"), quiet=True)
    resumed.restore()
    assert resumed.start_epoch == 1
    resumed.fit()

    first = runs.load_run(tmp_path / "straight").model.state_dict()
    second = runs.load_run(tmp_path / "resumed").model.state_dict()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name
    epochs = [line["epoch"] for line in runs.read_metrics(tmp_path / "resumed")]
    assert epochs == [1, 2]


def test_metrics_lines_have_documented_fields(tmp_path):
    Trainer(TrainConfig(epochs=1), DATA, tmp_path, torch.device("cpu"), quiet=True).fit()
    line = json.loads((tmp_path / runs.METRICS_FILE).read_text())
    for key in ("epoch", "lr", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "seconds", "mean_blocks_run"):
        assert key in line
    assert 0 < line["mean_blocks_run"] <= 9


def test_divergence_names_epoch_and_step(tmp_path):
    trainer = Trainer(TrainConfig(epochs=2, lr=1e12), DATA, tmp_path / "run", torch.device("cpu"), quiet=True)
    with pytest.raises(TrainingDivergedError, match=r"at epoch 1, step \d+"):
        trainer.fit()
    assert not (tmp_path / "run" / runs.WEIGHTS_FILE).exists()
