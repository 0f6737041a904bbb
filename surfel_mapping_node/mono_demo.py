"""Monocular mapping demo on the 7-Scenes excerpt, without ROS.

A depth network (the packaged depth_7scenes HAWQ model by default) predicts depth from
each RGB frame; the mapper fuses it with the ground-truth poses. The same frames with
the Kinect depth give a reference RGB-D map. The demo writes::

    OUT/map.ply       the monocular surfel map
    OUT/preview.png   the monocular map beside the RGB-D map
    OUT/report.md     frames, surfels, distance between the maps, the network's abs-rel,
                      time per frame

The network learned frames 0-239 of the same room, and the default frames (240-299)
come from the same recording a few seconds later: the figures show that the pipeline
works end to end, not how the network generalizes.
"""

from __future__ import annotations

import logging
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from scipy.spatial import cKDTree

from surfel_mapping_node.config import MapperConfig
from surfel_mapping_node.datasets.base import Frame
from surfel_mapping_node.depth import decode_depth
from surfel_mapping_node.mapper import SurfelCloud
from surfel_mapping_node.pipeline import DepthEstimate, NetworkDepthSource, PipelineResult, run_pipeline

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "pkg:quantized_inference_node/models/depth_7scenes/model_hawq.onnx"
SEVEN_SCENES_FOLDER = "7scenes_redkitchen"
# Frames the packaged network was not trained on (it learned frames 0-239).
VALIDATION_FRAMES = range(240, 300)
# The excerpt's location relative to the project root, unless SURFEL_SHARED_DATA sets another.
DEFAULT_SHARED_DATA = Path("../shared/data")
DOCS_PREVIEW_MAX_BYTES = 200_000
PANEL_WIDTH_PX, PANEL_HEIGHT_PX = 640, 480
CAPTION_HEIGHT_PX = 28


@dataclass(frozen=True)
class MapDistance:
    """Distance from each surfel centre of one map to the nearest surfel centre of another, metres."""

    median_m: float
    p90_m: float
    surfels: int


@dataclass(frozen=True)
class MonoComparison:
    """The monocular and the RGB-D map of the same frames, and how they compare."""

    frames: int
    mono: PipelineResult
    rgbd: PipelineResult
    # Mono surfels to the nearest RGB-D surfel.
    distance: MapDistance
    # Mean |predicted - measured| / measured over pixels with both, at the network's size.
    abs_rel: float
    model_path: str
    inference_ms_median: float
    mono_mapping_ms_median: float
    rgbd_mapping_ms_median: float


@dataclass(frozen=True)
class MonoDemoOutputs:
    """Files written by :func:`write_mono_outputs`."""

    map_path: Path
    preview_path: Path
    report_path: Path
    comparison: MonoComparison


def mono_mapper_config() -> MapperConfig:
    """Return mapper options for depth at a network's output size (80 x 64 for depth_7scenes).

    The default 8-pixel superpixel grid would give only 10 x 8 superpixels per frame at
    that size; a 4-pixel grid gives 20 x 16, each with at least 4 pixels of depth.
    config/mono_depth_mapping.yaml sets the same options for the ROS node.
    """
    return MapperConfig.from_dict(
        {
            "superpixels": {"grid_px": 4},
            "surfels": {"min_pixels_with_depth": 4},
            # The range of the depth the packaged network was trained on.
            "depth": {"min_depth_m": 0.2, "max_depth_m": 6.0},
        }
    )


def find_seven_scenes(data_dir: str | Path | None = None) -> Path | None:
    """Return the 7-Scenes excerpt folder, or None when it is absent.

    Args:
        data_dir: The shared data folder (holding ``7scenes_redkitchen/``); None takes the
            SURFEL_SHARED_DATA environment variable, else ``../shared/data`` relative to
            the current folder.
    """
    if data_dir is None:
        data_dir = os.environ.get("SURFEL_SHARED_DATA") or DEFAULT_SHARED_DATA
    folder = Path(data_dir) / SEVEN_SCENES_FOLDER
    return folder if (folder / "camera-intrinsics.txt").is_file() else None


