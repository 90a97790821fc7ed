"""How much each residual block matters: lesion, survival contribution, norm ratio, depth curve.

All figures are measured on held-out images with the model's batch-norm running
statistics (eval mode). Every measure that removes or adds one block reuses the
activations entering that block: they do not depend on later blocks, so one
pass over the network, with a short suffix run per block, replaces one full
pass per block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from sdprune.depth import draw_gates
from sdprune.errors import InvalidValueError
from sdprune.evaluate import Evaluation, evaluate_logits
from sdprune.resnet import CifarResNet, count_macs, count_parameters

Batches = list[tuple[torch.Tensor, torch.Tensor]]
Progress = Callable[[Iterable, int | None, str], Iterable]

# Smallest shortcut norm used as a divisor, so an all-zero activation gives a large ratio, not a division by zero.
NORM_FLOOR = 1e-12


def _no_progress(items: Iterable, total: int | None, description: str) -> Iterable:
    return items


def model_signature(model: CifarResNet) -> str:
    """Hash the architecture, class count, block specs and weights of `model`.

    Two models share a signature only when they compute the same function, so a
    report measured on one model can be rejected for another.
    """
    digest = hashlib.sha256()
    structure = {
        "arch": getattr(model, "arch", None),
        "num_classes": model.num_classes,
        "in_channels": model.in_channels,
        "blocks": [spec.to_dict() for spec in model.specs],
    }
    digest.update(repr(sorted(structure.items())).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def kept_positions(model: CifarResNet) -> list[int]:
    """Return the 0-based positions of blocks that still have a branch."""
    return [position for position, block in enumerate(model.blocks) if block.branch is not None]


class _Tally:
    """Running correct-prediction count and loss sum of one network variant."""

    def __init__(self) -> None:
        self.correct = 0
        self.loss_sum = 0.0
        self.images = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        logits = logits.float()
        self.loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        self.correct += (logits.argmax(dim=1) == targets).sum().item()
        self.images += targets.numel()

    def result(self) -> Evaluation:
        return Evaluation(accuracy=self.correct / self.images, loss=self.loss_sum / self.images, images=self.images)


def _run_suffix(
    model: CifarResNet, x: torch.Tensor, start: int, gates: Sequence[bool], test_scaling: bool
) -> torch.Tensor:
    for position in range(start, len(model.blocks)):
        x = model.run_block(position, x, gates[position], test_scaling)
    return model.forward_head(x)


def flip_sweep(
    model: CifarResNet,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    gates: Sequence[bool],
    positions: Sequence[int],
    test_scaling: bool,
) -> tuple[Evaluation, dict[int, Evaluation]]:
    """Evaluate the network under `gates`, and once per position with that one gate flipped.

    The activations entering block l are the same whether l is flipped or not.
    So each batch runs the network once and, per flipped position, only block l
    and the blocks after it. That is about L^2/2 block runs for L flips instead
    of the L^2 of one pass per flip. The caller sets eval or train mode and
    disables gradients. `batches` must already be on the model's device.
    """
    flipped = set(positions)
    base = _Tally()
    tallies = {position: _Tally() for position in positions}
    for inputs, targets in batches:
        x = model.forward_stem(inputs)
        for position in range(len(model.blocks)):
            if position in flipped:
                other = model.run_block(position, x, not gates[position], test_scaling)
                tallies[position].add(_run_suffix(model, other, position + 1, gates, test_scaling), targets)
            x = model.run_block(position, x, gates[position], test_scaling)
        base.add(model.forward_head(x), targets)
    return base.result(), {position: tally.result() for position, tally in tallies.items()}


def norm_ratios(model: CifarResNet, batches: Batches) -> dict[int, float]:
    """Return, per kept position, the mean over images of ||p_l f_l(x)|| / ||shortcut(x)||.

    Measured in the full eval-mode network, so x is what block l receives at test time.
    """
    positions = kept_positions(model)
    sums = {position: 0.0 for position in positions}
    images = 0
    for inputs, _ in batches:
        x = model.forward_stem(inputs)
        for position, block in enumerate(model.blocks):
            if block.branch is not None:
                residual = block.branch(x) * block.spec.survival_prob
                shortcut = block.shortcut(x)
                ratio = residual.flatten(1).norm(dim=1) / shortcut.flatten(1).norm(dim=1).clamp_min(NORM_FLOOR)
                sums[position] += ratio.sum().item()
                x = F.relu(shortcut + residual)
            else:
                x = model.run_block(position, x, active=False, test_scaling=True)
        images += inputs.shape[0]
    return {position: total / images for position, total in sums.items()}


def survival_contributions(
    model: CifarResNet, batches: Batches, samples: int, seed: int, progress: Progress = _no_progress
) -> dict[int, tuple[float, float]]:
    """Estimate each kept block's mean loss increase when removed from random sub-networks.

    Draws `samples` gate vectors with the trained survival probabilities from a
    generator seeded with `seed`, and removed blocks stay off. For each sample
    and block, the figure is the loss with the block's gate forced closed minus
    the loss with it forced open, on the same images. Returns position ->
    (mean, standard error) over the samples.
    """
    generator = torch.Generator().manual_seed(seed)
    positions = kept_positions(model)
    differences: dict[int, list[float]] = {position: [] for position in positions}
    for _ in progress(range(samples), samples, "survival contribution"):
        gates = draw_gates(model.survival, generator)
        gates = [gate and model.blocks[position].branch is not None for position, gate in enumerate(gates)]

        # Branches run unscaled, as in training: the sub-networks were trained that way,
        # and test-time scaling by p_l is the expectation over them, not one of them.
        base, flipped = flip_sweep(model, batches, gates, positions, test_scaling=False)
        for position in positions:
            opened, closed = (base, flipped[position]) if gates[position] else (flipped[position], base)
            differences[position].append(closed.loss - opened.loss)

    estimates = {}
    for position, values in differences.items():
        series = torch.tensor(values, dtype=torch.float64)
        estimates[position] = (series.mean().item(), (series.std(correction=1) / math.sqrt(len(values))).item())
    return estimates


def _cost_figures(model: CifarResNet, kept: set[int], input_shape: Sequence[int]) -> tuple[int, int]:
    """Count parameters and MACs of `model`'s architecture with only blocks `kept` (1-based)."""
    specs = [dataclasses.replace(spec, kept=spec.kept and spec.index in kept) for spec in model.specs]
    skeleton = CifarResNet(specs, num_classes=model.num_classes, in_channels=model.in_channels)
    return count_parameters(skeleton), count_macs(skeleton, input_shape)


