"""Evaluate the 7-Scenes monocular depth network: FP32, uniform INT8 and HAWQ mixed precision.

The network (benchmarks/train_depth_network.py) maps one 160x128 RGB image to metric
depth at 80x64. This script scores each variant on the validation frames 240-299 of
the 7-Scenes redkitchen excerpt:

- abs-rel: mean of |d_pred - d_gt| / d_gt over valid ground-truth pixels;
- delta<1.25: fraction of valid pixels with max(d_pred/d_gt, d_gt/d_pred) < 1.25;

both at the network's output resolution (80x64). The ground truth is reduced from
640x480 by nearest-neighbour sampling (cv2.INTER_NEAREST), so each output pixel takes
one real measurement and no depth is invented across edges. A pixel whose sample is
invalid is left out. It also measures onnxruntime CPU latency per image (p50, p90),
every variant in one run so the ratios to FP32 are comparable, and the model sizes.

The validation frames come from the same room and the same few seconds of recording
as the training frames 0-239, so these figures overstate how well the network
generalizes: they show what quantization costs, not how the network does elsewhere.

The uniform INT8 model is onnxruntime's quantize_static (QDQ, per-channel int8
weights, uint8 activations, min-max calibration on 32 training frames), written to a
work folder; FP32 and HAWQ are the committed models in
quantized_inference_node/models/depth_7scenes/.

Usage::

    python -m benchmarks.bench_depth_network
    python -m benchmarks.bench_depth_network --data /path/to/7scenes_redkitchen --runs 1000
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from quantized_inference_node.inference import prepare_input
from quantized_inference_node.model_card import ChannelOrder, InputSpec, ModelCard, load_model_card

LOGGER = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "7scenes_redkitchen"
MODEL_DIR = REPO_ROOT / "quantized_inference_node" / "models" / "depth_7scenes"
FP32_MODEL = MODEL_DIR / "model.onnx"
HAWQ_MODEL = MODEL_DIR / "model_hawq.onnx"

TRAIN_FRAMES = tuple(range(0, 240))
VALIDATION_FRAMES = tuple(range(240, 300))
# Valid range of the decoded depth. The excerpt's valid measurements lie between 0.80 m and
# 3.60 m, so the range drops only the 0 and 65535 markers there.
MIN_DEPTH_M = 0.2
MAX_DEPTH_M = 6.0
# Network output size (width, height): half the 160x128 input.
OUTPUT_SIZE = (80, 64)
INT8_CALIBRATION_FRAMES = 32


@dataclass(frozen=True)
class DepthSamples:
    """Network inputs and ground truth of some frames.

    Attributes:
        images: (N, 3, H, W) float32 input tensors, preprocessed per the card's input section.
        depth_m: (N, 1, h, w) float32 ground-truth depth in metres at the output size,
            NaN where the sensor gave no valid measurement.
        frame_indices: The dataset positions of the N frames.
    """

    images: np.ndarray
    depth_m: np.ndarray
    frame_indices: tuple[int, ...]


@dataclass(frozen=True)
class DepthMetrics:
    """Standard monocular depth errors over valid ground-truth pixels.

    Attributes:
        abs_rel: Mean |d_pred - d_gt| / d_gt.
        delta_1_25: Fraction of pixels with max(d_pred/d_gt, d_gt/d_pred) < 1.25.
        rmse_m: Root mean square error in metres.
        valid_pixels: Number of pixels scored.
    """

    abs_rel: float
    delta_1_25: float
    rmse_m: float
    valid_pixels: int


@dataclass(frozen=True)
class LatencySummary:
    """onnxruntime CPU latency per image.

    Attributes:
        p50_ms, p90_ms: Percentiles of the latency in milliseconds.
        ratio_to_reference: Median over rounds of this model's time divided by the
            reference model's time in the same round (1.0 for the reference).
    """

    p50_ms: float
    p90_ms: float
    ratio_to_reference: float


@dataclass(frozen=True)
class ModelSize:
    """Storage of one ONNX model.

    Attributes:
        file_bytes: Size of the .onnx file.
        initializer_bytes: Stored bytes of all initializers (int4 counted as half a byte).
        conv_weight_bits: Bits per weight of each Conv, in graph order: 32 for float
            weights, else the integer type's width behind the weight's DequantizeLinear.
    """

    file_bytes: int
    initializer_bytes: int
    conv_weight_bits: tuple[int, ...]


@dataclass(frozen=True)
class VariantResult:
    """One evaluated model: its file, errors, latency and size."""

    name: str
    path: Path
    metrics: DepthMetrics
    latency: LatencySummary
    size: ModelSize


def downsample_depth_nearest(depth_m: np.ndarray, output_size: tuple[int, int]) -> np.ndarray:
    """Reduce a depth image to OUTPUT_SIZE by nearest-neighbour sampling; NaN stays NaN.

    Args:
        depth_m: (H, W) float32 depth in metres, NaN invalid.
        output_size: (width, height) of the result in pixels.

    Returns:
        (height, width) float32 depth in metres.

    Raises:
        ValueError: when DEPTH_M is not 2-D or OUTPUT_SIZE is not two positive ints.
    """
    depth_m = np.asarray(depth_m)
    if depth_m.ndim != 2:
        raise ValueError(
            f"invalid depth shape {depth_m.shape}: expected (height, width); squeeze a channel axis first"
        )
    width, height = output_size
    if width < 1 or height < 1:
        raise ValueError(f"invalid output_size {output_size}: expected (width, height) >= 1")
    return cv2.resize(depth_m.astype(np.float32), (width, height), interpolation=cv2.INTER_NEAREST)


def load_depth_samples(
    data_dir: str | Path,
    frame_indices: Sequence[int],
    input_spec: InputSpec,
    input_size: tuple[int, int],
    output_size: tuple[int, int] = OUTPUT_SIZE,
) -> DepthSamples:
    """Read 7-Scenes frames and turn them into network inputs and ground-truth depth.

    The images go through the inference node's own preprocessing
    (quantized_inference_node.inference.prepare_input), so training, this benchmark
    and the node feed the network identically.

    Args:
        data_dir: The 7-Scenes sequence folder.
        frame_indices: Dataset positions to read.
        input_spec: The card's input section.
        input_size: (width, height) of the input tensor.
        output_size: (width, height) of the network output; ground truth is reduced to it.

    Raises:
        FileNotFoundError: when the folder or a frame's files are missing.
        IndexError: when a frame index is out of range.
        ValueError: when FRAME_INDICES is empty.
    """
    from surfel_mapping_node.datasets.seven_scenes import SevenScenesDataset
    from surfel_mapping_node.depth import decode_depth

    if len(frame_indices) == 0:
        raise ValueError("frame_indices is empty: give at least one frame, e.g. range(240, 300)")
    dataset = SevenScenesDataset(data_dir)

    images, depths = [], []
    for index in frame_indices:
        frame = dataset[index]
        prepared = prepare_input(frame.image, ChannelOrder.RGB, input_spec, input_size)
        images.append(prepared.tensor[0])
        depth_m = decode_depth(frame.depth_raw, frame.depth_scale, MIN_DEPTH_M, MAX_DEPTH_M)
        depths.append(downsample_depth_nearest(depth_m, output_size)[np.newaxis])
    return DepthSamples(np.stack(images), np.stack(depths), tuple(int(i) for i in frame_indices))


def depth_metrics(pred_m: np.ndarray, gt_m: np.ndarray) -> DepthMetrics:
    """Score predicted depth against ground truth on the pixels where the ground truth is valid.

    Args:
        pred_m: Predicted depth in metres, any shape.
        gt_m: Ground truth in metres, same shape, NaN or <= 0 where invalid.

    Raises:
        ValueError: when the shapes differ or no ground-truth pixel is valid.
    """
    pred_m = np.asarray(pred_m, dtype=np.float64)
    gt_m = np.asarray(gt_m, dtype=np.float64)
    if pred_m.shape != gt_m.shape:
        raise ValueError(
            f"invalid prediction shape {pred_m.shape}: expected the ground truth's shape {gt_m.shape}"
        )
    valid = np.isfinite(gt_m) & (gt_m > 0)
    if not valid.any():
        raise ValueError(
            "no valid ground-truth pixel: every depth is NaN or <= 0; score frames with depth measurements"
        )

    pred, gt = pred_m[valid], gt_m[valid]
    ratio = np.maximum(pred / gt, gt / pred)
    return DepthMetrics(
        abs_rel=float(np.mean(np.abs(pred - gt) / gt)),
        delta_1_25=float(np.mean(ratio < 1.25)),
        rmse_m=float(np.sqrt(np.mean((pred - gt) ** 2))),
        valid_pixels=int(valid.sum()),
    )


def make_session(model_path: str | Path, threads: int = 1):
    """Return an onnxruntime CPU session with a fixed thread count (one thread gives steadier timings)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model_path), sess_options=options, providers=["CPUExecutionProvider"])


