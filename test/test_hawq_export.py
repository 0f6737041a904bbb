"""QDQ export: onnxruntime runs it, it matches the torch fake-quant model, sizes follow the bits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from quantized_inference_node.hawq.api import (
    NothingToQuantizeError,
    QuantizeOptions,
    analyze,
    export_configuration,
    quantize,
)
from quantized_inference_node.hawq.calibration import CalibrationError, ImagePreprocess
from quantized_inference_node.hawq.fake_quant import quantize_weight_np, storage_bits, weight_scales
from quantized_inference_node.hawq.hessian import HessianSettings
from quantized_inference_node.hawq.onnx_to_torch import UnsupportedOperatorError
from quantized_inference_node.hawq.qdq_export import _int4_tensor

FAST = HessianSettings(max_iterations=20, probes=4)


def tiny_cnn(seed: int = 0, opset: int = 13) -> onnx.ModelProto:
    """x (N, 2, 6, 6) -> Conv 3x3 (4) -> BatchNorm -> ReLU -> MaxPool 2 -> Flatten -> Gemm (36 -> 5)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.5, (4, 2, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "conv_b"),
        numpy_helper.from_array(rng.uniform(0.5, 1.5, 4).astype(np.float32), "bn_scale"),
        numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "bn_bias"),
        numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "bn_mean"),
        numpy_helper.from_array(rng.uniform(0.5, 2.0, 4).astype(np.float32), "bn_var"),
        numpy_helper.from_array(rng.normal(0, 0.3, (5, 36)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(0, 0.1, 5).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["b"], name="bn"
        ),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def calibration(seed: int = 1, n: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 2, 6, 6)).astype(np.float32)


@pytest.fixture(scope="module")
def analysis():
    return analyze(tiny_cnn(), calibration(), options=QuantizeOptions(batch_size=16, hessian=FAST))


def unpack_int4(tensor: onnx.TensorProto) -> np.ndarray:
    """Signed int4 values of an INT4 initializer, low nibble first (independent of the writer)."""
    raw = np.frombuffer(tensor.raw_data, dtype=np.uint8)
    nibbles = np.stack([raw & 0x0F, raw >> 4], axis=1).ravel().astype(np.int8)
    nibbles[nibbles > 7] -= 16
    return nibbles[: int(np.prod(tensor.dims))].reshape(tuple(tensor.dims))


def initializers(path: Path) -> dict[str, onnx.TensorProto]:
    return {init.name: init for init in onnx.load(str(path)).graph.initializer}


def test_mixed_bits_match_torch_emulation(analysis, tmp_path: Path) -> None:
    check = export_configuration(analysis, [8, 4], tmp_path / "mixed.onnx")
    inits = initializers(check.export.path)
    folded = {i.name: numpy_helper.to_array(i) for i in analysis.prepared.onnx_model.graph.initializer}
    conv, fc = analysis.prepared.layers

    # The torch fake-quant model predicts onnxruntime's output up to QLinearConv's fixed-point
    # requantization (an output code may differ by one step) and the int32 bias rounding:
    # within 1 % of the output's largest magnitude, while 4-bit weights move it by ~17 %.
    assert check.torch_vs_onnxruntime < 0.01
    assert check.export.opset == 21
    # Weights: int8 for the 8-bit Conv, packed int4 for the 4-bit Gemm, on the expected grids.
    conv_q = inits[f"{conv.weight}_quantized"]
    fc_q = inits[f"{fc.weight}_quantized"]
    assert conv_q.data_type == TensorProto.INT8
    assert fc_q.data_type == TensorProto.INT4
    assert len(fc_q.raw_data) == 5 * 36 // 2
    np.testing.assert_array_equal(
        numpy_helper.to_array(conv_q), quantize_weight_np(folded[conv.weight], 8, 0).q
    )
    np.testing.assert_array_equal(unpack_int4(fc_q), quantize_weight_np(folded[fc.weight], 4, 0).q)
    # The ReLU is absorbed by the uint8 zero point 0 of the Conv output.
    ops = [n.op_type for n in onnx.load(str(check.export.path)).graph.node]
    assert "Relu" not in ops
    assert "BatchNormalization" not in ops


