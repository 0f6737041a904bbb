"""Tests of the surfel storage: growth, removal, parking per keyframe and rigid corrections."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from surfel_mapping_node.surfel_map import SurfelBlock, SurfelMap


def _surfels(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    normal = rng.normal(size=(count, 3))
    return {
        "position_m": rng.uniform(-5.0, 5.0, size=(count, 3)),
        "normal": normal / np.linalg.norm(normal, axis=1, keepdims=True),
        "color_rgb": rng.integers(0, 256, size=(count, 3), dtype=np.uint8),
        "radius_m": rng.uniform(0.01, 0.05, size=count),
        "weight": rng.uniform(0.1, 1.0, size=count),
    }


def _map_with_keyframes(rng: np.random.Generator, counts: dict[int, int]) -> tuple[SurfelMap, dict]:
    """Build a map whose keyframe k owns counts[k] random surfels; return it and the surfels per keyframe."""
    surfel_map = SurfelMap()
    surfel_map.activate(counts)
    added = {}
    for keyframe_id, count in counts.items():
        added[keyframe_id] = _surfels(rng, count)
        surfel_map.add(**added[keyframe_id], keyframe_id=keyframe_id, keyframe_count=1, stamp_ns=7)
    return surfel_map, added


def test_block_append_grows_and_keeps_values() -> None:
    rng = np.random.default_rng(0)
    block = SurfelBlock()
    batches = [_surfels(rng, count) for count in (1, 50, 100, 300)]
    capacities = []
    for batch in batches:
        block.append(**batch, keyframe_id=3, keyframe_count=2, stamp_ns=11)
        capacities.append(block.capacity)

    assert len(block) == 451
    # Capacity at least doubles when it grows, so appends are amortized O(1).
    assert capacities == sorted(capacities)
    assert all(b >= 2 * a or b == a for a, b in itertools.pairwise(capacities))
    expected = np.concatenate([batch["position_m"] for batch in batches]).astype(np.float32)
    np.testing.assert_array_equal(block.position_m, expected)
    assert block.position_m.dtype == np.float32
    assert block.color_rgb.dtype == np.uint8
    assert block.keyframe_id.dtype == np.int64
    assert np.all(block.update_count == 1)
    assert np.all(block.created_ns == 11)
    assert np.all(block.alive)


def test_block_take_and_compact() -> None:
    rng = np.random.default_rng(1)
    block = SurfelBlock()
    batch = _surfels(rng, 10)
    block.append(**batch, keyframe_id=1, keyframe_count=1, stamp_ns=0)
    keep = np.arange(10) % 3 == 0

    taken = block.take(keep)
    block.compact(keep)

    expected = batch["position_m"][keep].astype(np.float32)
    np.testing.assert_array_equal(taken.position_m, expected)
    np.testing.assert_array_equal(block.position_m, expected)
    assert len(block) == 4


def test_empty_map_gathers_nothing() -> None:
    surfel_map = SurfelMap()

    everything = surfel_map.gather_all()

    assert len(surfel_map) == 0
    assert len(everything) == 0
    assert everything.position_m.shape == (0, 3)
    assert surfel_map.count_by_keyframe() == {}


def test_activate_parks_and_loads_by_keyframe() -> None:
    rng = np.random.default_rng(2)
    surfel_map, added = _map_with_keyframes(rng, {10: 5, 20: 7, 30: 9})

    stats = surfel_map.activate([20])

    assert stats.keyframes_parked == 2
    assert stats.surfels_parked == 14
    assert surfel_map.active_count == 7
    assert sorted(surfel_map.parked_keyframe_ids) == [10, 30]
    assert len(surfel_map) == 21
    np.testing.assert_array_equal(surfel_map.active.position_m, added[20]["position_m"].astype(np.float32))

    stats = surfel_map.activate([20, 30])

    assert stats.keyframes_loaded == 1
    assert stats.surfels_loaded == 9
    assert surfel_map.active_count == 16
    assert surfel_map.count_by_keyframe() == {10: 5, 20: 7, 30: 9}


def test_activate_unchanged_set_moves_nothing() -> None:
    rng = np.random.default_rng(3)
    surfel_map, _ = _map_with_keyframes(rng, {1: 4, 2: 4})

    stats = surfel_map.activate([2, 1])

    assert stats.surfels_parked == 0
    assert stats.surfels_loaded == 0


def test_gather_returns_owned_surfels() -> None:
    rng = np.random.default_rng(4)
    surfel_map, added = _map_with_keyframes(rng, {1: 3, 2: 4, 3: 5})
    surfel_map.activate([1, 2])

    parked = surfel_map.gather([3])
    active = surfel_map.gather([2])

    np.testing.assert_array_equal(parked.position_m, added[3]["position_m"].astype(np.float32))
    np.testing.assert_array_equal(active.position_m, added[2]["position_m"].astype(np.float32))
    assert np.all(parked.keyframe_id == 3)
    assert len(surfel_map.gather([1, 3])) == 8


def test_remove_active_marks_then_compacts() -> None:
    rng = np.random.default_rng(5)
    surfel_map, added = _map_with_keyframes(rng, {1: 100})

    removed = surfel_map.remove_active(np.array([0, 1, 2, 2]))

    assert removed == 3
    assert len(surfel_map) == 97
    # Below the compaction threshold the rows stay, marked dead.
    assert len(surfel_map.active) == 100
    assert surfel_map.remove_active(np.array([1])) == 0

    surfel_map.remove_active(np.arange(3, 40))

    assert len(surfel_map.active) == 60
    np.testing.assert_array_equal(
        surfel_map.active.position_m, added[1]["position_m"][40:].astype(np.float32)
    )


def test_add_to_inactive_keyframe_raises() -> None:
    rng = np.random.default_rng(6)
    surfel_map = SurfelMap()
    surfel_map.activate([1])

    with pytest.raises(ValueError, match="keyframe 2 is not active"):
        surfel_map.add(**_surfels(rng, 2), keyframe_id=2, keyframe_count=1, stamp_ns=0)


@pytest.mark.parametrize("parked", [False, True])
def test_corrections_move_each_keyframe_exactly(parked: bool) -> None:
    rng = np.random.default_rng(7)
    surfel_map, added = _map_with_keyframes(rng, {1: 20, 2: 30, 3: 10})
    if parked:
        surfel_map.activate([3])
    T_rotation_only = np.eye(4)
    T_rotation_only[:3, :3] = Rotation.from_euler("xyz", [0.2, -0.1, 0.3]).as_matrix()
    T_general = np.eye(4)
    T_general[:3, :3] = Rotation.from_euler("z", 0.05).as_matrix()
    T_general[:3, 3] = [0.5, -0.2, 0.1]

    moved = surfel_map.apply_corrections({1: T_rotation_only, 2: T_general})

    assert moved == 50
    for keyframe_id, T in ((1, T_rotation_only), (2, T_general), (3, np.eye(4))):
        block = surfel_map.gather([keyframe_id])
        position = added[keyframe_id]["position_m"].astype(np.float32).astype(np.float64)
        normal = added[keyframe_id]["normal"].astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(block.position_m, position @ T[:3, :3].T + T[:3, 3], atol=1e-6)
        np.testing.assert_allclose(block.normal, normal @ T[:3, :3].T, atol=1e-6)


def test_memory_bytes_counts_capacity() -> None:
    rng = np.random.default_rng(8)
    surfel_map, _ = _map_with_keyframes(rng, {1: 10})

    # 64 rows is the smallest capacity. Each row takes the bytes of every attribute.
    row_bytes = 12 + 12 + 3 + 4 + 4 + 4 + 8 + 8 + 8 + 8 + 1
    assert surfel_map.memory_bytes() == 64 * row_bytes
