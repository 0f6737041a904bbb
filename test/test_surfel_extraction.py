"""Tests of surfel extraction: robust plane fits of superpixels, in the camera frame."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numba
import numpy as np
import pytest

from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.config import ConfigError, SuperpixelConfig, SurfelConfig
from surfel_mapping_node.superpixels import compute_superpixels, superpixels_from_labels
from surfel_mapping_node.surfel_extraction import FrameSurfels, extract_surfels

CAMERA = PinholeCamera(width=160, height=120, fx=150.0, fy=150.0, cx=79.5, cy=59.5)


def plane_depth(camera: PinholeCamera, normal: np.ndarray, point: np.ndarray) -> np.ndarray:
    """Depth (H, W) of the plane through POINT with unit NORMAL, by ray intersection."""
    v, u = np.mgrid[0 : camera.height, 0 : camera.width].astype(np.float64)
    rays = np.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, np.ones_like(u)], -1)
    t = (normal @ point) / (rays @ normal)
    return np.where(t > 0, t, np.nan).astype(np.float32)


def unit(vector: list[float]) -> np.ndarray:
    vector = np.asarray(vector, np.float64)
    return vector / np.linalg.norm(vector)


def surfels_of(depth_m: np.ndarray, image: np.ndarray | None = None,
               config: SurfelConfig | None = None) -> FrameSurfels:
    gray = np.full(depth_m.shape, 128, np.uint8)
    sp = compute_superpixels(gray, depth_m, SuperpixelConfig())
    return extract_surfels(sp, gray if image is None else image, depth_m, CAMERA, config or SurfelConfig())


def test_tilted_plane_normal_and_position() -> None:
    # A plane 2 m ahead whose normal, facing the camera, is 28° off the optical axis.
    normal = unit([0.45, -0.3, -1.0])
    point = np.array([0.0, 0.0, 2.0])
    depth_m = plane_depth(CAMERA, normal, point)

    surfels = surfels_of(depth_m)

    valid = surfels.valid
    assert valid.mean() > 0.9
    normals = surfels.normal_camera[valid].astype(np.float64)
    angles_deg = np.degrees(np.arccos(np.clip(normals @ normal, -1.0, 1.0)))
    assert angles_deg.max() < 2.0
    positions = surfels.position_camera[valid].astype(np.float64)
    np.testing.assert_allclose((positions - point) @ normal, 0.0, atol=1e-3)
    # Facing the camera: the normal points back towards the origin.
    assert ((normals * positions).sum(axis=1) < 0).all()
    np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)


def test_position_is_on_the_superpixel_centre_ray() -> None:
    normal = unit([-0.2, 0.25, -1.0])
    depth_m = plane_depth(CAMERA, normal, np.array([0.1, 0.0, 1.5]))
    gray = np.full(depth_m.shape, 128, np.uint8)
    sp = compute_superpixels(gray, depth_m, SuperpixelConfig())

    surfels = extract_surfels(sp, gray, depth_m, CAMERA, SurfelConfig())

    valid = surfels.valid
    position = surfels.position_camera[valid].astype(np.float64)
    u, v, _ = CAMERA.project(position)
    np.testing.assert_allclose(u, sp.center_u[valid], atol=1e-3)
    np.testing.assert_allclose(v, sp.center_v[valid], atol=1e-3)


def test_normal_faces_camera() -> None:
    # The same plane with its normal given pointing away from the camera.
    away = unit([0.3, 0.1, 1.0])
    depth_m = plane_depth(CAMERA, away, np.array([0.0, 0.0, 3.0]))

    surfels = surfels_of(depth_m)

    normals = surfels.normal_camera[surfels.valid].astype(np.float64)
    assert len(normals) > 0
    np.testing.assert_allclose(normals @ -away, 1.0, atol=1e-4)


def test_fronto_parallel_patch_radius_weight() -> None:
    # A 10×10 pixel patch centred on the principal point, 2 m ahead.
    depth_m = np.full(CAMERA.shape, 2.0, np.float32)
    labels = np.full(CAMERA.shape, -1, np.int32)
    labels[55:65, 75:85] = 0
    gray = np.full(CAMERA.shape, 128, np.uint8)
    sp = superpixels_from_labels(labels, gray, depth_m)

    surfels = extract_surfels(sp, gray, depth_m, CAMERA, SurfelConfig(weight_depth_scale_m=1.0))

    assert surfels.valid[0]
    np.testing.assert_allclose(surfels.view_cosine[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(surfels.position_camera[0], [0.0, 0.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(surfels.normal_camera[0], [0.0, 0.0, -1.0], atol=1e-6)
    # sqrt(pixels / π) · z / f, and min(1, (1 m / 2 m)²).
    np.testing.assert_allclose(surfels.radius_m[0], math.sqrt(100 / math.pi) * 2.0 / 150.0, rtol=1e-5)
    np.testing.assert_allclose(surfels.weight[0], 0.25, rtol=1e-6)


def test_grazing_surfaces_make_no_surfel() -> None:
    # A narrow view (rays within ±2° of the axis) of a plane whose normal is 87° from
    # the optical axis: every view cosine is near cos 87° ≈ 0.05.
    camera = PinholeCamera(width=64, height=48, fx=1000.0, fy=1000.0, cx=31.5, cy=23.5)
    tilt = math.radians(87.0)
    normal = np.array([math.sin(tilt), 0.0, -math.cos(tilt)])
    depth_m = plane_depth(camera, normal, np.array([0.0, 0.0, 2.0]))
    gray = np.full(depth_m.shape, 128, np.uint8)
    sp = compute_superpixels(gray, depth_m, SuperpixelConfig())
    config = SurfelConfig(inlier_range_m=0.5)

    grazing = extract_surfels(sp, gray, depth_m, camera, config)
    accepted = extract_surfels(sp, gray, depth_m, camera, replace(config, min_view_cosine=0.01))

    assert not grazing.valid.any()
    assert np.isnan(grazing.position_camera).all()
    assert accepted.valid.sum() > 0
    assert (accepted.view_cosine[accepted.valid] < 0.1).all()


def test_frame_without_depth_gives_no_surfels() -> None:
    depth_m = np.full(CAMERA.shape, np.nan, np.float32)

    surfels = surfels_of(depth_m)

    assert surfels.count == (120 // 8) * (160 // 8)
    assert not surfels.valid.any()
    for name in ("position_camera", "normal_camera", "radius_m", "weight", "view_cosine"):
        assert np.isnan(getattr(surfels, name)).all(), name


def test_gray_and_rgb_images_give_colors() -> None:
    depth_m = np.full(CAMERA.shape, 1.0, np.float32)
    gray = np.full(CAMERA.shape, 120, np.uint8)
    rgb = np.empty((*CAMERA.shape, 3), np.uint8)
    rgb[...] = (200, 100, 50)

    from_gray = surfels_of(depth_m, gray)
    from_rgb = surfels_of(depth_m, rgb)

    assert from_gray.valid.all()
    assert from_rgb.valid.all()
    np.testing.assert_array_equal(from_gray.color_rgb, np.tile([120, 120, 120], (from_gray.count, 1)))
    np.testing.assert_array_equal(from_rgb.color_rgb, np.tile([200, 100, 50], (from_rgb.count, 1)))


def test_color_is_the_superpixel_mean() -> None:
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 256, (*CAMERA.shape, 3), dtype=np.uint8)
    depth_m = np.full(CAMERA.shape, 1.0, np.float32)
    gray = np.full(CAMERA.shape, 128, np.uint8)
    sp = compute_superpixels(gray, depth_m, SuperpixelConfig())

    surfels = extract_surfels(sp, rgb, depth_m, CAMERA, SurfelConfig())

    for s in range(0, sp.count, 17):
        expected = rgb[sp.labels == s].astype(np.float64).mean(axis=0)
        np.testing.assert_allclose(surfels.color_rgb[s], expected, atol=0.5)


def test_superpixel_across_a_depth_step_makes_no_surfel() -> None:
    # One region, half at 1 m and half at 2 m: no plane has 80 % of it within 5 cm.
    depth_m = np.full(CAMERA.shape, 1.0, np.float32)
    depth_m[:, 80:] = 2.0
    labels = np.full(CAMERA.shape, -1, np.int32)
    labels[50:70, 70:90] = 0
    gray = np.zeros(CAMERA.shape, np.uint8)

    surfels = extract_surfels(superpixels_from_labels(labels, gray, depth_m), gray, depth_m,
                              CAMERA, SurfelConfig())

    assert not surfels.valid[0]


def test_plane_fit_is_robust_to_outliers() -> None:
    # A fronto-parallel patch at 2 m with 10 % of its pixels 30 cm behind it.
    rng = np.random.default_rng(4)
    depth_m = np.full(CAMERA.shape, 2.0, np.float32)
    labels = np.full(CAMERA.shape, -1, np.int32)
    labels[40:60, 60:80] = 0
    outliers = (rng.random(CAMERA.shape) < 0.1) & (labels == 0)
    depth_m[outliers] = 2.3
    gray = np.zeros(CAMERA.shape, np.uint8)

    surfels = extract_surfels(superpixels_from_labels(labels, gray, depth_m), gray, depth_m,
                              CAMERA, SurfelConfig())

    assert surfels.valid[0]
    angle_deg = math.degrees(math.acos(min(1.0, -float(surfels.normal_camera[0, 2]))))
    assert angle_deg < 2.0
    # The position stays within 1 cm of the true plane (the plain mean would be 3 cm off).
    np.testing.assert_allclose(surfels.position_camera[0, 2], 2.0, atol=0.01)


def test_too_few_pixels_with_depth_make_no_surfel() -> None:
    depth_m = np.full(CAMERA.shape, np.nan, np.float32)
    depth_m[10:14, 10:14] = 1.0  # 16 pixels with depth, on a plane
    labels = np.zeros(CAMERA.shape, np.int32)
    gray = np.zeros(CAMERA.shape, np.uint8)
    sp = superpixels_from_labels(labels, gray, depth_m)

    default = extract_surfels(sp, gray, depth_m, CAMERA, SurfelConfig())
    fewer = extract_surfels(sp, gray, depth_m, CAMERA, SurfelConfig(min_pixels_with_depth=17))

    assert default.valid[0]
    assert not fewer.valid[0]


def test_pixels_on_a_line_make_no_surfel() -> None:
    # 40 pixels with depth in one image row fix no plane (any plane through their
    # 3-D line fits them).
    depth_m = np.full(CAMERA.shape, np.nan, np.float32)
    depth_m[30, 20:60] = 2.0
    labels = np.zeros(CAMERA.shape, np.int32)
    gray = np.zeros(CAMERA.shape, np.uint8)

    surfels = extract_surfels(superpixels_from_labels(labels, gray, depth_m), gray, depth_m,
                              CAMERA, SurfelConfig())

    assert not surfels.valid[0]


def test_two_runs_and_thread_counts_give_identical_surfels() -> None:
    rng = np.random.default_rng(9)
    depth_m = plane_depth(CAMERA, unit([0.2, -0.1, -1.0]), np.array([0.0, 0.0, 2.0]))
    depth_m += rng.normal(0.0, 0.01, depth_m.shape).astype(np.float32)
    depth_m[rng.random(depth_m.shape) < 0.2] = np.nan
    rgb = rng.integers(0, 256, (*CAMERA.shape, 3), dtype=np.uint8)
    sp = compute_superpixels(rgb[..., 1], depth_m, SuperpixelConfig())

    first = extract_surfels(sp, rgb, depth_m, CAMERA, SurfelConfig())
    second = extract_surfels(sp, rgb, depth_m, CAMERA, SurfelConfig())
    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        single = extract_surfels(sp, rgb, depth_m, CAMERA, SurfelConfig())
    finally:
        numba.set_num_threads(threads)

    assert first.valid.sum() > 0
    for other in (second, single):
        for name in FrameSurfels.__dataclass_fields__:
            np.testing.assert_array_equal(getattr(first, name), getattr(other, name), err_msg=name)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"min_pixels_with_depth": 2}, "min_pixels_with_depth=2"),
        ({"min_inlier_ratio": 1.5}, "min_inlier_ratio=1.5"),
        ({"inlier_range_m": 0.0}, "inlier_range_m=0.0"),
        ({"min_view_cosine": -0.1}, "min_view_cosine=-0.1"),
        ({"weight_depth_scale_m": float("inf")}, "weight_depth_scale_m=inf"),
        ({"plane_iterations": -1}, "plane_iterations=-1"),
    ],
)
def test_bad_config_raises(changes: dict, match: str) -> None:
    depth_m = np.ones(CAMERA.shape, np.float32)
    gray = np.zeros(CAMERA.shape, np.uint8)
    sp = compute_superpixels(gray, depth_m, SuperpixelConfig())
    with pytest.raises(ConfigError, match=match):
        extract_surfels(sp, gray, depth_m, CAMERA, replace(SurfelConfig(), **changes))


def test_bad_images_raise() -> None:
    depth_m = np.ones(CAMERA.shape, np.float32)
    gray = np.zeros(CAMERA.shape, np.uint8)
    sp = compute_superpixels(gray, depth_m, SuperpixelConfig())
    config = SurfelConfig()
    with pytest.raises(ValueError, match="image size 80x60 does not match the camera size 160x120"):
        extract_surfels(sp, np.zeros((60, 80), np.uint8), depth_m, CAMERA, config)
    with pytest.raises(ValueError, match="expected \\(H, W\\) uint8 gray or \\(H, W, 3\\) uint8 RGB"):
        extract_surfels(sp, gray.astype(np.float32), depth_m, CAMERA, config)
    with pytest.raises(ValueError, match="expected \\(H, W\\) uint8 gray"):
        extract_surfels(sp, np.zeros((*CAMERA.shape, 4), np.uint8), depth_m, CAMERA, config)
    with pytest.raises(ValueError, match="invalid depth dtype uint16"):
        extract_surfels(sp, gray, depth_m.astype(np.uint16), CAMERA, config)
    with pytest.raises(ValueError, match="depth size 80x60"):
        extract_surfels(sp, gray, np.ones((60, 80), np.float32), CAMERA, config)


def test_real_kinect_frame(seven_scenes_dir: Path) -> None:
    import cv2

    bgr = cv2.imread(str(seven_scenes_dir / "frame-000000.color.jpg"))
    rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    raw = cv2.imread(str(seven_scenes_dir / "frame-000000.depth.png"), cv2.IMREAD_UNCHANGED)
    depth_m = np.where((raw == 0) | (raw == 65535), np.nan, raw / 1000.0).astype(np.float32)
    camera = PinholeCamera(640, 480, 585.0, 585.0, 320.0, 240.0)
    sp = compute_superpixels(gray, depth_m, SuperpixelConfig())

    surfels = extract_surfels(sp, rgb, depth_m, camera, SurfelConfig())

    assert surfels.valid.mean() > 0.7
    # A surfel lies on its superpixel's surface: its depth is within a few cm of the
    # superpixel's robust depth (they differ by the plane's slope between the centroid
    # and the centre ray, and by sensor noise).
    dz = surfels.position_camera[surfels.valid, 2] - sp.depth_m[surfels.valid]
    assert np.median(np.abs(dz)) < 0.01
    assert (surfels.view_cosine[surfels.valid] >= 0.1).all()
    assert (surfels.weight[surfels.valid] <= 1.0).all()


def test_real_kitti_stereo_frame(kitti_dir: Path) -> None:
    import cv2

    sequence = kitti_dir / "sequences" / "00"
    left = cv2.imread(str(sequence / "image_0" / "000000.png"), cv2.IMREAD_GRAYSCALE)
    right = cv2.imread(str(sequence / "image_1" / "000000.png"), cv2.IMREAD_GRAYSCALE)
    matcher = cv2.StereoSGBM_create(
        minDisparity=0, numDisparities=128, blockSize=5, P1=8 * 25, P2=32 * 25,
        mode=cv2.STEREO_SGBM_MODE_SGBM_3WAY,
    )
    disparity = matcher.compute(left, right).astype(np.float32) / 16.0
    fx, baseline_m = 718.856, 0.537
    with np.errstate(divide="ignore"):
        depth_m = np.where(disparity > 0, fx * baseline_m / disparity, np.nan).astype(np.float32)
    depth_m[depth_m > 30.0] = np.nan
    camera = PinholeCamera(1241, 376, fx, fx, 607.1928, 185.2157)
    superpixel_config = SuperpixelConfig(huber_delta_m=0.4)
    sp = compute_superpixels(left, depth_m, superpixel_config)

    surfels = extract_surfels(sp, left, depth_m, camera, SurfelConfig(inlier_range_m=0.4))

    assert sp.count == 47 * 155
    assert surfels.valid.sum() > 1000
    position = surfels.position_camera[surfels.valid]
    normal = surfels.normal_camera[surfels.valid]
    assert (position[:, 2] > 0).all()
    assert ((position * normal).sum(axis=1) < 0).all()
