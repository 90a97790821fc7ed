"""The pruning pipeline: choose blocks, remove them, recalibrate, fine-tune, save.

`prune_run` takes a loaded run and writes a smaller run folder with a
`prune_report.json` that records blocks, parameters, MACs and accuracy at each
stage. `resume_pruning` continues an interrupted fine-tuning from that folder.
"""

from __future__ import annotations

import copy

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch

from sdprune import atomic, runs
from sdprune.binarize import binarize_model, model_size_bytes
from sdprune.data import DataBundle, DataConfig, load_data
from sdprune.depth import SURVIVAL_RULES
from sdprune.errors import InvalidValueError, RunFolderError
from sdprune.evaluate import evaluate, evaluate_logits
from sdprune.prune import (
    REPORT_STRATEGIES,
    STRATEGIES,
    assign_survival,
    check_keep_depth,
    fold_survival_scaling,
    keep_depth_for_ratio,
    prune_model,
    removed_blocks,
)
from sdprune.recalibrate import RECALIBRATION_GATES, recalibrate_batch_norm
from sdprune.resnet import CifarResNet, count_macs, count_parameters
from sdprune.runs import Run
from sdprune.train import EpochMetrics, TrainConfig, Trainer

logger = logging.getLogger(__name__)

REPORT_FILE = "prune_report.json"

# model.json keys that prune adds; fine-tuning passes them to the training loop's run document.
LINEAGE_KEYS = ("parent", "strategy", "pruning")

Batches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PruneConfig:
    """Pruning settings: the target, the strategy, and the repair steps after removal.

    Exactly one of `keep_depth`, `keep_ratio` and `max_accuracy_drop` must be
    set; `target_depth` checks that against the network's block count.
    `max_accuracy_drop` is in percentage points. `survival_last` None means
    fine-tuning at constant depth; a value fine-tunes with stochastic depth
    under `survival_rule`, counted over the kept blocks. `binarize` turns every
    convolution of the kept residual branches into a binary-weight convolution
    after removal and recalibration, and `binarize_all` (which implies it) also
    the stem convolution and the classifier.
    """

    strategy: str = "greedy"
    keep_depth: int | None = None
    keep_ratio: float | None = None
    max_accuracy_drop: float | None = None
    importance: Path | None = None
    samples: int = 20
    seed: int = 0
    recalibrate: bool = True
    recalibration_images: int = 2000
    recalibration_gates: str = "open"
    finetune_epochs: int = 0
    finetune_lr: float = 0.01
    survival_rule: str = "linear"
    survival_last: float | None = None
    binarize: bool = False
    binarize_all: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise InvalidValueError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.keep_ratio is not None and not 0.0 < self.keep_ratio <= 1.0:
            raise InvalidValueError(f"--keep-ratio must be in (0, 1], got {self.keep_ratio}")
        if self.max_accuracy_drop is not None and not 0.0 <= self.max_accuracy_drop <= 100.0:
            raise InvalidValueError(f"--max-accuracy-drop must be between 0 and 100 points, got {self.max_accuracy_drop}")
        if self.samples < 2:
            raise InvalidValueError(f"--samples must be at least 2, got {self.samples}")
        if self.recalibration_images < 1:
            raise InvalidValueError(f"--recalibration-images must be at least 1, got {self.recalibration_images}")
        if self.recalibration_gates not in RECALIBRATION_GATES:
            raise InvalidValueError(
                f"--recalibration-gates must be one of {', '.join(RECALIBRATION_GATES)}, got {self.recalibration_gates!r}"
            )
        if self.finetune_epochs < 0:
            raise InvalidValueError(f"--finetune-epochs must be 0 or more, got {self.finetune_epochs}")
        if not self.finetune_lr > 0:
            raise InvalidValueError(f"--finetune-lr must be positive, got {self.finetune_lr}")
        if self.survival_rule not in SURVIVAL_RULES:
            raise InvalidValueError(f"--survival-rule must be one of {', '.join(SURVIVAL_RULES)}, got {self.survival_rule!r}")
        if self.survival_last is not None and not 0.0 < self.survival_last <= 1.0:
            raise InvalidValueError(f"--survival-last must be in (0, 1], got {self.survival_last}")

    def target(self) -> dict[str, Any]:
        names = ("keep_depth", "keep_ratio", "max_accuracy_drop")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