def predict_depth(
    model_path: str | Path, images: np.ndarray, input_name: str, threads: int = 1
) -> np.ndarray:
    """Run a depth model image by image; return (N, 1, h, w) float32 depth in metres."""
    session = make_session(model_path, threads)
    return np.concatenate([session.run(None, {input_name: images[i : i + 1]})[0] for i in range(len(images))])


def measure_latency(
    sessions: dict[str, object], image: np.ndarray, input_name: str, runs: int
) -> dict[str, LatencySummary]:
    """Time every session on one image, interleaved round by round so load spikes hit all alike.

    Args:
        sessions: name -> onnxruntime session; the first is the reference of the ratios.
        image: (1, 3, H, W) float32 input tensor.
        input_name: The model input's name.
        runs: Timed runs per session (after 5 warm-up runs).

    Raises:
        ValueError: when RUNS < 1.
    """
    if runs < 1:
        raise ValueError(f"invalid runs {runs}: give 1 or more")
    if not sessions:
        raise ValueError("no sessions to time: give at least the reference model's session")
    for session in sessions.values():
        for _ in range(5):
            session.run(None, {input_name: image})

    times_ms: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, {input_name: image})
            times_ms[name].append(1e3 * (time.perf_counter() - started))

    # Per-round ratios cancel the slow drifts of a shared machine's load.
    reference = np.asarray(next(iter(times_ms.values())))
    return {
        name: LatencySummary(
            float(np.percentile(t, 50)),
            float(np.percentile(t, 90)),
            float(np.median(np.asarray(t) / reference)),
        )
        for name, t in times_ms.items()
    }


