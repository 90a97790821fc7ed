"""Write a FoldedResNet as an ONNX graph with the onnx helper API.

The graph is emitted layer by layer from the folded module instead of traced by
torch.onnx.export: on this project's 2-core CPU the torch.export-based exporter
took about 40 s for a resnet20 and attached stack traces to every node, and the
TorchScript exporter is deprecated and names weights `onnx::Conv_254`. The
network is a fixed, small set of operators, so the emitted graph names each
weight after the module it came from and contains nothing else. Parity with the
PyTorch model is checked by validation after every export.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from sdprune.export.folding import FoldedResNet

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH_AXIS = "batch"
MIN_OPSET = 18


class GraphBuilder:
    """Collect nodes and initializers, sharing identical small constants."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._constants: dict[tuple, str] = {}

    def add_initializer(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def constant(self, name: str, array: np.ndarray) -> str:
        """Return the name of an initializer holding `array`, adding it only once."""
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:
            self._constants[key] = self.add_initializer(name, array)
        return self._constants[key]

    def add_node(self, op_type: str, inputs: list[str], output: str, **attributes) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attributes))
        return output


def emit_conv(builder: GraphBuilder, conv: nn.Conv2d, x: str, output: str) -> str:
    """Add one biased convolution whose weights are initializers named after its source module."""
    name = conv.spec.source
    weight = builder.add_initializer(f"{name}.weight", conv.weight.detach().numpy())
    bias = builder.add_initializer(f"{name}.bias", conv.bias.detach().numpy())
    attributes = {"pads": [conv.padding[0], conv.padding[1]] * 2}
    if conv.stride != (1, 1):
        attributes["strides"] = list(conv.stride)
    return builder.add_node("Conv", [x, weight, bias], output, **attributes)


def emit_shortcut(builder: GraphBuilder, block, x: str, prefix: str) -> str:
    """Add the parameter-free shortcut: average pooling, then zero channels appended."""
    shortcut = block.transition
    if shortcut is None:
        return x
    if shortcut.stride > 1:
        # ceil_mode with count_include_pad 0 averages a window that overhangs an odd
        # edge over its valid pixels only, as torch's avg_pool2d does without padding.
        x = builder.add_node(
            "AveragePool", [x], f"{prefix}.pool",
            kernel_shape=[shortcut.stride] * 2, strides=[shortcut.stride] * 2, ceil_mode=1,
        )
    extra = shortcut.out_channels - shortcut.in_channels
    if extra > 0:
        # Pad lists the start of every axis, then the end: N, C, H, W.
        pads = builder.constant(f"pads.{extra}", np.array([0, 0, 0, 0, 0, extra, 0, 0], dtype=np.int64))
        x = builder.add_node("Pad", [x, pads], f"{prefix}.pad")
    return x


def build_graph(folded: FoldedResNet, input_shape: list[int], opset: int = MIN_OPSET) -> onnx.ModelProto:
    """Return an ONNX model of `folded` with a dynamic batch axis.

    `input_shape` is (C, H, W) of one image. The graph's input is `images`
    (batch, C, H, W) float32 and its output `logits` (batch, classes).
    """
    builder = GraphBuilder()

    x = emit_conv(builder, folded.stem, INPUT_NAME, "stem.conv")
    x = builder.add_node("Relu", [x], "stem.relu")

    for block in folded.blocks:
        prefix = f"blocks.{block.index - 1}"
        identity = emit_shortcut(builder, block, x, prefix)
        if block.conv1 is None:
            x = identity
            continue
        residual = emit_conv(builder, block.conv1, x, f"{prefix}.conv1")
        residual = builder.add_node("Relu", [residual], f"{prefix}.relu1")
        residual = emit_conv(builder, block.conv2, residual, f"{prefix}.conv2")
        x = builder.add_node("Add", [identity, residual], f"{prefix}.add")
        x = builder.add_node("Relu", [x], f"{prefix}.out")

    x = builder.add_node("GlobalAveragePool", [x], "head.pool")
    x = builder.add_node("Flatten", [x], "head.flatten", axis=1)
    weight = builder.add_initializer("classifier.weight", folded.classifier.weight.detach().numpy())
    bias = builder.add_initializer("classifier.bias", folded.classifier.bias.detach().numpy())
    builder.add_node("Gemm", [x, weight, bias], OUTPUT_NAME, transB=1)

    classes = folded.classifier.out_features
    graph = helper.make_graph(
        builder.nodes,
        "sdprune",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [BATCH_AXIS, *input_shape])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH_AXIS, classes])],
        initializer=builder.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="sdprune")
    return model