def _removal_key(position: int, evaluation: Evaluation) -> tuple[float, float, int]:
    # Highest accuracy first, then lowest loss, then the deeper block, so ties resolve the same way every run.
    return (-evaluation.accuracy, evaluation.loss, -position)


def depth_curve(
    model: CifarResNet,
    batches: Batches,
    full: Evaluation,
    first_sweep: dict[int, Evaluation],
    progress: Progress = _no_progress,
) -> list[dict[str, Any]]:
    """Remove kept blocks greedily, cheapest first, down to one kept block.

    After each removal every remaining block is evaluated again at test-time
    scaling. `first_sweep` is the lesion sweep of the full network, which is
    the first step's evaluation. Returns one entry per depth, deepest first.
    """
    input_shape = list(batches[0][0].shape[1:])
    gates = [block.branch is not None for block in model.blocks]
    kept = {model.blocks[position].spec.index for position in kept_positions(model)}
    params, macs = _cost_figures(model, kept, input_shape)
    curve = [{
        "blocks_kept": len(kept), "kept_blocks": sorted(kept), "removed_block": None,
        "accuracy": full.accuracy, "loss": full.loss, "params": params, "macs": macs,
    }]

    sweep = first_sweep
    steps = len(kept) - 1
    for step in progress(range(steps), steps, "depth curve"):
        if step > 0:
            _, sweep = flip_sweep(model, batches, gates, [p for p, gate in enumerate(gates) if gate], True)
        position, evaluation = min(sweep.items(), key=lambda item: _removal_key(*item))
        gates[position] = False
        index = model.blocks[position].spec.index
        kept.discard(index)
        params, macs = _cost_figures(model, kept, input_shape)
        curve.append({
            "blocks_kept": len(kept), "kept_blocks": sorted(kept), "removed_block": index,
            "accuracy": evaluation.accuracy, "loss": evaluation.loss, "params": params, "macs": macs,
        })
    return curve


