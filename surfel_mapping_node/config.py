"""Typed configuration of the surfel mapper: one source of defaults for every entry point.

Each option is documented once, in the comment above its field. A YAML file may set
any subset of the options; unknown keys and invalid values raise ConfigError naming
the key. ``surfel-map config`` prints the defaults as YAML.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """An unknown key or an invalid value in the mapper configuration."""


@dataclass
class CameraConfig:
    """Intrinsics for datasets that ship none (TUM); all zero means "take the dataset's"."""

    width: int = 0
    height: int = 0
    fx: float = 0.0
    fy: float = 0.0
    cx: float = 0.0
    cy: float = 0.0

    def is_set(self) -> bool:
        return self.width > 0 and self.height > 0 and self.fx != 0.0 and self.fy != 0.0


@dataclass
class DepthConfig:
    # Depth outside [min_depth_m, max_depth_m] is treated as "no depth".
    min_depth_m: float = 0.1
    max_depth_m: float = 10.0
    # Metres per unit of 16-bit depth images; 0 means the format's default
    # (0.001 for 7-Scenes and REP 118 millimetres, 0.0002 for TUM's factor 5000).
    depth_scale: float = 0.0


@dataclass
class StereoConfig:
    """OpenCV StereoSGBM parameters for depth from a rectified pair."""

    # Number of disparities searched; a multiple of 16.
    num_disparities: int = 128
    # Matched block size in pixels; odd, 3 to 11 for SGBM.
    block_size: int = 5
    min_disparity: int = 0
    uniqueness_ratio: int = 10
    speckle_window_size: int = 100
    speckle_range: int = 2
    disp12_max_diff: int = 1
    # Smoothness penalties P1 and P2 are these factors × channels × block_size².
    p1_factor: int = 8
    p2_factor: int = 32
    # "sgbm" (5 directions), "hh" (8 directions, slower) or "sgbm_3way" (fastest).
    mode: str = "sgbm_3way"


@dataclass
class SuperpixelConfig:
    # Seed spacing in pixels (the SLIC grid).
    grid_px: int = 8
    # Assignment/update iterations. On 7-Scenes frames more iterations keep sharpening
    # boundaries, but 2 already give the surfel count and map accuracy of 3 to 20
    # (0.84 mm median to held-out depth with 2 or 3), at two thirds of the cost.
    iterations: int = 2
    # Cost = (dx² + dy²)·spatial_weight + ΔI²·intensity_weight + (Δ inverse depth)²·inverse_depth_weight.
    spatial_weight: float = 1.0 / 16.0
    intensity_weight: float = 1.0 / 100.0
    inverse_depth_weight: float = 400.0
    # Huber threshold (metres) of the robust per-superpixel depth, and the IRLS steps
    # after the last iteration. Each iteration already makes one step, and on 7-Scenes
    # further steps changed neither the surfel count nor the map accuracy.
    huber_delta_m: float = 0.05
    huber_iterations: int = 0


@dataclass
class SurfelConfig:
    # A superpixel makes a surfel only with at least this many pixels with depth ...
    min_pixels_with_depth: int = 16
    # ... of which at least this fraction lies within inlier_range_m of the fitted plane.
    min_inlier_ratio: float = 0.8
    inlier_range_m: float = 0.05
    # Huber-reweighted steps of the plane fit after its first solve (Huber threshold
    # inlier_range_m / 2 on the depth residual). The first solve is already weighted
    # around the superpixel's robust depth; a second step did not change the 7-Scenes map.
    plane_iterations: int = 1
    # Surfels seen at a view cosine below this (grazing angle) are not made or fused.
    min_view_cosine: float = 0.1
    # Weight of a new surfel: min(1, weight_depth_scale_m² / depth²) (a depth-noise model).
    weight_depth_scale_m: float = 1.0


@dataclass
class FusionConfig:
    # Depth gate: |Δz| < max(depth_tolerance_min_m, depth_tolerance_per_m2 · z²).
    # 0.03 per m² fits Kinect/RealSense structured light; about 0.011 fits KITTI stereo.
    depth_tolerance_per_m2: float = 0.03
    depth_tolerance_min_m: float = 0.01
    # Normal gate: cosine of the angle between surfel and measured normal.
    min_normal_cosine: float = 0.8
    # Fused weight is capped so that old surfels still follow new measurements.
    max_weight: float = 20.0
    # A surfel this far (metres) in front of the measured surface is free space and goes.
    free_space_margin_m: float = 0.3
    # Surfels updated fewer than min_updates times and not updated for more than
    # stale_keyframes keyframes are removed as outliers.
    min_updates: int = 5
    stale_keyframes: int = 5
    # Only surfels projecting within [near, far] of the camera are fused.
    near_m: float = 0.1
    far_m: float = 10.0


@dataclass
class KeyframeConfig:
    # A frame becomes a keyframe when it moved or turned this much from the last one
    # (or when the pose source marks it).
    min_translation_m: float = 0.1
    min_rotation_deg: float = 10.0
    # The local map: keyframes within local_map_hops graph hops of the current
    # keyframe and within local_map_radius_m of it.
    local_map_hops: int = 20
    local_map_radius_m: float = 5.0
    # A new keyframe is also linked to up to this many nearest keyframes within
    # local_map_radius_m that are more than local_map_hops keyframes older and were
    # passed more than 2 × local_map_radius_m of travel ago, so a place seen again
    # rejoins the local map; 0 turns these links off.
    revisit_links: int = 2
    # A corrected keyframe pose counts as moved (and moves its surfels) when its
    # position changed by more than this many metres or its rotation by more than
    # this many degrees.
    pose_update_tolerance_m: float = 1e-6
    pose_update_tolerance_deg: float = 1e-5

    def validate(self) -> None:
        """Raise ConfigError when a threshold or a count is negative."""
        for name in (
            "min_translation_m",
            "min_rotation_deg",
            "local_map_radius_m",
            "pose_update_tolerance_m",
            "pose_update_tolerance_deg",
            "local_map_hops",
            "revisit_links",
        ):
            value = getattr(self, name)
            if not value >= 0:
                raise ConfigError(f"invalid keyframes.{name}={value}: it must be >= 0")


@dataclass
class MapperConfig:
    """All tunables of the surfel mapper."""

    camera: CameraConfig = field(default_factory=CameraConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)
    stereo: StereoConfig = field(default_factory=StereoConfig)
    superpixels: SuperpixelConfig = field(default_factory=SuperpixelConfig)
    surfels: SurfelConfig = field(default_factory=SurfelConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    keyframes: KeyframeConfig = field(default_factory=KeyframeConfig)

    def validate(self) -> MapperConfig:
        """Raise ConfigError for the first invalid value; return self."""
        _check_values(self)
        d, f, s, sp = self.depth, self.fusion, self.stereo, self.superpixels
        if not 0 < d.min_depth_m < d.max_depth_m:
            raise ConfigError(
                f"invalid depth range [{d.min_depth_m}, {d.max_depth_m}] m: "
                "need 0 < depth.min_depth_m < depth.max_depth_m"
            )
        if d.depth_scale < 0:
            raise ConfigError(
                f"invalid depth.depth_scale={d.depth_scale}: use metres per unit > 0, or 0 for the default"
            )
        if s.num_disparities <= 0 or s.num_disparities % 16:
            raise ConfigError(
                f"invalid stereo.num_disparities={s.num_disparities}: use a positive multiple of 16"
            )
        if s.block_size < 1 or s.block_size % 2 == 0:
            raise ConfigError(f"invalid stereo.block_size={s.block_size}: use an odd number >= 1")
        if s.mode not in ("sgbm", "hh", "sgbm_3way"):
            raise ConfigError(f"invalid stereo.mode={s.mode!r}: use one of 'sgbm', 'hh', 'sgbm_3way'")
        if sp.grid_px < 2 or sp.iterations < 1:
            raise ConfigError(
                f"invalid superpixels.grid_px={sp.grid_px} or iterations={sp.iterations}: "
                "need grid_px >= 2 and iterations >= 1"
            )
        if not 0 < f.near_m < f.far_m:
            raise ConfigError(
                f"invalid fusion range [{f.near_m}, {f.far_m}] m: need 0 < fusion.near_m < fusion.far_m"
            )
        if f.max_weight <= 0:
            raise ConfigError(f"invalid fusion.max_weight={f.max_weight}: it must be > 0")
        self.keyframes.validate()
        if not 0 <= self.surfels.min_inlier_ratio <= 1:
            raise ConfigError(
                f"invalid surfels.min_inlier_ratio={self.surfels.min_inlier_ratio}: use a value in [0, 1]"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> MapperConfig:
        """Build a config from nested dicts; missing keys keep their defaults."""
        return _from_dict(cls, data or {}, prefix="").validate()

    @classmethod
    def from_yaml(cls, path: str | Path) -> MapperConfig:
        """Load a YAML config file; raise ConfigError naming the file and the bad key."""
        return cls().merged_with_yaml(path)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def merged_with_yaml(self, path: str | Path) -> MapperConfig:
        """Return this config with the options set in the YAML file PATH replaced."""
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError as error:
            raise ConfigError(f"config file not found: {path}") from error
        except (OSError, yaml.YAMLError) as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from error
        if data is not None and not isinstance(data, dict):
            raise ConfigError(f"invalid config file {path}: the top level must be a mapping of sections")

        try:
            return MapperConfig.from_dict(_deep_merge(self.to_dict(), data or {}))
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from error


# Options that differ from the RGB-D defaults for a sensor, applied before a user's
# config file. Stereo depth from SGBM is far noisier and reaches much farther than
# structured light: wider plane-fit and depth gates, a longer range, and keyframes
# spaced for driving speed.
_STEREO_PRESET: dict[str, dict[str, Any]] = {
    "depth": {"max_depth_m": 30.0},
    "superpixels": {"huber_delta_m": 0.4},
    "surfels": {"inlier_range_m": 0.4},
    "fusion": {"depth_tolerance_per_m2": 0.011, "depth_tolerance_min_m": 0.05, "far_m": 30.0},
    "keyframes": {"min_translation_m": 1.0, "local_map_radius_m": 40.0},
}
_FORMAT_PRESETS: dict[str, dict[str, dict[str, Any]]] = {"kitti": _STEREO_PRESET}


def preset_for_format(format_name: str | None) -> dict[str, dict[str, Any]]:
    """Return the option overrides for a dataset format (empty for RGB-D formats)."""
    import copy

    return copy.deepcopy(_FORMAT_PRESETS.get(format_name or "", {}))


def _deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _from_dict(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(
            f"invalid section {prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]}: valid keys here are {', '.join(sorted(fields))}"
        )
    values = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(default):
            values[name] = _from_dict(type(default), value or {}, prefix=f"{key}.")
        else:
            values[name] = _coerce(key, value, type(default))
    return cls(**values)


def _coerce(key: str, value: Any, expected: type) -> Any:
    if expected is bool:
        if isinstance(value, bool):
            return value
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif expected is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif expected is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"invalid value for {key}: {value!r} is not a {expected.__name__}")


def _check_values(config: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            _check_values(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"invalid value for {prefix}{f.name}: {value} is not finite")
