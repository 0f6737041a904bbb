"""HAWQ on a small digits CNN: accuracy, fidelity, size, analysis cost and latency.

Compares, on scikit-learn's digits test split (540 images):

- FP32 (onnxruntime),
- onnxruntime's own ``quantize_static`` (uniform INT8, per-channel, QDQ, uint8 activations),
- uniform 8-bit and uniform 4-bit weights through this tool's exporter,
- HAWQ at 1/6 of the FP32 weight size and at the size of uniform 4-bit,
- random allocations at the size of uniform 4-bit (the ILP with random layer weights).

HAWQ and the random allocations are repeated over 5 seeds (Hessian probes and
start vectors; random layer weights) and averaged. Results go to the
``hawq_digits`` section of docs/benchmarks.md.

Usage::

    python benchmarks/bench_hawq_digits.py [--seeds 5] [--no-write]
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_digits_cnn import export_onnx, load_digits_split, train_digits_cnn

CALIB_BATCH = 64
CALIB_BATCHES = 8
HAWQ_RATIO = 1 / 6


@dataclass
class Scores:
    """Test-split figures of one model."""

    accuracy: float
    agreement: float
    weight_ratio: float
    file_kb: float


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    """Logits of an ONNX model on X (onnxruntime CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def scores(path: Path, x: np.ndarray, y: np.ndarray, reference: np.ndarray, ratio: float) -> Scores:
    """Accuracy, top-1 agreement with FP32, weight-size ratio and file size of a model."""
    logits = run_onnx(path, x)
    return Scores(
        accuracy=float((logits.argmax(1) == y).mean()),
        agreement=float((logits.argmax(1) == reference.argmax(1)).mean()),
        weight_ratio=ratio,
        file_kb=path.stat().st_size / 1e3,
    )


def ort_quantize_static(fp32: Path, out: Path, x_calib: np.ndarray) -> Path:
    """onnxruntime's uniform INT8 static quantization (per-channel, QDQ, uint8 activations)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(
                [{"image": x_calib[i : i + CALIB_BATCH]} for i in range(0, len(x_calib), CALIB_BATCH)]
            )

        def get_next(self):
            return next(self._batches, None)

    quantize_static(
        str(fp32),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    return out


def latency_ms(paths: dict[str, Path], x: np.ndarray, repeats: int) -> dict[str, float]:
    """Median latency per call of each model, runs interleaved so load noise hits all alike."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = {
        k: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for k, p in paths.items()
    }
    times: dict[str, list[float]] = {k: [] for k in paths}
    for session in sessions.values():
        session.run(None, {"image": x})
    for _ in range(repeats):
        for key, session in sessions.items():
            start = time.perf_counter()
            session.run(None, {"image": x})
            times[key].append(time.perf_counter() - start)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def random_allocation(analysis, budget_ratio: float, seed: int) -> list[int]:
    """Return the ILP's choice under the budget with random layer weights instead of Hessian traces."""
    from quantized_inference_node.hawq.bit_allocation import allocate_bits

    rng = np.random.default_rng(seed)
    bits = sorted(analysis.sensitivities[0].omega)
    omega = [{b: float(10 ** rng.uniform(-3, 3)) * 4.0**-b for b in bits} for _ in analysis.sensitivities]
    return allocate_bits(omega, analysis.num_params, budget_ratio * analysis.fp32_weight_bytes).bits


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", type=int, default=5, help="seeds for HAWQ and random allocations (default 5)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()

    from quantized_inference_node.hawq.api import QuantizeOptions, analyze, choose_bits, export_configuration
    from quantized_inference_node.hawq.bit_allocation import weight_size_bytes
    from quantized_inference_node.hawq.hessian import HessianSettings

    work = Path(tempfile.mkdtemp(prefix="hawq_digits_"))
    split = load_digits_split()
    started = time.perf_counter()
    model = train_digits_cnn(split)
    train_seconds = time.perf_counter() - started
    fp32 = export_onnx(model, work / "fp32.onnx")
    reference = run_onnx(fp32, split.x_test)
    x_calib = split.x_train[: CALIB_BATCH * CALIB_BATCHES]

    results: dict[str, Scores] = {"FP32": scores(fp32, split.x_test, split.y_test, reference, 1.0)}
    ort_int8 = ort_quantize_static(fp32, work / "ort_int8.onnx", x_calib)
    results["onnxruntime quantize_static INT8"] = scores(
        ort_int8, split.x_test, split.y_test, reference, 0.25
    )

    # Hessian analysis per seed, with its time and the process's peak memory.
    analyses, seconds = [], []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for seed in range(args.seeds):
        options = QuantizeOptions(
            batch_size=CALIB_BATCH,
            max_batches=CALIB_BATCHES,
            seed=seed,
            hessian=HessianSettings(seed=seed),
        )
        analyses.append(analyze(fp32, split.x_train, split.y_train, options))
        seconds.append(analyses[-1].hessian_seconds)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    first = analyses[0]
    num_params = first.num_params
    fp32_bytes = first.fp32_weight_bytes

    def evaluate(analysis, bits, name) -> Scores:
        path = work / f"{name}.onnx"
        export_configuration(analysis, bits, path)
        ratio = weight_size_bytes(num_params, bits) / fp32_bytes
        return scores(path, split.x_test, split.y_test, reference, ratio)

    layers = len(num_params)
    results["uniform 8-bit (this tool)"] = evaluate(first, [8] * layers, "w8")
    results["uniform 4-bit (this tool)"] = evaluate(first, [4] * layers, "w4")
    uniform4_ratio = results["uniform 4-bit (this tool)"].weight_ratio

    def averaged(runs: list[Scores]) -> Scores:
        return Scores(*(float(np.mean([getattr(r, f) for r in runs])) for f in Scores.__dataclass_fields__))

    hawq_6, hawq_8, random_8, configs = [], [], [], []
    for seed, analysis in enumerate(analyses):
        bits6 = choose_bits(analysis, QuantizeOptions(size_ratio=HAWQ_RATIO)).bits
        bits8 = choose_bits(analysis, QuantizeOptions(size_ratio=uniform4_ratio)).bits
        rbits = random_allocation(analysis, uniform4_ratio, seed)
        configs.append((bits6, bits8, rbits))
        hawq_6.append(evaluate(analysis, bits6, f"hawq6_{seed}"))
        hawq_8.append(evaluate(analysis, bits8, f"hawq8_{seed}"))
        random_8.append(evaluate(analysis, rbits, f"random8_{seed}"))
    results[f"HAWQ at 1/6 of FP32 (mean of {args.seeds} seeds)"] = averaged(hawq_6)
    results[f"HAWQ at uniform-4-bit size (mean of {args.seeds} seeds)"] = averaged(hawq_8)
    results[f"random allocation at uniform-4-bit size (mean of {args.seeds} seeds)"] = averaged(random_8)

    # Latency, batch 1 and batch 256, one thread.
    hawq_path = work / "hawq6_0.onnx"
    paths = {"FP32": fp32, "INT8 (quantize_static)": ort_int8, "HAWQ 1/6": hawq_path}
    lat1 = latency_ms(paths, split.x_test[:1], 2000)
    lat256 = latency_ms(paths, split.x_test[:256], 100)

    # Markdown.
    lines = [
        f"CNN: 3 Conv (BatchNorm folded) + 2 Gemm, {sum(num_params)} weights, "
        f"{fp32_bytes / 1e3:.1f} kB FP32; trained in {train_seconds:.1f} s; test split 540 images; "
        f"calibration and Hessian on {len(x_calib)} training images ({CALIB_BATCHES} batches of "
        f"{CALIB_BATCH}), cross-entropy loss, 50 Hutchinson probes.",
        "",
        "| model | weight size / FP32 | file kB | test accuracy | top-1 agreement with FP32 |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in results.items():
        lines.append(
            f"| {name} | {s.weight_ratio:.4f} | {s.file_kb:.1f} | {100 * s.accuracy:.2f} % | "
            f"{100 * s.agreement:.2f} % |"
        )
    lines += [
        "",
        "Weight size counts nominal bits (n * b / 8). 2-bit layers are stored as int4, so the files "
        "of configurations with 2-bit layers are larger than their ratio suggests.",
        "",
        "Bits per layer (seed: 1/6 budget | uniform-4-bit budget | random): "
        + "; ".join(f"{i}: {a} / {b} / {c}" for i, (a, b, c) in enumerate(configs)),
        "",
        f"Hessian analysis (eigenvalues + traces, 5 layers): {np.mean(seconds):.1f} s mean, "
        f"{np.max(seconds):.1f} s max per run; process peak RSS {rss_after:.0f} MiB "
        f"({rss_after - rss_before:+.0f} MiB over the five analyses).",
        "",
        "onnxruntime CPU latency, one thread, median (ratio to FP32):",
        "",
        "| model | batch 1 ms | batch 256 ms |",
        "|---|---:|---:|",
    ]
    for key in paths:
        lines.append(
            f"| {key} | {lat1[key]:.3f} ({lat1[key] / lat1['FP32']:.2f}x) | "
            f"{lat256[key]:.2f} ({lat256[key] / lat256['FP32']:.2f}x) |"
        )
    body = "\n".join(lines)
    print(body)
    if not args.no_write:
        from report import write_section

        print("wrote", write_section("hawq_digits", "HAWQ mixed precision on a digits CNN", body))


if __name__ == "__main__":
    main()
