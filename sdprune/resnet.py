"""CIFAR residual networks (He et al. 2016) with stochastic-depth gates.

A network is built from a list of `BlockSpec`s, so a pruned network is the same
class built from specs whose removed blocks have no branch: a removed ordinary
block becomes an identity and a removed transition block keeps only its
parameter-free shortcut, so shapes still line up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from sdprune.depth import draw_gates, survival_probabilities
from sdprune.errors import InvalidValueError

STAGE_WIDTHS = (16, 32, 64)

# Depth 6n + 2: n basic blocks in each of three stages, as in He et al. 2016, section 4.2.
ARCHITECTURES = {
    "resnet20": 3,
    "resnet32": 5,
    "resnet44": 7,
    "resnet56": 9,
    "resnet110": 18,
    "resnet1202": 200,
}


@dataclass(frozen=True)
class BlockSpec:
    """One residual block: where it sits, its shapes, and whether its branch is kept.

    `index` counts from 1 over all blocks of the unpruned network, transition
    blocks included; it stays the same after pruning.
    """

    index: int
    stage: int
    in_channels: int
    out_channels: int
    stride: int
    survival_prob: float
    kept: bool = True

    @property
    def transition(self) -> bool:
        return self.stride != 1 or self.in_channels != self.out_channels

    def to_dict(self) -> dict:
        return {**asdict(self), "transition": self.transition}

    @classmethod
    def from_dict(cls, values: dict) -> "BlockSpec":
        names = ("index", "stage", "in_channels", "out_channels", "stride", "survival_prob", "kept")
        return cls(**{name: values[name] for name in names})


def make_block_specs(
    arch: str, survival_rule: str = "linear", survival_last: float = 0.5
) -> list[BlockSpec]:
    """List the block specs of an unpruned CIFAR ResNet with survival probabilities."""
    if arch not in ARCHITECTURES:
        raise InvalidValueError(
            f"unknown architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}"
        )
    blocks_per_stage = ARCHITECTURES[arch]
    probabilities = survival_probabilities(survival_rule, 3 * blocks_per_stage, survival_last)

    specs = []
    in_channels = STAGE_WIDTHS[0]
    for stage, width in enumerate(STAGE_WIDTHS, start=1):
        for position in range(blocks_per_stage):
            stride = 2 if stage > 1 and position == 0 else 1
            index = len(specs) + 1
            specs.append(
                BlockSpec(index, stage, in_channels, width, stride, probabilities[index - 1])
            )
            in_channels = width
    return specs


class TransitionShortcut(nn.Module):
    """Parameter-free shortcut: 2x2 average pooling, then zero channels appended.

    This is option A of He et al. 2016; it keeps the shortcut free of weights so
    that removing a transition block's branch leaves a network with no
    parameters for that block.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            # ceil_mode keeps odd sizes (7x7 after one halving of 14x14) from losing a row.
            x = F.avg_pool2d(x, self.stride, self.stride, ceil_mode=True)
        extra = self.out_channels - self.in_channels
        if extra > 0:
            x = F.pad(x, (0, 0, 0, 0, 0, extra))
        return x


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class Branch(nn.Sequential):
    """The residual branch of a basic block: conv-BN-ReLU-conv-BN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__(
            conv3x3(in_channels, out_channels, stride),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            conv3x3(out_channels, out_channels),
            nn.BatchNorm2d(out_channels),
        )


class ResidualBlock(nn.Module):
    """A basic block whose branch runs only when its gate is open.

    `branch` is None for a pruned block, which then passes only its shortcut.
    """

    def __init__(self, spec: BlockSpec) -> None:
        super().__init__()
        self.spec = spec
        if spec.transition:
            self.shortcut: nn.Module = TransitionShortcut(
                spec.in_channels, spec.out_channels, spec.stride
            )
        else:
            self.shortcut = nn.Identity()
        self.branch = Branch(spec.in_channels, spec.out_channels, spec.stride) if spec.kept else None

    def forward(self, x: torch.Tensor, active: bool = True, scale: float = 1.0) -> torch.Tensor:
        """Run the block; with `active` False the branch does no work at all.

        `scale` multiplies the branch output: p_l at test time, 1 in training.
        """
        identity = self.shortcut(x)
        if not active or self.branch is None:
            # A closed gate skips the branch's forward and backward entirely; this is
            # where stochastic depth saves its time. The ReLU after the addition still
            # applies, as it does when the branch runs.
            return F.relu(identity)
        residual = self.branch(x)
        if scale != 1.0:
            residual = residual * scale
        return F.relu(identity + residual)


class CifarResNet(nn.Module):
    """A CIFAR ResNet with one stochastic-depth gate per residual block.

    In training mode each forward draws one gate per block (one per mini-batch)
    unless `gates` is given; in eval mode every kept block runs with its branch
    scaled by its survival probability.
    """

    def __init__(
        self,
        specs: Sequence[BlockSpec],
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise InvalidValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        if in_channels < 1:
            raise InvalidValueError(f"input channels must be at least 1, got {in_channels}")
        self.specs = list(specs)
        self.num_classes = num_classes
        self.in_channels = in_channels

        self.stem = nn.Sequential(
            conv3x3(in_channels, STAGE_WIDTHS[0]),
            nn.BatchNorm2d(STAGE_WIDTHS[0]),
            nn.ReLU(inplace=True),
        )
        self.blocks = nn.ModuleList(ResidualBlock(spec) for spec in self.specs)
        self.classifier = nn.Linear(self.specs[-1].out_channels, num_classes)

        # Kept as a plain tensor, not a buffer: it is part of model.json, not the weights.
        self.survival = torch.tensor([spec.survival_prob for spec in self.specs])
        self.gate_generator: torch.Generator | None = None
        self._initialize()

    def _initialize(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def kept_indices(self) -> list[int]:
        return [spec.index for spec in self.specs if spec.kept]

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)

    def run_block(
        self, position: int, x: torch.Tensor, active: bool = True, test_scaling: bool | None = None
    ) -> torch.Tensor:
        """Run the block at `position` (0-based in `blocks`).

        `test_scaling` chooses whether an active branch is scaled by p_l; by default
        it follows eval mode, as the test-time rule of stochastic depth does.
        """
        if test_scaling is None:
            test_scaling = not self.training
        block = self.blocks[position]
        scale = block.spec.survival_prob if test_scaling else 1.0
        return block(x, active=active, scale=scale)

    def forward(
        self,
        x: torch.Tensor,
        gates: Sequence[bool] | None = None,
        test_scaling: bool | None = None,
    ) -> torch.Tensor:
        """Return logits of shape (N, num_classes) for images of shape (N, C, H, W).

        `gates` holds one bool per block (True runs the branch). Without it, training
        mode draws gates from `gate_generator` and eval mode opens every gate.
        """
        if gates is None:
            if self.training:
                gates = draw_gates(self.survival, self.gate_generator)
            else:
                gates = [True] * len(self.blocks)
        elif len(gates) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} gates, got {len(gates)}")

        x = self.forward_stem(x)
        for position, active in enumerate(gates):
            x = self.run_block(position, x, bool(active), test_scaling)
        return self.forward_head(x)


def build_model(
    arch: str = "resnet20",
    num_classes: int = 10,
    in_channels: int = 3,
    survival_rule: str = "linear",
    survival_last: float = 0.5,
    kept_blocks: Sequence[int] | None = None,
) -> CifarResNet:
    """Build a CIFAR ResNet with stochastic depth.

    `kept_blocks` lists the 1-based indices of blocks whose branch exists; the
    others are built pruned (shortcut only). Works for any input size.
    """
    specs = make_block_specs(arch, survival_rule, survival_last)
    if kept_blocks is not None:
        kept = set(kept_blocks)
        unknown = sorted(kept - {spec.index for spec in specs})
        if unknown:
            raise InvalidValueError(
                f"kept blocks {unknown} do not exist: {arch} has blocks 1 to {len(specs)}"
            )
        specs = [
            BlockSpec(**{**asdict(spec), "kept": spec.index in kept}) for spec in specs
        ]
    return CifarResNet(specs, num_classes=num_classes, in_channels=in_channels)


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def count_macs(model: CifarResNet, input_shape: Sequence[int]) -> int:
    """Count multiply-accumulates of one image through the eval-mode network.

    Counts convolutions and the classifier, the layers that dominate the cost;
    batch norm, ReLU, pooling and additions are left out, as is usual for MACs.
    `input_shape` is (C, H, W).
    """
    total = 0

    def count_conv(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        total += output[0].numel() * kernel

    def count_linear(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += module.in_features * module.out_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(count_conv))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(count_linear))

    was_training = model.training
    model.eval()
    try:
        parameter = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total
