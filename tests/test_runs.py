"""Run folders: round trip, strict loading and the safe-loading rules."""

import json
import pickle

import pytest
import torch

from sdprune.errors import InvalidValueError, RunFolderError
from sdprune.resnet import build_model
from sdprune.runs import CONFIG_FILE, STATE_FILE, WEIGHTS_FILE, load_run, load_training_state, save_run

CONFIG = {"arch": "resnet20", "classes": ["a", "b", "c"], "input_shape": [1, 8, 8], "mean": [0.5], "std": [0.25]}


@pytest.fixture
def saved(tmp_path):
    model = build_model("resnet20", num_classes=3, in_channels=1, kept_blocks=[1, 2, 4, 8, 9]).eval()
    save_run(tmp_path, model, CONFIG)
    return tmp_path, model


def test_round_trip_reproduces_outputs(saved):
    folder, model = saved
    loaded = load_run(folder)
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert loaded.model.kept_indices == [1, 2, 4, 8, 9]
    assert loaded.classes == ["a", "b", "c"]
    assert not loaded.model.training


def test_missing_folder_is_usage_error(tmp_path):
    with pytest.raises(InvalidValueError, match="not found"):
        load_run(tmp_path / "absent")


def test_missing_weights(saved):
    folder, _ = saved
    (folder / WEIGHTS_FILE).unlink()
    with pytest.raises(RunFolderError, match="model.safetensors is missing"):
        load_run(folder)


def test_truncated_weights(saved):
    folder, _ = saved
    data = (folder / WEIGHTS_FILE).read_bytes()
    (folder / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(RunFolderError, match="truncated or corrupt"):
        load_run(folder)


def test_foreign_weights(saved, tmp_path_factory):
    folder, _ = saved
    other = tmp_path_factory.mktemp("other")
    save_run(other, build_model("resnet32", num_classes=3, in_channels=1), CONFIG)
    (folder / WEIGHTS_FILE).write_bytes((other / WEIGHTS_FILE).read_bytes())
    with pytest.raises(RunFolderError, match="belong to another model"):
        load_run(folder)


def test_corrupt_json(saved):
    folder, _ = saved
    (folder / CONFIG_FILE).write_text('{"format": "sdprune-run", ')
    with pytest.raises(RunFolderError, match="not valid JSON"):
        load_run(folder)


def test_foreign_json(saved):
    folder, _ = saved
    (folder / CONFIG_FILE).write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(RunFolderError, match="not an sdprune model description"):
        load_run(folder)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_in_state_never_runs(tmp_path):
    marker = tmp_path / "payload-ran"
    with open(tmp_path / STATE_FILE, "wb") as stream:
        pickle.dump({"epoch": 1, "model": Payload(str(marker))}, stream)
    with pytest.raises(RunFolderError, match="unsafe or invalid"):
        load_training_state(tmp_path)
    assert not marker.exists()


def test_no_temporary_files_left(saved):
    folder, _ = saved
    assert sorted(path.name for path in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
