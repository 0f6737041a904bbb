"""surfel_mapping_node fed 3 s of real 7-Scenes RGB-D at 30 Hz over DDS.

The node runs in its own process, started by benchmarks/bench_node_throughput.py;
this process publishes the frames. There are two runs. In the first, the DDS queues
can contain every frame, so every published frame must be fused or counted as
dropped, and the last map update must contain everything fused. In the second, the
queues are 10 frames long, and the node's memory must stay within what they can
contain. Both runs use the Fast DDS profile of the launch files. Both nodes must stop
cleanly on SIGINT. Nothing here checks speed: on a
loaded machine the node fuses fewer frames and skips more, and every check still
applies.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

rclpy = pytest.importorskip("rclpy", reason="rclpy and the ROS 2 message packages are not installed")

from benchmarks.bench_node_throughput import (  # noqa: E402
    PACKAGE_FASTDDS_PROFILE,
    NodeRunError,
    ThroughputConfig,
    ThroughputResult,
    load_frame_messages,
    run_throughput,
)

pytestmark = [pytest.mark.ros, pytest.mark.slow]

SECONDS = 3.0
RATE_HZ = 30.0
FRAME_COUNT = 90
SHORT_QUEUE = 10
MEMORY_ALLOWANCE_BYTES = 64 * 2**20
# Drop reasons that mean a mapping failure; clean input must cause none of them.
FAILURE_REASONS = ("frame_failed", "mapper_skipped", "size_mismatch", "intrinsics_mismatch")


def domain_id() -> int:
    return 1 + os.getpid() % 100


def throughput_run(seven_scenes_dir: Path, work_dir: Path, image_queue_size: int) -> ThroughputResult:
    config = ThroughputConfig(
        seconds=SECONDS,
        rate_hz=RATE_HZ,
        image_qos="reliable",
        image_queue_size=image_queue_size,
        publish_rate_hz=5.0,
        idle_s=0.5,
        fastdds_profile=PACKAGE_FASTDDS_PROFILE,
    )
    messages = load_frame_messages(seven_scenes_dir, 0, config.frame_count).messages
    return run_throughput(messages, config, work_dir, domain_id=domain_id())


@pytest.fixture(scope="module")
def run(seven_scenes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ThroughputResult:
    """Reliable image QoS with a DDS reader queue as deep as the run: DDS cannot drop
    a frame, so every published frame must appear in the node's counters."""
    return throughput_run(seven_scenes_dir, tmp_path_factory.mktemp("node_throughput"), FRAME_COUNT)


