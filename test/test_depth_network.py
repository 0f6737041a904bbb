"""The 7-Scenes demonstration depth network: helpers, the committed models and their cards."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_depth_network import (
    FP32_MODEL,
    HAWQ_MODEL,
    VALIDATION_FRAMES,
    depth_metrics,
    downsample_depth_nearest,
    load_depth_samples,
    measure_latency,
    predict_depth,
)

# A few validation frames spread over the 60; the bounds below were measured on them.
TEST_FRAMES = VALIDATION_FRAMES[::12]
# Measured abs-rel of the committed FP32 model on TEST_FRAMES: 0.0763. The bound allows for
# onnxruntime differences but fails a clearly worse model.
FP32_ABS_REL_BOUND = 0.10
# Measured HAWQ abs-rel minus FP32 abs-rel on TEST_FRAMES: -0.00001 (0.07632 against 0.07634).
HAWQ_ABS_REL_MARGIN = 0.01


# --- helpers, against hand-computed values ---------------------------------------------------


def test_depth_metrics_hand_computed() -> None:
    gt = np.array([[1.0, 2.0], [4.0, np.nan]])
    pred = np.array([[1.1, 2.0], [2.0, 7.0]])

    metrics = depth_metrics(pred, gt)

    # Valid pixels 1, 2, 4 m: relative errors 0.1, 0, 0.5; ratios 1.1, 1, 2.
    np.testing.assert_allclose(metrics.abs_rel, (0.1 + 0.0 + 0.5) / 3, rtol=1e-12)
    np.testing.assert_allclose(metrics.delta_1_25, 2 / 3, rtol=1e-12)
    np.testing.assert_allclose(metrics.rmse_m, np.sqrt((0.01 + 0.0 + 4.0) / 3), rtol=1e-12)
    assert metrics.valid_pixels == 3


def test_depth_metrics_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match=r"invalid prediction shape \(2, 2\)"):
        depth_metrics(np.ones((2, 2)), np.ones((2, 3)))


def test_depth_metrics_rejects_all_invalid() -> None:
    with pytest.raises(ValueError, match="no valid ground-truth pixel"):
        depth_metrics(np.ones((2, 2)), np.array([[np.nan, 0.0], [-1.0, np.nan]]))


def test_downsample_nearest_keeps_nan() -> None:
    # 4x4 image, halved: nearest takes the top-left pixel of each 2x2 block.
    depth = np.arange(16, dtype=np.float32).reshape(4, 4)
    depth[2, 2] = np.nan

    small = downsample_depth_nearest(depth, (2, 2))

    np.testing.assert_array_equal(small, np.array([[0.0, 2.0], [8.0, np.nan]], np.float32))


def test_downsample_nearest_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"invalid depth shape \(2, 2, 1\)"):
        downsample_depth_nearest(np.ones((2, 2, 1), np.float32), (1, 1))
    with pytest.raises(ValueError, match=r"invalid output_size \(0, 2\)"):
        downsample_depth_nearest(np.ones((2, 2), np.float32), (0, 2))


def test_load_depth_samples_rejects_no_frames(tmp_path: Path) -> None:
    from benchmarks.train_depth_network import INPUT_SIZE, depth_card

    with pytest.raises(ValueError, match="frame_indices is empty"):
        load_depth_samples(tmp_path, [], depth_card().input, INPUT_SIZE)


def test_masked_log_l1_ignores_invalid_pixels() -> None:
    import torch

    from benchmarks.train_depth_network import masked_log_l1

    depth = torch.tensor([[[[1.0, np.e], [np.nan, 0.0]]]])
    log_pred = torch.tensor([[[[0.5, 1.0], [9.0, 9.0]]]])

    # Valid pixels: log 1 = 0 and log e = 1; errors 0.5 and 0.
    np.testing.assert_allclose(float(masked_log_l1(log_pred, depth)), 0.25, rtol=1e-6)


def test_train_depth_network_rejects_zero_epochs() -> None:
    from benchmarks.bench_depth_network import DepthSamples
    from benchmarks.train_depth_network import train_depth_network

    samples = DepthSamples(np.zeros((1, 3, 128, 160), np.float32), np.ones((1, 1, 64, 80), np.float32), (0,))
    with pytest.raises(ValueError, match="invalid epochs 0"):
        train_depth_network(samples, epochs=0)


def test_network_outputs_positive_half_resolution() -> None:
    import torch

    from benchmarks.train_depth_network import DepthUNet

    torch.manual_seed(0)
    model = DepthUNet().eval()
    with torch.no_grad():
        depth = model(torch.randn(2, 3, 128, 160))

    assert depth.shape == (2, 1, 64, 80)
    assert bool((depth > 0).all())


def test_measure_latency_rejects_zero_runs() -> None:
    with pytest.raises(ValueError, match="invalid runs 0"):
        measure_latency({}, np.zeros((1, 3, 128, 160), np.float32), "image", runs=0)
    with pytest.raises(ValueError, match="no sessions to time"):
        measure_latency({}, np.zeros((1, 3, 128, 160), np.float32), "image", runs=1)


# --- the committed models --------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp32_model() -> Path:
    if not FP32_MODEL.is_file():
        pytest.skip(f"{FP32_MODEL} not found: run python -m benchmarks.train_depth_network")
    return FP32_MODEL


@pytest.fixture(scope="module")
def hawq_model(fp32_model: Path) -> Path:
    if not HAWQ_MODEL.is_file():
        pytest.skip(f"{HAWQ_MODEL} not found: run python -m benchmarks.train_depth_network")
    return HAWQ_MODEL


@pytest.fixture(scope="module")
def validation_samples(seven_scenes_dir: Path, fp32_model: Path):
    from quantized_inference_node.model_card import find_card_beside, load_model_card

    card = load_model_card(find_card_beside(fp32_model))
    return load_depth_samples(
        seven_scenes_dir, TEST_FRAMES, card.input, (card.input.width, card.input.height)
    )


def test_committed_cards_match_models(fp32_model: Path) -> None:
    from quantized_inference_node.inference import InferenceEngine
    from quantized_inference_node.model_card import OutputType, Task

    for path in [fp32_model] + ([HAWQ_MODEL] if HAWQ_MODEL.is_file() else []):
        # load() reads the card beside the model and checks it against the session's inputs and outputs.
        engine = InferenceEngine.load(path)

        assert engine.card.task is Task.DEPTH
        assert engine.card.output.type is OutputType.METRIC_DEPTH
        assert engine.fixed_size == (160, 128)


def test_engine_matches_training_preprocessing(seven_scenes_dir: Path, fp32_model: Path) -> None:
    from quantized_inference_node.inference import InferenceEngine
    from surfel_mapping_node.datasets.seven_scenes import SevenScenesDataset

    engine = InferenceEngine.load(fp32_model, intra_op_threads=1)
    frame = SevenScenesDataset(seven_scenes_dir)[TEST_FRAMES[0]]
    samples = load_depth_samples(seven_scenes_dir, TEST_FRAMES[:1], engine.card.input, engine.fixed_size)

    result = engine.infer(frame.image)
    direct = predict_depth(fp32_model, samples.images, engine.card.input.name)

    np.testing.assert_allclose(result.depth_m, direct[0, 0], rtol=1e-5, atol=1e-6)


def test_fp32_abs_rel_on_validation_frames(fp32_model: Path, validation_samples) -> None:
    pred_m = predict_depth(fp32_model, validation_samples.images, "image")

    metrics = depth_metrics(pred_m, validation_samples.depth_m)

    assert metrics.abs_rel < FP32_ABS_REL_BOUND


def test_hawq_weights_within_one_sixth(fp32_model: Path, hawq_model: Path) -> None:
    import onnx

    # FP32: every Conv weight, 4 bytes per value. HAWQ: the integer weights as stored
    # (int4 packed two per byte, int8 one per byte).
    fp32 = onnx.load(str(fp32_model))
    conv_weights = {node.input[1] for node in fp32.graph.node if node.op_type == "Conv"}
    fp32_bytes = sum(
        4 * int(np.prod(init.dims)) for init in fp32.graph.initializer if init.name in conv_weights
    )
    hawq = onnx.load(str(hawq_model))
    integer_types = (onnx.TensorProto.INT8, onnx.TensorProto.INT4)
    stored = {
        init.name: (int(np.prod(init.dims)) * (4 if init.data_type == onnx.TensorProto.INT4 else 8) + 7) // 8
        for init in hawq.graph.initializer
        if init.data_type in integer_types and not init.name.endswith("zero_point")
    }

    assert len(stored) == len(conv_weights)
    assert sum(stored.values()) <= fp32_bytes / 6


def test_hawq_abs_rel_close_to_fp32(fp32_model: Path, hawq_model: Path, validation_samples) -> None:
    fp32 = depth_metrics(
        predict_depth(fp32_model, validation_samples.images, "image"), validation_samples.depth_m
    )
    hawq = depth_metrics(
        predict_depth(hawq_model, validation_samples.images, "image"), validation_samples.depth_m
    )

    assert hawq.abs_rel <= fp32.abs_rel + HAWQ_ABS_REL_MARGIN
