"""Tests of the SurfelMapper: input checks, keyframes, loop closure and bounded per-frame work.

Scenes are planes rendered in the test with PinholeCamera geometry. Most tests feed
candidate surfels, one per 8×8-pixel cell, directly to integrate_surfels, so they do
not depend on the superpixel stage. The end-to-end test runs the whole pipeline.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from surfel_mapping_node import fusion, superpixels, surfel_extraction
from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.config import KeyframeConfig, MapperConfig, preset_for_format
from surfel_mapping_node.mapper import SurfelMapper, compile_kernels
from surfel_mapping_node.surfel_extraction import FrameSurfels

CAMERA = PinholeCamera(width=80, height=64, fx=60.0, fy=60.0, cx=39.5, cy=31.5)
GRID_PX = 8
WALL_POINT_M = np.array([0.0, 0.0, 2.0])
WALL_NORMAL = np.array([0.0, 0.0, 1.0])


def _pose(x_m: float = 0.0, y_m: float = 0.0, z_m: float = 0.0, yaw_deg: float = 0.0) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler("y", yaw_deg, degrees=True).as_matrix()
    T[:3, 3] = [x_m, y_m, z_m]
    return T


def _pixel_rays(camera: PinholeCamera, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, np.ones(np.shape(u))], axis=-1)


def render_plane(
    camera: PinholeCamera, T_world_camera: np.ndarray, point_m: np.ndarray = WALL_POINT_M, normal=WALL_NORMAL
) -> tuple[FrameSurfels, np.ndarray]:
    """Render a plane (world point and normal); return one candidate per 8×8 cell and the depth image."""
    R, t = T_world_camera[:3, :3], T_world_camera[:3, 3]
    normal_camera = R.T @ normal
    offset_m = normal_camera @ (R.T @ (point_m - t))

    v, u = np.mgrid[0 : camera.height, 0 : camera.width]
    with np.errstate(divide="ignore"):
        depth_m = offset_m / (_pixel_rays(camera, u, v) @ normal_camera)
    depth_m = np.where(depth_m > 0, depth_m, np.nan).astype(np.float32)

    columns, rows = camera.width // GRID_PX, camera.height // GRID_PX
    labels = ((v // GRID_PX) * columns + u // GRID_PX).astype(np.int32)
    cell_v, cell_u = np.divmod(np.arange(rows * columns), columns)
    centre_rays = _pixel_rays(
        camera, cell_u * GRID_PX + (GRID_PX - 1) / 2, cell_v * GRID_PX + (GRID_PX - 1) / 2
    )
    with np.errstate(divide="ignore"):
        centre_depth_m = offset_m / (centre_rays @ normal_camera)
    count = len(centre_depth_m)
    frame_surfels = FrameSurfels(
        labels=labels,
        valid=centre_depth_m > 0,
        position_camera=(centre_rays * centre_depth_m[:, None]).astype(np.float32),
        normal_camera=np.tile(normal_camera if offset_m < 0 else -normal_camera, (count, 1)).astype(
            np.float32
        ),
        radius_m=np.full(count, 0.05, dtype=np.float32),
        color_rgb=np.full((count, 3), 128, dtype=np.uint8),
        weight=np.full(count, 0.25, dtype=np.float32),
        view_cosine=np.ones(count, dtype=np.float32),
    )
    return frame_surfels, depth_m


def _config(**keyframes) -> MapperConfig:
    config = MapperConfig()
    config.keyframes = KeyframeConfig(**keyframes)
    return config


def _images(depth_shape: tuple[int, int] = (64, 80)) -> tuple[np.ndarray, np.ndarray]:
    image = np.full((64, 80, 3), 100, dtype=np.uint8)
    depth_m = np.full(depth_shape, 2.0, dtype=np.float32)
    return image, depth_m


def _moved_positions(positions: np.ndarray, T: np.ndarray) -> np.ndarray:
    return positions.astype(np.float64) @ T[:3, :3].T + T[:3, 3]


def test_size_mismatch_names_both_sizes() -> None:
    mapper = SurfelMapper(MapperConfig(), CAMERA)
    image, depth_m = _images(depth_shape=(60, 80))

    with pytest.raises(ValueError, match=r"image size 80x64 does not match depth size 80x60"):
        mapper.integrate(image, depth_m, np.eye(4), stamp_ns=1)


def test_image_not_matching_camera_raises() -> None:
    mapper = SurfelMapper(MapperConfig(), CAMERA)
    image = np.zeros((32, 40), dtype=np.uint8)

    with pytest.raises(ValueError, match="image size 40x32 does not match the camera size 80x64"):
        mapper.integrate(image, np.ones((32, 40), dtype=np.float32), np.eye(4), stamp_ns=1)


def test_invalid_image_shape_raises() -> None:
    mapper = SurfelMapper(MapperConfig(), CAMERA)

    with pytest.raises(ValueError, match=r"invalid image shape \(64, 80, 4\)"):
        mapper.integrate(np.zeros((64, 80, 4), dtype=np.uint8), _images()[1], np.eye(4), stamp_ns=1)


def test_non_uint8_image_raises() -> None:
    mapper = SurfelMapper(MapperConfig(), CAMERA)
    image = np.zeros((64, 80), dtype=np.float32)

    with pytest.raises(ValueError, match="invalid image dtype float32: expected uint8"):
        mapper.integrate(image, _images()[1], np.eye(4), stamp_ns=1)


@pytest.mark.parametrize(
    ("pose_error", "reason"),
    [("nan", "NaN"), ("scaled", "not orthonormal")],
)
def test_invalid_pose_skips_frame(pose_error: str, reason: str, caplog: pytest.LogCaptureFixture) -> None:
    mapper = SurfelMapper(MapperConfig(), CAMERA)
    T_world_camera = np.eye(4)
    if pose_error == "nan":
        T_world_camera[1, 3] = np.nan
    else:
        T_world_camera[:3, :3] *= 1.1

    with caplog.at_level(logging.WARNING):
        stats = mapper.integrate(*_images(), T_world_camera, stamp_ns=5)

    assert reason in stats.skipped_reason
    assert "frame 5 skipped" in caplog.text
    assert stats.keyframe_id is None
    assert len(mapper.keyframes) == 0
    assert mapper.frames_skipped == 1


@pytest.mark.parametrize("fill", [np.nan, 0.0, np.inf])
def test_frame_without_depth_makes_no_surfels(fill: float) -> None:
    mapper = SurfelMapper(MapperConfig(), CAMERA)
    image, depth_m = _images()
    depth_m[:] = fill

    stats = mapper.integrate(image, depth_m, np.eye(4), stamp_ns=1)

    assert stats.skipped_reason is None
    assert stats.surfels_created == 0
    assert len(mapper.cloud()) == 0


def test_empty_map_cloud_has_zero_rows() -> None:
    mapper = SurfelMapper(MapperConfig(), CAMERA)

    cloud = mapper.cloud()

    assert cloud.position_m.shape == (0, 3)
    assert cloud.normal.shape == (0, 3)
    assert cloud.color_rgb.shape == (0, 3)
    assert cloud.color_rgb.dtype == np.uint8
    assert cloud.radius_m.shape == (0,)
    assert cloud.confidence.shape == (0,)
    assert cloud.keyframe_id.dtype == np.int64
    assert len(mapper.local_cloud()) == 0


def test_integrate_surfels_fuses_repeated_views() -> None:
    mapper = SurfelMapper(MapperConfig(), CAMERA)

    first = mapper.integrate_surfels(*render_plane(CAMERA, _pose()), _pose(), stamp_ns=1)
    second = mapper.integrate_surfels(*render_plane(CAMERA, _pose(x_m=0.02)), _pose(x_m=0.02), stamp_ns=2)

    assert first.surfels_created == 80
    assert first.is_new_keyframe
    assert second.keyframe_id == first.keyframe_id
    assert second.surfels_fused > 60
    assert list(second.stages_ms) == ["keyframes", "fusion"]
    cloud = mapper.cloud()
    np.testing.assert_allclose(cloud.position_m[:, 2], 2.0, atol=1e-5)


def test_loop_closure_moves_surfels_exactly() -> None:
    mapper = SurfelMapper(_config(local_map_radius_m=5.0), CAMERA)
    # Keyframes 10 and 20 see separate parts of the wall, 30 m apart.
    mapper.integrate_surfels(*render_plane(CAMERA, _pose()), _pose(), stamp_ns=1, keyframe_id=10)
    mapper.integrate_surfels(
        *render_plane(CAMERA, _pose(x_m=30.0)), _pose(x_m=30.0), stamp_ns=2, keyframe_id=20
    )
    before = mapper.cloud()
    # A rotation-only correction of keyframe 10, and a general one of keyframe 20.
    T_new_10 = _pose(yaw_deg=2.0)
    T_new_20 = _pose(x_m=30.5, y_m=-0.2, yaw_deg=-1.0)

    correction = mapper.apply_keyframe_poses({20: T_new_20, 10: T_new_10, 99: _pose()})

    after = mapper.cloud()
    assert correction.unknown_ids == [99]
    assert sorted(correction.T_correction_by_id) == [10, 20]
    for keyframe_id, T_correction in ((10, T_new_10), (20, T_new_20 @ np.linalg.inv(_pose(x_m=30.0)))):
        expected = _moved_positions(before.position_m[before.keyframe_id == keyframe_id], T_correction)
        moved = after.position_m[after.keyframe_id == keyframe_id]
        np.testing.assert_allclose(moved, expected, atol=1e-6)
        expected_normal = before.normal[before.keyframe_id == keyframe_id] @ T_correction[:3, :3].T
        np.testing.assert_allclose(after.normal[after.keyframe_id == keyframe_id], expected_normal, atol=1e-6)


def test_update_keyframe_poses_counts_moved_keyframes() -> None:
    mapper = SurfelMapper(MapperConfig(), CAMERA)
    mapper.integrate_surfels(*render_plane(CAMERA, _pose()), _pose(), stamp_ns=1, keyframe_id=10)

    unchanged = mapper.update_keyframe_poses({10: _pose()})
    unknown = mapper.update_keyframe_poses({11: _pose(x_m=1.0)})
    moved = mapper.update_keyframe_poses({10: _pose(x_m=0.1)})

    assert (unchanged, unknown, moved) == (0, 0, 1)
    np.testing.assert_allclose(mapper.cloud().position_m[:, 0].mean(), 0.1, atol=1e-5)


def test_fused_surfels_follow_their_new_keyframe() -> None:
    mapper = SurfelMapper(MapperConfig(), CAMERA)
    mapper.integrate_surfels(*render_plane(CAMERA, _pose()), _pose(), stamp_ns=1, keyframe_id=10)
    stats = mapper.integrate_surfels(*render_plane(CAMERA, _pose()), _pose(), stamp_ns=2, keyframe_id=20)
    before = mapper.cloud()
    T_new_20 = _pose(yaw_deg=1.0)

    mapper.update_keyframe_poses({20: T_new_20})

    assert stats.surfels_fused == 80
    assert np.all(before.keyframe_id == 20)
    np.testing.assert_allclose(
        mapper.cloud().position_m, _moved_positions(before.position_m, T_new_20), atol=1e-6
    )
    assert 10 in mapper.keyframes[20].neighbors


def test_keyframes_matched_by_id_after_reordering_and_removal() -> None:
    mapper = SurfelMapper(_config(local_map_radius_m=5.0), CAMERA)
    ids = [300, 100, 200]
    for i, keyframe_id in enumerate(ids):
        T = _pose(x_m=20.0 * i)
        mapper.integrate_surfels(*render_plane(CAMERA, T), T, stamp_ns=i, keyframe_id=keyframe_id)
    before = mapper.cloud()
    # The pose source culled keyframe 100 and lists the others in another order.
    new_poses = {200: _pose(x_m=40.0, y_m=1.0), 300: _pose(y_m=-1.0)}

    moved = mapper.update_keyframe_poses(new_poses)

    after = mapper.cloud()
    assert moved == 2
    for keyframe_id, shift_y_m in ((300, -1.0), (100, 0.0), (200, 1.0)):
        expected = before.position_m[before.keyframe_id == keyframe_id] + [0.0, shift_y_m, 0.0]
        np.testing.assert_allclose(after.position_m[after.keyframe_id == keyframe_id], expected, atol=1e-6)


def test_per_frame_work_bounded_as_map_grows() -> None:
    """Along a 30 m wall the map grows linearly, but fusion only examines the local map."""
    config = _config(min_translation_m=0.1, local_map_hops=20, local_map_radius_m=1.0)
    mapper = SurfelMapper(config, CAMERA)
    considered, totals = [], []
    for i in range(600):
        T = _pose(x_m=0.05 * i)
        stats = mapper.integrate_surfels(*render_plane(CAMERA, T), T, stamp_ns=i)
        considered.append(stats.surfels_considered)
        totals.append(stats.surfels_total)

    assert totals[-1] >= 5 * totals[59]
    assert max(considered[540:]) <= 1.2 * max(considered[60:120])
    assert mapper.surfel_map.active_count < 0.2 * len(mapper.surfel_map)


def _textured_wall_images(camera: PinholeCamera, T_world_camera: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Render the wall z = 2 m with a 0.2 m checkerboard and a color gradient; return RGB and depth."""
    v, u = np.mgrid[0 : camera.height, 0 : camera.width]
    rays_world = _pixel_rays(camera, u, v) @ T_world_camera[:3, :3].T
    origin = T_world_camera[:3, 3]
    distance = (WALL_POINT_M[2] - origin[2]) / rays_world[..., 2]
    points = origin + rays_world * distance[..., None]
    checker = (np.floor(points[..., 0] / 0.2) + np.floor(points[..., 1] / 0.2)) % 2
    red = 60 + 130 * checker
    green = np.clip(128 + 100 * points[..., 0], 0, 255)
    image = np.stack([red, green, np.full(red.shape, 90.0)], axis=-1).astype(np.uint8)
    depth_m = (distance * (T_world_camera[:3, :3].T @ rays_world[..., None])[..., 2, 0]).astype(np.float32)
    return image, depth_m


