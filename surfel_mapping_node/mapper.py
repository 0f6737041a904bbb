"""The surfel mapper: composes superpixels, surfel extraction, fusion and keyframes.

Per frame (after Wang, Gao and Shen, "Real-time Scalable Dense Surfel Mapping",
ICRA 2019): pick the frame's keyframe, activate the surfels of the local map around
it, segment the frame into superpixels, turn them into candidate surfels, and fuse
those into the active surfels. On loop closure, each keyframe whose pose changed
moves its surfels rigidly by T_new·T_old⁻¹.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import cv2
import numpy as np

from surfel_mapping_node import superpixels, surfel_extraction
from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.config import MapperConfig
from surfel_mapping_node.fusion import FrameContext, fuse_frame, remove_stale_surfels
from surfel_mapping_node.keyframes import KeyframeGraph, PoseCorrection
from surfel_mapping_node.poses import InvalidPoseError, check_pose
from surfel_mapping_node.surfel_map import SurfelBlock, SurfelMap

logger = logging.getLogger(__name__)

# Skipped-frame warnings after the first few are logged once per this many.
_SKIP_LOG_EVERY = 100
_SKIP_LOG_FIRST = 5


@dataclass
class FrameStats:
    """Timing and counts of one SurfelMapper.integrate call."""

    # Stage name -> milliseconds, in pipeline order: "keyframes", "superpixels",
    # "surfels", "fusion" (stages that did not run are absent).
    stages_ms: dict[str, float] = field(default_factory=dict)
    surfels_total: int = 0
    surfels_fused: int = 0
    surfels_created: int = 0
    surfels_removed: int = 0
    keyframe_id: int | None = None
    is_new_keyframe: bool = False
    skipped_reason: str | None = None
    # Surfels of the local map that fusion examined, and those that projected into view.
    surfels_considered: int = 0
    surfels_in_view: int = 0
    # Keyframes in the local map.
    local_map_keyframes: int = 0


@dataclass
class SurfelCloud:
    """A snapshot of the map as plain arrays in the world frame (for PLY, RViz, tests)."""

    position_m: np.ndarray  # (N, 3) float32, world frame
    normal: np.ndarray  # (N, 3) float32, unit
    color_rgb: np.ndarray  # (N, 3) uint8
    radius_m: np.ndarray  # (N,) float32
    confidence: np.ndarray  # (N,) float32, the fused weight
    keyframe_id: np.ndarray  # (N,) int64, owning keyframe

    @classmethod
    def from_block(cls, block: SurfelBlock) -> SurfelCloud:
        return cls(
            position_m=block.position_m.copy(),
            normal=block.normal.copy(),
            color_rgb=block.color_rgb.copy(),
            radius_m=block.radius_m.copy(),
            confidence=block.weight.copy(),
            keyframe_id=block.keyframe_id.copy(),
        )

    def __len__(self) -> int:
        return len(self.position_m)


class SurfelMapper:
    """Incremental surfel map of one camera. No I/O, no ROS.

    Not thread-safe: call integrate() and the pose updates from one thread.

    Args:
        config: all tunables; it is validated here.
        camera: intrinsics of the images passed to integrate().

    Raises:
        ConfigError: an invalid value in config.
    """

    def __init__(self, config: MapperConfig, camera: PinholeCamera) -> None:
        self.config = config.validate()
        self.camera = camera
        self.keyframes = KeyframeGraph(config.keyframes)
        self.surfel_map = SurfelMap()
        self.frames_integrated = 0
        self.frames_skipped = 0
        self._local_map_key: tuple[int | None, int] | None = None
        self._local_map: list[int] = []

    def integrate(
        self,
        image: np.ndarray,
        depth_m: np.ndarray,
        T_world_camera: np.ndarray,
        stamp_ns: int,
        keyframe_id: int | None = None,
    ) -> FrameStats:
        """Fuse one frame.

        A frame with an invalid pose (NaN, or a rotation that is not orthonormal) is
        skipped with a logged warning and ``FrameStats.skipped_reason``. A frame
        without any valid depth makes no surfels and changes no surfel.

        Args:
            image: (H, W) uint8 intensity or (H, W, 3) uint8 RGB, registered with depth_m.
            depth_m: (H, W) float32 metres, NaN where there is no depth (zero, negative
                and infinite values count as no depth too).
            T_world_camera: 4×4 camera-to-world pose.
            stamp_ns: frame time in ns.
            keyframe_id: set when the pose source marks this frame as a keyframe (its
                id, e.g. the stamp in ns); None lets the mapper decide by motion thresholds.

        Raises:
            ValueError: image and depth_m differ in size, they differ from the camera
                size, or the image is not (H, W) or (H, W, 3) uint8.
        """
        image, depth_m = self._check_images(image, depth_m)
        try:
            T_world_camera = check_pose(T_world_camera, name="T_world_camera")
        except InvalidPoseError as error:
            return self._skip(f"{error}", stamp_ns)

        # Keyframe of this frame, and the surfels of its local map made active.
        stats = self._select_keyframe(T_world_camera, stamp_ns, keyframe_id)

        if not np.isfinite(depth_m).any():
            stats.surfels_total = len(self.surfel_map)
            stats.surfels_considered = self.surfel_map.active_count
            self.frames_integrated += 1
            return stats

        # Superpixels on intensity and inverse depth.
        start = time.perf_counter()
        frame_superpixels = superpixels.compute_superpixels(
            _intensity(image), depth_m, self.config.superpixels
        )
        stats.stages_ms["superpixels"] = _elapsed_ms(start)

        # One candidate surfel per valid superpixel, in the camera frame.
        start = time.perf_counter()
        frame_surfels = surfel_extraction.extract_surfels(
            frame_superpixels, image, depth_m, self.camera, self.config.surfels
        )
        stats.stages_ms["surfels"] = _elapsed_ms(start)

        # Fusion into the local map.
        start = time.perf_counter()
        self._fuse(frame_surfels, depth_m, T_world_camera, stamp_ns, stats)
        stats.stages_ms["fusion"] = _elapsed_ms(start)
        return stats

    def integrate_surfels(
        self,
        frame_surfels: surfel_extraction.FrameSurfels,
        depth_m: np.ndarray,
        T_world_camera: np.ndarray,
        stamp_ns: int,
        keyframe_id: int | None = None,
    ) -> FrameStats:
        """Fuse a frame whose candidate surfels are already extracted.

        The same as integrate() after the superpixel and surfel stages, for callers
        that extract surfels themselves (and for tests). Arguments as in integrate();
        frame_surfels are in the frame's camera frame.

        Raises:
            ValueError: depth_m or frame_surfels.labels differ from the camera size.
        """
        self.camera.check_image_shape(np.shape(depth_m), "depth image")
        depth_m = _depth_with_nan(depth_m)
        try:
            T_world_camera = check_pose(T_world_camera, name="T_world_camera")
        except InvalidPoseError as error:
            return self._skip(f"{error}", stamp_ns)
        stats = self._select_keyframe(T_world_camera, stamp_ns, keyframe_id)

        start = time.perf_counter()
        self._fuse(frame_surfels, depth_m, T_world_camera, stamp_ns, stats)
        stats.stages_ms["fusion"] = _elapsed_ms(start)
        return stats

    def _select_keyframe(
        self, T_world_camera: np.ndarray, stamp_ns: int, keyframe_id: int | None
    ) -> FrameStats:
        start = time.perf_counter()
        decision = self.keyframes.select(T_world_camera, stamp_ns, keyframe_id)
        removed = self._activate_local_map()
        stats = FrameStats(keyframe_id=decision.keyframe_id, is_new_keyframe=decision.is_new)
        stats.surfels_removed = removed
        stats.local_map_keyframes = len(self._local_map)
        stats.stages_ms["keyframes"] = _elapsed_ms(start)
        return stats

    def _fuse(
        self,
        frame_surfels: surfel_extraction.FrameSurfels,
        depth_m: np.ndarray,
        T_world_camera: np.ndarray,
        stamp_ns: int,
        stats: FrameStats,
    ) -> None:
        frame = FrameContext(
            T_world_camera=T_world_camera,
            camera=self.camera,
            keyframe_id=stats.keyframe_id,
            keyframe_count=self.keyframes.count,
            stamp_ns=int(stamp_ns),
        )
        result = fuse_frame(self.surfel_map, frame_surfels, depth_m, frame, self.config.fusion)

        # Keyframes whose surfels this frame saw again are covisible: link them.
        for other_id in result.covisible_keyframe_ids:
            if other_id in self.keyframes:
                self.keyframes.link(stats.keyframe_id, other_id)

        stats.surfels_fused = result.surfels_fused
        stats.surfels_created = result.surfels_created
        stats.surfels_removed += result.surfels_removed
        stats.surfels_considered = result.surfels_considered
        stats.surfels_in_view = result.surfels_in_view
        stats.surfels_total = len(self.surfel_map)
        self.frames_integrated += 1

    def _activate_local_map(self) -> int:
        """Recompute the local map when the current keyframe or the graph changed, and activate it.

        Returns:
            The number of outliers removed before parking.
        """
        key = (self.keyframes.current_id, self.keyframes.version)
        if key == self._local_map_key:
            return 0
        local_map = self.keyframes.local_map()
        leaving = self.surfel_map.active_keyframe_ids.difference(local_map)
        removed = 0
        if leaving:
            # Judge outliers before parking, because parked surfels are never fused again
            # until their keyframe returns.
            # NOTE: surfels too young to be judged (last updated stale_keyframes or fewer
            # keyframes ago) are parked as they are, outliers included.
            removed = remove_stale_surfels(self.surfel_map, self.keyframes.count, self.config.fusion)
        self.surfel_map.activate(local_map)
        self._local_map = local_map
        self._local_map_key = key
        return removed

    def _check_images(self, image: np.ndarray, depth_m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        image = np.asarray(image)
        depth_m = np.asarray(depth_m)
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
            raise ValueError(f"invalid image shape {image.shape}: expected (H, W) intensity or (H, W, 3) RGB")
        if image.dtype != np.uint8:
            raise ValueError(
                f"invalid image dtype {image.dtype}: expected uint8 (scale 16-bit or float images to 0-255)"
            )
        if depth_m.ndim != 2:
            raise ValueError(f"invalid depth shape {depth_m.shape}: expected (H, W) metres")
        if image.shape[:2] != depth_m.shape:
            raise ValueError(
                f"image size {image.shape[1]}x{image.shape[0]} does not match depth size "
                f"{depth_m.shape[1]}x{depth_m.shape[0]}: pass a depth image registered to the image"
            )
        self.camera.check_image_shape(image.shape, "image")
        return image, _depth_with_nan(depth_m)

    def _skip(self, reason: str, stamp_ns: int) -> FrameStats:
        self.frames_skipped += 1
        if self.frames_skipped <= _SKIP_LOG_FIRST or self.frames_skipped % _SKIP_LOG_EVERY == 0:
            logger.warning("frame %d skipped (%d skipped so far): %s", stamp_ns, self.frames_skipped, reason)
        return FrameStats(skipped_reason=reason, surfels_total=len(self.surfel_map))

    def update_keyframe_poses(self, T_world_keyframe_by_id: dict[int, np.ndarray]) -> int:
        """Apply corrected keyframe poses (loop closure); return how many keyframes moved.

        Unknown ids are logged and ignored. apply_keyframe_poses() also returns them.

        Raises:
            InvalidPoseError: a pose is not a finite rigid transform; nothing is applied.
        """
        return len(self.apply_keyframe_poses(T_world_keyframe_by_id).T_correction_by_id)

    def apply_keyframe_poses(self, T_world_keyframe_by_id: dict[int, np.ndarray]) -> PoseCorrection:
        """Apply corrected keyframe poses and move each moved keyframe's surfels by T_new·T_old⁻¹.

        Args:
            T_world_keyframe_by_id: keyframe id -> corrected 4×4 camera-to-world pose.

        Returns:
            The correction of every keyframe that moved, and the unknown ids.

        Raises:
            InvalidPoseError: a pose is not a finite rigid transform; nothing is applied.
        """
        correction = self.keyframes.update_poses(T_world_keyframe_by_id)
        moved_surfels = self.surfel_map.apply_corrections(correction.T_correction_by_id)
        logger.info(
            "pose update moved %d keyframe(s) and %d surfel(s); %d unknown id(s)",
            len(correction.T_correction_by_id),
            moved_surfels,
            len(correction.unknown_ids),
        )
        return correction

    def cloud(self) -> SurfelCloud:
        """Return the whole map."""
        return SurfelCloud.from_block(self.surfel_map.gather_all())

    def local_cloud(self) -> SurfelCloud:
        """Return the surfels of the current local map."""
        return SurfelCloud.from_block(self.surfel_map.gather_active())

    def memory_bytes(self) -> int:
        """Return the bytes held by the surfel arrays, spare capacity included."""
        return self.surfel_map.memory_bytes()


def _intensity(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)


def _depth_with_nan(depth_m: np.ndarray) -> np.ndarray:
    """Return depth as float32 with NaN for every value that is not a positive finite depth."""
    depth_m = np.asarray(depth_m, dtype=np.float32)
    # NaN already means no depth, so only zero, negative and infinite values need
    # replacing, and the usual input with NaN holes is returned without a copy.
    needs_nan = (depth_m <= 0) | np.isinf(depth_m)
    if needs_nan.any():
        depth_m = np.where(needs_nan, np.float32(np.nan), depth_m)
    return depth_m


def _elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def compile_kernels(config: MapperConfig) -> float:
    """Run every mapping kernel once on two small synthetic frames; return the seconds taken.

    numba compiles a kernel on its first call, or loads it from its on-disk cache
    (seconds the first time after an install, well under a second later). A live node
    calls this at start, so that the first frames of a stream do not wait for it.
    """
    start = time.perf_counter()

    # A tilted plane 1.5 m away, seen by a 64×48 camera, then again from 2 cm to the side.
    camera = PinholeCamera(fx=60.0, fy=60.0, cx=31.5, cy=23.5, width=64, height=48)
    v, u = np.mgrid[0 : camera.height, 0 : camera.width].astype(np.float32)
    depth_m = (1.5 + 0.002 * u + 0.001 * v).astype(np.float32)
    image_rgb = np.repeat(((u * 4) % 256).astype(np.uint8)[:, :, None], 3, axis=2)
    mapper = SurfelMapper(config, camera)
    for index in range(2):
        T_world_camera = np.eye(4)
        T_world_camera[0, 3] = 0.02 * index
        mapper.integrate(image_rgb, depth_m, T_world_camera, stamp_ns=index)

    return time.perf_counter() - start
