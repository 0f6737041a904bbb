"""Tests of quantized_inference_node with real rclpy, DDS on localhost and ONNX Runtime.

The node runs in this process on a multi-threaded executor; a probe node publishes
images and collects the outputs over DDS. References come from running the same
ONNX models directly with onnxruntime after preprocessing written here from the
models' published recipes.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import yaml

# DDS settings must be in place before rclpy loads the middleware.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["RMW_IMPLEMENTATION"] = "rmw_fastrtps_cpp"
os.environ["ROS_DOMAIN_ID"] = str(10 + os.getpid() % 90)

rclpy = pytest.importorskip("rclpy", reason="rclpy (ROS 2 Jazzy) is not installed: pip install -e .[ros]")
onnx = pytest.importorskip("onnx", reason="onnx is needed to build test models: pip install onnx")
ort = pytest.importorskip("onnxruntime")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the test images")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_msgs.msg import Header, String  # noqa: E402
from visualization_msgs.msg import MarkerArray  # noqa: E402

from quantized_inference_node.model_card import ChannelOrder, resolve_path  # noqa: E402
from quantized_inference_node.node import QuantizedInferenceNode, decode_image, encode_image  # noqa: E402
from quantized_inference_node.preprocessing import ImageError  # noqa: E402

pytestmark = pytest.mark.ros

DET_MODEL = "pkg:rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
DET_CARD = "pkg:quantized_inference_node/models/ppocr_det_v4.yaml"
CLS_MODEL = "pkg:rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
CLS_CARD = "pkg:quantized_inference_node/models/ppocr_cls_v2.yaml"
TIMEOUT_S = 60.0

if not resolve_path(DET_MODEL).is_file():
    pytest.skip("rapidocr-onnxruntime's PP-OCR models are not installed", allow_module_level=True)


# ---------------------------------------------------------------- ROS harness


def status_values(status: DiagnosticStatus) -> dict[str, Any]:
    """Return a status's key-value pairs, plus its level and message as _level and _message."""
    return {kv.key: kv.value for kv in status.values} | {"_level": status.level, "_message": status.message}


class Probe:
    """A node that publishes images and collects everything the node under test outputs."""

    def __init__(self, context: Any, executor: MultiThreadedExecutor, namespace: str) -> None:
        self.node = rclpy.create_node(f"probe_{namespace}", context=context)
        self.messages: dict[str, list[Any]] = {}
        self.condition = threading.Condition()
        self.image_publisher = self.node.create_publisher(Image, f"/{namespace}/image", 10)
        self.info_publisher = self.node.create_publisher(CameraInfo, f"/{namespace}/camera_info", 10)
        target = f"{namespace}/quantized_inference_node"
        qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
        outputs = {
            "labels": Image,
            "overlay": Image,
            "depth": Image,
            "camera_info": CameraInfo,
            "classification": String,
            "detections": MarkerArray,
            "detections_json": String,
            "inference_stats": DiagnosticArray,
        }
        for name, message_type in outputs.items():
            self.messages[name] = []
            self.node.create_subscription(
                message_type, f"/{target}/{name}", lambda m, n=name: self._store(n, m), qos
            )
        executor.add_node(self.node)

    def _store(self, name: str, message: Any) -> None:
        with self.condition:
            self.messages[name].append(message)
            self.condition.notify_all()

    def wait_for(self, name: str, predicate: Callable[[Any], bool], timeout_s: float = TIMEOUT_S) -> Any:
        """Return the first message on NAME that satisfies PREDICATE; fail on timeout."""
        deadline = time.monotonic() + timeout_s
        with self.condition:
            while True:
                for message in self.messages[name]:
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail(f"no matching message on ~/{name} within {timeout_s} s")
                self.condition.wait(remaining)

    def publish_until(
        self, image: Image, name: str, predicate: Callable[[Any], bool], period_s: float = 0.3
    ) -> Any:
        """Publish IMAGE every PERIOD_S until a matching output arrives (discovery takes time)."""
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            self.image_publisher.publish(image)
            try:
                return self.wait_for(name, predicate, timeout_s=period_s)
            except pytest.fail.Exception:
                continue
        pytest.fail(f"no matching message on ~/{name} within {TIMEOUT_S} s of publishing")

    def latest_stats(self) -> dict[str, str]:
        with self.condition:
            if not self.messages["inference_stats"]:
                return {}
            status = self.messages["inference_stats"][-1].status[0]
        return status_values(status)

    def wait_stats(self, predicate: Callable[[dict[str, str]], bool], timeout_s: float = TIMEOUT_S) -> dict:
        def matches(message: DiagnosticArray) -> bool:
            return predicate(status_values(message.status[0]))

        message = self.wait_for("inference_stats", matches, timeout_s)
        status = message.status[0]
        return status_values(status)

    def clear(self) -> None:
        with self.condition:
            for messages in self.messages.values():
                messages.clear()


