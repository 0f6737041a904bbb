"""The ``convert`` and ``replay`` subcommands of ``surfel-map``: datasets to ROS 2 bags, bags to a live graph.

``surfel-map`` (cli.py) adds them with :func:`add_convert_parser` and
:func:`add_replay_parser`; each sets ``func(args) -> int``. ``python -m
surfel_mapping_node.bag_cli`` runs them alone.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

logger = logging.getLogger("surfel_map")

CONVERT_FORMATS = ("7scenes", "kitti", "tum")
STORAGES = ("mcap", "sqlite3")

CONVERT_EXAMPLES = """\
examples:
  surfel-map convert ../shared/data/7scenes_redkitchen --format 7scenes --out bags/redkitchen
  surfel-map convert ../shared/data/kitti_odometry --format kitti --sequence 00 --out bags/kitti00 \\
      --storage sqlite3 --max-frames 20
  surfel-map convert rgbd_dataset_freiburg1_desk --format tum --out bags/fr1_desk --stride 2

The bag contains the topics of surfel_mapping_node.topics: /camera/image, /camera/depth
(16UC1 mm; TUM as 32FC1 m), /camera/camera_info for RGB-D, /stereo/{left,right}/image_rect
and /stereo/{left,right}/camera_info for stereo, and /slam/pose and /slam/keyframes.
Play it with 'ros2 bag play BAG_DIR' or 'surfel-map replay BAG_DIR', or map it offline
with 'surfel-map run BAG_DIR --format bag'.
"""

REPLAY_EXAMPLES = """\
examples:
  surfel-map replay bags/redkitchen
  surfel-map replay bags/kitti00 --rate 0.5 --loop
  surfel-map replay bags/kitti00 --topics /stereo/left/image_rect /slam/pose --qos sensor-data

