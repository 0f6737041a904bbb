"""Reader of TUM RGB-D sequences (rgb.txt, depth.txt, groundtruth.txt).

Each color image is matched with the depth image nearest in time and with the
ground-truth pose at its stamp, interpolated between the two mocap samples around it
(or the nearest sample within the tolerance). Color images without a match are
dropped and counted in the log. Depth PNGs store depth × 5000 (depth_scale 0.0002 m).
TUM ships no intrinsics file, so the camera is an option; the calibrated values of the
three Freiburg Kinects are offered as presets.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.transform import Rotation

from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.config import CameraConfig
from surfel_mapping_node.datasets.base import Frame, read_image
from surfel_mapping_node.depth import TUM_SCALE, read_depth_image

logger = logging.getLogger(__name__)

# Calibrated intrinsics of the TUM RGB-D Kinects (color camera, 640×480).
TUM_CAMERAS: dict[str, PinholeCamera] = {
    "freiburg1": PinholeCamera(640, 480, 517.3, 516.5, 318.6, 255.3),
    "freiburg2": PinholeCamera(640, 480, 520.9, 521.0, 325.1, 249.7),
    "freiburg3": PinholeCamera(640, 480, 535.4, 539.2, 320.1, 247.6),
}


@dataclass
class TumAssociation:
    """The depth image rows and poses matched to each kept color image."""

    color_index: np.ndarray  # (M,) int64 rows of rgb.txt that were kept
    depth_index: np.ndarray  # (M,) int64 rows of depth.txt, nearest in time
    T_world_camera: np.ndarray  # (M, 4, 4) float64 camera-to-world poses


class TumRgbdDataset:
    """Random-access reader of one TUM RGB-D sequence folder.

    Args:
        root: the sequence folder with rgb.txt, depth.txt and groundtruth.txt.
        camera: a PinholeCamera, a config camera section (CameraConfig with its values
            set) or a preset name: "freiburg1", "freiburg2" or "freiburg3".
        depth_scale: metres per unit of the depth PNGs (TUM's factor 5000 by default).
        max_time_difference_s: largest stamp difference for matching depth to color, and
            for taking the nearest pose when no interpolation is possible.
        max_pose_gap_s: poses are interpolated only between ground-truth samples at most
            this far apart. Across longer mocap gaps the nearest sample is used when it is
            within max_time_difference_s, and otherwise the frame is dropped.

    Raises:
        FileNotFoundError: when the folder or one of the three lists is missing.
        ValueError: for an unknown preset, an unset camera section, a malformed line or
            when no color image has both depth and a pose.
    """

    def __init__(
        self,
        root: str | Path,
        camera: PinholeCamera | CameraConfig | str = "freiburg1",
        depth_scale: float = TUM_SCALE,
        max_time_difference_s: float = 0.02,
        max_pose_gap_s: float = 0.1,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"TUM RGB-D folder not found: {self.root}")
        if not (math.isfinite(max_time_difference_s) and max_time_difference_s >= 0):
            raise ValueError(
                f"invalid max_time_difference_s={max_time_difference_s}: use a value >= 0 seconds"
            )
        self.camera = tum_camera(camera)
        self.depth_scale = float(depth_scale)

        # The three lists: stamps and files, and the mocap trajectory.
        color_stamps_ns, self._color_files = _read_file_list(self.root / "rgb.txt")
        depth_stamps_ns, self._depth_files = _read_file_list(self.root / "depth.txt")
        pose_stamps_ns, pose_values = _read_groundtruth(self.root / "groundtruth.txt")

        # Association by time.
        association = associate(
            color_stamps_ns,
            depth_stamps_ns,
            pose_stamps_ns,
            pose_values,
            max_time_difference_ns=round(max_time_difference_s * 1e9),
            max_pose_gap_ns=round(max_pose_gap_s * 1e9),
        )
        dropped = len(color_stamps_ns) - len(association.color_index)
        if len(association.color_index) == 0:
            raise ValueError(
                f"no color image in {self.root / 'rgb.txt'} has both a depth image and a pose within "
                f"{max_time_difference_s} s; check the files or raise max_time_difference_s"
            )
        if dropped:
            logger.warning(
                "TUM %s: dropped %d of %d color images without depth or pose within %.3f s",
                self.root, dropped, len(color_stamps_ns), max_time_difference_s,
            )
        self._association = association
        self._stamps_ns = color_stamps_ns[association.color_index]

    def __len__(self) -> int:
        return len(self._association.color_index)

    def __iter__(self) -> Iterator[Frame]:
        for index in range(len(self)):
            yield self[index]

    def __getitem__(self, index: int) -> Frame:
        """Return associated frame ``index`` (negative counts from the end).

        Raises:
            IndexError: when index is out of range.
            FileNotFoundError, ValueError: when an image is missing, unreadable or of
                another size than the camera.
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"frame index {index} out of range for a dataset of {len(self)} frames")
        index %= len(self)
        color_path = self.root / self._color_files[self._association.color_index[index]]
        depth_path = self.root / self._depth_files[self._association.depth_index[index]]

        image_rgb = read_image(color_path)
        depth_raw = read_depth_image(depth_path)
        checks = ((color_path, image_rgb.shape, "color image"), (depth_path, depth_raw.shape, "depth image"))
        for path, shape, kind in checks:
            try:
                self.camera.check_image_shape(shape, kind)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from error

        return Frame(
            index=index,
            stamp_ns=int(self._stamps_ns[index]),
            image=image_rgb,
            camera=self.camera,
            T_world_camera=self._association.T_world_camera[index].copy(),
            depth_raw=depth_raw,
            depth_scale=self.depth_scale,
        )


