"""Tests of the ONNX -> torch converter against onnxruntime as the reference."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quantized_inference_node.hawq.onnx_to_torch import (
    ConversionError,
    UnsupportedOperatorError,
    constants_to_initializers,
    convert,
    find_unsupported_nodes,
    fold_batchnorm,
)

# float32 kernels of torch and onnxruntime sum in different orders.
RTOL = 1e-4
ATOL = 1e-5


def run_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return session.run(None, feeds)


def run_torch(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    module = convert(model)
    with torch.no_grad():
        result = module.run(feeds)
    return [result[name].numpy() for name in module.output_names]


def single_node_model(
    op_type: str,
    inputs: dict[str, np.ndarray],
    initializers: dict[str, np.ndarray],
    output_count: int = 1,
    opset: int = 13,
    input_order: list[str] | None = None,
    **attrs,
) -> onnx.ModelProto:
    """Build a one-node graph whose INPUTS are graph inputs and INITIALIZERS constants."""
    names = input_order or [*inputs, *initializers]
    outputs = [f"y{i}" for i in range(output_count)]
    node = helper.make_node(op_type, names, outputs, name=f"{op_type.lower()}_node", **attrs)
    graph = helper.make_graph(
        [node],
        "g",
        [
            helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(value.dtype), value.shape
            )
            for name, value in inputs.items()
        ],
        [helper.make_empty_tensor_value_info(name) for name in outputs],
        [numpy_helper.from_array(value, name) for name, value in initializers.items() if name],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def assert_matches_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    expected = run_onnxruntime(model, feeds)
    got = run_torch(model, feeds)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape
        np.testing.assert_allclose(g, e, rtol=RTOL, atol=ATOL)


def random(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# -- single operators --------------------------------------------------------------


@pytest.mark.parametrize(
    "attrs",
    [
        {"pads": [1, 1, 1, 1], "strides": [2, 2]},
        {"pads": [0, 1, 2, 0], "dilations": [2, 1]},
        {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
        {"auto_pad": "SAME_LOWER", "strides": [2, 2]},
        {"auto_pad": "VALID"},
        {"group": 2, "pads": [1, 1, 1, 1]},
    ],
)
def test_conv_matches_onnxruntime(attrs: dict) -> None:
    group = attrs.get("group", 1)
    model = single_node_model(
        "Conv",
        {"x": random((2, 4, 9, 8))},
        {"w": random((6, 4 // group, 3, 3), 1), "b": random((6,), 2)},
        **attrs,
    )
    assert_matches_onnxruntime(model, {"x": random((2, 4, 9, 8))})


@pytest.mark.parametrize(
    "attrs",
    [
        {"strides": [2, 2]},
        {"strides": [2, 2], "pads": [1, 0, 0, 1], "output_padding": [1, 1]},
        {"strides": [2, 2], "dilations": [2, 1], "group": 2},
        {"strides": [2, 2], "output_shape": [11, 13]},
    ],
)
def test_conv_transpose_matches_onnxruntime(attrs: dict) -> None:
    group = attrs.get("group", 1)
    model = single_node_model(
        "ConvTranspose",
        {"x": random((1, 4, 5, 6))},
        {"w": random((4, 6 // group, 3, 3), 1), "b": random((6,), 2)},
        **attrs,
    )
    assert_matches_onnxruntime(model, {"x": random((1, 4, 5, 6))})


@pytest.mark.parametrize(
    ("mode", "transform", "nearest_mode"),
    [
        ("nearest", "asymmetric", "floor"),
        ("nearest", "half_pixel", "round_prefer_floor"),
        ("nearest", "align_corners", "round_prefer_ceil"),
        ("linear", "half_pixel", "round_prefer_floor"),
        ("linear", "align_corners", "round_prefer_floor"),
        ("linear", "asymmetric", "round_prefer_floor"),
        ("linear", "pytorch_half_pixel", "round_prefer_floor"),
    ],
)
@pytest.mark.parametrize("by", ["scales", "sizes"])
def test_resize_matches_onnxruntime(mode: str, transform: str, nearest_mode: str, by: str) -> None:
    x = random((1, 2, 5, 7))
    scales = np.array([1, 1, 2.0, 0.6], np.float32)
    sizes = np.array([1, 2, 9, 4], np.int64)
    initializers = {"roi": np.zeros(0, np.float32)}
    if by == "scales":
        initializers["scales"] = scales
    else:
        initializers["scales"] = np.zeros(0, np.float32)
        initializers["sizes"] = sizes
    model = single_node_model(
        "Resize",
        {"x": x},
        initializers,
        mode=mode,
        coordinate_transformation_mode=transform,
        nearest_mode=nearest_mode,
    )
    assert_matches_onnxruntime(model, {"x": x})


@pytest.mark.parametrize(
    ("op_type", "attrs"),
    [
        ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
        ("MaxPool", {"kernel_shape": [2, 2], "pads": [0, 0, 1, 1], "ceil_mode": 1}),
        ("MaxPool", {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}),
        ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}),
        ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "count_include_pad": 1}),
        ("AveragePool", {"kernel_shape": [2, 3], "pads": [0, 1, 1, 0], "strides": [2, 1]}),
        ("GlobalAveragePool", {}),
        ("GlobalMaxPool", {}),
    ],
)
def test_pooling_matches_onnxruntime(op_type: str, attrs: dict) -> None:
    x = random((2, 3, 7, 8))
    assert_matches_onnxruntime(single_node_model(op_type, {"x": x}, {}, **attrs), {"x": x})


@pytest.mark.parametrize(
    ("op_type", "attrs", "opset"),
    [
        ("Relu", {}, 13),
        ("Sigmoid", {}, 13),
        ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, 13),
        ("HardSwish", {}, 14),
        ("LeakyRelu", {"alpha": 0.1}, 13),
        ("Softmax", {"axis": 1}, 11),
        ("Softmax", {"axis": 1}, 13),
        ("LogSoftmax", {}, 13),
        ("Flatten", {"axis": 2}, 13),
        ("Transpose", {"perm": [0, 2, 3, 1]}, 13),
        ("ReduceMean", {"axes": [2, 3], "keepdims": 1}, 13),
        ("Clip", {"min": -0.5, "max": 0.7}, 6),
        ("Tanh", {}, 13),
        ("Identity", {}, 13),
    ],
)
def test_unary_operators_match_onnxruntime(op_type: str, attrs: dict, opset: int) -> None:
    x = random((2, 3, 4, 5))
    model = single_node_model(op_type, {"x": x}, {}, opset=opset, **attrs)
    assert_matches_onnxruntime(model, {"x": x})


def test_clip_with_input_bounds_and_omitted_min() -> None:
    x = random((2, 3, 4))
    model = single_node_model(
        "Clip", {"x": x}, {"hi": np.array(0.3, np.float32)}, input_order=["x", "", "hi"]
    )
    assert_matches_onnxruntime(model, {"x": x})


@pytest.mark.parametrize("op_type", ["Add", "Sub", "Mul", "Div", "Pow", "MatMul"])
def test_binary_operators_match_onnxruntime(op_type: str) -> None:
    a = np.abs(random((2, 3, 4))) + 0.5
    b = random((4, 4), 1) if op_type == "MatMul" else np.abs(random((3, 1), 1)) + 0.5
    model = single_node_model(op_type, {"a": a, "b": b}, {})
    assert_matches_onnxruntime(model, {"a": a, "b": b})


@pytest.mark.parametrize(("trans_b", "alpha", "beta"), [(0, 1.0, 1.0), (1, 0.5, 2.0)])
def test_gemm_matches_onnxruntime(trans_b: int, alpha: float, beta: float) -> None:
    a = random((3, 5))
    w = random((4, 5) if trans_b else (5, 4), 1)
    model = single_node_model(
        "Gemm", {"a": a}, {"w": w, "c": random((4,), 2)}, transB=trans_b, alpha=alpha, beta=beta
    )
    assert_matches_onnxruntime(model, {"a": a})


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge"])
def test_pad_matches_onnxruntime(mode: str) -> None:
    x = random((1, 2, 4, 5))
    pads = np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)
    initializers = {"pads": pads, "value": np.array(0.25, np.float32)}
    model = single_node_model("Pad", {"x": x}, initializers, mode=mode)
    assert_matches_onnxruntime(model, {"x": x})


@pytest.mark.parametrize(
    ("starts", "ends", "axes", "steps"),
    [
        ([1, 0], [3, 100], [1, 3], [1, 2]),
        ([-1], [-100], [2], [-1]),
        ([4, -2], [0, -5], [3, 1], [-2, -1]),
    ],
)
def test_slice_matches_onnxruntime(starts, ends, axes, steps) -> None:
    x = random((2, 3, 4, 5))
    initializers = {
        "starts": np.array(starts, np.int64),
        "ends": np.array(ends, np.int64),
        "axes": np.array(axes, np.int64),
        "steps": np.array(steps, np.int64),
    }
    assert_matches_onnxruntime(single_node_model("Slice", {"x": x}, initializers), {"x": x})


def test_shape_computation_chain_matches_onnxruntime() -> None:
    # x -> Shape -> Gather(0) -> Unsqueeze -> Concat([n, -1]) -> Reshape(x); Cast; Split.
    x = random((2, 3, 4))
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["flat"]),
        helper.make_node("Cast", ["shape"], ["shape_f"], to=TensorProto.FLOAT),
        helper.make_node("Split", ["flat", "split"], ["s0", "s1"], axis=1),
        helper.make_node("Squeeze", ["n1", "axes0"], ["n_again"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "axes0"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
        numpy_helper.from_array(np.array([5, 7], np.int64), "split"),
    ]
    outputs = ["s0", "s1", "shape_f", "n_again"]
    graph = helper.make_graph(
        nodes,
        "shapes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_empty_tensor_value_info(name) for name in outputs],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    assert_matches_onnxruntime(model, {"x": x})


def test_batchnorm_matches_onnxruntime() -> None:
    x = random((2, 3, 4, 4))
    params = {
        "scale": random((3,), 1),
        "bias": random((3,), 2),
        "mean": random((3,), 3),
        "var": np.abs(random((3,), 4)) + 0.1,
    }
    model = single_node_model("BatchNormalization", {"x": x}, params, epsilon=1e-3)
    assert_matches_onnxruntime(model, {"x": x})


def test_constant_nodes_move_to_initializers() -> None:
    x = random((2, 3))
    nodes = [
        helper.make_node(
            "Constant", [], ["c"], value=numpy_helper.from_array(random((2, 3), 1), "c")
        ),
        helper.make_node("Constant", [], ["k"], value_float=2.0),
        helper.make_node("Add", ["x", "c"], ["t"]),
        helper.make_node("Mul", ["t", "k"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "c",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)

    moved = constants_to_initializers(model)

    assert [n.op_type for n in moved.graph.node] == ["Add", "Mul"]
    assert sorted(i.name for i in moved.graph.initializer) == ["c", "k"]
    assert len(model.graph.node) == 4, "the input model must not be modified"
    assert_matches_onnxruntime(model, {"x": x})


# -- a small CNN exported by torch ---------------------------------------------------


class SmallCnn(torch.nn.Module):
    """Conv, depthwise dilated conv, squeeze-excitation, upsampling, pools and a head.

    torch's own hardsigmoid has no second derivative, so the reference for Hessian
    products computes the gate with the same formula written as a clamp.
    """

    def __init__(self, clamp_gate: bool = False) -> None:
        super().__init__()
        self.clamp_gate = clamp_gate
        self.stem = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = torch.nn.BatchNorm2d(8)
        self.depthwise = torch.nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.squeeze = torch.nn.Conv2d(8, 4, 1)
        self.excite = torch.nn.Conv2d(4, 8, 1)
        self.up = torch.nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = torch.nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        F = torch.nn.functional
        y = F.hardswish(self.norm(self.stem(x)))
        y = self.depthwise(y)
        logits = self.excite(torch.relu(self.squeeze(y.mean((2, 3), keepdim=True))))
        gate = (logits / 6 + 0.5).clamp(0, 1) if self.clamp_gate else F.hardsigmoid(logits)
        y = y * gate
        nearest = F.interpolate(y, scale_factor=2, mode="nearest")
        linear = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        y = torch.cat([nearest[:, :4], self.up(y), linear[:, :4]], 1)
        y = F.avg_pool2d(F.max_pool2d(y, 2), 2)
        y = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)
        return torch.softmax(self.head(y), -1)


def export_small_cnn(dynamo: bool) -> tuple[onnx.ModelProto, SmallCnn]:
    torch.manual_seed(0)
    net = SmallCnn()
    with torch.no_grad():
        net.norm.running_mean.uniform_(-0.5, 0.5)
        net.norm.running_var.uniform_(0.5, 2.0)
    net.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (torch.zeros(2, 3, 32, 32),),
            buffer,
            opset_version=18 if dynamo else 13,
            dynamo=dynamo,
            input_names=["x"],
            output_names=["y"],
        )
    return onnx.load_from_string(buffer.getvalue()), net


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript_opset13", "dynamo_opset18"])
def test_torch_exported_cnn_matches_onnxruntime_and_torch(dynamo: bool) -> None:
    model, net = export_small_cnn(dynamo)
    x = random((2, 3, 32, 32), 5)

    assert_matches_onnxruntime(model, {"x": x})
    with torch.no_grad():
        np.testing.assert_allclose(
            run_torch(model, {"x": x})[0], net(torch.from_numpy(x)).numpy(), rtol=RTOL, atol=ATOL
        )


def test_hessian_vector_product_matches_source_network() -> None:
    model, net = export_small_cnn(dynamo=False)
    module = convert(model).double()
    net.clamp_gate = True
    net = net.double()
    x = torch.from_numpy(random((2, 3, 32, 32), 6)).double()
    target = torch.softmax(torch.from_numpy(random((2, 5), 7)).double(), -1)
    entry = next(e for e in module.quantizable_nodes if e.group == 8)
    direction = torch.from_numpy(random(entry.weight_shape, 8)).double()

    def hvp(forward, weight: torch.Tensor) -> torch.Tensor:
        loss = -(target * torch.log(forward(x))).sum()
        gradient = torch.autograd.grad(loss, weight, create_graph=True)[0]
        return torch.autograd.grad((gradient * direction).sum(), weight)[0]

    # The depthwise convolution's weight is the same tensor in both networks (the
    # exporter folds BatchNorm into the stem only), so the products must agree.
    got = hvp(module, module.weight_parameters[entry.weight_name])
    expected = hvp(net, net.depthwise.weight)

    assert torch.count_nonzero(expected) > 0
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-7, atol=1e-10)


def test_quantizable_nodes_and_weight_parameters() -> None:
    model, _ = export_small_cnn(dynamo=False)
    module = convert(model)

    by_type = {}
    for entry in module.quantizable_nodes:
        by_type.setdefault(entry.op_type, []).append(entry)
        parameter = module.weight_parameters[entry.weight_name]
        assert tuple(parameter.shape) == entry.weight_shape
        assert parameter.requires_grad
    assert len(by_type["Conv"]) == 4
    assert by_type["ConvTranspose"][0].channel_axis == 1
    assert by_type["ConvTranspose"][0].weight_shape == (8, 4, 2, 2)
    assert by_type["Gemm"][0].channel_axis == 0, "torch exports Linear with transB=1"
    assert by_type["Conv"][1].group == 8
    names = {p.data_ptr() for p in module.parameters()}
    assert names == {p.data_ptr() for p in module.weight_parameters.values()}
    node = module.model.graph.node[by_type["Conv"][0].node_index]
    assert node.op_type == "Conv"
    assert node.input[1] == by_type["Conv"][0].weight_name


def test_activation_transform_and_capture() -> None:
    x = random((2, 3))
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Mul", ["r", "k"], ["m"]),
        helper.make_node("Add", ["m", "x"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, x.shape)],
        [numpy_helper.from_array(np.array(3.0, np.float32), "k")],
    )
    module = convert(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))

    module.set_activation_transform({"r": lambda t: t + 1.0})
    result = module.run({"x": x}, capture=["r", "m"])

    relu_plus_one = np.maximum(x, 0) + 1.0
    np.testing.assert_allclose(result["r"].numpy(), relu_plus_one, rtol=1e-6)
    np.testing.assert_allclose(result["m"].numpy(), 3 * relu_plus_one, rtol=1e-6)
    np.testing.assert_allclose(result["y"].numpy(), 3 * relu_plus_one + x, rtol=1e-6)

    module.set_activation_transform(None)
    np.testing.assert_allclose(
        module(torch.from_numpy(x)).numpy(), 3 * np.maximum(x, 0) + x, rtol=1e-6
    )
    with pytest.raises(ConversionError, match=r"'nope'.*not tensors of the graph"):
        module.set_activation_transform({"nope": torch.relu})
    with pytest.raises(ConversionError, match=r"'missing'.*not tensors of the graph"):
        module.run({"x": x}, capture=["missing"])
    with pytest.raises(ConversionError, match=r"missing \['x'\], unknown \['z'\]"):
        module.run({"z": x})


# -- BatchNorm folding ------------------------------------------------------------------


@pytest.mark.parametrize(("op_type", "with_bias"), [("Conv", True), ("Conv", False), ("ConvTranspose", True)])
def test_fold_batchnorm_is_exact(op_type: str, with_bias: bool) -> None:
    x = random((2, 4, 6, 6))
    weight_shape = (5, 4, 3, 3) if op_type == "Conv" else (4, 5, 3, 3)
    initializers = [numpy_helper.from_array(random(weight_shape, 1), "w")]
    conv_inputs = ["x", "w"]
    if with_bias:
        initializers.append(numpy_helper.from_array(random((5,), 2), "b"))
        conv_inputs.append("b")
    for i, name in enumerate(["scale", "offset", "mean"]):
        initializers.append(numpy_helper.from_array(random((5,), 3 + i), name))
    initializers.append(numpy_helper.from_array(np.abs(random((5,), 9)) + 0.2, "var"))
    nodes = [
        helper.make_node(op_type, conv_inputs, ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node(
            "BatchNormalization", ["c", "scale", "offset", "mean", "var"], ["bn"], epsilon=1e-3
        ),
        helper.make_node("Relu", ["bn"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (2, 5, 6, 6))],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)

    folded = fold_batchnorm(model)

    assert [n.op_type for n in folded.graph.node] == [op_type, "Relu"]
    assert len(folded.graph.node[0].input) == 3
    onnx.checker.check_model(folded)
    np.testing.assert_allclose(
        run_onnxruntime(folded, {"x": x})[0],
        run_onnxruntime(model, {"x": x})[0],
        rtol=RTOL,
        atol=ATOL,
    )


def test_fold_batchnorm_leaves_shared_conv_output() -> None:
    x = random((1, 2, 4, 4))
    bn_params = [numpy_helper.from_array(np.ones(2, np.float32), n) for n in ("s", "o", "m", "v")]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "s", "o", "m", "v"], ["bn"]),
        helper.make_node("Add", ["bn", "c"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(random((2, 2, 1, 1), 1), "w"), *bn_params],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)

    folded = fold_batchnorm(model)

    assert [n.op_type for n in folded.graph.node] == ["Conv", "BatchNormalization", "Add"]


# -- errors -----------------------------------------------------------------------------


def test_unsupported_operators_are_all_listed_before_conversion() -> None:
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="fine"),
        helper.make_node("TopK", ["a", "k"], ["v", "i"], name="top_node", axis=-1),
        helper.make_node("Resize", ["a", "", "sc"], ["r"], name="cubic_node", mode="cubic"),
        helper.make_node("Det", ["r"], ["y"], name="det_node"),
    ]
    graph = helper.make_graph(
        nodes,
        "bad",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (1, 1, 2, 2))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [
            numpy_helper.from_array(np.array([1], np.int64), "k"),
            numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "sc"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    with pytest.raises(UnsupportedOperatorError, match="3 node") as error:
        convert(model)
    message = str(error.value)
    for fragment in ("TopK (node 'top_node')", "Det (node 'det_node')", "mode='cubic'"):
        assert fragment in message
    assert "Relu" not in message.split("Supported operators")[0]
    assert len(find_unsupported_nodes(model)) == 3


def test_missing_tensor_raises() -> None:
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "ghost"], ["y"], name="adder")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, (2,))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, (2,))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    with pytest.raises(ConversionError, match="'adder' reads tensor 'ghost'"):
        convert(model)


def test_missing_model_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx does not exist"):
        convert(tmp_path / "missing.onnx")


# -- a real model -------------------------------------------------------------------------


def test_ppocr_detection_model_matches_onnxruntime() -> None:
    rapidocr = pytest.importorskip("rapidocr_onnxruntime")
    skimage_data = pytest.importorskip("skimage.data")
    import cv2

    path = Path(rapidocr.__file__).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is not installed")
    image = cv2.resize(skimage_data.astronaut(), (160, 128), interpolation=cv2.INTER_AREA)
    x = ((image.astype(np.float32) / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None]

    model = onnx.load(str(path))
    expected = run_onnxruntime(model, {"x": x})[0]
    got = run_torch(model, {"x": x})[0]

    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)
