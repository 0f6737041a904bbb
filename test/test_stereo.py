"""Tests of stereo depth on real rectified pairs (Middlebury, KITTI) and of input checks."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from surfel_mapping_node.config import StereoConfig
from surfel_mapping_node.stereo import StereoDepthEstimator, stereo_depth


@pytest.fixture(scope="module")
def motorcycle() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = pytest.importorskip("skimage.data")
    return data.stereo_motorcycle()


def test_middlebury_disparity_matches_ground_truth(motorcycle) -> None:
    left, right, disparity_gt = motorcycle
    # Ground-truth disparities reach 60 px, so 64 candidates cover them.
    estimator = StereoDepthEstimator(StereoConfig(num_disparities=64), fx=1.0, baseline_m=1.0)

    disparity_px = estimator.disparity(left, right)

    both = np.isfinite(disparity_px) & np.isfinite(disparity_gt)
    error_px = np.abs(disparity_px[both] - disparity_gt[both])
    # Measured with the default sgbm_3way settings: 81 % of pixels compared, median
    # error 0.18 px, 5.2 % of them off by more than 3 px.
    assert both.mean() > 0.7
    assert np.median(error_px) < 0.3
    assert (error_px > 3.0).mean() < 0.08


def test_depth_follows_disparity(motorcycle) -> None:
    left, right, _ = motorcycle
    estimator = StereoDepthEstimator(StereoConfig(num_disparities=64), fx=700.0, baseline_m=0.2)

    result = estimator.compute(left, right)

    valid = np.isfinite(result.disparity_px) & (result.disparity_px > 0)
    np.testing.assert_array_equal(np.isfinite(result.depth_m), valid)
    np.testing.assert_allclose(result.depth_m[valid], 140.0 / result.disparity_px[valid], rtol=1e-6)
    assert result.depth_m.dtype == np.float32


def test_rgb_and_gray_inputs_agree(motorcycle) -> None:
    left, right, _ = motorcycle
    estimator = StereoDepthEstimator(StereoConfig(num_disparities=64), fx=1.0, baseline_m=1.0)
    left_gray = cv2.cvtColor(left, cv2.COLOR_RGB2GRAY)
    right_gray = cv2.cvtColor(right, cv2.COLOR_RGB2GRAY)

    np.testing.assert_array_equal(
        estimator.disparity(left, right), estimator.disparity(left_gray, right_gray)
    )


def test_depth_range_limits(motorcycle) -> None:
    left, right, _ = motorcycle

    depth_m = stereo_depth(
        left, right, fx=1.0, baseline_m=1.0, config=StereoConfig(num_disparities=64),
        min_depth_m=0.02, max_depth_m=0.05,
    )

    finite = depth_m[np.isfinite(depth_m)]
    assert finite.size > 0
    assert finite.min() >= 0.02
    assert finite.max() <= 0.05


def test_kitti_pair_gives_plausible_depth(kitti_dir: Path) -> None:
    sequence = kitti_dir / "sequences" / "00"
    left = cv2.imread(str(sequence / "image_0" / "000000.png"), cv2.IMREAD_GRAYSCALE)
    right = cv2.imread(str(sequence / "image_1" / "000000.png"), cv2.IMREAD_GRAYSCALE)
    # KITTI calibration of this excerpt: fx = 718.856 px, P1[0,3] = -386.1448 px.
    estimator = StereoDepthEstimator(StereoConfig(), fx=718.856, baseline_m=386.1448 / 718.856)

    depth_m = estimator.compute(left, right).depth_m

    assert depth_m.shape == left.shape
    assert np.isfinite(depth_m).mean() > 0.5
    assert 5.0 < np.nanmedian(depth_m) < 40.0
    # The road right in front of the car (bottom rows, centre) is a few metres away.
    road = depth_m[-40:, 500:700]
    assert 3.0 < np.nanmedian(road) < 12.0


def test_size_mismatch_raises() -> None:
    estimator = StereoDepthEstimator(StereoConfig(num_disparities=16), fx=1.0, baseline_m=1.0)

    with pytest.raises(ValueError, match=r"stereo images differ in size: left 64x48, right 60x48"):
        estimator.disparity(np.zeros((48, 64), np.uint8), np.zeros((48, 60), np.uint8))


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((48, 64), np.uint16), r"unsupported left image dtype uint16: expected uint8"),
        (np.zeros((48, 64, 4), np.uint8), r"invalid left image shape \(48, 64, 4\)"),
        (np.zeros((48, 64), np.float32), r"unsupported left image dtype float32"),
    ],
)
def test_bad_image_raises(image: np.ndarray, message: str) -> None:
    estimator = StereoDepthEstimator(StereoConfig(num_disparities=16), fx=1.0, baseline_m=1.0)

    with pytest.raises(ValueError, match=message):
        estimator.disparity(image, np.zeros((48, 64), np.uint8))


def test_image_narrower_than_the_search_raises() -> None:
    estimator = StereoDepthEstimator(StereoConfig(num_disparities=128), fx=1.0, baseline_m=1.0)

    with pytest.raises(ValueError, match=r"image width 100 px is too small .* lower stereo.num_disparities"):
        estimator.disparity(np.zeros((20, 100), np.uint8), np.zeros((20, 100), np.uint8))


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (StereoConfig(num_disparities=100), r"invalid stereo.num_disparities=100"),
        (StereoConfig(block_size=4), r"invalid stereo.block_size=4"),
        (StereoConfig(mode="fast"), r"invalid stereo.mode='fast'"),
        (StereoConfig(p1_factor=32, p2_factor=8), r"invalid stereo penalties p1_factor=32"),
    ],
)
def test_invalid_config_raises(config: StereoConfig, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StereoDepthEstimator(config, fx=1.0, baseline_m=1.0)


def test_invalid_baseline_raises_before_matching() -> None:
    with pytest.raises(ValueError, match=r"invalid baseline_m=0.0"):
        StereoDepthEstimator(StereoConfig(), fx=718.0, baseline_m=0.0)
