"""A small version of the PP-OCR claim: HAWQ at 1/5 of the FP32 weight bytes keeps the
text masks of the detection model, where uniform 8-bit activations lose them.

Runs the real PP-OCRv4 detection model of rapidocr-onnxruntime on two bundled images
at a reduced resolution, with a minimal Hessian analysis.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from benchmarks.bench_hawq_ppocr import (
    HawqSettings,
    calibration_crops,
    compare_maps,
    detection_model_path,
    hawq_quantize,
    load_images,
    make_session,
    mean_iou,
    preprocess_detection,
    run_maps,
    text_mask_iou,
)

pytest.importorskip("rapidocr_onnxruntime")
pytest.importorskip("skimage")


def test_text_mask_iou_definition() -> None:
    reference = np.array([[0.9, 0.1], [0.5, 0.2]], np.float32)
    maps = np.array([[0.31, 0.35], [0.1, 0.0]], np.float32)
    # Text (> 0.3): reference {(0,0), (1,0)}, maps {(0,0), (0,1)}: 1 shared of 3.
    assert text_mask_iou(maps, reference) == pytest.approx(1 / 3)
    assert text_mask_iou(np.zeros((2, 2)), np.zeros((2, 2))) == 1.0


def test_preprocess_rounds_sides_to_multiples_of_32() -> None:
    image = np.full((191, 384, 3), 255, np.uint8)
    x = preprocess_detection(image, max_side=320)
    assert x.shape == (1, 3, 160, 320)
    np.testing.assert_allclose(x, 1.0, atol=1e-6)


def test_hawq_keeps_text_masks_at_one_fifth_size(tmp_path: Path) -> None:
    images = load_images(["page", "coffee", "clock"])
    inputs = {name: preprocess_detection(image, max_side=320) for name, image in images.items()}
    crops = calibration_crops(images, count=12, size=128, seed=0)
    settings = HawqSettings(
        hessian_crop=64, hessian_samples=2, hessian_batch=2, iterations=1, probes=2
    )
    references = run_maps(make_session(detection_model_path()), inputs)

    result = hawq_quantize(detection_model_path(), crops, settings, tmp_path)
    rows = compare_maps(run_maps(make_session(result.path), inputs), references)

    assert result.size_bytes <= 0.2 * result.fp32_bytes
    assert all(row.iou is not None for row in rows), "FP32 must find text on these images"
    assert mean_iou(rows) >= 0.9, rows
    # Uniform uint8 activations (nothing protected) miss the target on the crops.
    assert result.ladder[0][0] == 0
    assert result.ladder[0][1] < settings.target_iou
    assert len(result.protected) >= 1
