"""Reader of RGB-D sequences in the 7-Scenes / 3DMatch layout.

One folder holds, per frame NNNNNN, ``frame-NNNNNN.color.jpg`` (or ``.png``),
``frame-NNNNNN.depth.png`` (uint16 millimetres; 0 and 65535 mean "no measurement")
and ``frame-NNNNNN.pose.txt`` (4×4 camera-to-world), plus ``camera-intrinsics.txt``
(3×3 K) in the folder or its parent. The sensor ran at 30 Hz and the files carry no
stamps, so frame NNNNNN is stamped NNNNNN/30 s.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.datasets.base import Frame, read_image
from surfel_mapping_node.depth import MILLIMETRES_SCALE, read_depth_image
from surfel_mapping_node.poses import check_pose, nearest_rigid

logger = logging.getLogger(__name__)

FRAME_RATE_HZ = 30.0
_DEPTH_NAME = re.compile(r"^frame-(\d+)\.depth\.png$")


class SevenScenesDataset:
    """Random-access reader of one 7-Scenes (or 3DMatch) sequence folder.

    Args:
        root: the sequence folder with the frame-NNNNNN.* files.
        camera: intrinsics to use; by default they come from camera-intrinsics.txt in
            ``root`` or its parent, with the size of the first depth image.
        depth_scale: metres per unit of the depth PNGs (millimetres by default).

    Raises:
        FileNotFoundError: when the folder, the intrinsics or any frame's color, depth
            or pose file is missing (the message names the path).
        ValueError: when camera-intrinsics.txt is not a 3×3 matrix.
    """

    def __init__(
        self, root: str | Path, camera: PinholeCamera | None = None, depth_scale: float = MILLIMETRES_SCALE
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"7-Scenes folder not found: {self.root}")
        self.depth_scale = float(depth_scale)

        # Frames are the depth images; each needs its color image and pose.
        numbers = sorted(
            int(match.group(1)) for match in (_DEPTH_NAME.match(p.name) for p in self.root.iterdir()) if match
        )
        if not numbers:
            raise FileNotFoundError(f"no frame-NNNNNN.depth.png files in {self.root}")
        self._frame_numbers = numbers
        self._color_paths = [self._color_path(n) for n in numbers]
        for n in numbers:
            pose_path = self._path(n, "pose.txt")
            if not pose_path.is_file():
                raise FileNotFoundError(f"pose file not found: {pose_path}")

        first_depth = read_depth_image(self._path(numbers[0], "depth.png"))
        height, width = first_depth.shape
        self.camera = camera if camera is not None else self._read_camera(width, height)
        logger.info("7-Scenes %s: %d frames, %dx%d", self.root, len(numbers), width, height)

    def __len__(self) -> int:
        return len(self._frame_numbers)

    def __iter__(self) -> Iterator[Frame]:
        for index in range(len(self)):
            yield self[index]

    def __getitem__(self, index: int) -> Frame:
        """Return frame ``index`` (0-based position in the folder; negative counts from the end).

        Raises:
            IndexError: when index is out of range.
            FileNotFoundError, ValueError: when a file is missing, unreadable or invalid.
        """
        index = _check_index(index, len(self))
        number = self._frame_numbers[index]

        image_rgb = read_image(self._color_paths[index])
        depth_path = self._path(number, "depth.png")
        depth_raw = read_depth_image(depth_path)
        try:
            self.camera.check_image_shape(depth_raw.shape, "depth image")
        except ValueError as error:
            raise ValueError(f"{depth_path}: {error}") from error
        if image_rgb.shape[:2] != depth_raw.shape:
            # 7-Scenes color and depth are both 640×480; resample color when a variant differs.
            image_rgb = cv2.resize(image_rgb, depth_raw.shape[::-1], interpolation=cv2.INTER_AREA)
        T_world_camera = _read_pose(self._path(number, "pose.txt"))

        return Frame(
            index=index,
            stamp_ns=round(number * 1e9 / FRAME_RATE_HZ),
            image=image_rgb,
            camera=self.camera,
            T_world_camera=T_world_camera,
            depth_raw=depth_raw,
            depth_scale=self.depth_scale,
        )

    def _path(self, number: int, suffix: str) -> Path:
        return self.root / f"frame-{number:06d}.{suffix}"

    def _color_path(self, number: int) -> Path:
        for suffix in ("color.png", "color.jpg"):
            path = self._path(number, suffix)
            if path.is_file():
                return path
        raise FileNotFoundError(f"color image not found: {self._path(number, 'color.png')} (or .jpg)")

    def _read_camera(self, width: int, height: int) -> PinholeCamera:
        candidates = [self.root / "camera-intrinsics.txt", self.root.parent / "camera-intrinsics.txt"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(
                f"camera intrinsics not found: {candidates[0]} or {candidates[1]}; "
                "pass camera=PinholeCamera(...) (7-Scenes: fx = fy = 585, cx = 320, cy = 240)"
            )
        try:
            K = np.loadtxt(path, dtype=np.float64)
        except ValueError as error:
            raise ValueError(f"failed to parse camera intrinsics {path}: {error}") from error
        if K.shape != (3, 3):
            raise ValueError(f"invalid camera intrinsics {path}: shape {K.shape}, expected a 3x3 matrix K")
        return PinholeCamera.from_K(K, width, height)


def _read_pose(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"pose file not found: {path}")
    try:
        T = np.loadtxt(path, dtype=np.float64)
    except ValueError as error:
        raise ValueError(f"failed to parse pose file {path}: {error}") from error
    # Raises InvalidPoseError for the inf poses 7-Scenes stores for untracked frames.
    return nearest_rigid(check_pose(T, name=f"pose in {path}"))


def _check_index(index: int, length: int) -> int:
    if not -length <= index < length:
        raise IndexError(f"frame index {index} out of range for a dataset of {length} frames")
    return index % length