Publishes with rclpy, for machines without rosbag2; where rosbag2 is installed,
'ros2 bag play BAG' plays the same bags. Stop with Ctrl-C.
"""


def add_convert_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``convert`` subcommand to SUBPARSERS and return its parser."""
    parser = subparsers.add_parser(
        "convert",
        help="write a dataset (7-Scenes, KITTI, TUM) as a ROS 2 bag",
        description="Write a recorded dataset as a ROS 2 bag (mcap or sqlite3) with images, depth or "
        "the right stereo image, camera_info, the ground-truth pose as SLAM pose and a keyframe Path.",
        epilog=CONVERT_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )

    # Input and output.
    parser.add_argument("path", type=Path, help="dataset folder")
    parser.add_argument("--format", required=True, choices=CONVERT_FORMATS, help="dataset layout")
    parser.add_argument("--out", required=True, type=Path, help="bag directory to create")
    parser.add_argument(
        "--storage", choices=STORAGES, default="mcap", help="rosbag2 storage (default: mcap, as ROS 2 Jazzy)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing bag at --out")

    # Which frames, and which of them are keyframes.
    parser.add_argument("--sequence", default="00", help="KITTI sequence number (default: 00)")
    parser.add_argument("--first", type=int, default=0, help="index of the first frame to write (default: 0)")
    parser.add_argument("--max-frames", type=int, default=None, help="write at most this many frames")
    parser.add_argument("--stride", type=int, default=1, help="write every K-th frame (default: 1)")
    parser.add_argument(
        "--keyframe-every",
        type=int,
        default=0,
        metavar="N",
        help="make every N-th written frame a keyframe; 0 (default) picks keyframes by motion with "
        "the mapper's thresholds (config keyframes.min_translation_m, min_rotation_deg)",
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="mapper YAML file: its keyframe thresholds pick the keyframes, its camera section "
        "sets TUM intrinsics",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(func=run_convert)
    return parser


def add_replay_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``replay`` subcommand to SUBPARSERS and return its parser."""
    parser = subparsers.add_parser(
        "replay",
        help="publish a ROS 2 bag into the live ROS 2 graph (rclpy; no rosbag2 needed)",
        description="Publish the messages of a ROS 2 bag at their recorded timing with rclpy.",
        epilog=REPLAY_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("path", type=Path, help="bag directory")
    parser.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default: 1.0)")
    parser.add_argument("--loop", action="store_true", help="play the bag again and again until Ctrl-C")
    parser.add_argument(
        "--topics", nargs="+", default=None, metavar="TOPIC", help="publish only these topics (default: all)"
    )
    parser.add_argument(
        "--qos",
        choices=("reliable", "sensor-data"),
        default="reliable",
        help="QoS of image and camera_info topics: the bag's recorded QoS (reliable), or best-effort "
        "sensor data, which only best-effort subscribers receive (default: reliable)",
    )
    parser.add_argument(
        "--wait-for-subscribers",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for a subscriber on every topic before publishing (default: 0)",
    )
    parser.set_defaults(func=run_replay)
    return parser


def run_convert(args: argparse.Namespace) -> int:
    """Convert a dataset to a bag; return the exit code (0 done, 2 bad input)."""
    from surfel_mapping_node import topics
    from surfel_mapping_node.bag_writer import (
        BagOutputError,
        FrameEncodingError,
        KeyframeRule,
        check_output_dir,
        write_bag,
    )

    try:
        # Arguments first, then the cheap checks, before any frame is read.
        if args.keyframe_every < 0:
            raise ValueError(
                f"invalid --keyframe-every {args.keyframe_every}: "
                "use N >= 1, or 0 to pick keyframes by motion"
            )
        config = _mapper_config(args.format, args.config)
        out_dir = check_output_dir(args.out, args.overwrite)
        if not args.path.exists():
            raise FileNotFoundError(f"dataset not found: {args.path}; pass the {args.format} dataset folder")
        dataset = _open_dataset(args.path, args.format, args.sequence, config)
        indices = _select(len(dataset), args.first, args.max_frames, args.stride)
        keyframes = KeyframeRule.from_config(config.keyframes, args.keyframe_every)

        custom_data = {
            topics.METADATA_SOURCE_FORMAT: args.format,
            topics.METADATA_SOURCE_PATH: str(args.path.expanduser().absolute()),
            topics.METADATA_SOURCE_FIRST: str(args.first),
            topics.METADATA_SOURCE_STRIDE: str(args.stride),
        }
        if args.format == "kitti":
            custom_data[topics.METADATA_SOURCE_SEQUENCE] = str(args.sequence)
        summary = write_bag(
            _frames_with_progress(dataset, indices, args.no_progress),
            out_dir,
            storage=args.storage,
            keyframes=keyframes,
            overwrite=args.overwrite,
            custom_data=custom_data,
        )
    except (BagOutputError, FrameEncodingError, ValueError, OSError) as error:
        print(f"surfel-map convert: error: {error}", file=sys.stderr)
        return 2

    seconds = (summary.end_ns - summary.start_ns) * 1e-9
    print(
        f"wrote {summary.storage.value} bag {summary.path}: {summary.frames} {summary.kind} frames "
        f"over {seconds:.2f} s, {summary.keyframes} keyframes, "
        f"{sum(summary.message_counts.values())} messages"
    )
    return 0


def run_replay(args: argparse.Namespace) -> int:
    """Replay a bag; return the exit code (0 done, 2 bad input or missing ROS, 130 Ctrl-C)."""
    from surfel_mapping_node.bag_replay import ReplayError, replay_bag

    try:
        summary = replay_bag(
            args.path,
            rate=args.rate,
            loop=args.loop,
            topics=args.topics,
            image_qos=args.qos,
            wait_for_subscribers_s=args.wait_for_subscribers,
        )
    except KeyboardInterrupt:
        print("surfel-map replay: interrupted", file=sys.stderr)
        return 130
    except (ReplayError, ValueError, OSError) as error:
        print(f"surfel-map replay: error: {error}", file=sys.stderr)
        return 2

    print(f"published {summary.messages} messages in {summary.duration_s:.1f} s")
    return 0


def _mapper_config(format_name: str, config_path: Path | None):
    from surfel_mapping_node.config import MapperConfig, preset_for_format

    config = MapperConfig.from_dict(preset_for_format(format_name))
    return config.merged_with_yaml(config_path) if config_path is not None else config


def _open_dataset(path: Path, format_name: str, sequence: str, config):
    from surfel_mapping_node.datasets import open_dataset

    return open_dataset(path, format_name, sequence=sequence, config=config)


def _select(length: int, first: int, max_frames: int | None, stride: int) -> range:
    from surfel_mapping_node.pipeline import select_indices

    return select_indices(length, first, max_frames, stride)


def _frames_with_progress(dataset, indices: range, no_progress: bool):
    from tqdm import tqdm

    with tqdm(total=len(indices), unit="frame", disable=no_progress, dynamic_ncols=True) as bar:
        for index in indices:
            yield dataset[index]
            bar.update(1)


def main(argv: list[str] | None = None) -> int:
    """Run ``convert`` or ``replay`` without the rest of surfel-map."""
    parser = argparse.ArgumentParser(prog="surfel-map-bag", description=__doc__.split("\n", 1)[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_convert_parser(subparsers)
    add_replay_parser(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
