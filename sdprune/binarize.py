"""Binary-weight layers: sign(W) times one scale per output channel.

This is the binary-weight network of Rastegari et al. 2016 (XNOR-Net, section
3.1): a kernel W becomes sign(W) * alpha, where alpha = mean |W| over each
output channel, and activations stay in floating point. `BinaryWeight` does
this as a `torch.nn.utils.parametrize` parametrization, so a binarized layer's
`.weight` is the effective +-alpha kernel while the optimizer updates the
latent float weights (`parametrizations.weight.original`), and each forward
binarizes them again.

Run folders store a binary kernel of shape (out, ...), with n values per
output channel, as two tensors. The signs are packed by `numpy.packbits` into
a uint8 tensor of shape (out, ceil(n / 8)), one row per output channel, most
significant bit first, bit 1 for +alpha, and zero bits padding each row. Alpha
is a float32 tensor of shape (out,).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy
import torch
from torch import nn
from torch.nn.utils import parametrize

# Beyond this magnitude the straight-through estimator passes no gradient through sign.
STE_CLIP = 1.0

# State-dict key suffixes: the latent weight under parametrize, and its stored form.
LATENT_KEY = "parametrizations.weight.original"
SIGNS_KEY = "weight_sign_bits"
ALPHA_KEY = "weight_alpha"


def binary_scale(weight: torch.Tensor) -> torch.Tensor:
    """Compute alpha = mean |W| per output channel, shaped to broadcast over `weight`.

    The mean is taken in float64 and rounded once to the weight's dtype. For a
    kernel that is already +-alpha, every partial sum is then exact, so the
    mean gives back alpha bit for bit: binarizing a binary kernel changes
    nothing, which lets a loaded run reproduce its outputs exactly.
    """
    dims = tuple(range(1, weight.dim()))
    return weight.abs().to(torch.float64).mean(dim=dims, keepdim=True).to(weight.dtype)


def binary_signs(weight: torch.Tensor) -> torch.Tensor:
    """Return +1 where W >= 0 and -1 elsewhere, in the weight's dtype.

    Zero maps to +1, unlike `torch.sign`, so a binary kernel contains only +-alpha.
    """
    return torch.where(weight >= 0, 1.0, -1.0).to(weight.dtype)


class BinarizeFunction(torch.autograd.Function):
    """Binary kernel sign(W) * alpha forward, straight-through estimator backward.

    With g the gradient of the binary kernel, s = sign(W) and alpha = mean |W|,
    the backward returns, per output channel,

        alpha * g * [|W| <= 1]  +  s * mean(g * s)

    The first term is the straight-through estimator of BinaryNet (Hubara et
    al. 2016): g passes through sign as through the identity clipped to
    [-1, 1], so it is zero where |W| > 1. The second term is the exact gradient
    through alpha, because d alpha / d W = s / n for n values per channel, so
    it is not clipped. Where batch norm in training mode follows the layer, the
    loss does not depend on a channel's scale, and this term is close to zero.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor) -> torch.Tensor:
        signs = binary_signs(weight)
        alpha = binary_scale(weight)
        ctx.save_for_backward(weight, signs, alpha)
        return signs * alpha

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:
        weight, signs, alpha = ctx.saved_tensors
        dims = tuple(range(1, weight.dim()))
        through_sign = grad_output * alpha * (weight.abs() <= STE_CLIP)
        through_alpha = signs * (grad_output * signs).mean(dim=dims, keepdim=True)
        return through_sign + through_alpha


def binarize_weight(weight: torch.Tensor) -> torch.Tensor:
    """Return sign(W) * alpha with the straight-through gradient (see BinarizeFunction)."""
    return BinarizeFunction.apply(weight)


