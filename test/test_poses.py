"""Pose conventions: validation, inversion, quaternions and rotation projection."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from surfel_mapping_node.poses import (
    InvalidPoseError,
    check_pose,
    invert,
    matrix_to_quaternion,
    nearest_rigid,
    pose_from_translation_quaternion,
    quaternion_to_matrix,
    relative_motion,
    transform_points,
)


def random_pose(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    T = np.eye(4)
    T[:3, :3] = Rotation.random(random_state=seed).as_matrix()
    T[:3, 3] = rng.uniform(-5, 5, 3)
    return T


def test_check_pose_accepts_3x4():
    T = check_pose(random_pose(0)[:3])

    assert T.shape == (4, 4)
    np.testing.assert_array_equal(T[3], [0, 0, 0, 1])


@pytest.mark.parametrize(
    ("T", "message"),
    [
        (np.full((4, 4), np.nan), "NaN or infinite"),
        (np.diag([2.0, 1.0, 1.0, 1.0]), "not orthonormal"),
        (np.diag([1.0, 1.0, -1.0, 1.0]), "det = -1.000"),
        (np.eye(3), r"shape \(3, 3\)"),
    ],
)
def test_check_pose_rejects_invalid(T, message):
    with pytest.raises(InvalidPoseError, match=message):
        check_pose(T, "camera pose")


def test_invert_matches_general_inverse():
    T = random_pose(1)

    np.testing.assert_allclose(invert(T), np.linalg.inv(T), atol=1e-12)
    np.testing.assert_allclose(invert(T) @ T, np.eye(4), atol=1e-12)


def test_transform_points_applies_rotation_then_translation():
    T = random_pose(2)
    points = np.random.default_rng(2).normal(size=(5, 3))

    expected = (T @ np.c_[points, np.ones(5)].T).T[:, :3]

    np.testing.assert_allclose(transform_points(T, points), expected, atol=1e-12)


def test_quaternion_round_trip_uses_xyzw():
    R = Rotation.from_euler("xyz", [10, -20, 30], degrees=True)
    x, y, z, w = R.as_quat()

    np.testing.assert_allclose(quaternion_to_matrix(x, y, z, w), R.as_matrix(), atol=1e-12)
    q = matrix_to_quaternion(R.as_matrix())
    assert q[3] >= 0
    np.testing.assert_allclose(np.abs(q @ R.as_quat()), 1.0, atol=1e-12)


def test_quaternion_is_normalized_and_zero_rejected():
    np.testing.assert_allclose(quaternion_to_matrix(0, 0, 0, 2.0), np.eye(3))
    with pytest.raises(InvalidPoseError, match="invalid quaternion"):
        quaternion_to_matrix(0, 0, 0, 0)


def test_pose_from_translation_quaternion():
    T = pose_from_translation_quaternion(
        np.array([1.0, 2.0, 3.0]), np.array([0, 0, np.sin(0.5), np.cos(0.5)])
    )

    np.testing.assert_allclose(T[:3, 3], [1, 2, 3])
    np.testing.assert_allclose(T[:3, :3], Rotation.from_rotvec([0, 0, 1.0]).as_matrix(), atol=1e-12)


def test_nearest_rigid_projects_rotation():
    T = random_pose(3)
    noisy = T.copy()
    noisy[:3, :3] += np.random.default_rng(3).normal(scale=1e-4, size=(3, 3))

    projected = nearest_rigid(noisy)

    np.testing.assert_allclose(projected[:3, :3] @ projected[:3, :3].T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(projected[:3, :3], T[:3, :3], atol=1e-3)
    np.testing.assert_array_equal(projected[:3, 3], T[:3, 3])


def test_relative_motion_reports_metres_and_radians():
    a = np.eye(4)
    b = np.eye(4)
    b[:3, :3] = Rotation.from_rotvec([0, 0.3, 0]).as_matrix()
    b[:3, 3] = [3.0, 4.0, 0.0]

    translation_m, angle_rad = relative_motion(a, b)

    assert translation_m == pytest.approx(5.0)
    assert angle_rad == pytest.approx(0.3)
