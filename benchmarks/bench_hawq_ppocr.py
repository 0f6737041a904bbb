"""PP-OCR text detection under HAWQ mixed precision, against FP32 and uniform INT8.

The model is the PP-OCRv4 text detection network shipped in rapidocr-onnxruntime.
The evaluation is label-free: each quantized model's probability map, binarized at
0.3 (rapidocr's ``thresh``), is compared with the FP32 model's map on real images
bundled with scikit-image and scikit-learn. The IoU of the two text masks is reported
per image; images where FP32 finds no text report the spurious text pixels instead.

Compared, on the same inputs in one run:

1. FP32 in onnxruntime.
2. onnxruntime's own ``quantize_static`` (QDQ, per-channel int8 weights, uint8
   activations, MinMax calibration) on the opset-12 model as shipped, then after
   upgrading it to opset 13. Constant nodes are first moved into initializers;
   without that, ``quantize_static`` treats the weights as activations.
3. HAWQ: per-layer Hessian traces of a distillation loss (Gauss-Newton output
   probes, exact for distillation at the float weights; no power iteration) choose
   the bits per layer (default 4 or 8, max-abs weight scales) under a weight budget
   (default 1/5 of the FP32 weight bytes). By default 4-bit weights get one scale
   per 64 input channels (DequantizeLinear blocked quantization), whose bytes count
   in the budget, and activations stay float (weight-only quantization).
4. For comparison, the same allocation with one scale per output channel, weight-only
   and with uint8 activations. With uint8 activations, activation traces (HAWQ-V2)
   rank the tensors by their expected loss increase Tr(H_a) * scale^2 / 12, and the
   top-ranked ones stay float (the tool's float-activation option): the smallest
   count from a fixed ladder whose pooled IoU on the calibration crops reaches the
   target.

Run from the repository root::

    python benchmarks/bench_hawq_ppocr.py            # full run, writes docs/benchmarks.md
    python benchmarks/bench_hawq_ppocr.py --quick    # smaller settings, prints only
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantized_inference_node.hawq.activation_precision import (
    ActivationSensitivity,
    activation_traces,
    rank_activations,
    select_float_activations,
    without_float_activations,
)
from quantized_inference_node.hawq.api import LossKind, PreparedModel, make_loss, prepare_model
from quantized_inference_node.hawq.bit_allocation import allocate_bits, weight_size_bytes
from quantized_inference_node.hawq.fake_quant import WeightClipping
from quantized_inference_node.hawq.hessian import (
    HessianSettings,
    OutputLoss,
    TraceMethod,
    layer_curvatures,
)
from quantized_inference_node.hawq.onnx_to_torch import OnnxGraphModule, constants_to_initializers
from quantized_inference_node.hawq.qdq_export import (
    activation_tensors,
    build_qdq_model,
    calibrate,
    propagate_pass_through,
    write_qdq_model,
)
from quantized_inference_node.hawq.sensitivity import layer_sensitivities

logger = logging.getLogger("bench_hawq_ppocr")

#: rapidocr's detection threshold on the probability map.
TEXT_THRESHOLD = 0.3
#: rapidocr's detection normalisation, applied to BGR images scaled to [0, 1].
DET_MEAN = 0.5
DET_STD = 0.5
#: Below this many FP32 text pixels an image counts as text-free.
MIN_TEXT_PIXELS = 100
#: Numbers of protected activation tensors tried, smallest first.
PROTECTION_LADDER = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32)


def detection_model_path() -> Path:
    """Return the PP-OCRv4 detection model file inside rapidocr-onnxruntime."""
    import rapidocr_onnxruntime

    path = Path(rapidocr_onnxruntime.__file__).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall it with pip install rapidocr-onnxruntime==1.4.4"
        )
    return path


def load_images(names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Return the bundled evaluation images as RGB uint8 (H, W, 3), by name.

    scikit-image's images are loaded by function name; ``china`` and ``flower`` come
    from ``sklearn.datasets.load_sample_images``. Grey images are repeated to 3 channels.
    """
    import skimage.data
    from sklearn.datasets import load_sample_images

    names = list(names) if names is not None else list(DEFAULT_IMAGES)
    images = {}
    samples = None
    for name in names:
        if name in ("china", "flower"):
            samples = samples or load_sample_images()
            image = samples.images[0 if name == "china" else 1]
        else:
            image = getattr(skimage.data, name)()
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        images[name] = np.ascontiguousarray(image[:, :, :3])
    return images


