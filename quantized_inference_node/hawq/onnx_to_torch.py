"""Convert an ONNX graph into a differentiable PyTorch module for the HAWQ analysis.

The HAWQ tool needs gradients and Hessian-vector products of an ONNX model's loss
with respect to the weights of its Conv, ConvTranspose, Gemm and MatMul nodes. This
module rebuilds the graph as a ``torch.nn.Module`` that runs the ONNX nodes one by
one, in topological order, with torch operators, so autograd (including double
backward) runs through it.

Why our own converter instead of onnx2torch 1.5.15: onnx2torch imports torchvision
when it is imported, for its NMS and RoIAlign converters. The torchvision wheels on
PyPI do not load beside the CPU build of torch 2.13.0 this project is tested with,
and the torch/torchvision pair that does load is a CUDA build of about 6 GB. Perception CNNs
use a few dozen operators, so converting those here keeps the tool's environment
small and lets us check each operator against onnxruntime.

Typical use::

    model = fold_batchnorm(load_onnx_model("det.onnx"))
    module = convert(model)
    logits = module(torch.from_numpy(image_nchw))
    module.set_activation_transform({"relu_3.tmp_0": fake_quantize})
    tensors = module.run({"x": image_nchw}, capture=["relu_3.tmp_0"])

Known limits: BatchNormalization runs in inference mode only; control flow (If, Loop,
Scan), sequence and non-standard-domain operators are not converted; Resize supports
the nearest and linear modes, not cubic.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
ActivationTransform = Callable[[Tensor], Tensor]

#: Node types whose initializer weight is exposed as a trainable parameter.
QUANTIZABLE_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class UnsupportedOperatorError(ValueError):
    """Raised when an ONNX graph contains operators or attributes the converter lacks."""


class ConversionError(ValueError):
    """Raised when an ONNX graph is malformed or a tensor name is unknown."""


@dataclass(frozen=True)
class QuantizableNode:
    """A node whose weight the HAWQ tool may quantize.

    Attributes:
        name: the ONNX node name (``"{op_type}_{node_index}"`` when the node is unnamed).
        op_type: ``"Conv"``, ``"ConvTranspose"``, ``"Gemm"`` or ``"MatMul"``.
        weight_name: ONNX initializer name of the weight; key in ``weight_parameters``.
        bias_name: ONNX initializer name of the bias, or None.
        input_name: name of the activation tensor the node reads.
        output_name: name of the tensor the node writes.
        weight_shape: shape of the weight in ONNX layout.
        channel_axis: axis of the weight that indexes output channels, for
            per-channel quantization (the ``axis`` of a DequantizeLinear on it).
        group: the Conv/ConvTranspose ``group`` attribute (1 for Gemm and MatMul).
        node_index: position of the node in ``OnnxGraphModule.model.graph.node``.
    """

    name: str
    op_type: str
    weight_name: str
    bias_name: str | None
    input_name: str
    output_name: str
    weight_shape: tuple[int, ...]
    channel_axis: int
    group: int
    node_index: int

    @property
    def num_weights(self) -> int:
        """Number of scalar weights (the bias excluded)."""
        return math.prod(self.weight_shape)


@dataclass(frozen=True)
class _Node:
    """A node ready to run: its operator function and parsed attributes."""

    index: int
    name: str
    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]
    fn: Callable[..., Any]


# ---------------------------------------------------------------------------
# Model preparation on the ONNX side.


def load_onnx_model(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """Return MODEL as a ModelProto, loading it when it is a path.

    Raises:
        FileNotFoundError: the path does not exist.
        TypeError: MODEL is neither a ModelProto nor a path.
    """
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX model {path} does not exist; pass an .onnx file path")
        return onnx.load(str(path))
    raise TypeError(f"model must be an onnx.ModelProto or a path, got {type(model).__name__}")


def opset_version(model: onnx.ModelProto) -> int:
    """Return the model's opset of the default ONNX domain."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ConversionError("model imports no default-domain opset; it is not a standard ONNX model")