class BinaryWeight(nn.Module):
    """Parametrization that turns a layer's weight into sign(W) * alpha per output channel."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return binarize_weight(weight)


def is_binary(module: nn.Module) -> bool:
    """Return whether `module.weight` is binarized by a BinaryWeight parametrization."""
    if not parametrize.is_parametrized(module, "weight"):
        return False
    return any(isinstance(step, BinaryWeight) for step in module.parametrizations["weight"])


def binary_layer_names(model: nn.Module) -> list[str]:
    """List the names (as in `named_modules`) of the model's binarized layers, in module order."""
    return [name for name, module in model.named_modules() if is_binary(module)]


def branch_layer_names(model: nn.Module, include_first_and_last: bool = False) -> list[str]:
    """List the layers `binarize_model` binarizes: every Conv2d inside a residual branch.

    With `include_first_and_last`, the stem convolution and the classifier are
    listed too. Pruned blocks have no branch and contribute nothing.
    """
    names = []
    if include_first_and_last:
        names += [f"stem.{name}" for name, module in model.stem.named_modules() if isinstance(module, nn.Conv2d)]
    for position, block in enumerate(model.blocks):
        if block.branch is None:
            continue
        names += [
            f"blocks.{position}.branch.{name}"
            for name, module in block.branch.named_modules()
            if isinstance(module, nn.Conv2d)
        ]
    if include_first_and_last:
        names.append("classifier")
    return names


