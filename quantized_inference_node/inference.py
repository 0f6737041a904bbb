"""ROS-free inference engine: an ONNX Runtime session driven by a model card.

Use :class:`InferenceEngine` to run one model on images (numpy arrays), and
:class:`EngineHolder` to serve a model that can be replaced while running: a new model
is loaded beside the old one, and the old one stays in service when the new one fails
to load or does not match its card.

Pipeline per image: convert the channel order, resize per the card's resize policy,
normalize, lay out as NCHW or NHWC, run, then postprocess per task:

- segmentation: argmax of logits, or a probability map thresholded at the card's
  threshold, at the output's resolution, padding cropped, then resized (nearest) to
  the input image's size;
- depth: float32 metres at the output's resolution (padding cropped), with the
  camera intrinsics scaled to that resolution;
- classification: the top-k classes and their probabilities;
- detection: boxes in input image pixels.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from quantized_inference_node.model_card import (
    ChannelOrder,
    ModelCard,
    ModelCardError,
    OutputType,
    Task,
    TensorInfo,
    check_card_against_model,
    find_card_beside,
    input_size,
    load_model_card,
    resolve_path,
)
from quantized_inference_node.preprocessing import ResizeGeometry, prepare_input
from surfel_mapping_node.camera import PinholeCamera

LOGGER = logging.getLogger(__name__)

# Short provider names as users type them, and ONNX Runtime's names.
PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class ModelLoadError(RuntimeError):
    """A model file that ONNX Runtime cannot load."""


@dataclass(frozen=True)
class SegmentationResult:
    """Class id per input image pixel: (H, W) uint8, or uint16 above 256 classes."""

    labels: np.ndarray
    class_count: int
    timing: Timing


@dataclass(frozen=True)
class DepthResult:
    """Depth in metres (float32) at the output's resolution; NaN where an inverse depth is <= 0."""

    depth_m: np.ndarray
    # The input camera scaled to depth_m's size; None when no camera was given.
    camera: PinholeCamera | None
    timing: Timing


@dataclass(frozen=True)
class ClassScore:
    """One class of a classification, with its probability."""

    class_id: int
    label: str
    score: float


@dataclass(frozen=True)
class ClassificationResult:
    """The top-k classes, best first."""

    top_k: list[ClassScore]
    timing: Timing


@dataclass(frozen=True)
class Detection:
    """One box in input image pixels (x right, y down), from its top-left to its bottom-right corner."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float
    score: float
    class_id: int
    label: str


@dataclass(frozen=True)
class DetectionResult:
    """Boxes with a score at or above the card's threshold, best first."""

    detections: list[Detection]
    timing: Timing


@dataclass(frozen=True)
class Timing:
    """Wall-clock time of each stage of one inference, in milliseconds."""

    preprocess_ms: float
    run_ms: float
    postprocess_ms: float

    @property
    def total_ms(self) -> float:
        return self.preprocess_ms + self.run_ms + self.postprocess_ms


InferenceResult = SegmentationResult | DepthResult | ClassificationResult | DetectionResult


def select_providers(requested: Sequence[str]) -> list[str]:
    """Return the ONNX Runtime providers to use for REQUESTED, CPU always last.

    Args:
        requested: Provider names, short (``cpu``, ``cuda``, ``tensorrt``) or ONNX
            Runtime's own (``CUDAExecutionProvider``), in order of preference.

    Returns:
        The requested providers this onnxruntime build offers, then
        CPUExecutionProvider. A requested provider that is absent is logged as a warning.

    Raises:
        ValueError: an empty name.
    """
    available = ort.get_available_providers()
    selected: list[str] = []
    for name in requested:
        if not name.strip():
            raise ValueError(
                f"invalid provider name {name!r}: use {', '.join(PROVIDER_ALIASES)} or an "
                f"ONNX Runtime provider name"
            )
        provider = PROVIDER_ALIASES.get(name.strip().lower(), name.strip())
        if provider not in available:
            LOGGER.warning(
                "provider %s requested but this onnxruntime build offers only %s: using the CPU",
                provider,
                ", ".join(available),
            )
            continue
        if provider not in selected:
            selected.append(provider)
    if "CPUExecutionProvider" not in selected:
        selected.append("CPUExecutionProvider")
    return selected