def target_depth(config: PruneConfig, num_blocks: int) -> int | None:
    """Check that `config` sets exactly one valid target and return the depth it keeps.

    Returns None for `max_accuracy_drop`, whose depth the search decides.
    Messages name the allowed range for a network of `num_blocks` blocks.
    """
    choices = (f"--keep-depth N (1 to {num_blocks}), --keep-ratio R (above 0, at most 1) "
               "or --max-accuracy-drop PTS (0 to 100)")
    given = ["--" + name.replace("_", "-") for name in config.target()]
    if not given:
        raise InvalidValueError(f"no target given: add one of {choices}")
    if len(given) > 1:
        raise InvalidValueError(f"{' and '.join(given)} were given together: choose one of {choices}")

    if config.keep_depth is not None:
        check_keep_depth(config.keep_depth, num_blocks)
        return config.keep_depth
    if config.keep_ratio is not None:
        return keep_depth_for_ratio(config.keep_ratio, num_blocks)
    return None


def load_batches(bundle: DataBundle, split: str, device: torch.device) -> Batches:
    # Every stage evaluates the same images again; decoding them once keeps JPEG decoding out of each repeat.
    return [(inputs.to(device), targets.to(device)) for inputs, targets in bundle.loader(split)]


def measure_stage(name: str, model: CifarResNet, splits: dict[str, Batches], input_shape: list[int],
                  device: torch.device) -> dict[str, Any]:
    """Return one row of the report: blocks, parameters, MACs, sizes and accuracy and loss per split.

    `float32_bytes` counts every parameter in float32, `packed_bytes` counts binary weights at one bit.
    """
    size = model_size_bytes(model)
    row: dict[str, Any] = {
        "stage": name,
        "blocks": len(model.kept_indices),
        "params": count_parameters(model),
        "macs": count_macs(model, input_shape),
        "float32_bytes": size["float32_bytes"],
        "packed_bytes": size["packed_bytes"],
    }
    for split, batches in splits.items():
        result = evaluate(model, batches, device)
        row[f"{split}_accuracy"] = result.accuracy
        row[f"{split}_loss"] = result.loss
    return row


def gates_without(model: CifarResNet, removed: list[int]) -> list[bool]:
    """Return the gates that run every kept block except those in `removed`."""
    return [spec.kept and spec.index not in removed for spec in model.specs]


def accuracy_without(model: CifarResNet, removed: list[int], batches: Batches, device: torch.device) -> float:
    """Return the eval-mode accuracy of `model` with the blocks in `removed` switched off."""
    gates = gates_without(model, removed)
    model.eval()
    return evaluate_logits(lambda inputs: model(inputs, gates=gates), batches, device).accuracy


def search_depth(model: CifarResNet, choose: Callable[[int], list[int]], batches: Batches, baseline: float,
                 max_drop_points: float, device: torch.device) -> tuple[list[int], list[dict[str, Any]]]:
    """Remove blocks while the accuracy stays within `max_drop_points` of `baseline`.

    `choose(depth)` returns the blocks to remove to keep `depth` blocks. Depths
    are tried from one block fewer than the model has downwards. The search
    stops at the first depth whose accuracy falls more than the allowed drop
    below `baseline`. It returns the blocks removed at the depth before that,
    and the accuracy measured at each depth tried. Accuracy is measured right
    after removal, before recalibration.
    """
    best: list[int] = []
    tried = []
    for depth in range(len(model.kept_indices) - 1, 0, -1):
        removed = choose(depth)
        accuracy = accuracy_without(model, removed, batches, device)
        within = (baseline - accuracy) * 100.0 <= max_drop_points + 1e-9
        tried.append({"blocks": depth, "removed_blocks": removed, "accuracy": accuracy, "within": within})
        logger.info("%d blocks (removed %s): accuracy %.2f%%%s", depth, removed, 100 * accuracy,
                    "" if within else ", beyond the allowed drop")
        if not within:
            break
        best = removed
    return best, tried


