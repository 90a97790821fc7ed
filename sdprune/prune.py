"""Block pruning: which residual blocks to remove, and the smaller network without them.

A strategy turns the blocks a network still has into the set to remove for a
target depth. Most strategies rank blocks (by the analyzer's greedy removal
order, lesion effect, survival contribution, norm ratio or depth) and remove
the first ones. `every-other` instead follows the LayerDrop rule of Fan et al.
2019, "Reducing Transformer Depth on Demand with Structured Dropout", which
picks evenly spaced blocks for each target.

The pruned network is the same `CifarResNet` class built from specs whose
removed blocks have no branch. It copies the kept weights and keeps every kept
block's test-time scaling p_l, so in eval mode it computes exactly what the
parent computes with the removed blocks' gates closed.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

import torch

from sdprune.binarize import binarize_layers, binary_layer_names
from sdprune.depth import survival_probabilities
from sdprune.errors import InvalidValueError, RunFolderError
from sdprune.resnet import CifarResNet

STRATEGIES = ("greedy", "lesion", "contribution", "norm", "last", "every-other")

# Strategies that rank blocks by figures of an importance report (sdprune analyze).
REPORT_STRATEGIES = ("greedy", "lesion", "contribution", "norm")


def keep_depth_for_ratio(ratio: float, num_blocks: int) -> int:
    """Return round(ratio * num_blocks), rounded half up, after checking it keeps 1 to num_blocks blocks."""
    if not 0.0 < ratio <= 1.0:
        raise InvalidValueError(f"--keep-ratio must be in (0, 1], got {ratio}")
    depth = math.floor(ratio * num_blocks + 0.5)
    if depth < 1:
        raise InvalidValueError(
            f"--keep-ratio {ratio} keeps round({ratio} x {num_blocks}) = 0 blocks: "
            f"use a ratio of at least {0.5 / num_blocks:.3g} (the model has {num_blocks} blocks)"
        )
    return depth


def check_keep_depth(depth: int, num_blocks: int) -> None:
    """Raise InvalidValueError unless 1 <= depth <= num_blocks."""
    if not 1 <= depth <= num_blocks:
        raise InvalidValueError(
            f"--keep-depth must be between 1 and {num_blocks} (the model has {num_blocks} blocks), got {depth}"
        )


def report_blocks(report: dict[str, Any], kept: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Return the report's per-block entries for the blocks in `kept`, by block index.

    Raises RunFolderError when the report lacks an entry for one of them.
    """
    try:
        entries = {int(entry["index"]): entry for entry in report["blocks"]}
    except (KeyError, TypeError, ValueError) as error:
        raise RunFolderError(f"the importance report has no readable per-block entries: {error}") from error
    missing = [index for index in kept if index not in entries]
    if missing:
        raise RunFolderError(f"the importance report has no entries for blocks {missing}: analyze this run again")
    return {index: entries[index] for index in kept}


def _figure(entry: dict[str, Any], key: str) -> float:
    value = entry.get(key)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise RunFolderError(
            f"the importance report has no number for {key!r} of block {entry.get('index')}: analyze this run again"
        )
    return float(value)


def removal_order(strategy: str, kept: Sequence[int], report: dict[str, Any] | None = None) -> list[int]:
    """Return the blocks of `kept` in the order a ranking strategy removes them, first removed first.

    `kept` lists the 1-based indices of the blocks the network still has. Ties
    go to the deeper block first, since deep blocks are the cheapest to remove
    under stochastic depth's decaying survival rule. greedy, lesion,
    contribution and norm read `report`, an importance report of sdprune
    analyze made for this network.
    """
    if strategy not in STRATEGIES or strategy == "every-other":
        raise ValueError(f"{strategy!r} is not a ranking strategy")
    if strategy == "last":
        return sorted(kept, reverse=True)
    if report is None:
        raise ValueError(f"strategy {strategy} needs an importance report")

    if strategy == "greedy":
        return _greedy_order(report, kept)

    entries = report_blocks(report, kept)
    if strategy == "lesion":
        # Least harmful first: the maximum accuracy delta (closest to zero), then the minimum loss delta.
        def key(index: int) -> tuple:
            entry = entries[index]
            return (-_figure(entry, "lesion_accuracy_delta"), _figure(entry, "lesion_loss_delta"), -index)
    elif strategy == "contribution":
        def key(index: int) -> tuple:
            return (_figure(entries[index], "contribution_mean"), -index)
    else:
        def key(index: int) -> tuple:
            return (_figure(entries[index], "norm_ratio"), -index)
    return sorted(kept, key=key)


def _greedy_order(report: dict[str, Any], kept: Sequence[int]) -> list[int]:
    """Read the analyzer's re-evaluated removal order and check it covers `kept`.

    The analyzer stops at one block, so its order may leave out the last
    block. That block is appended, so every strategy returns all of `kept`.
    """
    order = report.get("removal_order")
    if not isinstance(order, list):
        raise RunFolderError("the importance report has no removal_order list: analyze this run again")
    try:
        order = [int(index) for index in order]
    except (TypeError, ValueError) as error:
        raise RunFolderError(f"the importance report's removal_order is not a list of block indices: {error}") from error

    unknown = sorted(set(order) - set(kept))
    missing = sorted(set(kept) - set(order))
    if unknown or len(missing) > 1 or len(set(order)) != len(order):
        raise RunFolderError(
            f"the importance report's removal_order {order} does not match the model's blocks {list(kept)}: "
            "analyze this run again"
        )
    return order + missing


