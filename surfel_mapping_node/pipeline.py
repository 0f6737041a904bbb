"""Offline mapping of a recorded dataset: depth decoding, the mapper, and per-frame timing.

Depth comes from the frame (RGB-D decoding, stereo matching: :class:`DepthSource`) or
from a monocular depth network (:class:`NetworkDepthSource`). A network predicts
depth at its own output size, so the map is then built at that size with the camera
scaled to it, and the image is downscaled to match.

The pipeline does no file output of its own; the CLI writes the map, the timing
and the preview from the :class:`PipelineResult` it returns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.config import MapperConfig
from surfel_mapping_node.datasets.base import Dataset, Frame
from surfel_mapping_node.depth import decode_depth
from surfel_mapping_node.mapper import FrameStats, SurfelMapper

if TYPE_CHECKING:
    from quantized_inference_node.inference import InferenceEngine

logger = logging.getLogger(__name__)

# Stages timed outside the mapping total: stereo matching is a depth source, not
# part of the mapper, and is reported on its own.
DEPTH_SOURCE_STAGES = ("stereo_depth", "network_depth")


@dataclass(frozen=True)
class DepthEstimate:
    """Depth of one frame in metres and the camera of that depth image."""

    # (H, W) float32 metres, NaN where there is no depth.
    depth_m: np.ndarray
    # Intrinsics of depth_m: the frame's camera, or the camera scaled to a network's output.
    camera: PinholeCamera


class DepthEstimator(Protocol):
    """Anything that gives a frame's depth and its camera: DepthSource, NetworkDepthSource."""

    def estimate(self, frame: Frame, stages_ms: dict[str, float]) -> DepthEstimate:
        """Return the depth of FRAME; add each stage's milliseconds to STAGES_MS."""
        ...


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

    def estimate(self, frame: Frame, stages_ms: dict[str, float]) -> DepthEstimate:
        """Return the frame's depth with the frame's own camera; see :meth:`depth_m`."""
        return DepthEstimate(self.depth_m(frame, stages_ms), frame.camera)

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


class NetworkDepthSource:
    """Depth from a monocular depth network: the frame's image through an inference engine.

    The depth is at the network's output size (e.g. 80 x 64 for a 160 x 128 input with
    a half-resolution head), with the frame's camera scaled to that size. Depths outside
    the config's [depth.min_depth_m, depth.max_depth_m] become NaN, as decoded sensor
    depth does. The frame's own depth, if any, is ignored.
    """

    def __init__(self, engine: InferenceEngine, config: MapperConfig) -> None:
        """Wrap a loaded ENGINE whose card has the ``depth`` task.

        Raises:
            ValueError: the engine's card is not a depth model.
        """
        from quantized_inference_node.model_card import Task

        if engine.card.task is not Task.DEPTH:
            raise ValueError(
                f"model {engine.model_path} has task {engine.card.task.value!r}: a depth source "
                "needs a model card with task 'depth'"
            )
        self.engine = engine
        self.config = config

    @classmethod
    def load(
        cls,
        model_path: str | Path,
        config: MapperConfig,
        card_path: str | Path | None = None,
        intra_op_threads: int = 0,
    ) -> NetworkDepthSource:
        """Load an ONNX depth model (a path or ``pkg:<package>/<path>``) on the CPU.

        Args:
            model_path: The .onnx file.
            config: Mapper options; depth.min_depth_m and depth.max_depth_m apply.
            card_path: Its model card; None takes the card beside the model.
            intra_op_threads: ONNX Runtime threads per operator; 0 lets it choose.

        Raises:
            FileNotFoundError: the model or card does not exist.
            ModelCardError: the card is invalid or does not match the model.
            ModelLoadError: ONNX Runtime cannot load the model.
            ValueError: the card's task is not ``depth``.
        """
        from quantized_inference_node.inference import InferenceEngine

        engine = InferenceEngine.load(model_path, card_path, ("cpu",), intra_op_threads)
        return cls(engine, config)

    def estimate(self, frame: Frame, stages_ms: dict[str, float]) -> DepthEstimate:
        """Return the network's depth of FRAME and its camera; add the stage time to STAGES_MS.

        Raises:
            ImageError: the frame's image cannot be fed to the network.
        """
        from quantized_inference_node.model_card import ChannelOrder

        start = time.perf_counter()
        order = ChannelOrder.RGB if frame.image.ndim == 3 else ChannelOrder.GRAY
        result = self.engine.infer(frame.image, order, frame.camera)
        depth_config = self.config.depth
        depth_m = result.depth_m.copy()
        outside = ~((depth_m >= depth_config.min_depth_m) & (depth_m <= depth_config.max_depth_m))
        depth_m[outside] = np.nan
        stages_ms["network_depth"] = (time.perf_counter() - start) * 1e3
        return DepthEstimate(depth_m, result.camera)

    def depth_m(self, frame: Frame, stages_ms: dict[str, float]) -> np.ndarray:
        """Return the network's (h, w) float32 depth in metres; see :meth:`estimate`."""
        return self.estimate(frame, stages_ms).depth_m


