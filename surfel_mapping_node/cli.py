"""``surfel-map``: map recorded datasets offline, convert them to ROS 2 bags, replay bags.

Examples:
  surfel-map demo --out out/demo
  surfel-map run ../shared/data/7scenes_redkitchen --format 7scenes --stride 2 --out out/7scenes
  surfel-map run ../shared/data/kitti_odometry --format kitti --sequence 00 --out out/kitti
  surfel-map run rgbd_dataset_freiburg1_desk --format tum --config my_camera.yaml
  surfel-map config > mapper.yaml
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from surfel_mapping_node.datasets import FORMATS

logger = logging.getLogger("surfel_map")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="surfel-map",
        description="Dense surfel mapping of recorded RGB-D and stereo data, on the CPU.",
        epilog=__doc__.split("Examples:", 1)[1] and "examples:" + __doc__.split("Examples:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    subparsers = parser.add_subparsers(dest="command", required=True)

    run = subparsers.add_parser(
        "run",
        help="map a dataset and write map.ply, timing.json and preview.png",
        description="Map a recorded dataset and write map.ply, timing.json, preview.png and config.yaml.",
    )
    run.add_argument("path", type=Path, help="dataset folder (or bag folder for --format bag)")
    run.add_argument("--format", required=True, choices=FORMATS, help="dataset layout")
    _add_run_options(run)
    run.set_defaults(func=command_run)

    demo = subparsers.add_parser(
        "demo",
        help="map the built-in synthetic scene (no download) and write the same outputs as run",
        description="Map the built-in synthetic room; with the 7-Scenes excerpt, also map from a "
        "single camera with the packaged depth network (OUT/mono/).",
    )
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder (default: out/demo)")
    demo.add_argument(
        "--max-frames",
        type=int,
        default=120,
        help="frames to fuse (default: 120; the monocular part uses at most 60)",
    )
    demo.add_argument(
        "--data",
        type=Path,
        default=None,
        help="folder holding 7scenes_redkitchen/ for the monocular part "
        "(default: $SURFEL_SHARED_DATA or ../shared/data)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo.set_defaults(func=command_demo)

    config = subparsers.add_parser("config", help="print the mapper's default configuration as YAML")
    config.add_argument("--format", choices=FORMATS, help="include the sensor preset of this format")
    config.set_defaults(func=command_config)

    try:
        from surfel_mapping_node.bag_cli import add_convert_parser, add_replay_parser
    except ImportError as error:  # rosbags missing: the mapping commands still work
        logger.debug("bag commands unavailable: %s", error)
    else:
        add_convert_parser(subparsers)
        add_replay_parser(subparsers)
    return parser


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sequence", default="00", help="KITTI sequence number (default: 00)")
    parser.add_argument("--out", type=Path, default=Path("out/map"), help="output folder (default: out/map)")
    parser.add_argument("--first", type=int, default=0, help="index of the first frame to fuse (default: 0)")
    parser.add_argument("--max-frames", type=int, default=None, help="fuse at most this many frames")
    parser.add_argument("--stride", type=int, default=1, help="fuse every K-th frame (default: 1)")
    parser.add_argument(
        "--config", type=Path, default=None, help="YAML file with mapper options (see 'surfel-map config')"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def command_run(args: argparse.Namespace) -> int:
    from surfel_mapping_node.config import MapperConfig, preset_for_format

    format_for_preset = args.format
    if args.format == "bag":
        from surfel_mapping_node.datasets.rosbag import source_format_of_bag

        # A converted bag records its source format, whose sensor preset applies.
        format_for_preset = source_format_of_bag(args.path) if args.path.exists() else None
    config = MapperConfig.from_dict(preset_for_format(format_for_preset))
    if args.config is not None:
        config = config.merged_with_yaml(args.config)
    return map_dataset(args.path, args.format, config, args)


def command_demo(args: argparse.Namespace) -> int:
    """Map the synthetic room; then, if the 7-Scenes excerpt is present, the monocular demo in OUT/mono."""
    from surfel_mapping_node.config import MapperConfig, preset_for_format
    from surfel_mapping_node.mono_demo import VALIDATION_FRAMES, find_seven_scenes, run_mono_demo

    if args.data is not None and find_seven_scenes(args.data) is None:
        raise FileNotFoundError(
            f"7-Scenes excerpt not found in --data {args.data}: pass the folder holding 7scenes_redkitchen/"
        )
    args.first, args.stride, args.sequence = 0, 1, "00"
    config = MapperConfig.from_dict(preset_for_format("synthetic"))
    status = map_dataset(None, "synthetic", config, args)
    if status != 0:
        return status

    # --max-frames also caps the monocular frames, so a short demo stays short.
    mono_frames = VALIDATION_FRAMES[: args.max_frames]
    outputs = run_mono_demo(args.data, args.out / "mono", mono_frames)
    if outputs is None:
        print(
            "monocular demo skipped: 7-Scenes excerpt not found (pass --data DIR or set SURFEL_SHARED_DATA)"
        )
        return 0
    comparison = outputs.comparison
    print(
        f"monocular demo: {comparison.frames} frames, {comparison.mono.summary()['surfels']} surfels, "
        f"median {comparison.distance.median_m * 100:.1f} cm to the RGB-D map, network abs-rel "
        f"{comparison.abs_rel:.3f}; outputs in {outputs.report_path.parent}/ "
        "(map.ply, preview.png, report.md)"
    )
    return 0


def command_config(args: argparse.Namespace) -> int:
    from surfel_mapping_node.config import MapperConfig, preset_for_format

    config = MapperConfig.from_dict(preset_for_format(args.format) if args.format else None)
    sys.stdout.write(config.to_yaml())
    return 0


def map_dataset(path: Path | None, format_name: str, config, args: argparse.Namespace) -> int:
    """Run the offline pipeline and write map.ply, timing.json, preview.png and config.yaml."""
    from tqdm import tqdm

    from surfel_mapping_node.datasets import open_dataset
    from surfel_mapping_node.pipeline import run_pipeline, select_indices
    from surfel_mapping_node.ply_io import write_surfel_ply
    from surfel_mapping_node.preview import write_preview

    out_dir: Path = args.out
    dataset = open_dataset(path, format_name, sequence=args.sequence, config=config)
    indices = select_indices(len(dataset), args.first, args.max_frames, args.stride)
    _prepare_output_dir(out_dir)

    with tqdm(total=len(indices), unit="frame", disable=args.no_progress, dynamic_ncols=True) as bar:

        def show_progress(timing) -> None:
            bar.set_postfix(surfels=timing.surfels, ms=f"{timing.total_ms:.1f}", refresh=False)
            bar.update(1)

        result = run_pipeline(dataset, config, indices, on_frame=show_progress)

    cloud = result.mapper.cloud()
    write_surfel_ply(out_dir / "map.ply", cloud)
    (out_dir / "timing.json").write_text(json.dumps(result.timing_json(), indent=1))
    write_preview(out_dir / "preview.png", cloud)
    (out_dir / "config.yaml").write_text(config.to_yaml())
    _print_summary(result.summary(), out_dir)
    return 0


def _prepare_output_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(
            f"cannot create output folder {out_dir}: {error.strerror}; choose another --out"
        ) from error


def _print_summary(summary: dict, out_dir: Path) -> None:
    print(
        f"fused {summary['frames_fused']} of {summary['frames']} frames, {summary['surfels']} surfels; "
        f"outputs in {out_dir}/ (map.ply, timing.json, preview.png, config.yaml)"
    )
    print(f"{'stage':<16}{'median ms':>10}{'p90 ms':>10}")
    for name, values in summary["stages"].items():
        print(f"{name:<16}{values['median_ms']:>10.2f}{values['p90_ms']:>10.2f}")
    if "stereo_depth" in summary["stages"]:
        print("total is the mapping stages; stereo_depth (semi-global matching) is timed on its own")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("surfel-map: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as error:
        # Library errors name the bad value and the fix; a traceback adds nothing for users.
        print(f"surfel-map: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