def map_distance(map_points_m: np.ndarray, reference_points_m: np.ndarray) -> MapDistance:
    """Return the distances from MAP_POINTS_M (N, 3) to the nearest of REFERENCE_POINTS_M (M, 3).

    Both are in the same world frame, metres. Every map point counts, including those
    where the reference has nothing, so a wrong surface far from the reference raises
    the figure.

    Raises:
        ValueError: either map is empty.
    """
    map_points_m = np.asarray(map_points_m, dtype=np.float64).reshape(-1, 3)
    reference_points_m = np.asarray(reference_points_m, dtype=np.float64).reshape(-1, 3)
    if len(map_points_m) == 0 or len(reference_points_m) == 0:
        raise ValueError(
            f"cannot compare a map of {len(map_points_m)} surfels with one of {len(reference_points_m)}: "
            "both maps need surfels (fuse more frames, or check the depth source)"
        )
    distance_m, _ = cKDTree(reference_points_m).query(map_points_m, workers=-1)
    return MapDistance(float(np.median(distance_m)), float(np.percentile(distance_m, 90)), len(map_points_m))


class _AbsRelDepthSource:
    """A NetworkDepthSource that also compares each prediction with the frame's measured depth."""

    def __init__(self, source: NetworkDepthSource) -> None:
        self.source = source
        self._relative_error_sum = 0.0
        self._pixels = 0

    def estimate(self, frame: Frame, stages_ms: dict[str, float]) -> DepthEstimate:
        estimate = self.source.estimate(frame, stages_ms)
        if frame.depth_raw is not None:
            measured_m = _measured_depth_at(frame, estimate.depth_m.shape, self.source.config)
            both = np.isfinite(measured_m) & np.isfinite(estimate.depth_m)
            self._relative_error_sum += float(
                np.sum(np.abs(estimate.depth_m[both] - measured_m[both]) / measured_m[both])
            )
            self._pixels += int(both.sum())
        return estimate

    @property
    def abs_rel(self) -> float:
        return self._relative_error_sum / self._pixels if self._pixels else float("nan")


def _measured_depth_at(frame: Frame, shape: tuple[int, int], config: MapperConfig) -> np.ndarray:
    """Return the frame's measured depth in metres sampled at the pixel centres of a SHAPE grid.

    Nearest sampling, not averaging, so that depth edges keep real depths.
    """
    height, width = frame.depth_raw.shape
    rows = ((np.arange(shape[0]) + 0.5) * height / shape[0]).astype(np.int64)
    cols = ((np.arange(shape[1]) + 0.5) * width / shape[1]).astype(np.int64)
    sampled = frame.depth_raw[np.ix_(rows, cols)]
    return decode_depth(sampled, frame.depth_scale, config.depth.min_depth_m, config.depth.max_depth_m)