def uncached_lesions(
    model: CifarResNet, batches: Batches, positions: Sequence[int], progress: Progress = _no_progress
) -> dict[int, Evaluation]:
    """Evaluate the eval-mode network once per position with only that block removed, without reuse.

    This is the cost that `flip_sweep` avoids; it is run to measure that saving
    and to check the reused activations give the same figures.
    """
    results = {}
    for position in progress(positions, len(positions), "uncached lesions"):
        gates = [block.branch is not None for block in model.blocks]
        gates[position] = False
        results[position] = evaluate_logits(lambda inputs: model(inputs, gates=gates), batches)
    return results


def _load_batches(loader: Iterable, device: torch.device | str) -> Batches:
    # The sweeps read the same images dozens of times. Decoding them once keeps JPEG
    # decoding out of every repeat and out of the measured sweep times.
    # NOTE: the whole split stays in memory (about 60 MB for 5,000 CIFAR images), which
    # does not scale to large, high-resolution evaluation sets.
    batches = [(inputs.to(device), targets.to(device)) for inputs, targets in loader]
    if not batches or sum(targets.numel() for _, targets in batches) == 0:
        raise InvalidValueError("the evaluation split has no images: choose a split or --limit-test of at least 1")
    return batches


def _synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def analyze_model(
    model: CifarResNet,
    loader: Iterable,
    device: torch.device | str,
    samples: int = 20,
    seed: int = 0,
    progress: Progress | None = None,
    split: str | None = None,
    run: str | None = None,
) -> dict[str, Any]:
    """Measure every kept block's importance and the greedy depth-accuracy curve.

    `loader` yields (images, labels) batches; they are copied to `device` once.
    The model is evaluated in eval mode and its mode is restored afterwards.
    Returns the importance.json document (see the README's Analyze section);
    `split` and `run` are recorded as given.
    """
    if samples < 2:
        raise InvalidValueError(f"--samples must be at least 2 (a standard error needs two samples), got {samples}")
    positions = kept_positions(model)
    if not positions:
        raise InvalidValueError("the model has no kept blocks, so there is nothing to analyze")
    progress = progress or _no_progress
    batches = _load_batches(loader, device)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            # One warm-up batch, so neither timed stage pays for first-call allocations.
            model(batches[0][0])

            _synchronize(device)
            start = time.perf_counter()
            uncached = uncached_lesions(model, batches, positions, progress)
            _synchronize(device)
            plain_seconds = time.perf_counter() - start

            start = time.perf_counter()
            gates = [block.branch is not None for block in model.blocks]
            full, lesions = flip_sweep(
                model, progress(batches, len(batches), "lesion sweep"), gates, positions, test_scaling=True
            )
            _synchronize(device)
            sweep_seconds = time.perf_counter() - start

            ratios = norm_ratios(model, batches)
            contributions = survival_contributions(model, batches, samples, seed, progress)
            curve = depth_curve(model, batches, full, lesions, progress)
    finally:
        model.train(was_training)

    blocks = []
    for position in positions:
        spec = model.blocks[position].spec
        lesion = lesions[position]
        mean, stderr = contributions[position]
        blocks.append({
            "index": spec.index,
            "stage": spec.stage,
            "transition": spec.transition,
            "survival_prob": spec.survival_prob,
            "lesion_accuracy": lesion.accuracy,
            "lesion_loss": lesion.loss,
            "lesion_accuracy_delta": lesion.accuracy - full.accuracy,
            "lesion_loss_delta": lesion.loss - full.loss,
            "contribution_mean": mean,
            "contribution_stderr": stderr,
            "norm_ratio": ratios[position],
        })

    return {
        "run": run,
        "arch": getattr(model, "arch", None),
        "num_classes": model.num_classes,
        "num_blocks": len(model.blocks),
        "kept_blocks": [model.blocks[position].spec.index for position in positions],
        "model_signature": model_signature(model),
        "split": split,
        "images": full.images,
        "samples": samples,
        "seed": seed,
        "full": {"accuracy": full.accuracy, "loss": full.loss},
        "blocks": blocks,
        "curve": curve,
        "removal_order": [entry["removed_block"] for entry in curve[1:]],
        "timing": {
            "sweep_seconds": sweep_seconds,
            "plain_seconds": plain_seconds,
            "plain_passes": len(positions),
            "sweep_cost_ratio": sweep_seconds / plain_seconds if plain_seconds > 0 else None,
        },
        "lesion_check": {
            "max_accuracy_difference": max(abs(lesions[p].accuracy - uncached[p].accuracy) for p in positions),
            "max_loss_difference": max(abs(lesions[p].loss - uncached[p].loss) for p in positions),
        },
    }