def test_end_to_end_textured_wall() -> None:
    camera = PinholeCamera(width=160, height=120, fx=150.0, fy=150.0, cx=79.5, cy=59.5)
    mapper = SurfelMapper(MapperConfig(), camera)

    all_stats = []
    for i in range(8):
        T = _pose(x_m=0.02 * i, yaw_deg=0.5 * i)
        image, depth_m = _textured_wall_images(camera, T)
        all_stats.append(mapper.integrate(image, depth_m, T, stamp_ns=i * 33_000_000))

    cloud = mapper.cloud()
    assert all_stats[0].surfels_created > 100
    assert all(stats.surfels_fused > 0 for stats in all_stats[1:])
    assert list(all_stats[0].stages_ms) == ["keyframes", "superpixels", "surfels", "fusion"]
    # Fusion keeps the map from growing by a full frame of surfels per frame.
    assert len(cloud) < 2 * all_stats[0].surfels_created
    np.testing.assert_allclose(cloud.position_m[:, 2], 2.0, atol=0.01)
    np.testing.assert_allclose(np.abs(cloud.normal[:, 2]), 1.0, atol=0.01)


@pytest.mark.parametrize("dataset_format", ["7scenes", "kitti"])
def test_compile_kernels_compiles_each_stage(dataset_format: str):
    seconds = compile_kernels(MapperConfig.from_dict(preset_for_format(dataset_format)))

    assert seconds > 0
    for kernel in (superpixels._assign_pixels, surfel_extraction._fit_surfels, fusion._fuse_kernel):
        assert kernel.signatures, f"{kernel.__name__} was not compiled"
