"""Offline mapping of a recorded dataset: depth decoding, the mapper, and per-frame timing.

The pipeline does no file output of its own; the CLI writes the map, the timing
and the preview from the :class:`PipelineResult` it returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from surfel_mapping_node.config import MapperConfig
from surfel_mapping_node.datasets.base import Dataset, Frame
from surfel_mapping_node.depth import decode_depth
from surfel_mapping_node.mapper import FrameStats, SurfelMapper

logger = logging.getLogger(__name__)

# Stages timed outside the mapping total: stereo matching is a depth source, not
# part of the mapper, and is reported on its own.
DEPTH_SOURCE_STAGES = ("stereo_depth",)


@dataclass
class FrameTiming:
    """Timing and map size after one fused frame."""

    index: int
    stamp_ns: int
    # Depth decoding plus the mapper's stages, milliseconds (stereo matching excluded).
    total_ms: float
    stages_ms: dict[str, float]
    surfels: int
    skipped_reason: str | None = None

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "stamp": self.stamp_ns * 1e-9,
            "total_ms": round(self.total_ms, 3),
            "stages_ms": {name: round(ms, 3) for name, ms in self.stages_ms.items()},
            "surfels": self.surfels,
            **({"skipped_reason": self.skipped_reason} if self.skipped_reason else {}),
        }


@dataclass
class PipelineResult:
    """The mapper after the run and the timing of every fused frame."""

    mapper: SurfelMapper
    frames: list[FrameTiming] = field(default_factory=list)

    def summary(self) -> dict:
        """Return frame count, final surfel count and median/p90 milliseconds per stage."""
        fused = [f for f in self.frames if f.skipped_reason is None]
        stage_names: list[str] = []
        for timing in fused:
            stage_names += [name for name in timing.stages_ms if name not in stage_names]
        stages = {}
        for name in [*stage_names, "total"]:
            values = [f.total_ms if name == "total" else f.stages_ms.get(name, 0.0) for f in fused]
            if values:
                stages[name] = {
                    "median_ms": round(float(np.median(values)), 3),
                    "p90_ms": round(float(np.percentile(values, 90)), 3),
                }
        return {
            "frames": len(self.frames),
            "frames_fused": len(fused),
            "frames_skipped": len(self.frames) - len(fused),
            "surfels": self.frames[-1].surfels if self.frames else 0,
            "stages": stages,
        }

    def timing_json(self) -> dict:
        """Return the content of timing.json."""
        return {"frames": [f.to_dict() for f in self.frames], "summary": self.summary()}


def select_indices(length: int, first: int = 0, max_frames: int | None = None, stride: int = 1) -> range:
    """Return the dataset indices to fuse: from FIRST, every STRIDE-th, at most MAX_FRAMES."""
    if first < 0 or first >= max(length, 1):
        raise ValueError(f"invalid first frame {first}: the dataset has {length} frames (0..{length - 1})")
    if stride < 1:
        raise ValueError(f"invalid stride {stride}: use 1 (every frame) or more")
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"invalid max frames {max_frames}: use 1 or more")
    indices = range(first, length, stride)
    return indices if max_frames is None else indices[:max_frames]


class DepthSource:
    """Turns a Frame into depth in metres: decoding for RGB-D, semi-global matching for stereo."""

    def __init__(self, config: MapperConfig) -> None:
        self.config = config
        self._stereo = None

    def depth_m(self, frame: Frame, stages_ms: dict[str, float]) -> np.ndarray:
        """Return (H, W) float32 depth in metres (NaN = none); add the stage time to STAGES_MS."""
        depth_config = self.config.depth
        if frame.depth_raw is not None:
            start = time.perf_counter()
            scale = depth_config.depth_scale or frame.depth_scale
            depth_m = decode_depth(frame.depth_raw, scale, depth_config.min_depth_m, depth_config.max_depth_m)
            stages_ms["depth_decoding"] = (time.perf_counter() - start) * 1e3
            return depth_m

        if frame.right_image is not None and frame.baseline_m is not None:
            start = time.perf_counter()
            depth_m = self._stereo_matcher(frame).compute(frame.image, frame.right_image).depth_m
            stages_ms["stereo_depth"] = (time.perf_counter() - start) * 1e3
            return depth_m

        raise ValueError(f"frame {frame.index} has neither depth nor a right stereo image")

    def _stereo_matcher(self, frame: Frame):
        if self._stereo is None:
            from surfel_mapping_node.stereo import StereoDepthEstimator

            self._stereo = StereoDepthEstimator(
                self.config.stereo,
                fx=frame.camera.fx,
                baseline_m=float(frame.baseline_m),
                min_depth_m=self.config.depth.min_depth_m,
                max_depth_m=self.config.depth.max_depth_m,
            )
        return self._stereo


def run_pipeline(
    dataset: Dataset,
    config: MapperConfig,
    indices: range,
    on_frame: Callable[[FrameTiming], None] | None = None,
) -> PipelineResult:
    """Fuse the frames INDICES of DATASET into a new map and time every frame."""
    mapper = SurfelMapper(config, dataset.camera)
    depth_source = DepthSource(config)
    result = PipelineResult(mapper)

    for frame in _frames(dataset, indices):
        stages_ms: dict[str, float] = {}
        depth_m = depth_source.depth_m(frame, stages_ms)
        stats: FrameStats = mapper.integrate(
            frame.image, depth_m, frame.T_world_camera, frame.stamp_ns, keyframe_id=frame.keyframe_id
        )
        stages_ms.update(stats.stages_ms)

        total_ms = sum(ms for name, ms in stages_ms.items() if name not in DEPTH_SOURCE_STAGES)
        timing = FrameTiming(
            frame.index, frame.stamp_ns, total_ms, stages_ms, stats.surfels_total, stats.skipped_reason
        )
        if stats.skipped_reason:
            logger.warning("frame %d skipped: %s", frame.index, stats.skipped_reason)
        result.frames.append(timing)
        if on_frame is not None:
            on_frame(timing)

    return result


def _frames(dataset: Dataset, indices: range) -> Iterator[Frame]:
    for index in indices:
        yield dataset[index]