class InferenceEngine:
    """One ONNX model with its card: preprocess, run and postprocess images.

    ``infer`` may be called from several threads at once, because the engine keeps no
    state between calls and ONNX Runtime's ``InferenceSession.run`` is thread-safe.
    """

    def __init__(
        self,
        model_path: str | Path,
        card: ModelCard,
        providers: Sequence[str] = ("cpu",),
        intra_op_threads: int = 0,
    ) -> None:
        """Load MODEL_PATH into an ONNX Runtime session and check it against CARD.

        Args:
            model_path: The .onnx file, or ``pkg:<package>/<path>``.
            card: The model's card.
            providers: Execution providers in order of preference (see select_providers).
            intra_op_threads: Threads per operator; 0 lets ONNX Runtime choose (one per core).

        Raises:
            ValueError: intra_op_threads < 0.
            FileNotFoundError: the model file does not exist.
            ModelLoadError: ONNX Runtime cannot load the file.
            ModelCardError: the card does not match the model's inputs or outputs.
        """
        if intra_op_threads < 0:
            raise ValueError(
                f"invalid intra_op_threads {intra_op_threads}: use 0 (ONNX Runtime's default) or more"
            )
        path = resolve_path(model_path)
        if not path.is_file():
            raise FileNotFoundError(f"model file {path} not found: check the model path")

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        try:
            session = ort.InferenceSession(
                str(path), sess_options=options, providers=select_providers(providers)
            )
        except Exception as error:
            # onnxruntime raises its own exception types (InvalidProtobuf, Fail, ...) from
            # a C++ module without a common Python base class besides Exception.
            raise ModelLoadError(f"ONNX Runtime cannot load {path}: {error}") from error

        inputs = [TensorInfo(a.name, tuple(a.shape), a.type) for a in session.get_inputs()]
        outputs = [TensorInfo(a.name, tuple(a.shape), a.type) for a in session.get_outputs()]
        check_card_against_model(card, inputs, outputs)
        model_input = next(t for t in inputs if t.name == card.input.name)

        self.model_path = path
        self.card = card
        self.session = session
        self.providers = session.get_providers()
        self.fixed_size = input_size(card.input, model_input)

    @classmethod
    def load(
        cls,
        model_path: str | Path,
        card_path: str | Path | None = None,
        providers: Sequence[str] = ("cpu",),
        intra_op_threads: int = 0,
    ) -> InferenceEngine:
        """Load a model and its card; the card beside the model when CARD_PATH is None or empty.

        Raises:
            FileNotFoundError: the model or card file does not exist.
            ModelCardError: the card is invalid or does not match the model.
            ModelLoadError: ONNX Runtime cannot load the model.
        """
        card_file = card_path if card_path else find_card_beside(model_path)
        card = load_model_card(card_file)
        return cls(model_path, card, providers, intra_op_threads)

    def infer(
        self,
        image: np.ndarray,
        color_order: ChannelOrder = ChannelOrder.RGB,
        camera: PinholeCamera | None = None,
    ) -> InferenceResult:
        """Run the model on one image and postprocess per the card's task.

        Args:
            image: (H, W), (H, W, 1) or (H, W, 3) uint8 or uint16 pixels, any size.
            color_order: Channel order of a three-channel image (RGB or BGR).
            camera: Intrinsics of IMAGE; used by depth models to report the camera of
                the depth image.

        Raises:
            ImageError: the image cannot be processed (see prepare_input).
        """
        start = time.perf_counter()
        prepared = prepare_input(image, color_order, self.card.input, self.fixed_size)
        preprocessed = time.perf_counter()

        (output,) = self.session.run([self.card.output.name], {self.card.input.name: prepared.tensor})
        ran = time.perf_counter()

        result = self._postprocess(output, prepared.geometry, camera)
        timing = Timing(
            (preprocessed - start) * 1e3, (ran - preprocessed) * 1e3, (time.perf_counter() - ran) * 1e3
        )
        return _with_timing(result, timing)

    def _postprocess(
        self, output: np.ndarray, geometry: ResizeGeometry, camera: PinholeCamera | None
    ) -> InferenceResult:
        task = self.card.task
        if task is Task.SEGMENTATION:
            return self._segmentation(output, geometry)
        if task is Task.DEPTH:
            return self._depth(output, geometry, camera)
        if task is Task.CLASSIFICATION:
            return self._classification(output)
        return self._detection(output, geometry)

    def _segmentation(self, output: np.ndarray, geometry: ResizeGeometry) -> SegmentationResult:
        spec = self.card.output
        if output.ndim == 3:
            output = output[:, np.newaxis]
        scores = output[0]

        if spec.type is OutputType.PROBABILITY:
            labels = (scores[0] > spec.threshold).astype(np.uint8)
            class_count = 2
        else:
            class_count = scores.shape[0]
            label_dtype = np.uint8 if class_count <= 256 else np.uint16
            labels = np.argmax(scores, axis=0).astype(label_dtype)

        labels = _crop_padding(labels, geometry)
        labels = cv2.resize(
            labels, (geometry.image_width, geometry.image_height), interpolation=cv2.INTER_NEAREST
        )
        return SegmentationResult(labels, class_count, _NO_TIMING)

    def _depth(
        self, output: np.ndarray, geometry: ResizeGeometry, camera: PinholeCamera | None
    ) -> DepthResult:
        spec = self.card.output
        values = output.reshape(output.shape[-2:]).astype(np.float32)
        values = _crop_padding(values, geometry)

        if spec.type is OutputType.INVERSE_DEPTH:
            with np.errstate(divide="ignore", invalid="ignore"):
                depth_m = np.where(values > 0, np.float32(spec.scale) / values, np.nan)
        else:
            depth_m = values * np.float32(spec.scale)
        depth_m = depth_m.astype(np.float32)

        scaled_camera = None
        if camera is not None:
            camera.check_image_shape((geometry.image_height, geometry.image_width))
            scaled_camera = camera.scaled(depth_m.shape[1], depth_m.shape[0])
        return DepthResult(depth_m, scaled_camera, _NO_TIMING)

    def _classification(self, output: np.ndarray) -> ClassificationResult:
        spec = self.card.output
        scores = output.reshape(-1).astype(np.float64)
        if spec.type is OutputType.LOGITS:
            exp = np.exp(scores - scores.max())
            scores = exp / exp.sum()

        order = np.argsort(-scores, kind="stable")[: spec.top_k]
        top_k = [ClassScore(int(i), spec.class_name(int(i)), float(scores[i])) for i in order]
        return ClassificationResult(top_k, _NO_TIMING)

    def _detection(self, output: np.ndarray, geometry: ResizeGeometry) -> DetectionResult:
        spec = self.card.output
        rows = output.reshape(-1, output.shape[-1]).astype(np.float64)
        if rows.shape[1] != 6:
            raise ModelCardError(
                f"output {spec.name!r} has rows of {rows.shape[1]} values, but output.type "
                f"boxes_xyxy_score_class needs 6"
            )

        rows = rows[rows[:, 4] >= spec.threshold]
        rows = rows[np.argsort(-rows[:, 4], kind="stable")]
        max_x, max_y = geometry.image_width - 1, geometry.image_height - 1
        detections = []
        for x1, y1, x2, y2, score, class_id in rows:
            detections.append(
                Detection(
                    float(np.clip(x1 / geometry.scale_x, 0, max_x)),
                    float(np.clip(y1 / geometry.scale_y, 0, max_y)),
                    float(np.clip(x2 / geometry.scale_x, 0, max_x)),
                    float(np.clip(y2 / geometry.scale_y, 0, max_y)),
                    float(score),
                    int(class_id),
                    spec.class_name(int(class_id)),
                )
            )
        return DetectionResult(detections, _NO_TIMING)


