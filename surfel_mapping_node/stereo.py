"""Depth from a rectified stereo pair with OpenCV's semi-global block matcher (SGBM).

Use StereoDepthEstimator when frames come one after another (the matcher is built
once); ``stereo_depth`` is a one-shot helper. Depth conversion goes through
depth.disparity_to_depth, so invalid matches become NaN like every other depth source.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np

from surfel_mapping_node.config import StereoConfig
from surfel_mapping_node.depth import disparity_to_depth

logger = logging.getLogger(__name__)

_MODES = {
    "sgbm": cv2.STEREO_SGBM_MODE_SGBM,
    "hh": cv2.STEREO_SGBM_MODE_HH,
    "sgbm_3way": cv2.STEREO_SGBM_MODE_SGBM_3WAY,
}
# OpenCV returns disparity as fixed point with 4 fractional bits.
_DISPARITY_SCALE = 16.0


@dataclass
class StereoResult:
    """Depth and disparity of the left image of a rectified pair."""

    depth_m: np.ndarray  # (H, W) float32 metres along the optical axis, NaN = no depth
    disparity_px: np.ndarray  # (H, W) float32 pixels, NaN = no match


class StereoDepthEstimator:
    """Semi-global matching on rectified pairs, with the matcher built once.

    Args:
        config: matcher parameters (num_disparities, block_size, penalties, mode, ...).
        fx: focal length of the rectified left camera, pixels.
        baseline_m: distance between the camera centres, metres (> 0).
        min_depth_m, max_depth_m: depth outside this range becomes NaN.

    Raises:
        ValueError: for invalid matcher parameters, fx, baseline or depth range.
    """

    def __init__(
        self,
        config: StereoConfig,
        fx: float,
        baseline_m: float,
        min_depth_m: float = 0.0,
        max_depth_m: float = math.inf,
    ) -> None:
        _check_config(config)
        # Validates fx, baseline and range up front, before any image arrives.
        disparity_to_depth(np.ones((1, 1), np.float32), fx, baseline_m, min_depth_m, max_depth_m)
        self.config = config
        self.fx = float(fx)
        self.baseline_m = float(baseline_m)
        self.min_depth_m = float(min_depth_m)
        self.max_depth_m = float(max_depth_m)

        # Inputs are converted to one gray channel, so the penalties use channels = 1.
        area = config.block_size * config.block_size
        self._matcher = cv2.StereoSGBM_create(
            minDisparity=config.min_disparity,
            numDisparities=config.num_disparities,
            blockSize=config.block_size,
            P1=config.p1_factor * area,
            P2=config.p2_factor * area,
            disp12MaxDiff=config.disp12_max_diff,
            uniquenessRatio=config.uniqueness_ratio,
            speckleWindowSize=config.speckle_window_size,
            speckleRange=config.speckle_range,
            mode=_MODES[config.mode],
        )

    def disparity(self, left: np.ndarray, right: np.ndarray) -> np.ndarray:
        """Return the (H, W) float32 disparity of the left image in pixels, NaN = no match.

        Args:
            left, right: rectified images of the same size, (H, W) uint8 gray or
                (H, W, 3) uint8 RGB (converted to gray).

        Raises:
            ValueError: for mismatched sizes, a dtype other than uint8 or a bad shape.
        """
        left_gray = _to_gray(left, "left")
        right_gray = _to_gray(right, "right")
        if left_gray.shape != right_gray.shape:
            raise ValueError(
                f"stereo images differ in size: left {left_gray.shape[1]}x{left_gray.shape[0]}, "
                f"right {right_gray.shape[1]}x{right_gray.shape[0]}; pass a rectified pair of one size"
            )
        width = left_gray.shape[1]
        if width <= self.config.min_disparity + self.config.num_disparities:
            raise ValueError(
                f"image width {width} px is too small for min_disparity + num_disparities = "
                f"{self.config.min_disparity + self.config.num_disparities}: lower stereo.num_disparities"
            )

        fixed_point = self._matcher.compute(left_gray, right_gray)
        disparity_px = fixed_point.astype(np.float32) / np.float32(_DISPARITY_SCALE)
        # OpenCV marks "no match" with (min_disparity - 1), scaled.
        disparity_px[fixed_point < self.config.min_disparity * _DISPARITY_SCALE] = np.nan
        return disparity_px

    def compute(self, left: np.ndarray, right: np.ndarray) -> StereoResult:
        """Return depth and disparity of the left image of a rectified pair.

        Raises:
            ValueError: as ``disparity``.
        """
        disparity_px = self.disparity(left, right)
        depth_m = disparity_to_depth(
            disparity_px, self.fx, self.baseline_m, self.min_depth_m, self.max_depth_m
        )
        return StereoResult(depth_m=depth_m, disparity_px=disparity_px)


def stereo_depth(
    left: np.ndarray,
    right: np.ndarray,
    fx: float,
    baseline_m: float,
    config: StereoConfig | None = None,
    min_depth_m: float = 0.0,
    max_depth_m: float = math.inf,
) -> np.ndarray:
    """Return (H, W) float32 depth in metres (NaN = no depth) of one rectified pair.

    Builds a matcher per call; use StereoDepthEstimator for sequences.

    Raises:
        ValueError: as StereoDepthEstimator and StereoDepthEstimator.disparity.
    """
    estimator = StereoDepthEstimator(config or StereoConfig(), fx, baseline_m, min_depth_m, max_depth_m)
    return estimator.compute(left, right).depth_m


def _to_gray(image: np.ndarray, name: str) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(
            f"unsupported {name} image dtype {image.dtype}: expected uint8 "
            "(scale 16-bit images to 0-255 first)"
        )
    if image.ndim == 2:
        return np.ascontiguousarray(image)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
    raise ValueError(
        f"invalid {name} image shape {image.shape}: expected (H, W) gray or (H, W, 3) RGB"
    )


def _check_config(config: StereoConfig) -> None:
    if config.num_disparities <= 0 or config.num_disparities % 16:
        raise ValueError(
            f"invalid stereo.num_disparities={config.num_disparities}: use a positive multiple of 16"
        )
    if config.block_size < 1 or config.block_size % 2 == 0:
        raise ValueError(f"invalid stereo.block_size={config.block_size}: use an odd number >= 1")
    if config.mode not in _MODES:
        raise ValueError(f"invalid stereo.mode={config.mode!r}: use one of {', '.join(map(repr, _MODES))}")
    if not 0 < config.p1_factor < config.p2_factor:
        raise ValueError(
            f"invalid stereo penalties p1_factor={config.p1_factor}, p2_factor={config.p2_factor}: "
            "need 0 < p1_factor < p2_factor"
        )
