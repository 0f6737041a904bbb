"""Superpixels to candidate surfels: one plane-fitted disc per valid superpixel.

For each superpixel with enough pixels with depth, its back-projected pixels get a
robust plane fit: principal component analysis of the points for a start, then
iteratively reweighted PCA with Huber weights on the point-to-plane distances (the
total-least-squares form of a Huber plane fit). The surfel is the disc where the ray
through the superpixel's centre meets that plane, facing the camera.

All per-superpixel work runs in one numba kernel over the pixel lists of
``Superpixels`` (each superpixel's points stay in cache for every reweighting step),
parallel over superpixels; each row is computed by one thread alone, so the result
does not depend on the thread count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numba
import numpy as np

from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.config import ConfigError, SurfelConfig
from surfel_mapping_node.superpixels import FASTMATH, Superpixels

logger = logging.getLogger(__name__)

# The plane's normal is trusted only when the points spread in the plane at least this
# many times more (in variance) than across it; below that the patch is a line or a
# blob and any normal fits it.
_MIN_PLANARITY = 2.0
# The disc radius grows as 1/view cosine to cover the stretched footprint of a tilted
# patch, up to this factor, so that grazing patches do not make huge discs.
_MAX_RADIUS_STRETCH = 2.0
# Superpixels handled per parallel task, which also owns one scratch buffer.
_CHUNK = 64


@dataclass
class FrameSurfels:
    """Candidate surfels of one frame, one row per superpixel; row i belongs to label i.

    All geometry is in the camera (optical) frame of the frame they came from. Rows
    with ``valid`` False hold NaN geometry and weight; their color is still the
    superpixel's mean (0 for empty superpixels).
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

    @property
    def count(self) -> int:
        """Number of rows S (superpixels), valid or not."""
        return int(self.valid.shape[0])


def extract_surfels(
    superpixels: Superpixels,
    image: np.ndarray,
    depth_m: np.ndarray,
    camera: PinholeCamera,
    config: SurfelConfig,
) -> FrameSurfels:
    """Fit one surfel per superpixel, in the camera frame.

    A superpixel makes a surfel when it has at least ``min_pixels_with_depth`` pixels
    with depth, its points are planar, at least ``min_inlier_ratio`` of them lie within
    ``inlier_range_m`` of the fitted plane, and the plane is seen at a view cosine of at
    least ``min_view_cosine``. Then:

    - normal: Huber plane fit (threshold inlier_range_m / 2), flipped to face the camera;
    - position: the ray through the superpixel's mean pixel, cut with the plane;
    - radius_m = sqrt(pixel_count / π) · z / (f · max(view_cosine, 0.5)), with z the
      position's depth and f = sqrt(fx · |fy|): the radius of a disc of the
      superpixel's area in pixels, scaled to metres at depth z and stretched by the
      tilt (at most 2×);
    - weight = min(1, (weight_depth_scale_m / z)²);
    - color: mean RGB of all the superpixel's pixels (gray replicated).

    Args:
        superpixels: from compute_superpixels (or superpixels_from_labels) on this frame.
        image: (H, W) uint8 gray or (H, W, 3) uint8 RGB, registered with depth_m.
        depth_m: (H, W) float32 metres, NaN (or <= 0) where there is no depth; the
            depth the superpixels were computed from.
        camera: intrinsics of the image.
        config: the validity thresholds and the weight model.

    Returns:
        FrameSurfels with one row per superpixel.

    Raises:
        ValueError: an image whose size differs from the camera's, or a wrong dtype or
            channel count.
        ConfigError: an invalid value in ``config``.
    """
    _check_config(config)
    image_rows = _check_inputs(superpixels, image, depth_m, camera)
    depth = np.ascontiguousarray(depth_m, dtype=np.float32).reshape(-1)

    # Normalized image coordinates of every column and row, so the kernel
    # back-projects a pixel with two lookups and two products.
    x_of_u = ((np.arange(camera.width) - camera.cx) / camera.fx).astype(np.float32)
    y_of_v = ((np.arange(camera.height) - camera.cy) / camera.fy).astype(np.float32)

    count = superpixels.count
    valid = np.zeros(count, np.bool_)
    position = np.full((count, 3), np.nan, np.float32)
    normal = np.full((count, 3), np.nan, np.float32)
    radius = np.full(count, np.nan, np.float32)
    color = np.zeros((count, 3), np.uint8)
    weight = np.full(count, np.nan, np.float32)
    view_cosine = np.full(count, np.nan, np.float32)
    _fit_surfels(
        superpixels.pixel_offsets, superpixels.pixel_indices, depth, image_rows, camera.width,
        x_of_u, y_of_v,
        superpixels.center_u.astype(np.float64), superpixels.center_v.astype(np.float64),
        superpixels.depth_m.astype(np.float32),
        camera.cx, camera.cy, camera.fx, camera.fy, math.sqrt(camera.fx * abs(camera.fy)),
        config.min_pixels_with_depth, config.min_inlier_ratio, config.inlier_range_m,
        config.min_view_cosine, config.weight_depth_scale_m, config.plane_iterations,
        valid, position, normal, radius, color, weight, view_cosine,
    )
    return FrameSurfels(
        labels=superpixels.labels, valid=valid, position_camera=position, normal_camera=normal,
        radius_m=radius, color_rgb=color, weight=weight, view_cosine=view_cosine,
    )