_NO_TIMING = Timing(0.0, 0.0, 0.0)


def _with_timing(result: InferenceResult, timing: Timing) -> InferenceResult:
    return type(result)(**{**result.__dict__, "timing": timing})


def _crop_padding(values: np.ndarray, geometry: ResizeGeometry) -> np.ndarray:
    """Crop letterbox padding from an output map whose resolution may differ from the tensor's."""
    height, width = values.shape[:2]
    keep_width = max(1, round(width * geometry.content_width / geometry.tensor_width))
    keep_height = max(1, round(height * geometry.content_height / geometry.tensor_height))
    return values[:keep_height, :keep_width]


def label_palette(class_count: int) -> np.ndarray:
    """Return a fixed (class_count, 3) uint8 BGR color per class; class 0 is black."""
    rng = np.random.default_rng(0)
    palette = rng.integers(64, 256, size=(max(class_count, 1), 3), dtype=np.uint8)
    palette[0] = 0
    return palette


def make_overlay(
    image_bgr: np.ndarray, labels: np.ndarray, class_count: int, alpha: float = 0.5
) -> np.ndarray:
    """Blend class colors over an image for display.

    Args:
        image_bgr: (H, W, 3) uint8 BGR image, or (H, W) uint8 gray.
        labels: (H, W) class ids of the same size.
        class_count: Number of classes (sets the palette).
        alpha: Weight of the class colors where the class is not 0.

    Raises:
        ValueError: IMAGE_BGR and LABELS differ in size.
    """
    if image_bgr.ndim == 2:
        image_bgr = cv2.cvtColor(image_bgr, cv2.COLOR_GRAY2BGR)
    if image_bgr.shape[:2] != labels.shape:
        raise ValueError(
            f"overlay image size {image_bgr.shape[:2]} differs from the label size {labels.shape}"
        )
    palette = label_palette(max(class_count, int(labels.max()) + 1))
    colors = palette[labels]
    blended = cv2.addWeighted(image_bgr, 1.0 - alpha, colors, alpha, 0.0)
    return np.where((labels > 0)[:, :, np.newaxis], blended, image_bgr)


