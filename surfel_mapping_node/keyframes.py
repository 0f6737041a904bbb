"""Keyframes, their graph, the local map and pose corrections after loop closure.

Keyframes are identified by a stable integer id, never by a position in a list, so
keyframes that a SLAM system culls or reorders keep their surfels. The id is the pose
source's keyframe id, or the frame's stamp in ns for keyframes the mapper makes.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from surfel_mapping_node.config import KeyframeConfig
from surfel_mapping_node.poses import check_pose, invert

logger = logging.getLogger(__name__)


@dataclass
class Keyframe:
    """One keyframe: its id, its pose and where it came from."""

    id: int
    # 4×4 float64 camera-to-world pose of the keyframe's camera.
    T_world_keyframe: np.ndarray
    stamp_ns: int
    # Creation order, 0-based (for logs and outlier ageing, never for lookup).
    index: int
    # True when the pose source marked this keyframe, False when the mapper made it.
    from_pose_source: bool
    # For a mapper-made keyframe, the pose-source keyframe it moves with when the pose
    # source corrects poses without naming it. None for pose-source keyframes.
    anchor_id: int | None = None
    neighbors: set[int] = field(default_factory=set)


class KeyframeDecision(NamedTuple):
    """The keyframe of a frame, and whether the frame made it."""

    keyframe_id: int
    is_new: bool


class PoseCorrection(NamedTuple):
    """Result of KeyframeGraph.update_poses."""

    # Keyframe id -> 4×4 world-frame correction T_new·T_old⁻¹, for keyframes that moved.
    T_correction_by_id: dict[int, np.ndarray]
    # Ids in the request that name no keyframe of the graph, sorted.
    unknown_ids: list[int]


def rotation_angle_rad(R: np.ndarray) -> float:
    """Return the angle of a 3×3 rotation, accurate for small angles.

    Uses θ = 2·asin(‖R − I‖_F / √8), which keeps full precision near 0, where the
    usual acos((tr R − 1)/2) loses it.
    """
    chord = np.linalg.norm(R - np.eye(3)) / math.sqrt(8.0)
    return 2.0 * math.asin(min(1.0, float(chord)))


class KeyframeGraph:
    """Keyframes connected by consecutive, revisit and covisibility links.

    Args:
        config: keyframe thresholds and local map size.

    Raises:
        ConfigError: a threshold is negative or local_map_hops < 0.
    """

    def __init__(self, config: KeyframeConfig) -> None:
        config.validate()
        self.config = config
        self._keyframes: dict[int, Keyframe] = {}
        self.current_id: int | None = None
        # Incremented on every change that can change a local map (links, poses).
        self.version = 0
        # Keyframe positions in creation order, and the distance travelled up to each
        # (metres along the keyframe chain), for the revisit search.
        self._positions_m = np.zeros((0, 3))
        self._travelled_m = np.zeros((0, 1))
        self._ids_in_order: list[int] = []

    def __len__(self) -> int:
        return len(self._keyframes)

    def __contains__(self, keyframe_id: object) -> bool:
        return keyframe_id in self._keyframes

    def __getitem__(self, keyframe_id: int) -> Keyframe:
        return self._keyframes[keyframe_id]

    @property
    def count(self) -> int:
        """Return the number of keyframes made so far."""
        return len(self._ids_in_order)

    @property
    def ids(self) -> list[int]:
        """Return the keyframe ids in creation order."""
        return list(self._ids_in_order)

    def select(
        self, T_world_camera: np.ndarray, stamp_ns: int, keyframe_id: int | None = None
    ) -> KeyframeDecision:
        """Decide the keyframe of a frame and make it the current one.

        A frame becomes a new keyframe when the pose source marks it with an id not
        yet known, when there is no keyframe yet, or when it moved more than
        ``min_translation_m`` or turned more than ``min_rotation_deg`` from the
        current keyframe. The mapper's own keyframes take ``stamp_ns`` as id.

        Args:
            T_world_camera: 4×4 camera-to-world pose of the frame, already checked.
            stamp_ns: frame time in ns.
            keyframe_id: the pose source's id when it marks this frame as a keyframe.
        """
        if keyframe_id is not None:
            keyframe_id = int(keyframe_id)
            if keyframe_id in self._keyframes:
                self._make_current(keyframe_id)
                return KeyframeDecision(keyframe_id, False)
            self.add(keyframe_id, T_world_camera, stamp_ns, from_pose_source=True)
            return KeyframeDecision(keyframe_id, True)

        if self.current_id is None or self._moved_enough(T_world_camera):
            new_id = int(stamp_ns)
            if new_id in self._keyframes:
                # NOTE: a stamp that already names a keyframe (a repeated frame or a
                # pose-source id equal to a stamp) reuses that keyframe.
                self._make_current(new_id)
                return KeyframeDecision(new_id, False)
            self.add(new_id, T_world_camera, stamp_ns, from_pose_source=False)
            return KeyframeDecision(new_id, True)

        return KeyframeDecision(self.current_id, False)

    def _moved_enough(self, T_world_camera: np.ndarray) -> bool:
        delta = invert(self._keyframes[self.current_id].T_world_keyframe) @ T_world_camera
        translation_m = float(np.linalg.norm(delta[:3, 3]))
        angle_deg = math.degrees(rotation_angle_rad(delta[:3, :3]))
        return translation_m > self.config.min_translation_m or angle_deg > self.config.min_rotation_deg

    def add(
        self, keyframe_id: int, T_world_keyframe: np.ndarray, stamp_ns: int, from_pose_source: bool
    ) -> Keyframe:
        """Add a keyframe, link it to the current one and to revisited ones, and make it current.

        Raises:
            ValueError: keyframe_id already names a keyframe.
        """
        if keyframe_id in self._keyframes:
            raise ValueError(f"keyframe {keyframe_id} already exists: use a new id or select() it")
        anchor_id = None
        if not from_pose_source and self.current_id is not None:
            current = self._keyframes[self.current_id]
            anchor_id = current.id if current.from_pose_source else current.anchor_id

        keyframe = Keyframe(
            id=keyframe_id,
            T_world_keyframe=np.array(T_world_keyframe, dtype=np.float64),
            stamp_ns=int(stamp_ns),
            index=self.count,
            from_pose_source=from_pose_source,
            anchor_id=anchor_id,
        )
        position_m = keyframe.T_world_keyframe[:3, 3]
        travelled_m = 0.0
        if self.count:
            travelled_m = self._travelled_m[self.count - 1, 0] + np.linalg.norm(
                position_m - self._positions_m[self.count - 1]
            )
        revisited = self._revisited_keyframes(position_m, travelled_m)
        self._keyframes[keyframe_id] = keyframe
        self._ids_in_order.append(keyframe_id)
        self._positions_m = _append_row(self._positions_m, self.count, position_m)
        self._travelled_m = _append_row(self._travelled_m, self.count, np.array([travelled_m]))

        for other_id in revisited:
            self.link(keyframe_id, other_id)
        self._make_current(keyframe_id)
        self.version += 1
        logger.debug(
            "new keyframe %d (index %d, linked to %s)",
            keyframe_id,
            keyframe.index,
            sorted(keyframe.neighbors),
        )
        return keyframe

    def _revisited_keyframes(self, position_m: np.ndarray, travelled_m: float) -> list[int]:
        """Return the nearest older keyframes of a place seen again.

        A candidate is more than local_map_hops keyframes older, within
        local_map_radius_m, and was passed more than twice that radius of travel ago.
        The last condition tells a return to a place from walking straight on: there the
        keyframes just passed are near in space and in travel alike, and linking them
        would let the local-map search reach ever further back along the chain.
        """
        links = self.config.revisit_links
        older = self.count - self.config.local_map_hops
        if links <= 0 or older <= 0:
            return []
        radius_m = self.config.local_map_radius_m
        distance_m = np.linalg.norm(self._positions_m[:older] - position_m, axis=1)
        is_return = travelled_m - self._travelled_m[:older, 0] > 2.0 * radius_m
        candidates = np.flatnonzero((distance_m <= radius_m) & is_return)
        nearest = candidates[np.argsort(distance_m[candidates])[:links]]
        return [self._ids_in_order[i] for i in nearest]

    def _make_current(self, keyframe_id: int) -> None:
        if self.current_id is not None and self.current_id != keyframe_id:
            self.link(self.current_id, keyframe_id)
        self.current_id = keyframe_id

    def link(self, a: int, b: int) -> bool:
        """Connect two keyframes; return True when the link is new."""
        if a == b or b in self._keyframes[a].neighbors:
            return False
        self._keyframes[a].neighbors.add(b)
        self._keyframes[b].neighbors.add(a)
        self.version += 1
        return True

    def local_map(self, center_id: int | None = None) -> list[int]:
        """Return the keyframes of the local map around ``center_id`` (default: the current one).

        A keyframe is in the local map when a breadth-first search reaches it within
        ``local_map_hops`` links and its position lies within ``local_map_radius_m`` of
        the centre keyframe's. The search passes through keyframes outside the radius.
        The centre comes first, then the others in BFS order.
        """
        if center_id is None:
            center_id = self.current_id
        if center_id is None:
            return []

        # Breadth-first search to local_map_hops links, through keyframes at any distance.
        hops = {center_id: 0}
        queue = deque([center_id])
        visited = []
        while queue:
            keyframe_id = queue.popleft()
            visited.append(keyframe_id)
            keyframe = self._keyframes[keyframe_id]
            if hops[keyframe_id] == self.config.local_map_hops:
                continue
            for neighbor in keyframe.neighbors:
                if neighbor not in hops:
                    hops[neighbor] = hops[keyframe_id] + 1
                    queue.append(neighbor)

        # Keep those within the radius, in one vectorized distance computation.
        rows = np.fromiter((self._keyframes[k].index for k in visited), dtype=np.int64, count=len(visited))
        positions_m = self._positions_m[rows]
        within = np.linalg.norm(positions_m - positions_m[0], axis=1) <= self.config.local_map_radius_m
        return [keyframe_id for keyframe_id, keep in zip(visited, within, strict=True) if keep]

    def update_poses(self, T_world_keyframe_by_id: dict[int, np.ndarray]) -> PoseCorrection:
        """Set corrected keyframe poses; return the correction of every keyframe that moved.

        A keyframe moved when its rotation changed by more than
        ``pose_update_tolerance_deg`` or its position by more than
        ``pose_update_tolerance_m``. Mapper-made keyframes that the request does not
        name move with their anchor (the pose-source keyframe they were made after).
        Unknown ids are returned and logged, not applied.

        Raises:
            InvalidPoseError: a pose is not a finite rigid transform; nothing is applied.
        """
        checked = {
            int(keyframe_id): check_pose(T, name=f"pose of keyframe {keyframe_id}")
            for keyframe_id, T in T_world_keyframe_by_id.items()
        }
        unknown_ids = sorted(k for k in checked if k not in self._keyframes)
        if unknown_ids:
            logger.warning(
                "pose update names %d unknown keyframe(s), ignored: %s", len(unknown_ids), unknown_ids[:10]
            )

        corrections: dict[int, np.ndarray] = {}
        for keyframe_id, T_new in checked.items():
            keyframe = self._keyframes.get(keyframe_id)
            if keyframe is not None and self._pose_changed(keyframe.T_world_keyframe, T_new):
                corrections[keyframe_id] = T_new @ invert(keyframe.T_world_keyframe)
                keyframe.T_world_keyframe = T_new

        for keyframe in self._keyframes.values():
            if keyframe.id not in checked and keyframe.anchor_id in corrections:
                T_correction = corrections[keyframe.anchor_id]
                corrections[keyframe.id] = T_correction
                keyframe.T_world_keyframe = T_correction @ keyframe.T_world_keyframe

        if corrections:
            for keyframe_id in corrections:
                keyframe = self._keyframes[keyframe_id]
                self._positions_m[keyframe.index] = keyframe.T_world_keyframe[:3, 3]
            self.version += 1
        return PoseCorrection(corrections, unknown_ids)

    def _pose_changed(self, T_old: np.ndarray, T_new: np.ndarray) -> bool:
        delta = invert(T_old) @ T_new
        translation_m = float(np.linalg.norm(T_new[:3, 3] - T_old[:3, 3]))
        angle_deg = math.degrees(rotation_angle_rad(delta[:3, :3]))
        return (
            translation_m > self.config.pose_update_tolerance_m
            or angle_deg > self.config.pose_update_tolerance_deg
        )


def _append_row(array: np.ndarray, size: int, row: np.ndarray) -> np.ndarray:
    """Store ``row`` at index ``size - 1`` of ``array``, doubling the array when it is full."""
    if size > len(array):
        grown = np.zeros((max(2 * len(array), 16), array.shape[1]))
        grown[: len(array)] = array
        array = grown
    array[size - 1] = row
    return array
