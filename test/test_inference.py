"""Tests of the ROS-free inference engine, the keep-newest slot and the latency statistics.

Small ONNX models are built here with onnx.helper, so each expected output follows
from the model's definition; the PP-OCR models of rapidocr-onnxruntime are compared
with onnxruntime run directly.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import yaml

onnx = pytest.importorskip("onnx", reason="onnx is needed to build test models: pip install onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from quantized_inference_node.inference import (  # noqa: E402
    ClassificationResult,
    DepthResult,
    DetectionResult,
    EngineHolder,
    InferenceEngine,
    LatencyStats,
    ModelLoadError,
    SegmentationResult,
    make_overlay,
    select_providers,
)
from quantized_inference_node.latest_frame import LatestSlot  # noqa: E402
from quantized_inference_node.model_card import (  # noqa: E402
    ChannelOrder,
    ModelCardError,
    model_card_from_dict,
    resolve_path,
)
from quantized_inference_node.preprocessing import ImageError, prepare_input, resize_geometry  # noqa: E402
from surfel_mapping_node.camera import PinholeCamera  # noqa: E402

DET_MODEL = "pkg:rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"
DET_CARD = "pkg:quantized_inference_node/models/ppocr_det_v4.yaml"
CLS_MODEL = "pkg:rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
CLS_CARD = "pkg:quantized_inference_node/models/ppocr_cls_v2.yaml"
needs_ppocr = pytest.mark.skipif(
    not resolve_path(DET_MODEL).is_file(), reason="rapidocr-onnxruntime's PP-OCR models are not installed"
)


def identity_model(path: Path, shape: list[int], output_shape: list[int] | None = None) -> Path:
    """Write a model whose output is its input (reshaped to OUTPUT_SHAPE when given)."""
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    initializers = []
    if output_shape is not None:
        nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
        initializers = [numpy_helper.from_array(np.array(output_shape, np.int64), "shape")]
    graph = helper.make_graph(
        nodes,
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape or shape)],
        initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def card(task: str, input_section: dict[str, Any], output_section: dict[str, Any]) -> Any:
    """Return a card for a model with input 'x' and output 'y'."""
    data = {
        "name": "test",
        "task": task,
        "input": {"name": "x", **input_section},
        "output": {"name": "y", **output_section},
    }
    return model_card_from_dict(data)


# ---------------------------------------------------------------- providers


def test_cpu_provider_by_default() -> None:
    assert select_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert select_providers([]) == ["CPUExecutionProvider"]


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime build has CUDA"
)
def test_absent_provider_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="quantized_inference_node.inference"):
        providers = select_providers(["cuda", "cpu"])

    assert providers == ["CPUExecutionProvider"]
    assert "provider CUDAExecutionProvider requested but this onnxruntime build offers only" in caplog.text


def test_empty_provider_name() -> None:
    with pytest.raises(ValueError, match=r"invalid provider name ' ': use cpu, cuda, tensorrt"):
        select_providers([" "])


# ---------------------------------------------------------------- preprocessing


def test_multiple_of_32_geometry() -> None:
    spec = card("segmentation", {"resize": "multiple_of_32", "max_side": 960}, {"type": "probability"}).input

    page = resize_geometry(spec, 384, 191, (0, 0))
    large = resize_geometry(spec, 2000, 1000, (0, 0))
    tiny = resize_geometry(spec, 10, 10, (0, 0))

    assert (page.tensor_width, page.tensor_height) == (384, 192)
    # 2000 → 960 (ratio 0.48); 1000 · 0.48 = 480.
    assert (large.tensor_width, large.tensor_height) == (960, 480)
    assert (tiny.tensor_width, tiny.tensor_height) == (32, 32)
    assert (tiny.content_width, tiny.content_height) == (32, 32)


def test_letterbox_geometry() -> None:
    spec = card("segmentation", {"resize": "letterbox"}, {"type": "probability"}).input

    wide = resize_geometry(spec, 64, 32, (32, 32))
    tall = resize_geometry(spec, 10, 40, (32, 32))

    assert (wide.content_width, wide.content_height) == (32, 16)
    assert wide.scale_x == pytest.approx(0.5)
    assert (tall.content_width, tall.content_height) == (8, 32)


def test_prepare_normalizes_and_reorders() -> None:
    spec = card(
        "segmentation",
        {"channel_order": "BGR", "scale": 0.5, "mean": [1.0, 2.0, 3.0], "std": [2.0, 4.0, 8.0]},
        {"type": "probability"},
    ).input
    rgb = np.array([[[10, 20, 30], [40, 50, 60]]], np.uint8)

    prepared = prepare_input(rgb, ChannelOrder.RGB, spec, (2, 1))

    # BGR channel order: channel 0 is blue (30, 60), normalized (v · 0.5 − mean) / std.
    expected = np.array(
        [
            [[(30 * 0.5 - 1) / 2, (60 * 0.5 - 1) / 2]],
            [[(20 * 0.5 - 2) / 4, (50 * 0.5 - 2) / 4]],
            [[(10 * 0.5 - 3) / 8, (40 * 0.5 - 3) / 8]],
        ],
        np.float32,
    )[np.newaxis]
    assert prepared.tensor.dtype == np.float32
    np.testing.assert_allclose(prepared.tensor, expected, rtol=1e-6)


def test_prepare_nhwc_gray_to_rgb() -> None:
    spec = card("segmentation", {"layout": "NHWC", "scale": 1.0}, {"type": "probability"}).input
    gray = np.array([[7, 9]], np.uint8)

    prepared = prepare_input(gray, ChannelOrder.RGB, spec, (2, 1))

    assert prepared.tensor.shape == (1, 1, 2, 3)
    np.testing.assert_allclose(prepared.tensor[0, 0], [[7, 7, 7], [9, 9, 9]])


def test_prepare_letterbox_pads_exactly() -> None:
    spec = card(
        "classification",
        {"resize": "letterbox", "pad_value": 127.5, "mean": [0.5] * 3, "std": [0.5] * 3},
        {"type": "logits"},
    ).input
    image = np.full((8, 16, 3), 255, np.uint8)

    prepared = prepare_input(image, ChannelOrder.RGB, spec, (8, 8))

    # 16x8 into 8x8: content 8x4 at the top; 127.5 maps to (127.5/255 − 0.5)/0.5 = 0.
    np.testing.assert_allclose(prepared.tensor[0, :, :4, :], 1.0, atol=1e-6)
    np.testing.assert_allclose(prepared.tensor[0, :, 4:, :], 0.0, atol=1e-6)


def test_prepare_16_bit() -> None:
    spec = card(
        "depth", {"channel_order": "GRAY", "bit_depth": 16, "scale": 1 / 65535}, {"type": "metric_depth"}
    ).input
    image = np.array([[0, 65535], [32768, 1000]], np.uint16)

    prepared = prepare_input(image, ChannelOrder.RGB, spec, (2, 2))

    np.testing.assert_allclose(prepared.tensor[0, 0], image / 65535, rtol=1e-6)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((0, 5), np.uint8), r"empty image \(shape \(0, 5\)\)"),
        (np.zeros((4, 4, 4), np.uint8), r"unsupported image shape \(4, 4, 4\)"),
        (np.zeros((4, 4), np.float32), "unsupported image dtype float32: expected uint8 or uint16"),
        (np.zeros((4, 4), np.uint16), "16-bit image but the model card's input.bit_depth is 8"),
    ],
)
def test_prepare_rejects_bad_images(image: np.ndarray, message: str) -> None:
    spec = card("segmentation", {}, {"type": "probability"}).input
    with pytest.raises(ImageError, match=message):
        prepare_input(image, ChannelOrder.RGB, spec, (4, 4))


# ---------------------------------------------------------------- postprocessing


def test_segmentation_logits_letterbox(tmp_path: Path) -> None:
    model = identity_model(tmp_path / "logits.onnx", [1, 3, 32, 32])
    engine = InferenceEngine(
        model,
        card("segmentation", {"resize": "letterbox", "scale": 1.0}, {"type": "logits"}),
        intra_op_threads=1,
    )
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(32, 64, 3), dtype=np.uint8)

    result = engine.infer(image, ChannelOrder.RGB)

    # The logits are the image's channels: argmax over RGB of the 32x16 content, then
    # nearest-neighbour back to 64x32.
    content = cv2.resize(image, (32, 16), interpolation=cv2.INTER_LINEAR)
    argmax = np.argmax(content, axis=2).astype(np.uint8)
    expected = cv2.resize(argmax, (64, 32), interpolation=cv2.INTER_NEAREST)
    assert isinstance(result, SegmentationResult)
    assert result.labels.dtype == np.uint8
    assert result.class_count == 3
    np.testing.assert_array_equal(result.labels, expected)
    assert result.timing.total_ms > 0


def test_segmentation_above_256_classes(tmp_path: Path) -> None:
    # Transpose (1, 1, 2, 300) → (1, 300, 2, 1): the 300 columns of each row become the
    # class logits of a 2x1 label map.
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["y"], perm=[0, 3, 2, 1])],
        "classes_from_columns",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 2, 300])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 300, 2, 1])],
    )
    path = tmp_path / "many.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    engine = InferenceEngine(path, card("segmentation", {"channel_order": "GRAY"}, {"type": "logits"}))
    image = np.zeros((2, 300), np.uint8)
    image[0, 290] = 255
    image[1, 5] = 255

    result = engine.infer(image)

    assert result.labels.dtype == np.uint16
    assert result.class_count == 300
    assert result.labels.shape == (2, 300)
    np.testing.assert_array_equal(result.labels[0], 290)
    np.testing.assert_array_equal(result.labels[1], 5)


def test_inverse_depth_and_camera(tmp_path: Path) -> None:
    model = identity_model(tmp_path / "inverse.onnx", [1, 1, 8, 8])
    engine = InferenceEngine(
        model,
        card("depth", {"channel_order": "GRAY"}, {"type": "inverse_depth", "scale": 2.0}),
    )
    image = np.full((16, 16), 51, np.uint8)
    image[:2, :2] = 0
    camera = PinholeCamera(16, 16, 20.0, 20.0, 7.5, 7.5)

    result = engine.infer(image, camera=camera)

    # Input value 51/255 = 0.2 is inverse depth, so depth = 2 / 0.2 = 10 m; zero is no depth.
    assert isinstance(result, DepthResult)
    assert result.depth_m.dtype == np.float32
    assert result.depth_m.shape == (8, 8)
    assert np.isnan(result.depth_m[0, 0])
    np.testing.assert_allclose(result.depth_m[4:, 4:], 10.0, rtol=1e-5)
    assert result.camera == PinholeCamera(8, 8, 10.0, 10.0, 3.5, 3.5)

    with pytest.raises(ValueError, match="image size 16x16 does not match the camera size 32x32"):
        engine.infer(image, camera=PinholeCamera(32, 32, 20.0, 20.0, 15.5, 15.5))


def test_metric_depth_crops_padding(tmp_path: Path) -> None:
    model = identity_model(tmp_path / "metric.onnx", [1, 1, 8, 8])
    engine = InferenceEngine(
        model,
        card(
            "depth",
            {"channel_order": "GRAY", "scale": 1.0, "resize": "letterbox", "pad_value": 99},
            {"type": "metric_depth", "scale": 0.5},
        ),
    )
    image = np.full((4, 8), 6, np.uint8)

    result = engine.infer(image, camera=PinholeCamera(8, 4, 5.0, 5.0, 3.5, 1.5))

    # 8x4 fills the top 8x4 of the 8x8 tensor; the padded rows are cropped.
    assert result.depth_m.shape == (4, 8)
    np.testing.assert_allclose(result.depth_m, 3.0)
    assert (result.camera.width, result.camera.height) == (8, 4)


def test_classification_softmax_top_k(tmp_path: Path) -> None:
    model = identity_model(tmp_path / "classes.onnx", [1, 1, 1, 4], [1, 4])
    engine = InferenceEngine(
        model,
        card(
            "classification",
            {"channel_order": "GRAY", "scale": 1.0, "width": 4, "height": 1},
            {"type": "logits", "class_names": ["a", "b", "c", "d"], "top_k": 2},
        ),
    )
    image = np.array([[1, 3, 2, 0]], np.uint8)

    result = engine.infer(image)

    logits = np.array([1.0, 3.0, 2.0, 0.0])
    probabilities = np.exp(logits) / np.exp(logits).sum()
    assert isinstance(result, ClassificationResult)
    assert [c.label for c in result.top_k] == ["b", "c"]
    np.testing.assert_allclose([c.score for c in result.top_k], probabilities[[1, 2]], rtol=1e-6)


def test_detection_boxes_to_image_pixels(tmp_path: Path) -> None:
    rows = np.array([[[2, 4, 30, 60, 0.4, 0], [1, 1, 40, 70, 0.8, 2], [0, 0, 4, 4, 0.1, 1]]], np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["mean"], keepdims=0),
            helper.make_node("Mul", ["mean", "zero"], ["nothing"]),
            helper.make_node("Add", ["rows", "nothing"], ["y"]),
        ],
        "boxes",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 6])],
        [numpy_helper.from_array(rows, "rows"), numpy_helper.from_array(np.float32(0), "zero")],
    )
    path = tmp_path / "boxes.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    engine = InferenceEngine(
        path,
        card(
            "detection",
            {},
            {"type": "boxes_xyxy_score_class", "threshold": 0.3, "class_names": ["a", "b"]},
        ),
    )

    result = engine.infer(np.zeros((32, 64, 3), np.uint8))

    # Stretch 64x32 → 32x64: x scales by 2, y by 1/2; boxes clip to the 64x32 image.
    assert isinstance(result, DetectionResult)
    assert [d.label for d in result.detections] == ["class_2", "a"]
    np.testing.assert_allclose([d.score for d in result.detections], [0.8, 0.4], rtol=1e-6)
    first, second = result.detections
    np.testing.assert_allclose([first.x_min, first.y_min, first.x_max, first.y_max], [2, 0.5, 63, 31])
    np.testing.assert_allclose([second.x_min, second.y_min, second.x_max, second.y_max], [4, 2, 60, 30])


@needs_ppocr
def test_text_detector_matches_onnxruntime() -> None:
    skimage_data = pytest.importorskip("skimage.data")
    engine = InferenceEngine.load(DET_MODEL, DET_CARD, intra_op_threads=1)
    coffee_rgb = skimage_data.coffee()

    result = engine.infer(coffee_rgb, ChannelOrder.RGB)

    # PaddleOCR's recipe: BGR, each side rounded to a multiple of 32 with Python's round
    # (half to even: 600x400 → 608x384), (x/255 − 0.5)/0.5, threshold 0.3.
    bgr = cv2.resize(np.ascontiguousarray(coffee_rgb[:, :, ::-1]), (608, 384)).astype(np.float32)
    tensor = ((bgr / 255 - 0.5) / 0.5).transpose(2, 0, 1)[np.newaxis].astype(np.float32)
    session = ort.InferenceSession(str(resolve_path(DET_MODEL)), providers=["CPUExecutionProvider"])
    probability = session.run(None, {"x": tensor})[0][0, 0]
    expected = cv2.resize((probability > 0.3).astype(np.uint8), (600, 400), interpolation=cv2.INTER_NEAREST)
    assert result.labels.shape == (400, 600)
    assert expected.sum() > 1000
    assert np.mean(result.labels != expected) < 1e-3


@needs_ppocr
def test_serves_int8_qdq_model(tmp_path: Path) -> None:
    quantization = pytest.importorskip("onnxruntime.quantization")
    skimage_data = pytest.importorskip("skimage.data")
    from onnx import version_converter

    fp32 = InferenceEngine.load(CLS_MODEL, CLS_CARD, intra_op_threads=1)
    page = skimage_data.page()
    lines = [np.ascontiguousarray(page[top : top + 40, 10:150]) for top in (5, 45, 85, 125)]
    lines += [np.ascontiguousarray(line[::-1, ::-1]) for line in lines]

    # Per-channel DequantizeLinear needs opset 13; the shipped classifier is opset 11.
    upgraded = tmp_path / "cls_opset13.onnx"
    onnx.save(version_converter.convert_version(onnx.load(resolve_path(CLS_MODEL)), 13), upgraded)

    class Lines(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{"x": _cls_tensor(fp32, line)} for line in lines])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    int8 = tmp_path / "cls_int8.onnx"
    quantization.quantize_static(
        str(upgraded),
        str(int8),
        Lines(),
        quant_format=quantization.QuantFormat.QDQ,
        per_channel=True,
        activation_type=quantization.QuantType.QUInt8,
        weight_type=quantization.QuantType.QInt8,
    )
    (tmp_path / "cls_int8.yaml").write_text(resolve_path(CLS_CARD).read_text())
    quantized = InferenceEngine.load(int8, intra_op_threads=1)

    agree = [fp32.infer(line).top_k[0].label == quantized.infer(line).top_k[0].label for line in lines]
    assert sum(agree) >= len(lines) - 1
    assert any(node.op_type == "DequantizeLinear" for node in onnx.load(int8).graph.node)


def _cls_tensor(engine: InferenceEngine, line: np.ndarray) -> np.ndarray:
    return prepare_input(line, ChannelOrder.RGB, engine.card.input, engine.fixed_size).tensor


# ---------------------------------------------------------------- loading and hot reload


def test_engine_load_errors(tmp_path: Path) -> None:
    model = identity_model(tmp_path / "net.onnx", [1, 3, 8, 8])
    good = card("segmentation", {}, {"type": "logits"})

    with pytest.raises(ValueError, match="invalid intra_op_threads -1"):
        InferenceEngine(model, good, intra_op_threads=-1)
    with pytest.raises(FileNotFoundError, match=r"model file .*absent.onnx not found"):
        InferenceEngine(tmp_path / "absent.onnx", good)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match=r"ONNX Runtime cannot load .*corrupt.onnx"):
        InferenceEngine(corrupt, good)
    with pytest.raises(ModelCardError, match=r"input.name 'image' is not among the model's inputs: 'x'"):
        InferenceEngine(model, model_card_from_dict({**_card_dict(good), "input": {"name": "image"}}))
    with pytest.raises(FileNotFoundError, match="no model card found"):
        InferenceEngine.load(model)


def _card_dict(model_card: Any) -> dict[str, Any]:
    from quantized_inference_node.model_card import model_card_to_dict

    return model_card_to_dict(model_card)


def test_holder_keeps_old_engine_on_failure(tmp_path: Path) -> None:
    first = identity_model(tmp_path / "first.onnx", [1, 3, 8, 8])
    (tmp_path / "first.yaml").write_text(
        yaml.safe_dump({"name": "first", "task": "segmentation", "input": {"name": "x"},
                        "output": {"name": "y", "type": "logits"}})
    )
    second = identity_model(tmp_path / "second.onnx", [1, 1, 8, 8])
    (tmp_path / "second.yaml").write_text(
        yaml.safe_dump({"name": "second", "task": "depth", "input": {"name": "x", "channel_order": "GRAY"},
                        "output": {"name": "y", "type": "metric_depth"}})
    )
    holder = EngineHolder()

    assert holder.current is None
    assert holder.load(first).ok
    assert holder.current.card.name == "first"

    missing = holder.load(tmp_path / "absent.onnx", tmp_path / "first.yaml")
    assert not missing.ok
    assert "not found" in missing.message
    assert "still serving" in missing.message
    assert holder.current.card.name == "first"

    mismatched = holder.load(second, tmp_path / "first.yaml")
    assert not mismatched.ok
    assert "input.channel_order RGB gives 3 channel(s)" in mismatched.message
    assert holder.current.card.name == "first"
    assert holder.last_error == mismatched.message

    switched = holder.load(second)
    assert switched.ok
    assert holder.current.card.name == "second"
    assert holder.last_error == ""


def test_holder_without_model_reports() -> None:
    holder = EngineHolder()

    outcome = holder.load("/nonexistent/model.onnx", "/nonexistent/model.yaml")

    assert not outcome.ok
    assert "no model in service" in outcome.message


# ---------------------------------------------------------------- overlay, slot, statistics


def test_overlay_blends_classes_only() -> None:
    image = np.full((2, 2, 3), 100, np.uint8)
    labels = np.array([[0, 1], [2, 0]], np.uint8)

    overlay = make_overlay(image, labels, 3)

    np.testing.assert_array_equal(overlay[0, 0], [100, 100, 100])
    np.testing.assert_array_equal(overlay[1, 1], [100, 100, 100])
    assert not np.array_equal(overlay[0, 1], [100, 100, 100])
    with pytest.raises(ValueError, match=r"overlay image size \(2, 2\) differs from the label size \(1, 2\)"):
        make_overlay(image, labels[:1], 3)


def test_slot_keeps_newest_and_counts() -> None:
    slot: LatestSlot[int] = LatestSlot()

    assert slot.put(1) is False
    assert slot.put(2) is True
    assert slot.put(3) is True
    assert slot.take(timeout_s=0) == 3
    assert slot.take(timeout_s=0.01) is None

    counts = slot.counts
    assert (counts.received, counts.skipped, counts.taken) == (3, 2, 1)


def test_slot_close_wakes_consumer() -> None:
    slot: LatestSlot[int] = LatestSlot()
    taken: list[Any] = []
    consumer = threading.Thread(target=lambda: taken.append(slot.take()))
    consumer.start()

    slot.close()
    consumer.join(timeout=5.0)

    assert not consumer.is_alive()
    assert taken == [None]


def test_slot_under_concurrent_producer() -> None:
    slot: LatestSlot[int] = LatestSlot()
    taken: list[int] = []
    done = threading.Event()

    def consume() -> None:
        while not done.is_set() or slot.counts.received != slot.counts.taken + slot.counts.skipped:
            item = slot.take(timeout_s=0.01)
            if item is not None:
                taken.append(item)
                time.sleep(0.001)

    consumer = threading.Thread(target=consume)
    consumer.start()
    for index in range(2000):
        slot.put(index)
    done.set()
    consumer.join(timeout=10.0)

    counts = slot.counts
    assert counts.received == 2000
    assert counts.taken + counts.skipped == 2000
    assert taken == sorted(taken)
    assert taken[-1] == 1999


def test_latency_percentiles_and_rate() -> None:
    stats = LatencyStats(rate_window_s=5.0, started_s=100.0)
    for index in range(100):
        stats.add(float(index + 1), now_s=100.0 + index * 0.1)

    summary = stats.summary(now_s=110.0)

    # numpy's linear percentiles of 1..100; the last 5 s (105..110] hold 50 completions.
    assert summary.count == 100
    assert summary.p50_ms == pytest.approx(50.5)
    assert summary.p90_ms == pytest.approx(90.1)
    assert summary.p99_ms == pytest.approx(99.01)
    assert summary.rate_hz == pytest.approx(50 / 5.0)


def test_latency_empty_and_window() -> None:
    stats = LatencyStats(window=3, started_s=0.0)

    assert stats.summary(now_s=1.0).count == 0
    for value in (100.0, 1.0, 2.0, 3.0):
        stats.add(value, now_s=0.5)
    assert stats.summary(now_s=1.0).p99_ms < 3.1
    # One second of history: 4 completions in 1 s.
    assert stats.summary(now_s=1.0).rate_hz == pytest.approx(4.0)
