"""ROS 2 node serving an ONNX perception model on camera images.

    ros2 run surfel_perception quantized_inference_node --ros-args \\
        -p model_path:=pkg:rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx \\
        -p card_path:=pkg:quantized_inference_node/models/ppocr_det_v4.yaml \\
        -r image:=/camera/image_raw

Subscribes ``image`` (sensor_msgs/Image: mono8, 8UC1, rgb8, bgr8, 8UC3 as BGR, and
mono16/16UC1 for cards with ``input.bit_depth: 16``; decoded by
:mod:`surfel_mapping_node.image_encoding`, shared with the mapping node and the bag
reader) and ``camera_info``. Publishes, with the input image's header, per the card's
task:

- segmentation: ``~/labels`` (mono8 class ids, 16UC1 above 256 classes) and
  ``~/overlay`` (bgr8, when ``publish_overlay`` is true);
- depth: ``~/depth`` (32FC1 metres) and ``~/camera_info`` scaled to the depth size
  (once a camera_info of the image's size has arrived);
- classification: ``~/classification`` (std_msgs/String, JSON with the top-k labels);
- detection: ``~/detections`` (visualization_msgs/MarkerArray, one LINE_STRIP per box
  in pixel coordinates: x = column, y = row, z = 0) and the same boxes as JSON on
  ``~/detections_json``.

``~/inference_stats`` (diagnostic_msgs/DiagnosticArray) reports latency percentiles,
rate and skipped images once a second. Inference runs in a worker thread fed by a
single slot: when inference is slower than the camera, only the newest image waits and
the replaced ones are counted as skipped. Setting ``model_path`` (or ``card_path``) at
run time loads the new model beside the old one. A model that fails to load is
rejected with the reason, and the old one stays in service.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header, String
from visualization_msgs.msg import Marker, MarkerArray

from quantized_inference_node.inference import (
    ClassificationResult,
    DepthResult,
    DetectionResult,
    EngineHolder,
    InferenceEngine,
    InferenceResult,
    LatencyStats,
    SegmentationResult,
    label_palette,
    make_overlay,
)
from quantized_inference_node.latest_frame import LatestSlot
from quantized_inference_node.model_card import ChannelOrder, Task
from quantized_inference_node.preprocessing import ImageError
from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.image_encoding import IMAGE_ENCODINGS, ImageEncodingError, decode_pixels

# Encodings of sensor_msgs/Image the node reads; their pixel formats and channel orders
# (8UC3 as BGR) are in surfel_mapping_node.image_encoding.IMAGE_ENCODINGS.
SUPPORTED_ENCODINGS: tuple[str, ...] = ("mono8", "8UC1", "rgb8", "bgr8", "8UC3", "mono16", "16UC1")

# Image streams: the newest image matters and a late one is worthless, so best effort
# with a queue of one (a reliable publisher still connects to a best-effort subscriber).
SENSOR_QOS = QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.BEST_EFFORT)
OUTPUT_QOS = QoSProfile(depth=5, history=HistoryPolicy.KEEP_LAST, reliability=ReliabilityPolicy.RELIABLE)
# Output topics of each task.
TASK_OUTPUTS: dict[Task, tuple[tuple[type, str], ...]] = {
    Task.SEGMENTATION: ((Image, "~/labels"), (Image, "~/overlay")),
    Task.DEPTH: ((Image, "~/depth"), (CameraInfo, "~/camera_info")),
    Task.CLASSIFICATION: ((String, "~/classification"),),
    Task.DETECTION: ((MarkerArray, "~/detections"), (String, "~/detections_json")),
}
# Seconds between repeats of the same warning.
WARN_PERIOD_S = 5.0
# Parameters whose change reloads the model.
MODEL_PARAMETERS = ("model_path", "card_path", "providers", "intra_op_threads")


@dataclass(frozen=True)
class DecodedImage:
    """Pixels of a sensor_msgs/Image as a numpy array, with their channel order."""

    pixels: np.ndarray
    channel_order: ChannelOrder


@dataclass(frozen=True)
class PendingImage:
    """An image waiting for inference, with the camera_info that was newest at its arrival."""

    message: Image
    camera_info: CameraInfo | None
    received_s: float


def decode_image(message: Image) -> DecodedImage:
    """Return the pixels of a sensor_msgs/Image as (H, W) or (H, W, 3) uint8/uint16.

    Decoded by :func:`surfel_mapping_node.image_encoding.decode_pixels`: row padding
    skipped, big-endian data byte-swapped, channels in the message's order.

    Raises:
        ImageError: an empty image, an encoding outside SUPPORTED_ENCODINGS, a step
            shorter than a row, or a data buffer shorter than height × step.
    """
    try:
        pixels = decode_pixels(message, SUPPORTED_ENCODINGS)
    except ImageEncodingError as error:
        raise ImageError(str(error)) from error
    return DecodedImage(pixels, ChannelOrder(IMAGE_ENCODINGS[message.encoding].channel_order))


def encode_image(pixels: np.ndarray, encoding: str, header: Header) -> Image:
    """Return a sensor_msgs/Image of PIXELS, row-major with no padding, little-endian."""
    message = Image()
    message.header = header
    message.height, message.width = int(pixels.shape[0]), int(pixels.shape[1])
    message.encoding = encoding
    message.is_bigendian = 0
    contiguous = np.ascontiguousarray(pixels)
    message.step = int(contiguous.strides[0])
    message.data = contiguous.tobytes()
    return message


def scaled_camera_info(info: CameraInfo, width: int, height: int, header: Header) -> CameraInfo:
    """Return INFO for the same view resampled to WIDTH × HEIGHT pixels.

    K and P scale as in PinholeCamera.scaled; distortion coefficients act on normalized
    coordinates, so they stay the same.
    """
    camera = PinholeCamera.from_K(np.asarray(info.k).reshape(3, 3), info.width, info.height)
    scaled = camera.scaled(width, height)
    sx, sy = width / info.width, height / info.height

    result = CameraInfo()
    result.header = header
    result.width, result.height = width, height
    result.distortion_model = info.distortion_model
    result.d = list(info.d)
    result.k = scaled.K.reshape(-1).tolist()
    result.r = list(info.r)
    p = np.asarray(info.p, dtype=np.float64).reshape(3, 4)
    if np.any(p):
        projection = PinholeCamera.from_P(p, info.width, info.height).scaled(width, height)
        p_scaled = np.zeros((3, 4))
        p_scaled[:, :3] = projection.K
        p_scaled[0, 3] = p[0, 3] * sx
        p_scaled[1, 3] = p[1, 3] * sy
        p_scaled[2, 3] = p[2, 3]
        result.p = p_scaled.reshape(-1).tolist()
    result.binning_x, result.binning_y = info.binning_x, info.binning_y
    return result


def stamp_dict(header: Header) -> dict[str, Any]:
    return {"sec": header.stamp.sec, "nanosec": header.stamp.nanosec, "frame_id": header.frame_id}


class QuantizedInferenceNode(Node):
    """Serve one ONNX model (with its card) on an image topic; see the module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("quantized_inference_node", **kwargs)
        self._declare_parameters()

        self._holder = EngineHolder()
        self._slot: LatestSlot[PendingImage] = LatestSlot()
        self._stats = LatencyStats()
        self._camera_info: CameraInfo | None = None
        self._output_publishers: dict[str, Any] = {}
        self._output_publishers_lock = threading.Lock()
        self._processed = 0
        self._rejected = 0
        self._last_error = ""
        self._last_error_s = -math.inf
        self._max_rate_hz = float(self.get_parameter("max_rate").value)
        self._publish_overlay = bool(self.get_parameter("publish_overlay").value)

        # Load the initial model before the callback exists, so that a bad startup
        # model leaves the node running without a model instead of failing to start.
        self._load_model(self._model_parameters({}))
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self.create_subscription(Image, "image", self._on_image, SENSOR_QOS)
        self.create_subscription(CameraInfo, "camera_info", self._on_camera_info, SENSOR_QOS)
        self._stats_publisher = self.create_publisher(DiagnosticArray, "~/inference_stats", OUTPUT_QOS)
        self.create_timer(1.0, self._publish_stats)
        self.get_logger().info(
            "subscribed to image and camera_info with best-effort QoS, depth 1; outputs are "
            "reliable, depth 5"
        )

        self._stop_event = threading.Event()
        self._worker = threading.Thread(target=self._run_worker, name="inference_worker", daemon=True)
        self._worker.start()

    def destroy_node(self) -> None:
        """Stop the inference worker, then destroy the node."""
        self._stop_event.set()
        self._slot.close()
        self._worker.join(timeout=10.0)
        super().destroy_node()

    @property
    def engine(self) -> InferenceEngine | None:
        """The engine in service, None until a model has loaded."""
        return self._holder.current

    def _declare_parameters(self) -> None:
        self.declare_parameter(
            "model_path",
            "",
            ParameterDescriptor(
                description="ONNX model file, or pkg:<python package>/<path inside it>; setting it "
                "at run time loads the new model and keeps the old one if that fails",
            ),
        )
        self.declare_parameter(
            "card_path",
            "",
            ParameterDescriptor(
                description="Model card YAML; empty takes <model>.yaml or <model>.onnx.yaml beside "
                "the model",
            ),
        )
        self.declare_parameter(
            "providers",
            ["cpu"],
            ParameterDescriptor(
                description="ONNX Runtime execution providers in order of preference: cpu, cuda, "
                "tensorrt or a full provider name; absent ones are skipped with a warning",
            ),
        )
        self.declare_parameter(
            "intra_op_threads",
            0,
            ParameterDescriptor(
                description="Threads per operator; 0 lets ONNX Runtime use one per core",
                integer_range=[IntegerRange(from_value=0, to_value=1024, step=1)],
            ),
        )
        self.declare_parameter(
            "max_rate",
            0.0,
            ParameterDescriptor(
                description="Maximum inference rate in Hz; 0 runs as fast as the model allows",
                floating_point_range=[FloatingPointRange(from_value=0.0, to_value=1000.0, step=0.0)],
            ),
        )
        self.declare_parameter(
            "publish_overlay",
            True,
            ParameterDescriptor(description="Publish ~/overlay (bgr8) for segmentation models"),
        )

    def _model_parameters(self, changes: dict[str, Any]) -> dict[str, Any]:
        values = {name: self.get_parameter(name).value for name in MODEL_PARAMETERS}
        values.update({k: v for k, v in changes.items() if k in MODEL_PARAMETERS})
        return values

    def _load_model(self, values: dict[str, Any]) -> tuple[bool, str]:
        if not values["model_path"]:
            message = "no model_path set: set model_path to an ONNX model to start inference"
            self._last_error = message
            self.get_logger().warning(message)
            return False, message

        outcome = self._holder.load(
            values["model_path"],
            values["card_path"] or None,
            list(values["providers"]),
            int(values["intra_op_threads"]),
        )
        if outcome.ok:
            self._last_error = ""
            self._create_output_publishers(self._holder.current.card.task)
            self.get_logger().info(f"{outcome.message}, providers {self._holder.current.providers}")
        else:
            self._last_error = outcome.message
            self._last_error_s = time.monotonic()
            self.get_logger().error(outcome.message)
        return outcome.ok, outcome.message

    def _on_set_parameters(self, parameters: list[Parameter]) -> SetParametersResult:
        changes = {p.name: p.value for p in parameters}

        if "max_rate" in changes and not math.isfinite(changes["max_rate"]):
            return SetParametersResult(successful=False, reason="max_rate must be a finite number of Hz")
        if "providers" in changes and not all(str(p).strip() for p in changes["providers"]):
            return SetParametersResult(
                successful=False, reason="providers must not contain empty names: use cpu, cuda or tensorrt"
            )

        # NOTE: the load runs in the executor thread, so other callbacks of this node wait
        # until it finishes. Images that arrive meanwhile are dropped by the depth-1
        # subscription, not queued.
        # Without a model_path, the other model parameters are stored for the next load.
        model_values = self._model_parameters(changes)
        if any(name in changes for name in MODEL_PARAMETERS) and model_values["model_path"]:
            ok, message = self._load_model(model_values)
            if not ok:
                return SetParametersResult(successful=False, reason=message)

        if "max_rate" in changes:
            self._max_rate_hz = float(changes["max_rate"])
        if "publish_overlay" in changes:
            self._publish_overlay = bool(changes["publish_overlay"])
        return SetParametersResult(successful=True)

    def _on_image(self, message: Image) -> None:
        self._slot.put(PendingImage(message, self._camera_info, time.monotonic()))

    def _on_camera_info(self, message: CameraInfo) -> None:
        self._camera_info = message

    def _run_worker(self) -> None:
        last_start_s = -math.inf
        while not self._stop_event.is_set():
            # Wait out the rate limit before taking, so the newest image is the one taken.
            if self._max_rate_hz > 0:
                wait_s = last_start_s + 1.0 / self._max_rate_hz - time.monotonic()
                if wait_s > 0 and self._stop_event.wait(wait_s):
                    break

            pending = self._slot.take(timeout_s=0.1)
            if pending is None:
                continue
            last_start_s = time.monotonic()
            self._process(pending)

    def _process(self, pending: PendingImage) -> None:
        engine = self._holder.current
        if engine is None:
            self._reject(f"image dropped: no model in service ({self._last_error or 'none loaded'})")
            return

        try:
            decoded = decode_image(pending.message)
            camera = self._camera_for(pending, decoded.pixels.shape)
            result = engine.infer(decoded.pixels, decoded.channel_order, camera)
            self._publish_result(engine, result, decoded, pending)
        except ImageError as error:
            self._reject(f"image rejected: {error}")
            return
        except Exception as error:
            # The worker must survive anything a model or a message can raise, or the node
            # would stop serving without exiting. The error is counted and reported.
            self._reject(f"inference failed on {engine.model_path}: {type(error).__name__}: {error}")
            return

        self._processed += 1
        self._stats.add(result.timing.total_ms)

    def _reject(self, message: str) -> None:
        self._rejected += 1
        self._last_error = message
        self._last_error_s = time.monotonic()
        self.get_logger().warning(message, throttle_duration_sec=WARN_PERIOD_S)

    def _camera_for(self, pending: PendingImage, shape: tuple[int, ...]) -> PinholeCamera | None:
        info = pending.camera_info
        if info is None or (info.height, info.width) != tuple(shape[:2]) or not np.any(info.k):
            return None
        return PinholeCamera.from_K(np.asarray(info.k).reshape(3, 3), info.width, info.height)

    def _create_output_publishers(self, task: Task) -> None:
        # Created at load, not at first use, so subscribers can connect before the first image.
        for message_type, topic in TASK_OUTPUTS[task]:
            self._publisher(message_type, topic)

    def _publisher(self, message_type: type, topic: str) -> Any:
        with self._output_publishers_lock:
            if topic not in self._output_publishers:
                self._output_publishers[topic] = self.create_publisher(message_type, topic, OUTPUT_QOS)
            return self._output_publishers[topic]

    def _publish_result(
        self, engine: InferenceEngine, result: InferenceResult, decoded: DecodedImage, pending: PendingImage
    ) -> None:
        header = pending.message.header
        if isinstance(result, SegmentationResult):
            self._publish_segmentation(result, decoded, header)
        elif isinstance(result, DepthResult):
            self._publish_depth(result, pending, header)
        elif isinstance(result, ClassificationResult):
            payload = {
                "model": engine.card.name,
                "header": stamp_dict(header),
                "top_k": [{"class_id": c.class_id, "label": c.label, "score": c.score} for c in result.top_k],
            }
            self._publisher(String, "~/classification").publish(String(data=json.dumps(payload)))
        elif isinstance(result, DetectionResult):
            self._publish_detections(engine, result, header)

    def _publish_segmentation(
        self, result: SegmentationResult, decoded: DecodedImage, header: Header
    ) -> None:
        encoding = "mono8" if result.labels.dtype == np.uint8 else "16UC1"
        self._publisher(Image, "~/labels").publish(encode_image(result.labels, encoding, header))
        if not self._publish_overlay:
            return

        pixels = decoded.pixels
        if pixels.dtype == np.uint16:
            pixels = (pixels >> 8).astype(np.uint8)
        if decoded.channel_order is ChannelOrder.RGB:
            pixels = pixels[:, :, ::-1]
        overlay = make_overlay(np.ascontiguousarray(pixels), result.labels, result.class_count)
        self._publisher(Image, "~/overlay").publish(encode_image(overlay, "bgr8", header))

    def _publish_depth(self, result: DepthResult, pending: PendingImage, header: Header) -> None:
        self._publisher(Image, "~/depth").publish(encode_image(result.depth_m, "32FC1", header))
        if result.camera is None or pending.camera_info is None:
            self.get_logger().warning(
                "~/camera_info not published: no camera_info of the image's size has arrived",
                throttle_duration_sec=WARN_PERIOD_S,
            )
            return
        info = scaled_camera_info(pending.camera_info, result.camera.width, result.camera.height, header)
        self._publisher(CameraInfo, "~/camera_info").publish(info)

    def _publish_detections(self, engine: InferenceEngine, result: DetectionResult, header: Header) -> None:
        palette = label_palette(max([d.class_id for d in result.detections], default=0) + 2)
        markers = MarkerArray()
        clear = Marker(header=header, ns=engine.card.name, action=Marker.DELETEALL)
        markers.markers.append(clear)
        for index, detection in enumerate(result.detections):
            marker = Marker(header=header, ns=engine.card.name, id=index, type=Marker.LINE_STRIP)
            marker.action = Marker.ADD
            marker.pose.orientation.w = 1.0
            # Line width in pixels, as the points are in pixel coordinates.
            marker.scale.x = 2.0
            blue, green, red = palette[detection.class_id + 1] / 255.0
            marker.color.r, marker.color.g, marker.color.b, marker.color.a = red, green, blue, 1.0
            corners = [
                (detection.x_min, detection.y_min),
                (detection.x_max, detection.y_min),
                (detection.x_max, detection.y_max),
                (detection.x_min, detection.y_max),
                (detection.x_min, detection.y_min),
            ]
            marker.points = [Point(x=float(x), y=float(y), z=0.0) for x, y in corners]
            marker.text = f"{detection.label} {detection.score:.2f}"
            markers.markers.append(marker)
        self._publisher(MarkerArray, "~/detections").publish(markers)

        payload = {
            "model": engine.card.name,
            "header": stamp_dict(header),
            "detections": [
                {
                    "class_id": d.class_id,
                    "label": d.label,
                    "score": d.score,
                    "box_xyxy_px": [d.x_min, d.y_min, d.x_max, d.y_max],
                }
                for d in result.detections
            ],
        }
        self._publisher(String, "~/detections_json").publish(String(data=json.dumps(payload)))

    def _publish_stats(self) -> None:
        engine = self._holder.current
        summary = self._stats.summary()
        counts = self._slot.counts

        status = DiagnosticStatus()
        status.name = f"{self.get_name()}: inference"
        status.hardware_id = engine.card.name if engine else ""
        if engine is None:
            status.level = DiagnosticStatus.ERROR
            status.message = self._last_error or "no model in service"
        elif time.monotonic() - self._last_error_s < WARN_PERIOD_S:
            status.level = DiagnosticStatus.WARN
            status.message = self._last_error
        else:
            status.level = DiagnosticStatus.OK
            status.message = f"serving {engine.card.name}"

        values = {
            "model": engine.card.name if engine else "",
            "model_path": str(engine.model_path) if engine else "",
            "task": engine.card.task.value if engine else "",
            "providers": ",".join(engine.providers) if engine else "",
            "latency_p50_ms": f"{summary.p50_ms:.2f}",
            "latency_p90_ms": f"{summary.p90_ms:.2f}",
            "latency_p99_ms": f"{summary.p99_ms:.2f}",
            "rate_hz": f"{summary.rate_hz:.2f}",
            "received": str(counts.received),
            "processed": str(self._processed),
            "skipped": str(counts.skipped),
            "rejected": str(self._rejected),
            "last_error": self._last_error,
        }
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]

        array = DiagnosticArray()
        array.header.stamp = self.get_clock().now().to_msg()
        array.status = [status]
        self._stats_publisher.publish(array)


def main(args: list[str] | None = None) -> None:
    """Run the node until Ctrl-C or a ROS shutdown."""
    rclpy.init(args=args)
    executor = SingleThreadedExecutor()
    node = None
    # Ctrl-C may arrive while the model loads, before spinning starts.
    try:
        node = QuantizedInferenceNode()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    main()