def test_quantized_model_stays_close_to_float(analysis, tmp_path: Path) -> None:
    check = export_configuration(analysis, [8, 8], tmp_path / "w8.onnx")

    # W8A8 on a tiny random CNN: outputs within 5 % of the float model's norm.
    assert check.fidelity.relative_error < 0.05
    assert check.export.opset == 13  # no int4, so no upgrade beyond per-channel DQ


def test_file_size_follows_the_bits(analysis, tmp_path: Path) -> None:
    sizes = {b: export_configuration(analysis, [b, b], tmp_path / f"w{b}.onnx").export for b in (2, 4, 8)}
    two_bit = initializers(sizes[2].path)

    # 180 + 72 weights: int8 takes 252 bytes, int4 126; 2-bit is stored as int4 with values in {-1, 0, 1}.
    assert sizes[8].weight_storage_bytes == 252
    assert sizes[4].weight_storage_bytes == sizes[2].weight_storage_bytes == 126
    assert sizes[4].file_bytes < sizes[8].file_bytes
    for layer in analysis.prepared.layers:
        assert set(np.unique(unpack_int4(two_bit[f"{layer.weight}_quantized"]))) <= {-1, 0, 1}


def test_8bit_layers_fuse_into_integer_kernels(analysis, tmp_path: Path) -> None:
    check = export_configuration(analysis, [8, 8], tmp_path / "w8.onnx")
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(str(check.export.path), options, providers=["CPUExecutionProvider"])

    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "QLinearConv" in ops
    assert "QGemm" in ops


def test_int4_packing_round_trip_with_odd_count() -> None:
    values = np.array([[-7, -1, 0], [1, 7, -8]], dtype=np.int8)

    tensor = _int4_tensor("w", values)

    assert len(tensor.raw_data) == 3
    np.testing.assert_array_equal(unpack_int4(tensor), values)
    np.testing.assert_array_equal(numpy_helper.to_array(tensor).astype(np.int8), values)


def test_torch_module_is_accepted(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3),
        torch.nn.BatchNorm2d(4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(64, 3),
    ).eval()
    options = QuantizeOptions(size_ratio=0.25, batch_size=16, hessian=FAST)

    result = quantize(module, calibration(), tmp_path / "m.onnx", options=options, report_dir=tmp_path / "r")

    assert result.allocation.bits == [8, 8]  # a quarter of FP32 is 8 bits everywhere
    assert result.fidelity.relative_error < 0.05
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.json", "report.md", "sensitivity.png"}


def test_unsupported_operator_is_named(tmp_path: Path) -> None:
    model = tiny_cnn()
    model.graph.node.insert(0, helper.make_node("NonMaxSuppression", ["x", "x"], ["nms"], name="nms"))

    with pytest.raises(UnsupportedOperatorError, match="NonMaxSuppression"):
        quantize(model, calibration(), tmp_path / "q.onnx", options=QuantizeOptions(size_ratio=0.2))


def test_model_with_nothing_to_quantize(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        "relu_only",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])

    with pytest.raises(NothingToQuantizeError, match=r"nothing to quantize.*\['Relu'\]"):
        quantize(
            model, np.zeros((4, 4), np.float32), tmp_path / "q.onnx", options=QuantizeOptions(size_ratio=0.2)
        )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.zeros((8, 2, 6, 6), np.uint8), "uint8"),
        (np.zeros((8, 3, 6, 6), np.float32), r"\(8, 3, 6, 6\)"),
        (np.zeros((8, 2, 6), np.float32), r"\(8, 2, 6\)"),
    ],
)
def test_calibration_of_wrong_dtype_or_shape(data: np.ndarray, message: str, tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match=message):
        quantize(tiny_cnn(), data, tmp_path / "q.onnx", options=QuantizeOptions(size_ratio=0.2))