def _check_config(config: SurfelConfig) -> None:
    if config.min_pixels_with_depth < 3:
        raise ConfigError(
            f"invalid surfels.min_pixels_with_depth={config.min_pixels_with_depth}: "
            "a plane needs at least 3 points"
        )
    if not 0 <= config.min_inlier_ratio <= 1:
        raise ConfigError(
            f"invalid surfels.min_inlier_ratio={config.min_inlier_ratio}: use a value in [0, 1]"
        )
    if not 0 < config.inlier_range_m < np.inf:
        raise ConfigError(
            f"invalid surfels.inlier_range_m={config.inlier_range_m}: use a distance > 0 metres"
        )
    if not 0 <= config.min_view_cosine <= 1:
        raise ConfigError(
            f"invalid surfels.min_view_cosine={config.min_view_cosine}: use a value in [0, 1]"
        )
    if not 0 < config.weight_depth_scale_m < np.inf:
        raise ConfigError(
            f"invalid surfels.weight_depth_scale_m={config.weight_depth_scale_m}: "
            "use a depth > 0 metres"
        )
    if config.plane_iterations < 0:
        raise ConfigError(
            f"invalid surfels.plane_iterations={config.plane_iterations}: use 0 or more"
        )


def _check_inputs(
    superpixels: Superpixels, image: np.ndarray, depth_m: np.ndarray, camera: PinholeCamera
) -> np.ndarray:
    """Check shapes and dtypes; return the image as (H·W, channels) uint8 rows."""
    camera.check_image_shape(superpixels.labels.shape, "superpixel label image")
    camera.check_image_shape(np.shape(depth_m), "depth")
    camera.check_image_shape(np.shape(image), "image")
    image = np.asarray(image)
    if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(
            f"invalid image: shape {image.shape} dtype {image.dtype}; "
            "expected (H, W) uint8 gray or (H, W, 3) uint8 RGB"
        )
    depth_dtype = np.asarray(depth_m).dtype
    if depth_dtype not in (np.float32, np.float64):
        raise ValueError(
            f"invalid depth dtype {depth_dtype}: use float32 metres with NaN for no depth"
        )
    channels = 1 if image.ndim == 2 else 3
    return np.ascontiguousarray(image).reshape(-1, channels)