@dataclass(frozen=True)
class LoadOutcome:
    """Result of EngineHolder.load: whether the new model is in service, and why not."""

    ok: bool
    message: str


class EngineHolder:
    """The engine in service, replaceable at run time without a gap in service.

    ``load`` builds the new engine beside the current one and swaps only when the load
    and the card check succeeded. Otherwise the current engine stays in service and the
    outcome contains the reason. ``current`` may be read from any thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engine: InferenceEngine | None = None
        self.last_error = ""

    @property
    def current(self) -> InferenceEngine | None:
        with self._lock:
            return self._engine

    def load(
        self,
        model_path: str | Path,
        card_path: str | Path | None = None,
        providers: Sequence[str] = ("cpu",),
        intra_op_threads: int = 0,
    ) -> LoadOutcome:
        """Load a model and its card, and put it in service when both are valid."""
        try:
            engine = InferenceEngine.load(model_path, card_path, providers, intra_op_threads)
        except (FileNotFoundError, ModelCardError, ModelLoadError, ValueError) as error:
            kept = self.current
            kept_text = f"; still serving {kept.model_path}" if kept else "; no model in service"
            message = f"failed to load model {model_path}: {error}{kept_text}"
            self.last_error = message
            LOGGER.error(message)
            return LoadOutcome(False, message)

        with self._lock:
            self._engine = engine
        self.last_error = ""
        message = f"serving {engine.card.name} ({engine.card.task.value}) from {engine.model_path}"
        LOGGER.info(message)
        return LoadOutcome(True, message)


@dataclass(frozen=True)
class LatencySummary:
    """Latency percentiles in milliseconds and throughput over the recent window."""

    p50_ms: float
    p90_ms: float
    p99_ms: float
    rate_hz: float
    count: int


@dataclass
class LatencyStats:
    """Recent latencies and completion times, for percentiles and rate."""

    # Number of recent latencies the percentiles are taken over.
    window: int = 500
    # Seconds over which the rate is measured.
    rate_window_s: float = 5.0
    # Monotonic time in seconds when counting began; the rate's window starts no earlier.
    started_s: float = field(default_factory=time.monotonic)
    _samples: collections.deque = field(default_factory=collections.deque, repr=False)
    _done_s: collections.deque = field(default_factory=collections.deque, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, latency_ms: float, now_s: float | None = None) -> None:
        """Record one completed inference of LATENCY_MS finishing at NOW_S (monotonic seconds)."""
        now_s = time.monotonic() if now_s is None else now_s
        with self._lock:
            self._samples.append(latency_ms)
            while len(self._samples) > self.window:
                self._samples.popleft()
            self._done_s.append(now_s)
            while self._done_s and self._done_s[0] < now_s - self.rate_window_s:
                self._done_s.popleft()

    def summary(self, now_s: float | None = None) -> LatencySummary:
        """Return the percentiles of the recent latencies and the recent rate (zeros when empty)."""
        now_s = time.monotonic() if now_s is None else now_s
        with self._lock:
            samples = np.asarray(self._samples, dtype=np.float64)
            recent = sum(1 for t in self._done_s if t >= now_s - self.rate_window_s)
            span_s = min(self.rate_window_s, max(now_s - self.started_s, 1e-9))
        if samples.size == 0:
            return LatencySummary(0.0, 0.0, 0.0, 0.0, 0)
        p50, p90, p99 = np.percentile(samples, [50, 90, 99])
        return LatencySummary(float(p50), float(p90), float(p99), recent / span_s, int(samples.size))