def constants_to_initializers(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """Return a copy of MODEL with each Constant node moved into a graph initializer.

    Exporters such as paddle2onnx store weights as Constant nodes; analysis and
    quantization tools look weights up among the initializers, so they miss them.
    The initializer takes the Constant's output name, so consumers are unchanged.

    Raises:
        UnsupportedOperatorError: a Constant contains a sparse tensor.
    """
    model = copy.deepcopy(load_onnx_model(model))
    graph = model.graph

    kept = []
    for node in graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            kept.append(node)
            continue
        array = _constant_value(node)
        graph.initializer.append(numpy_helper.from_array(array, name=node.output[0]))
    del graph.node[:]
    graph.node.extend(kept)
    return model


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    """Return the value of a Constant node as an array."""
    attribute = node.attribute[0]
    value = onnx.helper.get_attribute_value(attribute)
    if attribute.name == "value":
        return numpy_helper.to_array(value)
    if attribute.name == "value_float":
        return np.array(value, dtype=np.float32)
    if attribute.name == "value_floats":
        return np.array(value, dtype=np.float32)
    if attribute.name == "value_int":
        return np.array(value, dtype=np.int64)
    if attribute.name == "value_ints":
        return np.array(value, dtype=np.int64)
    raise UnsupportedOperatorError(
        f"Constant node {node.name!r} has an unsupported {attribute.name!r} value; only dense "
        "tensor, float(s) and int(s) constants are supported"
    )


def fold_batchnorm(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    """Return a copy of MODEL with each inference BatchNormalization folded into its Conv.

    A BatchNormalization is folded when its input is written by a Conv (or a
    ConvTranspose with group 1) that no other node reads, whose weight (and bias) are
    initializers used by no other node, and whose BatchNormalization parameters are
    initializers. The Conv then computes ``W' = W * s`` and ``b' = (b - mean) * s + B``
    per output channel, with ``s = scale / sqrt(var + epsilon)``, and writes the
    BatchNormalization's output. Others are left in place (logged at debug level).
    Constant nodes are first moved into initializers.

    Folding the ONNX model rather than the torch module keeps the analysed weights and
    the exported weights identical.
    """
    model = constants_to_initializers(model)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers = _consumer_counts(graph)
    producers = {out: node for node in graph.node for out in node.output}
    graph_outputs = {out.name for out in graph.output}

    removed: list[onnx.NodeProto] = []
    for bn in graph.node:
        if bn.op_type != "BatchNormalization":
            continue
        conv = producers.get(bn.input[0])
        reason = _fold_blocker(bn, conv, initializers, consumers, graph_outputs)
        if reason:
            logger.debug("BatchNormalization %r not folded: %s", bn.name, reason)
            continue

        _fold_one(graph, conv, bn, initializers)
        removed.append(bn)

    for bn in removed:
        graph.node.remove(bn)
    _drop_unused_initializers(graph)
    logger.info("folded %d BatchNormalization node(s) into their Conv", len(removed))
    return model


def _consumer_counts(graph: onnx.GraphProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                counts[name] = counts.get(name, 0) + 1
    return counts


def _fold_blocker(
    bn: onnx.NodeProto,
    conv: onnx.NodeProto | None,
    initializers: Mapping[str, onnx.TensorProto],
    consumers: Mapping[str, int],
    graph_outputs: set[str],
) -> str | None:
    """Return why BN cannot be folded into CONV, or None when it can."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in bn.attribute}
    if attrs.get("training_mode", 0):
        return "training_mode is set"
    if len(bn.output) > 1:
        return "it has running-statistics outputs"
    if conv is None or conv.op_type not in ("Conv", "ConvTranspose"):
        return "its input is not written by a Conv"
    if consumers.get(bn.input[0], 0) != 1 or bn.input[0] in graph_outputs:
        return "the Conv output has other readers"
    conv_params = [name for name in conv.input[1:] if name]
    if any(name not in initializers or consumers.get(name, 0) != 1 for name in conv_params):
        return "the Conv weight or bias is not an initializer of its own"
    if any(name not in initializers for name in bn.input[1:5]):
        return "its parameters are not initializers"
    if conv.op_type == "ConvTranspose":
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        if group != 1:
            return "grouped ConvTranspose is not folded"
    return None


def _fold_one(
    graph: onnx.GraphProto,
    conv: onnx.NodeProto,
    bn: onnx.NodeProto,
    initializers: dict[str, onnx.TensorProto],
) -> None:
    """Rewrite CONV's weight and bias to include BN, and let CONV write BN's output."""
    epsilon = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    scale, offset, mean, var = (
        numpy_helper.to_array(initializers[name]).astype(np.float64) for name in bn.input[1:5]
    )
    factor = scale / np.sqrt(var + epsilon)

    weight_init = initializers[conv.input[1]]
    weight = numpy_helper.to_array(weight_init).astype(np.float64)
    channel_axis = 0 if conv.op_type == "Conv" else 1
    shape = [1] * weight.ndim
    shape[channel_axis] = -1
    folded_weight = weight * factor.reshape(shape)

    has_bias = len(conv.input) > 2 and conv.input[2] != ""
    bias = (
        numpy_helper.to_array(initializers[conv.input[2]]).astype(np.float64)
        if has_bias
        else np.zeros_like(factor)
    )
    folded_bias = (bias - mean) * factor + offset

    dtype = numpy_helper.to_array(weight_init).dtype
    weight_init.CopyFrom(numpy_helper.from_array(folded_weight.astype(dtype), weight_init.name))
    if has_bias:
        bias_init = initializers[conv.input[2]]
        bias_init.CopyFrom(numpy_helper.from_array(folded_bias.astype(dtype), bias_init.name))
    else:
        bias_name = _unique_name(f"{conv.input[1]}_folded_bias", initializers)
        bias_init = numpy_helper.from_array(folded_bias.astype(dtype), bias_name)
        graph.initializer.append(bias_init)
        initializers[bias_name] = bias_init
        while len(conv.input) < 2:
            conv.input.append("")
        conv.input.append(bias_name)
    conv.output[0] = bn.output[0]


def _unique_name(base: str, taken: Mapping[str, Any]) -> str:
    name, suffix = base, 1
    while name in taken:
        name, suffix = f"{base}_{suffix}", suffix + 1
    return name


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


# ---------------------------------------------------------------------------
# Operator implementations. Each takes the node's input tensors (None for an omitted
# optional input), its attributes and the opset, and returns a tensor or a tuple.


def _pads_begin_end(
    attrs: Mapping[str, Any],
    spatial_in: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> tuple[list[int], list[int]]:
    """Return the explicit (begin, end) pads of a Conv or pool, resolving auto_pad."""
    nd = len(spatial_in)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(spatial_in, kernel, strides, dilations, strict=True):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, large = total // 2, total - total // 2
            begin.append(small if auto_pad == "SAME_UPPER" else large)
            end.append(large if auto_pad == "SAME_UPPER" else small)
        return begin, end
    if auto_pad == "VALID":
        return [0] * nd, [0] * nd
    pads = list(attrs.get("pads", [0] * (2 * nd)))
    return pads[:nd], pads[nd:]


def _torch_pad_list(begin: Sequence[int], end: Sequence[int]) -> list[int]:
    """Return F.pad's list (last axis first) for per-axis BEGIN and END pads."""
    out: list[int] = []
    for b, e in zip(reversed(begin), reversed(end), strict=True):
        out += [b, e]
    return out


def _op_conv(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    nd = weight.ndim - 2
    strides = attrs.get("strides", [1] * nd)
    dilations = attrs.get("dilations", [1] * nd)
    kernel = attrs.get("kernel_shape", list(weight.shape[2:]))
    begin, end = _pads_begin_end(attrs, x.shape[2:], kernel, strides, dilations)
    conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]

    if begin != end:
        x = F.pad(x, _torch_pad_list(begin, end))
        begin = [0] * nd
    return conv(x, weight, bias, strides, begin, dilations, attrs.get("group", 1))


def _op_conv_transpose(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    nd = weight.ndim - 2
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    output_padding = list(attrs.get("output_padding", [0] * nd))
    kernel = list(attrs.get("kernel_shape", list(weight.shape[2:])))
    spatial = zip(x.shape[2:], strides, kernel, dilations, output_padding, strict=True)
    full = [(size - 1) * s + (k - 1) * d + 1 + op for size, s, k, d, op in spatial]

    if "output_shape" in attrs:
        # The spec derives the pads from the requested output shape. For ConvTranspose,
        # SAME_UPPER puts the odd pixel at the start.
        total = [f - o for f, o in zip(full, attrs["output_shape"][-nd:], strict=True)]
        if attrs.get("auto_pad", "NOTSET") == "SAME_UPPER":
            begin, end = [t - t // 2 for t in total], [t // 2 for t in total]
        else:
            begin, end = [t // 2 for t in total], [t - t // 2 for t in total]
    elif attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER"):
        total = [f - size * s for f, size, s in zip(full, x.shape[2:], strides, strict=True)]
        if attrs["auto_pad"] == "SAME_UPPER":
            begin, end = [t // 2 for t in total], [t - t // 2 for t in total]
        else:
            begin, end = [t - t // 2 for t in total], [t // 2 for t in total]
    else:
        pads = list(attrs.get("pads", [0] * (2 * nd)))
        begin, end = pads[:nd], pads[nd:]

    conv = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
    # NOTE: torch limits output_padding to below the stride or dilation, as ONNX does.
    y = conv(x, weight, bias, strides, 0, output_padding, attrs.get("group", 1), dilations)
    index = [slice(None), slice(None)] + [
        slice(b, y.shape[2 + i] - e) for i, (b, e) in enumerate(zip(begin, end, strict=True))
    ]
    return y[tuple(index)]


def _op_batchnorm(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x, scale, offset, mean, var = inputs[:5]
    return F.batch_norm(x, mean, var, scale, offset, False, 0.0, attrs.get("epsilon", 1e-5))


def _op_gemm(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    y = attrs.get("alpha", 1.0) * (a @ b)
    if c is not None:
        y = y + attrs.get("beta", 1.0) * c
    return y


def _pool_setup(
    x: Tensor, attrs: dict[str, Any]
) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    kernel = list(attrs["kernel_shape"])
    nd = len(kernel)
    strides = list(attrs.get("strides", [1] * nd))
    dilations = list(attrs.get("dilations", [1] * nd))
    begin, end = _pads_begin_end(attrs, x.shape[2:], kernel, strides, dilations)
    return kernel, strides, dilations, begin, end


def _op_maxpool(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x = inputs[0]
    kernel, strides, dilations, begin, end = _pool_setup(x, attrs)
    nd = len(kernel)
    pool = (F.max_pool1d, F.max_pool2d, F.max_pool3d)[nd - 1]
    ceil_mode = bool(attrs.get("ceil_mode", 0))

    if begin != end or any(2 * p > k for p, k in zip(begin, kernel, strict=True)):
        x = F.pad(x, _torch_pad_list(begin, end), value=-math.inf)
        begin = [0] * nd
    return pool(x, kernel, strides, begin, dilations, ceil_mode=ceil_mode)


def _op_averagepool(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x = inputs[0]
    kernel, strides, _, begin, end = _pool_setup(x, attrs)
    nd = len(kernel)
    pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[nd - 1]
    ceil_mode = bool(attrs.get("ceil_mode", 0))
    include_pad = bool(attrs.get("count_include_pad", 0))

    if begin == end and all(2 * p <= k for p, k in zip(begin, kernel, strict=True)):
        return pool(x, kernel, strides, begin, ceil_mode=ceil_mode, count_include_pad=include_pad)

    # Asymmetric pads: pad explicitly, then divide by the count of real pixels.
    pad_list = _torch_pad_list(begin, end)
    summed = pool(F.pad(x, pad_list), kernel, strides, 0, ceil_mode=ceil_mode)
    if include_pad:
        return summed
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    return summed / pool(F.pad(ones, pad_list), kernel, strides, 0, ceil_mode=ceil_mode)


def _op_global_average_pool(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int):
    x = inputs[0]
    return x.mean(dim=tuple(range(2, x.ndim)), keepdim=True)


def _op_global_max_pool(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int):
    x = inputs[0]
    return x.amax(dim=tuple(range(2, x.ndim)), keepdim=True)


def _op_clip(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x = inputs[0]
    if opset < 11:
        return x.clamp(attrs.get("min", -math.inf), attrs.get("max", math.inf))
    low = inputs[1] if len(inputs) > 1 else None
    high = inputs[2] if len(inputs) > 2 else None
    if low is not None:
        x = torch.maximum(x, low.to(x.dtype))
    if high is not None:
        x = torch.minimum(x, high.to(x.dtype))
    return x


def _op_hard_sigmoid(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    # A clamp, because torch's hardsigmoid has no second derivative (Hessian products).
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    return (alpha * inputs[0] + beta).clamp(0.0, 1.0)


def _op_div(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    a, b = inputs[0], inputs[1]
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _op_softmax_like(log: bool) -> Callable[..., Tensor]:
    def op(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
        x = inputs[0]
        fn = torch.log_softmax if log else torch.softmax
        if opset >= 13:
            return fn(x, dim=attrs.get("axis", -1))
        # Before opset 13 the input is flattened to 2-D at AXIS.
        axis = attrs.get("axis", 1) % x.ndim
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return op


def _op_concat(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    tensors = [t for t in inputs if t is not None]
    return torch.cat(tensors, dim=attrs["axis"])


def _op_reshape(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x = inputs[0]
    shape = [int(v) for v in (inputs[1].tolist() if opset >= 5 else attrs["shape"])]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if v == 0 else v for i, v in enumerate(shape)]
    return x.reshape(shape)


def _op_flatten(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x = inputs[0]
    axis = attrs.get("axis", 1)
    axis = axis + x.ndim if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _op_transpose(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x = inputs[0]
    perm = attrs.get("perm", list(reversed(range(x.ndim))))
    return x.permute(*perm)


def _axes_from(inputs: list[Tensor | None], attrs: dict[str, Any], index: int) -> list[int] | None:
    """Return the axes given as attribute 'axes' or as input INDEX (newer opsets)."""
    if "axes" in attrs:
        return [int(a) for a in attrs["axes"]]
    if len(inputs) > index and inputs[index] is not None:
        return [int(a) for a in inputs[index].tolist()]
    return None


def _op_squeeze(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x = inputs[0]
    axes = _axes_from(inputs, attrs, 1)
    if axes is None:
        return x.squeeze()
    axes = sorted((a + x.ndim if a < 0 else a) for a in axes)
    for axis in reversed(axes):
        x = x.squeeze(axis)
    return x


def _op_unsqueeze(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x = inputs[0]
    axes = _axes_from(inputs, attrs, 1) or []
    rank = x.ndim + len(axes)
    for axis in sorted((a + rank if a < 0 else a) for a in axes):
        x = x.unsqueeze(axis)
    return x


def _op_shape(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    shape = list(inputs[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return torch.tensor(shape[start:end], dtype=torch.int64)


def _op_size(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    return torch.tensor(inputs[0].numel(), dtype=torch.int64)


def _op_gather(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x, indices = inputs[0], inputs[1].long()
    axis = attrs.get("axis", 0) % x.ndim
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    picked = x.index_select(axis, indices.reshape(-1))
    return picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :]))


def _op_slice(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x = inputs[0]
    if opset < 10:
        starts, ends = attrs["starts"], attrs["ends"]
        axes = attrs.get("axes", list(range(len(starts))))
        steps = [1] * len(starts)
    else:
        starts, ends = inputs[1].tolist(), inputs[2].tolist()
        axes = inputs[3].tolist() if len(inputs) > 3 and inputs[3] is not None else None
        steps = inputs[4].tolist() if len(inputs) > 4 and inputs[4] is not None else None
        axes = axes if axes is not None else list(range(len(starts)))
        steps = steps if steps is not None else [1] * len(starts)

    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = axis % x.ndim
        size = x.shape[axis]
        if step > 0:
            index = [slice(None)] * x.ndim
            index[axis] = slice(int(max(-size - 1, min(start, size))), int(min(end, size)), step)
            x = x[tuple(index)]
            continue
        # Negative steps: clamp as the ONNX spec defines, then gather the indices.
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        start = max(0, min(start, size - 1))
        end = max(-1, min(end, size - 1))
        picked = torch.arange(start, end, step, dtype=torch.int64, device=x.device)
        x = x.index_select(axis, picked)
    return x


_ONNX_TO_TORCH_DTYPE = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}


def _op_cast(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    return inputs[0].to(_ONNX_TO_TORCH_DTYPE[attrs["to"]])


def _op_constant_of_shape(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int):
    value = attrs.get("value")
    fill = torch.from_numpy(np.array(value)) if value is not None else torch.zeros(1)
    shape = [int(v) for v in inputs[0].tolist()]
    return fill.reshape(-1)[0].expand(shape).clone()


def _op_expand(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x = inputs[0]
    shape = torch.broadcast_shapes(x.shape, tuple(int(v) for v in inputs[1].tolist()))
    return x.expand(shape)


def _op_tile(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    return inputs[0].repeat(*[int(v) for v in inputs[1].tolist()])


def _op_range(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    start, limit, delta = inputs[0], inputs[1], inputs[2]
    return torch.arange(start.item(), limit.item(), delta.item(), dtype=start.dtype)


def _op_where(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    return torch.where(inputs[0].bool(), inputs[1], inputs[2])


def _op_split(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int, num_outputs: int):
    x = inputs[0]
    axis = attrs.get("axis", 0)
    if "split" in attrs:
        sizes = [int(v) for v in attrs["split"]]
    elif len(inputs) > 1 and inputs[1] is not None:
        sizes = [int(v) for v in inputs[1].tolist()]
    else:
        size = x.shape[axis]
        chunk = -(-size // num_outputs)
        sizes = [min(chunk, size - i * chunk) for i in range(num_outputs)]
    return tuple(torch.split(x, sizes, dim=axis))


def _op_reduce(kind: str) -> Callable[..., Tensor]:
    def op(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
        x = inputs[0]
        axes = _axes_from(inputs, attrs, 1)
        keep = bool(attrs.get("keepdims", 1))
        if axes is None or not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.ndim))
        dims = tuple(a % x.ndim for a in axes)
        if kind == "mean":
            return x.mean(dim=dims, keepdim=keep)
        if kind == "sum":
            return x.sum(dim=dims, keepdim=keep)
        if kind == "max":
            return x.amax(dim=dims, keepdim=keep)
        if kind == "min":
            return x.amin(dim=dims, keepdim=keep)
        if kind == "l2":
            return x.pow(2).sum(dim=dims, keepdim=keep).sqrt()
        return x.prod(dim=dims[0], keepdim=keep) if len(dims) == 1 else _prod_dims(x, dims, keep)

    return op


def _prod_dims(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for dim in sorted(dims, reverse=True):
        x = x.prod(dim=dim, keepdim=keep)
    return x


def _op_pad(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x = inputs[0]
    if opset < 11:
        pads, value = list(attrs["pads"]), attrs.get("value", 0.0)
        axes = list(range(x.ndim))
    else:
        pads = [int(v) for v in inputs[1].tolist()]
        value = inputs[2].item() if len(inputs) > 2 and inputs[2] is not None else 0.0
        has_axes = len(inputs) > 3 and inputs[3] is not None
        axes = [a % x.ndim for a in inputs[3].tolist()] if has_axes else list(range(x.ndim))
    n = len(axes)
    begin, end = [0] * x.ndim, [0] * x.ndim
    for i, axis in enumerate(axes):
        begin[axis], end[axis] = pads[i], pads[n + i]

    pad_list = _torch_pad_list(begin, end)
    while len(pad_list) > 2 and pad_list[-1] == 0 and pad_list[-2] == 0:
        pad_list = pad_list[:-2]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[
        attrs.get("mode", "constant")
    ]
    if mode == "constant":
        return F.pad(x, pad_list, mode="constant", value=value)
    return F.pad(x, pad_list, mode=mode)


def _resize_axis_sources(
    out_len: int, in_len: int, scale: float, transform: str
) -> Tensor:
    """Return, for each output index, its input coordinate (float32, as onnxruntime)."""
    dst = torch.arange(out_len, dtype=torch.float32)
    scale32 = torch.tensor(scale, dtype=torch.float32)
    if transform == "half_pixel":
        return (dst + 0.5) / scale32 - 0.5
    if transform == "pytorch_half_pixel":
        return (dst + 0.5) / scale32 - 0.5 if out_len > 1 else torch.zeros(out_len)
    if transform == "align_corners":
        if out_len == 1:
            return torch.zeros(1)
        return dst * (in_len - 1) / (out_len - 1)
    if transform == "half_pixel_symmetric":
        adjustment = out_len / (scale * in_len)
        offset = in_len / 2 * (1 - adjustment)
        return offset + (dst + 0.5) / scale32 - 0.5
    return dst / scale32


def _nearest_index(source: Tensor, nearest_mode: str, scale: float) -> Tensor:
    if nearest_mode == "round_prefer_floor":
        return torch.ceil(source - 0.5)
    if nearest_mode == "round_prefer_ceil":
        return torch.floor(source + 0.5)
    if nearest_mode == "ceil":
        return torch.ceil(source)
    if nearest_mode == "simple":
        return torch.ceil(source) if scale < 1 else torch.floor(source)
    return torch.floor(source)


def _resize(
    x: Tensor,
    scales: Sequence[float] | None,
    sizes: Sequence[int] | None,
    mode: str,
    transform: str,
    nearest_mode: str,
) -> Tensor:
    """Resize X axis by axis (separable, so exact for nearest and (multi)linear)."""
    for axis in range(x.ndim):
        in_len = x.shape[axis]
        if sizes is not None:
            out_len = int(sizes[axis])
            scale = out_len / in_len
        else:
            scale = float(scales[axis])
            out_len = int(np.float32(in_len) * np.float32(scale))
        if out_len == in_len and scale == 1.0:
            continue

        source = _resize_axis_sources(out_len, in_len, scale, transform).to(x.device)
        view = [1] * x.ndim
        view[axis] = out_len
        if mode == "nearest":
            index = _nearest_index(source, nearest_mode, scale).clamp(0, in_len - 1).long()
            x = x.index_select(axis, index)
            continue
        source = source.clamp(0, in_len - 1)
        low = source.floor().long()
        high = (low + 1).clamp(max=in_len - 1)
        weight = (source - low.to(source.dtype)).to(x.dtype).reshape(view)
        x = x.index_select(axis, low) * (1 - weight) + x.index_select(axis, high) * weight
    return x


def _op_resize(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x = inputs[0]
    mode = attrs.get("mode", "nearest")
    mode = "linear" if mode == "bilinear" else mode
    if opset < 11:
        scales, sizes = inputs[1].tolist(), None
        transform, nearest_mode = "asymmetric", "simple"
    else:
        scales_t = inputs[2] if len(inputs) > 2 else None
        sizes_t = inputs[3] if len(inputs) > 3 else None
        scales = scales_t.tolist() if scales_t is not None and scales_t.numel() else None
        sizes = sizes_t.tolist() if sizes_t is not None and sizes_t.numel() else None
        transform = attrs.get("coordinate_transformation_mode", "half_pixel")
        nearest_mode = attrs.get("nearest_mode", "round_prefer_floor")
    return _resize(x, scales, sizes, mode, transform, nearest_mode)


def _op_upsample(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    mode = attrs.get("mode", "nearest")
    mode = "linear" if mode == "bilinear" else mode
    scales = attrs["scales"] if "scales" in attrs else inputs[1].tolist()
    return _resize(inputs[0], scales, None, mode, "asymmetric", "simple")


def _op_layer_norm(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x, scale = inputs[0], inputs[1]
    offset = inputs[2] if len(inputs) > 2 else None
    axis = attrs.get("axis", -1) % x.ndim
    dims = tuple(range(axis, x.ndim))
    mean = x.mean(dim=dims, keepdim=True)
    var = (x - mean).pow(2).mean(dim=dims, keepdim=True)
    y = (x - mean) / torch.sqrt(var + attrs.get("epsilon", 1e-5)) * scale
    return y + offset if offset is not None else y


def _op_prelu(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    x, slope = inputs[0], inputs[1]
    return torch.where(x < 0, x * slope, x)


def _op_gelu(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    return F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))


def _variadic(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    def op(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
        result = inputs[0]
        for other in inputs[1:]:
            result = fn(result, other)
        return result

    return op


def _unary(fn: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    def op(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
        return fn(inputs[0])

    return op


def _binary(fn: Callable[[Tensor, Tensor], Tensor]) -> Callable[..., Tensor]:
    def op(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
        return fn(inputs[0], inputs[1])

    return op


def _op_mean(inputs: list[Tensor | None], attrs: dict[str, Any], opset: int) -> Tensor:
    return _variadic(torch.add)(inputs, attrs, opset) / len(inputs)


# NOTE: Erf, Gelu, LayerNormalization, PRelu, Elu, Softplus, Range, Where, Expand, Tile,
# ConstantOfShape, Size, the logical ops and the Reduce ops other than ReduceMean are
# not yet checked against onnxruntime by a test.
OPERATORS: dict[str, Callable[..., Any]] = {
    "Abs": _unary(torch.abs),
    "Add": _binary(torch.add),
    "And": _binary(torch.logical_and),
    "AveragePool": _op_averagepool,
    "BatchNormalization": _op_batchnorm,
    "Cast": _op_cast,
    "Ceil": _unary(torch.ceil),
    "Clip": _op_clip,
    "Concat": _op_concat,
    "ConstantOfShape": _op_constant_of_shape,
    "Conv": _op_conv,
    "ConvTranspose": _op_conv_transpose,
    "Div": _op_div,
    "Dropout": _unary(lambda x: x),
    "Elu": lambda i, a, o: F.elu(i[0], alpha=a.get("alpha", 1.0)),
    "Equal": _binary(torch.eq),
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Expand": _op_expand,
    "Flatten": _op_flatten,
    "Floor": _unary(torch.floor),
    "Gather": _op_gather,
    "Gelu": _op_gelu,
    "Gemm": _op_gemm,
    "GlobalAveragePool": _op_global_average_pool,
    "GlobalMaxPool": _op_global_max_pool,
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "HardSigmoid": _op_hard_sigmoid,
    "HardSwish": _unary(lambda x: x * (x / 6 + 0.5).clamp(0.0, 1.0)),
    "Identity": _unary(lambda x: x),
    "LayerNormalization": _op_layer_norm,
    "LeakyRelu": lambda i, a, o: F.leaky_relu(i[0], a.get("alpha", 0.01)),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Log": _unary(torch.log),
    "LogSoftmax": _op_softmax_like(log=True),
    "MatMul": _binary(torch.matmul),
    "Max": _variadic(torch.maximum),
    "MaxPool": _op_maxpool,
    "Mean": _op_mean,
    "Min": _variadic(torch.minimum),
    "Mul": _binary(torch.mul),
    "Neg": _unary(torch.neg),
    "Not": _unary(torch.logical_not),
    "Or": _binary(torch.logical_or),
    "Pad": _op_pad,
    "Pow": _binary(torch.pow),
    "PRelu": _op_prelu,
    "Range": _op_range,
    "Reciprocal": _unary(torch.reciprocal),
    "ReduceL2": _op_reduce("l2"),
    "ReduceMax": _op_reduce("max"),
    "ReduceMean": _op_reduce("mean"),
    "ReduceMin": _op_reduce("min"),
    "ReduceProd": _op_reduce("prod"),
    "ReduceSum": _op_reduce("sum"),
    "Relu": _unary(torch.relu),
    "Reshape": _op_reshape,
    "Resize": _op_resize,
    "Shape": _op_shape,
    "Sigmoid": _unary(torch.sigmoid),
    "Size": _op_size,
    "Slice": _op_slice,
    "Softmax": _op_softmax_like(log=False),
    "Softplus": _unary(F.softplus),
    "Split": _op_split,
    "Sqrt": _unary(torch.sqrt),
    "Squeeze": _op_squeeze,
    "Sub": _binary(torch.sub),
    "Sum": _variadic(torch.add),
    "Tanh": _unary(torch.tanh),
    "Tile": _op_tile,
    "Transpose": _op_transpose,
    "Unsqueeze": _op_unsqueeze,
    "Upsample": _op_upsample,
    "Where": _op_where,
}

#: Operators whose implementation needs the node's number of outputs.
_NEEDS_NUM_OUTPUTS = {"Split"}


def _attribute_problem(op_type: str, attrs: Mapping[str, Any], node: onnx.NodeProto) -> str | None:
    """Return why the converter cannot run this node's attributes, or None."""
    if op_type in ("Resize", "Upsample"):
        mode = attrs.get("mode", "nearest")
        if mode not in ("nearest", "linear", "bilinear"):
            return f"mode={mode!r} (supported: 'nearest', 'linear')"
        transform = attrs.get("coordinate_transformation_mode", "half_pixel")
        if transform == "tf_crop_and_resize":
            return "coordinate_transformation_mode='tf_crop_and_resize'"
        if attrs.get("antialias", 0):
            return "antialias=1"
        if "axes" in attrs:
            return "the axes attribute"
        if attrs.get("keep_aspect_ratio_policy", "stretch") != "stretch":
            return f"keep_aspect_ratio_policy={attrs['keep_aspect_ratio_policy']!r}"
    if op_type == "BatchNormalization" and (attrs.get("training_mode", 0) or len(node.output) > 1):
        return "training mode (only inference BatchNormalization is supported)"
    if op_type in ("MaxPool", "Dropout") and len([o for o in node.output if o]) > 1:
        return "a second output (indices or mask)"
    if op_type == "MaxPool" and attrs.get("storage_order", 0):
        return "storage_order=1"
    if op_type == "Pad" and attrs.get("mode", "constant") not in ("constant", "reflect", "edge"):
        return f"mode={attrs['mode']!r} (supported: 'constant', 'reflect', 'edge')"
    if op_type == "Cast" and attrs.get("to") not in _ONNX_TO_TORCH_DTYPE:
        return f"cast to ONNX type {attrs.get('to')}"
    return None


def _node_attributes(node: onnx.NodeProto) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    for attribute in node.attribute:
        value = onnx.helper.get_attribute_value(attribute)
        if isinstance(value, bytes):
            value = value.decode()
        elif isinstance(value, onnx.TensorProto):
            value = numpy_helper.to_array(value)
        attrs[attribute.name] = value
    return attrs


def find_unsupported_nodes(model: onnx.ModelProto) -> list[str]:
    """Return one line per node the converter cannot run: op type, node name, reason.

    An empty list means ``convert`` accepts the model's operators.
    """
    problems = []
    for index, node in enumerate(model.graph.node):
        label = f"{node.op_type} (node {node.name or f'#{index}'!r})"
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{label}: operator domain {node.domain!r} is not supported")
        elif node.op_type == "Constant":
            continue
        elif node.op_type not in OPERATORS:
            problems.append(f"{label}: operator type not supported")
        else:
            reason = _attribute_problem(node.op_type, _node_attributes(node), node)
            if reason:
                problems.append(f"{label}: {reason} not supported")
    return problems


def _topological_order(graph: onnx.GraphProto, available: set[str]) -> list[int]:
    """Return node indices in an order where each node runs after its producers."""
    producers = {out: i for i, node in enumerate(graph.node) for out in node.output if out}
    order: list[int] = []
    state: dict[int, int] = {}

    for root in range(len(graph.node)):
        stack = [(root, False)]
        while stack:
            index, expanded = stack.pop()
            if expanded:
                if state.get(index) != 2:
                    state[index] = 2
                    order.append(index)
                continue
            if state.get(index) == 2:
                continue
            if state.get(index) == 1:
                raise ConversionError(f"graph has a cycle through node {graph.node[index].name!r}")
            state[index] = 1
            stack.append((index, True))
            for name in graph.node[index].input:
                if not name or name in available:
                    continue
                if name not in producers:
                    raise ConversionError(
                        f"node {graph.node[index].name!r} reads tensor {name!r}, which no node, "
                        "initializer or graph input provides"
                    )
                if state.get(producers[name]) != 2:
                    stack.append((producers[name], False))
    return order


def _safe_attribute(prefix: str, index: int, onnx_name: str) -> str:
    cleaned = "".join(c if c.isalnum() else "_" for c in onnx_name)[:60]
    return f"{prefix}{index}_{cleaned}"


def _quantizable(
    index: int, node: onnx.NodeProto, attrs: Mapping[str, Any], weights: Mapping[str, np.ndarray]
) -> QuantizableNode | None:
    """Return the QuantizableNode of NODE when its weight is a float initializer."""
    if node.op_type not in QUANTIZABLE_OP_TYPES or len(node.input) < 2:
        return None
    weight = weights.get(node.input[1])
    if weight is None or not np.issubdtype(weight.dtype, np.floating):
        return None
    if node.op_type == "MatMul" and weight.ndim != 2:
        return None

    if node.op_type == "Conv":
        channel_axis = 0
    elif node.op_type == "ConvTranspose":
        channel_axis = 1
    elif node.op_type == "Gemm":
        channel_axis = 0 if attrs.get("transB", 0) else 1
    else:
        channel_axis = 1
    bias = node.input[2] if len(node.input) > 2 and node.input[2] in weights else None
    if node.op_type == "MatMul":
        bias = None
    return QuantizableNode(
        name=node.name or f"{node.op_type}_{index}",
        op_type=node.op_type,
        weight_name=node.input[1],
        bias_name=bias,
        input_name=node.input[0],
        output_name=node.output[0],
        weight_shape=tuple(int(d) for d in weight.shape),
        channel_axis=channel_axis,
        group=int(attrs.get("group", 1)),
        node_index=index,
    )


class OnnxGraphModule(torch.nn.Module):
    """A torch module that runs an ONNX graph node by node with torch operators.

    Weights of quantizable nodes are ``torch.nn.Parameter`` objects (in
    ``weight_parameters``, keyed by ONNX initializer name); other initializers are
    buffers. BatchNormalization always uses its stored statistics.

    Attributes:
        model: the ONNX model the module runs (Constant nodes moved into initializers);
            ``QuantizableNode.node_index`` indexes its ``graph.node``.
        input_names: graph inputs, in the order ``forward`` takes them.
        output_names: graph outputs, in the order ``forward`` returns them.
        weight_parameters: ONNX initializer name -> parameter, for quantizable nodes.
        quantizable_nodes: the Conv, ConvTranspose, Gemm and MatMul nodes with an
            initializer weight, in graph order.
    """

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        self.model = model
        self.opset = opset_version(model)
        graph = model.graph

        arrays = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in arrays]
        self.output_names = [o.name for o in graph.output]

        # Parameters for quantizable weights; buffers for everything else.
        node_attrs = [_node_attributes(node) for node in graph.node]
        self.quantizable_nodes: list[QuantizableNode] = []
        for index, node in enumerate(graph.node):
            entry = _quantizable(index, node, node_attrs[index], arrays)
            if entry is not None:
                self.quantizable_nodes.append(entry)
        weight_names = {entry.weight_name for entry in self.quantizable_nodes}

        self.weight_parameters: dict[str, torch.nn.Parameter] = {}
        self._initializer_attr: dict[str, str] = {}
        for i, (name, array) in enumerate(arrays.items()):
            tensor = torch.from_numpy(np.array(array, copy=True))
            if name in weight_names:
                attr = _safe_attribute("w", i, name)
                parameter = torch.nn.Parameter(tensor)
                self.register_parameter(attr, parameter)
                self.weight_parameters[name] = parameter
            else:
                attr = _safe_attribute("c", i, name)
                self.register_buffer(attr, tensor)
            self._initializer_attr[name] = attr

        # Nodes in topological order, with the step after which each tensor is dead.
        available = set(arrays) | set(self.input_names)
        self._nodes: list[_Node] = []
        for index in _topological_order(graph, available):
            node = graph.node[index]
            fn = OPERATORS[node.op_type]
            self._nodes.append(
                _Node(
                    index=index,
                    name=node.name or f"{node.op_type}_{index}",
                    op_type=node.op_type,
                    inputs=tuple(node.input),
                    outputs=tuple(node.output),
                    attrs=node_attrs[index],
                    fn=fn,
                )
            )
        self._last_use: dict[str, int] = {}
        for step, entry in enumerate(self._nodes):
            for name in entry.inputs:
                if name and name not in self._initializer_attr:
                    self._last_use[name] = step
        self.tensor_names: tuple[str, ...] = tuple(
            self.input_names + [out for entry in self._nodes for out in entry.outputs if out]
        )
        self._activation_transforms: dict[str, ActivationTransform] = {}

    # -- configuration -----------------------------------------------------------------

    def set_activation_transform(
        self, transforms: Mapping[str, ActivationTransform] | None
    ) -> None:
        """Apply a function to named tensors as they are computed (e.g. fake quantization).

        Args:
            transforms: tensor name (a graph input or a node output) -> function taking
                and returning a tensor. It replaces the previous mapping; None or an
                empty mapping removes all transforms.

        Raises:
            ConversionError: a name is not a tensor of the graph.
        """
        transforms = dict(transforms or {})
        self._check_tensor_names(transforms, "set_activation_transform")
        self._activation_transforms = transforms

    @property
    def activation_transforms(self) -> dict[str, ActivationTransform]:
        """The current tensor name -> transform mapping (a copy)."""
        return dict(self._activation_transforms)

    def initializer(self, name: str) -> Tensor:
        """Return the tensor (parameter or buffer) of the ONNX initializer NAME."""
        if name not in self._initializer_attr:
            raise ConversionError(f"{name!r} is not an initializer of the model")
        return getattr(self, self._initializer_attr[name])

    # -- execution -----------------------------------------------------------------------

    def forward(self, *args: Tensor, **kwargs: Tensor) -> Tensor | tuple[Tensor, ...]:
        """Run the graph; inputs by position (graph order) or by name.

        Returns the single output tensor, or a tuple in graph output order.
        """
        feeds = dict(zip(self.input_names, args, strict=False))
        feeds.update(kwargs)
        result = self.run(feeds)
        outputs = tuple(result[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs

    def run(
        self,
        feeds: Mapping[str, Tensor | np.ndarray],
        capture: Iterable[str] = (),
    ) -> dict[str, Tensor]:
        """Run the graph and return its outputs plus the CAPTURE tensors, by name.

        Use it to read intermediate activations, e.g. for range calibration (under
        ``torch.no_grad()``). Tensors that no later node needs are freed as the graph
        runs, so memory stays near that of the live activations.

        Args:
            feeds: graph input name -> tensor or array.
            capture: names of intermediate tensors to return as well.

        Raises:
            ConversionError: a feed is missing or unknown, or a capture name is not a
                tensor of the graph.
        """
        capture = list(capture)
        self._check_tensor_names(capture, "capture")
        missing = [name for name in self.input_names if name not in feeds]
        unknown = [name for name in feeds if name not in self.input_names]
        if missing or unknown:
            raise ConversionError(
                f"graph inputs are {self.input_names}; missing {missing}, unknown {unknown}"
            )

        keep = set(capture) | set(self.output_names)
        values: dict[str, Tensor] = {}
        for name in self.input_names:
            value = feeds[name]
            tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
            values[name] = self._transform(name, tensor)

        for step, entry in enumerate(self._nodes):
            inputs = [self._lookup(name, values) if name else None for name in entry.inputs]
            if entry.op_type in _NEEDS_NUM_OUTPUTS:
                result = entry.fn(inputs, entry.attrs, self.opset, len(entry.outputs))
            else:
                result = entry.fn(inputs, entry.attrs, self.opset)
            results = result if isinstance(result, tuple) else (result,)
            for name, tensor in zip(entry.outputs, results, strict=False):
                if name:
                    values[name] = self._transform(name, tensor)

            for name in entry.inputs:
                if name and self._last_use.get(name) == step and name not in keep:
                    values.pop(name, None)

        return {name: values[name] for name in [*self.output_names, *capture]}

    def _lookup(self, name: str, values: Mapping[str, Tensor]) -> Tensor:
        if name in values:
            return values[name]
        return getattr(self, self._initializer_attr[name])

    def _transform(self, name: str, tensor: Tensor) -> Tensor:
        transform = self._activation_transforms.get(name)
        return transform(tensor) if transform is not None else tensor

    def _check_tensor_names(self, names: Iterable[str], what: str) -> None:
        known = set(self.tensor_names)
        unknown = sorted(name for name in names if name not in known)
        if unknown:
            raise ConversionError(
                f"{what}: {unknown} are not tensors of the graph; use names from "
                "module.tensor_names (graph inputs and node outputs)"
            )


def convert(model: onnx.ModelProto | str | Path) -> OnnxGraphModule:
    """Convert an ONNX model into an ``OnnxGraphModule``.

    Constant nodes are moved into initializers first. Fold BatchNormalization
    beforehand with ``fold_batchnorm`` when the analysed weights should be the folded
    ones.

    Args:
        model: a ModelProto or the path of an .onnx file.

    Raises:
        UnsupportedOperatorError: the graph contains operators or attributes the converter
            does not support; the message lists every such node at once.
        ConversionError: the graph reads a tensor nothing provides, or has a cycle.
    """
    model = constants_to_initializers(load_onnx_model(model))
    problems = find_unsupported_nodes(model)
    if problems:
        raise UnsupportedOperatorError(
            f"{len(problems)} node(s) cannot be converted to torch:\n  "
            + "\n  ".join(problems)
            + f"\nSupported operators: {', '.join(sorted(OPERATORS))}"
        )
    return OnnxGraphModule(model)
