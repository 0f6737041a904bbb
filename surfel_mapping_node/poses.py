"""Pose conventions: 4×4 homogeneous rigid transforms named for their frames.

``T_a_b`` maps points from frame b into frame a (``p_a = T_a_b @ p_b``), so
``T_world_camera`` is the camera-to-world pose that SLAM systems report.
Quaternions are (x, y, z, w), the ROS order.
"""

from __future__ import annotations

import numpy as np

ORTHONORMAL_TOLERANCE = 1e-3


class InvalidPoseError(ValueError):
    """A pose that is not a finite rigid transform."""


def check_pose(T: np.ndarray, name: str = "pose") -> np.ndarray:
    """Return T as a float64 4×4 array, or raise InvalidPoseError naming what is wrong.

    A valid pose is finite, has an orthonormal rotation with determinant +1 (within
    ``ORTHONORMAL_TOLERANCE``) and a last row of (0, 0, 0, 1).
    """
    T = np.asarray(T, dtype=np.float64)
    if T.shape == (3, 4):
        T = np.vstack([T, [0.0, 0.0, 0.0, 1.0]])
    if T.shape != (4, 4):
        raise InvalidPoseError(f"invalid {name}: shape {T.shape}, expected (4, 4) or (3, 4)")
    if not np.all(np.isfinite(T)):
        raise InvalidPoseError(f"invalid {name}: it contains NaN or infinite values")
    R = T[:3, :3]
    error = np.abs(R @ R.T - np.eye(3)).max()
    if error > ORTHONORMAL_TOLERANCE or np.linalg.det(R) < 0:
        raise InvalidPoseError(
            f"invalid {name}: rotation is not orthonormal (max |R·Rᵀ − I| = {error:.2g}, "
            f"det = {np.linalg.det(R):.3f}); re-orthonormalize it or check the pose source"
        )
    if np.abs(T[3] - [0.0, 0.0, 0.0, 1.0]).max() > 1e-9:
        raise InvalidPoseError(f"invalid {name}: last row is {T[3].tolist()}, expected [0, 0, 0, 1]")
    return T


def nearest_rigid(T: np.ndarray) -> np.ndarray:
    """Return T with its rotation replaced by the nearest rotation matrix (SVD projection).

    Ground-truth poses stored as text (7-Scenes, KITTI) are orthonormal only to about
    1e-4; projecting them once makes a pose survive a round trip through a quaternion
    (a ROS message or a bag) unchanged.
    """
    U, _, Vt = np.linalg.svd(T[:3, :3])
    R = U @ Vt
    if np.linalg.det(R) < 0:
        R = U @ np.diag([1.0, 1.0, -1.0]) @ Vt
    result = np.array(T, dtype=np.float64, copy=True)
    result[:3, :3] = R
    return result


def invert(T: np.ndarray) -> np.ndarray:
    """Return the inverse of a rigid transform (exact, no general matrix inverse)."""
    R = T[:3, :3]
    result = np.eye(4)
    result[:3, :3] = R.T
    result[:3, 3] = -R.T @ T[:3, 3]
    return result


def transform_points(T: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply T (4×4) to points (N, 3)."""
    return points @ T[:3, :3].T + T[:3, 3]


def quaternion_to_matrix(x: float, y: float, z: float, w: float) -> np.ndarray:
    """Return the 3×3 rotation of a unit quaternion (x, y, z, w); it is normalized first."""
    q = np.array([x, y, z, w], dtype=np.float64)
    norm = np.linalg.norm(q)
    if not np.isfinite(norm) or norm < 1e-9:
        raise InvalidPoseError(f"invalid quaternion {q.tolist()}: it must be finite and non-zero")
    x, y, z, w = q / norm
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quaternion(R: np.ndarray) -> np.ndarray:
    """Return the unit quaternion (x, y, z, w) of a 3×3 rotation, with w >= 0."""
    from scipy.spatial.transform import Rotation

    q = Rotation.from_matrix(R).as_quat()
    return q if q[3] >= 0 else -q


def pose_from_translation_quaternion(translation: np.ndarray, quaternion_xyzw: np.ndarray) -> np.ndarray:
    """Return the 4×4 pose of a translation (3,) and a quaternion (x, y, z, w)."""
    T = np.eye(4)
    T[:3, :3] = quaternion_to_matrix(*quaternion_xyzw)
    T[:3, 3] = translation
    return check_pose(T)


def relative_motion(T_a: np.ndarray, T_b: np.ndarray) -> tuple[float, float]:
    """Return (translation in metres, rotation angle in radians) between two poses."""
    delta = invert(T_a) @ T_b
    translation_m = float(np.linalg.norm(delta[:3, 3]))
    cos_angle = np.clip((np.trace(delta[:3, :3]) - 1.0) / 2.0, -1.0, 1.0)
    return translation_m, float(np.arccos(cos_angle))