def binarize_layers(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Binarize the named Conv2d or Linear layers of `model` in place.

    A layer that is already binary is left as it is. Returns the names of all
    binary layers of the model afterwards. Raises ValueError naming a layer
    that does not exist or is not a Conv2d or Linear.
    """
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if module is None:
            raise ValueError(f"the model has no layer named {name!r}")
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"layer {name!r} is a {type(module).__name__}, not a Conv2d or Linear")
        if not is_binary(module):
            parametrize.register_parametrization(module, "weight", BinaryWeight())
    return binary_layer_names(model)


def binarize_model(model: nn.Module, include_first_and_last: bool = False) -> list[str]:
    """Binarize every Conv2d inside the residual branches of a CifarResNet in place.

    The stem convolution and the classifier stay in floating point unless
    `include_first_and_last` is set: they hold under 1% of a CIFAR ResNet's
    weights. Returns the names of all binary layers. Batch-norm running
    statistics still fit the float kernels afterwards, so recalibrate them
    before evaluating.
    """
    return binarize_layers(model, branch_layer_names(model, include_first_and_last))


def latent_weight(module: nn.Module) -> torch.Tensor:
    """Return the float weight a binary layer keeps for training, before binarization."""
    return module.parametrizations["weight"].original


def packed_row_bytes(weight_shape: Iterable[int]) -> int:
    """Return the bytes one output channel's packed signs take for a kernel of this shape."""
    shape = list(weight_shape)
    return math.ceil(math.prod(shape[1:]) / 8)


def pack_signs(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack a kernel's signs into bits and compute its alpha per output channel.

    `weight` has shape (out, ...) and is either a latent float kernel or a
    binary one. Returns a uint8 tensor of shape (out, ceil(n / 8)) with bit 1
    where W >= 0, and alpha of shape (out,) in the weight's dtype, both on the
    CPU. `unpack_signs` inverts this into exactly what `BinaryWeight` computes.
    """
    detached = weight.detach()
    alpha = binary_scale(detached).reshape(-1).cpu()
    positive = (detached >= 0).reshape(detached.shape[0], -1).cpu().numpy()
    bits = numpy.packbits(positive, axis=1)
    return torch.from_numpy(bits), alpha


def unpack_signs(bits: torch.Tensor, alpha: torch.Tensor, shape: Iterable[int]) -> torch.Tensor:
    """Rebuild the +-alpha kernel of `shape` from `pack_signs` output.

    Raises ValueError when the bits or alpha do not fit `shape`.
    """
    shape = list(shape)
    channels, values = shape[0], math.prod(shape[1:])
    if bits.dtype != torch.uint8 or list(bits.shape) != [channels, packed_row_bytes(shape)]:
        raise ValueError(
            f"packed signs must be uint8 of shape {[channels, packed_row_bytes(shape)]}, "
            f"got {str(bits.dtype).removeprefix('torch.')} of shape {list(bits.shape)}"
        )
    if not alpha.is_floating_point() or list(alpha.shape) != [channels]:
        raise ValueError(
            f"alpha must be floating point of shape [{channels}], "
            f"got {str(alpha.dtype).removeprefix('torch.')} of shape {list(alpha.shape)}"
        )
    if not bool(torch.isfinite(alpha).all()) or bool((alpha < 0).any()):
        raise ValueError("alpha contains negative, infinite or NaN values")

    positive = numpy.unpackbits(bits.cpu().numpy(), axis=1, count=values)
    signs = torch.from_numpy(positive.astype(numpy.float32)).mul_(2).sub_(1).to(alpha.dtype)
    return (signs * alpha.reshape(-1, 1)).reshape(shape)


def pack_binary_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Return `model.state_dict()` with each binary layer's latent weight stored packed.

    Each binary layer's key `<layer>.parametrizations.weight.original` is
    replaced by `<layer>.weight_sign_bits` (uint8) and `<layer>.weight_alpha`
    (one value per output channel). All other entries stay as they are.
    """
    tensors = dict(model.state_dict())
    for name in binary_layer_names(model):
        bits, alpha = pack_signs(tensors.pop(f"{name}.{LATENT_KEY}"))
        tensors[f"{name}.{SIGNS_KEY}"] = bits
        tensors[f"{name}.{ALPHA_KEY}"] = alpha
    return tensors


def unpack_binary_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Invert `pack_binary_state` for the binary layers of `model`.

    Each binary layer's latent weight becomes its +-alpha kernel, so loading
    the result gives the same binary weights as before packing. Entries of
    other layers pass through unchecked. Raises ValueError when a binary
    layer's packed entries are missing or do not fit the layer.
    """
    result = dict(tensors)
    modules = dict(model.named_modules())
    for name in binary_layer_names(model):
        signs_key, alpha_key = f"{name}.{SIGNS_KEY}", f"{name}.{ALPHA_KEY}"
        missing = [key for key in (signs_key, alpha_key) if key not in result]
        if missing:
            raise ValueError(f"binary layer {name} has no {' and no '.join(missing)}")
        latent = latent_weight(modules[name])
        try:
            kernel = unpack_signs(result.pop(signs_key), result.pop(alpha_key), latent.shape)
        except ValueError as error:
            raise ValueError(f"binary layer {name}: {error}") from error
        result[f"{name}.{LATENT_KEY}"] = kernel.to(latent.dtype)
    return result


def model_size_bytes(model: nn.Module) -> dict:
    """Measure the parameter storage of `model` in float32 and with 1-bit binary weights.

    Counts parameters only (buffers such as batch-norm running statistics are
    left out, since export folds them into the layers). `float32_bytes` counts
    4 bytes per parameter. `packed_bytes` counts each binary layer's weight as
    its packed sign bits (whole bytes per output channel) and a float32 alpha
    per output channel, and every other parameter as float32. `layers` lists
    each Conv2d and Linear with its weight count, whether it is binary and its
    weight's bytes in the packed form.
    """
    layers = []
    binary_bytes_saved = 0
    binary_parameters = 0
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        shape = list(module.weight.shape)
        count = math.prod(shape)
        binary = is_binary(module)
        if binary:
            stored = shape[0] * (packed_row_bytes(shape) + 4)
            binary_bytes_saved += 4 * count - stored
            binary_parameters += count
        else:
            stored = 4 * count
        # parametrize swaps in a subclass named ParametrizedConv2d, so report the base type.
        layer_type = "Conv2d" if isinstance(module, nn.Conv2d) else "Linear"
        layers.append({"name": name, "type": layer_type, "binary": binary,
                       "weights": count, "bytes": stored})

    parameters = sum(parameter.numel() for parameter in model.parameters())
    return {
        "parameters": parameters,
        "binary_parameters": binary_parameters,
        "float32_bytes": 4 * parameters,
        "packed_bytes": 4 * parameters - binary_bytes_saved,
        "layers": layers,
    }