DEFAULT_IMAGES = (
    "page",
    "coffee",
    "clock",
    "rocket",
    "text",
    "astronaut",
    "camera",
    "chelsea",
    "coins",
    "immunohistochemistry",
    "hubble_deep_field",
    "retina",
    "china",
    "flower",
)


def preprocess_detection(image_rgb: np.ndarray, max_side: int) -> np.ndarray:
    """Return the detection input (1, 3, H, W) float32 for an RGB uint8 image.

    Like rapidocr: the image is scaled so its longer side is about MAX_SIDE, each
    side rounded to a multiple of 32 (at least 32), converted to BGR, scaled to
    [0, 1] and normalised with mean and std 0.5.
    """
    height, width = image_rgb.shape[:2]
    scale = max_side / max(height, width)
    new_h = max(32, round(height * scale / 32) * 32)
    new_w = max(32, round(width * scale / 32) * 32)
    bgr = cv2.resize(image_rgb[:, :, ::-1], (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    normalised = (bgr.astype(np.float32) / 255.0 - DET_MEAN) / DET_STD
    return np.ascontiguousarray(normalised.transpose(2, 0, 1)[None])


def calibration_crops(
    images: Mapping[str, np.ndarray], count: int, size: int, seed: int
) -> np.ndarray:
    """Return COUNT preprocessed square crops (N, 3, SIZE, SIZE) at random scales.

    Crops cycle over the images; each image is first rescaled by a factor in
    [0.6, 1.6] so text appears at several sizes.
    """
    rng = np.random.default_rng(seed)
    names = list(images)
    crops = []
    for i in range(count):
        image = images[names[i % len(names)]]
        factor = rng.uniform(0.6, 1.6)
        height, width = image.shape[:2]
        scaled = cv2.resize(
            image, (max(size, int(width * factor)), max(size, int(height * factor)))
        )
        top = rng.integers(0, scaled.shape[0] - size + 1)
        left = rng.integers(0, scaled.shape[1] - size + 1)
        crop = scaled[top : top + size, left : left + size, ::-1]
        crops.append(((crop.astype(np.float32) / 255.0 - DET_MEAN) / DET_STD).transpose(2, 0, 1))
    return np.ascontiguousarray(np.stack(crops))


@dataclass(frozen=True)
class MapAgreement:
    """Agreement of one image's binarized map with the FP32 map.

    Attributes:
        image: image name.
        iou: IoU of the text masks, or None when FP32 finds no text on the image.
        text_pixels: text pixels in the compared map.
        reference_text_pixels: text pixels in the FP32 map.
    """

    image: str
    iou: float | None
    text_pixels: int
    reference_text_pixels: int


def text_mask_iou(probability: np.ndarray, reference: np.ndarray) -> float:
    """Return the IoU of the maps binarized at TEXT_THRESHOLD (1.0 when both are empty)."""
    mask, reference_mask = probability > TEXT_THRESHOLD, reference > TEXT_THRESHOLD
    union = np.count_nonzero(mask | reference_mask)
    return 1.0 if union == 0 else np.count_nonzero(mask & reference_mask) / union


def compare_maps(
    maps: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray]
) -> list[MapAgreement]:
    """Compare each map with its FP32 reference."""
    rows = []
    for name, reference in references.items():
        reference_pixels = int(np.count_nonzero(reference > TEXT_THRESHOLD))
        has_text = reference_pixels >= MIN_TEXT_PIXELS
        rows.append(
            MapAgreement(
                image=name,
                iou=text_mask_iou(maps[name], reference) if has_text else None,
                text_pixels=int(np.count_nonzero(maps[name] > TEXT_THRESHOLD)),
                reference_text_pixels=reference_pixels,
            )
        )
    return rows


def mean_iou(rows: Sequence[MapAgreement]) -> float:
    """Return the mean IoU over the images where FP32 finds text."""
    values = [row.iou for row in rows if row.iou is not None]
    return float(np.mean(values)) if values else float("nan")


def spurious_pixels(rows: Sequence[MapAgreement]) -> int:
    """Return the text pixels found on images where FP32 finds none."""
    return sum(row.text_pixels for row in rows if row.iou is None)


def pooled_iou(maps: np.ndarray, references: np.ndarray) -> float:
    """Return the IoU of all text masks of a batch pooled together (1.0 when empty)."""
    return text_mask_iou(maps, references)


def make_session(model: onnx.ModelProto | Path, threads: int = 0) -> ort.InferenceSession:
    """Return a CPU onnxruntime session (THREADS 0 lets onnxruntime choose)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def run_maps(session: ort.InferenceSession, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return the probability map of each input, by name."""
    return {name: session.run(None, {"x": x})[0] for name, x in inputs.items()}


def run_batched(session: ort.InferenceSession, batch: np.ndarray, size: int = 8) -> np.ndarray:
    """Return the model outputs for a stacked batch, run SIZE samples at a time."""
    return np.concatenate(
        [session.run(None, {"x": batch[i : i + size]})[0] for i in range(0, len(batch), size)]
    )


# -- memory -----------------------------------------------------------------------------------


def resident_bytes() -> int:
    """Return the process's resident set size in bytes (Linux /proc)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class PeakMemory:
    """Peak resident memory above the starting level, sampled every 20 ms."""

    start_bytes: int = 0
    peak_bytes: int = 0
    seconds: float = 0.0

    @property
    def increase_mib(self) -> float:
        """Peak increase over the starting level, in MiB."""
        return (self.peak_bytes - self.start_bytes) / 2**20


@contextmanager
def measure_peak_memory() -> Iterator[PeakMemory]:
    """Sample the resident set size while the block runs; time the block too."""
    result = PeakMemory(start_bytes=resident_bytes())
    result.peak_bytes = result.start_bytes
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            result.peak_bytes = max(result.peak_bytes, resident_bytes())
            stop.wait(0.02)

    thread = threading.Thread(target=sample, daemon=True)
    started = time.perf_counter()
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result.peak_bytes = max(result.peak_bytes, resident_bytes())
        result.seconds = time.perf_counter() - started


# -- uniform INT8 with onnxruntime ---------------------------------------------------------------


@dataclass
class UniformInt8:
    """Result of onnxruntime's quantize_static at one opset.

    Attributes:
        opset: the float model's opset given to quantize_static.
        path: the written model, or None when it failed.
        error: onnxruntime's message when quantization or loading failed.
    """

    opset: int
    path: Path | None
    error: str | None


def quantize_uniform_int8(
    float_model: onnx.ModelProto, crops: np.ndarray, opset: int, folder: Path
) -> UniformInt8:
    """Run quantize_static (QDQ, per-channel int8 weights, uint8 activations) and load it."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class CropReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(range(0, len(crops), 8))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.batches, None)
            return None if start is None else {"x": crops[start : start + 8]}

    model = constants_to_initializers(float_model)
    if opset != onnx_opset(model):
        model = onnx.version_converter.convert_version(model, opset)
    source, target = folder / f"float_opset{opset}.onnx", folder / f"int8_opset{opset}.onnx"
    onnx.save(model, source)
    try:
        quantize_static(
            str(source),
            str(target),
            CropReader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        make_session(target)
    except Exception as error:  # onnxruntime raises several unrelated types here
        # Keep the reason, which onnxruntime puts after the node description.
        message = str(error).split("\n")[0]
        reason = message.rsplit("Error ", 1)[-1] if "Error " in message else message
        return UniformInt8(opset, None, reason[:300])
    return UniformInt8(opset, target, None)


def onnx_opset(model: onnx.ModelProto) -> int:
    """Return the model's default-domain opset."""
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


# -- HAWQ --------------------------------------------------------------------------------------


def distillation_closures(
    module: OnnxGraphModule, batches: Sequence[np.ndarray]
) -> list[Callable[[], torch.Tensor]]:
    """Return one loss closure per batch: MSE of the map against the FP32 map."""
    closures = []
    for batch in batches:
        x = torch.from_numpy(batch)
        with torch.no_grad():
            teacher = module(x).detach()

        def closure(x: torch.Tensor = x, teacher: torch.Tensor = teacher) -> torch.Tensor:
            return make_loss(LossKind.DISTILLATION, module(x), teacher, None)

        closures.append(closure)
    return closures


@dataclass
class HawqResult:
    """The HAWQ model and how it was chosen."""

    path: Path
    bits: list[int]
    size_bytes: float
    fp32_bytes: float
    protected: list[str]
    ranking: list[ActivationSensitivity]
    ladder: list[tuple[int, float]]
    layer_names: list[str]
    layer_traces: list[float]
    hessian_memory: PeakMemory
    activation_memory: PeakMemory
    quantized_activations: int
    model: onnx.ModelProto
    block_size: int | None = None
    # Bytes of the weights in the file: integers, scales and zero points.
    stored_bytes: int = 0


@dataclass(frozen=True)
class HawqSettings:
    """Settings of the HAWQ run (one source of defaults for the CLI and the test).

    Attributes:
        size_ratio: weight budget as a fraction of the FP32 weight bytes.
        hessian_crop: side of the crops the Hessian analysis runs on, pixels.
        hessian_samples: crops used by the Hessian analysis.
        hessian_batch: crops per batch of the Hessian analysis.
        probes: Hutchinson probes per batch, for weights and activations.
        target_iou: pooled IoU on the calibration crops the protection must reach.
        seed: seed of the probes.
        bits: candidate weight bit widths.
        weight_clipping: weight scales of 2..4-bit layers.
        trace_method: joint or per-layer Hutchinson traces.
        block_size: input channels per weight scale below 8 bits, or None for one
            scale per output channel.
        weight_only: keep every activation in float.
    """

    size_ratio: float = 0.2
    hessian_crop: int = 96
    hessian_samples: int = 4
    hessian_batch: int = 4
    probes: int = 8
    target_iou: float = 0.95
    seed: int = 0
    bits: tuple[int, ...] = (4, 8)
    weight_clipping: WeightClipping = WeightClipping.MAX_ABS
    trace_method: TraceMethod = TraceMethod.GAUSS_NEWTON
    block_size: int | None = 64
    weight_only: bool = True


def stored_weight_bytes(path: Path, weights: Sequence[str]) -> int:
    """Return the bytes of the named weights' integer, scale and zero-point initializers in PATH."""
    names = {f"{w}{suffix}" for w in weights for suffix in ("_quantized", "_scale", "_zero_point")}
    total = 0
    for init in onnx.load(str(path)).graph.initializer:
        if init.name in names:
            total += len(init.raw_data) if init.raw_data else onnx.numpy_helper.to_array(init).nbytes
    return total


def hawq_quantize(
    model_path: Path,
    crops: np.ndarray,
    settings: HawqSettings,
    folder: Path,
) -> HawqResult:
    """Build the HAWQ model: Hessian bit allocation, then activation protection."""
    prepared: PreparedModel = prepare_model(model_path)
    layers, module = prepared.layers, prepared.module
    side = settings.hessian_crop
    hessian_inputs = np.ascontiguousarray(crops[: settings.hessian_samples, :, :side, :side])
    hessian_batches = [
        hessian_inputs[i : i + settings.hessian_batch]
        for i in range(0, len(hessian_inputs), settings.hessian_batch)
    ]

    # Weight Hessian traces (the allocation needs no eigenvalues), then the bits.
    hessian_settings = HessianSettings(
        probes=settings.probes,
        seed=settings.seed,
        trace_method=settings.trace_method,
        eigenvalues=False,
    )
    with measure_peak_memory() as hessian_memory:
        curvatures = layer_curvatures(
            distillation_closures(module, hessian_batches),
            [len(b) for b in hessian_batches],
            prepared.weights,
            [layer.node_name for layer in layers],
            hessian_settings,
            outputs=[partial(module, torch.from_numpy(batch)) for batch in hessian_batches],
            output_loss=OutputLoss.MSE,
        )
    sensitivities = layer_sensitivities(
        curvatures,
        prepared.weights,
        [layer.channel_axis for layer in layers],
        settings.bits,
        settings.weight_clipping,
        settings.block_size,
    )
    num_params = [layer.num_params for layer in layers]
    fp32_bytes = weight_size_bytes(num_params, [32] * len(layers))
    allocation = allocate_bits(
        [s.omega for s in sensitivities],
        num_params,
        settings.size_ratio * fp32_bytes,
        bits_per_weight=[s.storage_bits for s in sensitivities],
    )
    # Weight-only, or uint8 activations with the fewest top-ranked ones kept float.
    path = folder / "hawq.onnx"
    if settings.weight_only:
        qdq = build_qdq_model(
            prepared.onnx_model, layers, allocation.bits, {}, settings.weight_clipping, settings.block_size
        )
        write_qdq_model(qdq, path)
        protection = ActivationProtection()
    else:
        protection = protect_activations(prepared, hessian_batches, crops, allocation.bits, settings, folder)
        (folder / f"hawq_protect{protection.count}.onnx").replace(path)

    return HawqResult(
        path=path,
        bits=list(allocation.bits),
        size_bytes=allocation.size_bytes,
        fp32_bytes=fp32_bytes,
        protected=protection.protected,
        ranking=protection.ranking,
        ladder=protection.ladder,
        layer_names=[layer.node_name for layer in layers],
        layer_traces=[c.trace for c in curvatures],
        hessian_memory=hessian_memory,
        activation_memory=protection.memory,
        quantized_activations=protection.quantized_activations,
        model=prepared.onnx_model,
        block_size=settings.block_size,
        stored_bytes=stored_weight_bytes(path, [layer.weight for layer in layers]),
    )


@dataclass
class ActivationProtection:
    """The uint8 activations kept float, and how they were chosen (empty: weight-only)."""

    # Tensors kept float, and the count from PROTECTION_LADDER that chose them.
    protected: list[str] = field(default_factory=list)
    count: int = 0
    ranking: list[ActivationSensitivity] = field(default_factory=list)
    # (tensors kept float, pooled IoU on the calibration crops) per rung tried.
    ladder: list[tuple[int, float]] = field(default_factory=list)
    memory: PeakMemory = field(default_factory=PeakMemory)
    quantized_activations: int = 0


def protect_activations(
    prepared: PreparedModel,
    hessian_batches: Sequence[np.ndarray],
    crops: np.ndarray,
    bits: Sequence[int],
    settings: HawqSettings,
    folder: Path,
) -> ActivationProtection:
    """Rank the uint8 activations by trace and keep the fewest top-ranked ones float.

    Writes folder/hawq_protect{count}.onnx for each rung of PROTECTION_LADDER tried.
    """
    layers, module = prepared.layers, prepared.module

    # Activation ranges in onnxruntime on the full calibration crops.
    names = activation_tensors(prepared.onnx_model, layers)
    calibration = calibrate(
        prepared.onnx_model, names, [{"x": crops[i : i + 8]} for i in range(0, len(crops), 8)]
    )
    qparams = propagate_pass_through(prepared.onnx_model, calibration.qparams)

    # Activation traces rank the uint8 tensors by expected loss increase.
    quantized = list(calibration.qparams)
    for parameter in prepared.weights:
        parameter.requires_grad_(False)
    with measure_peak_memory() as activation_memory:
        traces = activation_traces(
            module,
            distillation_closures(module, hessian_batches),
            [len(b) for b in hessian_batches],
            quantized,
            settings.probes,
            settings.seed,
        )
    ranking = rank_activations(traces, qparams)

    # Protect the fewest top-ranked tensors that reach the target on the crops, or,
    # when no count reaches it, the count with the best crop IoU.
    float_session = make_session(prepared.onnx_model)
    references = run_batched(float_session, crops)
    ladder: list[tuple[int, float]] = []
    for count in PROTECTION_LADDER:
        protected = select_float_activations(ranking, count)
        kept = without_float_activations(qparams, protected, prepared.onnx_model)
        qdq = build_qdq_model(
            prepared.onnx_model, layers, list(bits), kept, settings.weight_clipping, settings.block_size
        )
        candidate = folder / f"hawq_protect{count}.onnx"
        write_qdq_model(qdq, candidate)
        score = pooled_iou(run_batched(make_session(candidate), crops), references)
        ladder.append((count, score))
        logger.info("protecting %d activation(s): pooled crop IoU %.3f", count, score)
        if score >= settings.target_iou:
            break
    chosen = next((c for c, s in ladder if s >= settings.target_iou), None)
    if chosen is None:
        chosen = max(ladder, key=lambda entry: (entry[1], -entry[0]))[0]

    return ActivationProtection(
        protected=select_float_activations(ranking, chosen),
        count=chosen,
        ranking=ranking,
        ladder=ladder,
        memory=activation_memory,
        quantized_activations=len(quantized),
    )


def describe_tensor(model: onnx.ModelProto, name: str) -> str:
    """Return 'producer op -> consumer ops' for a tensor, naming the block roles.

    A Mul whose other input comes from a HardSigmoid is a squeeze-excitation gate, one
    whose other input comes from a Div (x * clip(x + 3, 0, 6) / 6) is a hard-swish.
    """
    producers = {out: node for node in model.graph.node for out in node.output}
    producer = producers[name].op_type if name in producers else "input"
    consumers = set()
    for node in model.graph.node:
        if name not in node.input:
            continue
        label = node.op_type
        if node.op_type == "Mul":
            others = [producers.get(i) for i in node.input if i != name]
            kinds = {other.op_type for other in others if other is not None}
            if "HardSigmoid" in kinds:
                label = "Mul (SE gate)"
            elif "Div" in kinds:
                label = "Mul (hard-swish)"
        elif node.op_type == "GlobalAveragePool":
            label = "GlobalAveragePool (SE squeeze)"
        consumers.add(label)
    return f"{producer} -> {', '.join(sorted(consumers)) or 'output'}"


# -- latency -------------------------------------------------------------------------------------


def median_latencies(
    sessions: Mapping[str, ort.InferenceSession], x: np.ndarray, repeats: int
) -> dict[str, float]:
    """Return each session's median latency in ms, runs interleaved to share the noise."""
    for session in sessions.values():
        session.run(None, {"x": x})
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            started = time.perf_counter()
            session.run(None, {"x": x})
            times[name].append((time.perf_counter() - started) * 1e3)
    return {name: float(np.median(values)) for name, values in times.items()}


# -- report ----------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """Per-model agreement rows, by model label."""

    rows: dict[str, list[MapAgreement]] = field(default_factory=dict)


def format_report(
    evaluation: Evaluation,
    int8_runs: Sequence[UniformInt8],
    hawq: HawqResult,
    latencies: Mapping[str, float],
    latency_shape: tuple[int, ...],
    model: onnx.ModelProto,
    args: argparse.Namespace,
    alternatives: Mapping[str, HawqResult] | None = None,
) -> str:
    """Return the markdown body of the benchmark section."""
    labels = list(evaluation.rows)
    lines = [
        "PP-OCRv4 text detection (rapidocr-onnxruntime 1.4.4), label-free: IoU of the "
        f"text masks (probability > {TEXT_THRESHOLD}) against FP32, images scaled to a "
        f"longer side of {args.max_side} px (sides multiples of 32, BGR, mean/std 0.5). "
        f"Calibration: {args.crops} random {args.crop_size}-px crops of the same images. "
        f"Hessian analysis on {hawq_settings(args).hessian_samples} crops of "
        f"{hawq_settings(args).hessian_crop} px, {args.probes} Hutchinson probes "
        f"({args.trace_method} traces, no power iteration); weight scales: "
        f"{args.weight_clipping} clipping for 2..4-bit layers, "
        + (f"one per {args.block_size} input channels below 8 bits" if args.block_size else "per channel")
        + (", activations in uint8." if args.uint8_activations else ", activations in float (weight-only)."),
        "",
        "| image | FP32 text px | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    reference_rows = next(iter(evaluation.rows.values()))
    for index, row in enumerate(reference_rows):
        cells = []
        for label in labels:
            other = evaluation.rows[label][index]
            cells.append(
                f"{other.iou:.3f}" if other.iou is not None else f"{other.text_pixels} px spurious"
            )
        lines.append(f"| {row.image} | {row.reference_text_pixels} | " + " | ".join(cells) + " |")
    lines.append(
        "| **mean IoU (text images)** | | "
        + " | ".join(f"**{mean_iou(evaluation.rows[label]):.3f}**" for label in labels)
        + " |"
    )
    lines.append(
        "| spurious px (text-free images) | | "
        + " | ".join(str(spurious_pixels(evaluation.rows[label])) for label in labels)
        + " |"
    )

    lines += ["", "onnxruntime `quantize_static` (QDQ, per-channel, uint8 activations):", ""]
    for run in int8_runs:
        status = "loads and runs" if run.error is None else f"fails: `{run.error}`"
        lines.append(f"- opset {run.opset}: {status}")

    lines += ["", *_variant_lines("HAWQ", hawq, args.size_ratio)]
    for label, alternative in (alternatives or {}).items():
        lines += _variant_lines(label, alternative, args.size_ratio)
    lines += [
        "",
        f"Highest weight traces Tr(H)/n (kept at 8 bits: {', '.join(top_layers(hawq, 5))}).",
    ]
    ranked = next((r for r in [hawq, *(alternatives or {}).values()] if r.ranking), None)
    if ranked is not None:
        lines += [
            "",
            "| rank | tensor | producer -> consumers | Tr(H_a)·scale²/12 | kept float |",
            "|---|---|---|---|---|",
        ]
        protected = set(ranked.protected)
        for rank, row in enumerate(ranked.ranking[:10], start=1):
            lines.append(
                f"| {rank} | `{row.name}` | {describe_tensor(model, row.name)} | {row.score:.3e} | "
                f"{'yes' if row.name in protected else 'no'} |"
            )
    activation_memory = ranked.activation_memory if ranked is not None else PeakMemory()

    fp32_ms = latencies["FP32"]
    lines += [
        "",
        f"Hessian analysis (weights, {len(hawq.bits)} layers): "
        f"{hawq.hessian_memory.seconds:.1f} s, peak memory +{hawq.hessian_memory.increase_mib:.0f}"
        f" MiB; activation traces: {activation_memory.seconds:.1f} s, "
        f"+{activation_memory.increase_mib:.0f} MiB.",
        "",
        f"onnxruntime CPU latency, input {latency_shape}, median of {args.repeats} interleaved "
        "runs: "
        + ", ".join(
            f"{label} {ms:.1f} ms ({ms / fp32_ms:.2f}× FP32)" for label, ms in latencies.items()
        )
        + ".",
    ]
    return "\n".join(lines)


def _variant_lines(label: str, result: HawqResult, budget: float) -> list[str]:
    """Return the report lines of one HAWQ variant: bits, size and activation protection."""
    lines = [
        f"- {label}: bits {bit_counts(result.bits)} (layers per width); {result.size_bytes / 1e6:.3f} MB "
        f"of {result.fp32_bytes / 1e6:.3f} MB FP32 ({result.size_bytes / result.fp32_bytes:.3f} of FP32"
        f"{', block scales included' if result.block_size else ''}; budget {budget}). "
        f"In the file, with every scale and zero point: {result.stored_bytes / 1e6:.3f} MB "
        f"({result.stored_bytes / result.fp32_bytes:.3f} of FP32)."
    ]
    if result.ladder:
        lines.append(
            f"  Activation protection (of {result.quantized_activations} uint8 tensors; pooled crop "
            "IoU per number kept float): "
            + ", ".join(f"{count}: {score:.3f}" for count, score in result.ladder)
        )
    return lines


def bit_counts(bits: Sequence[int]) -> str:
    """Return 'width: layers' pairs, e.g. '4: 16, 8: 48'."""
    widths = sorted(set(bits))
    return ", ".join(f"{width}: {sum(1 for b in bits if b == width)}" for width in widths)


def top_layers(hawq: HawqResult, count: int) -> list[str]:
    """Return the COUNT layers with the largest trace per weight, with their bits."""
    order = sorted(
        range(len(hawq.bits)), key=lambda i: hawq.layer_traces[i], reverse=True
    )[:count]
    return [f"`{hawq.layer_names[i]}` ({hawq.bits[i]} b)" for i in order]


def hawq_settings(args: argparse.Namespace) -> HawqSettings:
    """Return the HAWQ settings the command line selects."""
    return HawqSettings(
        size_ratio=args.size_ratio,
        hessian_crop=args.hessian_crop,
        hessian_samples=args.hessian_samples,
        bits=args.bits,
        weight_clipping=WeightClipping(args.weight_clipping),
        trace_method=TraceMethod(args.trace_method),
        probes=args.probes,
        target_iou=args.target_iou,
        block_size=args.block_size or None,
        weight_only=not args.uint8_activations,
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = HawqSettings()
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Example: python benchmarks/bench_hawq_ppocr.py --max-side 480 --no-write",
    )
    parser.add_argument("--max-side", type=int, default=640, help="longer image side, px")
    parser.add_argument("--crops", type=int, default=32, help="calibration crops")
    parser.add_argument("--crop-size", type=int, default=256, help="calibration crop side, px")
    parser.add_argument("--size-ratio", type=float, default=defaults.size_ratio)
    parser.add_argument("--hessian-crop", type=int, default=defaults.hessian_crop)
    parser.add_argument("--hessian-samples", type=int, default=defaults.hessian_samples)
    parser.add_argument(
        "--bits",
        type=lambda text: tuple(sorted(int(v) for v in text.split(","))),
        default=defaults.bits,
        help="candidate weight bits (default 4,8)",
    )
    parser.add_argument(
        "--weight-clipping",
        choices=[c.value for c in WeightClipping],
        default=defaults.weight_clipping.value,
    )
    parser.add_argument(
        "--trace-method", choices=[m.value for m in TraceMethod], default=defaults.trace_method.value
    )
    parser.add_argument("--probes", type=int, default=defaults.probes)
    parser.add_argument(
        "--block-size",
        type=int,
        default=defaults.block_size,
        help="input channels per weight scale below 8 bits; 0 for one scale per output channel",
    )
    parser.add_argument(
        "--uint8-activations", action="store_true", help="quantize activations too (default: weight-only)"
    )
    parser.add_argument("--target-iou", type=float, default=defaults.target_iou)
    parser.add_argument("--repeats", type=int, default=20, help="latency runs per model")
    parser.add_argument("--quick", action="store_true", help="small settings, implies --no-write")
    parser.add_argument("--no-write", action="store_true", help="print, do not edit the docs")
    parser.add_argument(
        "--save-model", type=Path, default=None, help="also copy the HAWQ model to this .onnx path"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.max_side, args.crops, args.crop_size, args.repeats = 320, 16, 128, 5
        args.hessian_samples, args.probes = 4, 2
        args.no_write = True
    for name in ("max_side", "crops", "crop_size", "hessian_crop", "hessian_samples", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.block_size < 0:
        parser.error(f"--block-size must be >= 0 (0: per channel), got {args.block_size}")
    if not 0 < args.size_ratio <= 1:
        parser.error(f"--size-ratio must be in (0, 1], got {args.size_ratio}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    # The machine is shared: two threads keep the timings comparable between runs.
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model_path = detection_model_path()
    float_model = onnx.load(str(model_path))

    # Inputs: evaluation images and calibration crops.
    images = load_images()
    inputs = {name: preprocess_detection(image, args.max_side) for name, image in images.items()}
    crops = calibration_crops(images, args.crops, args.crop_size, seed=0)

    with tempfile.TemporaryDirectory(prefix="bench_hawq_ppocr_") as tmp:
        folder = Path(tmp)

        # FP32 reference and onnxruntime's uniform INT8.
        sessions = {"FP32": make_session(model_path)}
        references = run_maps(sessions["FP32"], inputs)
        evaluation = Evaluation()
        int8_runs = [quantize_uniform_int8(float_model, crops, opset, folder) for opset in (12, 13)]
        for run in int8_runs:
            print(f"uniform INT8 at opset {run.opset}: {run.error or 'ok'}")
            if run.path is not None:
                label = f"INT8 (opset {run.opset})"
                sessions[label] = make_session(run.path)
                evaluation.rows[label] = compare_maps(run_maps(sessions[label], inputs), references)

        # HAWQ.
        settings = hawq_settings(args)
        hawq = hawq_quantize(model_path, crops, settings, folder)
        if args.save_model is not None:
            args.save_model.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(hawq.path, args.save_model)
        sessions["HAWQ"] = make_session(hawq.path)
        evaluation.rows["HAWQ"] = compare_maps(run_maps(sessions["HAWQ"], inputs), references)

        # The same allocation with one scale per output channel, weight-only and with
        # uint8 activations, for comparison.
        comparisons = {
            "HAWQ, per-channel scales": replace(settings, block_size=None, weight_only=True),
            "HAWQ, per-channel scales, uint8 activations": replace(
                settings, block_size=None, weight_only=False
            ),
        }
        alternatives = {}
        for index, (label, variant) in enumerate(comparisons.items()):
            if variant == settings:
                continue
            (folder / f"variant{index}").mkdir()
            alternatives[label] = hawq_quantize(model_path, crops, variant, folder / f"variant{index}")
            evaluation.rows[label] = compare_maps(
                run_maps(make_session(alternatives[label].path), inputs), references
            )

        # Latency on the largest evaluation input.
        largest = max(inputs.values(), key=lambda x: x.size)
        latencies = median_latencies(sessions, largest, args.repeats)

    body = format_report(
        evaluation, int8_runs, hawq, latencies, largest.shape, hawq.model, args, alternatives
    )
    print(body)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of the process: {peak_mib:.0f} MiB")
    if not args.no_write:
        from benchmarks.report import write_section

        path = write_section("hawq_ppocr", "HAWQ on PP-OCR text detection", body)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