def load_importance(path: Path, model: CifarResNet) -> dict[str, Any]:
    """Read an importance report of sdprune analyze and check it was made for `model`."""
    from sdprune.importance import model_signature

    if not path.is_file():
        raise InvalidValueError(f"--importance {path} not found: pass the importance.json of sdprune analyze")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFolderError(f"{path} is not valid JSON ({error}): run sdprune analyze again") from error
    if not isinstance(report, dict) or "model_signature" not in report:
        raise RunFolderError(f"{path} is not an importance report of sdprune analyze (no model_signature)")
    if report["model_signature"] != model_signature(model):
        raise InvalidValueError(
            f"--importance {path} was made for another model (its model_signature differs from this run's): "
            "analyze this run and pass that report"
        )
    return report


def compute_importance(model: CifarResNet, batches: Batches, config: PruneConfig, device: torch.device,
                       split: str) -> dict[str, Any]:
    from sdprune.importance import analyze_model

    logger.info("measuring block importance on the %s split for strategy %s", split, config.strategy)
    return analyze_model(model, batches, device, samples=config.samples, seed=config.seed, split=split)


def lineage(parent: Run, config: PruneConfig, removed: list[int], summary: dict[str, Any]) -> dict[str, Any]:
    """Return the model.json keys that record where a pruned run comes from."""
    return {
        "parent": str(parent.path.resolve()),
        "strategy": config.strategy,
        "pruning": {
            "parent_kept_blocks": parent.model.kept_indices,
            "target": config.target(),
            "removed_now": removed,
            **summary,
        },
    }


def inherited_settings(parent: Run) -> dict[str, Any]:
    """Return the parent's model.json keys that still describe a pruned run that is not fine-tuned.

    The structure comes from the pruned model itself, and the parent's training
    summary is left out because its accuracy no longer applies.
    """
    dropped = set(runs.describe_model(parent.model)) | {"format", "format_version", "training", *LINEAGE_KEYS}
    return {key: value for key, value in parent.config.items() if key not in dropped}


def check_output_folder(out: Path, parent: Path) -> None:
    if out.resolve() == parent.resolve():
        raise InvalidValueError(f"--out {out} is the parent run itself: choose another folder")
    if (out / runs.STATE_FILE).exists():
        raise InvalidValueError(f"{out} already contains a fine-tuning run: add --resume {out} or choose another --out")


