"""The hawq-quantize command: a full run on the digits CNN and every bad-input exit."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from quantized_inference_node.hawq.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "test" / "data" / "digits_cnn.onnx"
FAST = ["--max-batches", "2", "--batch-size", "32", "--probes", "4", "--iterations", "10"]


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    """64 digits images as calib.npz (input 'image') and their labels as labels.npy."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_digits_cnn import load_digits_split

    split = load_digits_split()
    folder = tmp_path_factory.mktemp("calib")
    np.savez(folder / "calib.npz", image=split.x_train[:64])
    np.save(folder / "labels.npy", split.y_train[:64])
    return folder


def test_full_run_writes_model_and_report(calib: Path, tmp_path: Path, capsys) -> None:
    out, report = tmp_path / "q.onnx", tmp_path / "report"

    status = main(
        [
            str(MODEL),
            "--calib",
            str(calib / "calib.npz"),
            "--labels",
            str(calib / "labels.npy"),
            "--out",
            str(out),
            "--size-ratio",
            "0.1667",
            "--report",
            str(report),
            *FAST,
        ]
    )

    assert status == 0
    assert out.is_file()
    data = json.loads((report / "report.json").read_text())
    assert len(data["layers"]) == 5
    assert {"name", "parameters", "top_eigenvalue", "trace", "omega", "bits"} <= set(data["layers"][0])
    assert set(data["layers"][0]["omega"]) == {"2", "4", "8"}
    assert data["summary"]["weight_size_ratio"] <= 0.1667
    assert (report / "report.md").read_text().startswith("# HAWQ quantization report")
    assert (report / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "weight bits per layer" in capsys.readouterr().out


def test_block_scales_and_weight_only(calib: Path, tmp_path: Path) -> None:
    import onnx

    out = tmp_path / "blocked.onnx"
    argv = [str(MODEL), "--calib", str(calib / "calib.npz"), "--out", str(out), "--size-ratio", "0.2"]

    status = main([*argv, "--bits", "4,8", "--block-size", "16", "--weight-only", *FAST])

    assert status == 0
    nodes = onnx.load(str(out)).graph.node
    block_sizes = set()
    for node in nodes:
        if node.op_type == "DequantizeLinear":
            block_sizes |= {a.i for a in node.attribute if a.name == "block_size"}
    assert block_sizes == {16}
    assert not any(node.op_type == "QuantizeLinear" for node in nodes)


def test_cli_defaults_match_the_api() -> None:
    from quantized_inference_node.hawq.api import QuantizeOptions
    from quantized_inference_node.hawq.hessian import HessianSettings

    args = build_parser().parse_args(["m.onnx", "--calib", "c.npz", "--out", "q.onnx", "--size-ratio", "0.2"])
    options, hessian = QuantizeOptions(), HessianSettings()

    assert args.bits == options.bits
    assert args.batch_size == options.batch_size
    assert args.max_batches == options.max_batches
    assert args.percentile == options.percentile
    assert args.activation_range == options.activation_range.value
    assert args.loss == options.loss.value
    assert args.finetune_epochs == options.finetune_epochs
    assert args.seed == options.seed == hessian.seed
    assert args.probes == hessian.probes
    assert args.iterations == hessian.max_iterations
    assert args.tolerance == hessian.tolerance
    assert args.trace_method == hessian.trace_method.value
    assert args.skip_eigenvalues is not hessian.eigenvalues
    assert args.weight_clipping == options.weight_clipping.value
    assert args.float_activations == options.float_activations
    assert args.auto_float_activations == options.auto_float_activations
    assert args.float_activation_budget == options.float_activation_budget
    assert args.block_size == options.block_size
    assert args.weight_only is not options.quantize_activations


def test_help_has_examples(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])

    assert exit_info.value.code == 0
    assert "hawq-quantize model.onnx --calib calib.npz" in capsys.readouterr().out


def run_failing(argv: list[str], capsys) -> tuple[int, str]:
    """Run the command expecting failure; return the exit status and stderr's one line."""
    try:
        status = main(argv)
    except SystemExit as exit_info:
        status = exit_info.code
    err = capsys.readouterr().err.strip().splitlines()
    return status, err[-1] if err else ""


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--size-ratio", "0.01"], 1, r"smallest achievable size 0\.0\d+ MB"),
        (["--size-ratio", "1.5"], 2, r"size_ratio must be in \(0, 1\]"),
        (["--size-ratio", "0.2", "--bits", "2,x"], 2, "comma-separated integers"),
        (["--size-ratio", "0.2", "--bits", "3,9"], 2, "bits must be integers in 2..8"),
        (["--size-ratio", "0.2", "--finetune-epochs", "1"], 2, "--finetune-epochs needs --labels"),
        ([], 2, "one of the arguments --size-ratio --size-mb is required"),
    ],
)
def test_bad_arguments(
    calib: Path, tmp_path: Path, capsys, extra: list[str], code: int, message: str
) -> None:
    status, line = run_failing(
        [str(MODEL), "--calib", str(calib / "calib.npz"), "--out", str(tmp_path / "q.onnx"), *FAST, *extra],
        capsys,
    )

    assert status == code
    assert line.startswith("hawq-quantize: error:")
    assert re.search(message, line)


def test_wrong_dtype_and_shape_of_calibration(tmp_path: Path, capsys) -> None:
    np.savez(tmp_path / "uint8.npz", image=np.zeros((8, 1, 8, 8), np.uint8))
    np.savez(tmp_path / "shape.npz", image=np.zeros((8, 1, 9, 8), np.float32))
    np.savez(tmp_path / "name.npz", pixels=np.zeros((8, 1, 8, 8), np.float32))

    for name, message in [("uint8", "uint8"), ("shape", "9"), ("name", "pixels")]:
        status, line = run_failing(
            [
                str(MODEL),
                "--calib",
                str(tmp_path / f"{name}.npz"),
                "--out",
                str(tmp_path / "q.onnx"),
                "--size-ratio",
                "0.2",
            ],
            capsys,
        )
        assert status == 1, line
        assert line.startswith("hawq-quantize: error:")
        assert message in line


def test_empty_calibration_folder(tmp_path: Path, capsys) -> None:
    (tmp_path / "images").mkdir()

    status, line = run_failing(
        [
            str(MODEL),
            "--calib",
            str(tmp_path / "images"),
            "--image-size",
            "8,8",
            "--mean",
            "0",
            "--std",
            "1",
            "--out",
            str(tmp_path / "q.onnx"),
            "--size-ratio",
            "0.2",
        ],
        capsys,
    )

    assert status == 1
    assert line.startswith("hawq-quantize: error:")
    assert "images" in line


def test_missing_inputs_and_unwritable_output(calib: Path, tmp_path: Path, capsys) -> None:
    cases = [
        ([str(tmp_path / "none.onnx"), "--calib", str(calib / "calib.npz")], "none.onnx does not exist"),
        ([str(MODEL), "--calib", str(tmp_path / "none.npz")], "none.npz does not exist"),
        ([str(MODEL), "--calib", str(tmp_path)], "--image-size"),
    ]
    for argv, message in cases:
        status, line = run_failing([*argv, "--out", str(tmp_path / "q.onnx"), "--size-ratio", "0.2"], capsys)
        assert status == 2
        assert message in line

    status, line = run_failing(
        [
            str(MODEL),
            "--calib",
            str(calib / "calib.npz"),
            "--out",
            str(tmp_path / "no" / "q.onnx"),
            "--size-ratio",
            "0.2",
        ],
        capsys,
    )
    assert status == 2
    assert "does not exist; create it first" in line