def quantize_uniform_int8(
    fp32_path: Path, calibration_images: np.ndarray, input_name: str, out_path: Path
) -> Path:
    """Write onnxruntime's uniform INT8 model: QDQ, per-channel int8 weights, uint8 activations.

    Args:
        fp32_path: The FP32 model.
        calibration_images: (N, 3, H, W) float32 calibration inputs.
        input_name: The model input's name.
        out_path: Where to write the quantized model.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _FrameReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter(
                [{input_name: calibration_images[i : i + 1]} for i in range(len(calibration_images))]
            )

        def get_next(self):
            return next(self._feeds, None)

    quantize_static(
        str(fp32_path),
        str(out_path),
        _FrameReader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
    )
    return out_path


def model_size(model_path: Path) -> ModelSize:
    """Return the file size, the initializers' stored bytes and each Conv's weight bits."""
    import onnx

    model = onnx.load(str(model_path))
    initializers = {init.name: init for init in model.graph.initializer}
    four_bit = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)

    def stored_bits(init: onnx.TensorProto) -> int:
        if init.data_type in four_bit:
            return 4
        return 8 * onnx.helper.tensor_dtype_to_np_dtype(init.data_type).itemsize

    total_bytes = sum((int(np.prod(i.dims)) * stored_bits(i) + 7) // 8 for i in initializers.values())

    # A quantized Conv reads its weight through a DequantizeLinear of an integer initializer.
    producers = {output: node for node in model.graph.node for output in node.output}
    bits = []
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        weight = node.input[1]
        producer = producers.get(weight)
        if producer is not None and producer.op_type == "DequantizeLinear":
            weight = producer.input[0]
        bits.append(stored_bits(initializers[weight]))
    return ModelSize(model_path.stat().st_size, total_bytes, tuple(bits))


def evaluate(
    data_dir: Path, card: ModelCard, variants: dict[str, Path], runs: int, threads: int
) -> list[VariantResult]:
    """Score and time every variant on the validation frames."""
    input_size = (card.input.width, card.input.height)
    validation = load_depth_samples(data_dir, VALIDATION_FRAMES, card.input, input_size)

    sessions = {name: make_session(path, threads) for name, path in variants.items()}
    latency = measure_latency(sessions, validation.images[:1], card.input.name, runs)

    results = []
    for name, path in variants.items():
        pred_m = predict_depth(path, validation.images, card.input.name, threads)
        metrics = depth_metrics(pred_m, validation.depth_m)
        results.append(VariantResult(name, path, metrics, latency[name], model_size(path)))
    return results


def results_markdown(results: Sequence[VariantResult]) -> str:
    """Return the benchmark's section body: caveat, table and method."""
    reference = results[0]
    lines = [
        "Validation frames 240-299 of the 7-Scenes redkitchen excerpt (network trained on frames "
        "0-239 of the same recording). **These frames come from the same room and the same few seconds "
        "as the training frames, so the errors below overstate how well the network generalizes**; "
        "they compare the quantized variants with FP32, nothing more.",
        "",
        "| model | abs-rel | δ<1.25 | RMSE (m) | p50 latency (ms) | p90 latency (ms) | time / FP32 "
        "| initializers (kB) | file (kB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        lines.append(
            f"| {result.name} | {result.metrics.abs_rel:.4f} | {result.metrics.delta_1_25:.4f} | "
            f"{result.metrics.rmse_m:.3f} | {result.latency.p50_ms:.2f} | {result.latency.p90_ms:.2f} | "
            f"{result.latency.ratio_to_reference:.2f} | "
            f"{result.size.initializer_bytes / 1e3:.1f} | {result.size.file_bytes / 1e3:.1f} |"
        )
    lines += [
        "",
        f"- Metrics over {reference.metrics.valid_pixels} valid pixels at the output resolution 80x64; "
        "ground truth reduced from 640x480 by nearest-neighbour sampling (invalid samples left out), "
        f"valid range {MIN_DEPTH_M}-{MAX_DEPTH_M} m.",
        "- Latency: onnxruntime CPU provider, one thread, one image per run, the variants interleaved "
        "round by round in one process. time / FP32 is the median over rounds of the variant's time "
        "divided by FP32's time in the same round. On this shared 2-core machine the ratios moved between "
        "runs (uniform INT8 0.20-0.47, HAWQ 0.39-0.75 over seven runs), so read them as a ranking.",
        "- Initializers: stored bytes of all weights, biases and quantization parameters (int4 counted "
        "as half a byte). Uniform INT8 is onnxruntime quantize_static (QDQ, per-channel int8 weights, "
        f"uint8 activations, min-max calibration on {INT8_CALIBRATION_FRAMES} training frames).",
    ]
    for result in results[1:]:
        bits = ", ".join(str(b) for b in result.size.conv_weight_bits)
        lines.append(f"- {result.name} weight bits per Conv, input to output: {bits}.")
    lines.append(
        "- onnxruntime fuses only 8-bit weights into integer convolutions (QLinearConv); 4-bit layers "
        "run as DequantizeLinear followed by a float Conv, the likely reason HAWQ is slower than uniform "
        "INT8."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its section of docs/benchmarks.md."""
    parser = argparse.ArgumentParser(
        description="Evaluate the 7-Scenes depth network: FP32, uniform INT8 and HAWQ.",
        epilog="example: python -m benchmarks.bench_depth_network --runs 1000",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="7-Scenes redkitchen folder")
    parser.add_argument("--runs", type=int, default=1000, help="timed runs per model (default 1000)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--work-dir", type=Path, help="folder for the INT8 model (default: a temporary one)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave docs/benchmarks.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    if not args.data.is_dir():
        parser.error(f"7-Scenes folder {args.data} not found; pass --data")
    if not FP32_MODEL.is_file():
        parser.error(f"{FP32_MODEL} not found; run python -m benchmarks.train_depth_network first")
    if args.runs < 1:
        parser.error(f"invalid --runs {args.runs}: give 1 or more")
    if args.threads < 1:
        parser.error(f"invalid --threads {args.threads}: give 1 or more")
    card = load_model_card(FP32_MODEL.with_suffix(".yaml"))

    with tempfile.TemporaryDirectory() as tmp:
        work_dir = args.work_dir or Path(tmp)
        work_dir.mkdir(parents=True, exist_ok=True)
        input_size = (card.input.width, card.input.height)
        step = len(TRAIN_FRAMES) // INT8_CALIBRATION_FRAMES
        calibration_frames = TRAIN_FRAMES[::step][:INT8_CALIBRATION_FRAMES]
        calibration = load_depth_samples(args.data, calibration_frames, card.input, input_size)
        int8_path = quantize_uniform_int8(
            FP32_MODEL, calibration.images, card.input.name, work_dir / "model_int8.onnx"
        )

        variants = {"FP32": FP32_MODEL, "uniform INT8": int8_path}
        if HAWQ_MODEL.is_file():
            variants["HAWQ mixed"] = HAWQ_MODEL
        else:
            LOGGER.warning("%s not found; evaluating FP32 and INT8 only", HAWQ_MODEL)
        results = evaluate(args.data, card, variants, args.runs, args.threads)

    markdown = results_markdown(results)
    print(markdown)
    if not args.no_write:
        from benchmarks.report import write_section

        write_section("depth_network", "Monocular depth network (7-Scenes)", markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
