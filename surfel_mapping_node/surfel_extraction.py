"""Superpixels to candidate surfels: one plane-fitted disc per valid superpixel.

STUB: the interface below is fixed; the implementation is being written.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class FrameSurfels:
    """Candidate surfels of one frame, one row per superpixel; row i belongs to label i.

    All geometry is in the camera (optical) frame of the frame they came from.
    """

    # (H, W) int32 superpixel label of each pixel; -1 where a pixel belongs to none.
    labels: np.ndarray
    # (S,) bool: the superpixel passed the checks and makes a surfel.
    valid: np.ndarray
    # (S, 3) float32 surfel centre in the camera frame, metres.
    position_camera: np.ndarray
    # (S, 3) float32 unit normal in the camera frame, facing the camera.
    normal_camera: np.ndarray
    # (S,) float32 disc radius, metres.
    radius_m: np.ndarray
    # (S, 3) uint8 RGB color.
    color_rgb: np.ndarray
    # (S,) float32 fusion weight from the depth-noise model.
    weight: np.ndarray
    # (S,) float32 cosine between the normal and the viewing ray.
    view_cosine: np.ndarray
