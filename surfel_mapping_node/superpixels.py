"""SLIC superpixels on intensity and inverse depth, the first stage of surfel mapping.

The variant of Wang, Gao and Shen (ICRA 2019): seeds start on a regular grid, each
pixel joins the cheapest of the 3×3 seeds around its grid cell, with the cost

    (du² + dv²)·spatial_weight + ΔI²·intensity_weight
        + inverse_depth_weight·(1/d_seed − 1/d_pixel)²   (the last term only when both have depth)

and each seed then moves to the mean position and intensity of its pixels, its depth
being a Huber (IRLS) estimate over its pixels with depth.

Speed: the assignment visits every pixel × 9 seeds per iteration. It runs as a numba
kernel over the grid cells, whose pixels share their 9 candidate seeds, in runs of 8
pixels that compile to vector code. The same kernel then sums each block row's pixels
into per-seed slots for the seed update. Block rows run in parallel, and no two write
the same pixel or slot, so the result does not depend on the thread count. The final
per-superpixel pixel lists (a counting sort on those slots) are kept in Superpixels,
and extract_surfels fits its planes over them.

The OpenMP threads that run the parallel kernels wait passively unless the user sets
OMP_WAIT_POLICY (see surfel_mapping_node/__init__.py): spinning threads make the
kernels several times slower when other processes share the cores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from surfel_mapping_node.config import ConfigError, SuperpixelConfig

# fastmath without "nnan"/"ninf": the kernels test depth for NaN with comparisons.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}


@dataclass
class Superpixels:
    """Superpixels of one frame, where label i of ``labels`` is row i of every (S,) array.

    A superpixel whose seed lost all its pixels keeps its row, with pixel_count 0 and
    NaN centre, intensity and depth.
    """

    # (H, W) int32 superpixel id of each pixel, -1 for none (non-finite intensity).
    labels: np.ndarray
    # (S,) float32 mean pixel column and row of the superpixel's pixels.
    center_u: np.ndarray
    center_v: np.ndarray
    # (S,) float32 mean intensity, in the units of the input image (0–255 for uint8).
    intensity: np.ndarray
    # (S,) float32 Huber estimate of the depth in metres, NaN when no pixel has depth.
    depth_m: np.ndarray
    # (S,) int32 number of pixels, and of those with depth.
    pixel_count: np.ndarray
    depth_count: np.ndarray
    # The pixels of superpixel i are pixel_indices[pixel_offsets[i]:pixel_offsets[i + 1]],
    # as flat indices v·W + u in increasing order. pixel_offsets is (S + 1,) int64.
    pixel_offsets: np.ndarray
    pixel_indices: np.ndarray

    @property
    def count(self) -> int:
        """Number of superpixels S (rows), including empty ones."""
        return int(self.center_u.shape[0])


def compute_superpixels(
    intensity: np.ndarray, depth_m: np.ndarray, config: SuperpixelConfig
) -> Superpixels:
    """Segment one frame into SLIC superpixels on intensity and inverse depth.

    Args:
        intensity: (H, W) uint8, or float32 on the same 0–255 scale (the cost weights
            assume it). Pixels with non-finite intensity get label -1.
        depth_m: (H, W) float32 depth in metres, registered to ``intensity``; NaN, zero,
            negative or infinite values mean "no depth".
        config: grid spacing, iterations, cost weights and Huber threshold.

    Returns:
        Superpixels with S = (H // grid_px) · (W // grid_px) rows, at least one. The
        last row and column of grid cells take the pixels left over when the grid does
        not divide the image size.

    Raises:
        ValueError: the images are not 2-D, their shapes differ, or their dtypes are
            not the ones above.
        ConfigError: an invalid value in ``config``.
    """
    _check_config(config)
    image, depth, inverse_depth = _prepare_inputs(intensity, depth_m)

    # Grid cells: boundaries in pixels, the last cell taking the rest.
    height, width = image.shape
    cells_v = max(1, height // config.grid_px)
    cells_u = max(1, width // config.grid_px)
    v_starts = np.minimum(np.arange(cells_v + 1, dtype=np.int64) * config.grid_px, height)
    u_starts = np.minimum(np.arange(cells_u + 1, dtype=np.int64) * config.grid_px, width)
    v_starts[-1] = height
    u_starts[-1] = width
    seed_count = cells_v * cells_u

    # Seeds start at the centre pixel of their cell.
    seed_u, seed_v, seed_intensity, seed_depth = _seeds_at_cell_centres(
        image, depth, inverse_depth, v_starts, u_starts
    )

    # Assign pixels to the 3×3 seeds around their cell, then move the seeds.
    labels = np.empty((height, width), np.int32)
    sums = np.empty((seed_count * 3, _SUM_FIELDS), np.float64)
    totals = np.empty((seed_count, _SUM_FIELDS), np.float64)
    huber_delta = np.float32(config.huber_delta_m)
    # Seeds move about as far with every second row as with all of them, so only the
    # last iteration, whose labels and sums are kept, visits every row.
    for iteration in range(config.iterations):
        row_step = 1 if iteration == config.iterations - 1 else 2
        _assign_pixels(
            image, depth, inverse_depth, v_starts, u_starts,
            seed_u, seed_v, seed_intensity, seed_depth,
            np.float32(config.spatial_weight), np.float32(config.intensity_weight),
            np.float32(config.inverse_depth_weight), huber_delta, row_step, labels, sums,
        )
        _seeds_from_sums(sums, totals, seed_u, seed_v, seed_intensity, seed_depth)

    # The last totals contain the final means. The depth gets its remaining Huber steps
    # over each superpixel's pixel list.
    offsets, indices = _sort_pixels_by_slot(labels, v_starts, cells_u, sums[:, 0].astype(np.int64))
    _refine_depth(offsets, indices, depth.reshape(-1), np.float32(config.huber_delta_m),
                  config.huber_iterations, seed_depth)
    return _superpixels_from_totals(labels, totals, seed_depth, offsets, indices)


def superpixels_from_labels(
    labels: np.ndarray,
    intensity: np.ndarray,
    depth_m: np.ndarray,
    huber_delta_m: float = SuperpixelConfig.huber_delta_m,
    huber_iterations: int = SuperpixelConfig.huber_iterations,
) -> Superpixels:
    """Build Superpixels from given labels (another segmentation, or a test's regions).

    Args:
        labels: (H, W) integer labels in [0, S), or -1 for pixels in no superpixel;
            S is max(labels) + 1.
        intensity: (H, W) uint8 or float32 image, as for compute_superpixels.
        depth_m: (H, W) float32 depth in metres, as for compute_superpixels.
        huber_delta_m: Huber threshold of the per-superpixel depth, metres.
        huber_iterations: IRLS steps of the per-superpixel depth.

    Raises:
        ValueError: shapes or dtypes as in compute_superpixels, labels below -1, a
            Huber threshold <= 0, or a negative step count.
    """
    image, depth, inverse_depth = _prepare_inputs(intensity, depth_m)
    labels = np.asarray(labels)
    if labels.shape != image.shape or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"invalid labels with shape {labels.shape} and dtype {labels.dtype}: "
            f"expected integers of the image shape {image.shape}"
        )
    if labels.size and labels.min() < -1:
        raise ValueError(f"invalid label {labels.min()}: labels must be >= 0, or -1 for none")
    if not huber_delta_m > 0 or huber_iterations < 0:
        raise ValueError(
            f"invalid huber_delta_m={huber_delta_m} or huber_iterations={huber_iterations}: "
            "need huber_delta_m > 0 and huber_iterations >= 0"
        )

    # Sums per label, as the assignment would have made them (mean depth to start).
    labels = np.ascontiguousarray(labels, dtype=np.int32)
    count = int(labels.max()) + 1 if labels.size else 0
    inside = labels >= 0
    flat_labels = labels[inside]
    v, u = np.nonzero(inside)
    has_depth = inverse_depth[inside] > 0
    totals = np.zeros((count, _SUM_FIELDS), np.float64)
    totals[:, 0] = np.bincount(flat_labels, minlength=count)
    totals[:, 1] = np.bincount(flat_labels, u, minlength=count)
    totals[:, 2] = np.bincount(flat_labels, v, minlength=count)
    totals[:, 3] = np.bincount(flat_labels, image[inside], minlength=count)
    totals[:, 4] = np.bincount(flat_labels, has_depth, minlength=count)
    totals[:, 5] = np.bincount(flat_labels, np.where(has_depth, depth[inside], 0.0), minlength=count)
    with np.errstate(invalid="ignore", divide="ignore"):
        start_depth = (totals[:, 5] / totals[:, 4]).astype(np.float32)

    offsets, indices = _sort_pixels_by_label(labels, count)
    _refine_depth(offsets, indices, depth.reshape(-1), np.float32(huber_delta_m),
                  huber_iterations, start_depth)
    return _superpixels_from_totals(labels, totals, start_depth, offsets, indices)


def _superpixels_from_totals(
    labels: np.ndarray,
    totals: np.ndarray,
    depth_m: np.ndarray,
    offsets: np.ndarray,
    indices: np.ndarray,
) -> Superpixels:
    """Superpixels from per-superpixel sums (count, Σu, Σv, ΣI, count with depth, ...)."""
    count = totals[:, 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        center_u = (totals[:, 1] / count).astype(np.float32)
        center_v = (totals[:, 2] / count).astype(np.float32)
        intensity = (totals[:, 3] / count).astype(np.float32)
    depth_count = totals[:, 4].astype(np.int32)
    return Superpixels(
        labels=labels, center_u=center_u, center_v=center_v, intensity=intensity,
        depth_m=np.where(depth_count > 0, depth_m, np.float32(np.nan)).astype(np.float32),
        pixel_count=count.astype(np.int32), depth_count=depth_count,
        pixel_offsets=offsets, pixel_indices=indices,
    )


def _check_config(config: SuperpixelConfig) -> None:
    if config.grid_px < 2:
        raise ConfigError(f"invalid superpixels.grid_px={config.grid_px}: use a spacing >= 2 pixels")
    if config.iterations < 1:
        raise ConfigError(f"invalid superpixels.iterations={config.iterations}: use at least 1")
    if config.huber_iterations < 0:
        raise ConfigError(
            f"invalid superpixels.huber_iterations={config.huber_iterations}: use 0 or more"
        )
    for name in ("spatial_weight", "intensity_weight", "inverse_depth_weight"):
        value = getattr(config, name)
        if not 0 <= value < np.inf:
            raise ConfigError(f"invalid superpixels.{name}={value}: use a finite weight >= 0")
    if not 0 < config.huber_delta_m < np.inf:
        raise ConfigError(
            f"invalid superpixels.huber_delta_m={config.huber_delta_m}: use a threshold > 0 metres"
        )


def _prepare_inputs(
    intensity: np.ndarray, depth_m: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check the images and return intensity (uint8 or float32), float32 depth, inverse depth.

    Inverse depth is 0 where there is no depth, and the kernels test that, not the depth.
    """
    intensity = np.asarray(intensity)
    depth_m = np.asarray(depth_m)
    if intensity.ndim != 2:
        raise ValueError(
            f"invalid intensity shape {intensity.shape}: expected (H, W); convert color to gray first"
        )
    if depth_m.shape != intensity.shape:
        raise ValueError(
            f"depth shape {depth_m.shape} does not match the intensity shape {intensity.shape}: "
            "register the depth to the image"
        )
    if intensity.dtype not in (np.uint8, np.float32, np.float64):
        raise ValueError(f"invalid intensity dtype {intensity.dtype}: use uint8 or float32 (0–255)")
    if depth_m.dtype not in (np.float32, np.float64):
        raise ValueError(
            f"invalid depth dtype {depth_m.dtype}: use float32 metres with NaN for no depth "
            "(decode raw depth images first)"
        )

    if intensity.dtype == np.uint8:
        image = np.ascontiguousarray(intensity)
    else:
        image = np.ascontiguousarray(intensity, dtype=np.float32)
    depth = np.ascontiguousarray(depth_m, dtype=np.float32)
    return image, depth, _inverse_depth_image(depth)


def _seeds_at_cell_centres(
    image: np.ndarray,
    depth: np.ndarray,
    inverse_depth: np.ndarray,
    v_starts: np.ndarray,
    u_starts: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seed position, intensity and depth (NaN for none) from each cell's centre pixel."""
    centre_v = (v_starts[:-1] + v_starts[1:] - 1) // 2
    centre_u = (u_starts[:-1] + u_starts[1:] - 1) // 2
    grid_v, grid_u = np.meshgrid(centre_v, centre_u, indexing="ij")
    seed_v = grid_v.reshape(-1).astype(np.float32)
    seed_u = grid_u.reshape(-1).astype(np.float32)
    seed_intensity = image[grid_v, grid_u].reshape(-1).astype(np.float32)
    has_depth = inverse_depth[grid_v, grid_u].reshape(-1) > 0
    seed_depth = np.where(has_depth, depth[grid_v, grid_u].reshape(-1), np.float32(np.nan))
    return seed_u, seed_v, seed_intensity, seed_depth.astype(np.float32)


# Per-slot sums of the assignment: count, Σu, Σv, ΣI, count with depth, Σd, and the
# Huber step's Σw, Σw·d.
_SUM_FIELDS = 8


@numba.njit(cache=True, nogil=True, parallel=True)
def _inverse_depth_image(depth):  # pragma: no cover - numba kernel
    height, width = depth.shape
    inverse = np.empty((height, width), np.float32)
    for v in numba.prange(height):
        for u in range(width):
            d = depth[v, u]
            inverse[v, u] = np.float32(1.0) / d if (d > 0.0 and d < np.inf) else np.float32(0.0)
    return inverse


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, inline="always")
def _label_pixel(
    image, inverse_depth, labels, v, u, fv,
    candidates, cu, cv, ci, cd, cw, spatial_weight, intensity_weight,
):  # pragma: no cover - numba kernel
    # Give pixel (v, u) the label of the cheapest of the 9 candidate seeds.
    pixel_i = np.float32(image[v, u])
    pixel_d = inverse_depth[v, u]
    fu = np.float32(u)
    # ... and the pixel has depth.
    pixel_has = np.float32(1.0) if pixel_d > 0 else np.float32(0.0)
    best = np.float32(np.inf)
    best_k = 4
    for k in range(9):
        du = fu - cu[k]
        dv = fv - cv[k]
        di = pixel_i - ci[k]
        dd = pixel_d - cd[k]
        cost = (du * du + dv * dv) * spatial_weight + di * di * intensity_weight
        cost += cw[k] * pixel_has * dd * dd
        if cost < best:
            best = cost
            best_k = k
    # A pixel with non-finite intensity belongs to no superpixel.
    labels[v, u] = candidates[best_k] if pixel_i == pixel_i else -1


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def _assign_pixels(
    image, depth, inverse_depth, v_starts, u_starts,
    seed_u, seed_v, seed_intensity, seed_depth,
    spatial_weight, intensity_weight, inverse_depth_weight, huber_delta, row_step, labels, sums,
):  # pragma: no cover - numba kernel
    # Each pixel joins the cheapest of the 3×3 seeds around its cell and adds itself to
    # that seed's sums in slot 3·seed + (pixel cell row − seed cell row + 1). Only one
    # block row writes a given slot, so block rows run in parallel without races and
    # every sum has a fixed order: the result does not depend on the thread count.
    # With row_step 2 only every second row is labelled and summed, each standing for
    # itself and the row below, so its row coordinate counts as v + 0.5.
    cells_v = v_starts.shape[0] - 1
    cells_u = u_starts.shape[0] - 1
    width = u_starts[-1]
    inverse_cells_u = 1.0 / cells_u
    sums[:] = 0.0
    for by in numba.prange(cells_v):
        v0 = v_starts[by]
        v1 = v_starts[by + 1]
        candidates = np.empty(9, np.int32)
        cu = np.empty(9, np.float32)
        cv = np.empty(9, np.float32)
        ci = np.empty(9, np.float32)
        cd = np.empty(9, np.float32)
        cw = np.empty(9, np.float32)
        for bx in range(cells_u):
            # The 9 candidates. At the border the clamped neighbour repeats, which keeps
            # the cost loop branch-free because a repeat never wins a strict comparison.
            k = 0
            for dy in range(-1, 2):
                sy = min(max(by + dy, 0), cells_v - 1)
                for dx in range(-1, 2):
                    sx = min(max(bx + dx, 0), cells_u - 1)
                    s = sy * cells_u + sx
                    candidates[k] = s
                    cu[k] = seed_u[s]
                    cv[k] = seed_v[s]
                    ci[k] = seed_intensity[s]
                    has_depth = seed_depth[s] > 0
                    cd[k] = np.float32(1.0) / seed_depth[s] if has_depth else np.float32(0.0)
                    # The depth term counts only when the seed has depth ...
                    cw[k] = inverse_depth_weight if has_depth else np.float32(0.0)
                    k += 1

            # Pixels go in runs of 8, a loop of constant length that the compiler turns
            # into vector code, and then one by one for the rest of the cell.
            u_stop = u_starts[bx + 1]
            for v in range(v0, v1, row_step):
                fv = np.float32(v)
                u_first = u_starts[bx]
                while u_first < u_stop:
                    if u_first + 8 <= u_stop:
                        for j in range(8):
                            _label_pixel(
                                image, inverse_depth, labels, v, u_first + j, fv,
                                candidates, cu, cv, ci, cd, cw, spatial_weight, intensity_weight,
                            )
                        u_first += 8
                    else:
                        _label_pixel(
                            image, inverse_depth, labels, v, u_first, fv,
                            candidates, cu, cv, ci, cd, cw, spatial_weight, intensity_weight,
                        )
                        u_first += 1

        # Sums for the seed update come in a separate sweep, because a scatter inside
        # the cost loop keeps that loop from vectorizing. Runs of pixels with the same label are
        # summed in registers and added to their slot at the end of the run, which
        # avoids a load-add-store chain per pixel. The depth gets one Huber step
        # around the seed's current depth, with weight 1 inside the threshold and
        # delta/|r| outside. A seed without depth takes the plain mean.
        row_v = 0.5 * (row_step - 1)
        for v in range(v0, v1, row_step):
            run = labels[v, 0]
            seed_d = seed_depth[run] if run >= 0 else np.float32(np.nan)
            n = 0.0
            sum_u = 0.0
            sum_i = 0.0
            n_depth = 0.0
            sum_d = 0.0
            sum_w = 0.0
            sum_wd = 0.0
            for u in range(width + 1):
                s = labels[v, u] if u < width else -2
                if s != run:
                    if run >= 0:
                        # run // cells_u without an integer division (exact below 2**31).
                        seed_row = int((run + 0.5) * inverse_cells_u)
                        slot = run * 3 + by - seed_row + 1
                        sums[slot, 0] += n
                        sums[slot, 1] += sum_u
                        sums[slot, 2] += n * (v + row_v)
                        sums[slot, 3] += sum_i
                        sums[slot, 4] += n_depth
                        sums[slot, 5] += sum_d
                        sums[slot, 6] += sum_w
                        sums[slot, 7] += sum_wd
                    if u == width:
                        break
                    run = s
                    seed_d = seed_depth[s] if s >= 0 else np.float32(np.nan)
                    n = 0.0
                    sum_u = 0.0
                    sum_i = 0.0
                    n_depth = 0.0
                    sum_d = 0.0
                    sum_w = 0.0
                    sum_wd = 0.0
                n += 1.0
                sum_u += u
                sum_i += image[v, u]
                if inverse_depth[v, u] > 0:
                    d = depth[v, u]
                    n_depth += 1.0
                    sum_d += d
                    if seed_d > 0:
                        r = abs(d - seed_d)
                        w = np.float32(1.0) if r <= huber_delta else huber_delta / r
                        sum_w += w
                        sum_wd += w * d


@numba.njit(cache=True, nogil=True)
def _seeds_from_sums(sums, totals, seed_u, seed_v, seed_intensity, seed_depth):  # pragma: no cover
    # Each seed's totals are the sums of its 3 slots. Seeds without pixels keep their
    # previous values and may win pixels back.
    for s in range(seed_u.shape[0]):
        for f in range(_SUM_FIELDS):
            totals[s, f] = sums[3 * s, f] + sums[3 * s + 1, f] + sums[3 * s + 2, f]
        n = totals[s, 0]
        if n == 0:
            continue
        seed_u[s] = totals[s, 1] / n
        seed_v[s] = totals[s, 2] / n
        seed_intensity[s] = totals[s, 3] / n
        if totals[s, 6] > 0:
            seed_depth[s] = totals[s, 7] / totals[s, 6]
        elif totals[s, 4] > 0:
            seed_depth[s] = totals[s, 5] / totals[s, 4]
        else:
            seed_depth[s] = np.nan


@numba.njit(cache=True, nogil=True, parallel=True)
def _sort_pixels_by_slot(labels, v_starts, cells_u, slot_counts):  # pragma: no cover
    # Counting sort with the slots of _assign_pixels as buckets: a slot is filled by one
    # block row in raster order, and a seed's slots follow its block rows, so each
    # superpixel's pixels come out in increasing flat index.
    cells_v = v_starts.shape[0] - 1
    width = labels.shape[1]
    inverse_cells_u = 1.0 / cells_u
    slot_offsets = np.zeros(slot_counts.shape[0] + 1, np.int64)
    for i in range(slot_counts.shape[0]):
        slot_offsets[i + 1] = slot_offsets[i] + slot_counts[i]
    indices = np.empty(slot_offsets[-1], np.int32)
    cursor = slot_offsets[:-1].copy()
    for by in numba.prange(cells_v):
        for v in range(v_starts[by], v_starts[by + 1]):
            for u in range(width):
                s = labels[v, u]
                if s < 0:
                    continue
                # s // cells_u without an integer division (exact below 2**31).
                seed_row = int((s + 0.5) * inverse_cells_u)
                slot = s * 3 + by - seed_row + 1
                indices[cursor[slot]] = v * width + u
                cursor[slot] += 1
    return slot_offsets[::3].copy(), indices


@numba.njit(cache=True, nogil=True)
def _sort_pixels_by_label(labels, count):  # pragma: no cover - numba kernel
    # Counting sort for labels of any layout: histogram, offsets, one stable scatter.
    flat = labels.reshape(-1)
    offsets = np.zeros(count + 1, np.int64)
    for i in range(flat.shape[0]):
        s = flat[i]
        if s >= 0:
            offsets[s + 1] += 1
    for s in range(count):
        offsets[s + 1] += offsets[s]
    cursor = offsets[:-1].copy()
    indices = np.empty(offsets[count], np.int32)
    for i in range(flat.shape[0]):
        s = flat[i]
        if s >= 0:
            indices[cursor[s]] = i
            cursor[s] += 1
    return offsets, indices


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, parallel=True)
def _refine_depth(offsets, indices, depth, huber_delta, iterations, estimate):  # pragma: no cover
    # Huber IRLS steps of each superpixel's depth over its pixels with depth, from the
    # given estimate, skipped where that is NaN (no depth). The depths are gathered
    # once into a buffer, so the steps run on contiguous memory.
    count = offsets.shape[0] - 1
    chunk_size = 64
    max_pixels = 0
    for s in range(count):
        max_pixels = max(max_pixels, offsets[s + 1] - offsets[s])
    for chunk in numba.prange((count + chunk_size - 1) // chunk_size):
        values = np.empty(max_pixels, np.float32)
        for s in range(chunk * chunk_size, min(count, (chunk + 1) * chunk_size)):
            current = estimate[s]
            if not current > 0 or iterations == 0:
                continue
            n = 0
            for j in range(offsets[s], offsets[s + 1]):
                d = depth[indices[j]]
                if d > 0.0 and d < np.inf:
                    values[n] = d
                    n += 1
            for _ in range(iterations):
                sum_w = np.float32(0.0)
                sum_wd = np.float32(0.0)
                for i in range(n):
                    r = abs(values[i] - current)
                    w = min(np.float32(1.0), huber_delta / max(r, np.float32(1e-30)))
                    sum_w += w
                    sum_wd += w * values[i]
                if sum_w > 0:
                    current = sum_wd / sum_w
            estimate[s] = current
