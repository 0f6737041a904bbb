"""HAWQ on a small digits CNN: accuracy, fidelity, size, analysis cost and latency.

Compares, on scikit-learn's digits test split (540 images), with every quantized
model run by onnxruntime from its exported QDQ file:

- FP32, onnxruntime's own ``quantize_static`` (uniform INT8, per-channel, QDQ,
  uint8 activations), uniform 8-bit and 4-bit weights through this tool's exporter,
  HAWQ at 1/6 of the FP32 weight size;
- at equal weight size (the sizes of uniform 2, 2.5, 3 and 4 bits per weight and
  1/6 of FP32): HAWQ against the best-funded uniform configuration that fits the
  budget and against random allocations of the same budget;
- quantization-aware fine-tuning (labels given) applied alike to HAWQ and to the
  uniform baselines.

Fairness: HAWQ, the uniform baselines and the random allocations meet the same
nominal byte budget, and nothing is pinned for any of them: HAWQ keeps the first
and last layers at 8 bits only where its own sensitivities rank them highest. HAWQ and random
choose among the same candidate widths, 2/4/8 bits (and, in a second table,
2/3/4/8). Each of the 5 seeds draws its own 512-image calibration set from the
training split, its own Hessian probes and start vectors, and its own random
layer weights; every configuration, uniform ones included, is exported with the
activation ranges of each seed's calibration set, and the tables give the mean
and spread over the seeds.

Results go to the ``hawq_digits`` section of docs/benchmarks.md.

Usage::

    python -m benchmarks.bench_hawq_digits [--seeds 5] [--no-write]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_digits_cnn import DigitsSplit, export_onnx, load_digits_split, train_digits_cnn

CALIB_BATCH = 64
CALIB_BATCHES = 8
HAWQ_RATIO = 1 / 6
# HAWQ v3's widths plus 2 bits; the second table adds 3 bits for HAWQ and random alike.
HAWQ_BITS = (2, 4, 8)
FINE_BITS = (2, 3, 4, 8)
FINETUNE_EPOCHS = 3
FINETUNE_LR = 1e-4


class Budget(NamedTuple):
    """A weight-size budget as a fraction of the FP32 weight size."""

    name: str
    ratio: float


BUDGETS = (
    Budget("2-bit size (1/16)", 2 / 32),
    Budget("2.5-bit size (5/64)", 2.5 / 32),
    Budget("3-bit size (3/32)", 3 / 32),
    Budget("4-bit size (1/8)", 4 / 32),
    Budget("1/6 of FP32", HAWQ_RATIO),
)


@dataclass
class Scores:
    """Test-split figures of one model."""

    accuracy: float
    agreement: float
    weight_ratio: float
    file_kb: float


class Spread(NamedTuple):
    """Mean, standard deviation (ddof 1), minimum and maximum of one figure over seeds."""

    mean: float
    std: float
    low: float
    high: float


class CalibrationSet(NamedTuple):
    """Calibration images (N, 1, 8, 8) float32 and their integer labels."""

    x: np.ndarray
    y: np.ndarray


def calibration_subset(split: DigitsSplit, seed: int, samples: int) -> CalibrationSet:
    """Return SAMPLES training images drawn without replacement with SEED."""
    index = np.random.default_rng(seed).permutation(len(split.x_train))[:samples]
    return CalibrationSet(split.x_train[index], split.y_train[index])


def random_allocation(analysis, budget_ratio: float, seed: int) -> list[int]:
    """Return the ILP's choice under the budget with random layer weights instead of Hessian traces.

    The candidate widths are those of the analysis. Each layer's weight is
    log-uniform over six decades times 4^-b, so more bits always lower the
    objective while the layers' order is random.
    """
    from quantized_inference_node.hawq.bit_allocation import allocate_bits

    rng = np.random.default_rng(seed)
    bits = sorted(analysis.sensitivities[0].omega)
    omega = [{b: float(10 ** rng.uniform(-3, 3)) * 4.0**-b for b in bits} for _ in analysis.sensitivities]
    return allocate_bits(omega, analysis.num_params, budget_ratio * analysis.fp32_weight_bytes).bits


def best_uniform(num_params: Sequence[int], budget_bytes: float) -> list[int]:
    """Return the largest uniform configuration within the budget.

    Candidates are every layer at b bits, and b bits with the first and last
    layers at 8, for b in 2..8. The largest that fits wins, and on a tie every layer at b.

    Raises:
        ValueError: when not even every layer at 2 bits fits.
    """
    from quantized_inference_node.hawq.bit_allocation import weight_size_bytes

    layers = len(num_params)
    candidates = []
    for b in range(2, 9):
        candidates.append([b] * layers)
        candidates.append([8] + [b] * (layers - 2) + [8])
    fitting = [c for c in candidates if weight_size_bytes(num_params, c) <= budget_bytes * (1 + 1e-9)]
    if not fitting:
        raise ValueError(f"budget {budget_bytes:.0f} bytes is below every layer at 2 bits; raise the budget")
    return max(fitting, key=lambda c: (weight_size_bytes(num_params, c), -len(set(c))))


def restrict_bits(analysis, bits: Sequence[int]):
    """Return a view of ANALYSIS whose sensitivities offer only the widths BITS.

    Omega_i(b) depends on b alone, so an analysis made for a superset of widths
    serves every subset without a second Hessian analysis.
    """
    sensitivities = [
        dataclasses.replace(
            s,
            quant_error={b: s.quant_error[b] for b in bits},
            omega={b: s.omega[b] for b in bits},
        )
        for s in analysis.sensitivities
    ]
    return dataclasses.replace(analysis, sensitivities=sensitivities)


def spread(values: Sequence[float]) -> Spread:
    """Return the mean, standard deviation and range of VALUES."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
    return Spread(float(array.mean()), std, float(array.min()), float(array.max()))


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    """Return the logits of an ONNX model on X (onnxruntime CPU)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def scores(path: Path, x: np.ndarray, y: np.ndarray, reference: np.ndarray, ratio: float) -> Scores:
    """Return accuracy, top-1 agreement with FP32, weight-size ratio and file size of a model."""
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


def percent(s: Spread) -> str:
    """Format a spread of fractions as 'mean ± std (min–max)' in percent."""
    return f"{100 * s.mean:.2f} ± {100 * s.std:.2f} % ({100 * s.low:.2f}–{100 * s.high:.2f})"


def configurations(runs: Sequence[Sequence[int]]) -> str:
    """Return the distinct bit configurations with how many seeds chose each."""
    counts = Counter(tuple(r) for r in runs)
    return "; ".join(f"{list(c)} ×{n}" for c, n in counts.most_common())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seeds", type=int, default=5, help="seeds for HAWQ and random allocations (default 5)"
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")

    from quantized_inference_node.hawq.api import QuantizeOptions, analyze, choose_bits, export_configuration
    from quantized_inference_node.hawq.api import quantize as hawq_quantize
    from quantized_inference_node.hawq.bit_allocation import weight_size_bytes
    from quantized_inference_node.hawq.hessian import HessianSettings

    # FP32 model and onnxruntime's INT8 baseline.
    work = Path(tempfile.mkdtemp(prefix="hawq_digits_"))
    split = load_digits_split()
    started = time.perf_counter()
    model = train_digits_cnn(split)
    train_seconds = time.perf_counter() - started
    fp32 = export_onnx(model, work / "fp32.onnx")
    reference = run_onnx(fp32, split.x_test)
    samples = CALIB_BATCH * CALIB_BATCHES
    calib_sets = [calibration_subset(split, seed, samples) for seed in range(args.seeds)]
    results: dict[str, Scores] = {"FP32": scores(fp32, split.x_test, split.y_test, reference, 1.0)}
    ort_int8 = ort_quantize_static(fp32, work / "ort_int8.onnx", calib_sets[0].x)
    results["onnxruntime quantize_static INT8 (seed 0 calibration)"] = scores(
        ort_int8, split.x_test, split.y_test, reference, 0.25
    )

    # Hessian analysis per seed, with its time and the process's peak memory.
    analyses, seconds = [], []
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for seed, calib in enumerate(calib_sets):
        options = QuantizeOptions(
            bits=FINE_BITS,
            batch_size=CALIB_BATCH,
            max_batches=CALIB_BATCHES,
            seed=seed,
            hessian=HessianSettings(seed=seed),
        )
        analyses.append(analyze(fp32, calib.x, calib.y, options))
        seconds.append(analyses[-1].hessian_seconds)
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    num_params = analyses[0].num_params
    fp32_bytes = analyses[0].fp32_weight_bytes
    layers = len(num_params)

    # Every (seed, configuration) is exported once with that seed's activation ranges.
    cache: dict[tuple[int, tuple[int, ...]], Scores] = {}

    def evaluate(seed: int, bits: Sequence[int]) -> Scores:
        key = (seed, tuple(bits))
        if key not in cache:
            path = work / f"s{seed}_{''.join(map(str, bits))}.onnx"
            export_configuration(analyses[seed], bits, path)
            ratio = weight_size_bytes(num_params, bits) / fp32_bytes
            cache[key] = scores(path, split.x_test, split.y_test, reference, ratio)
        return cache[key]

    def over_seeds(configs: Sequence[Sequence[int]]) -> tuple[Spread, Spread, float, float]:
        runs = [evaluate(seed, bits) for seed, bits in enumerate(configs)]
        return (
            spread([r.accuracy for r in runs]),
            spread([r.agreement for r in runs]),
            float(np.mean([r.weight_ratio for r in runs])),
            float(np.mean([r.file_kb for r in runs])),
        )

    # Reference rows: uniform 8 and 4 bits, HAWQ at 1/6, each averaged over the seeds.
    hawq_views = {bits: [restrict_bits(a, bits) for a in analyses] for bits in (HAWQ_BITS, FINE_BITS)}
    hawq_sixth = [
        choose_bits(a, QuantizeOptions(bits=HAWQ_BITS, size_ratio=HAWQ_RATIO)).bits
        for a in hawq_views[HAWQ_BITS]
    ]
    summary_rows = {
        f"uniform 8-bit (this tool; mean of {args.seeds} calibration seeds)": [[8] * layers] * args.seeds,
        f"uniform 4-bit (this tool; mean of {args.seeds} calibration seeds)": [[4] * layers] * args.seeds,
        f"HAWQ 2/4/8 at 1/6 of FP32 (mean of {args.seeds} seeds)": hawq_sixth,
    }
    for name, configs in summary_rows.items():
        accuracy, agreement, ratio, file_kb = over_seeds(configs)
        results[name] = Scores(accuracy.mean, agreement.mean, ratio, file_kb)

    # Equal-size comparison: uniform, HAWQ and random under each budget.
    table: list[tuple[str, str, str, float, Spread, Spread]] = []
    margins: list[str] = []
    for budget in BUDGETS:
        budget_bytes = budget.ratio * fp32_bytes
        uniform = best_uniform(num_params, budget_bytes)
        rows = {"uniform": [uniform] * args.seeds}
        for bits in (HAWQ_BITS, FINE_BITS):
            label = "/".join(map(str, bits))
            rows[f"HAWQ {label}"] = [
                choose_bits(a, QuantizeOptions(bits=bits, size_ratio=budget.ratio)).bits
                for a in hawq_views[bits]
            ]
            rows[f"random {label}"] = [
                random_allocation(a, budget.ratio, seed) for seed, a in enumerate(hawq_views[bits])
            ]
        measured = {}
        for name, configs in rows.items():
            accuracy, agreement, ratio, _ = over_seeds(configs)
            measured[name] = (accuracy, agreement)
            table.append((budget.name, name, configurations(configs), ratio, accuracy, agreement))
        for label in ("2/4/8", "2/3/4/8"):
            hawq_acc, hawq_agr = measured[f"HAWQ {label}"]
            margins.append(
                f"| {budget.name} | {label} | "
                f"{100 * (hawq_acc.mean - measured['uniform'][0].mean):+.2f} | "
                f"{100 * (hawq_agr.mean - measured['uniform'][1].mean):+.2f} | "
                f"{100 * (hawq_acc.mean - measured[f'random {label}'][0].mean):+.2f} | "
                f"{100 * (hawq_agr.mean - measured[f'random {label}'][1].mean):+.2f} |"
            )

    # Quantization-aware fine-tuning, alike for uniform and HAWQ (seed 0's calibration set).
    finetuned: list[tuple[str, list[int], Scores, Scores]] = []
    finetune_cases = (
        ("uniform 2-bit (= HAWQ at the 2-bit size)", (2,), 2 / 32),
        ("uniform 3-bit", (3,), 3 / 32),
        ("HAWQ 2/4/8 at the 3-bit size", HAWQ_BITS, 3 / 32),
    )
    for name, bits, ratio in finetune_cases:
        options = QuantizeOptions(
            bits=bits,
            size_ratio=ratio,
            batch_size=CALIB_BATCH,
            max_batches=CALIB_BATCHES,
            seed=0,
            hessian=HessianSettings(seed=0),
            finetune_epochs=FINETUNE_EPOCHS,
            finetune_lr=FINETUNE_LR,
        )
        path = work / f"finetuned_{len(finetuned)}.onnx"
        result = hawq_quantize(fp32, calib_sets[0].x, path, labels=calib_sets[0].y, options=options)
        chosen = result.allocation.bits
        after = scores(path, split.x_test, split.y_test, reference, result.allocation.size_bytes / fp32_bytes)
        finetuned.append((name, chosen, evaluate(0, chosen), after))

    # Latency, batch 1 and batch 256, one thread.
    hawq_path = work / f"s0_{''.join(map(str, hawq_sixth[0]))}.onnx"
    paths = {"FP32": fp32, "INT8 (quantize_static)": ort_int8, "HAWQ 1/6": hawq_path}
    lat1 = latency_ms(paths, split.x_test[:1], 2000)
    lat256 = latency_ms(paths, split.x_test[:256], 100)

    # Markdown.
    lines = [
        f"CNN: 3 Conv (BatchNorm folded) + 2 Gemm, {sum(num_params)} weights "
        f"(per layer {num_params}), {fp32_bytes / 1e3:.1f} kB FP32; trained in {train_seconds:.1f} s; "
        f"test split 540 images. Each of {args.seeds} seeds draws {samples} training images "
        f"({CALIB_BATCHES} batches of {CALIB_BATCH}) for activation ranges and the Hessian "
        "(cross-entropy loss, 50 Hutchinson probes, power iteration up to 100 steps), seeds its "
        "probes and start vectors, and seeds its random allocation. All figures are onnxruntime "
        "runs of the exported QDQ files on the test split.",
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
        "Weight size counts nominal bits (n * b / 8). 2- and 3-bit layers are stored as int4, so the "
        "files of configurations with such layers are larger than their ratio suggests.",
        "",
        f"### At equal weight size (mean ± standard deviation over {args.seeds} seeds, with min–max)",
        "",
        "Uniform: the largest configuration of the form 'every layer at b bits' or 'b bits with the "
        "first and last layers at 8' that fits the budget; its figures vary over the seeds only "
        "through the calibration set's activation ranges. HAWQ and random choose among the widths "
        "named, under the same budget, nothing pinned. At the 2-bit size every layer must take "
        "2 bits, so all three are the same model by construction.",
        "",
        "| budget | allocation | bits per layer (×seeds) | weight size / FP32 | test accuracy | "
        "agreement with FP32 |",
        "|---|---|---|---:|---:|---:|",
    ]
    for budget_name, name, configs, ratio, accuracy, agreement in table:
        lines.append(
            f"| {budget_name} | {name} | {configs} | {ratio:.4f} | {percent(accuracy)} | "
            f"{percent(agreement)} |"
        )
    lines += [
        "",
        "HAWQ's lead in points (mean over seeds; positive: HAWQ better):",
        "",
        "| budget | widths | accuracy vs uniform | agreement vs uniform | accuracy vs random | "
        "agreement vs random |",
        "|---|---|---:|---:|---:|---:|",
        *margins,
        "",
        f"### Quantization-aware fine-tuning ({FINETUNE_EPOCHS} epochs per block, Adam lr {FINETUNE_LR:g}, "
        "seed 0's calibration images and labels)",
        "",
        "| model | bits per layer | accuracy before → after | agreement before → after |",
        "|---|---|---:|---:|",
    ]
    for name, chosen, before, after in finetuned:
        lines.append(
            f"| {name} | {chosen} | {100 * before.accuracy:.2f} → {100 * after.accuracy:.2f} % | "
            f"{100 * before.agreement:.2f} → {100 * after.agreement:.2f} % |"
        )
    lines += [
        "",
        f"Hessian analysis (eigenvalues + traces, 5 layers): {np.mean(seconds):.1f} s mean, "
        f"{np.max(seconds):.1f} s max per run; process peak RSS {rss_after:.0f} MiB "
        f"({rss_after - rss_before:+.0f} MiB over the {args.seeds} analyses).",
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