@pytest.fixture(scope="module")
def ros() -> Iterator[tuple[Any, MultiThreadedExecutor]]:
    context = rclpy.context.Context()
    rclpy.init(context=context)
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    yield context, executor
    executor.shutdown()
    rclpy.shutdown(context=context)
    thread.join(timeout=5.0)


_node_counter = iter(range(1000))


@pytest.fixture
def start_node(ros: tuple[Any, MultiThreadedExecutor]) -> Iterator[Callable[..., tuple[Any, Probe]]]:
    """Start the node under a unique namespace with the given parameters, and a probe."""
    context, executor = ros
    started: list[Any] = []

    def start(**parameters: Any) -> tuple[QuantizedInferenceNode, Probe]:
        namespace = f"t{next(_node_counter)}"
        overrides = [Parameter(name, value=value) for name, value in parameters.items()]
        node = QuantizedInferenceNode(context=context, namespace=namespace, parameter_overrides=overrides)
        executor.add_node(node)
        probe = Probe(context, executor, namespace)
        started.extend([node, probe.node])
        return node, probe

    yield start
    for node in started:
        executor.remove_node(node)
        node.destroy_node()


def image_message(pixels: np.ndarray, encoding: str, sec: int, nanosec: int, frame_id: str) -> Image:
    pixels = np.ascontiguousarray(pixels)
    message = Image()
    message.header.stamp.sec = sec
    message.header.stamp.nanosec = nanosec
    message.header.frame_id = frame_id
    message.height, message.width = pixels.shape[:2]
    message.encoding = encoding
    message.is_bigendian = 0
    message.step = int(pixels.strides[0])
    message.data = np.ascontiguousarray(pixels).tobytes()
    return message


def stamp_is(sec: int, nanosec: int) -> Callable[[Any], bool]:
    return lambda m: m.header.stamp.sec == sec and m.header.stamp.nanosec == nanosec


def decode(message: Image, dtype: type, channels: int = 1) -> np.ndarray:
    pixels = np.frombuffer(bytes(message.data), dtype=dtype)
    shape = (message.height, message.width) if channels == 1 else (message.height, message.width, channels)
    return pixels.reshape(shape)


# ---------------------------------------------------------------- references


def reference_text_map(image_bgr: np.ndarray) -> np.ndarray:
    """PP-OCR det by hand: sides rounded to multiples of 32, (x/255 - 0.5)/0.5, threshold 0.3."""
    height, width = image_bgr.shape[:2]
    ratio = min(1.0, 960 / max(height, width))
    resized_height = max(32, round(height * ratio / 32) * 32)
    resized_width = max(32, round(width * ratio / 32) * 32)
    resized = cv2.resize(image_bgr, (resized_width, resized_height)).astype(np.float32)
    tensor = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)[None].astype(np.float32)
    session = ort.InferenceSession(str(resolve_path(DET_MODEL)), providers=["CPUExecutionProvider"])
    probability = session.run(None, {"x": tensor})[0][0, 0]
    text = (probability > 0.3).astype(np.uint8)
    return cv2.resize(text, (width, height), interpolation=cv2.INTER_NEAREST)