def run_mono_comparison(
    seven_scenes_dir: str | Path,
    indices: range = VALIDATION_FRAMES,
    model_path: str | Path = DEFAULT_MODEL,
    card_path: str | Path | None = None,
) -> MonoComparison:
    """Map INDICES of the 7-Scenes excerpt from network depth and from the measured depth.

    Both maps use the ground-truth camera-to-world poses.

    Args:
        seven_scenes_dir: The ``7scenes_redkitchen`` folder.
        indices: Frame indices to fuse.
        model_path: ONNX depth model, a path or ``pkg:<package>/<path>``.
        card_path: Its model card; None takes the card beside the model.

    Raises:
        FileNotFoundError: the folder, a frame, the model or its card is missing.
        ModelCardError, ModelLoadError: the model or card is unusable.
        ValueError: INDICES is empty or outside the excerpt, or a map ends up empty.
    """
    from surfel_mapping_node.datasets.seven_scenes import SevenScenesDataset

    dataset = SevenScenesDataset(seven_scenes_dir)
    if len(indices) == 0 or indices[0] < 0 or indices[-1] >= len(dataset):
        raise ValueError(
            f"invalid frame range {indices.start}-{indices.stop - 1}: the excerpt has frames "
            f"0-{len(dataset) - 1}"
        )

    mono_config = mono_mapper_config()
    depth_source = _AbsRelDepthSource(NetworkDepthSource.load(model_path, mono_config, card_path))
    mono = run_pipeline(dataset, mono_config, indices, depth_source=depth_source)
    rgbd = run_pipeline(dataset, MapperConfig(), indices)

    mono_stages = mono.summary()["stages"]
    return MonoComparison(
        frames=len(indices),
        mono=mono,
        rgbd=rgbd,
        distance=map_distance(mono.mapper.cloud().position_m, rgbd.mapper.cloud().position_m),
        abs_rel=depth_source.abs_rel,
        model_path=str(model_path),
        inference_ms_median=mono_stages.get("network_depth", {}).get("median_ms", float("nan")),
        mono_mapping_ms_median=mono_stages.get("total", {}).get("median_ms", float("nan")),
        rgbd_mapping_ms_median=rgbd.summary()["stages"].get("total", {}).get("median_ms", float("nan")),
    )