def prune_run(parent: Run, config: PruneConfig, data_config: DataConfig, out: Path, device: torch.device,
              quiet: bool = False, on_epoch: Callable[[EpochMetrics], None] | None = None) -> dict[str, Any]:
    """Prune `parent` as `config` specifies, write the smaller run to `out`, and return the report.

    The report (also written to `out`/prune_report.json) lists each stage:
    unpruned, blocks removed, recalibrated (unless disabled), `binarized` and
    `binarized, recalibrated` (when binarizing), and fine-tuned (when epochs
    are given), with blocks, parameters, MACs, sizes and accuracy. Its `size`
    lists each layer of the result as binary or float.
    """
    check_output_folder(out, parent.path)
    model = parent.model.to(device).eval()
    kept = model.kept_indices

    # The target is checked before the slow data loading.
    depth = target_depth(config, len(kept))

    bundle = load_data(data_config)
    if len(bundle.classes) != model.num_classes or bundle.input_shape[0] != model.in_channels:
        raise InvalidValueError(
            f"the data has {len(bundle.classes)} classes of {bundle.input_shape[0]}-channel images, but the model "
            f"expects {model.num_classes} classes of {model.in_channels}-channel images: choose matching --dataset"
        )
    selection = "val" if bundle.val is not None else "test"
    if selection == "test" and (config.max_accuracy_drop is not None or config.strategy in REPORT_STRATEGIES):
        logger.warning("the run has no validation split, so the test split chooses the blocks: "
                       "its test accuracy will be optimistic (train with --val-split to avoid this)")
    splits = {name: load_batches(bundle, name, device) for name in (["val"] if bundle.val is not None else []) + ["test"]}
    input_shape = list(parent.input_shape)

    # Importance, only where the strategy reads it and something may be removed.
    report = None
    if config.importance is not None and config.strategy not in REPORT_STRATEGIES:
        logger.warning("--importance is not used: strategy %s does not read an importance report", config.strategy)
    if config.strategy in REPORT_STRATEGIES and depth != len(kept):
        if config.importance is not None:
            report = load_importance(Path(config.importance), model)
        else:
            report = compute_importance(model, splits[selection], config, device, selection)

    stages = [measure_stage("unpruned", model, splits, input_shape, device)]
    summary: dict[str, Any] = {"selection_split": selection}
    if depth is not None:
        removed = removed_blocks(config.strategy, kept, depth, report)
    else:
        baseline = stages[0][f"{selection}_accuracy"]
        removed, tried = search_depth(
            model, lambda target: removed_blocks(config.strategy, kept, target, report),
            splits[selection], baseline, config.max_accuracy_drop, device,
        )
        summary["search"] = tried

    # Removal: a new, smaller network; before recalibration it matches the parent with those gates closed.
    pruned = prune_model(model, removed).eval()
    stages.append(measure_stage("blocks removed", pruned, splits, input_shape, device))

    if config.recalibrate:
        generator = torch.Generator().manual_seed(config.seed)
        loader = bundle.loader("train", shuffle=True, generator=generator)
        removal_state = copy.deepcopy(pruned.state_dict())
        used = recalibrate_batch_norm(pruned, loader, config.recalibration_images, device, generator,
                                      gates=config.recalibration_gates)
        summary["recalibration_images"] = used
        summary["recalibration_gates"] = config.recalibration_gates
        stages.append(measure_stage("recalibrated", pruned, splits, input_shape, device))

        # Recalibration can still lower accuracy: with random gates it cost 2 to 4 points where few
        # blocks went (resnet20 on CIFAR-10, 7 of 9 blocks kept), so the selection split decides.
        after, before = stages[-1], stages[-2]
        accuracy, loss = f"{selection}_accuracy", f"{selection}_loss"
        helped = (after[accuracy], -after[loss]) >= (before[accuracy], -before[loss])
        summary["recalibration_kept"] = helped
        if not helped:
            pruned.load_state_dict(removal_state)
            stages[-1]["stage"] = "recalibrated (discarded)"
            stages.append({**stages[-2], "stage": "statistics restored"})

    if config.binarize or config.binarize_all:
        stages += binarize_pruned(pruned, config, bundle, splits, input_shape, device)

    document = lineage(parent, config, removed, summary)
    result = {
        "parent": str(parent.path),
        "out": str(out),
        "strategy": config.strategy,
        "target": config.target(),
        "parent_blocks": kept,
        "kept_blocks": pruned.kept_indices,
        "removed_blocks": removed,
        "recalibrate": config.recalibrate,
        **summary,
        "stages": stages,
        "size": model_size_bytes(pruned),
    }

    if config.finetune_epochs == 0:
        runs.save_run(out, pruned, {**inherited_settings(parent), **document})
        atomic.write_json(out / REPORT_FILE, result)
        return result

    train_config = finetune_config(config, parent)
    if config.survival_last is None:
        fold_survival_scaling(pruned)
    else:
        assign_survival(pruned, config.survival_rule, config.survival_last)
    result["finetuning"] = {
        "epochs": config.finetune_epochs,
        "epochs_completed": 0,
        "train_config": asdict(train_config),
        "data_config": asdict(data_config),
    }

    # The run is saved before fine-tuning starts, so an interrupted fine-tuning can resume from it.
    runs.save_run(out, pruned, {**inherited_settings(parent), **document})
    atomic.write_json(out / REPORT_FILE, result)
    return finetune(out, pruned, train_config, data_config, device, document, result, quiet, on_epoch)