def tum_camera(camera: PinholeCamera | CameraConfig | str) -> PinholeCamera:
    """Return the PinholeCamera for a camera option of TumRgbdDataset.

    Raises:
        ValueError: for an unknown preset name or a CameraConfig whose values are unset.
    """
    if isinstance(camera, PinholeCamera):
        return camera
    if isinstance(camera, CameraConfig):
        if not camera.is_set():
            raise ValueError(
                "the camera section is not set (width, height, fx, fy are 0): set it in the config "
                f"or use a preset: {', '.join(TUM_CAMERAS)}"
            )
        return PinholeCamera(camera.width, camera.height, camera.fx, camera.fy, camera.cx, camera.cy)
    if isinstance(camera, str) and camera in TUM_CAMERAS:
        return TUM_CAMERAS[camera]
    raise ValueError(
        f"unknown TUM camera {camera!r}: use a PinholeCamera or one of {', '.join(TUM_CAMERAS)}"
    )


def associate(
    color_stamps_ns: np.ndarray,
    depth_stamps_ns: np.ndarray,
    pose_stamps_ns: np.ndarray,
    pose_values: np.ndarray,
    max_time_difference_ns: int,
    max_pose_gap_ns: int,
) -> TumAssociation:
    """Match each color stamp with the nearest depth stamp and a pose at its stamp.

    Args:
        color_stamps_ns, depth_stamps_ns, pose_stamps_ns: sorted int64 stamps.
        pose_values: (P, 7) tx ty tz qx qy qz qw, camera-to-world.
        max_time_difference_ns: largest |Δt| for the nearest depth and nearest pose.
        max_pose_gap_ns: poses are interpolated between samples at most this far apart.

    Returns:
        The kept color rows with their depth rows and poses; colors without a depth
        image or a pose are left out.
    """
    depth_index = _nearest(color_stamps_ns, depth_stamps_ns, max_time_difference_ns)
    pose_ok, T_world_camera = _poses_at(
        color_stamps_ns, pose_stamps_ns, pose_values, max_time_difference_ns, max_pose_gap_ns
    )
    keep = (depth_index >= 0) & pose_ok
    return TumAssociation(
        color_index=np.flatnonzero(keep),
        depth_index=depth_index[keep],
        T_world_camera=T_world_camera[keep],
    )


def _nearest(query_ns: np.ndarray, reference_ns: np.ndarray, max_difference_ns: int) -> np.ndarray:
    """Return the index of the nearest reference stamp per query, -1 when beyond the limit."""
    if len(reference_ns) == 0:
        return np.full(len(query_ns), -1, dtype=np.int64)
    right = np.clip(np.searchsorted(reference_ns, query_ns), 1, len(reference_ns) - 1)
    left = right - 1
    if len(reference_ns) == 1:
        left = right = np.zeros(len(query_ns), dtype=np.int64)
    nearest = np.where(
        np.abs(reference_ns[left] - query_ns) <= np.abs(reference_ns[right] - query_ns), left, right
    )
    return np.where(np.abs(reference_ns[nearest] - query_ns) <= max_difference_ns, nearest, -1)