def test_empty_calibration_folder(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    preprocess = ImagePreprocess(size_hw=(6, 6), mean=(0.0, 0.0), std=(1.0, 1.0))

    with pytest.raises(CalibrationError, match="images"):
        quantize(
            tiny_cnn(),
            folder,
            tmp_path / "q.onnx",
            options=QuantizeOptions(size_ratio=0.2),
            preprocess=preprocess,
        )


def test_labels_of_wrong_length(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="3 labels for 64 calibration samples"):
        quantize(
            tiny_cnn(),
            calibration(),
            tmp_path / "q.onnx",
            labels=np.zeros(3, np.int64),
            options=QuantizeOptions(size_ratio=0.2),
        )


@pytest.mark.parametrize(
    ("relative", "message"),
    [("missing/q.onnx", "folder .*missing does not exist"), (".", "is a folder")],
)
def test_output_path_that_cannot_be_written(relative: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=message):
        quantize(tiny_cnn(), calibration(), tmp_path / relative, options=QuantizeOptions(size_ratio=0.2))


def test_infeasible_budget_fails_before_the_analysis(tmp_path: Path) -> None:
    from quantized_inference_node.hawq.bit_allocation import InfeasibleBudgetError

    # 252 weights at 2 bits = 63 bytes; 1 % of FP32 (10.08 bytes) cannot be met.
    with pytest.raises(InfeasibleBudgetError, match=r"smallest achievable size 0\.000063 MB"):
        quantize(tiny_cnn(), calibration(), tmp_path / "q.onnx", options=QuantizeOptions(size_ratio=0.01))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bits": (3, 9)}, "bits must be integers in 2..8"),
        ({"size_ratio": 0.2, "size_mb": 1.0}, "not both"),
        ({"size_ratio": 1.5}, r"size_ratio must be in \(0, 1\]"),
        ({"size_ratio": 0.2, "bits": (2, 4), "pin_first_last": True}, "add 8 to bits"),
        ({"size_ratio": 0.2, "loss": "hinge"}, "'hinge' is not a valid LossKind"),
        ({"size_ratio": 0.2, "block_size": 1}, "block_size must be >= 2 input channels"),
    ],
)
def test_bad_options(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizeOptions(**kwargs)


def test_finetuning_recovers_accuracy_at_two_bits(tmp_path: Path) -> None:
    # Labels are the float model's own classes, so the float accuracy is 1 by construction.
    x = calibration(n=96)
    session = ort.InferenceSession(tiny_cnn().SerializeToString(), providers=["CPUExecutionProvider"])
    labels = session.run(None, {"x": x})[0].argmax(1).astype(np.int64)
    options = {"bits": (2, 8), "size_ratio": 2 / 32, "batch_size": 32, "hessian": FAST, "seed": 0}

    plain = quantize(
        tiny_cnn(), x, tmp_path / "plain.onnx", labels=labels, options=QuantizeOptions(**options)
    )
    tuned = quantize(
        tiny_cnn(),
        x,
        tmp_path / "tuned.onnx",
        labels=labels,
        options=QuantizeOptions(**options, finetune_epochs=8, finetune_lr=3e-3),
    )

    assert plain.allocation.bits == tuned.allocation.bits == [2, 2]
    assert tuned.fidelity.accuracy > plain.fidelity.accuracy
    # Fine-tuning moves the weights, and the written model still matches the torch emulation.
    assert tuned.torch_vs_onnxruntime < 0.01


@pytest.mark.parametrize(
    ("bits", "order", "epochs", "message"),
    [
        ([4, 8], [0], 1, "1 weights, 1 axes and 2 bit widths must match"),
        ([4], [0, 0], 1, r"order \[0, 0\] must list each of the 1 layers once"),
        ([4], [0], 0, "epochs must be >= 1 and lr > 0, got 0"),
    ],
)
def test_finetune_rejects_bad_arguments(bits: list[int], order: list[int], epochs: int, message: str) -> None:
    from quantized_inference_node.hawq.finetune import finetune

    weight = torch.nn.Parameter(torch.ones(2, 2))

    with pytest.raises(ValueError, match=message):
        finetune([weight], [0], bits, order, [lambda: weight.pow(2).sum()], epochs, lr=1e-3)


def test_gauss_newton_traces_agree_with_per_layer_hutchinson() -> None:
    # Distillation at the float weights: the Gauss-Newton matrix is the Hessian, so both
    # estimators target the same traces. 64 probes each; measured over seeds 1 and 5 they
    # differ by at most 10 %; allowed 20 %.
    def traces(method: str) -> np.ndarray:
        hessian = HessianSettings(probes=64, eigenvalues=False, trace_method=method, seed=1)
        result = analyze(tiny_cnn(), calibration(), options=QuantizeOptions(batch_size=32, hessian=hessian))
        return np.array([s.trace for s in result.sensitivities])

    np.testing.assert_allclose(traces("gauss_newton"), traces("per_layer"), rtol=0.2)


def test_gauss_newton_traces_refuse_the_l1_loss() -> None:
    hessian = HessianSettings(probes=2, eigenvalues=False, trace_method="gauss_newton")
    labels = np.zeros((64, 5), np.float32)
    message = "gauss_newton traces need a mse, cross_entropy or distillation loss"
    with pytest.raises(ValueError, match=message):
        analyze(tiny_cnn(), calibration(), labels, QuantizeOptions(hessian=hessian, loss="l1"))


def test_block_scales_in_export_match_torch_emulation(tmp_path: Path) -> None:
    options = QuantizeOptions(batch_size=16, hessian=FAST, block_size=4, quantize_activations=False)
    blocked = analyze(tiny_cnn(), calibration(), options=options)
    check = export_configuration(blocked, [4, 4], tmp_path / "blocked.onnx")
    model = onnx.load(str(check.export.path))
    conv, fc = blocked.prepared.layers
    attributes = {
        node.input[0]: {a.name: helper.get_attribute_value(a) for a in node.attribute}
        for node in model.graph.node
        if node.op_type == "DequantizeLinear"
    }
    inits = initializers(check.export.path)

    # The Gemm's 36 inputs take 9 blocks of 4; the Conv's 2 input channels keep one scale per channel.
    assert attributes[f"{fc.weight}_quantized"] == {"axis": 1, "block_size": 4}
    assert tuple(inits[f"{fc.weight}_scale"].dims) == (5, 9)
    assert attributes[f"{conv.weight}_quantized"] == {"axis": 0}
    assert tuple(inits[f"{conv.weight}_scale"].dims) == (4,)
    # Weight-only: no activation QDQ pairs, and onnxruntime computes what torch emulates.
    assert not any(n.op_type == "QuantizeLinear" for n in model.graph.node)
    assert check.torch_vs_onnxruntime < 1e-5


def test_block_scales_lower_weight_error() -> None:
    weight = np.random.default_rng(3).normal(size=(8, 64, 3, 3)).astype(np.float32)
    weight[:, :4] *= 20  # a few large input channels stretch every per-channel scale

    per_channel = quantize_weight_np(weight, 4, 0)
    blocked = quantize_weight_np(weight, 4, 0, block_size=16)
    blocked_error = np.sum((blocked.dequantize() - weight) ** 2)
    per_channel_error = np.sum((per_channel.dequantize() - weight) ** 2)

    assert blocked.block_size == 16
    assert blocked.axis == 1
    assert blocked.scale.shape == (8, 4, 3, 3)
    assert blocked_error < 0.5 * per_channel_error
    # 8-bit weights and input counts the block size does not divide stay per channel.
    assert quantize_weight_np(weight, 8, 0, block_size=16).block_size is None
    assert quantize_weight_np(weight, 4, 0, block_size=48).block_size is None


def test_storage_bits_count_block_scales() -> None:
    assert storage_bits(4, 16) == 6.0
    assert storage_bits(4, None) == 4.0


def test_block_size_must_divide_the_axis() -> None:
    weight = np.ones((4, 6), np.float32)

    with pytest.raises(ValueError, match="invalid block size 4 for the 6 channels of axis 1"):
        weight_scales(weight, 4, 1, block_size=4)
