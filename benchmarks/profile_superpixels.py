"""Time superpixels and surfel extraction on real frames, and measure their iterations.

Runs, in one process:
  - 7-Scenes redkitchen 640×480 RGB-D: median wall and CPU time per frame of
    compute_superpixels and extract_surfels (after one warm-up call that compiles the
    numba kernels), with the numba threads available and with one thread;
  - KITTI 1241×376 with SGBM depth (128 disparities, block 5, 3-way; not timed);
  - optionally (--iterations-study) the effect of the SLIC iteration count on the
    superpixels and surfels of the 7-Scenes frames.
The machine is shared: the load average is printed with the figures, and CPU time is
given beside wall time because it depends much less on other processes.

  python -m benchmarks.profile_superpixels [--data ../shared/data] [--frames 20]
  python -m benchmarks.profile_superpixels --iterations-study --write
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RgbdFrame:
    image: np.ndarray  # (H, W, 3) uint8 RGB, or (H, W) uint8 gray
    gray: np.ndarray  # (H, W) uint8
    depth_m: np.ndarray  # (H, W) float32, NaN = no depth


@dataclass
class StageTimes:
    superpixels_ms: list[float]
    surfels_ms: list[float]
    superpixels_cpu_ms: list[float]
    surfels_cpu_ms: list[float]
    valid_fraction: list[float]

    def row(self, label: str) -> str:
        total = np.add(self.superpixels_ms, self.surfels_ms)
        total_cpu = np.add(self.superpixels_cpu_ms, self.surfels_cpu_ms)
        return (
            f"| {label} | {np.median(self.superpixels_ms):.1f} | {np.median(self.surfels_ms):.1f} "
            f"| {np.median(total):.1f} | {np.median(total_cpu):.1f} "
            f"| {np.mean(self.valid_fraction):.2f} |"
        )


def load_seven_scenes(folder: Path, count: int, step: int) -> list[RgbdFrame]:
    import cv2

    from surfel_mapping_node.depth import decode_depth

    frames = []
    for index in range(0, count * step, step):
        bgr = cv2.imread(str(folder / f"frame-{index:06d}.color.jpg"))
        raw = cv2.imread(str(folder / f"frame-{index:06d}.depth.png"), cv2.IMREAD_UNCHANGED)
        raw = np.where(raw == 65535, 0, raw).astype(np.uint16)
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        frames.append(RgbdFrame(rgb, gray, decode_depth(raw, 0.001, 0.1, 10.0)))
    return frames


def load_kitti(folder: Path, count: int, max_depth_m: float) -> list[RgbdFrame]:
    import cv2

    from surfel_mapping_node.config import StereoConfig
    from surfel_mapping_node.stereo import StereoDepthEstimator

    sequence = folder / "sequences" / "00"
    rows = {}
    for line in (sequence / "calib.txt").read_text().splitlines():
        name, _, values = line.partition(":")
        rows[name.strip()] = np.array(values.split(), np.float64).reshape(3, 4)
    fx = rows["P0"][0, 0]
    baseline_m = -rows["P1"][0, 3] / fx
    estimator = StereoDepthEstimator(StereoConfig(), fx, baseline_m, 0.1, max_depth_m)
    frames = []
    for index in range(count):
        left = cv2.imread(str(sequence / "image_0" / f"{index:06d}.png"), cv2.IMREAD_GRAYSCALE)
        right = cv2.imread(str(sequence / "image_1" / f"{index:06d}.png"), cv2.IMREAD_GRAYSCALE)
        frames.append(RgbdFrame(left, left, estimator.compute(left, right).depth_m))
    return frames


def time_stages(frames: list[RgbdFrame], camera, config) -> StageTimes:
    from surfel_mapping_node.superpixels import compute_superpixels
    from surfel_mapping_node.surfel_extraction import extract_surfels

    first = frames[0]
    extract_surfels(compute_superpixels(first.gray, first.depth_m, config.superpixels),
                    first.image, first.depth_m, camera, config.surfels)
    times = StageTimes([], [], [], [], [])
    for frame in frames:
        wall0, cpu0 = time.perf_counter(), time.process_time()
        sp = compute_superpixels(frame.gray, frame.depth_m, config.superpixels)
        wall1, cpu1 = time.perf_counter(), time.process_time()
        surfels = extract_surfels(sp, frame.image, frame.depth_m, camera, config.surfels)
        wall2, cpu2 = time.perf_counter(), time.process_time()
        times.superpixels_ms.append((wall1 - wall0) * 1e3)
        times.surfels_ms.append((wall2 - wall1) * 1e3)
        times.superpixels_cpu_ms.append((cpu1 - cpu0) * 1e3)
        times.surfels_cpu_ms.append((cpu2 - cpu1) * 1e3)
        times.valid_fraction.append(float(surfels.valid.mean()))
    return times


def iterations_study(frames: list[RgbdFrame], camera, config) -> list[str]:
    """Superpixel and surfel quality against the SLIC iteration count."""
    from surfel_mapping_node.superpixels import compute_superpixels
    from surfel_mapping_node.surfel_extraction import extract_surfels

    lines = [
        "| iterations | labels changed by one more iteration | intensity std within superpixels "
        "| depth spread within superpixels (mm, median MAD) | superpixels making a surfel "
        "| plane RMS of surfel pixels (mm) |",
        "|---|---|---|---|---|---|",
    ]
    for iterations in (1, 2, 3, 5, 10, 20):
        changed, spread_i, spread_d, valid, rms = [], [], [], [], []
        for frame in frames:
            sp_config = replace(config.superpixels, iterations=iterations)
            sp = compute_superpixels(frame.gray, frame.depth_m, sp_config)
            more_config = replace(sp_config, iterations=iterations + 1)
            more = compute_superpixels(frame.gray, frame.depth_m, more_config)
            surfels = extract_surfels(sp, frame.image, frame.depth_m, camera, config.surfels)
            changed.append(float(np.mean(sp.labels != more.labels)))
            stats = _within_superpixel_spread(sp, frame, surfels, camera)
            spread_i.append(stats[0])
            spread_d.append(stats[1])
            rms.append(stats[2])
            valid.append(float(surfels.valid.mean()))
        lines.append(
            f"| {iterations} | {np.mean(changed) * 100:.1f} % | {np.mean(spread_i):.2f} "
            f"| {np.mean(spread_d) * 1e3:.1f} | {np.mean(valid) * 100:.1f} % | {np.mean(rms) * 1e3:.2f} |"
        )
    return lines


def _within_superpixel_spread(sp, frame: RgbdFrame, surfels, camera) -> tuple[float, float, float]:
    """Pixel-weighted intensity std, median depth MAD, and plane RMS of valid surfels."""
    labels = sp.labels.reshape(-1)
    gray = frame.gray.reshape(-1).astype(np.float64)
    count = sp.count
    n = np.maximum(np.bincount(labels, minlength=count), 1)
    mean = np.bincount(labels, gray, minlength=count) / n
    intensity_std = float(np.sqrt(np.sum((gray - mean[labels]) ** 2) / labels.size))

    depth = frame.depth_m.reshape(-1)
    has = np.isfinite(depth)
    deviation = np.abs(depth[has] - sp.depth_m[labels[has]])
    depth_mad = float(np.nanmedian(deviation))

    v, u = np.divmod(np.arange(labels.size), camera.width)
    points = camera.backproject(u[has], v[has], depth[has])
    owner = labels[has]
    ok = surfels.valid[owner]
    offsets = np.einsum(
        "ij,ij->i", points[ok] - surfels.position_camera[owner[ok]], surfels.normal_camera[owner[ok]]
    )
    inlier = np.abs(offsets) <= 0.05
    rms = float(np.sqrt(np.mean(offsets[inlier] ** 2)))
    return intensity_std, depth_mad, rms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=REPO_ROOT.parent / "shared" / "data",
                        help="folder with 7scenes_redkitchen/ and kitti_odometry/")
    parser.add_argument("--frames", type=int, default=20, help="7-Scenes frames to time (every 3rd)")
    parser.add_argument("--kitti-frames", type=int, default=10, help="KITTI pairs to time")
    parser.add_argument("--iterations-study", action="store_true",
                        help="also measure the effect of the SLIC iteration count (slow)")
    parser.add_argument("--write", action="store_true",
                        help="write the results into docs/benchmarks.md (section superpixels)")
    args = parser.parse_args(argv)

    import numba

    from surfel_mapping_node.camera import PinholeCamera
    from surfel_mapping_node.config import MapperConfig, preset_for_format

    seven_scenes = args.data / "7scenes_redkitchen"
    kitti = args.data / "kitti_odometry"
    if not (seven_scenes / "camera-intrinsics.txt").is_file():
        print(f"error: 7-Scenes excerpt not found in {seven_scenes}: pass --data", file=sys.stderr)
        return 2

    rgbd_config = MapperConfig()
    rgbd_camera = PinholeCamera(640, 480, 585.0, 585.0, 320.0, 240.0)
    rgbd_frames = load_seven_scenes(seven_scenes, args.frames, step=3)
    kitti_frames: list[RgbdFrame] = []
    kitti_config = MapperConfig.from_dict(preset_for_format("kitti"))
    kitti_camera = PinholeCamera(1241, 376, 718.856, 718.856, 607.1928, 185.2157)
    if (kitti / "sequences" / "00" / "calib.txt").is_file() and args.kitti_frames > 0:
        kitti_frames = load_kitti(kitti, args.kitti_frames, kitti_config.depth.max_depth_m)

    threads = numba.get_num_threads()
    load_before = os.getloadavg()[0]
    rows = []
    for thread_count in sorted({threads, 1}, reverse=True):
        numba.set_num_threads(thread_count)
        label = f"{thread_count} thread{'s' if thread_count > 1 else ''}"
        rows.append(time_stages(rgbd_frames, rgbd_camera, rgbd_config).row(
            f"7-Scenes 640×480, {len(rgbd_frames)} frames, {label}"))
        if kitti_frames:
            rows.append(time_stages(kitti_frames, kitti_camera, kitti_config).row(
                f"KITTI 1241×376 SGBM, {len(kitti_frames)} frames, {label}"))
    numba.set_num_threads(threads)
    load_after = os.getloadavg()[0]

    lines = [
        "Median per frame, milliseconds; CPU is the process's CPU time (all threads). "
        f"Load average before/after: {load_before:.1f}/{load_after:.1f} on {os.cpu_count()} cores.",
        "",
        "| data | superpixels (ms) | surfels (ms) | both (ms) | both, CPU (ms) "
        "| superpixels making a surfel |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    if args.iterations_study:
        lines += ["", "SLIC iterations (7-Scenes frames above, default config otherwise):", "",
                  *iterations_study(rgbd_frames, rgbd_camera, rgbd_config)]
    text = "\n".join(lines)
    print(text)
    if args.write:
        from benchmarks.report import write_section

        path = write_section("superpixels", "Superpixels and surfel extraction", text)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
