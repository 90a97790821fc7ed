"""Accuracy and loss of a model on a data loader."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Evaluation:
    """Accuracy as a fraction in 0..1, mean cross-entropy loss, and the image count."""

    accuracy: float
    loss: float
    images: int

    def to_dict(self) -> dict[str, float | int]:
        return {"accuracy": self.accuracy, "loss": self.loss, "images": self.images}


def evaluate_logits(
    forward: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device | str = "cpu",
) -> Evaluation:
    """Evaluate any function from images to logits over `batches`, without gradients."""
    correct = 0
    loss_sum = 0.0
    images = 0
    with torch.no_grad():
        for inputs, targets in batches:
            inputs = inputs.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            logits = forward(inputs).float()
            loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
            correct += (logits.argmax(dim=1) == targets).sum().item()
            images += targets.numel()
    if images == 0:
        return Evaluation(accuracy=float("nan"), loss=float("nan"), images=0)
    return Evaluation(accuracy=correct / images, loss=loss_sum / images, images=images)


def evaluate(model: nn.Module, batches: Iterable, device: torch.device | str = "cpu") -> Evaluation:
    """Evaluate `model` in eval mode (test-time scaling, running batch-norm statistics).

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        return evaluate_logits(model, batches, device)
    finally:
        model.train(was_training)
