"""Tests of the ROS-free stamp matcher FrameSynchronizer."""

from __future__ import annotations

import numpy as np
import pytest

from surfel_mapping_node.frame_sync import FrameSynchronizer, SyncError

MS = 1_000_000  # ns per millisecond


def make_sync(tolerance_ms: float = 10, queue_size: int | dict[str, int] = 10) -> FrameSynchronizer:
    return FrameSynchronizer(["image", "depth", "pose"], round(tolerance_ms * MS), queue_size)


def test_exact_stamps_match_in_any_arrival_order():
    sync = make_sync()

    assert sync.add("pose", 100 * MS, "p100") == []
    assert sync.add("image", 100 * MS, "i100") == []
    frames = sync.add("depth", 100 * MS, "d100")

    assert len(frames) == 1
    assert frames[0].stamp_ns == 100 * MS
    assert frames[0].payloads == {"image": "i100", "depth": "d100", "pose": "p100"}
    assert frames[0].stamps_ns == {"image": 100 * MS, "depth": 100 * MS, "pose": 100 * MS}
    assert sync.stats.matched == 1
    assert sync.stats.total_dropped() == 0


def test_nearest_partner_after_stream_passes_stamp():
    sync = make_sync(tolerance_ms=10)
    sync.add("image", 100 * MS, "i")
    sync.add("depth", 100 * MS, "d")
    sync.add("pose", 92 * MS, "p92")
    # The pose stream has not reached 100 ms: a closer pose may still come.
    assert sync.add("pose", 97 * MS, "p97") == []

    frames = sync.add("pose", 101 * MS, "p101")

    assert [f.payloads["pose"] for f in frames] == ["p101"]
    assert frames[0].stamps_ns["pose"] == 101 * MS


def test_image_newer_than_every_pose_dropped():
    # The original matching loop spun forever when the image was newer than the pose.
    sync = make_sync(tolerance_ms=10)
    sync.add("image", 100 * MS, "i100")
    sync.add("depth", 100 * MS, "d100")
    sync.add("pose", 50 * MS, "p50")
    assert sync.pending()["image"] == 1

    sync.add("pose", 150 * MS, "p150")

    assert sync.pending()["image"] == 0
    assert sync.stats.dropped_unmatched["image"] == 1
    assert sync.stats.matched == 0


def test_out_of_order_stamps_dropped():
    sync = make_sync()
    sync.add("pose", 200 * MS, "p200")

    assert sync.add("pose", 150 * MS, "p150") == []
    assert sync.add("pose", 200 * MS, "p200 again") == []

    assert sync.stats.dropped_out_of_order == {"image": 0, "depth": 0, "pose": 2}
    assert sync.stats.received["pose"] == 3


def test_partner_older_than_every_open_frame_is_late():
    sync = make_sync(tolerance_ms=10)
    sync.add("image", 100 * MS, "i100")
    # The pose stream passed 110 ms without a pose near 100 ms: image 100 is given up.
    sync.add("pose", 200 * MS, "p200")
    assert sync.stats.dropped_unmatched["image"] == 1

    # A depth at 50 ms can join no image after 100 ms.
    assert sync.add("depth", 50 * MS, "d50") == []

    assert sync.stats.dropped_late["depth"] == 1
    assert sync.pending()["depth"] == 0


def test_missing_stream_bounded_queue_overflow():
    sync = make_sync(queue_size=4)
    for i in range(10):
        sync.add("image", (100 + 33 * i) * MS, f"i{i}")
        sync.add("depth", (100 + 33 * i) * MS, f"d{i}")

    assert sync.pending()["image"] == 4
    assert sync.pending()["depth"] == 4
    assert sync.stats.dropped_overflow["image"] == 6
    assert sync.stats.matched == 0

    # Once poses come, the queued frames match.
    frames = []
    for i in range(10):
        frames += sync.add("pose", (100 + 33 * i) * MS, f"p{i}")
    assert [f.payloads["image"] for f in frames] == ["i6", "i7", "i8", "i9"]


