"""Tests of fusing one frame's candidate surfels into the active surfels of the map.

The frames are planes rendered in the test: exact per-pixel depth, and one candidate
surfel per 8×8-pixel superpixel at the ray-plane intersection through its centre.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.config import FusionConfig
from surfel_mapping_node.fusion import FrameContext, fuse_frame
from surfel_mapping_node.surfel_extraction import FrameSurfels
from surfel_mapping_node.surfel_map import SurfelMap

CAMERA = PinholeCamera(width=80, height=64, fx=60.0, fy=60.0, cx=39.5, cy=31.5)
GRID_PX = 8
KEYFRAME = 1


def render_plane(
    camera: PinholeCamera,
    T_world_camera: np.ndarray,
    point_m: np.ndarray,
    normal: np.ndarray,
    *,
    depth_noise_m: float = 0.0,
    rng: np.random.Generator | None = None,
    weight: float = 1.0,
) -> tuple[FrameSurfels, np.ndarray]:
    """Render the plane through point_m (world) with the given normal; return candidates and depth.

    Candidate centres get Gaussian depth noise of depth_noise_m along their ray.
    """
    R, t = T_world_camera[:3, :3], T_world_camera[:3, 3]
    normal_camera = R.T @ np.asarray(normal, dtype=np.float64)
    offset_m = normal_camera @ (R.T @ (np.asarray(point_m, dtype=np.float64) - t))

    v, u = np.mgrid[0 : camera.height, 0 : camera.width]
    rays = np.stack([(u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy, np.ones(u.shape)], axis=-1)
    with np.errstate(divide="ignore"):
        depth_m = offset_m / (rays @ normal_camera)
    depth_m = np.where(depth_m > 0, depth_m, np.nan).astype(np.float32)

    columns, rows = camera.width // GRID_PX, camera.height // GRID_PX
    labels = ((v // GRID_PX) * columns + u // GRID_PX).astype(np.int32)
    cell_v, cell_u = np.divmod(np.arange(rows * columns), columns)
    centre_u = cell_u * GRID_PX + (GRID_PX - 1) / 2
    centre_v = cell_v * GRID_PX + (GRID_PX - 1) / 2
    centre_rays = np.stack(
        [(centre_u - camera.cx) / camera.fx, (centre_v - camera.cy) / camera.fy, np.ones(len(centre_u))],
        axis=-1,
    )
    centre_depth_m = offset_m / (centre_rays @ normal_camera)
    if depth_noise_m:
        centre_depth_m = centre_depth_m + rng.normal(0.0, depth_noise_m, size=len(centre_depth_m))
    position_camera = centre_rays * centre_depth_m[:, None]
    facing = normal_camera if offset_m < 0 else -normal_camera
    count = len(centre_u)
    frame_surfels = FrameSurfels(
        labels=labels,
        valid=centre_depth_m > 0,
        position_camera=position_camera.astype(np.float32),
        normal_camera=np.tile(facing, (count, 1)).astype(np.float32),
        radius_m=np.full(count, 0.05, dtype=np.float32),
        color_rgb=np.tile(np.array([200, 100, 50], dtype=np.uint8), (count, 1)),
        weight=np.full(count, weight, dtype=np.float32),
        view_cosine=np.ones(count, dtype=np.float32),
    )
    return frame_surfels, depth_m


def _frame(T_world_camera: np.ndarray, keyframe_id: int = KEYFRAME, keyframe_count: int = 1) -> FrameContext:
    return FrameContext(T_world_camera, CAMERA, keyframe_id, keyframe_count, stamp_ns=keyframe_count)


def _wall(z_m: float = 2.0, **kwargs) -> tuple[FrameSurfels, np.ndarray]:
    """A fronto-parallel plane z_m in front of a camera at the world origin."""
    return render_plane(CAMERA, np.eye(4), np.array([0.0, 0.0, z_m]), np.array([0.0, 0.0, 1.0]), **kwargs)


def _map_with_wall(z_m: float, config: FusionConfig) -> SurfelMap:
    surfel_map = SurfelMap()
    surfel_map.activate([KEYFRAME])
    fuse_frame(surfel_map, *_wall(z_m), _frame(np.eye(4)), config)
    return surfel_map


def test_first_frame_creates_one_surfel_per_superpixel() -> None:
    surfel_map = SurfelMap()
    surfel_map.activate([KEYFRAME])
    T_world_camera = np.eye(4)
    T_world_camera[:3, 3] = [1.0, 2.0, 3.0]
    frame_surfels, depth_m = render_plane(
        CAMERA, T_world_camera, np.array([0.0, 0.0, 5.0]), np.array([0, 0, 1.0])
    )

    result = fuse_frame(surfel_map, frame_surfels, depth_m, _frame(T_world_camera), FusionConfig())

    assert result.surfels_created == 80
    assert result.surfels_fused == 0
    # Camera-to-world: the plane z = 5 in the world lies 2 m in front of the camera.
    np.testing.assert_allclose(surfel_map.active.position_m[:, 2], 5.0, atol=1e-5)
    np.testing.assert_allclose(surfel_map.active.normal, np.tile([0.0, 0.0, -1.0], (80, 1)), atol=1e-6)
    assert np.all(surfel_map.active.keyframe_id == KEYFRAME)


def test_fusion_reduces_depth_noise() -> None:
    rng = np.random.default_rng(0)
    config = FusionConfig(max_weight=1000.0)
    surfel_map = SurfelMap()
    surfel_map.activate([KEYFRAME])
    true_z_m, noise_m = 2.0, 0.01

    errors_m = []
    for _ in range(40):
        # Exact depth image and noisy candidates, so the free-space test uses the true wall depth.
        frame_surfels, depth_m = _wall(true_z_m, depth_noise_m=noise_m, rng=rng)
        fuse_frame(surfel_map, frame_surfels, depth_m, _frame(np.eye(4)), config)
        errors_m.append(np.sqrt(np.mean((surfel_map.active.position_m[:, 2] - true_z_m) ** 2)))

    assert len(surfel_map) == 80
    # Averaging n equal-weight observations shrinks the error like 1/√n: 1 cm -> about 1.6 mm.
    assert 0.006 < errors_m[0] < 0.014
    assert errors_m[-1] < 0.35 * errors_m[0]
    assert np.all(surfel_map.active.update_count == 40)


def test_weight_capped_and_capped_surfels_still_move() -> None:
    config = FusionConfig(max_weight=5.0)
    surfel_map = _map_with_wall(2.0, config)
    for _ in range(20):
        fuse_frame(surfel_map, *_wall(2.0), _frame(np.eye(4)), config)

    np.testing.assert_allclose(surfel_map.active.weight, 5.0)

    before_z_m = surfel_map.active.position_m[:, 2].copy()
    fuse_frame(surfel_map, *_wall(2.06), _frame(np.eye(4)), config)

    # The new measurement has weight 1 against the capped 5: the surfel moves 1/6 of the way.
    np.testing.assert_allclose(surfel_map.active.position_m[:, 2] - before_z_m, 0.06 / 6, atol=1e-5)


def test_depth_gate_rejects_and_makes_new_surfel() -> None:
    config = FusionConfig(depth_tolerance_per_m2=0.03, depth_tolerance_min_m=0.01, free_space_margin_m=0.3)
    surfel_map = _map_with_wall(2.0, config)
    old_positions = surfel_map.active.position_m.copy()

    # 0.2 m behind: beyond the gate (0.03·2² = 0.12 m), within the free-space margin.
    result = fuse_frame(surfel_map, *_wall(2.2), _frame(np.eye(4)), config)

    assert result.surfels_fused == 0
    assert result.surfels_created == 80
    assert result.removed_free_space == 0
    np.testing.assert_array_equal(surfel_map.active.position_m[:80], old_positions)


def test_depth_gate_accepts_within_tolerance() -> None:
    config = FusionConfig(depth_tolerance_per_m2=0.03, depth_tolerance_min_m=0.01)
    surfel_map = _map_with_wall(2.0, config)

    result = fuse_frame(surfel_map, *_wall(2.1), _frame(np.eye(4)), config)

    assert result.surfels_fused == 80
    assert result.surfels_created == 0
    np.testing.assert_allclose(surfel_map.active.position_m[:, 2], 2.05, atol=1e-5)


def test_normal_gate_rejects_tilted_measurement() -> None:
    config = FusionConfig(min_normal_cosine=0.8)
    surfel_map = _map_with_wall(2.0, config)
    # The same wall turned by 45° about the vertical through its centre (cosine 0.71).
    tilted_normal = Rotation.from_euler("y", 45, degrees=True).apply([0.0, 0.0, 1.0])
    frame_surfels, depth_m = render_plane(CAMERA, np.eye(4), np.array([0.0, 0.0, 2.0]), tilted_normal)
    z_m = frame_surfels.position_camera[:, 2]
    in_range = frame_surfels.valid & (z_m >= config.near_m) & (z_m <= config.far_m)

    result = fuse_frame(surfel_map, frame_surfels, depth_m, _frame(np.eye(4)), config)

    assert result.surfels_fused == 0
    assert result.surfels_created == int(np.count_nonzero(in_range))


def test_back_side_of_surface_not_fused() -> None:
    config = FusionConfig()
    surfel_map = _map_with_wall(2.0, config)
    # A camera at z = 4 m looking back views the wall's other side at 2 m.
    T_world_camera = np.eye(4)
    T_world_camera[:3, :3] = Rotation.from_euler("y", 180, degrees=True).as_matrix()
    T_world_camera[:3, 3] = [0.0, 0.0, 4.0]
    frame_surfels, depth_m = render_plane(
        CAMERA, T_world_camera, np.array([0.0, 0.0, 2.0]), np.array([0, 0, 1.0])
    )

    result = fuse_frame(surfel_map, frame_surfels, depth_m, _frame(T_world_camera), config)

    assert result.surfels_in_view == 80
    assert result.surfels_fused == 0
    assert result.surfels_created == 80


def test_free_space_removes_surfels_in_front_of_surface() -> None:
    config = FusionConfig(free_space_margin_m=0.3)
    surfel_map = _map_with_wall(1.0, config)

    result = fuse_frame(surfel_map, *_wall(2.0), _frame(np.eye(4)), config)

    assert result.removed_free_space == 80
    assert result.surfels_created == 80
    assert len(surfel_map) == 80
    np.testing.assert_allclose(surfel_map.gather_active().position_m[:, 2], 2.0, atol=1e-5)


def test_outliers_removed_after_stale_keyframes() -> None:
    config = FusionConfig(min_updates=3, stale_keyframes=2)
    surfel_map = _map_with_wall(2.0, config)
    # Frames that look away from the wall: nothing is fused, only the keyframe count grows.
    T_away = np.eye(4)
    T_away[:3, :3] = Rotation.from_euler("y", 180, degrees=True).as_matrix()
    empty, no_depth = _wall(2.0)
    empty.valid[:] = False
    no_depth[:] = np.nan

    kept = fuse_frame(surfel_map, empty, no_depth, _frame(T_away, keyframe_count=3), config)
    removed = fuse_frame(surfel_map, empty, no_depth, _frame(T_away, keyframe_count=4), config)

    assert kept.removed_outliers == 0
    assert removed.removed_outliers == 80
    assert len(surfel_map) == 0


def test_outlier_rule_spares_often_updated_surfels() -> None:
    config = FusionConfig(min_updates=3, stale_keyframes=2)
    surfel_map = _map_with_wall(2.0, config)
    for _ in range(2):
        fuse_frame(surfel_map, *_wall(2.0), _frame(np.eye(4)), config)
    empty, no_depth = _wall(2.0)
    empty.valid[:] = False
    no_depth[:] = np.nan

    result = fuse_frame(surfel_map, empty, no_depth, _frame(np.eye(4), keyframe_count=10), config)

    assert result.removed_outliers == 0
    assert len(surfel_map) == 80


def test_fused_surfel_taken_over_by_current_keyframe() -> None:
    config = FusionConfig()
    surfel_map = _map_with_wall(2.0, config)
    surfel_map.activate([KEYFRAME, 2])

    result = fuse_frame(surfel_map, *_wall(2.0), _frame(np.eye(4), keyframe_id=2, keyframe_count=2), config)

    assert result.surfels_fused == 80
    assert result.covisible_keyframe_ids == [KEYFRAME]
    assert np.all(surfel_map.active.keyframe_id == 2)
    assert surfel_map.count_by_keyframe() == {2: 80}


def test_surfels_outside_range_or_image_untouched() -> None:
    config = FusionConfig(near_m=0.1, far_m=3.0)
    surfel_map = _map_with_wall(2.0, config)
    old_positions = surfel_map.active.position_m.copy()
    # Camera moved 5 m back: the wall is at 7 m, beyond far_m, and so are new candidates.
    T_world_camera = np.eye(4)
    T_world_camera[2, 3] = -5.0
    frame_surfels, depth_m = render_plane(
        CAMERA, T_world_camera, np.array([0.0, 0.0, 2.0]), np.array([0, 0, 1.0])
    )

    far = fuse_frame(surfel_map, frame_surfels, depth_m, _frame(T_world_camera), config)
    # Camera moved 100 m sideways: the wall is outside the image.
    T_world_camera = np.eye(4)
    T_world_camera[0, 3] = 100.0
    outside = fuse_frame(surfel_map, *_wall(2.0), _frame(T_world_camera), config)

    assert far.surfels_in_view == 0
    assert far.surfels_created == 0
    assert outside.surfels_in_view == 0
    np.testing.assert_array_equal(surfel_map.active.position_m[:80], old_positions)


def test_many_surfels_fuse_into_one_superpixel() -> None:
    config = FusionConfig()
    surfel_map = _map_with_wall(2.0, config)
    frame_surfels, depth_m = _wall(2.0)
    # One superpixel covering the whole image.
    frame_surfels.labels[:] = 0
    frame_surfels.valid[1:] = False

    result = fuse_frame(surfel_map, frame_surfels, depth_m, _frame(np.eye(4)), config)

    assert result.surfels_fused == 80
    assert result.surfels_created == 0


def test_inactive_keyframe_raises() -> None:
    surfel_map = SurfelMap()
    surfel_map.activate([KEYFRAME])

    with pytest.raises(ValueError, match="keyframe 5 is not active"):
        fuse_frame(surfel_map, *_wall(2.0), _frame(np.eye(4), keyframe_id=5), FusionConfig())


def test_mismatched_depth_size_raises() -> None:
    surfel_map = SurfelMap()
    surfel_map.activate([KEYFRAME])
    frame_surfels, depth_m = _wall(2.0)

    with pytest.raises(ValueError, match="depth image size 40x64 does not match the camera size 80x64"):
        fuse_frame(surfel_map, frame_surfels, depth_m[:, :40], _frame(np.eye(4)), FusionConfig())
