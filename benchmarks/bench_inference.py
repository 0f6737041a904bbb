"""Latency of FP32, uniform INT8 and HAWQ mixed-precision models, and through the ROS node.

For each model (the PP-OCRv4 text detector and the PP-OCR text-orientation classifier
of the rapidocr-onnxruntime wheel, and the packaged depth_7scenes network with its
HAWQ model), in one process:
  - builds a uniform INT8 model with onnxruntime's quantize_static (QDQ, per-channel
    int8 weights, uint8 activations, MinMax calibration on scikit-image's pictures),
    after upgrading the model to opset 13 because per-channel DequantizeLinear needs it;
  - builds a second INT8 model with only the Conv nodes quantized;
  - times FP32, both INT8 models and, when given with --hawq, the HAWQ tool's output.
    The runs are interleaved image by image, so machine load hits all variants alike,
    and the table gives p50, p90 and the ratio to FP32;
  - counts the operators of each graph after ONNX Runtime's optimizations (QLinearConv
    against Conv between DequantizeLinear and QuantizeLinear) and profiles the time per
    operator type, which shows what keeps a quantized model from being faster;
  - compares outputs with FP32 (text-map IoU, orientation agreement).
Then it measures end-to-end latency through quantized_inference_node (image stamp to
the received ~/labels) with rclpy on localhost. Results go to docs/benchmarks.md
(section "inference").

  python -m benchmarks.bench_inference [--threads 1] [--rounds 30]
      [--hawq ppocr_det_v4=/path/det_hawq.onnx] [--hawq ppocr_cls_v2=/path/cls_hawq.onnx]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper, version_converter
from onnxruntime import quantization

from benchmarks.report import write_section
from quantized_inference_node.inference import InferenceEngine
from quantized_inference_node.model_card import ChannelOrder, ModelCard, load_model_card, resolve_path
from quantized_inference_node.preprocessing import prepare_input

PACKAGE_MODELS = "pkg:rapidocr_onnxruntime/models"
INT8_LABEL = "INT8 (quantize_static)"
# Speed-up over FP32 that a quantized model should reach to be worth serving.
TARGET_SPEEDUP = 1.5
ANALYSIS = """### Why the quantized models are not faster everywhere, and what would fix it

- Where FP32 is fast: ONNX Runtime runs FP32 convolutions in its NCHWc (channel-blocked)
  float kernels with the activation fused in; the ReorderInput/ReorderOutput nodes above
  mark them. A QDQ graph becomes QLinearConv in plain NCHW, so int8 arithmetic has to beat
  blocked, fused float kernels; the "convolution" rows show where it does. The classifier
  gives int8 little to win: its 53 convolutions on a 48x192 input have 8 to 200 channels,
  and many are 1x1 squeeze-excitation convolutions on a 1x1 map or 5x5 depthwise ones.
- Elementwise work gets dearer: the hard-swish and squeeze-excitation multiplies and adds
  become QLinearMul and QLinearAdd, which requantize every output, and hard-swish's
  division by 6 stays a float Div between DequantizeLinear and QuantizeLinear (the
  "QuantizeLinear + DequantizeLinear" row).
- Quantizing only the convolutions ("INT8, Conv only") keeps those elementwise operators
  in float, at the price of a QuantizeLinear/DequantizeLinear pair at every boundary
  between a convolution and a float operator; its rows above show what that trade gives.
- What would fix it: a model that runs in about a millisecond, like the classifier,
  leaves quantization too little arithmetic to win back its QuantizeLinear,
  DequantizeLinear and requantization costs, so serve it in FP32 unless its table above
  says otherwise. Where INT8 is fast enough but loses outputs (low IoU or agreement),
  calibrate on more images from the deployment domain and keep the layers that lose most
  in higher precision, which is what the HAWQ tool's mixed precision chooses per layer.
