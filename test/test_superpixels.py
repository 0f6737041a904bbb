"""Tests of the SLIC superpixels on intensity and inverse depth."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numba
import numpy as np
import pytest

from surfel_mapping_node.config import ConfigError, SuperpixelConfig
from surfel_mapping_node.superpixels import (
    Superpixels,
    compute_superpixels,
    superpixels_from_labels,
)


def two_planes(height: int, width: int, edge_u: int) -> tuple[np.ndarray, np.ndarray]:
    """Return a uniform gray image and depth 1 m left of column edge_u, 3 m from it on."""
    intensity = np.full((height, width), 128, np.uint8)
    depth_m = np.full((height, width), 1.0, np.float32)
    depth_m[:, edge_u:] = 3.0
    return intensity, depth_m


def assert_consistent(sp: Superpixels, intensity: np.ndarray, depth_m: np.ndarray) -> None:
    """Check every field against an independent computation from the labels."""
    height, width = intensity.shape
    count = sp.count
    assert sp.labels.shape == (height, width)
    assert sp.labels.dtype == np.int32
    assert sp.labels.max() < count
    inside = sp.labels >= 0
    expected_count = np.bincount(sp.labels[inside], minlength=count)
    np.testing.assert_array_equal(sp.pixel_count, expected_count)
    np.testing.assert_array_equal(np.diff(sp.pixel_offsets), expected_count)
    has_depth = np.isfinite(depth_m) & (depth_m > 0)
    np.testing.assert_array_equal(
        sp.depth_count, np.bincount(sp.labels[inside & has_depth], minlength=count)
    )
    v, u = np.mgrid[0:height, 0:width]
    for s in range(count):
        mask = sp.labels == s
        np.testing.assert_array_equal(
            sp.pixel_indices[sp.pixel_offsets[s] : sp.pixel_offsets[s + 1]], np.flatnonzero(mask)
        )
        if not mask.any():
            assert np.isnan(sp.center_u[s])
            assert np.isnan(sp.intensity[s])
            assert np.isnan(sp.depth_m[s])
            continue
        # float32 outputs: 1e-5 relative.
        np.testing.assert_allclose(sp.center_u[s], u[mask].mean(), rtol=1e-5)
        np.testing.assert_allclose(sp.center_v[s], v[mask].mean(), rtol=1e-5)
        np.testing.assert_allclose(sp.intensity[s], intensity[mask].astype(np.float64).mean(), rtol=1e-5)
        assert np.isnan(sp.depth_m[s]) == (not has_depth[mask].any())


def test_labels_stop_at_depth_edge() -> None:
    # The edge at column 52 cuts a grid cell, and 8 divides neither image side.
    intensity, depth_m = two_planes(77, 101, edge_u=52)

    sp = compute_superpixels(intensity, depth_m, SuperpixelConfig())

    assert (sp.labels >= 0).all()
    for s in range(sp.count):
        depths = depth_m[sp.labels == s]
        assert depths.size == 0 or np.unique(depths).size == 1, f"superpixel {s} crosses the edge"
    # Each superpixel lies on one plane, so its robust depth is that plane's (1e-6 m).
    nonempty = sp.pixel_count > 0
    on_near = np.isclose(sp.depth_m, 1.0, atol=1e-6)
    on_far = np.isclose(sp.depth_m, 3.0, atol=1e-6)
    assert (on_near | on_far)[nonempty].all()
    assert_consistent(sp, intensity, depth_m)


@pytest.mark.parametrize(
    ("height", "width", "expected_count"),
    [(77, 101, 9 * 12), (376, 1241, 47 * 155), (48, 64, 6 * 8), (3, 5, 1)],
)
def test_grid_sizes_the_spacing_does_not_divide(height: int, width: int, expected_count: int) -> None:
    rng = np.random.default_rng(7)
    intensity = rng.integers(0, 256, (height, width), dtype=np.uint8)
    depth_m = rng.uniform(0.5, 4.0, (height, width)).astype(np.float32)
    depth_m[rng.random((height, width)) < 0.2] = np.nan

    sp = compute_superpixels(intensity, depth_m, SuperpixelConfig())

    assert sp.count == expected_count
    assert (sp.labels >= 0).all()
    if height * width < 100_000:
        assert_consistent(sp, intensity, depth_m)
    else:
        assert sp.pixel_count.sum() == height * width


def test_all_nan_depth_gives_no_depth() -> None:
    rng = np.random.default_rng(3)
    intensity = rng.integers(0, 256, (40, 56), dtype=np.uint8)
    depth_m = np.full((40, 56), np.nan, np.float32)

    sp = compute_superpixels(intensity, depth_m, SuperpixelConfig())

    assert (sp.labels >= 0).all()
    assert np.isnan(sp.depth_m).all()
    assert (sp.depth_count == 0).all()
    assert_consistent(sp, intensity, depth_m)


def test_invalid_depth_values_count_as_none() -> None:
    intensity = np.full((16, 16), 50, np.uint8)
    depth_m = np.full((16, 16), 2.0, np.float32)
    depth_m[0, :] = 0.0
    depth_m[1, :] = -1.0
    depth_m[2, :] = np.inf

    sp = superpixels_from_labels(np.zeros((16, 16), np.int32), intensity, depth_m)

    assert sp.depth_count[0] == 16 * 13
    np.testing.assert_allclose(sp.depth_m[0], 2.0, atol=1e-6)


def test_seeds_that_lose_all_their_pixels() -> None:
    # Without spatial and depth terms on a uniform image every candidate ties and the
    # first (upper-left) one wins, so the seeds of the last grid row and column get
    # no pixels at all.
    intensity = np.full((40, 48), 90, np.uint8)
    depth_m = np.full((40, 48), 1.5, np.float32)
    config = SuperpixelConfig(spatial_weight=0.0, inverse_depth_weight=0.0, iterations=4)

    sp = compute_superpixels(intensity, depth_m, config)

    empty = sp.pixel_count == 0
    assert empty.any()
    assert (sp.labels >= 0).all()
    assert np.isnan(sp.center_u[empty]).all()
    assert np.isnan(sp.depth_m[empty]).all()
    assert_consistent(sp, intensity, depth_m)


def test_non_finite_intensity_gets_no_label() -> None:
    rng = np.random.default_rng(11)
    intensity = rng.uniform(0, 255, (32, 40)).astype(np.float32)
    intensity[5:9, 10:30] = np.nan
    depth_m = np.full((32, 40), 2.0, np.float32)

    sp = compute_superpixels(intensity, depth_m, SuperpixelConfig())

    np.testing.assert_array_equal(sp.labels == -1, np.isnan(intensity))
    assert_consistent(sp, np.nan_to_num(intensity), depth_m)


def test_depth_is_a_huber_estimate() -> None:
    # 90 pixels at 2.00 m and 10 outliers at 5.00 m have a mean of 2.30 m. A Huber
    # estimate with a 5 cm threshold converges to 2.00 + 10·0.05/90 = 2.0056 m,
    # because each outlier pulls with weight·residual = delta.
    depth_m = np.full((10, 10), 2.0, np.float32)
    depth_m[0, :] = 5.0
    intensity = np.zeros((10, 10), np.uint8)

    sp = superpixels_from_labels(
        np.zeros((10, 10), np.int32), intensity, depth_m, huber_delta_m=0.05, huber_iterations=10
    )

    np.testing.assert_allclose(sp.depth_m[0], 2.0 + 10 * 0.05 / 90, atol=1e-4)


def test_two_runs_and_thread_counts_give_identical_results() -> None:
    rng = np.random.default_rng(5)
    intensity = rng.integers(0, 256, (120, 160), dtype=np.uint8)
    depth_m = rng.uniform(0.5, 4.0, (120, 160)).astype(np.float32)
    depth_m[rng.random((120, 160)) < 0.3] = np.nan
    config = SuperpixelConfig()

    first = compute_superpixels(intensity, depth_m, config)
    second = compute_superpixels(intensity, depth_m, config)
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        single = compute_superpixels(intensity, depth_m, config)
    finally:
        numba.set_num_threads(threads)

    for other in (second, single):
        for name in Superpixels.__dataclass_fields__:
            np.testing.assert_array_equal(getattr(first, name), getattr(other, name), err_msg=name)


def test_more_iterations_move_labels_towards_the_edge() -> None:
    # An intensity edge only (no depth): after the iterations, labels follow the edge
    # for all but a few pixels.
    intensity = np.full((64, 64), 40, np.uint8)
    intensity[:, 29:] = 220
    depth_m = np.full((64, 64), np.nan, np.float32)

    sp = compute_superpixels(intensity, depth_m, SuperpixelConfig(iterations=5))

    mixed = 0
    for s in range(sp.count):
        values = intensity[sp.labels == s]
        if values.size:
            mixed += min((values == 40).sum(), (values == 220).sum())
    assert mixed == 0


@pytest.mark.parametrize(
    ("intensity", "depth", "match"),
    [
        (np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.float32), "expected \\(H, W\\)"),
        (np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.float32), "does not match"),
        (np.zeros((4, 4), np.int16), np.zeros((4, 4), np.float32), "invalid intensity dtype"),
        (np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint16), "decode raw depth"),
    ],
)
def test_bad_images_raise(intensity: np.ndarray, depth: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compute_superpixels(intensity, depth, SuperpixelConfig())


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"grid_px": 1}, "grid_px=1"),
        ({"iterations": 0}, "iterations=0"),
        ({"huber_iterations": -1}, "huber_iterations=-1"),
        ({"spatial_weight": -1.0}, "spatial_weight=-1.0"),
        ({"inverse_depth_weight": float("nan")}, "inverse_depth_weight=nan"),
        ({"huber_delta_m": 0.0}, "huber_delta_m=0.0"),
    ],
)
def test_bad_config_raises(changes: dict, match: str) -> None:
    config = replace(SuperpixelConfig(), **changes)
    with pytest.raises(ConfigError, match=match):
        compute_superpixels(np.zeros((8, 8), np.uint8), np.zeros((8, 8), np.float32), config)


def test_bad_labels_raise() -> None:
    image = np.zeros((4, 4), np.uint8)
    depth = np.ones((4, 4), np.float32)
    with pytest.raises(ValueError, match="invalid label -2"):
        superpixels_from_labels(np.full((4, 4), -2), image, depth)
    with pytest.raises(ValueError, match="expected integers of the image shape"):
        superpixels_from_labels(np.zeros((4, 5), np.int32), image, depth)
    with pytest.raises(ValueError, match="huber_delta_m=0"):
        superpixels_from_labels(np.zeros((4, 4), np.int32), image, depth, huber_delta_m=0)


def test_real_kinect_frame(seven_scenes_dir: Path) -> None:
    import cv2

    gray = cv2.imread(str(seven_scenes_dir / "frame-000000.color.jpg"), cv2.IMREAD_GRAYSCALE)
    raw = cv2.imread(str(seven_scenes_dir / "frame-000000.depth.png"), cv2.IMREAD_UNCHANGED)
    depth_m = np.where((raw == 0) | (raw == 65535), np.nan, raw / 1000.0).astype(np.float32)

    sp = compute_superpixels(gray, depth_m, SuperpixelConfig())

    assert sp.count == 80 * 60
    assert (sp.labels >= 0).all()
    # Superpixels are compact: none spreads beyond its 3×3 cell neighbourhood.
    assert sp.pixel_count.max() <= 24 * 24
    # The robust depth is that of the superpixel's own pixels: its median absolute
    # deviation from their median is a few millimetres on Kinect depth.
    errors = []
    for s in range(0, sp.count, 7):
        depths = depth_m[sp.labels == s]
        depths = depths[np.isfinite(depths)]
        if depths.size >= 16:
            errors.append(abs(sp.depth_m[s] - np.median(depths)))
    assert np.median(errors) < 0.005