def _poses_at(
    query_ns: np.ndarray,
    pose_stamps_ns: np.ndarray,
    pose_values: np.ndarray,
    max_difference_ns: int,
    max_gap_ns: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (found mask, (Q, 4, 4) poses): interpolated inside short gaps, else nearest."""
    count = len(query_ns)
    T = np.tile(np.eye(4), (count, 1, 1))
    if len(pose_stamps_ns) == 0:
        return np.zeros(count, dtype=bool), T
    rotations = Rotation.from_quat(pose_values[:, 3:7])

    # Interpolation between the samples around the stamp (linear, and slerp for rotation).
    last = max(len(pose_stamps_ns) - 1, 1)
    after = np.clip(np.searchsorted(pose_stamps_ns, query_ns, side="left"), 1, last)
    before = after - 1
    if len(pose_stamps_ns) >= 2:
        gap = pose_stamps_ns[after] - pose_stamps_ns[before]
        inside = (pose_stamps_ns[before] <= query_ns) & (query_ns <= pose_stamps_ns[after])
        interpolate = inside & (gap <= max_gap_ns) & (gap > 0)
    else:
        interpolate = np.zeros(count, dtype=bool)
    if interpolate.any():
        i0, i1 = before[interpolate], after[interpolate]
        fraction = (query_ns[interpolate] - pose_stamps_ns[i0]) / (pose_stamps_ns[i1] - pose_stamps_ns[i0])
        r0 = rotations[i0]
        delta = (r0.inv() * rotations[i1]).as_rotvec() * fraction[:, None]
        T[interpolate, :3, :3] = (r0 * Rotation.from_rotvec(delta)).as_matrix()
        t0, t1 = pose_values[i0, :3], pose_values[i1, :3]
        T[interpolate, :3, 3] = t0 + (t1 - t0) * fraction[:, None]

    # Elsewhere the nearest sample, when it is close enough.
    nearest = _nearest(query_ns, pose_stamps_ns, max_difference_ns)
    use_nearest = ~interpolate & (nearest >= 0)
    T[use_nearest, :3, :3] = rotations[nearest[use_nearest]].as_matrix()
    T[use_nearest, :3, 3] = pose_values[nearest[use_nearest], :3]
    return interpolate | use_nearest, T


def _stamp_ns(text: str) -> int:
    """Parse a stamp in seconds ("1305031102.175304") to integer nanoseconds exactly."""
    seconds, _, fraction = text.partition(".")
    if not (seconds.lstrip("-").isdigit() and (fraction == "" or fraction.isdigit())):
        raise ValueError(f"invalid stamp {text!r}")
    return int(seconds) * 1_000_000_000 + int((fraction + "000000000")[:9])


def _data_lines(path: Path) -> list[tuple[int, list[str]]]:
    if not path.is_file():
        raise FileNotFoundError(f"TUM file list not found: {path}")
    lines = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        words = line.split()
        if words and not words[0].startswith("#"):
            lines.append((number, words))
    return lines


def _read_file_list(path: Path) -> tuple[np.ndarray, list[str]]:
    stamps, files = [], []
    for number, words in _data_lines(path):
        if len(words) < 2:
            raise ValueError(f"invalid line {number} of {path}: expected 'timestamp filename'")
        try:
            stamps.append(_stamp_ns(words[0]))
        except ValueError as error:
            raise ValueError(f"invalid line {number} of {path}: {error}") from error
        files.append(words[1])
    order = np.argsort(stamps, kind="stable")
    return np.asarray(stamps, dtype=np.int64)[order], [files[i] for i in order]


def _read_groundtruth(path: Path) -> tuple[np.ndarray, np.ndarray]:
    stamps, values = [], []
    for number, words in _data_lines(path):
        try:
            if len(words) != 8:
                raise ValueError(f"{len(words)} values, expected 'timestamp tx ty tz qx qy qz qw'")
            stamps.append(_stamp_ns(words[0]))
            row = [float(w) for w in words[1:]]
            if not all(math.isfinite(v) for v in row) or np.linalg.norm(row[3:]) < 1e-9:
                raise ValueError("values must be finite with a non-zero quaternion")
            values.append(row)
        except ValueError as error:
            raise ValueError(f"invalid line {number} of {path}: {error}") from error
    order = np.argsort(stamps, kind="stable")
    values_array = np.asarray(values, dtype=np.float64).reshape(-1, 7)
    return np.asarray(stamps, dtype=np.int64)[order], values_array[order]
