"""Pinhole camera model, the one place where intrinsics are parsed and applied.

Pixel coordinates follow OpenCV: u to the right, v down, pixel centres at integer
coordinates. Camera (optical) frames are z forward, x right, y down (REP 103).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PinholeCamera:
    """Intrinsics of an undistorted (or rectified) pinhole camera.

    ``fy`` may be negative, as in ICL-NUIM, where the image v axis points up.
    """

    width: int
    height: int
    fx: float
    fy: float
    cx: float
    cy: float

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"invalid camera size {self.width}x{self.height}: width and height must be > 0")
        for name in ("fx", "fy", "cx", "cy"):
            value = getattr(self, name)
            if not np.isfinite(value):
                raise ValueError(f"invalid camera intrinsic {name}={value}: it must be finite")
        if self.fx <= 0:
            raise ValueError(f"invalid camera intrinsic fx={self.fx}: it must be > 0")
        if self.fy == 0:
            raise ValueError("invalid camera intrinsic fy=0: it must be non-zero")

    @classmethod
    def from_K(cls, K: np.ndarray | Sequence[Sequence[float]], width: int, height: int) -> PinholeCamera:
        """Build a camera from a 3×3 intrinsic matrix K."""
        K = np.asarray(K, dtype=np.float64)
        if K.shape != (3, 3):
            raise ValueError(f"invalid intrinsic matrix shape {K.shape}: expected (3, 3)")
        return cls(int(width), int(height), float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))

    @classmethod
    def from_P(cls, P: np.ndarray | Sequence[float], width: int, height: int) -> PinholeCamera:
        """Build a camera from a 3×4 projection matrix of a rectified camera (KITTI's P0…P3)."""
        P = np.asarray(P, dtype=np.float64).reshape(-1)
        if P.size != 12:
            raise ValueError(f"invalid projection matrix with {P.size} values: expected 12 (3x4)")
        return cls.from_K(P.reshape(3, 4)[:, :3], width, height)

    @classmethod
    def from_camera_info(
        cls, width: int, height: int, k: Sequence[float], p: Sequence[float] | None = None
    ) -> PinholeCamera:
        """Build a camera from sensor_msgs/CameraInfo fields.

        For rectified images the projection matrix ``p`` is the right one (REP 104);
        it is used when it is given and non-zero, otherwise ``k``.
        """
        if p is not None and np.any(np.asarray(p, dtype=np.float64)):
            return cls.from_P(p, width, height)
        return cls.from_K(np.asarray(k, dtype=np.float64).reshape(3, 3), width, height)

    @property
    def K(self) -> np.ndarray:
        """The 3×3 intrinsic matrix."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape as (height, width), the numpy order."""
        return (self.height, self.width)

    def scaled(self, width: int, height: int) -> PinholeCamera:
        """Return the camera for the same view resampled to width × height pixels."""
        sx = width / self.width
        sy = height / self.height
        # Pixel centres stay pixel centres: c' = (c + 0.5)·s − 0.5.
        return PinholeCamera(
            width, height, self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5
        )

    def resample_image(self, image: np.ndarray) -> np.ndarray:
        """Return IMAGE resampled to this camera's size (area averaging), or IMAGE when it fits.

        For an image of the same view at another resolution, such as a camera image
        paired with a depth network's smaller output and the camera scaled to it.
        """
        if image.shape[:2] == self.shape:
            return image
        import cv2

        return cv2.resize(image, (self.width, self.height), interpolation=cv2.INTER_AREA)

    def check_image_shape(self, shape: tuple[int, ...], what: str = "image") -> None:
        """Raise ValueError when an image's (height, width) differs from the camera's."""
        if tuple(shape[:2]) != self.shape:
            raise ValueError(
                f"{what} size {shape[1]}x{shape[0]} does not match the camera size "
                f"{self.width}x{self.height}: register the {what} to the camera or fix the intrinsics"
            )

    def backproject(self, u: np.ndarray, v: np.ndarray, depth_m: np.ndarray) -> np.ndarray:
        """Return points (N, 3) in the camera frame for pixels (u, v) at depth ``depth_m``."""
        x = (np.asarray(u, dtype=np.float64) - self.cx) / self.fx * depth_m
        y = (np.asarray(v, dtype=np.float64) - self.cy) / self.fy * depth_m
        return np.stack([x, y, np.asarray(depth_m, dtype=np.float64)], axis=-1)

    def project(self, points_camera: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Project points (N, 3) in the camera frame; return (u, v, z) arrays.

        Points with z <= 0 get u = v = NaN.
        """
        points_camera = np.asarray(points_camera)
        z = points_camera[..., 2]
        with np.errstate(divide="ignore", invalid="ignore"):
            inv_z = np.where(z > 0, 1.0 / z, np.nan)
        u = self.fx * points_camera[..., 0] * inv_z + self.cx
        v = self.fy * points_camera[..., 1] * inv_z + self.cy
        return u, v, z

    def to_dict(self) -> dict[str, float | int]:
        """Return the intrinsics as a plain dict (the config file's ``camera:`` section)."""
        return {
            "width": self.width,
            "height": self.height,
            "fx": self.fx,
            "fy": self.fy,
            "cx": self.cx,
            "cy": self.cy,
        }
