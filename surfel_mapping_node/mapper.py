"""The surfel mapper: composes superpixels, surfel extraction, fusion and keyframes.

STUB: the interface below is fixed; the implementation is being written.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.config import MapperConfig


@dataclass
class FrameStats:
    """What one call to SurfelMapper.integrate did."""

    # Stage name -> milliseconds, in pipeline order (e.g. "superpixels", "surfels", "fusion").
    stages_ms: dict[str, float] = field(default_factory=dict)
    surfels_total: int = 0
    surfels_fused: int = 0
    surfels_created: int = 0
    surfels_removed: int = 0
    keyframe_id: int | None = None
    is_new_keyframe: bool = False
    skipped_reason: str | None = None


@dataclass
class SurfelCloud:
    """A snapshot of the map as plain arrays in the world frame (for PLY, RViz, tests)."""

    position_m: np.ndarray  # (N, 3) float32, world frame
    normal: np.ndarray  # (N, 3) float32, unit
    color_rgb: np.ndarray  # (N, 3) uint8
    radius_m: np.ndarray  # (N,) float32
    confidence: np.ndarray  # (N,) float32, the fused weight
    keyframe_id: np.ndarray  # (N,) int64, owning keyframe


class SurfelMapper:
    """Incremental surfel map of one camera. No I/O, no ROS."""

    def __init__(self, config: MapperConfig, camera: PinholeCamera) -> None:
        self.config = config
        self.camera = camera

    def integrate(
        self,
        image: np.ndarray,
        depth_m: np.ndarray,
        T_world_camera: np.ndarray,
        stamp_ns: int,
        keyframe_id: int | None = None,
    ) -> FrameStats:
        """Fuse one frame.

        image: (H, W) uint8 intensity or (H, W, 3) uint8 RGB, registered with depth_m.
        depth_m: (H, W) float32 metres, NaN where there is no depth (see depth.py).
        T_world_camera: 4×4 camera-to-world pose.
        keyframe_id: set when the pose source marks this frame as a keyframe (its id,
            e.g. the stamp in ns); None lets the mapper decide by motion thresholds.
        """
        raise NotImplementedError

    def update_keyframe_poses(self, T_world_keyframe_by_id: dict[int, np.ndarray]) -> int:
        """Apply corrected keyframe poses (loop closure); return how many keyframes moved."""
        raise NotImplementedError

    def cloud(self) -> SurfelCloud:
        """Return the whole map."""
        raise NotImplementedError
