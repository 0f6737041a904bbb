"""Surfel storage: a struct of arrays per block, with the local map kept active.

A surfel is a small oriented disc in the world frame. ``SurfelBlock`` stores surfels
as one numpy array per attribute and grows by capacity doubling, so appending is
amortized O(1) per surfel and no Python object exists per surfel.

``SurfelMap`` keeps the surfels of the keyframes in the local map in one *active*
block, where fusion works on them every frame, and *parks* the surfels of every
other keyframe in one block per keyframe. Activating a keyframe set moves only the
surfels of the keyframes that enter or leave it, so the per-frame cost depends on
the size of the local map, not on the size of the whole map.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

# Attribute name -> (dtype, shape of one surfel's value).
SURFEL_FIELDS: dict[str, tuple[type, tuple[int, ...]]] = {
    # Disc centre in the world frame, metres.
    "position_m": (np.float32, (3,)),
    # Unit normal in the world frame, facing the camera that made the surfel.
    "normal": (np.float32, (3,)),
    "color_rgb": (np.uint8, (3,)),
    "radius_m": (np.float32, ()),
    # Fusion weight (confidence), capped at FusionConfig.max_weight.
    "weight": (np.float32, ()),
    # Number of observations fused into the surfel, its creation included.
    "update_count": (np.int32, ()),
    # Id of the owning keyframe: the one whose frame last updated the surfel.
    "keyframe_id": (np.int64, ()),
    # KeyframeGraph.count (keyframes made so far) when the surfel was last updated.
    "last_update_keyframe_count": (np.int64, ()),
    "created_ns": (np.int64, ()),
    "updated_ns": (np.int64, ()),
    # False for rows removed from the active block and not yet compacted away.
    "alive": (np.bool_, ()),
}

# The active block is compacted once this fraction of its rows is removed.
_COMPACT_DEAD_FRACTION = 0.25


class SurfelBlock:
    """Surfels as a struct of arrays with capacity-doubling growth.

    Each attribute in ``SURFEL_FIELDS`` is a property that returns a view of the
    first ``len(block)`` rows; writing into that view updates the block.
    """

    def __init__(self, capacity: int = 0) -> None:
        self._size = 0
        self._data = {
            name: np.zeros((capacity, *shape), dtype=dtype) for name, (dtype, shape) in SURFEL_FIELDS.items()
        }

    def __len__(self) -> int:
        return self._size

    @property
    def capacity(self) -> int:
        return len(self._data["alive"])

    def field(self, name: str) -> np.ndarray:
        """Return the view of attribute ``name`` over the stored rows."""
        return self._data[name][: self._size]

    position_m = property(lambda self: self.field("position_m"))
    normal = property(lambda self: self.field("normal"))
    color_rgb = property(lambda self: self.field("color_rgb"))
    radius_m = property(lambda self: self.field("radius_m"))
    weight = property(lambda self: self.field("weight"))
    update_count = property(lambda self: self.field("update_count"))
    keyframe_id = property(lambda self: self.field("keyframe_id"))
    last_update_keyframe_count = property(lambda self: self.field("last_update_keyframe_count"))
    created_ns = property(lambda self: self.field("created_ns"))
    updated_ns = property(lambda self: self.field("updated_ns"))
    alive = property(lambda self: self.field("alive"))

    def reserve(self, capacity: int) -> None:
        """Grow the arrays to hold at least ``capacity`` rows (at least doubling them)."""
        if capacity <= self.capacity:
            return
        new_capacity = max(capacity, 2 * self.capacity, 64)
        for name, array in self._data.items():
            grown = np.zeros((new_capacity, *array.shape[1:]), dtype=array.dtype)
            grown[: self._size] = array[: self._size]
            self._data[name] = grown

    def append(
        self,
        *,
        position_m: np.ndarray,
        normal: np.ndarray,
        color_rgb: np.ndarray,
        radius_m: np.ndarray,
        weight: np.ndarray,
        keyframe_id: int,
        keyframe_count: int,
        stamp_ns: int,
    ) -> slice:
        """Append new surfels observed once; return the slice of their rows.

        position_m, normal: (N, 3) in the world frame. color_rgb: (N, 3) uint8.
        radius_m, weight: (N,). keyframe_id: the owning keyframe of all N surfels.
        """
        count = len(position_m)
        start = self._size
        self.reserve(start + count)
        rows = slice(start, start + count)
        data = self._data
        data["position_m"][rows] = position_m
        data["normal"][rows] = normal
        data["color_rgb"][rows] = color_rgb
        data["radius_m"][rows] = radius_m
        data["weight"][rows] = weight
        data["update_count"][rows] = 1
        data["keyframe_id"][rows] = keyframe_id
        data["last_update_keyframe_count"][rows] = keyframe_count
        data["created_ns"][rows] = stamp_ns
        data["updated_ns"][rows] = stamp_ns
        data["alive"][rows] = True
        self._size = start + count
        return rows

    def extend(self, other: SurfelBlock) -> slice:
        """Append all rows of ``other``; return the slice of their rows here."""
        start = self._size
        self.reserve(start + len(other))
        rows = slice(start, start + len(other))
        for name, array in self._data.items():
            array[rows] = other.field(name)
        self._size = start + len(other)
        return rows

    def take(self, rows: np.ndarray) -> SurfelBlock:
        """Return a new block with copies of the given rows (indices or a boolean mask)."""
        result = SurfelBlock()
        result._data = {name: array[: self._size][rows] for name, array in self._data.items()}
        result._size = len(result._data["alive"])
        return result

    def compact(self, keep: np.ndarray) -> None:
        """Keep only the rows where the boolean mask ``keep`` is True, in order."""
        kept_count = int(np.count_nonzero(keep))
        for array in self._data.values():
            array[:kept_count] = array[: self._size][keep]
        self._size = kept_count

    def transform_rows(self, rows: np.ndarray, rotations: np.ndarray, translations_m: np.ndarray) -> None:
        """Apply one rigid transform per row: p' = R·p + t to positions, n' = R·n to normals.

        rows: (M,) row indices. rotations: (M, 3, 3). translations_m: (M, 3).
        Computed in float64 and stored as float32.
        """
        position = self._data["position_m"][rows].astype(np.float64)
        normal = self._data["normal"][rows].astype(np.float64)
        self._data["position_m"][rows] = np.einsum("mij,mj->mi", rotations, position) + translations_m
        self._data["normal"][rows] = np.einsum("mij,mj->mi", rotations, normal)

    def transform_all(self, T: np.ndarray) -> None:
        """Apply one rigid transform T (4×4, float64) to every row."""
        R = T[:3, :3]
        position = self.position_m.astype(np.float64)
        self.position_m[:] = position @ R.T + T[:3, 3]
        self.normal[:] = self.normal.astype(np.float64) @ R.T


@dataclass
class ActivationStats:
    """Counts of the keyframes and surfels that one SurfelMap.activate call moved."""

    keyframes_parked: int = 0
    surfels_parked: int = 0
    keyframes_loaded: int = 0
    surfels_loaded: int = 0


class SurfelMap:
    """All surfels of a map: the local map's in one active block, the rest parked per keyframe.

    Invariant: the surfels of a keyframe are either all in the active block (its id is
    in ``active_keyframe_ids``) or all in its parked block.
    """

    def __init__(self) -> None:
        self.active = SurfelBlock()
        self._active_keyframe_ids: set[int] = set()
        self._parked: dict[int, SurfelBlock] = {}
        self._parked_count = 0
        self._dead_rows = 0

    def __len__(self) -> int:
        """Return the number of surfels in the map."""
        return len(self.active) - self._dead_rows + self._parked_count

    @property
    def active_keyframe_ids(self) -> frozenset[int]:
        return frozenset(self._active_keyframe_ids)

    @property
    def active_count(self) -> int:
        """Return the number of surfels in the active block."""
        return len(self.active) - self._dead_rows

    @property
    def parked_keyframe_ids(self) -> list[int]:
        return list(self._parked)

    def activate(self, keyframe_ids: Iterable[int]) -> ActivationStats:
        """Make exactly ``keyframe_ids`` the active keyframes.

        The surfels of active keyframes that are not in the set are parked, and the
        parked surfels of keyframes in the set are loaded. Ids without surfels are
        fine. Cost: proportional to the active block plus the loaded surfels, and
        nothing at all when the set is unchanged.
        """
        requested = set(keyframe_ids)
        stats = ActivationStats()
        if requested == self._active_keyframe_ids:
            return stats

        leaving = self._active_keyframe_ids - requested
        if leaving:
            stats = self._park(leaving)

        for keyframe_id in requested - self._active_keyframe_ids:
            block = self._parked.pop(keyframe_id, None)
            if block is not None:
                self.active.extend(block)
                self._parked_count -= len(block)
                stats.keyframes_loaded += 1
                stats.surfels_loaded += len(block)

        self._active_keyframe_ids = requested
        return stats

    def _park(self, leaving: set[int]) -> ActivationStats:
        owner = self.active.keyframe_id
        leaving_ids = np.fromiter(leaving, dtype=np.int64, count=len(leaving))
        is_leaving = np.isin(owner, leaving_ids) & self.active.alive
        rows = np.flatnonzero(is_leaving)
        stats = ActivationStats()
        if len(rows):
            # One stable sort groups the leaving rows by keyframe.
            rows = rows[np.argsort(owner[rows], kind="stable")]
            sorted_owner = owner[rows]
            starts = np.flatnonzero(np.r_[True, sorted_owner[1:] != sorted_owner[:-1]])
            ends = np.r_[starts[1:], len(rows)]
            for start, end in zip(starts, ends, strict=True):
                self._parked[int(sorted_owner[start])] = self.active.take(rows[start:end])
            stats.keyframes_parked = len(starts)
            stats.surfels_parked = len(rows)
            self._parked_count += len(rows)
            # The copies are parked; the active rows die and are compacted away in bulk,
            # as removed rows are, so that parking costs no full copy of the active block.
            self.active.alive[rows] = False
            self._dead_rows += len(rows)
            if self._dead_rows > _COMPACT_DEAD_FRACTION * len(self.active):
                self._compact_active()
        return stats

    def add(
        self,
        *,
        position_m: np.ndarray,
        normal: np.ndarray,
        color_rgb: np.ndarray,
        radius_m: np.ndarray,
        weight: np.ndarray,
        keyframe_id: int,
        keyframe_count: int,
        stamp_ns: int,
    ) -> slice:
        """Append new surfels owned by an active keyframe to the active block.

        Raises:
            ValueError: keyframe_id is not active, so its surfels would break the
                all-active-or-all-parked invariant.
        """
        if keyframe_id not in self._active_keyframe_ids:
            raise ValueError(
                f"keyframe {keyframe_id} is not active: call activate() with it before adding its surfels"
            )
        return self.active.append(
            position_m=position_m,
            normal=normal,
            color_rgb=color_rgb,
            radius_m=radius_m,
            weight=weight,
            keyframe_id=keyframe_id,
            keyframe_count=keyframe_count,
            stamp_ns=stamp_ns,
        )

    def remove_active(self, rows: np.ndarray) -> int:
        """Remove active rows (indices, repeats allowed); return how many were alive before.

        Rows are marked dead and compacted away in bulk later, so removal costs
        amortized O(1) per row; readers of ``active`` must check ``active.alive``.
        """
        rows = np.unique(rows)
        alive = self.active.alive
        removed = int(np.count_nonzero(alive[rows]))
        alive[rows] = False
        self._dead_rows += removed
        if self._dead_rows > _COMPACT_DEAD_FRACTION * len(self.active):
            self._compact_active()
        return removed

    def _compact_active(self) -> None:
        if self._dead_rows:
            self.active.compact(self.active.alive.copy())
            self._dead_rows = 0

    def apply_corrections(self, T_correction_by_id: dict[int, np.ndarray]) -> int:
        """Move each keyframe's surfels by its correction T_new·T_old⁻¹; return the surfels moved.

        T_correction_by_id: keyframe id -> 4×4 float64 rigid transform in the world frame.
        Ids without surfels are ignored.
        """
        moved = 0
        for keyframe_id, T in T_correction_by_id.items():
            block = self._parked.get(keyframe_id)
            if block is not None:
                block.transform_all(T)
                moved += len(block)

        active_ids = [k for k in T_correction_by_id if k in self._active_keyframe_ids]
        if active_ids and len(self.active):
            ids = np.array(sorted(active_ids), dtype=np.int64)
            owner = self.active.keyframe_id
            slot = np.minimum(np.searchsorted(ids, owner), len(ids) - 1)
            rows = np.flatnonzero((ids[slot] == owner) & self.active.alive)
            if len(rows):
                transforms = np.stack([T_correction_by_id[int(k)] for k in ids])
                transform_index = slot[rows]
                self.active.transform_rows(
                    rows, transforms[transform_index, :3, :3], transforms[transform_index, :3, 3]
                )
                moved += len(rows)
        return moved

    def gather(self, keyframe_ids: Iterable[int]) -> SurfelBlock:
        """Return a copy of the surfels owned by the given keyframes.

        Cost: proportional to their parked surfels plus the active block.
        """
        ids = set(keyframe_ids)
        result = SurfelBlock()
        for keyframe_id in ids:
            block = self._parked.get(keyframe_id)
            if block is not None:
                result.extend(block)

        active_ids = ids & self._active_keyframe_ids
        if active_ids:
            requested = np.fromiter(active_ids, dtype=np.int64, count=len(active_ids))
            keep = np.isin(self.active.keyframe_id, requested) & self.active.alive
            result.extend(self.active.take(keep))
        return result

    def gather_active(self) -> SurfelBlock:
        """Return a copy of the alive surfels of the active keyframes."""
        return self.active.take(self.active.alive)

    def gather_all(self) -> SurfelBlock:
        """Return a copy of every surfel of the map, active ones first."""
        result = self.gather_active()
        for block in self._parked.values():
            result.extend(block)
        return result

    def memory_bytes(self) -> int:
        """Return the bytes held by all surfel arrays, spare capacity included."""
        blocks = [self.active, *self._parked.values()]
        return sum(array.nbytes for block in blocks for array in block._data.values())

    def count_by_keyframe(self) -> dict[int, int]:
        """Return keyframe id -> number of surfels it owns (keyframes without surfels are absent)."""
        counts = {keyframe_id: len(block) for keyframe_id, block in self._parked.items() if len(block)}
        owner = self.active.keyframe_id[self.active.alive]
        ids, active_counts = np.unique(owner, return_counts=True)
        counts.update({int(k): int(c) for k, c in zip(ids, active_counts, strict=True)})
        return counts