- The HAWQ models are smaller but not faster: ONNX Runtime fuses only 8-bit weights into
  QLinearConv, so their 4-bit layers run as DequantizeLinear followed by a float Conv on
  every run, and the activations the tool keeps in float (24 on the text detector) add
  QuantizeLinear/DequantizeLinear pairs (see their "convolution" and "QuantizeLinear +
  DequantizeLinear" rows). HAWQ buys size and fidelity here, not speed. What would fix
  it: an int4 convolution kernel (ONNX Runtime's MatMulNBits covers MatMul and Gemm
  only), or, where latency matters more than size, restricting the tool to 8-bit
  weights (`--bits 8`) and quantizing every activation.
- Wall-clock figures on a shared machine move with the load of other processes; the
  profiled kernel-time ratios are the steadier comparison of the kernels themselves.
"""
# Operator families compared between FP32 and quantized graphs.
OPERATOR_FAMILIES = {
    "convolution": ("Conv", "FusedConv", "QLinearConv", "ConvTranspose", "ConvInteger"),
    "multiply": ("Mul", "QLinearMul"),
    "add": ("Add", "QLinearAdd"),
    "QuantizeLinear + DequantizeLinear": ("QuantizeLinear", "DequantizeLinear"),
    "NCHWc layout reorders": ("ReorderInput", "ReorderOutput"),
}
CARDS = "pkg:quantized_inference_node/models"


@dataclass
class Variant:
    """One model file of one benchmarked model."""

    label: str
    path: Path
    session: ort.InferenceSession | None = None
    latencies_ms: list[float] = field(default_factory=list)


@dataclass
class ModelUnderTest:
    """A model, its card, the images it is timed on and the ones it is calibrated on."""

    name: str
    model_path: str
    card_path: str
    timing_image: np.ndarray
    calibration_images: list[np.ndarray]
    check_images: dict[str, np.ndarray]


def skimage_pictures() -> dict[str, np.ndarray]:
    from skimage import data

    return {
        name: getattr(data, name)() for name in ("page", "coffee", "text", "camera", "astronaut", "chelsea")
    }


def text_lines(page: np.ndarray) -> list[np.ndarray]:
    """Crop text lines (40x140 pixels) from scikit-image's page, upright and upside down."""
    lines = [np.ascontiguousarray(page[top : top + 40, 10:150]) for top in range(5, 150, 20)]
    return lines + [np.ascontiguousarray(line[::-1, ::-1]) for line in lines]


def models_under_test() -> list[ModelUnderTest]:
    pictures = skimage_pictures()
    lines = text_lines(pictures["page"])
    return [
        ModelUnderTest(
            "ppocr_det_v4",
            f"{PACKAGE_MODELS}/ch_PP-OCRv4_det_infer.onnx",
            f"{CARDS}/ppocr_det_v4.yaml",
            pictures["coffee"],
            list(pictures.values()),
            {"page": pictures["page"], "coffee": pictures["coffee"]},
        ),
        ModelUnderTest(
            "depth_7scenes",
            f"{CARDS}/depth_7scenes/model.onnx",
            f"{CARDS}/depth_7scenes/model.yaml",
            pictures["chelsea"],
            list(pictures.values()),
            {name: pictures[name] for name in ("coffee", "astronaut", "chelsea")},
        ),
        ModelUnderTest(
            "ppocr_cls_v2",
            f"{PACKAGE_MODELS}/ch_ppocr_mobile_v2.0_cls_infer.onnx",
            f"{CARDS}/ppocr_cls_v2.yaml",
            lines[0],
            lines,
            {f"line{i}": line for i, line in enumerate(lines)},
        ),
    ]


def input_tensor(card: ModelCard, fixed_size: tuple[int, int], image: np.ndarray) -> np.ndarray:
    return prepare_input(image, ChannelOrder.RGB, card.input, fixed_size).tensor


def constants_to_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move Constant nodes into graph initializers.

    The quantizer quantizes initializers as weights (int8, once, offline) but treats a
    Constant node's output as an activation, quantized at run time. The PP-OCR models of
    rapidocr-onnxruntime 1.4.4 have no initializers: every weight is a Constant node.
    """
    kept = []
    for node in model.graph.node:
        if node.op_type == "Constant" and [a.name for a in node.attribute] == ["value"]:
            value = numpy_helper.to_array(node.attribute[0].t)
            model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        else:
            kept.append(node)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    return model


def prepare_for_quantization(model: ModelUnderTest, work_dir: Path, log: Callable[[str], None]) -> Path:
    """Write MODEL at opset 13 or newer with weights as initializers, Conv and BatchNormalization fused."""
    upgraded = work_dir / f"{model.name}_opset13.onnx"
    source = constants_to_initializers(onnx.load(resolve_path(model.model_path)))
    opset = next(o.version for o in source.opset_import if o.domain in ("", "ai.onnx"))
    onnx.save(version_converter.convert_version(source, 13) if opset < 13 else source, upgraded)

    # Fold constants and fuse Conv with BatchNormalization before quantizing, or the QDQ
    # pairs between them block the fusion and BatchNormalization runs in float.
    preprocessed = work_dir / f"{model.name}_preprocessed.onnx"
    try:
        quantization.quant_pre_process(str(upgraded), str(preprocessed), skip_symbolic_shape=True)
    except Exception as error:  # onnxruntime's pre-processing has no narrower error type
        log(f"quant_pre_process failed on {model.name} ({error!r}); using ORT's basic optimizations")
        make_session(
            upgraded,
            1,
            optimized_model_filepath=str(preprocessed),
            graph_optimization_level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        )
    return preprocessed


def quantize_uint8(
    model: ModelUnderTest,
    engine: InferenceEngine,
    prepared: Path,
    output: Path,
    op_types: list[str] | None = None,
) -> Path:
    """Write a QDQ model (per-channel int8 weights, uint8 activations) of PREPARED to OUTPUT.

    Args:
        op_types: Operator types to quantize; None quantizes all that onnxruntime can.
    """
    feeds = [
        {engine.card.input.name: input_tensor(engine.card, engine.fixed_size, image)}
        for image in model.calibration_images
    ]

    class Reader(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.iterator = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.iterator, None)

    quantization.quantize_static(
        str(prepared),
        str(output),
        Reader(),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=True,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
        calibrate_method=quantization.CalibrationMethod.MinMax,
        op_types_to_quantize=op_types,
    )
    return output


def make_session(path: Path, threads: int, **options: object) -> ort.InferenceSession:
    session_options = ort.SessionOptions()
    session_options.intra_op_num_threads = threads
    session_options.inter_op_num_threads = 1
    for name, value in options.items():
        setattr(session_options, name, value)
    return ort.InferenceSession(str(path), session_options, providers=["CPUExecutionProvider"])


def time_interleaved(variants: list[Variant], feed: dict[str, np.ndarray], rounds: int) -> None:
    """Run every variant once per round, in turn, and record each run's latency."""
    for variant in variants:
        for _ in range(3):
            variant.session.run(None, feed)
    for _ in range(rounds):
        for variant in variants:
            start = time.perf_counter()
            variant.session.run(None, feed)
            variant.latencies_ms.append((time.perf_counter() - start) * 1e3)


def optimized_operator_counts(path: Path, work_dir: Path, threads: int) -> tuple[collections.Counter, Path]:
    """Count operator types in the graph ONNX Runtime runs after its optimizations."""
    optimized = work_dir / f"{path.stem}_optimized.onnx"
    make_session(path, threads, optimized_model_filepath=str(optimized))
    return collections.Counter(node.op_type for node in onnx.load(optimized).graph.node), optimized


@dataclass
class Profile:
    """Milliseconds per run by operator type (sum of node medians), and the slowest nodes."""

    per_op_ms: dict[str, float]
    slowest_nodes: list[tuple[str, str, float]]


def profile_run(path: Path, feed: dict[str, np.ndarray], runs: int, work_dir: Path, threads: int) -> Profile:
    """Profile RUNS runs after one warm-up run, which is left out of the figures."""
    session = make_session(
        path, threads, enable_profiling=True, profile_file_prefix=str(work_dir / f"{path.stem}_profile")
    )
    for _ in range(runs + 1):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())

    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    warm_up_end_us = model_runs[0]["ts"] + model_runs[0]["dur"] if model_runs else 0
    durations_ms: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for event in events:
        if event.get("cat") != "Node" or not event["name"].endswith("_kernel_time"):
            continue
        if event["ts"] < warm_up_end_us:
            continue
        node = (event["name"].removesuffix("_kernel_time"), event["args"]["op_name"])
        durations_ms[node].append(event["dur"] / 1e3)

    # Medians per node, because one preempted run on a shared machine skews a mean.
    per_node = {node: float(np.median(values)) for node, values in durations_ms.items()}
    per_op: dict[str, float] = collections.defaultdict(float)
    for (_, op), ms in per_node.items():
        per_op[op] += ms
    ordered_ops = dict(sorted(per_op.items(), key=lambda kv: -kv[1]))
    slowest = sorted(((name, op, ms) for (name, op), ms in per_node.items()), key=lambda t: -t[2])[:3]
    return Profile(ordered_ops, slowest)


