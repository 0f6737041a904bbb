"""Tests of the synthetic scenes: exact geometry, the noise model and the long corridor."""

from __future__ import annotations

import numpy as np
import pytest

from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.datasets.synthetic import (
    SMALL_CAMERA,
    Box,
    KinectNoise,
    Sphere,
    SyntheticDataset,
    SyntheticScene,
    look_at,
    make_room,
)
from surfel_mapping_node.depth import decode_depth
from surfel_mapping_node.poses import transform_points

SMALL = PinholeCamera(160, 120, 130.0, 130.0, 79.5, 59.5)


def world_points(camera: PinholeCamera, depth_m: np.ndarray, T_world_camera: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(np.isfinite(depth_m))
    return transform_points(T_world_camera, camera.backproject(cols, rows, depth_m[rows, cols]))


def sphere_trace(scene: SyntheticScene, origin: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """First-hit distance along unit rays by marching on the exact distance field (independent
    of the ray caster: it steps by the distance to the nearest surface until it touches one)."""
    t = np.zeros(len(directions))
    for _ in range(400):
        step = scene.distance_to_surface(origin + t[:, None] * directions)
        # A ray stops once it touches: past a surface the unsigned distance grows again.
        t += np.where(step > 1e-7, step, 0.0)
    return t


def test_rendered_depth_lies_on_the_surfaces() -> None:
    dataset = SyntheticDataset.room(n_frames=12, camera=SMALL)

    for index in range(0, 12, 3):
        view = dataset.render(index)
        points = world_points(SMALL, view.depth_m, dataset.T_world_camera[index])

        # Every pixel of the closed room hits a surface, and float32 depth keeps the points
        # within 1e-5 m of it.
        assert np.isfinite(view.depth_m).all()
        np.testing.assert_allclose(dataset.scene.distance_to_surface(points), 0.0, atol=1e-5)


def test_rendered_depth_is_the_first_hit() -> None:
    dataset = SyntheticDataset.room(n_frames=8, camera=SMALL)
    rng = np.random.default_rng(3)

    for index in range(8):
        view = dataset.render(index)
        T = dataset.T_world_camera[index]
        rows, cols = rng.integers(0, SMALL.height, 300), rng.integers(0, SMALL.width, 300)
        rays_camera = np.stack([(cols - SMALL.cx) / SMALL.fx, (rows - SMALL.cy) / SMALL.fy, np.ones(300)], -1)
        norms = np.linalg.norm(rays_camera, axis=1)
        directions = rays_camera @ T[:3, :3].T / norms[:, None]

        range_m = sphere_trace(dataset.scene, T[:3, 3], directions)

        # Depth is range / |ray| for a ray whose camera z component is 1.
        np.testing.assert_allclose(view.depth_m[rows, cols], range_m / norms, atol=1e-4)


def test_objects_visible_normals_facing() -> None:
    dataset = SyntheticDataset.room(n_frames=24, camera=SMALL)
    seen: set[int] = set()

    for index in range(24):
        view = dataset.render(index)
        seen |= set(np.unique(view.surface_id).tolist())
        normals = view.normal_world.reshape(-1, 3)
        np.testing.assert_allclose(np.linalg.norm(normals, axis=1), 1.0, atol=1e-5)
        points = world_points(SMALL, view.depth_m, dataset.T_world_camera[index])
        rays = points - dataset.T_world_camera[index][:3, 3]
        assert np.all(np.einsum("ij,ij->i", rays, normals) < 0)

    scene = dataset.scene
    boxes_seen = {(s - 6) // 6 for s in seen if 6 <= s < 6 + 6 * len(scene.boxes)}
    assert boxes_seen == set(range(len(scene.boxes)))
    assert 6 + 6 * len(scene.boxes) in seen  # the sphere


def test_sphere_normals_are_radial() -> None:
    scene = SyntheticScene((-5, -5, -5), (5, 5, 5), spheres=(Sphere((0.0, 0.0, 2.0), 0.5),))
    T = look_at(np.zeros(3), np.array([0.0, 0.0, 1.0]))

    view = scene.render(SMALL, T)

    on_sphere = view.surface_id == 6
    points = world_points(SMALL, np.where(on_sphere, view.depth_m, np.nan), T)
    expected = (points - [0.0, 0.0, 2.0]) / 0.5
    np.testing.assert_allclose(view.normal_world[on_sphere], expected, atol=1e-4)


def test_distance_to_surface_reference_values() -> None:
    scene = SyntheticScene(
        (0, 0, 0), (4, 4, 4), boxes=(Box((1, 1, 0), (2, 2, 1)),), spheres=(Sphere((3, 3, 3), 0.5),)
    )
    points = np.array([[0.5, 3.0, 2.0], [1.5, 1.5, 1.5], [1.5, 1.5, 0.5], [3.0, 3.0, 3.0], [3.0, 3.0, 2.0]])

    # Wall x = 0 at 0.5; box top at 0.5; inside the box 0.5 from the top, bottom and sides;
    # the sphere centre is 0.5 from its surface; (3, 3, 2) is 0.5 below the sphere.
    np.testing.assert_allclose(scene.distance_to_surface(points), [0.5, 0.5, 0.5, 0.5, 0.5], atol=1e-12)


def test_texture_gives_intensity_structure() -> None:
    frame = SyntheticDataset.room(n_frames=4)[1]

    gray = frame.image.astype(np.float64).mean(axis=2)
    # Edges and gradients a superpixel method can follow: many distinct levels, strong contrast.
    assert gray.std() > 20
    assert len(np.unique(np.round(gray))) > 100


def test_noise_std_at_two_metres_matches_the_model() -> None:
    # A wall 2 m straight ahead fills the image.
    scene = SyntheticScene((-10, -10, -2), (10, 10, 30))
    T = look_at(np.zeros(3), np.array([1.0, 0.0, 0.0]))
    T[:3, 3] = [8.0, 0.0, 0.0]
    noise = KinectNoise(dropout_probability=0.0)
    dataset = SyntheticDataset(scene, T[None], camera=SMALL, noise=noise, seed=5)

    exact = dataset.render(0).depth_m
    noisy = dataset[0].depth_raw

    np.testing.assert_allclose(exact, 2.0, atol=1e-6)
    sigma_model = 0.0012 + 0.0019 * (2.0 - 0.4) ** 2  # 6.06 mm
    measured = np.std(noisy - exact)
    assert abs(measured - sigma_model) < 0.2 * sigma_model
    # Quantized to whole millimetres.
    np.testing.assert_allclose(noisy * 1000, np.round(noisy * 1000), atol=1e-3)


def test_dropouts_and_seeded_noise() -> None:
    noise = KinectNoise(dropout_probability=0.05)
    dataset = SyntheticDataset.room(n_frames=4, camera=SMALL, noise=noise, seed=1)

    first, again = dataset[2].depth_raw, dataset[2].depth_raw
    other_seed = SyntheticDataset.room(n_frames=4, camera=SMALL, noise=KinectNoise(), seed=2)[2].depth_raw

    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(np.nan_to_num(first), np.nan_to_num(other_seed))
    assert 0.03 < np.isnan(first).mean() < 0.07
    # Dropouts decode to "no depth" like any invalid value.
    assert np.isnan(decode_depth(first, 1.0, 0.1, 10.0)).sum() == np.isnan(first).sum()


def test_frames_follow_the_dataset_interface() -> None:
    dataset = SyntheticDataset.room(n_frames=5, camera=SMALL)

    frame = dataset[-1]

    assert len(dataset) == 5
    assert frame.index == 4
    assert frame.stamp_ns == round(4e9 / 30)
    assert frame.depth_raw.dtype == np.float32
    assert frame.depth_scale == 1.0
    assert frame.image.shape == (120, 160, 3)
    assert frame.image.dtype == np.uint8
    assert frame.camera == SMALL
    np.testing.assert_array_equal(frame.T_world_camera, dataset.T_world_camera[4])
    assert [f.index for f in dataset] == list(range(5))
    with pytest.raises(IndexError, match=r"frame index 5 out of range for a dataset of 5 frames"):
        dataset[5]


def test_render_range_limits_depth() -> None:
    dataset = SyntheticDataset.corridor(n_frames=30, camera=SMALL_CAMERA.scaled(80, 60))
    exact = dataset.render(0).depth_m

    limited = SyntheticDataset(dataset.scene, dataset.T_world_camera, dataset.camera, max_depth_m=5.0)
    depth_m = limited.render(0).depth_m

    np.testing.assert_array_equal(np.isnan(depth_m), ~(exact <= 5.0))
    np.testing.assert_allclose(depth_m[exact <= 5.0], exact[exact <= 5.0])


def test_room_trajectory_is_smooth() -> None:
    poses = SyntheticDataset.room(n_frames=300, camera=SMALL).T_world_camera

    steps = np.linalg.norm(np.diff(poses[:, :3, 3], axis=0), axis=1)
    # One loop of about 7 m in 300 frames: about 2.4 cm per frame, never a jump.
    assert steps.max() < 0.05


def test_long_corridor_keeps_growing() -> None:
    camera = SMALL_CAMERA.scaled(80, 60)
    dataset = SyntheticDataset.corridor(n_frames=2000, camera=camera)
    tenth = len(dataset) // 10

    # Count the 0.25 m cells of surface seen within 10 m, every 10th frame.
    cells: set[tuple[int, int, int]] = set()
    cells_at_tenth = 0
    for index in range(0, len(dataset), 10):
        frame = dataset[index]
        depth_m = np.where(frame.depth_raw <= 10.0, frame.depth_raw, np.nan)
        points = world_points(camera, depth_m, frame.T_world_camera)
        cells.update(map(tuple, np.floor(points / 0.25).astype(int).tolist()))
        if index < tenth:
            cells_at_tenth = len(cells)

    assert len(dataset) == 2000
    assert len(cells) >= 5 * cells_at_tenth


def test_invalid_inputs_raise() -> None:
    scene = make_room()
    with pytest.raises(ValueError, match=r"camera centre \[7.0, 1.0, 1.0\] m is outside the room"):
        scene.render(SMALL, look_at(np.array([7.0, 1.0, 1.0]), np.array([1.0, 0.0, 0.0])))
    with pytest.raises(ValueError, match=r"inside an object"):
        scene.render(SMALL, look_at(np.array([1.2, 4.0, 1.4]), np.array([1.0, 0.0, 0.0])))
    with pytest.raises(ValueError, match=r"invalid points_world shape \(3,\)"):
        scene.distance_to_surface(np.zeros(3))
    with pytest.raises(ValueError, match=r"invalid box corners"):
        Box((0, 0, 0), (1, -1, 1))
    with pytest.raises(ValueError, match=r"invalid sphere radius_m=0"):
        Sphere((0, 0, 0), 0)
    with pytest.raises(ValueError, match=r"invalid trajectory shape \(4, 4\)"):
        SyntheticDataset(scene, np.eye(4))
    with pytest.raises(ValueError, match=r"invalid max_depth_m=0"):
        scene.render(SMALL, look_at(np.array([3.0, 2.5, 1.5]), np.array([1.0, 0.0, 0.0])), max_depth_m=0)
    with pytest.raises(ValueError, match=r"invalid n_frames=0"):
        SyntheticDataset.room(n_frames=0)
