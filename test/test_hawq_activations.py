"""Per-tensor activation precision: activation Hessian traces, ranking and float tensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_hawq_export import FAST, calibration, tiny_cnn

from quantized_inference_node.hawq.activation_precision import (
    ActivationSensitivity,
    activation_traces,
    rank_activations,
    select_float_activations,
    without_float_activations,
)
from quantized_inference_node.hawq.api import (
    Batch,
    LossKind,
    QuantizeOptions,
    _loss_closures,
    analyze,
    export_configuration,
    prepare_model,
    quantize,
)
from quantized_inference_node.hawq.cli import main
from quantized_inference_node.hawq.fake_quant import ActivationQParams


def two_gemm_model(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """x (N, d) -> Gemm W1 -> h -> Gemm W2 -> y: linear, so the activation Hessian is exact."""
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1"], ["h"], name="fc1", transB=1),
            helper.make_node("Gemm", ["h", "w2"], ["y"], name="fc2", transB=1),
        ],
        "two_gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", w1.shape[1]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", w2.shape[0]])],
        initializer=[numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_activation_trace_linear_model_exact() -> None:
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(6, 4)).astype(np.float32)
    w2 = rng.normal(size=(3, 6)).astype(np.float32)
    prepared = prepare_model(two_gemm_model(w1, w2))
    x = rng.normal(size=(10, 4)).astype(np.float32)
    targets = rng.normal(size=(10, 3)).astype(np.float32)
    batches = [Batch({"x": x[:6]}, targets[:6]), Batch({"x": x[6:]}, targets[6:])]
    closures = _loss_closures(prepared.module, batches, LossKind.MSE)

    traces = activation_traces(prepared.module, closures, [6, 4], ["h", "y"], probes=200, seed=0)

    # L = mean over N*K entries of (h W2^T - t)^2: the Hessian in h is 2/(N K) (I_N kron W2^T W2),
    # whose trace is 2 ||W2||_F^2 / K for every batch; in y it is 2/(N K) I, trace 2. The joint
    # probes add zero-mean cross terms (h and y are coupled), so both get Hutchinson's 5 %.
    k = w2.shape[0]
    np.testing.assert_allclose(traces["h"], 2 * np.sum(w2.astype(np.float64) ** 2) / k, rtol=0.05)
    np.testing.assert_allclose(traces["y"], 2.0, rtol=0.05)


def test_ranking_and_selection_by_count_and_budget() -> None:
    traces = {"a": 1.0, "b": 4.0, "c": 2.0, "d": 0.0}
    qparams = {name: ActivationQParams(scale=0.1 * (i + 1), zero_point=0) for i, name in enumerate(traces)}

    ranking = rank_activations(traces, qparams)

    # Scores Tr * scale^2 / 12: a 1*0.01/12, b 4*0.04/12, c 2*0.09/12, d 0.
    assert [row.name for row in ranking] == ["c", "b", "a", "d"]
    np.testing.assert_allclose(ranking[0].score, 2 * 0.09 / 12)
    assert select_float_activations(ranking, count=0) == []
    assert select_float_activations(ranking, count=2) == ["c", "b"]
    assert select_float_activations(ranking, count=9) == ["c", "b", "a", "d"]
    # Total 0.35/12; keeping c leaves 0.17/12 (49 %), keeping c and b leaves 0.01/12 (3 %).
    assert select_float_activations(ranking, budget=0.5) == ["c"]
    assert select_float_activations(ranking, budget=0.4) == ["c", "b"]
    assert select_float_activations(ranking, count=1, budget=0.04) == ["c", "b"]
    assert select_float_activations(ranking, budget=1.0) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": -1}, "number of float activations must be >= 0, got -1"),
        ({"budget": 1.5}, r"activation error budget must be in \[0, 1\], got 1.5"),
    ],
)
def test_bad_selection_arguments_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        select_float_activations([ActivationSensitivity("a", 1.0, 0.1, 1.0)], **kwargs)


def test_float_tensor_copies_stay_float() -> None:
    same = ActivationQParams(scale=0.5, zero_point=0)
    other = ActivationQParams(scale=0.25, zero_point=3)
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"]),
            helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[1]),
            helper.make_node("Flatten", ["p"], ["f"]),
            helper.make_node("Sigmoid", ["f"], ["s"]),
        ],
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [1, 2])],
    )
    qparams = {"r": same, "p": same, "f": same, "s": other}

    kept = without_float_activations(qparams, ["r"], helper.make_model(graph))

    assert kept == {"s": other}


def test_named_float_activation_not_exported(tmp_path: Path) -> None:
    options = QuantizeOptions(batch_size=16, hessian=FAST, float_activations=("r",))
    analysis = analyze(tiny_cnn(), calibration(), options=options)

    check = export_configuration(analysis, [8, 4], tmp_path / "float_r.onnx")

    # r (the ReLU output) and its pass-through copies p and f stay float; x is still quantized.
    assert analysis.float_activations == ["r"]
    assert set(analysis.qparams) == {"x"}
    graph = onnx.load(str(check.export.path)).graph
    quantized_inputs = {n.input[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert "x" in quantized_inputs
    assert not quantized_inputs & {"r", "p", "f"}
    # The torch emulation still predicts onnxruntime within the export test's 1 %.
    assert check.torch_vs_onnxruntime < 0.01


def test_automatic_float_activations_are_recorded_in_the_report(tmp_path: Path) -> None:
    options = QuantizeOptions(batch_size=16, hessian=FAST, size_ratio=0.25, auto_float_activations=1)

    result = quantize(tiny_cnn(), calibration(), tmp_path / "auto.onnx", options=options, report_dir=tmp_path)

    report = json.loads((tmp_path / "report.json").read_text())
    ranking = report["activations"]["ranking"]
    assert [row["name"] for row in ranking] == [a.name for a in result.activation_ranking]
    scores = [row["score"] for row in ranking]
    assert scores == sorted(scores, reverse=True)
    for row in ranking:
        np.testing.assert_allclose(row["score"], row["trace"] * row["scale"] ** 2 / 12, rtol=1e-12)
    assert report["activations"]["float"] == [ranking[0]["name"]] == result.float_activations
    assert [row["float"] for row in ranking] == [True] + [False] * (len(ranking) - 1)
    assert f"Kept in float (1): `{ranking[0]['name']}`" in (tmp_path / "report.md").read_text()


def test_unknown_float_activation_is_named() -> None:
    options = QuantizeOptions(batch_size=16, hessian=FAST, float_activations=("nope",))
    with pytest.raises(ValueError, match=r"float activations \['nope'\] are not quantized activation"):
        analyze(tiny_cnn(), calibration(), options=options)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"auto_float_activations": -1}, "auto_float_activations must be >= 0, got -1"),
        ({"float_activation_budget": -0.1}, r"float_activation_budget must be in \[0, 1\]"),
        ({"float_activations": "relu_out"}, "float_activations takes a sequence of tensor names"),
        ({"weight_clipping": "percentile"}, "unknown weight_clipping 'percentile'"),
    ],
)
def test_bad_activation_options_are_rejected(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizeOptions(**kwargs)


def test_cli_keeps_named_activations_float(tmp_path: Path, capsys) -> None:
    model_path = tmp_path / "tiny.onnx"
    onnx.save(tiny_cnn(), str(model_path))
    np.savez(tmp_path / "calib.npz", x=calibration())
    out = tmp_path / "q.onnx"

    status = main(
        [
            str(model_path),
            "--calib",
            str(tmp_path / "calib.npz"),
            "--out",
            str(out),
            "--size-ratio",
            "0.25",
            "--probes",
            "2",
            "--skip-eigenvalues",
            "--float-activations",
            "r",
            "--report",
            str(tmp_path / "report"),
        ]
    )

    assert status == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["activations"]["float"] == ["r"]
    assert all(layer["top_eigenvalue"] is None for layer in report["layers"])
    quantized = {n.input[0] for n in onnx.load(str(out)).graph.node if n.op_type == "QuantizeLinear"}
    assert "r" not in quantized