def render_side_by_side(mono: SurfelCloud, rgbd: SurfelCloud, mono_label: str, rgbd_label: str) -> np.ndarray:
    """Return an RGB image of the two maps side by side, each with a caption above it.

    Both panels use the view fitted to the RGB-D map, so they show the same scene from
    the same viewpoint.
    """
    from surfel_mapping_node.preview import fit_projection, render_preview

    projection = fit_projection(rgbd.position_m, rgbd.normal, PANEL_WIDTH_PX, PANEL_HEIGHT_PX)
    panels = []
    for cloud, label in ((mono, mono_label), (rgbd, rgbd_label)):
        rendered = render_preview(
            cloud.position_m,
            cloud.color_rgb,
            cloud.normal,
            cloud.radius_m,
            width=PANEL_WIDTH_PX,
            height=PANEL_HEIGHT_PX,
            projection=projection,
        )
        caption = np.full((CAPTION_HEIGHT_PX, PANEL_WIDTH_PX, 3), 255, dtype=np.uint8)
        cv2.putText(caption, label, (8, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
        panels.append(np.vstack([caption, rendered]))
    separator = np.full((PANEL_HEIGHT_PX + CAPTION_HEIGHT_PX, 4, 3), 160, dtype=np.uint8)
    return np.hstack([panels[0], separator, panels[1]])


def write_mono_outputs(comparison: MonoComparison, out_dir: str | Path) -> MonoDemoOutputs:
    """Write map.ply, preview.png and report.md of COMPARISON into OUT_DIR (created if missing).

    Raises:
        OSError: OUT_DIR or a file in it cannot be written.
    """
    from surfel_mapping_node.ply_io import write_surfel_ply

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mono_cloud, rgbd_cloud = comparison.mono.mapper.cloud(), comparison.rgbd.mapper.cloud()

    map_path = out_dir / "map.ply"
    write_surfel_ply(map_path, mono_cloud)

    preview = render_side_by_side(
        mono_cloud,
        rgbd_cloud,
        f"monocular: network depth, {len(mono_cloud)} surfels",
        f"RGB-D: Kinect depth, {len(rgbd_cloud)} surfels",
    )
    preview_path = out_dir / "preview.png"
    if not cv2.imwrite(str(preview_path), cv2.cvtColor(preview, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {preview_path}: choose another output folder")

    report_path = out_dir / "report.md"
    report_path.write_text(mono_report(comparison))
    return MonoDemoOutputs(map_path, preview_path, report_path, comparison)


def mono_report(comparison: MonoComparison) -> str:
    """Return the Markdown report of a monocular-versus-RGB-D comparison."""
    c = comparison
    mono_summary, rgbd_summary = c.mono.summary(), c.rgbd.summary()
    first, last = c.mono.frames[0].index, c.mono.frames[-1].index
    mono_camera, rgbd_camera = c.mono.mapper.camera, c.rgbd.mapper.camera
    return f"""# Monocular surfel mapping on 7-Scenes redkitchen

**Warning:** the depth network was trained on frames 0-239 of this same room and
recording; frames {first}-{last} come from a few seconds later. These figures show that
the monocular pipeline works end to end; they overstate how well the network
generalizes to other places.

| | monocular (network depth) | RGB-D (Kinect depth) |
|---|---|---|
| frames fused | {mono_summary['frames_fused']} of {c.frames} | {rgbd_summary['frames_fused']} of {c.frames} |
| depth size | {mono_camera.width}x{mono_camera.height} | {rgbd_camera.width}x{rgbd_camera.height} |
| surfels | {mono_summary['surfels']} | {rgbd_summary['surfels']} |
| mapping, median ms per frame | {c.mono_mapping_ms_median:.1f} | {c.rgbd_mapping_ms_median:.1f} |
| depth network, median ms per frame | {c.inference_ms_median:.1f} | - |

- Model: `{c.model_path}`
- Poses: ground truth for both maps.
- Distance of the monocular map to the RGB-D map (each monocular surfel centre to the
  nearest RGB-D surfel centre): median {c.distance.median_m * 100:.1f} cm, 90th percentile
  {c.distance.p90_m * 100:.1f} cm.
- Network depth against the Kinect depth on these frames (at the network's output size,
  pixels with both): abs-rel {c.abs_rel:.3f}.
- Machine: {platform.machine()}, {os.cpu_count()} CPU threads, Python {platform.python_version()};
  times are wall clock on a shared machine.

![monocular map beside the RGB-D map](preview.png)
"""


def write_docs_preview(
    preview_path: str | Path, out_path: str | Path, max_bytes: int = DOCS_PREVIEW_MAX_BYTES
) -> Path:
    """Write a downscaled copy of a preview PNG of at most MAX_BYTES (for the README).

    Raises:
        FileNotFoundError: PREVIEW_PATH does not exist or is not an image.
        ValueError: no size down to 64 pixels wide fits MAX_BYTES.
    """
    image = cv2.imread(str(preview_path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"preview image not found or unreadable: {preview_path}")

    scale = 1.0
    while image.shape[1] * scale >= 64:
        size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
        resized = image if scale == 1.0 else cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        ok, encoded = cv2.imencode(".png", resized, [cv2.IMWRITE_PNG_COMPRESSION, 9])
        if ok and encoded.size <= max_bytes:
            out_path = Path(out_path)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_bytes(encoded.tobytes())
            return out_path
        scale *= 0.8
    raise ValueError(f"cannot fit {preview_path} in {max_bytes} bytes: raise max_bytes")


def run_mono_demo(
    data_dir: str | Path | None,
    out_dir: str | Path,
    indices: range = VALIDATION_FRAMES,
    model_path: str | Path = DEFAULT_MODEL,
) -> MonoDemoOutputs | None:
    """Run the monocular comparison if the 7-Scenes excerpt is present; None when it is absent.

    Args:
        data_dir: The shared data folder; see :func:`find_seven_scenes`.
        out_dir: Folder for map.ply, preview.png and report.md.
        indices: Frame indices to fuse (the network's validation frames by default).
        model_path: ONNX depth model, a path or ``pkg:<package>/<path>``.

    Raises:
        As :func:`run_mono_comparison` and :func:`write_mono_outputs`.
    """
    seven_scenes_dir = find_seven_scenes(data_dir)
    if seven_scenes_dir is None:
        return None
    logger.info("monocular mapping of %s frames %d-%d", seven_scenes_dir, indices[0], indices[-1])
    comparison = run_mono_comparison(seven_scenes_dir, indices, model_path)
    return write_mono_outputs(comparison, out_dir)