def family_table(profiles: dict[str, Profile]) -> list[str]:
    """Return a Markdown table of profiled ms per run by operator family and variant."""
    labels = list(profiles)
    lines = [
        "| operator family (profiled ms per run) | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for family, ops in [*OPERATOR_FAMILIES.items(), ("everything else", ())]:
        row = []
        for label in labels:
            per_op = profiles[label].per_op_ms
            if ops:
                total = sum(ms for op, ms in per_op.items() if op in ops)
            else:
                known = {op for family_ops in OPERATOR_FAMILIES.values() for op in family_ops}
                total = sum(ms for op, ms in per_op.items() if op not in known)
            row.append(f"{total:.2f}")
        lines.append(f"| {family} | " + " | ".join(row) + " |")
    totals = [f"{sum(profiles[label].per_op_ms.values()):.2f}" for label in labels]
    lines.append("| total | " + " | ".join(totals) + " |")
    return lines


def conv_shape_text(path: Path, node_name: str) -> str:
    """Return 'group G, kernel KxK' for a (QLinear)Conv node of the optimized graph, else ''."""
    model = onnx.load(path)
    for node in model.graph.node:
        if node.name == node_name and "Conv" in node.op_type:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            kernel = "x".join(str(k) for k in attributes.get("kernel_shape", []))
            return f" (group {attributes.get('group', 1)}, kernel {kernel})"
    return ""


@dataclass
class Fidelity:
    """Agreement of a quantized variant with FP32: Markdown line and worst-case score in [0, 1]."""

    line: str
    # Lowest text-map IoU over the check images, or the share of agreeing orientations.
    score: float


def fidelity(
    model: ModelUnderTest, reference: InferenceEngine, label: str, engine: InferenceEngine
) -> Fidelity:
    """Compare a quantized variant's outputs with FP32's on the model's check images."""
    if reference.card.task.value == "segmentation":
        parts, ious = [], []
        for name, image in model.check_images.items():
            expected = reference.infer(image).labels > 0
            found = engine.infer(image).labels > 0
            union = np.logical_or(expected, found).sum()
            iou = float(np.logical_and(expected, found).sum() / union) if union else 1.0
            ious.append(iou)
            parts.append(f"{name}: IoU {iou:.2f} ({found.sum():,} of FP32's {expected.sum():,} text pixels)")
        line = f"- {model.name} {label} text map (threshold 0.3) against FP32: " + "; ".join(parts)
        return Fidelity(line, min(ious))

    if reference.card.task.value == "depth":
        differences = []
        for image in model.check_images.values():
            expected = reference.infer(image).depth_m
            found = engine.infer(image).depth_m
            differences.append(float(np.nanmean(np.abs(found - expected) / expected)))
        line = (
            f"- {model.name} {label} depth against FP32: mean relative difference "
            f"{np.mean(differences):.4f} over {len(differences)} pictures"
        )
        return Fidelity(line, 1.0 - float(np.mean(differences)))

    same = [
        reference.infer(image).top_k[0].label == engine.infer(image).top_k[0].label
        for image in model.check_images.values()
    ]
    line = f"- {model.name} {label} orientation against FP32: {sum(same)} of {len(same)} text lines agree"
    return Fidelity(line, sum(same) / len(same))


def recommendation(model_name: str, speedups: dict[str, float], fidelities: dict[str, Fidelity]) -> str:
    """Return which quantized variant to serve: the most faithful one at the target speed-up, if any."""
    fast = [label for label, speedup in speedups.items() if speedup >= TARGET_SPEEDUP]
    if not fast:
        fastest = max(speedups, key=lambda label: speedups[label])
        return (
            f"- No quantized variant of {model_name} reached {TARGET_SPEEDUP}× by wall-clock p50 in "
            f"this run; the fastest, {fastest}, reached {speedups[fastest]:.2f}×."
        )
    best = max(fast, key=lambda label: fidelities[label].score)
    return (
        f"- Of the variants at {TARGET_SPEEDUP}× or more in this run, the closest to FP32 is {best} "
        f"(worst-case score {fidelities[best].score:.2f}, where 1 is identical); check that score "
        "against the application's tolerance before serving it."
    )


def end_to_end_ms(
    model_path: str | Path, card_path: str, images: int, rate_hz: float, threads: int
) -> list[float]:
    """Publish IMAGES stamped images at RATE_HZ to the node; return stamp-to-receipt latencies."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import Image
    from skimage import data

    from quantized_inference_node.node import QuantizedInferenceNode

    context = rclpy.context.Context()
    rclpy.init(context=context)
    node = QuantizedInferenceNode(
        context=context,
        namespace="bench",
        parameter_overrides=[
            Parameter("model_path", value=str(model_path)),
            Parameter("card_path", value=card_path),
            Parameter("publish_overlay", value=False),
            Parameter("intra_op_threads", value=threads),
        ],
    )
    probe = rclpy.create_node("bench_probe", context=context)
    latencies_ms: list[float] = []
    received = threading.Event()

    def on_labels(message: Image) -> None:
        now_ns = probe.get_clock().now().nanoseconds
        stamp_ns = message.header.stamp.sec * 10**9 + message.header.stamp.nanosec
        latencies_ms.append((now_ns - stamp_ns) / 1e6)
        received.set()

    probe.create_subscription(Image, "/bench/quantized_inference_node/labels", on_labels, 10)
    publisher = probe.create_publisher(Image, "/bench/image", 10)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    executor.add_node(node)
    executor.add_node(probe)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    page = data.coffee()
    message = Image(height=page.shape[0], width=page.shape[1], encoding="rgb8", step=page.shape[1] * 3)
    message.data = page.tobytes()
    message.header.frame_id = "camera"

    def publish() -> None:
        message.header.stamp = probe.get_clock().now().to_msg()
        publisher.publish(message)

    # Wait for discovery: publish until the first output arrives, then start counting.
    deadline = time.monotonic() + 30.0
    while not received.is_set() and time.monotonic() < deadline:
        publish()
        received.wait(1.0)
    time.sleep(1.0)
    latencies_ms.clear()
    for _ in range(images):
        publish()
        time.sleep(1.0 / rate_hz)
    time.sleep(2.0)

    executor.shutdown()
    node.destroy_node()
    probe.destroy_node()
    rclpy.shutdown(context=context)
    return list(latencies_ms)


def percentile_text(values: list[float]) -> tuple[float, float]:
    p50, p90 = np.percentile(values, [50, 90])
    return float(p50), float(p90)


def bench_model(
    model: ModelUnderTest,
    hawq_path: Path | None,
    args: argparse.Namespace,
    work_dir: Path,
    log: Callable[[str], None],
) -> tuple[list[str], dict[str, Path]]:
    card = load_model_card(model.card_path)
    fp32_engine = InferenceEngine(model.model_path, card, intra_op_threads=args.threads)

    log(f"{model.name}: quantizing to uniform INT8")
    prepared = prepare_for_quantization(model, work_dir, log)
    int8_all = quantize_uint8(model, fp32_engine, prepared, work_dir / f"{model.name}_int8.onnx")
    int8_conv = quantize_uint8(
        model, fp32_engine, prepared, work_dir / f"{model.name}_int8_conv.onnx", op_types=["Conv"]
    )
    variants = [
        Variant("FP32", resolve_path(model.model_path)),
        Variant(INT8_LABEL, int8_all),
        Variant("INT8, Conv only", int8_conv),
    ]
    if hawq_path is not None:
        variants.append(Variant("HAWQ mixed", hawq_path))

    feed = {card.input.name: input_tensor(card, fp32_engine.fixed_size, model.timing_image)}
    for variant in variants:
        variant.session = make_session(variant.path, args.threads)
    log(f"{model.name}: timing {len(variants)} variants, {args.rounds} interleaved rounds")
    time_interleaved(variants, feed, args.rounds)

    shape = "x".join(str(d) for d in next(iter(feed.values())).shape)
    lines = [
        f"### {model.name} (input {shape}, {args.threads} thread(s))",
        "",
        "| variant | file size | p50 ms | p90 ms | FP32 p50 / p50 |",
        "|---|---|---|---|---|",
    ]
    fp32_p50 = percentile_text(variants[0].latencies_ms)[0]
    for variant in variants:
        p50, p90 = percentile_text(variant.latencies_ms)
        size_mb = variant.path.stat().st_size / 1e6
        lines.append(
            f"| {variant.label} | {size_mb:.2f} MB | {p50:.1f} | {p90:.1f} | {fp32_p50 / p50:.2f}× |"
        )
    if hawq_path is None:
        lines.append(f"| HAWQ mixed | not measured: no HAWQ model given (--hawq {model.name}=PATH) | | | |")

    lines += [
        "",
        "Operators after ONNX Runtime's graph optimizations; ms per run by operator type and for the "
        "slowest nodes (medians over the profiled runs):",
        "",
    ]
    profiles: dict[str, Profile] = {}
    for variant in variants:
        counts, optimized = optimized_operator_counts(variant.path, work_dir, args.threads)
        profile = profile_run(variant.path, feed, args.profile_runs, work_dir, args.threads)
        profiles[variant.label] = profile
        count_text = ", ".join(f"{op} {n}" for op, n in counts.most_common(8))
        time_text = ", ".join(f"{op} {ms:.2f}" for op, ms in list(profile.per_op_ms.items())[:6])
        slow_text = ", ".join(
            f"{name} {op}{conv_shape_text(optimized, name)} {ms:.2f}"
            for name, op, ms in profile.slowest_nodes
        )
        lines.append(
            f"- {variant.label}: {count_text}. Time by type: {time_text}. Slowest nodes: {slow_text}."
        )
    lines += ["", *family_table(profiles), ""]
    fp32_kernel_ms = sum(profiles["FP32"].per_op_ms.values())
    for variant in variants[1:]:
        speedup = fp32_p50 / percentile_text(variant.latencies_ms)[0]
        kernel_speedup = fp32_kernel_ms / sum(profiles[variant.label].per_op_ms.values())
        verdict = "meets" if speedup >= TARGET_SPEEDUP else "misses"
        lines.append(
            f"- {variant.label}: {speedup:.2f}× FP32 by wall-clock p50, which {verdict} the "
            f"{TARGET_SPEEDUP}× target; {kernel_speedup:.2f}× by profiled kernel time (sums of "
            "per-node medians, less affected by other processes on the machine)."
        )

    fidelities = {
        variant.label: fidelity(
            model,
            fp32_engine,
            variant.label,
            InferenceEngine(variant.path, card, intra_op_threads=args.threads),
        )
        for variant in variants[1:]
    }
    speedups = {
        variant.label: fp32_p50 / percentile_text(variant.latencies_ms)[0] for variant in variants[1:]
    }
    lines += [
        "",
        *(f.line for f in fidelities.values()),
        recommendation(model.name, speedups, fidelities),
        "",
    ]
    return lines, {variant.label: variant.path for variant in variants}


def int8_instructions() -> str:
    """Return the int8 dot-product instruction sets /proc/cpuinfo lists, or 'none listed'."""
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith(("flags", "Features"))
        )
    except (OSError, StopIteration):
        return "unknown (no /proc/cpuinfo)"
    found = [flag for flag in ("avx_vnni", "avx512_vnni", "amx_int8", "asimddp", "i8mm") if flag in flags]
    return ", ".join(found) if found else "none listed"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=30, help="timed runs per variant (default 30)")
    parser.add_argument("--profile-runs", type=int, default=5, help="profiled runs per variant (default 5)")
    parser.add_argument(
        "--hawq",
        action="append",
        default=[],
        metavar="MODEL=PATH",
        help="HAWQ tool output for a model, e.g. ppocr_det_v4=det_hawq.onnx; repeatable",
    )
    parser.add_argument(
        "--e2e-images", type=int, default=20, help="images sent through the node (default 20)"
    )
    parser.add_argument("--e2e-rate", type=float, default=2.0, help="camera rate in Hz for the node test")
    parser.add_argument(
        "--models",
        nargs="*",
        default=[],
        help="models to measure (default all): ppocr_det_v4 depth_7scenes ppocr_cls_v2",
    )
    parser.add_argument("--skip-node", action="store_true", help="skip the end-to-end test through the node")
    args = parser.parse_args()

    # ONNX Runtime warns about every unused initializer of the converted PP-OCR models.
    ort.set_default_logger_severity(3)
    models = [m for m in models_under_test() if not args.models or m.name in args.models]
    hawq_paths: dict[str, Path] = {}
    for item in args.hawq:
        name, _, path = item.partition("=")
        if name not in {m.name for m in models} or not path:
            parser.error(
                f"invalid --hawq {item!r}: use MODEL=PATH with MODEL one of {[m.name for m in models]}"
            )
        if not Path(path).is_file():
            parser.error(f"HAWQ model {path} not found")
        hawq_paths[name] = Path(path)
    # The packaged depth network ships with its HAWQ model.
    if "depth_7scenes" in {m.name for m in models}:
        hawq_paths.setdefault("depth_7scenes", Path(resolve_path(f"{CARDS}/depth_7scenes/model_hawq.onnx")))

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    lines = [
        f"CPU int8 dot-product instructions: {int8_instructions()}.",
        "",
        "Latency per image of ONNX Runtime "
        f"{ort.__version__} on the CPU (CPUExecutionProvider), variants timed interleaved in one "
        "run; the ratio column is FP32's p50 over the variant's p50 (above 1 is faster).",
        "",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work_dir = Path(tmp)
        model_files: dict[str, dict[str, Path]] = {}
        for model in models:
            model_lines, files = bench_model(model, hawq_paths.get(model.name), args, work_dir, log)
            lines += model_lines
            model_files[model.name] = files

        detector = next((m for m in models if m.name == "ppocr_det_v4"), None)
        if not args.skip_node and detector is not None:
            lines += [
                "### End to end through quantized_inference_node",
                "",
                f"ppocr_det_v4 on scikit-image's coffee (600x400 rgb8) published at {args.e2e_rate} Hz, "
                f"{args.e2e_images} images; latency from the image's header stamp to the probe receiving "
                f"~/labels (rclpy, Fast DDS on localhost, intra_op_threads {args.threads}); it includes "
                "decoding, preprocessing of the 600x400 image, inference and postprocessing.",
                "",
                "| variant | p50 ms | p90 ms | outputs |",
                "|---|---|---|---|",
            ]
            for label, path in model_files[detector.name].items():
                log(f"end to end through the node: {label}")
                latencies = end_to_end_ms(
                    path, detector.card_path, args.e2e_images, args.e2e_rate, args.threads
                )
                if latencies:
                    p50, p90 = percentile_text(latencies)
                    lines.append(f"| {label} | {p50:.1f} | {p90:.1f} | {len(latencies)} |")
                else:
                    lines.append(f"| {label} | no output received | | 0 |")
            lines.append("")
    lines.append(ANALYSIS)

    body = "\n".join(lines)
    print(body)
    write_section("inference", "Quantized inference: FP32, INT8 and HAWQ on the CPU", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