@numba.njit(cache=True)
def _smallest_eigenvector(a, b, c, d, e, f):  # pragma: no cover - numba kernel
    """Unit eigenvector of the smallest eigenvalue of [[a, b, c], [b, d, e], [c, e, f]].

    Returns (x, y, z, smallest, middle eigenvalue); x = NaN when all three eigenvalues
    are equal. Closed form (trigonometric solution of the characteristic cubic), then
    the cross product of two rows of A − λI, the pair with the largest product.
    """
    off = b * b + c * c + e * e
    q = (a + d + f) / 3.0
    p2 = (a - q) ** 2 + (d - q) ** 2 + (f - q) ** 2 + 2.0 * off
    if p2 <= 0.0:
        return np.nan, np.nan, np.nan, q, q
    p = math.sqrt(p2 / 6.0)
    ba = (a - q) / p
    bd = (d - q) / p
    bf = (f - q) / p
    bb = b / p
    bc = c / p
    be = e / p
    half_det = 0.5 * (ba * (bd * bf - be * be) - bb * (bb * bf - be * bc) + bc * (bb * be - bd * bc))
    half_det = min(1.0, max(-1.0, half_det))
    phi = math.acos(half_det) / 3.0
    largest = q + 2.0 * p * math.cos(phi)
    smallest = q + 2.0 * p * math.cos(phi + 2.0 * math.pi / 3.0)
    middle = 3.0 * q - largest - smallest

    # Rows of A − λI span the plane orthogonal to the eigenvector.
    r0x, r0y, r0z = a - smallest, b, c
    r1x, r1y, r1z = b, d - smallest, e
    r2x, r2y, r2z = c, e, f - smallest
    c01x = r0y * r1z - r0z * r1y
    c01y = r0z * r1x - r0x * r1z
    c01z = r0x * r1y - r0y * r1x
    c02x = r0y * r2z - r0z * r2y
    c02y = r0z * r2x - r0x * r2z
    c02z = r0x * r2y - r0y * r2x
    c12x = r1y * r2z - r1z * r2y
    c12y = r1z * r2x - r1x * r2z
    c12z = r1x * r2y - r1y * r2x
    n01 = c01x * c01x + c01y * c01y + c01z * c01z
    n02 = c02x * c02x + c02y * c02y + c02z * c02z
    n12 = c12x * c12x + c12y * c12y + c12z * c12z
    if n01 >= n02 and n01 >= n12:
        x, y, z, norm2 = c01x, c01y, c01z, n01
    elif n02 >= n12:
        x, y, z, norm2 = c02x, c02y, c02z, n02
    else:
        x, y, z, norm2 = c12x, c12y, c12z, n12
    if norm2 <= 0.0:
        return np.nan, np.nan, np.nan, smallest, middle
    scale = 1.0 / math.sqrt(norm2)
    return x * scale, y * scale, z * scale, smallest, middle


@numba.njit(cache=True)
def _refine_normal(a, b, c, d, e, f, nx, ny, nz):  # pragma: no cover - numba kernel
    """One inverse-iteration step towards the smallest eigenvector of a symmetric 3×3.

    Multiplies (nx, ny, nz) by the adjugate of [[a, b, c], [b, d, e], [c, e, f]] (the
    inverse times the determinant, so a singular matrix is fine): the step shrinks the
    error by the ratio of the two smallest eigenvalues, which is tiny for a plane, and
    needs no trigonometry. Returns (x, y, z, smallest, middle eigenvalue); x = NaN
    when the product vanishes.
    """
    x = (d * f - e * e) * nx + (c * e - b * f) * ny + (b * e - c * d) * nz
    y = (c * e - b * f) * nx + (a * f - c * c) * ny + (b * c - a * e) * nz
    z = (b * e - c * d) * nx + (b * c - a * e) * ny + (a * d - b * b) * nz
    norm2 = x * x + y * y + z * z
    if not norm2 > 0.0:
        return np.nan, np.nan, np.nan, 0.0, 0.0
    scale = 1.0 / math.sqrt(norm2)
    x *= scale
    y *= scale
    z *= scale

    # Smallest eigenvalue from the Rayleigh quotient; the middle one from the trace and
    # the sum of principal 2×2 minors (λ1 + λ2 and λ1·λ2 once λ3 is known).
    smallest = (a * x * x + d * y * y + f * z * z
                + 2.0 * (b * x * y + c * x * z + e * y * z))
    rest_sum = a + d + f - smallest
    rest_product = (a * d - b * b) + (a * f - c * c) + (d * f - e * e) - smallest * rest_sum
    middle = 0.5 * (rest_sum - math.sqrt(max(rest_sum * rest_sum - 4.0 * rest_product, 0.0)))
    return x, y, z, smallest, middle