def reference_orientation(image_bgr: np.ndarray) -> np.ndarray:
    """PP-OCR cls by hand: height 48, width by aspect ratio up to 192, zero-padded right."""
    height, width = image_bgr.shape[:2]
    resized_width = min(192, round(48 * width / height))
    resized = cv2.resize(image_bgr, (resized_width, 48)).astype(np.float32)
    tensor = np.zeros((1, 3, 48, 192), np.float32)
    tensor[0, :, :, :resized_width] = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
    session = ort.InferenceSession(str(resolve_path(CLS_MODEL)), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": tensor})[0][0]


def slow_classifier(path: Path, size: int = 1024, links: int = 6) -> None:
    """Write a classifier whose output needs LINKS products of SIZE×SIZE matrices per image."""
    rng = np.random.default_rng(7)
    matrix = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
        helper.make_node("Mul", ["matrix", "mean"], ["m0"]),
    ]
    for i in range(links):
        nodes.append(helper.make_node("MatMul", [f"m{i}", "matrix"], [f"m{i + 1}"]))
    nodes += [
        helper.make_node("Slice", [f"m{links}", "starts", "ends"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2])],
        [
            numpy_helper.from_array(matrix, "matrix"),
            numpy_helper.from_array(np.array([0, 0], np.int64), "starts"),
            numpy_helper.from_array(np.array([1, 2], np.int64), "ends"),
        ],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    card = {
        "name": "slow_matmul",
        "task": "classification",
        "input": {"name": "x", "width": 16, "height": 16, "channel_order": "RGB"},
        "output": {"name": "logits", "type": "logits", "class_names": ["a", "b"], "top_k": 2},
    }
    path.with_suffix(".yaml").write_text(yaml.safe_dump(card))