def test_slow_pose_stream_serves_consecutive_images():
    sync = FrameSynchronizer(["image", "pose"], 20 * MS)
    sync.add("pose", 105 * MS, "p105")
    frames = sync.add("image", 100 * MS, "i100")
    assert [f.payloads["pose"] for f in frames] == ["p105"]

    # Image 110 waits until the pose stream passes it, then takes the nearest pose.
    assert sync.add("image", 110 * MS, "i110") == []
    frames = sync.add("pose", 140 * MS, "p140")

    assert [(f.payloads["image"], f.payloads["pose"]) for f in frames] == [("i110", "p105")]


def test_completed_newer_frame_gives_up_older_open_frames():
    sync = FrameSynchronizer(["image", "depth"], 5 * MS)
    sync.add("image", 100 * MS, "i100")
    sync.add("image", 133 * MS, "i133")

    frames = sync.add("depth", 133 * MS, "d133")

    assert [f.payloads["image"] for f in frames] == ["i133"]
    assert sync.stats.dropped_unmatched["image"] == 1
    assert sync.pending()["image"] == 0


def test_jittered_streams_match_the_brute_force_nearest_pose():
    rng = np.random.default_rng(7)
    tolerance_ns = 10 * MS
    image_ns = (np.arange(60) * 33.3 * MS + rng.uniform(-2, 2, 60) * MS).astype(np.int64) + 10**9
    pose_ns = (np.arange(220) * 10 * MS + rng.uniform(-1, 1, 220) * MS).astype(np.int64) + 10**9
    # Every 7th image has no depth.
    depth_ns = image_ns[np.arange(60) % 7 != 3]
    sync = FrameSynchronizer(
        ["image", "depth", "pose"], tolerance_ns, {"image": 10, "depth": 10, "pose": 100}
    )

    events = [(t, "image") for t in image_ns] + [(t, "depth") for t in depth_ns]
    events += [(t + 3 * MS, "pose") for t in pose_ns]  # poses arrive 3 ms later than stamped
    frames = []
    for arrival_ns, stream in sorted(events):
        stamp_ns = arrival_ns - 3 * MS if stream == "pose" else arrival_ns
        frames += sync.add(stream, int(stamp_ns), int(stamp_ns))

    # Every image with depth matches, with its depth and the nearest pose (brute force).
    assert [f.stamp_ns for f in frames] == [int(t) for t in depth_ns]
    for frame in frames:
        nearest = int(pose_ns[np.argmin(np.abs(pose_ns - frame.stamp_ns))])
        assert frame.stamps_ns["pose"] == nearest
        assert frame.stamps_ns["depth"] == frame.stamp_ns
    # Images without depth are given up, except the last, which still waits; every
    # depth was used; poses between images are dropped, never the used ones.
    assert sync.stats.dropped_unmatched["image"] + sync.pending()["image"] == 60 - len(depth_ns)
    assert sync.stats.dropped_unmatched["depth"] == 0
    used_poses = len({f.stamps_ns["pose"] for f in frames})
    pose_stats = sync.stats.dropped_unmatched["pose"] + sync.pending()["pose"] + used_poses
    assert pose_stats == 220
    assert (
        sync.stats.total_dropped()
        == sync.stats.dropped_unmatched["image"] + sync.stats.dropped_unmatched["pose"]
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"streams": ["image"], "tolerance_ns": 0}, "need two or more distinct names"),
        ({"streams": ["image", "image"], "tolerance_ns": 0}, "need two or more distinct names"),
        ({"streams": ["image", "pose"], "tolerance_ns": -1}, "invalid tolerance_ns=-1"),
        ({"streams": ["image", "pose"], "tolerance_ns": 0, "queue_size": 0}, "invalid queue size 0"),
        (
            {"streams": ["image", "pose"], "tolerance_ns": 0, "queue_size": {"odom": 5}},
            "queue_size names unknown stream 'odom'",
        ),
    ],
)
def test_invalid_setup_raises(kwargs, match):
    with pytest.raises(SyncError, match=match):
        FrameSynchronizer(**kwargs)


def test_unknown_stream_raises():
    sync = make_sync()
    with pytest.raises(SyncError, match="unknown stream 'odom'"):
        sync.add("odom", 0, None)