@pytest.fixture(scope="module")
def run_short_queues(seven_scenes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ThroughputResult:
    """Reliable image QoS with queues of SHORT_QUEUE frames: memory would show any
    queue that grows beyond them."""
    return throughput_run(seven_scenes_dir, tmp_path_factory.mktemp("node_throughput_short"), SHORT_QUEUE)


def test_frames_fused_or_counted_dropped(run: ThroughputResult):
    assert run.published == FRAME_COUNT
    assert run.fused >= 1, run.counters

    # Each matched frame is fused, skipped while the mapper was busy, or dropped with a reason.
    assert run.matched == run.fused + run.skipped_busy + sum(run.frame_drops_in_node.values()), run.counters
    # Each published frame is matched or dropped by the synchronizer, so none is lost.
    assert run.unaccounted == 0, f"{run.unaccounted} frames neither fused nor counted: {run.counters}"
    assert run.published == run.fused + run.dropped
    for reason in FAILURE_REASONS:
        assert reason not in run.frame_drops_in_node, run.frame_drops_in_node


def test_last_map_contains_fused_frames(run: ThroughputResult):
    # The node's last publication shows its final map and reached this process. It
    # contains what ~/save_map wrote once the node was idle.
    assert run.final_counters["map_published"] is True
    assert run.maps, "no ~/map received"
    assert run.maps[-1].stamp_ns == run.final_counters["last_publish_stamp_ns"]
    assert run.saved_surfels is not None
    assert run.saved_surfels > 0
    assert run.maps[-1].width == run.saved_surfels
    publication_stamps = [m.stamp_ns for m in run.maps]
    assert publication_stamps == sorted(publication_stamps)

    # Every keyframe is in the last path, stamped with the image it was made from,
    # and reached this process after that image was sent.
    last_path = run.paths[-1].keyframe_stamps_ns
    assert len(last_path) == run.final_counters["keyframes"]
    assert set(last_path) <= set(run.published_stamps_ns) | set(run.priming_stamps_ns)
    measured_keyframes = set(last_path) & set(run.published_stamps_ns)
    assert len(measured_keyframes) == run.counters["keyframes"]
    assert len(measured_keyframes) >= 1
    latencies = run.keyframe_latencies_s()
    assert set(latencies) == measured_keyframes
    assert min(latencies.values()) > 0


def test_node_memory_within_queues(run_short_queues: ThroughputResult):
    run = run_short_queues
    # The node may keep its DDS reader queues (image and depth), its synchronizer
    # queues (SHORT_QUEUE frames each) and the frame being fused. The map and the
    # buffers allocated on first use get MEMORY_ALLOWANCE_BYTES. A node that kept
    # the frames it skipped would exceed this limit within the run.
    during = [s.rss_bytes for s in run.samples if run.publish_start_s <= s.t_s <= run.quiet_s]
    growth = max(during) - run.sample_at(run.publish_start_s).rss_bytes
    capacity = (2 * SHORT_QUEUE + 1) * run.frame_bytes + MEMORY_ALLOWANCE_BYTES
    assert growth < capacity, f"node RSS grew by {growth / 2**20:.0f} MiB (limit {capacity / 2**20:.0f} MiB)"


def test_short_queues_counts_consistent(run_short_queues: ThroughputResult):
    run = run_short_queues
    # Frames lost inside DDS are not counted, but no frame is counted twice.
    assert run.matched == run.fused + run.skipped_busy + sum(run.frame_drops_in_node.values())
    assert run.unaccounted >= 0
    assert run.node_exit_code == 0, run.node_log[-3000:]


def test_node_stops_on_sigint(run: ThroughputResult):
    assert run.node_exit_code == 0, run.node_log[-3000:]
    assert "Traceback" not in run.node_log


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("seconds", 0.0, "invalid seconds=0.0"),
        ("rate_hz", float("nan"), "invalid rate_hz=nan"),
        ("publish_rate_hz", -1.0, "invalid publish_rate_hz=-1.0"),
        ("idle_s", float("inf"), "invalid idle_s=inf"),
        ("first_frame", -1, "invalid first_frame=-1"),
        ("image_qos", "best_effort", "invalid image_qos='best_effort': use 'sensor_data' or 'reliable'"),
        ("image_queue_size", 0, "invalid image_queue_size=0: use 1 or more"),
    ],
)
def test_config_rejects_invalid_values(field: str, value: object, match: str):
    with pytest.raises(ValueError, match=re.escape(match)):
        ThroughputConfig(**{field: value})


def test_too_many_frames_rejected(seven_scenes_dir: Path):
    with pytest.raises(ValueError, match=r"need 301 frames but .* has 300: shorten --seconds"):
        load_frame_messages(seven_scenes_dir, 1, 300)


def test_too_few_messages_rejected(tmp_path: Path):
    with pytest.raises(ValueError, match="0 frames of messages given but the run publishes 90"):
        run_throughput([], ThroughputConfig(seconds=3.0), tmp_path)


def test_invalid_node_parameter_raises(seven_scenes_dir: Path, tmp_path: Path):
    # The node allows publish_rate up to 100 Hz and exits with code 2 otherwise.
    config = ThroughputConfig(seconds=0.1, rate_hz=10.0, publish_rate_hz=1000.0)
    messages = load_frame_messages(seven_scenes_dir, 0, config.frame_count).messages
    with pytest.raises(NodeRunError, match="exited with code 2 before subscribing"):
        run_throughput(messages, config, tmp_path, domain_id=domain_id())