def run_pipeline(
    dataset: Dataset,
    config: MapperConfig,
    indices: range,
    on_frame: Callable[[FrameTiming], None] | None = None,
    depth_source: DepthEstimator | None = None,
) -> PipelineResult:
    """Fuse the frames INDICES of DATASET into a new map and time every frame.

    Args:
        dataset: The frames, with images and camera-to-world poses.
        config: Mapper options.
        indices: Dataset indices to fuse, in order.
        on_frame: Called with each frame's timing once it is fused.
        depth_source: Where depth comes from; None decodes the frames' own depth (or
            matches their stereo pair). With a :class:`NetworkDepthSource`, the map is
            built at the network's output size and images are downscaled to it.
    """
    depth_source = depth_source if depth_source is not None else DepthSource(config)
    mapper: SurfelMapper | None = None
    timings: list[FrameTiming] = []

    for frame in _frames(dataset, indices):
        stages_ms: dict[str, float] = {}
        estimate = depth_source.estimate(frame, stages_ms)
        if mapper is None:
            mapper = SurfelMapper(config, estimate.camera)
        image = _image_at_camera_size(frame.image, estimate.camera, stages_ms)
        stats: FrameStats = mapper.integrate(
            image, estimate.depth_m, frame.T_world_camera, frame.stamp_ns, keyframe_id=frame.keyframe_id
        )
        stages_ms.update(stats.stages_ms)

        total_ms = sum(ms for name, ms in stages_ms.items() if name not in DEPTH_SOURCE_STAGES)
        timing = FrameTiming(
            frame.index, frame.stamp_ns, total_ms, stages_ms, stats.surfels_total, stats.skipped_reason
        )
        if stats.skipped_reason:
            logger.warning("frame %d skipped: %s", frame.index, stats.skipped_reason)
        timings.append(timing)
        if on_frame is not None:
            on_frame(timing)

    # NOTE: without frames the mapper has the dataset's camera even for a network source,
    # whose output size is only known after a first inference.
    return PipelineResult(mapper or SurfelMapper(config, dataset.camera), timings)


def _image_at_camera_size(
    image: np.ndarray, camera: PinholeCamera, stages_ms: dict[str, float]
) -> np.ndarray:
    """Return IMAGE downscaled to CAMERA's size (area averaging), or IMAGE when it fits."""
    if image.shape[:2] == camera.shape:
        return image
    start = time.perf_counter()
    resized = camera.resample_image(image)
    stages_ms["image_resize"] = (time.perf_counter() - start) * 1e3
    return resized


def _frames(dataset: Dataset, indices: range) -> Iterator[Frame]:
    for index in indices:
        yield dataset[index]
