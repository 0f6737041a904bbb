"""Tests of keyframe selection, the keyframe graph, the local map and pose corrections."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from surfel_mapping_node.config import ConfigError, KeyframeConfig
from surfel_mapping_node.keyframes import KeyframeGraph, rotation_angle_rad
from surfel_mapping_node.poses import InvalidPoseError


def _pose(x_m: float = 0.0, y_m: float = 0.0, z_m: float = 0.0, yaw_deg: float = 0.0) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = Rotation.from_euler("y", yaw_deg, degrees=True).as_matrix()
    T[:3, 3] = [x_m, y_m, z_m]
    return T


def _chain(graph: KeyframeGraph, count: int, spacing_m: float) -> list[int]:
    """Add `count` keyframes along x, each marked by the pose source with id 100 + i."""
    ids = []
    for i in range(count):
        decision = graph.select(_pose(x_m=i * spacing_m), stamp_ns=i, keyframe_id=100 + i)
        ids.append(decision.keyframe_id)
    return ids


def test_first_frame_becomes_keyframe_with_stamp_id() -> None:
    graph = KeyframeGraph(KeyframeConfig())

    decision = graph.select(_pose(), stamp_ns=1_000)

    assert decision.keyframe_id == 1_000
    assert decision.is_new
    assert graph.current_id == 1_000
    assert not graph[1_000].from_pose_source


def test_selection_by_translation_threshold() -> None:
    graph = KeyframeGraph(KeyframeConfig(min_translation_m=0.1, min_rotation_deg=10.0))
    graph.select(_pose(), stamp_ns=1)

    below = graph.select(_pose(x_m=0.09), stamp_ns=2)
    above = graph.select(_pose(x_m=0.11), stamp_ns=3)

    assert below.keyframe_id == 1
    assert not below.is_new
    assert above.keyframe_id == 3
    assert above.is_new


def test_selection_by_rotation_threshold() -> None:
    graph = KeyframeGraph(KeyframeConfig(min_translation_m=0.1, min_rotation_deg=10.0))
    graph.select(_pose(), stamp_ns=1)

    below = graph.select(_pose(yaw_deg=9.0), stamp_ns=2)
    above = graph.select(_pose(yaw_deg=11.0), stamp_ns=3)

    assert not below.is_new
    assert above.is_new
    # Motion is measured from the current keyframe, not from the previous frame.
    assert not graph.select(_pose(yaw_deg=20.0), stamp_ns=4).is_new


def test_selection_by_pose_source_id() -> None:
    graph = KeyframeGraph(KeyframeConfig())
    graph.select(_pose(), stamp_ns=1, keyframe_id=7)

    marked = graph.select(_pose(x_m=0.01), stamp_ns=2, keyframe_id=8)
    again = graph.select(_pose(x_m=0.02), stamp_ns=3, keyframe_id=7)

    assert marked == (8, True)
    assert graph[8].from_pose_source
    assert again == (7, False)
    assert graph.current_id == 7
    assert len(graph) == 2


def test_consecutive_keyframes_are_linked() -> None:
    graph = KeyframeGraph(KeyframeConfig())

    ids = _chain(graph, 4, spacing_m=0.2)

    assert graph[ids[0]].neighbors == {ids[1]}
    assert graph[ids[1]].neighbors == {ids[0], ids[2]}
    assert graph[ids[3]].neighbors == {ids[2]}


def test_local_map_limited_by_hops() -> None:
    graph = KeyframeGraph(KeyframeConfig(local_map_hops=3, local_map_radius_m=100.0, revisit_links=0))
    ids = _chain(graph, 10, spacing_m=0.2)

    local_map = graph.local_map()

    assert local_map == [ids[9], ids[8], ids[7], ids[6]]
    assert sorted(graph.local_map(ids[4])) == sorted(ids[1:8])


def test_local_map_limited_by_radius() -> None:
    graph = KeyframeGraph(KeyframeConfig(local_map_hops=20, local_map_radius_m=2.5))
    ids = _chain(graph, 10, spacing_m=1.0)

    local_map = graph.local_map()

    assert sorted(local_map) == sorted(ids[7:])


def test_local_map_search_passes_outside_radius() -> None:
    graph = KeyframeGraph(KeyframeConfig(local_map_hops=5, local_map_radius_m=1.0, revisit_links=0))
    # Out 3 m and back: the keyframe at the start is 4 hops away through far keyframes.
    for i, x_m in enumerate([0.0, 1.5, 3.0, 1.5, 0.1]):
        graph.select(_pose(x_m=x_m), stamp_ns=i, keyframe_id=i)

    assert sorted(graph.local_map()) == [0, 4]


def test_revisit_links_old_nearby_keyframe() -> None:
    graph = KeyframeGraph(KeyframeConfig(local_map_hops=3, local_map_radius_m=1.0, revisit_links=1))
    for i, x_m in enumerate([0.0, 2.0, 4.0, 6.0, 8.0, 6.0, 4.0, 2.0, 0.05]):
        graph.select(_pose(x_m=x_m), stamp_ns=i, keyframe_id=i)

    # Keyframe 8 is back at the start. Keyframe 0 is 8 chain hops away but linked directly.
    assert 0 in graph[8].neighbors
    assert 0 in graph.local_map()


def test_walking_straight_makes_no_revisit_links() -> None:
    # Keyframes 0.5 m apart on a line: the ones just passed are near, but not revisited.
    graph = KeyframeGraph(KeyframeConfig(local_map_hops=3, local_map_radius_m=2.0, revisit_links=2))
    for i in range(40):
        graph.select(_pose(x_m=0.5 * i), stamp_ns=i, keyframe_id=i)

    for i in range(40):
        assert graph[i].neighbors <= {i - 1, i + 1}
    # Three hops back from keyframe 39, all within the 2 m radius.
    assert sorted(graph.local_map()) == [36, 37, 38, 39]


def test_update_poses_returns_exact_corrections() -> None:
    graph = KeyframeGraph(KeyframeConfig())
    _chain(graph, 3, spacing_m=0.5)
    T_old_101 = graph[101].T_world_keyframe.copy()
    # A rotation-only correction: the position stays exactly where it was.
    T_new_101 = T_old_101.copy()
    T_new_101[:3, :3] = Rotation.from_euler("x", 0.01).as_matrix()
    T_new_102 = _pose(x_m=1.0, y_m=0.3)

    correction = graph.update_poses({102: T_new_102, 101: T_new_101, 100: graph[100].T_world_keyframe})

    assert sorted(correction.T_correction_by_id) == [101, 102]
    np.testing.assert_allclose(correction.T_correction_by_id[101] @ T_old_101, T_new_101, atol=1e-12)
    np.testing.assert_allclose(graph[101].T_world_keyframe, T_new_101, atol=1e-12)
    np.testing.assert_allclose(graph[102].T_world_keyframe, T_new_102, atol=1e-12)
    assert correction.unknown_ids == []


def test_update_poses_ignores_changes_within_tolerance() -> None:
    graph = KeyframeGraph(KeyframeConfig(pose_update_tolerance_m=1e-6, pose_update_tolerance_deg=1e-5))
    _chain(graph, 1, spacing_m=0.0)
    T_tiny = _pose(x_m=1e-7, yaw_deg=1e-6)
    T_small_rotation = _pose(yaw_deg=1e-4)

    tiny = graph.update_poses({100: T_tiny})
    small_rotation = graph.update_poses({100: T_small_rotation})

    assert tiny.T_correction_by_id == {}
    assert list(small_rotation.T_correction_by_id) == [100]


def test_update_poses_reports_unknown_ids(caplog: pytest.LogCaptureFixture) -> None:
    graph = KeyframeGraph(KeyframeConfig())
    _chain(graph, 2, spacing_m=0.5)

    correction = graph.update_poses({999: _pose(), 5: _pose(), 101: _pose(x_m=0.6)})

    assert correction.unknown_ids == [5, 999]
    assert list(correction.T_correction_by_id) == [101]
    assert "unknown keyframe" in caplog.text


def test_update_poses_by_id_after_reordering_and_removal() -> None:
    graph = KeyframeGraph(KeyframeConfig())
    ids = _chain(graph, 5, spacing_m=0.5)
    # The pose source culled keyframe 102 and lists the rest in another order.
    new_poses = {
        keyframe_id: _pose(x_m=10.0 + keyframe_id) for keyframe_id in reversed(ids) if keyframe_id != 102
    }

    correction = graph.update_poses(new_poses)

    assert sorted(correction.T_correction_by_id) == [100, 101, 103, 104]
    for keyframe_id, T in new_poses.items():
        np.testing.assert_allclose(graph[keyframe_id].T_world_keyframe, T, atol=1e-12)
    np.testing.assert_allclose(graph[102].T_world_keyframe, _pose(x_m=1.0), atol=1e-12)


def test_mapper_keyframes_move_with_their_anchor() -> None:
    graph = KeyframeGraph(KeyframeConfig(min_translation_m=0.1))
    graph.select(_pose(), stamp_ns=1, keyframe_id=50)
    graph.select(_pose(x_m=0.2), stamp_ns=2)
    T_anchor_new = _pose(y_m=0.5, yaw_deg=3.0)

    correction = graph.update_poses({50: T_anchor_new})

    assert graph[2].anchor_id == 50
    np.testing.assert_allclose(correction.T_correction_by_id[2], correction.T_correction_by_id[50])
    np.testing.assert_allclose(graph[2].T_world_keyframe, T_anchor_new @ _pose(x_m=0.2), atol=1e-12)


def test_update_poses_rejects_invalid_pose() -> None:
    graph = KeyframeGraph(KeyframeConfig())
    _chain(graph, 2, spacing_m=0.5)
    T_nan = _pose()
    T_nan[0, 3] = np.nan

    with pytest.raises(InvalidPoseError, match="pose of keyframe 101"):
        graph.update_poses({100: _pose(x_m=3.0), 101: T_nan})
    # Nothing is applied when one pose is invalid.
    np.testing.assert_allclose(graph[100].T_world_keyframe, _pose(), atol=0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("min_translation_m", -0.1),
        ("local_map_hops", -1),
        ("revisit_links", -2),
        ("local_map_radius_m", math.nan),
    ],
)
def test_invalid_config_raises(field: str, value: float) -> None:
    config = KeyframeConfig(**{field: value})

    with pytest.raises(ConfigError, match=f"keyframes.{field}"):
        KeyframeGraph(config)


def test_rotation_angle_precise_for_small_angles() -> None:
    for angle_rad in (1e-9, 1e-5, 0.3, 3.0):
        R = Rotation.from_rotvec([0.0, angle_rad, 0.0]).as_matrix()
        np.testing.assert_allclose(rotation_angle_rad(R), angle_rad, rtol=1e-6)