@numba.njit(cache=True, fastmath=FASTMATH, parallel=True)
def _fit_surfels(
    offsets, indices, depth, image_rows, width, x_of_u, y_of_v, center_u, center_v, robust_depth,
    cx, cy, fx, fy, focal,
    min_pixels_with_depth, min_inlier_ratio, inlier_range, min_view_cosine,
    weight_depth_scale, plane_iterations,
    valid, position, normal, radius, color, weight, view_cosine,
):  # pragma: no cover - numba kernel
    count = offsets.shape[0] - 1
    channels = image_rows.shape[1]
    inverse_width = 1.0 / width
    huber_delta = np.float32(0.5 * inlier_range)
    max_pixels = 0
    for s in range(count):
        max_pixels = max(max_pixels, offsets[s + 1] - offsets[s])

    for chunk in numba.prange((count + _CHUNK - 1) // _CHUNK):
        px = np.empty(max_pixels, np.float32)
        py = np.empty(max_pixels, np.float32)
        pz = np.empty(max_pixels, np.float32)
        for s in range(chunk * _CHUNK, min(count, (chunk + 1) * _CHUNK)):
            start = offsets[s]
            stop = offsets[s + 1]
            if stop == start:
                continue

            # Mean color, and the back-projected pixels with depth.
            sum_r = 0.0
            sum_g = 0.0
            sum_b = 0.0
            n = 0
            for j in range(start, stop):
                p = indices[j]
                sum_r += image_rows[p, 0]
                if channels == 3:
                    sum_g += image_rows[p, 1]
                    sum_b += image_rows[p, 2]
                d = depth[p]
                if d > 0.0 and d < np.inf:
                    # p // width without an integer division (exact below 2**31).
                    v = int((p + 0.5) * inverse_width)
                    u = p - v * width
                    px[n] = x_of_u[u] * d
                    py[n] = y_of_v[v] * d
                    pz[n] = d
                    n += 1
            pixels = stop - start
            if channels == 3:
                color[s, 0] = np.uint8(round(sum_r / pixels))
                color[s, 1] = np.uint8(round(sum_g / pixels))
                color[s, 2] = np.uint8(round(sum_b / pixels))
            else:
                gray = np.uint8(round(sum_r / pixels))
                color[s, 0] = gray
                color[s, 1] = gray
                color[s, 2] = gray
            if n < min_pixels_with_depth:
                continue

            # Plane by PCA, then Huber-reweighted PCA steps, each one inverse-iteration
            # step from the previous normal. Sums run about the previous centroid in
            # float32 (the points are within a superpixel, centimetres apart), in
            # branch-free loops that vectorize.
            mx = np.float32(0.0)
            my = np.float32(0.0)
            mz = np.float32(0.0)
            for i in range(n):
                mx += px[i]
                my += py[i]
                mz += pz[i]
            mx /= n
            my /= n
            mz /= n
            # The first step weighs the points by the Huber weight of their depth
            # about the superpixel's robust depth (the "plane" z = robust depth), so
            # that depth outliers cannot tip the PCA start; noise-free points on any
            # plane still give that plane exactly.
            nx = np.float32(0.0)
            ny = np.float32(0.0)
            nz = np.float32(1.0)
            offset = mz - robust_depth[s] if robust_depth[s] > 0 else np.float32(0.0)
            smallest = 0.0
            middle = 0.0
            for step in range(plane_iterations + 1):
                sw = np.float32(0.0)
                sx = np.float32(0.0)
                sy = np.float32(0.0)
                sz = np.float32(0.0)
                sxx = np.float32(0.0)
                sxy = np.float32(0.0)
                sxz = np.float32(0.0)
                syy = np.float32(0.0)
                syz = np.float32(0.0)
                szz = np.float32(0.0)
                for i in range(n):
                    qx = px[i] - mx
                    qy = py[i] - my
                    qz = pz[i] - mz
                    r = abs(qx * nx + qy * ny + qz * nz + offset)
                    w = min(np.float32(1.0), huber_delta / max(r, np.float32(1e-30)))
                    wx = w * qx
                    wy = w * qy
                    wz = w * qz
                    sw += w
                    sx += wx
                    sy += wy
                    sz += wz
                    sxx += wx * qx
                    sxy += wx * qy
                    sxz += wx * qz
                    syy += wy * qy
                    syz += wy * qz
                    szz += wz * qz
                ox = sx / sw
                oy = sy / sw
                oz = sz / sw
                caa = np.float64(sxx / sw - ox * ox)
                cab = np.float64(sxy / sw - ox * oy)
                cac = np.float64(sxz / sw - ox * oz)
                cbb = np.float64(syy / sw - oy * oy)
                cbc = np.float64(syz / sw - oy * oz)
                ccc = np.float64(szz / sw - oz * oz)
                if step == 0:
                    ex, ey, ez, smallest, middle = _smallest_eigenvector(
                        caa, cab, cac, cbb, cbc, ccc
                    )
                else:
                    ex, ey, ez, smallest, middle = _refine_normal(
                        caa, cab, cac, cbb, cbc, ccc, np.float64(nx), np.float64(ny), np.float64(nz)
                    )
                nx = np.float32(ex)
                ny = np.float32(ey)
                nz = np.float32(ez)
                mx += ox
                my += oy
                mz += oz
                offset = np.float32(0.0)
                if not nx == nx:  # NaN: no plane
                    break
            if not nx == nx or not middle > _MIN_PLANARITY * max(smallest, 0.0):
                continue

            # Inliers of the final plane.
            inliers = 0
            for i in range(n):
                r = abs((px[i] - mx) * nx + (py[i] - my) * ny + (pz[i] - mz) * nz)
                if r <= inlier_range:
                    inliers += 1
            if inliers < min_inlier_ratio * n:
                continue

            # Face the camera (at the origin), then cut the centre ray with the plane.
            plane_offset = nx * mx + ny * my + nz * mz
            if plane_offset > 0:
                nx = -nx
                ny = -ny
                nz = -nz
                plane_offset = -plane_offset
            rx = (center_u[s] - cx) / fx
            ry = (center_v[s] - cy) / fy
            ray_dot = nx * rx + ny * ry + nz
            cosine = -ray_dot / math.sqrt(rx * rx + ry * ry + 1.0)
            if not cosine >= min_view_cosine or not cosine > 0:
                continue
            t = plane_offset / ray_dot
            if not t > 0:
                continue
            z = t

            valid[s] = True
            position[s, 0] = t * rx
            position[s, 1] = t * ry
            position[s, 2] = z
            normal[s, 0] = nx
            normal[s, 1] = ny
            normal[s, 2] = nz
            view_cosine[s] = cosine
            stretch = min(1.0 / cosine, _MAX_RADIUS_STRETCH)
            radius[s] = math.sqrt(pixels / math.pi) * z / focal * stretch
            weight[s] = min(1.0, (weight_depth_scale / z) ** 2)
