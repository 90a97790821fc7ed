"""Fold batch norm and the test-time scale p_l into the convolutions before export.

In eval mode a batch norm is an affine map per channel, and the stochastic-depth
test-time rule multiplies a whole residual branch by its survival probability
p_l. Both fold into the preceding convolution. For gamma, beta, running mean mu
and variance var, the kernel becomes W * gamma / sqrt(var + eps) and the bias
beta - mu * gamma / sqrt(var + eps). The branch's last convolution and its bias
are then multiplied by p_l. The exported graph therefore holds plain biased
convolutions, ReLUs, additions, the parameter-free shortcuts and the classifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sdprune.errors import RunFolderError
from sdprune.resnet import CifarResNet, ResidualBlock, TransitionShortcut


@dataclass(frozen=True)
class FoldedConvSpec:
    """Source module name of a folded convolution, and whether its kernel is binary."""

    source: str
    binary: bool


def is_binary_kernel(weight: torch.Tensor) -> bool:
    """Check that every output channel of `weight` contains only +a and -a for one a >= 0.

    This is the form of a binary-weight convolution, sign(W) * alpha with one
    alpha per output channel, and it survives any per-channel rescaling exactly.
    """
    magnitudes = weight.detach().flatten(1).abs()
    return bool((magnitudes == magnitudes[:, :1]).all())


def fold_batch_norm(
    weight: torch.Tensor, batch_norm: nn.BatchNorm2d, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the kernel and bias of a bias-free convolution followed by `batch_norm`.

    `scale` multiplies the result, as the test-time rule does for a branch's last
    layer. The arithmetic runs in float64 so the folded float32 values are the
    correctly rounded ones.
    """
    variance = batch_norm.running_var.double()
    gamma = batch_norm.weight.double() if batch_norm.weight is not None else torch.ones_like(variance)
    beta = batch_norm.bias.double() if batch_norm.bias is not None else torch.zeros_like(variance)
    channel_scale = gamma / torch.sqrt(variance + batch_norm.eps)
    kernel = weight.detach().double() * (channel_scale * scale).view(-1, 1, 1, 1)
    bias = (beta - batch_norm.running_mean.double() * channel_scale) * scale
    return kernel.float(), bias.float()


def make_folded_conv(
    conv: nn.Conv2d, batch_norm: nn.BatchNorm2d, scale: float, spec: FoldedConvSpec
) -> nn.Conv2d:
    """Build a biased convolution equal to `conv`, then `batch_norm`, then `scale`."""
    folded = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size,
        stride=conv.stride, padding=conv.padding, bias=True,
    )
    kernel, bias = fold_batch_norm(conv.weight, batch_norm, scale)
    with torch.no_grad():
        folded.weight.copy_(kernel)
        folded.bias.copy_(bias)
    folded.spec = spec
    return folded


class FoldedBlock(nn.Module):
    """A residual block with batch norm and p_l folded into its two convolutions.

    `conv1` and `conv2` are None for a pruned block, which passes its shortcut only.
    """

    def __init__(self, block: ResidualBlock, prefix: str, binary_layers: set[str]) -> None:
        super().__init__()
        self.index = block.spec.index
        self.shortcut = block.shortcut
        self.conv1: nn.Conv2d | None = None
        self.conv2: nn.Conv2d | None = None
        if block.branch is None:
            return
        first_conv, first_norm, _, second_conv, second_norm = block.branch
        first_name, second_name = f"{prefix}.branch.0", f"{prefix}.branch.3"
        self.conv1 = make_folded_conv(
            first_conv, first_norm, 1.0, FoldedConvSpec(first_name, first_name in binary_layers)
        )
        self.conv2 = make_folded_conv(
            second_conv, second_norm, block.spec.survival_prob,
            FoldedConvSpec(second_name, second_name in binary_layers),
        )

    @property
    def transition(self) -> TransitionShortcut | None:
        return self.shortcut if isinstance(self.shortcut, TransitionShortcut) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        if self.conv1 is None:
            # The input comes out of a ReLU, and average pooling and zero channels keep
            # it non-negative, so the ReLU the original block applies here changes nothing.
            return identity
        residual = self.conv2(F.relu(self.conv1(x)))
        return F.relu(identity + residual)


class FoldedResNet(nn.Module):
    """The eval-mode function of a CifarResNet with nothing left to fold.

    Computes the same logits as the source model in eval mode, up to float32
    rounding of the folded weights.
    """

    def __init__(self, model: CifarResNet, binary_layers: set[str] | None = None) -> None:
        super().__init__()
        binary_layers = binary_layers or set()
        stem_conv, stem_norm, _ = model.stem
        self.stem = make_folded_conv(stem_conv, stem_norm, 1.0, FoldedConvSpec("stem.0", "stem.0" in binary_layers))
        self.blocks = nn.ModuleList(
            FoldedBlock(block, f"blocks.{position}", binary_layers)
            for position, block in enumerate(model.blocks)
        )
        self.classifier = nn.Linear(model.classifier.in_features, model.classifier.out_features)
        with torch.no_grad():
            self.classifier.weight.copy_(model.classifier.weight)
            self.classifier.bias.copy_(model.classifier.bias)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        for block in self.blocks:
            x = block(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(x)


def weighted_layer_names(model: CifarResNet) -> list[str]:
    """List the module names of the model's convolutions and its classifier."""
    return [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]


def find_binary_layers(model: CifarResNet, listed: list[str] | None = None) -> list[str]:
    """Name the layers whose weights are binary, sign(W) * alpha per output channel.

    `listed` contains the names a run's model.json marks as binary; each must exist
    and be exactly binary. Unlisted layers count as binary when their weights
    are, so runs saved before the list existed still pack.
    """
    modules = dict(model.named_modules())
    names = weighted_layer_names(model)
    found = []
    for entry in listed or []:
        name = entry.removesuffix(".weight")
        if name not in names:
            raise RunFolderError(
                f"model.json lists {entry!r} as a binary layer, but the model has no such convolution or classifier"
            )
        if not is_binary_kernel(modules[name].weight):
            raise RunFolderError(
                f"model.json lists {name} as binary, but its weight contains values other than +alpha and "
                "-alpha per output channel: the weights are corrupt or not binarized"
            )
        found.append(name)
    for name in names:
        # A layer with one weight per output channel is trivially binary; packing it
        # saves nothing, so only larger kernels count.
        if name not in found and modules[name].weight[0].numel() > 1 and is_binary_kernel(modules[name].weight):
            found.append(name)
    return [name for name in names if name in found]