def depth_model(path: Path) -> None:
    """Write a 'depth' model: channel mean of a 64×64 input, 2×2 average pooled to 32×32."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x", "axes"], ["gray"], keepdims=1),
            helper.make_node("AveragePool", ["gray"], ["depth"], kernel_shape=[2, 2], strides=[2, 2]),
        ],
        "depth",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])],
        [helper.make_tensor_value_info("depth", TensorProto.FLOAT, [1, 1, 32, 32])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    card = {
        "name": "mean_depth",
        "task": "depth",
        "input": {"name": "x", "channel_order": "RGB", "scale": 1 / 255},
        "output": {"name": "depth", "type": "metric_depth", "scale": 2.0},
    }
    path.with_suffix(".yaml").write_text(yaml.safe_dump(card))


def box_model(path: Path) -> None:
    """Write a detector that always outputs two boxes in 32×32 tensor pixels."""
    boxes = np.array([[[4, 2, 20, 10, 0.9, 1], [0, 0, 8, 8, 0.2, 0]]], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
            helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
            helper.make_node("Add", ["boxes", "nothing"], ["detections"]),
        ],
        "boxes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("detections", TensorProto.FLOAT, [1, 2, 6])],
        [numpy_helper.from_array(boxes, "boxes"), numpy_helper.from_array(np.float32(0), "zero")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    card = {
        "name": "fixed_boxes",
        "task": "detection",
        "input": {"name": "x", "resize": "letterbox"},
        "output": {
            "name": "detections",
            "type": "boxes_xyxy_score_class",
            "class_names": ["person", "car"],
            "threshold": 0.5,
        },
    }
    path.with_suffix(".yaml").write_text(yaml.safe_dump(card))


# ---------------------------------------------------------------- tests


def test_text_segmentation_matches_onnxruntime(start_node) -> None:
    _, probe = start_node(model_path=DET_MODEL, card_path=DET_CARD)
    page = skimage_data.page()

    labels = probe.publish_until(image_message(page, "mono8", 12, 345, "camera"), "labels", stamp_is(12, 345))

    assert labels.encoding == "mono8"
    assert (labels.width, labels.height) == (page.shape[1], page.shape[0])
    assert labels.header.frame_id == "camera"
    reference = reference_text_map(cv2.cvtColor(page, cv2.COLOR_GRAY2BGR))
    received = decode(labels, np.uint8)
    assert reference.sum() > 1000, "the reference should find the page's text"
    # Float rounding in the normalization may flip pixels whose probability is at 0.3.
    assert np.mean(received != reference) < 1e-3

    overlay = probe.wait_for("overlay", stamp_is(12, 345))
    assert overlay.encoding == "bgr8"
    assert (overlay.width, overlay.height) == (page.shape[1], page.shape[0])
    assert overlay.header.frame_id == "camera"
    overlay_pixels = decode(overlay, np.uint8, 3)
    background = received == 0
    page_bgr = cv2.cvtColor(page, cv2.COLOR_GRAY2BGR)
    np.testing.assert_array_equal(overlay_pixels[background], page_bgr[background])


def test_text_segmentation_rgb_input(start_node) -> None:
    _, probe = start_node(model_path=DET_MODEL, card_path=DET_CARD, publish_overlay=False)
    coffee = skimage_data.coffee()

    labels = probe.publish_until(image_message(coffee, "rgb8", 3, 7, "rgb_camera"), "labels", stamp_is(3, 7))

    reference = reference_text_map(cv2.cvtColor(coffee, cv2.COLOR_RGB2BGR))
    assert (labels.width, labels.height) == (600, 400)
    assert np.mean(decode(labels, np.uint8) != reference) < 1e-3
    time.sleep(0.5)
    assert probe.messages["overlay"] == []


def test_orientation_classification_json(start_node) -> None:
    _, probe = start_node(model_path=CLS_MODEL, card_path=CLS_CARD)
    # 140x40: narrower than 4:1, where letterbox and PaddleOCR's resize agree.
    line = cv2.cvtColor(skimage_data.page()[5:45, 10:150], cv2.COLOR_GRAY2BGR)
    upside_down = np.ascontiguousarray(line[::-1, ::-1])

    for pixels, sec in ((line, 100), (upside_down, 101)):
        message = probe.publish_until(
            image_message(pixels, "bgr8", sec, 0, "camera"),
            "classification",
            lambda m, s=sec: json.loads(m.data)["header"]["sec"] == s,
        )
        payload = json.loads(message.data)
        reference = reference_orientation(pixels)
        best = int(np.argmax(reference))

        assert payload["model"] == "ppocr_cls_v2"
        assert payload["header"] == {"sec": sec, "nanosec": 0, "frame_id": "camera"}
        assert payload["top_k"][0]["label"] == ["0", "180"][best]
        scores = {entry["class_id"]: entry["score"] for entry in payload["top_k"]}
        np.testing.assert_allclose([scores[0], scores[1]], reference, atol=1e-4)


def test_hot_reload_and_failed_reload(start_node, tmp_path: Path) -> None:
    node, probe = start_node(model_path=DET_MODEL, card_path=DET_CARD)
    page = skimage_data.page()
    probe.publish_until(image_message(page, "mono8", 1, 0, "camera"), "labels", stamp_is(1, 0))

    results = node.set_parameters_atomically(
        [Parameter("model_path", value=CLS_MODEL), Parameter("card_path", value=CLS_CARD)]
    )
    assert results.successful
    assert node.engine.card.name == "ppocr_cls_v2"
    probe.publish_until(
        image_message(page[5:45, 10:300], "mono8", 2, 0, "camera"),
        "classification",
        lambda m: json.loads(m.data)["header"]["sec"] == 2,
    )

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"this is not a protobuf")
    (tmp_path / "corrupt.yaml").write_text(Path(resolve_path(CLS_CARD)).read_text())
    failed = node.set_parameters_atomically(
        [Parameter("model_path", value=str(corrupt)), Parameter("card_path", value="")]
    )
    assert not failed.successful
    assert "failed to load model" in failed.reason
    assert "still serving" in failed.reason
    assert node.get_parameter("model_path").value == CLS_MODEL
    probe.publish_until(
        image_message(page[5:45, 10:300], "mono8", 3, 0, "camera"),
        "classification",
        lambda m: json.loads(m.data)["header"]["sec"] == 3,
    )

    mismatched = node.set_parameters_atomically(
        [Parameter("model_path", value=DET_MODEL), Parameter("card_path", value=CLS_CARD)]
    )
    assert not mismatched.successful
    assert "output.name" in mismatched.reason
    assert node.engine.card.name == "ppocr_cls_v2"


def test_missing_model_then_valid(start_node, tmp_path: Path) -> None:
    node, probe = start_node(model_path=str(tmp_path / "absent.onnx"), card_path=DET_CARD)

    stats = probe.wait_stats(lambda s: s["_level"] == DiagnosticStatus.ERROR)
    assert "not found" in stats["_message"]
    assert node.engine is None

    probe.image_publisher.publish(image_message(skimage_data.page(), "mono8", 5, 0, "camera"))
    result = node.set_parameters([Parameter("model_path", value=DET_MODEL)])[0]
    assert result.successful
    probe.publish_until(image_message(skimage_data.page(), "mono8", 6, 0, "camera"), "labels", stamp_is(6, 0))


def test_no_model_then_parameters_one_by_one(start_node) -> None:
    node, probe = start_node()

    stats = probe.wait_stats(lambda s: s["_level"] == DiagnosticStatus.ERROR)
    assert "no model_path set" in stats["_message"]
    card_result = node.set_parameters([Parameter("card_path", value=CLS_CARD)])[0]
    assert card_result.successful
    assert node.engine is None
    model_result = node.set_parameters([Parameter("model_path", value=CLS_MODEL)])[0]
    assert model_result.successful
    assert node.engine.card.name == "ppocr_cls_v2"

    line = skimage_data.page()[5:45, 10:150]
    probe.publish_until(
        image_message(line, "mono8", 7, 0, "camera"),
        "classification",
        lambda m: json.loads(m.data)["header"]["sec"] == 7,
    )
    stats = probe.wait_stats(lambda s: s["_level"] == DiagnosticStatus.OK)
    assert stats["model"] == "ppocr_cls_v2"


def test_bad_images_are_rejected(start_node) -> None:
    _, probe = start_node(model_path=DET_MODEL, card_path=DET_CARD)
    page = skimage_data.page()
    probe.publish_until(image_message(page, "mono8", 1, 0, "camera"), "labels", stamp_is(1, 0))

    cases = [
        (image_message(np.zeros((4, 4, 4), np.uint8), "rgba8", 2, 0, "camera"), "unsupported image encoding"),
        (image_message(np.zeros((0, 0), np.uint8), "mono8", 3, 0, "camera"), "empty mono8 image"),
        (image_message(page.astype(np.uint16) * 256, "mono16", 4, 0, "camera"), "input.bit_depth is 8"),
    ]
    truncated = image_message(page, "mono8", 5, 0, "camera")
    truncated.data = bytes(truncated.data)[:100]
    cases.append((truncated, "truncated"))

    for message, expected in cases:
        stats = None
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            probe.image_publisher.publish(message)
            time.sleep(0.3)
            stats = probe.latest_stats()
            if expected in stats.get("last_error", ""):
                break
        assert stats is not None
        assert expected in stats["last_error"]

    # The node still serves after every rejection, and no output carries a rejected stamp.
    probe.publish_until(image_message(page, "mono8", 9, 0, "camera"), "labels", stamp_is(9, 0))
    rejected_secs = {2, 3, 4, 5}
    assert not [m for m in probe.messages["labels"] if m.header.stamp.sec in rejected_secs]


def test_slow_model_keeps_newest(start_node, tmp_path: Path) -> None:
    slow_classifier(tmp_path / "slow.onnx")
    node, probe = start_node(model_path=str(tmp_path / "slow.onnx"), intra_op_threads=1)
    image = np.zeros((16, 16, 3), np.uint8)
    probe.publish_until(
        image_message(image, "rgb8", 1, 0, "camera"),
        "classification",
        lambda m: json.loads(m.data)["header"]["sec"] == 1,
        period_s=2.0,
    )

    # 40 images at 100 Hz, far faster than 6 products of 1024x1024 matrices per image.
    for index in range(40):
        probe.image_publisher.publish(image_message(image, "rgb8", 1000 + index, 0, "camera"))
        time.sleep(0.01)

    last = probe.wait_for("classification", lambda m: json.loads(m.data)["header"]["sec"] == 1039)
    assert json.loads(last.data)["model"] == "slow_matmul"
    outputs = [json.loads(m.data)["header"]["sec"] for m in probe.messages["classification"]]
    burst_outputs = [sec for sec in outputs if sec >= 1000]
    assert burst_outputs == sorted(burst_outputs)
    assert len(burst_outputs) < 40

    counts = node._slot.counts
    stats = probe.wait_stats(lambda s: int(s["skipped"]) == counts.skipped and int(s["processed"]) >= 2)
    assert int(stats["skipped"]) > 0
    assert int(stats["received"]) == counts.taken + counts.skipped
    assert float(stats["latency_p50_ms"]) > 0
    assert stats["model"] == "slow_matmul"


def test_depth_and_scaled_camera_info(start_node, tmp_path: Path) -> None:
    depth_model(tmp_path / "depth.onnx")
    _, probe = start_node(model_path=str(tmp_path / "depth.onnx"))
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, size=(96, 128, 3), dtype=np.uint8)
    info = CameraInfo(width=128, height=96, distortion_model="plumb_bob")
    info.d = [0.1, -0.2, 0.0, 0.0, 0.0]
    info.k = [100.0, 0.0, 63.5, 0.0, 110.0, 47.5, 0.0, 0.0, 1.0]
    info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    info.p = [100.0, 0.0, 63.5, 0.0, 0.0, 110.0, 47.5, 0.0, 0.0, 0.0, 1.0, 0.0]

    deadline = time.monotonic() + TIMEOUT_S
    while not probe.messages["camera_info"] and time.monotonic() < deadline:
        probe.info_publisher.publish(info)
        time.sleep(0.05)
        probe.image_publisher.publish(image_message(pixels, "rgb8", 8, 9, "optical"))
        time.sleep(0.25)

    depth = probe.wait_for("depth", stamp_is(8, 9))
    scaled = probe.wait_for("camera_info", stamp_is(8, 9))
    assert depth.encoding == "32FC1"
    assert (depth.width, depth.height) == (32, 32)
    assert depth.header.frame_id == "optical"
    resized = cv2.resize(pixels, (64, 64)).astype(np.float32) / 255.0
    expected = 2.0 * resized.mean(axis=2).reshape(32, 2, 32, 2).mean(axis=(1, 3))
    np.testing.assert_allclose(decode(depth, np.float32), expected, atol=1e-5)

    # Scaling 128x96 to 32x32: sx = 1/4, sy = 1/3, centres move as (c + 0.5)·s − 0.5.
    assert (scaled.width, scaled.height) == (32, 32)
    # fx = 100/4, cx = (63.5 + 0.5)/4 - 0.5, fy = 110/3, cy = (47.5 + 0.5)/3 - 0.5.
    np.testing.assert_allclose(scaled.k, [25.0, 0, 15.5, 0, 110 / 3, 15.5, 0, 0, 1], atol=1e-9)
    np.testing.assert_allclose(scaled.p, [25.0, 0, 15.5, 0, 0, 110 / 3, 15.5, 0, 0, 0, 1, 0], atol=1e-9)
    np.testing.assert_allclose(scaled.d, info.d)
    assert scaled.header.frame_id == "optical"


def test_detection_markers_and_json(start_node, tmp_path: Path) -> None:
    box_model(tmp_path / "boxes.onnx")
    _, probe = start_node(model_path=str(tmp_path / "boxes.onnx"))
    # 64x32 letterboxed into 32x32: scale 1/2, image at the top of the tensor.
    pixels = np.zeros((32, 64, 3), np.uint8)

    markers = probe.publish_until(
        image_message(pixels, "bgr8", 4, 2, "camera"),
        "detections",
        lambda m: any(marker.header.stamp.sec == 4 for marker in m.markers),
    )
    text = probe.wait_for("detections_json", lambda m: json.loads(m.data)["header"]["sec"] == 4)
    payload = json.loads(text.data)

    assert [d["label"] for d in payload["detections"]] == ["car"]
    np.testing.assert_allclose(payload["detections"][0]["box_xyxy_px"], [8, 4, 40, 20], atol=1e-6)
    boxes = [m for m in markers.markers if m.action == m.ADD]
    assert len(boxes) == 1
    corners = [(p.x, p.y) for p in boxes[0].points]
    np.testing.assert_allclose(corners, [(8, 4), (40, 4), (40, 20), (8, 20), (8, 4)], atol=1e-6)
    assert boxes[0].header.frame_id == "camera"


# ---------------------------------------------------------------- message conversion


def test_decode_padded_rows() -> None:
    # 2x3 rgb8 with a step of 12 bytes: 9 bytes of pixels then 3 bytes of row padding.
    message = Image(height=2, width=3, encoding="rgb8", is_bigendian=0, step=12)
    message.data = bytes([
        1, 2, 3, 4, 5, 6, 7, 8, 9, 0xEE, 0xEE, 0xEE,
        10, 11, 12, 13, 14, 15, 16, 17, 18, 0xEE, 0xEE, 0xEE,
    ])  # fmt: skip

    decoded = decode_image(message)

    assert decoded.channel_order is ChannelOrder.RGB
    np.testing.assert_array_equal(decoded.pixels[0, 2], [7, 8, 9])
    np.testing.assert_array_equal(decoded.pixels[1, 0], [10, 11, 12])
    assert decoded.pixels.shape == (2, 3, 3)


def test_decode_16_bit_byte_orders() -> None:
    little = Image(height=1, width=2, encoding="mono16", is_bigendian=0, step=4)
    little.data = bytes([0x34, 0x12, 0xFF, 0x00])
    big = Image(height=1, width=2, encoding="16UC1", is_bigendian=1, step=4)
    big.data = bytes([0x12, 0x34, 0x00, 0xFF])

    for message in (little, big):
        decoded = decode_image(message)
        assert decoded.pixels.dtype == np.uint16
        assert decoded.channel_order is ChannelOrder.GRAY
        np.testing.assert_array_equal(decoded.pixels, [[0x1234, 0x00FF]])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"encoding": "rgba8", "height": 1, "width": 1, "step": 4, "data": b"\0" * 4},
            "unsupported image encoding 'rgba8': use one of mono8",
        ),
        ({"encoding": "mono8", "height": 0, "width": 0, "step": 0, "data": b""}, "empty mono8 image 0x0"),
        (
            {"encoding": "bgr8", "height": 1, "width": 2, "step": 5, "data": b"\0" * 6},
            "invalid step 5 of a 2x1 bgr8 image: a row needs at least 6 bytes",
        ),
        (
            {"encoding": "mono8", "height": 2, "width": 2, "step": 2, "data": b"\0" * 3},
            "mono8 image 2x2 with step 2 has 3 bytes of data: expected 4",
        ),
    ],
)
def test_decode_rejects_bad_messages(fields: dict, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(Image(**fields))


def test_encode_round_trip() -> None:
    rng = np.random.default_rng(5)
    depth = rng.random((3, 4), dtype=np.float32)
    header = Header(frame_id="camera")

    message = encode_image(depth, "32FC1", header)

    assert (message.height, message.width, message.step) == (3, 4, 16)
    assert message.header.frame_id == "camera"
    np.testing.assert_array_equal(np.frombuffer(bytes(message.data), np.float32).reshape(3, 4), depth)


def test_node_executable_starts_and_stops() -> None:
    import signal
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "quantized_inference_node.node", "--ros-args",
        "-r", "__ns:=/subprocess_test", "-p", f"model_path:={CLS_MODEL}", "-p", f"card_path:={CLS_CARD}",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        output = ""
        while "serving ppocr_cls_v2" not in output and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output += line
        assert "serving ppocr_cls_v2" in output
        process.send_signal(signal.SIGINT)
        process.wait(timeout=TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
