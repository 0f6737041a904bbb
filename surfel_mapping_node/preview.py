"""A quick look at a surfel map without a display: z-buffered splats rendered to a PNG.

The view is orthographic and needs no knowledge of gravity. It looks along the map's
thinnest principal axis, which is the vertical for rooms, corridors and roads. It looks
from the side that most surfel normals face, because normals face the cameras that saw
the surfels. By default it is tilted 50° about the longest axis, so that walls show as
well as floors. Points are
drawn as discs of their radius (at least one pixel), nearest first, shaded by the
angle between normal and view.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from surfel_mapping_node.ply_io import atomic_write

logger = logging.getLogger(__name__)

VIEWS = ("oblique", "top")
OBLIQUE_TILT_DEG = 50.0
MAX_SPLAT_PX = 4
# Beyond this many points the preview draws an even subsample.
MAX_POINTS = 400_000
BACKGROUND_RGB = (255, 255, 255)


@dataclass
class PreviewProjection:
    """The orthographic view of a preview: world point p maps to pixel
    (u, v) = scale·((p − origin)·right, −(p − origin)·up) + centre_px, nearer = larger p·toward."""

    right: np.ndarray  # (3,) world-frame unit vector along image u
    up: np.ndarray  # (3,) world-frame unit vector against image v
    toward: np.ndarray  # (3,) world-frame unit vector from the map to the viewer
    origin_m: np.ndarray  # (3,) world point at the image centre
    pixels_per_m: float


def render_preview(
    position_m: np.ndarray,
    color_rgb: np.ndarray,
    normal: np.ndarray | None = None,
    radius_m: np.ndarray | None = None,
    *,
    width: int = 960,
    height: int = 720,
    view: str = "oblique",
    projection: PreviewProjection | None = None,
) -> np.ndarray:
    """Render points to an (height, width, 3) uint8 RGB image.

    Args:
        position_m: (N, 3) positions in metres, world frame; non-finite rows are skipped.
        color_rgb: (N, 3) uint8 RGB.
        normal: optional (N, 3) unit normals, for shading and for choosing the side to
            look from.
        radius_m: optional (N,) disc radii in metres; without them points are 1 px.
        width, height: image size in pixels (at least 64 × 48).
        view: "oblique" (tilted 50°) or "top" (along the thinnest axis).
        projection: a view from ``fit_projection`` to use instead of fitting one to
            these points, so that several maps render from the same viewpoint.

    Raises:
        ValueError: for mis-shaped arrays, a non-uint8 color, an unknown view or a size
            below 64 × 48.
    """
    position_m, color_rgb, normal, radius_m = _check_inputs(position_m, color_rgb, normal, radius_m)
    if view not in VIEWS:
        raise ValueError(f"unknown preview view {view!r}: use one of {', '.join(VIEWS)}")
    if width < 64 or height < 48:
        raise ValueError(f"invalid preview size {width}x{height}: use at least 64x48 pixels")
    image = np.full((height, width, 3), BACKGROUND_RGB, dtype=np.uint8)

    # Keep finite points, and an even subsample of very large maps.
    keep = np.isfinite(position_m).all(axis=1)
    if not keep.all():
        logger.warning("preview skips %d points with non-finite positions", int((~keep).sum()))
    indices = np.flatnonzero(keep)
    if len(indices) > MAX_POINTS:
        indices = indices[:: -(-len(indices) // MAX_POINTS)]
    if len(indices) == 0:
        _caption(image, "empty map: 0 surfels")
        return image
    position_m, color_rgb = position_m[indices], color_rgb[indices]
    normal = normal[indices] if normal is not None else None
    radius_m = radius_m[indices] if radius_m is not None else None

    # The view, then pixel coordinates and splat sizes.
    if projection is None:
        projection = fit_projection(position_m, normal, width, height, view)
    offset = position_m - projection.origin_m
    u = offset @ projection.right * projection.pixels_per_m + (width - 1) / 2
    v = -(offset @ projection.up) * projection.pixels_per_m + (height - 1) / 2
    nearness = offset @ projection.toward
    splat_px = np.ones(len(u), dtype=np.int64)
    if radius_m is not None:
        splat_px = np.clip(np.rint(radius_m * projection.pixels_per_m), 1, MAX_SPLAT_PX).astype(np.int64)

    # Shading: full color facing the viewer, darker at grazing angles.
    shaded = color_rgb.astype(np.float32)
    if normal is not None:
        facing = np.abs(normal @ projection.toward).astype(np.float32)
        shaded *= (0.55 + 0.45 * np.nan_to_num(facing))[:, None]

    # Z-buffer: every disc pixel is a fragment; the nearest fragment per pixel wins.
    pixel_ids, fragment_points = [], []
    for size in np.unique(splat_px):
        members = np.flatnonzero(splat_px == size)
        radius = size - 1
        dy, dx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
        inside = dx**2 + dy**2 <= radius**2
        cols = np.rint(u[members])[:, None].astype(np.int64) + dx[inside][None, :]
        rows = np.rint(v[members])[:, None].astype(np.int64) + dy[inside][None, :]
        on_image = (cols >= 0) & (cols < width) & (rows >= 0) & (rows < height)
        pixel_ids.append((rows * width + cols)[on_image])
        fragment_points.append(np.broadcast_to(members[:, None], cols.shape)[on_image])
    pixel_ids_all = np.concatenate(pixel_ids)
    points_all = np.concatenate(fragment_points)
    order = np.lexsort((-nearness[points_all], pixel_ids_all))
    first = np.ones(len(order), dtype=bool)
    first[1:] = pixel_ids_all[order][1:] != pixel_ids_all[order][:-1]
    winners = order[first]
    winner_colors = np.clip(shaded[points_all[winners]], 0, 255).astype(np.uint8)
    image.reshape(-1, 3)[pixel_ids_all[winners]] = winner_colors

    _caption(image, f"{len(indices)} surfels, {view} view", projection.pixels_per_m)
    return image


def write_preview(
    path: str | Path,
    cloud: object | None = None,
    *,
    position_m: np.ndarray | None = None,
    color_rgb: np.ndarray | None = None,
    normal: np.ndarray | None = None,
    radius_m: np.ndarray | None = None,
    width: int = 960,
    height: int = 720,
    view: str = "oblique",
) -> np.ndarray:
    """Render a map to a PNG file, written atomically, and return the image.

    The map is a mapper.SurfelCloud, a ply_io.PlyCloud or keyword arrays. The result is
    the (height, width, 3) uint8 RGB image. An empty map gives a blank image with a note.

    Raises:
        ValueError: as render_preview, or when neither a cloud nor position_m and
            color_rgb are given.
        OSError: when the file cannot be written (the message names the path).
    """
    path = Path(path)
    if cloud is not None:
        position_m = cloud.position_m
        color_rgb = cloud.color_rgb
        normal = getattr(cloud, "normal", None)
        radius_m = getattr(cloud, "radius_m", None)
    if position_m is None or color_rgb is None:
        raise ValueError("pass a cloud, or position_m and color_rgb arrays, to write a preview")

    image = render_preview(position_m, color_rgb, normal, radius_m, width=width, height=height, view=view)

    ok, encoded = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"OpenCV failed to encode the preview for {path} as PNG")
    atomic_write(path, lambda stream: stream.write(encoded.tobytes()))
    return image


def fit_projection(
    position_m: np.ndarray, normal: np.ndarray | None, width: int, height: int, view: str = "oblique"
) -> PreviewProjection:
    """Choose the orthographic view that frames the points (see the module docstring).

    Extents use the 1st-99th percentiles, so a few stray surfels do not shrink the map.
    """
    centre = np.median(position_m, axis=0)
    if len(position_m) >= 3:
        # Rows of Vᵀ: principal axes from the longest to the thinnest.
        _, _, axes = np.linalg.svd(position_m - position_m.mean(axis=0), full_matrices=False)
    else:
        axes = np.eye(3)
    middle, thinnest = axes[1], np.cross(axes[0], axes[1])
    if np.linalg.norm(thinnest) < 1e-9:
        # Points on a line or a single point: any frame will do.
        _, middle, thinnest = np.eye(3)
    # Look from the side the normals face: they point at the cameras that saw the surfels.
    if normal is not None and np.nansum(normal @ thinnest) < 0:
        thinnest, middle = -thinnest, -middle

    tilt = np.radians(OBLIQUE_TILT_DEG if view == "oblique" else 0.0)
    toward = np.cos(tilt) * thinnest - np.sin(tilt) * middle
    up = np.cos(tilt) * middle + np.sin(tilt) * thinnest
    right = np.cross(up, toward)

    offset = position_m - centre
    u_range = np.percentile(offset @ right, [1, 99])
    v_range = np.percentile(offset @ up, [1, 99])
    span_u = max(u_range[1] - u_range[0], 1e-3)
    span_v = max(v_range[1] - v_range[0], 1e-3)
    pixels_per_m = 0.9 * min(width / span_u, height / span_v)
    image_centre = centre + right * u_range.mean() + up * v_range.mean()
    return PreviewProjection(right, up, toward, image_centre, float(pixels_per_m))


def _caption(image: np.ndarray, text: str, pixels_per_m: float | None = None) -> None:
    height = image.shape[0]
    cv2.putText(image, text, (8, height - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (90, 90, 90), 1, cv2.LINE_AA)
    if pixels_per_m is None:
        return
    # A scale bar of 1, 2 or 5 × 10^k metres, about a fifth of the width.
    target_m = image.shape[1] / 5 / pixels_per_m
    power = 10.0 ** np.floor(np.log10(target_m))
    length_m = max((m * power for m in (1, 2, 5) if m * power <= target_m), default=power)
    length_px = round(length_m * pixels_per_m)
    x0, y0 = image.shape[1] - length_px - 12, height - 14
    cv2.line(image, (x0, y0), (x0 + length_px, y0), (60, 60, 60), 2)
    label = f"{length_m:g} m"
    cv2.putText(image, label, (x0, y0 - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (60, 60, 60), 1, cv2.LINE_AA)


def _check_inputs(
    position_m: np.ndarray, color_rgb: np.ndarray, normal: np.ndarray | None, radius_m: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    position_m = np.asarray(position_m, dtype=np.float64)
    if position_m.ndim != 2 or position_m.shape[1] != 3:
        raise ValueError(f"invalid position_m shape {position_m.shape}: expected (N, 3) metres")
    count = len(position_m)
    color_rgb = np.asarray(color_rgb)
    if color_rgb.shape != (count, 3) or color_rgb.dtype != np.uint8:
        raise ValueError(
            f"invalid color_rgb: shape {color_rgb.shape}, dtype {color_rgb.dtype}; "
            f"expected ({count}, 3) uint8"
        )
    if normal is not None:
        normal = np.asarray(normal, dtype=np.float64)
        if normal.shape != (count, 3):
            raise ValueError(f"invalid normal shape {normal.shape}: expected ({count}, 3)")
    if radius_m is not None:
        radius_m = np.asarray(radius_m, dtype=np.float64)
        if radius_m.shape != (count,):
            raise ValueError(f"invalid radius_m shape {radius_m.shape}: expected ({count},)")
        radius_m = np.nan_to_num(radius_m, nan=0.0, posinf=0.0, neginf=0.0)
    return position_m, color_rgb, normal, radius_m
