"""ONNX side of the tool: BatchNorm folding, layer discovery, calibration and the QDQ writer.

The written model is a standard ONNX QDQ model for onnxruntime's CPU provider:

Layers are the converter's quantizable nodes (onnx_to_torch), so the analysed
and the exported weights are the same tensors.

- Weights: integer initializers with a per-channel DequantizeLinear (``axis``),
  symmetric, zero point 0. 5- to 8-bit weights are int8; 3- and 4-bit weights are
  int4, packed two to a byte (opset 21). 2-bit weights are also stored as int4, with values
  restricted to {-1, 0, 1}: the smallest integer type onnxruntime's CPU provider
  dequantizes at opset 21 is int4, so a 2-bit layer takes half a byte per weight
  on disk although its information is 2 bits.
- Activations: uint8 QuantizeLinear -> DequantizeLinear pairs on the inputs and
  outputs of the quantized layers, one pair per consumer so each Q has a single
  consumer (onnxruntime's x86 fusion needs it). A ReLU right after a quantized
  layer is removed and its output range (zero point 0) clamps instead, exactly as
  the ReLU did; pass-through ops (MaxPool, Flatten, Reshape, ...) reuse their
  input's parameters so onnxruntime can drop their QDQ pairs.
- Biases: int32 with scale s_x * s_w per channel when the layer input is
  quantized, so onnxruntime fuses 8-bit layers into QLinearConv / QGemm.
- Graph outputs stay float.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .fake_quant import (
    ActivationQParams,
    RangeMethod,
    RangeObserver,
    WeightClipping,
    quantize_weight_np,
)
from .onnx_to_torch import QuantizableNode

LOGGER = logging.getLogger(__name__)

# Ops whose output values are a subset (or rearrangement) of their input values,
# so the input's quantization grid also fits the output.
PASS_THROUGH_OPS = ("MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze")
MIN_OPSET = 13  # per-channel DequantizeLinear (axis)
INT4_OPSET = 21  # int4 tensors in the standard domain


class ExportError(ValueError):
    """The model cannot be written as a QDQ model."""


@dataclass(frozen=True)
class OnnxLayer:
    """A quantizable node of an ONNX graph.

    Attributes:
        node_name: The node's name (made unique when missing).
        op_type: Conv, ConvTranspose, Gemm or MatMul.
        weight: Name of the weight initializer.
        channel_axis: Output-channel axis of the weight as stored in ONNX.
        input: Name of the activation input tensor.
        output: Name of the tensor to quantize after the layer: the output of a
            single following ReLU when there is one, else the node output.
        relu: Name of that ReLU node, or None.
        bias: Name of the bias initializer, or None.
        num_params: Number of weight entries.
    """

    node_name: str
    op_type: str
    weight: str
    channel_axis: int
    input: str
    output: str
    relu: str | None
    bias: str | None
    num_params: int


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in model.graph.initializer}


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    result: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in node.input:
            result.setdefault(name, []).append(node)
    return result


def ensure_node_names(model: onnx.ModelProto) -> None:
    """Give every unnamed node a unique name (in place), so layers can be named."""
    seen = {n.name for n in model.graph.node if n.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in seen:
                name += "_"
            node.name = name
            seen.add(name)


def default_opset(model: onnx.ModelProto) -> int:
    """Return the model's opset of the default ONNX domain."""
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx"):
            return int(opset.version)
    raise ExportError("the model imports no default-domain opset; is it an ONNX model?")


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    used = {name for node in model.graph.node for name in node.input}
    used |= {o.name for o in model.graph.output}
    keep = [init for init in model.graph.initializer if init.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


def _attribute(node: onnx.NodeProto, name: str, default):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def find_layers(model: onnx.ModelProto, nodes: Sequence[QuantizableNode]) -> list[OnnxLayer]:
    """Return the export view of the converter's quantizable nodes, in the same order.

    Adds what the export needs on top of the converter's description: the ReLU that
    follows a layer (absorbed into the output quantization) and whether the bias can
    be stored as int32.
    """
    consumers = _consumers(model)
    outputs = {o.name for o in model.graph.output}
    layers = []

    for entry in nodes:
        node = model.graph.node[entry.node_index]
        bias = entry.bias_name
        if node.op_type == "Gemm" and (
            _attribute(node, "alpha", 1.0) != 1.0 or _attribute(node, "beta", 1.0) != 1.0
        ):
            bias = None  # a scaled bias cannot share the s_x * s_w grid

        output, relu = entry.output_name, None
        following = consumers.get(entry.output_name, [])
        if (
            len(following) == 1
            and following[0].op_type == "Relu"
            and entry.output_name not in outputs
            and following[0].output[0] not in outputs
        ):
            relu = following[0].name
            output = following[0].output[0]

        layers.append(
            OnnxLayer(
                node_name=node.name,
                op_type=entry.op_type,
                weight=entry.weight_name,
                channel_axis=entry.channel_axis,
                input=entry.input_name,
                output=output,
                relu=relu,
                bias=bias,
                num_params=entry.num_weights,
            )
        )
    return layers


def activation_tensors(model: onnx.ModelProto, layers: Sequence[OnnxLayer]) -> list[str]:
    """Return the activation tensors that get calibrated ranges: layer inputs and outputs.

    Graph outputs are left out: they stay float.
    """
    outputs = {o.name for o in model.graph.output}
    names = []
    for layer in layers:
        for name in (layer.input, layer.output):
            if name not in outputs and name not in names:
                names.append(name)
    return names


def propagate_pass_through(
    model: onnx.ModelProto, qparams: Mapping[str, ActivationQParams]
) -> dict[str, ActivationQParams]:
    """Give the outputs of pass-through ops their input's parameters (graph order)."""
    result = dict(qparams)
    outputs = {o.name for o in model.graph.output}
    for node in model.graph.node:
        if node.op_type in PASS_THROUGH_OPS and node.input and node.input[0] in result:
            out = node.output[0]
            if out not in outputs:
                result[out] = result[node.input[0]]
    return result


@dataclass(frozen=True)
class CalibrationResult:
    """Activation ranges and per-sample output shapes of the layers."""

    qparams: dict[str, ActivationQParams]
    output_shapes: dict[str, tuple[int, ...]]


def calibrate(
    model: onnx.ModelProto,
    tensor_names: Sequence[str],
    batches: Iterable[Mapping[str, np.ndarray]],
    method: RangeMethod | str = RangeMethod.MINMAX,
    percentile: float = 99.99,
) -> CalibrationResult:
    """Run the float model in onnxruntime and observe the named tensors' ranges.

    Args:
        model: Float ONNX model (BatchNorm folded).
        tensor_names: Tensors to observe.
        batches: Input feeds, one dict per batch (input name -> array, batch first).
        method: minmax or percentile.
        percentile: Upper percentile for the percentile method.

    Raises:
        ValueError: when no batch is given or a tensor never gets data.
    """
    import onnxruntime as ort

    probe = onnx.ModelProto.FromString(model.SerializeToString())
    existing = {o.name for o in probe.graph.output}
    for name in tensor_names:
        if name not in existing:
            probe.graph.output.append(helper.make_empty_tensor_value_info(name))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    fetch = list(tensor_names)
    observers = {name: RangeObserver(method, percentile) for name in fetch}
    shapes: dict[str, tuple[int, ...]] = {}

    count = 0
    for feed in batches:
        values = session.run(fetch, dict(feed))
        for name, value in zip(fetch, values, strict=True):
            observers[name].update(value)
            shapes[name] = tuple(int(d) for d in np.shape(value)[1:])
        count += 1
    if count == 0:
        raise ValueError("no calibration batch was given")

    return CalibrationResult(
        qparams={name: obs.qparams() for name, obs in observers.items()}, output_shapes=shapes
    )


def layer_macs(layer: OnnxLayer, output_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one layer for one sample, from its per-sample output shape."""
    if layer.op_type == "Conv":
        positions = int(np.prod(output_shape[1:])) if len(output_shape) > 1 else 1
    else:
        positions = int(np.prod(output_shape[:-1])) if len(output_shape) > 1 else 1
    return layer.num_params * positions


def _int4_tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    """Return an INT4 initializer packed two values per byte, first value in the low nibble."""
    flat = values.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, dtype=np.int8)])
    nibbles = (flat.view(np.uint8) & 0x0F).reshape(-1, 2)
    packed = (nibbles[:, 0] | (nibbles[:, 1] << 4)).astype(np.uint8)
    return helper.make_tensor(name, TensorProto.INT4, values.shape, packed.tobytes(), raw=True)


@dataclass(frozen=True)
class ExportResult:
    """A written QDQ model file and its sizes.

    Attributes:
        path: The QDQ model file.
        file_bytes: Its size on disk.
        opset: Its default-domain opset.
        weight_storage_bytes: Bytes of the integer weight initializers as stored.
    """

    path: Path
    file_bytes: int
    opset: int
    weight_storage_bytes: int


def build_qdq_model(
    model: onnx.ModelProto,
    layers: Sequence[OnnxLayer],
    bits: Sequence[int],
    qparams: Mapping[str, ActivationQParams],
    weight_clipping: WeightClipping | str = WeightClipping.MAX_ABS,
    block_size: int | None = None,
) -> onnx.ModelProto:
    """Return the QDQ model: quantized weights, int32 biases and activation QDQ pairs.

    Args:
        model: Float model with BatchNorm folded and named nodes.
        layers: Its quantizable layers (from :func:`find_layers`).
        bits: Weight bits per layer, each 2..8.
        qparams: uint8 parameters per activation tensor, pass-through outputs included;
            a tensor without an entry stays float.
        weight_clipping: How the weight scales are chosen (as in the analysis).
        block_size: Input channels per weight scale below 8 bits, where it divides
            their count (DequantizeLinear blocked quantization); None: per channel.

    Raises:
        ExportError: when the opset cannot be upgraded or a weight is shared.
        ValueError: when bits and layers differ in length.
    """
    if len(bits) != len(layers):
        raise ValueError(f"{len(bits)} bit widths for {len(layers)} layers")

    # Opset: per-channel DQ needs 13, int4 storage needs 21.
    target = max(default_opset(model), MIN_OPSET, INT4_OPSET if min(bits) < 8 else MIN_OPSET)
    if default_opset(model) < target:
        try:
            model = onnx.version_converter.convert_version(model, target)
        except Exception as error:
            raise ExportError(
                f"cannot upgrade the model from opset {default_opset(model)} to {target}: {error}; "
                f"re-export the float model at opset >= {target}"
            ) from error
    else:
        model = onnx.ModelProto.FromString(model.SerializeToString())
    ensure_node_names(model)

    graph = model.graph
    inits = _initializers(model)
    by_name = {n.name: n for n in graph.node}
    weight_users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            weight_users[name] = weight_users.get(name, 0) + 1
    new_inits: list[onnx.TensorProto] = []
    pre_nodes: dict[str, list[onnx.NodeProto]] = {}
    dropped_relus = set()

    # Weights and biases.
    for layer, b in zip(layers, bits, strict=True):
        if weight_users.get(layer.weight, 0) != 1:
            raise ExportError(
                f"weight {layer.weight} is shared by several nodes; cannot quantize it per layer"
            )
        node = by_name[layer.node_name]
        w = numpy_helper.to_array(inits[layer.weight]).astype(np.float32)
        wq = quantize_weight_np(w, b, layer.channel_axis, weight_clipping, block_size)
        q_name = f"{layer.weight}_quantized"
        # int4 stores -7..7, the narrow range of 4 bits and fewer, so wider grids need int8.
        if b > 4:
            q_init = numpy_helper.from_array(wq.q.astype(np.int8), q_name)
            zp_init = numpy_helper.from_array(np.zeros(wq.scale.shape, np.int8), f"{layer.weight}_zero_point")
        else:
            # NOTE: onnxruntime runs 4-bit layers as DequantizeLinear -> float op and dequantizes
            # the weights on every run, so at batch size 1 they are slower than FP32.
            q_init = _int4_tensor(q_name, wq.q)
            zp_init = _int4_tensor(f"{layer.weight}_zero_point", np.zeros(wq.scale.shape, np.int8))
        new_inits += [q_init, zp_init, numpy_helper.from_array(wq.scale, f"{layer.weight}_scale")]
        block_attributes = {} if wq.block_size is None else {"block_size": wq.block_size}
        dq = helper.make_node(
            "DequantizeLinear",
            [q_name, f"{layer.weight}_scale", f"{layer.weight}_zero_point"],
            [f"{layer.weight}_dequantized"],
            name=f"{layer.weight}_DequantizeLinear",
            axis=wq.axis,
            **block_attributes,
        )
        pre_nodes.setdefault(node.name, []).append(dq)
        node.input[1] = dq.output[0]

        # An int32 bias needs one weight scale per output channel, so blocked layers keep
        # a float bias.
        x_params = qparams.get(layer.input)
        if (
            layer.bias is not None
            and x_params is not None
            and wq.block_size is None
            and weight_users.get(layer.bias, 0) == 1
        ):
            bias = numpy_helper.to_array(inits[layer.bias]).astype(np.float64)
            bias_scale = (x_params.scale * wq.scale.astype(np.float64)).astype(np.float32)
            limit = np.iinfo(np.int32)
            bias_q = np.clip(np.round(bias / bias_scale), limit.min, limit.max).astype(np.int32)
            new_inits += [
                numpy_helper.from_array(bias_q, f"{layer.bias}_quantized"),
                numpy_helper.from_array(bias_scale, f"{layer.bias}_scale"),
                numpy_helper.from_array(np.zeros(len(bias_q), np.int32), f"{layer.bias}_zero_point"),
            ]
            bdq = helper.make_node(
                "DequantizeLinear",
                [f"{layer.bias}_quantized", f"{layer.bias}_scale", f"{layer.bias}_zero_point"],
                [f"{layer.bias}_dequantized"],
                name=f"{layer.bias}_DequantizeLinear",
                axis=0,
            )
            pre_nodes[node.name].append(bdq)
            node.input[2] = bdq.output[0]

        # The uint8 output with zero point 0 clamps at 0 exactly like the ReLU.
        if layer.relu is not None and layer.output in qparams and qparams[layer.output].zero_point == 0:
            relu = by_name[layer.relu]
            node.output[0] = relu.output[0]
            dropped_relus.add(relu.name)

    # Activation QDQ pairs, one pair per consumer.
    counter = 0
    for node in graph.node:
        if node.name in dropped_relus:
            continue
        for index, name in enumerate(node.input):
            params = qparams.get(name)
            if params is None:
                continue
            s_name, z_name = f"{name}_scale", f"{name}_zero_point"
            if s_name not in {i.name for i in new_inits}:
                new_inits += [
                    numpy_helper.from_array(np.array(params.scale, np.float32), s_name),
                    numpy_helper.from_array(np.array(params.zero_point, np.uint8), z_name),
                ]
            counter += 1
            q = helper.make_node(
                "QuantizeLinear",
                [name, s_name, z_name],
                [f"{name}_q{counter}"],
                name=f"{name}_QuantizeLinear_{counter}",
            )
            dq = helper.make_node(
                "DequantizeLinear",
                [q.output[0], s_name, z_name],
                [f"{name}_dq{counter}"],
                name=f"{name}_DequantizeLinear_{counter}",
            )
            pre_nodes.setdefault(node.name, []).extend([q, dq])
            node.input[index] = dq.output[0]

    nodes = []
    for node in graph.node:
        if node.name in dropped_relus:
            continue
        nodes.extend(pre_nodes.get(node.name, []))
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)
    _drop_unused_initializers(model)
    # Shapes recorded for the float graph may be stale; onnxruntime re-infers them.
    del graph.value_info[:]
    return model


def write_qdq_model(model: onnx.ModelProto, path: Path) -> ExportResult:
    """Check and save a QDQ model, then load it in onnxruntime to make sure it runs.

    Raises:
        ExportError: when the model fails the ONNX checker or onnxruntime refuses it.
        OSError: when the file cannot be written.
    """
    import onnxruntime as ort

    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as error:
        raise ExportError(f"the QDQ model fails the ONNX checker: {error}") from error
    data = model.SerializeToString()
    path = Path(path)
    path.write_bytes(data)
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as error:
        raise ExportError(f"onnxruntime cannot load the written model {path}: {error}") from error

    storage = 0
    for init in model.graph.initializer:
        if init.name.endswith("_quantized") and init.data_type in (TensorProto.INT8, TensorProto.INT4):
            storage += len(init.raw_data) if init.raw_data else init.ByteSize()
    return ExportResult(
        path=path, file_bytes=len(data), opset=default_opset(model), weight_storage_bytes=storage
    )
