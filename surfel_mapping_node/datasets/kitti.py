"""Reader of KITTI odometry stereo sequences.

Layout of one sequence XX:

- ``ROOT/sequences/XX/image_0`` and ``image_1``: rectified gray left and right images,
  or ``image_2`` and ``image_3``: rectified color.
- ``ROOT/sequences/XX/calib.txt``: rows ``P0:`` … ``P3:``, the 3×4 projection matrices.
  A ``Tr:`` row and missing rows are tolerated.
- ``ROOT/sequences/XX/times.txt``: one stamp in seconds per image.
- ``ROOT/poses/XX.txt``: 12 numbers per line, the camera-to-world pose of cam0 (gray left).

Frames carry the right image and the baseline, so depth comes from stereo.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.datasets.base import Frame, read_image
from surfel_mapping_node.poses import check_pose, nearest_rigid

logger = logging.getLogger(__name__)


class KittiOdometryDataset:
    """Random-access reader of one KITTI odometry sequence.

    Args:
        root: the dataset folder holding ``sequences/`` and ``poses/``.
        sequence: the sequence number, e.g. "00" or 0.
        color: read the color pair (image_2, image_3, P2, P3) instead of the gray pair.

    Raises:
        FileNotFoundError: when a folder, calib.txt, times.txt, the poses file or an image
            is missing (the message names the path).
        ValueError: when calib.txt lacks the rows of the chosen pair, a row has other than
            12 numbers, or times and poses disagree in length with the images.
    """

    def __init__(self, root: str | Path, sequence: str | int = "00", color: bool = False) -> None:
        self.root = Path(root)
        self.sequence = f"{int(sequence):02d}" if str(sequence).isdigit() else str(sequence)
        self.color = color
        sequence_dir = self.root / "sequences" / self.sequence
        if not sequence_dir.is_dir():
            raise FileNotFoundError(f"KITTI sequence folder not found: {sequence_dir}")
        left_name, right_name = ("image_2", "image_3") if color else ("image_0", "image_1")
        self._left_dir = sequence_dir / left_name
        self._right_dir = sequence_dir / right_name
        for folder in (self._left_dir, self._right_dir):
            if not folder.is_dir():
                raise FileNotFoundError(f"KITTI image folder not found: {folder}")

        # Calibration: P_left and P_right of the chosen pair.
        calib_path = sequence_dir / "calib.txt"
        projections = read_calibration(calib_path)
        left_key, right_key = ("P2", "P3") if color else ("P0", "P1")
        for key in (left_key, right_key):
            if key not in projections:
                found = ", ".join(sorted(projections)) or "none"
                raise ValueError(
                    f"calibration {calib_path} has no {key}: row, needed for the "
                    f"{'color' if color else 'gray'} pair (rows found: {found})"
                )
        P_left, P_right = projections[left_key], projections[right_key]

        # Images: the left folder defines the frames; each needs its right image.
        self._names = sorted(p.name for p in self._left_dir.glob("*.png"))
        if not self._names:
            raise FileNotFoundError(f"no .png images in {self._left_dir}")
        first = read_image(self._left_dir / self._names[0], color)
        height, width = first.shape[:2]
        self.camera = PinholeCamera.from_P(P_left, width, height)
        # Rectified cameras differ by a translation t = K⁻¹·P[:, 3] (p_cam = p_cam0 + t).
        t_left = np.linalg.solve(P_left[:, :3], P_left[:, 3])
        t_right = np.linalg.solve(P_right[:, :3], P_right[:, 3])
        self.baseline_m = float(t_left[0] - t_right[0])
        if not self.baseline_m > 0:
            raise ValueError(
                f"invalid calibration {calib_path}: baseline {self.baseline_m:.4f} m from "
                f"{left_key}/{right_key} is not > 0; check that the rows are left then right"
            )
        T_cam0_camera = np.eye(4)
        T_cam0_camera[:3, 3] = -t_left

        # Stamps and poses, one line per image.
        times_path = sequence_dir / "times.txt"
        times_s = _read_rows(times_path, columns=1)[:, 0]
        poses_path = self.root / "poses" / f"{self.sequence}.txt"
        poses = _read_rows(poses_path, columns=12)
        for path, rows in ((times_path, len(times_s)), (poses_path, len(poses))):
            if rows < len(self._names):
                raise ValueError(f"{path} has {rows} lines for {len(self._names)} images in {self._left_dir}")
        self._stamps_ns = np.round(times_s * 1e9).astype(np.int64)
        self._poses = [
            nearest_rigid(check_pose(row.reshape(3, 4), name=f"pose on line {i + 1} of {poses_path}"))
            @ T_cam0_camera
            for i, row in enumerate(poses[: len(self._names)])
        ]
        logger.info(
            "KITTI %s sequence %s: %d %s pairs, %dx%d, baseline %.3f m",
            self.root,
            self.sequence,
            len(self),
            "color" if color else "gray",
            width,
            height,
            self.baseline_m,
        )

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[Frame]:
        for index in range(len(self)):
            yield self[index]

    def __getitem__(self, index: int) -> Frame:
        """Return stereo frame ``index`` (negative counts from the end).

        Raises:
            IndexError: when index is out of range.
            FileNotFoundError, ValueError: when an image is missing or unreadable.
        """
        if not -len(self) <= index < len(self):
            raise IndexError(f"frame index {index} out of range for a dataset of {len(self)} frames")
        index %= len(self)
        name = self._names[index]

        left = read_image(self._left_dir / name, self.color)
        right = read_image(self._right_dir / name, self.color)
        for folder, image in ((self._left_dir, left), (self._right_dir, right)):
            try:
                self.camera.check_image_shape(image.shape, "image")
            except ValueError as error:
                raise ValueError(f"{folder / name}: {error}") from error

        return Frame(
            index=index,
            stamp_ns=int(self._stamps_ns[index]),
            image=left,
            camera=self.camera,
            T_world_camera=self._poses[index].copy(),
            right_image=right,
            baseline_m=self.baseline_m,
        )


def read_calibration(path: str | Path) -> dict[str, np.ndarray]:
    """Return the 3×4 projection matrices of a KITTI calib.txt by row name ("P0" … "P3").

    Rows other than P0…P3 (such as ``Tr:``) are skipped; missing rows are simply absent.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when a P row does not hold 12 numbers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"KITTI calibration not found: {path}")
    projections: dict[str, np.ndarray] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        key, _, values = line.partition(":")
        key = key.strip()
        if key not in ("P0", "P1", "P2", "P3"):
            continue
        try:
            numbers = np.array([float(v) for v in values.split()])
        except ValueError as error:
            raise ValueError(f"failed to parse row {key} on line {number} of {path}: {error}") from error
        if numbers.size != 12:
            raise ValueError(
                f"invalid row {key} on line {number} of {path}: {numbers.size} numbers, expected 12 (3x4)"
            )
        projections[key] = numbers.reshape(3, 4)
    return projections


def _read_rows(path: Path, columns: int) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"KITTI file not found: {path}")
    try:
        rows = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as error:
        raise ValueError(f"failed to parse {path}: {error}") from error
    if rows.size and rows.shape[1] != columns:
        raise ValueError(f"invalid {path}: {rows.shape[1]} numbers per line, expected {columns}")
    return rows.reshape(-1, columns)