def binarize_pruned(model: CifarResNet, config: PruneConfig, bundle: DataBundle, splits: dict[str, Batches],
                    input_shape: list[int], device: torch.device) -> list[dict[str, Any]]:
    """Binarize `model` in place and return the report rows of accuracy right after and after recalibration.

    Binarizing changes the scale of every output channel, so the batch-norm
    statistics no longer fit the kernels. Unless recalibration is disabled they
    are estimated again, with the same images and seed as after removal. On a
    resnet20 trained 10 epochs on digits (98.0%), `--keep-depth 9 --binarize`
    measured 9.6% right after binarizing and 94.9% after recalibration.
    """
    binarize_model(model, include_first_and_last=config.binarize_all)
    rows = [measure_stage("binarized", model, splits, input_shape, device)]
    if config.recalibrate:
        generator = torch.Generator().manual_seed(config.seed)
        loader = bundle.loader("train", shuffle=True, generator=generator)
        recalibrate_batch_norm(model, loader, config.recalibration_images, device, generator,
                               gates=config.recalibration_gates)
        rows.append(measure_stage("binarized, recalibrated", model, splits, input_shape, device))
    return rows


def finetune_config(config: PruneConfig, parent: Run) -> TrainConfig:
    """Return the training settings of fine-tuning: a cosine schedule from the fine-tuning learning rate."""
    constant = config.survival_last is None
    training = (parent.config.get("training") or {}).get("config") or {}
    return TrainConfig(
        arch=parent.config.get("arch") or "resnet20",
        survival_rule="none" if constant else config.survival_rule,
        survival_last=1.0 if constant else config.survival_last,
        epochs=config.finetune_epochs,
        lr=config.finetune_lr,
        momentum=training.get("momentum", 0.9),
        weight_decay=training.get("weight_decay", 1e-4),
        schedule="cosine",
        seed=config.seed,
    )


def finetune(out: Path, model: CifarResNet, train_config: TrainConfig, data_config: DataConfig,
             device: torch.device, document: dict[str, Any], result: dict[str, Any], quiet: bool,
             on_epoch: Callable[[EpochMetrics], None] | None, resume: bool = False) -> dict[str, Any]:
    """Fine-tune `model` with the training loop into `out` and add the final stage to `result`."""
    trainer = Trainer(train_config, data_config, out, device, quiet=quiet, on_epoch=on_epoch,
                      model=model, run_document=document)
    if resume and (out / runs.STATE_FILE).exists():
        trainer.restore()
    trainer.fit()

    bundle = trainer.bundle
    splits = {name: load_batches(bundle, name, trainer.device)
              for name in (["val"] if bundle.val is not None else []) + ["test"]}
    result["stages"] = [row for row in result["stages"] if row["stage"] != "fine-tuned"]
    result["stages"].append(measure_stage("fine-tuned", trainer.model, splits, bundle.input_shape, trainer.device))
    result["finetuning"]["epochs_completed"] = train_config.epochs
    atomic.write_json(out / REPORT_FILE, result)
    return result


def resume_pruning(out: Path, device: torch.device, quiet: bool = False,
                   on_epoch: Callable[[EpochMetrics], None] | None = None) -> dict[str, Any]:
    """Continue the fine-tuning of a pruned run in `out` from its last finished epoch."""
    path = out / REPORT_FILE
    if not path.is_file():
        raise InvalidValueError(f"--resume {out} contains no {REPORT_FILE}: pass a folder written by sdprune prune")
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        settings = result["finetuning"]
        train_config = TrainConfig(**_known_fields(TrainConfig, settings["train_config"]))
        data_config = DataConfig(**_known_fields(DataConfig, settings["data_config"]))
    except KeyError as error:
        raise InvalidValueError(f"{out} was pruned without fine-tuning, so there is nothing to resume") from error
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as error:
        raise RunFolderError(f"{path} is not a readable pruning report ({error}): prune again") from error

    if settings.get("epochs_completed", 0) >= train_config.epochs:
        raise InvalidValueError(f"{out} already finished all {train_config.epochs} fine-tuning epochs: nothing to resume")
    loaded = runs.load_run(out, device)
    document = {key: loaded.config[key] for key in LINEAGE_KEYS if key in loaded.config}
    return finetune(out, loaded.model, train_config, data_config, device, document, result, quiet, on_epoch,
                    resume=True)


def _known_fields(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    return {field.name: values[field.name] for field in fields(cls) if field.name in values}