def every_other_removed(kept: Sequence[int], keep_depth: int) -> list[int]:
    """Return the blocks of `kept` that the LayerDrop every-other rule removes to keep `keep_depth`.

    Positions count 1..L over the blocks the network has, and R = L - N
    blocks go. At pruning rate p, LayerDrop drops every layer at a depth d
    with d mod floor(1 / p) = 0, so with p = R / L it drops the positions that
    are multiples of k = floor(L / R). That can be more than R positions, so
    only the R deepest of them are removed. When more than half the blocks go
    (2R > L), k would be 1 and remove everything. The rule then keeps
    positions 1, 1 + k, ..., 1 + (N - 1) k with k = floor(L / N) instead.
    """
    blocks = sorted(kept)
    total = len(blocks)
    check_keep_depth(keep_depth, total)
    removed_count = total - keep_depth
    if removed_count == 0:
        return []

    if 2 * removed_count <= total:
        step = total // removed_count
        positions = list(range(step, total + 1, step))[-removed_count:]
        return [blocks[position - 1] for position in reversed(positions)]

    step = total // keep_depth
    kept_positions = {1 + step * number for number in range(keep_depth)}
    return [blocks[position - 1] for position in range(total, 0, -1) if position not in kept_positions]


def removed_blocks(strategy: str, kept: Sequence[int], keep_depth: int,
                   report: dict[str, Any] | None = None) -> list[int]:
    """Return the blocks of `kept` that `strategy` removes to leave `keep_depth` blocks, first removed first."""
    check_keep_depth(keep_depth, len(kept))
    if keep_depth == len(kept):
        return []
    if strategy == "every-other":
        return every_other_removed(kept, keep_depth)
    return removal_order(strategy, kept, report)[: len(kept) - keep_depth]


def prune_model(model: CifarResNet, removed: Sequence[int]) -> CifarResNet:
    """Return a new network without the blocks in `removed`, holding copies of the other weights.

    `removed` lists 1-based block indices among the model's kept blocks. The
    result sits on the model's device, in the model's train/eval mode; the
    model itself is not changed.
    """
    kept = model.kept_indices
    unknown = sorted(set(removed) - set(kept))
    if unknown:
        raise InvalidValueError(f"blocks {unknown} are not in the model, which has blocks {kept}")
    if len(set(removed)) >= len(kept):
        raise InvalidValueError(f"removing blocks {sorted(removed)} would leave no residual block")

    specs = [replace(spec, kept=spec.kept and spec.index not in set(removed)) for spec in model.specs]
    pruned = CifarResNet(specs, num_classes=model.num_classes, in_channels=model.in_channels)
    pruned.arch = getattr(model, "arch", None)

    # Binary layers of kept blocks stay binary, so their latent weights have somewhere to go.
    layers = dict(pruned.named_modules())
    binarize_layers(pruned, [name for name in binary_layer_names(model) if name in layers])

    # Block positions are the same in both networks, so the kept weights keep their names.
    names = pruned.state_dict().keys()
    pruned.load_state_dict({name: tensor for name, tensor in model.state_dict().items() if name in names})
    parameter = next(model.parameters())
    return pruned.to(device=parameter.device, dtype=parameter.dtype).train(model.training)


def fold_survival_scaling(model: CifarResNet) -> CifarResNet:
    """Fold each kept block's test-time scaling p_l into its branch and set every p_l to 1, in place.

    Multiplying the last batch norm's weight and bias by p_l scales the
    branch's output by p_l. The eval-mode network then computes the same
    outputs (up to rounding) with all gates open at scale 1, which is where
    constant-depth fine-tuning starts.
    """
    with torch.no_grad():
        for block in model.blocks:
            if block.branch is None or block.spec.survival_prob == 1.0:
                continue
            last_norm = block.branch[-1]
            last_norm.weight.mul_(block.spec.survival_prob)
            last_norm.bias.mul_(block.spec.survival_prob)
    _set_survival(model, [1.0] * len(model.kept_indices))
    return model


def assign_survival(model: CifarResNet, rule: str, survival_last: float) -> CifarResNet:
    """Give the kept blocks new survival probabilities under `rule`, counted over kept blocks only, in place."""
    _set_survival(model, survival_probabilities(rule, len(model.kept_indices), survival_last))
    return model


def _set_survival(model: CifarResNet, probabilities: Sequence[float]) -> None:
    """Set p_l of the kept blocks, in order, keeping specs, blocks and the gate tensor in step."""
    remaining = iter(probabilities)
    specs = []
    for spec, block in zip(model.specs, model.blocks):
        if spec.kept:
            spec = replace(spec, survival_prob=float(next(remaining)))
            block.spec = spec
        specs.append(spec)
    model.specs = specs
    model.survival = torch.tensor([spec.survival_prob for spec in specs])
