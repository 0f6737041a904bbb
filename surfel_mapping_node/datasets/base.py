"""The interface every dataset reader implements, and the frame it yields."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from surfel_mapping_node.camera import PinholeCamera


@dataclass
class Frame:
    """One recorded frame, as stored (depth is decoded later, by depth.py or stereo.py)."""

    # Position of the frame in the dataset (0-based, before --first/--stride).
    index: int
    stamp_ns: int
    # (H, W) uint8 intensity or (H, W, 3) uint8 RGB; the left image for stereo.
    image: np.ndarray
    camera: PinholeCamera
    # 4×4 camera-to-world pose (ground truth or SLAM), optical frame.
    T_world_camera: np.ndarray
    # RGB-D: (H, W) depth as stored (uint16 units of depth_scale, or float32 metres).
    depth_raw: np.ndarray | None = None
    # Metres per unit of a uint16 depth_raw.
    depth_scale: float = 0.001
    # Stereo: (H, W) rectified right image, and the baseline in metres.
    right_image: np.ndarray | None = None
    baseline_m: float | None = None
    # Keyframe id when the source marks keyframes, else None.
    keyframe_id: int | None = None


class Dataset(Protocol):
    """A sequence of frames with random access."""

    camera: PinholeCamera

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Frame: ...

    def __iter__(self) -> Iterator[Frame]: ...


def read_image(path: Path, color: bool = True) -> np.ndarray:
    """Read an 8-bit image file as (H, W, 3) RGB or, with COLOR false, (H, W) gray.

    Raises:
        FileNotFoundError: when PATH does not exist.
        ValueError: when the file cannot be decoded as an image.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{'color' if color else 'gray'} image not found: {path}")
    image = cv2.imread(str(path), cv2.IMREAD_COLOR if color else cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ValueError(f"failed to decode image {path}: the file is corrupt or not an image")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if color else image
