"""Store binary convolution kernels as packed sign bits: a graph rewrite on ONNX models.

ONNX has no 1-bit tensor type. A binary kernel after folding is sign(W) times a
magnitude per output channel, so the rewrite keeps the magnitudes as float32 and
packs the signs of all binary kernels, eight to a byte, into one uint8
initializer. The graph rebuilds the float kernels from initializers only:

    bits (N, 1) uint8 --BitShift by 7..0, BitwiseAnd 1--> (N, 8) 0/1
      --Cast, x * 2 - 1--> (8N,) +-1 --Split--> one run per kernel shape
      --Reshape (layers * out, in, kH, kW), Mul magnitudes, Split--> kernels

Kernels of one shape are unpacked together, so each extra layer of a known shape
costs one Split output, not a chain of nodes with its own shape constants.
onnxruntime folds this initializer-only subgraph at session creation, leaving
plain Conv nodes at inference time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from sdprune.errors import InvalidValueError

PACKED_BITS_NAME = "binary.bits"

# np.packbits puts the first bit in the most significant position (bitorder "big").
BIT_SHIFTS = np.arange(7, -1, -1, dtype=np.uint8)


@dataclass(frozen=True)
class PackedKernel:
    """One binary kernel: its initializer name, shape, sign bits and per-channel magnitudes."""

    name: str
    shape: tuple[int, ...]
    bits: np.ndarray
    magnitudes: np.ndarray


def split_binary_kernel(name: str, kernel: np.ndarray) -> PackedKernel:
    """Split `kernel` (out, ...) into sign bits and one magnitude per output channel.

    Raises InvalidValueError when an output channel contains values other than
    +m and -m, because the bits could not reproduce it exactly.
    """
    flat = kernel.reshape(kernel.shape[0], -1)
    magnitudes = np.abs(flat[:, :1])
    if not np.array_equal(np.abs(flat), np.broadcast_to(magnitudes, flat.shape)):
        raise InvalidValueError(
            f"{name} is not a binary kernel: an output channel contains values other than +m and -m"
        )
    # A bit of 1 stands for +m and 0 for -m; a channel with m = 0 rebuilds as zeros either way.
    bits = (flat > 0).reshape(-1)
    return PackedKernel(name, tuple(kernel.shape), bits, magnitudes.astype(np.float32).reshape(-1))


def group_by_shape(kernels: list[PackedKernel]) -> list[list[PackedKernel]]:
    """Group kernels of equal shape, groups in order of their first kernel."""
    groups: dict[tuple[int, ...], list[PackedKernel]] = {}
    for kernel in kernels:
        groups.setdefault(kernel.shape, []).append(kernel)
    return list(groups.values())


def int64(values) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def unpacking_graph(
    kernels: list[PackedKernel],
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Build the nodes and initializers that rebuild each kernel under its own name."""
    groups = group_by_shape(kernels)
    ordered = [kernel for group in groups for kernel in group]
    bits = np.concatenate([kernel.bits for kernel in ordered])
    packed = np.packbits(bits).reshape(-1, 1)
    padding = packed.size * 8 - bits.size

    initializers = [
        numpy_helper.from_array(packed, PACKED_BITS_NAME),
        numpy_helper.from_array(BIT_SHIFTS, "binary.shifts"),
        numpy_helper.from_array(np.array(1, dtype=np.uint8), "binary.mask"),
        numpy_helper.from_array(np.array(2, dtype=np.float32), "binary.two"),
        numpy_helper.from_array(np.array(1, dtype=np.float32), "binary.one"),
        numpy_helper.from_array(int64([-1]), "binary.flat"),
    ]
    nodes = [
        helper.make_node("BitShift", [PACKED_BITS_NAME, "binary.shifts"], ["binary.shifted"], direction="RIGHT"),
        helper.make_node("BitwiseAnd", ["binary.shifted", "binary.mask"], ["binary.masked"]),
        helper.make_node("Cast", ["binary.masked"], ["binary.float"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["binary.float", "binary.two"], ["binary.doubled"]),
        helper.make_node("Sub", ["binary.doubled", "binary.one"], ["binary.signs"]),
        helper.make_node("Reshape", ["binary.signs", "binary.flat"], ["binary.all"]),
    ]

    group_sizes = [sum(kernel.bits.size for kernel in group) for group in groups]
    group_names = [f"binary.group{number}" for number in range(len(groups))]
    split_outputs = group_names + (["binary.padding"] if padding else [])
    split_sizes = group_sizes + ([padding] if padding else [])
    if len(split_outputs) == 1:
        nodes.append(helper.make_node("Identity", ["binary.all"], split_outputs))
    else:
        initializers.append(numpy_helper.from_array(int64(split_sizes), "binary.sizes"))
        nodes.append(helper.make_node("Split", ["binary.all", "binary.sizes"], split_outputs, axis=0))

    for group, signs in zip(groups, group_names):
        out_channels, *rest = group[0].shape
        shape = f"{signs}.shape"
        initializers.append(numpy_helper.from_array(int64([len(group) * out_channels, *rest]), shape))
        magnitudes = np.concatenate([kernel.magnitudes for kernel in group])
        magnitudes = magnitudes.reshape(-1, *[1] * len(rest))
        initializers.append(numpy_helper.from_array(magnitudes, f"{signs}.magnitudes"))
        nodes.append(helper.make_node("Reshape", [signs, shape], [f"{signs}.signs"]))
        names = [kernel.name for kernel in group]
        if len(group) == 1:
            nodes.append(helper.make_node("Mul", [f"{signs}.signs", f"{signs}.magnitudes"], names))
        else:
            nodes.append(helper.make_node("Mul", [f"{signs}.signs", f"{signs}.magnitudes"], [f"{signs}.kernels"]))
            nodes.append(helper.make_node("Split", [f"{signs}.kernels"], names, axis=0, num_outputs=len(group)))
    return nodes, initializers


def pack_binary_kernels(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """Return a copy of `model` whose initializers `names` are stored as packed sign bits.

    Each named initializer must be a binary kernel (see split_binary_kernel). The
    unpacking nodes go first in the graph and produce tensors with the original
    names, so the consumers are unchanged.
    """
    packed_model = onnx.ModelProto()
    packed_model.CopyFrom(model)
    if not names:
        return packed_model
    graph = packed_model.graph

    by_name = {initializer.name: initializer for initializer in graph.initializer}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise InvalidValueError(f"the graph has no initializers named {missing}")
    kernels = [split_binary_kernel(name, numpy_helper.to_array(by_name[name])) for name in names]

    kept = [initializer for initializer in graph.initializer if initializer.name not in set(names)]
    nodes, initializers = unpacking_graph(kernels)
    del graph.initializer[:]
    graph.initializer.extend(initializers + kept)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    return packed_model
