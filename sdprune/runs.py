"""Run folders: the interchange format between train, analyze, prune and export.

A run folder holds `model.safetensors` (weights only, nothing executable),
`model.json` (how to rebuild and preprocess the model), `metrics.jsonl` and, for
training, `training_state.pt`. A binary layer (see sdprune.binarize) is stored
as packed sign bits and one alpha per output channel, model.json lists it under
"binary_layers", and its latent float weights live only in the training state,
which resuming needs. Loading is strict: a missing, truncated, unsafe or
foreign file raises RunFolderError naming the file.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sdprune import atomic
from sdprune.binarize import binarize_layers, binary_layer_names, pack_binary_state, unpack_binary_state
from sdprune.errors import InvalidValueError, RunFolderError
from sdprune.resnet import BlockSpec, CifarResNet

RUN_FORMAT = "sdprune-run"
RUN_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "training_state.pt"


@dataclass
class Run:
    """A loaded run: the model in eval mode, its model.json contents and its folder."""

    model: CifarResNet
    config: dict[str, Any]
    path: Path

    @property
    def classes(self) -> list[str]:
        return self.config["classes"]

    @property
    def input_shape(self) -> list[int]:
        return self.config["input_shape"]


def describe_model(model: CifarResNet) -> dict[str, Any]:
    """Return the model.json fields that rebuild `model`'s structure."""
    return {
        "arch": getattr(model, "arch", None),
        "num_classes": model.num_classes,
        "in_channels": model.in_channels,
        "blocks": [spec.to_dict() for spec in model.specs],
        "kept_blocks": model.kept_indices,
        "removed_blocks": [spec.index for spec in model.specs if not spec.kept],
        "binary_layers": binary_layer_names(model),
    }


def save_run(folder: str | Path, model: CifarResNet, config: dict[str, Any]) -> None:
    """Write model.safetensors and model.json atomically.

    `config` holds everything beyond the structure (classes, mean/std, input
    shape, data set, training summary, lineage); the structure is taken from
    the model itself so the two files cannot disagree.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    document = {"format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, **config, **describe_model(model)}
    document["arch"] = config.get("arch") or document["arch"]

    # safetensors refuses tensors that share memory; state_dict tensors of this model do not.
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in pack_binary_state(model).items()}
    atomic.write_with(folder / WEIGHTS_FILE, lambda path: save_file(tensors, str(path), metadata={"format": RUN_FORMAT}))
    atomic.write_json(folder / CONFIG_FILE, document)


def read_config(folder: str | Path) -> dict[str, Any]:
    """Read and check model.json of a run folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidValueError(f"run folder {folder} not found: pass a folder written by sdprune train or prune")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise RunFolderError(f"{path} is missing: {folder} is not a complete sdprune run folder")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFolderError(f"{path} is not valid JSON ({error}): the file is corrupt, retrain or restore it") from error
    if not isinstance(document, dict) or document.get("format") != RUN_FORMAT:
        raise RunFolderError(f"{path} is not an sdprune model description (no \"format\": \"{RUN_FORMAT}\")")
    if document.get("format_version", 0) > RUN_FORMAT_VERSION:
        raise RunFolderError(f"{path} was written by a newer sdprune (format {document['format_version']}): upgrade sdprune")
    required = ("num_classes", "in_channels", "blocks", "classes", "mean", "std", "input_shape")
    missing = [key for key in required if key not in document]
    if missing:
        raise RunFolderError(f"{path} lacks {', '.join(missing)}: the file is incomplete")
    return document


def build_from_config(config: dict[str, Any]) -> CifarResNet:
    """Rebuild the (possibly pruned) network that `config` describes, untrained."""
    try:
        specs = [BlockSpec.from_dict(block) for block in config["blocks"]]
        model = CifarResNet(specs, num_classes=int(config["num_classes"]), in_channels=int(config["in_channels"]))
    except (KeyError, TypeError, ValueError) as error:
        raise RunFolderError(f"model.json describes no valid network: {error}") from error
    model.arch = config.get("arch")

    binary_layers = config.get("binary_layers") or []
    if not isinstance(binary_layers, list) or not all(isinstance(name, str) for name in binary_layers):
        raise RunFolderError(
            f"model.json: binary_layers must be a list of layer names, got {binary_layers!r}: the file is corrupt"
        )
    try:
        binarize_layers(model, binary_layers)
    except ValueError as error:
        raise RunFolderError(f"model.json lists an invalid binary layer ({error}): the file is corrupt") from error
    return model


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load safetensors weights into `model`, rejecting truncated or foreign files."""
    if not path.is_file():
        raise RunFolderError(f"{path} is missing: the run folder is incomplete")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise RunFolderError(f"{path} is not a readable safetensors file ({error}): it is truncated or corrupt") from error
    try:
        tensors = unpack_binary_state(model, tensors)
    except ValueError as error:
        raise RunFolderError(
            f"{path} contains invalid binary weights ({error}): the file is corrupt or belongs to another model"
        ) from error

    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise RunFolderError(f"{path} does not match model.json ({detail}): the weights belong to another model")
    for name, tensor in tensors.items():
        if tensor.shape != expected[name].shape:
            raise RunFolderError(
                f"{path}: {name} has shape {list(tensor.shape)}, model.json expects {list(expected[name].shape)}"
            )
    model.load_state_dict(tensors)


def load_run(path: str | Path, device: str | torch.device = "cpu") -> Run:
    """Load a run folder: the model in eval mode on `device`, and its config."""
    folder = Path(path)
    config = read_config(folder)
    model = build_from_config(config)
    load_weights(model, folder / WEIGHTS_FILE)
    model.to(device).eval()
    return Run(model=model, config=config, path=folder)


def save_training_state(folder: str | Path, state: dict[str, Any]) -> None:
    """Write the resumable training state atomically (tensors and plain values only)."""
    atomic.write_with(Path(folder) / STATE_FILE, lambda path: torch.save(state, path))


def load_training_state(folder: str | Path) -> dict[str, Any]:
    """Read the training state with weights_only=True, so no pickled code can run."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise RunFolderError(f"{path} is missing: {folder} has no training state to resume from")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise RunFolderError(
            f"{path} is unsafe or invalid: it holds objects other than tensors and plain values; delete it"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise RunFolderError(f"{path} is truncated or corrupt ({error}); delete it and train again") from error
    if not isinstance(state, dict) or "epoch" not in state:
        raise RunFolderError(f"{path} is not an sdprune training state")
    return state


def read_metrics(folder: str | Path) -> list[dict[str, Any]]:
    path = Path(folder) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
