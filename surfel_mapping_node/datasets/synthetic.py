"""Synthetic RGB-D scenes with exact geometry, for accuracy tests and benchmarks.

A scene is an axis-aligned room (or a long corridor) seen from inside, with solid
axis-aligned boxes and spheres in it. Frames are rendered by ray casting, so every
depth value lies exactly on a surface, and ``distance_to_surface`` gives the exact
distance of any point to the scene: a mapper's surfels can be scored in millimetres
without a reference reconstruction.

World frame: metres, z up. Camera frame: optical (z forward, x right, y down).
Surfaces carry a smooth solid texture (a 0.5 m checker and slow waves) with a base
color per surface, so superpixels find intensity edges as they would indoors.

The noise model follows the Kinect v1 axial noise of Nguyen, Izadi and Lovell
(3DIMPVT 2012): σ(z) = 0.0012 + 0.0019·(z − 0.4)² metres, then quantization to 1 mm
and random dropouts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numba
import numpy as np

from surfel_mapping_node.camera import PinholeCamera
from surfel_mapping_node.datasets.base import Frame
from surfel_mapping_node.poses import check_pose

logger = logging.getLogger(__name__)

DEFAULT_CAMERA = PinholeCamera(640, 480, 525.0, 525.0, 319.5, 239.5)
# The long corridor renders at a quarter of the pixels to keep 2,000 frames cheap.
SMALL_CAMERA = DEFAULT_CAMERA.scaled(320, 240)
FRAME_RATE_HZ = 30.0
# Offset of the checker cells, so that no wall lies on a cell boundary.
CHECKER_CELL_M = 0.5
CHECKER_OFFSET_M = 0.131


@dataclass(frozen=True)
class Box:
    """A solid axis-aligned box; its outer faces are rendered. Corners in metres, world frame."""

    lo_m: tuple[float, float, float]
    hi_m: tuple[float, float, float]

    def __post_init__(self) -> None:
        if not all(lo < hi for lo, hi in zip(self.lo_m, self.hi_m, strict=True)):
            raise ValueError(f"invalid box corners lo={self.lo_m}, hi={self.hi_m}: need lo < hi on each axis")


@dataclass(frozen=True)
class Sphere:
    """A solid sphere; centre in metres, world frame."""

    center_m: tuple[float, float, float]
    radius_m: float

    def __post_init__(self) -> None:
        if not self.radius_m > 0:
            raise ValueError(f"invalid sphere radius_m={self.radius_m}: it must be > 0")


@dataclass
class RenderedView:
    """One ray-cast view of a scene."""

    depth_m: np.ndarray  # (H, W) float32, z in the camera frame; NaN beyond the render range
    color_rgb: np.ndarray  # (H, W, 3) uint8
    normal_world: np.ndarray  # (H, W, 3) float32 unit normals facing the camera, world frame
    surface_id: np.ndarray  # (H, W) int16; 0-5 room faces, then 6 per box, then spheres; -1 none


@dataclass(frozen=True)
class KinectNoise:
    """Kinect-like depth noise: axial Gaussian σ(z) = a + b·(z − z0)², quantization, dropouts."""

    axial_a_m: float = 0.0012
    axial_b_per_m: float = 0.0019
    axial_z0_m: float = 0.4
    quantization_m: float = 0.001
    dropout_probability: float = 0.01

    def sigma_m(self, depth_m: np.ndarray | float) -> np.ndarray | float:
        """Return the axial standard deviation (metres) at depth ``depth_m``."""
        return self.axial_a_m + self.axial_b_per_m * (np.asarray(depth_m) - self.axial_z0_m) ** 2

    def apply(self, depth_m: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Return a noisy float32 copy of ``depth_m`` (NaN stays NaN; dropouts become NaN)."""
        noisy = depth_m + rng.standard_normal(depth_m.shape, dtype=np.float32) * self.sigma_m(depth_m)
        if self.quantization_m > 0:
            noisy = np.round(noisy / self.quantization_m) * self.quantization_m
        noisy = noisy.astype(np.float32)
        noisy[rng.random(depth_m.shape, dtype=np.float32) < self.dropout_probability] = np.nan
        return noisy


@dataclass(frozen=True)
class SyntheticScene:
    """An axis-aligned room seen from inside, with boxes and spheres in it.

    Args:
        room_lo_m, room_hi_m: opposite corners of the room, metres, world frame (z up).
        boxes: solid boxes inside the room.
        spheres: solid spheres inside the room.
        texture_seed: seed of the per-surface base colors and wave phases.
    """

    room_lo_m: tuple[float, float, float]
    room_hi_m: tuple[float, float, float]
    boxes: tuple[Box, ...] = ()
    spheres: tuple[Sphere, ...] = ()
    texture_seed: int = 0
    _palette: np.ndarray = field(init=False, repr=False, compare=False)
    _phases: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        Box(self.room_lo_m, self.room_hi_m)  # the same corner check
        surfaces = self.surface_count
        rng = np.random.default_rng(self.texture_seed)
        object.__setattr__(self, "_palette", rng.uniform(60, 230, size=(surfaces, 3)).astype(np.float32))
        object.__setattr__(self, "_phases", rng.uniform(0, 1, size=(surfaces, 3)).astype(np.float32))

    @property
    def surface_count(self) -> int:
        return 6 + 6 * len(self.boxes) + len(self.spheres)

    def render(
        self, camera: PinholeCamera, T_world_camera: np.ndarray, max_depth_m: float = 20.0
    ) -> RenderedView:
        """Ray-cast the scene from a camera pose.

        Args:
            camera: intrinsics and image size.
            T_world_camera: 4×4 camera-to-world pose (optical frame).
            max_depth_m: surfaces farther than this (along the optical axis) are not
                rendered (NaN depth), like a sensor's range; objects beyond it are culled.

        Raises:
            InvalidPoseError: when the pose is not a rigid transform.
            ValueError: when the camera centre is outside the room or inside an object.
        """
        if not max_depth_m > 0:
            raise ValueError(f"invalid max_depth_m={max_depth_m}: it must be > 0")
        T_world_camera = check_pose(T_world_camera, "T_world_camera")
        origin = T_world_camera[:3, 3]
        inside_room = bool(np.all(origin > self.room_lo_m) and np.all(origin < self.room_hi_m))
        if not inside_room or self._inside_solid(origin):
            raise ValueError(
                f"camera centre {np.round(origin, 3).tolist()} m is outside the room "
                f"{self.room_lo_m}-{self.room_hi_m} or inside an object: move the trajectory"
            )

        # Cull objects beyond the range (z <= distance) or behind the camera. Each object
        # keeps the image rectangle around its projection, and only those pixels test it.
        boxes = [
            [*box.lo_m, *box.hi_m, i, *rectangle]
            for i, box in enumerate(self.boxes)
            if _box_sdf(origin[None], box.lo_m, box.hi_m)[0] <= max_depth_m
            and (rectangle := _image_rectangle(camera, T_world_camera, box.lo_m, box.hi_m)) is not None
        ]
        spheres = [
            [*sphere.center_m, sphere.radius_m, i, *rectangle]
            for i, sphere in enumerate(self.spheres)
            if np.linalg.norm(origin - sphere.center_m) - sphere.radius_m <= max_depth_m
            and (rectangle := _image_rectangle(
                camera, T_world_camera,
                np.subtract(sphere.center_m, sphere.radius_m), np.add(sphere.center_m, sphere.radius_m),
            )) is not None
        ]  # fmt: skip

        height, width = camera.shape
        depth_m = np.empty((height, width), np.float32)
        surface_id = np.empty((height, width), np.int16)
        normal_world = np.empty((height, width, 3), np.float32)
        color_rgb = np.empty((height, width, 3), np.uint8)
        _render_kernel(
            origin, T_world_camera[:3, :3].copy(),
            np.array([camera.fx, camera.fy, camera.cx, camera.cy]),
            np.array([*self.room_lo_m, *self.room_hi_m], np.float64),
            np.array(boxes, np.float64).reshape(-1, 11), np.array(spheres, np.float64).reshape(-1, 9),
            len(self.boxes), float(max_depth_m),
            self._palette, self._phases,
            depth_m, surface_id, normal_world, color_rgb,
        )  # fmt: skip
        return RenderedView(depth_m, color_rgb, normal_world, surface_id)

    def distance_to_surface(self, points_world: np.ndarray) -> np.ndarray:
        """Return the exact distance (metres) from each point (N, 3) to the nearest surface.

        Surfaces are the room's six faces and the full outer surfaces of the boxes and
        spheres (faces hidden against the floor count too).

        Raises:
            ValueError: when points_world is not (N, 3).
        """
        points = np.asarray(points_world, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 3:
            raise ValueError(f"invalid points_world shape {points.shape}: expected (N, 3) metres")
        distance = np.abs(_box_sdf(points, self.room_lo_m, self.room_hi_m))
        for box in self.boxes:
            distance = np.minimum(distance, np.abs(_box_sdf(points, box.lo_m, box.hi_m)))
        for sphere in self.spheres:
            to_centre = np.linalg.norm(points - np.asarray(sphere.center_m), axis=1)
            distance = np.minimum(distance, np.abs(to_centre - sphere.radius_m))
        return distance

    def _inside_solid(self, point: np.ndarray) -> bool:
        points = point[None].astype(np.float64)
        in_box = any(_box_sdf(points, b.lo_m, b.hi_m)[0] < 0 for b in self.boxes)
        in_sphere = any(np.linalg.norm(point - s.center_m) < s.radius_m for s in self.spheres)
        return in_box or in_sphere


class SyntheticDataset:
    """Frames of a SyntheticScene along a trajectory, as a Dataset.

    Frames carry ``depth_raw`` as float32 metres (NaN = no depth) with depth_scale 1.0,
    and an RGB image. Each frame's noise is seeded by (seed, index), so random access
    gives the same frame every time.

    Args:
        scene: the scene to render.
        T_world_camera: (N, 4, 4) camera-to-world poses.
        camera: intrinsics and image size.
        noise: depth noise model; None renders exact depth.
        seed: noise seed.
        frame_rate_hz: frames are stamped index / frame_rate_hz.
        max_depth_m: render range; farther surfaces get NaN depth (see SyntheticScene.render).

    Raises:
        ValueError: when the trajectory is not (N, 4, 4) or a pose is invalid.
    """

    def __init__(
        self,
        scene: SyntheticScene,
        T_world_camera: np.ndarray,
        camera: PinholeCamera = DEFAULT_CAMERA,
        noise: KinectNoise | None = None,
        seed: int = 0,
        frame_rate_hz: float = FRAME_RATE_HZ,
        max_depth_m: float = 20.0,
    ) -> None:
        T_world_camera = np.asarray(T_world_camera, dtype=np.float64)
        if T_world_camera.ndim != 3 or T_world_camera.shape[1:] != (4, 4):
            raise ValueError(f"invalid trajectory shape {T_world_camera.shape}: expected (N, 4, 4) poses")
        if not frame_rate_hz > 0:
            raise ValueError(f"invalid frame_rate_hz={frame_rate_hz}: it must be > 0")
        self.scene = scene
        self.camera = camera
        self.noise = noise
        self.seed = seed
        self.frame_rate_hz = float(frame_rate_hz)
        self.max_depth_m = float(max_depth_m)
        for i, T in enumerate(T_world_camera):
            check_pose(T, f"trajectory pose {i}")
        self.T_world_camera = T_world_camera

    @classmethod
    def room(
        cls,
        n_frames: int = 300,
        camera: PinholeCamera = DEFAULT_CAMERA,
        noise: KinectNoise | None = None,
        seed: int = 0,
    ) -> SyntheticDataset:
        """Return the room of make_room seen along room_trajectory (a loop around its centre)."""
        return cls(make_room(), room_trajectory(n_frames), camera, noise, seed)

    @classmethod
    def corridor(
        cls,
        n_frames: int = 2000,
        camera: PinholeCamera = SMALL_CAMERA,
        noise: KinectNoise | None = None,
        seed: int = 0,
        speed_m_s: float = 1.5,
    ) -> SyntheticDataset:
        """Return a long corridor walked from end to end, so that the map keeps growing.

        At the defaults (2,000 frames at 30 Hz and 1.5 m/s) the walk is 100 m long.
        """
        length_m = speed_m_s * n_frames / FRAME_RATE_HZ
        return cls(make_corridor(length_m), corridor_trajectory(n_frames, speed_m_s), camera, noise, seed)

    def __len__(self) -> int:
        return len(self.T_world_camera)

    def __iter__(self) -> Iterator[Frame]:
        for index in range(len(self)):
            yield self[index]

    def render(self, index: int) -> RenderedView:
        """Return the exact (noise-free) view of frame ``index``.

        Raises:
            IndexError: when index is out of range.
        """
        return self.scene.render(self.camera, self.T_world_camera[self._index(index)], self.max_depth_m)

    def __getitem__(self, index: int) -> Frame:
        """Return frame ``index`` with noisy depth when a noise model is set.

        Raises:
            IndexError: when index is out of range.
        """
        index = self._index(index)
        view = self.scene.render(self.camera, self.T_world_camera[index], self.max_depth_m)
        depth_m = view.depth_m
        if self.noise is not None:
            depth_m = self.noise.apply(depth_m, np.random.default_rng([self.seed, index]))
        return Frame(
            index=index,
            stamp_ns=round(index * 1e9 / self.frame_rate_hz),
            image=view.color_rgb,
            camera=self.camera,
            T_world_camera=self.T_world_camera[index].copy(),
            depth_raw=depth_m,
            depth_scale=1.0,
        )

    def _index(self, index: int) -> int:
        if not -len(self) <= index < len(self):
            raise IndexError(f"frame index {index} out of range for a dataset of {len(self)} frames")
        return index % len(self)


def make_room() -> SyntheticScene:
    """Return a 6 × 5 × 3 m room with two boxes on the floor, a tall cabinet and a floating sphere."""
    return SyntheticScene(
        room_lo_m=(0.0, 0.0, 0.0),
        room_hi_m=(6.0, 5.0, 3.0),
        boxes=(
            Box((0.8, 0.7, 0.0), (1.6, 1.3, 0.75)),
            Box((4.2, 3.4, 0.0), (5.1, 4.3, 1.1)),
            Box((5.4, 0.3, 0.0), (5.9, 1.5, 2.0)),
        ),
        spheres=(Sphere((1.2, 4.0, 1.4), 0.4),),
    )


def make_corridor(length_m: float) -> SyntheticScene:
    """Return a corridor 2.4 m wide and 2.6 m high along +x, from x = −2 m to length + 3 m,
    with a box against alternating walls every 3.7 m and a sphere every 11 m."""
    if not length_m > 0:
        raise ValueError(f"invalid corridor length_m={length_m}: it must be > 0")
    boxes = []
    for k, x in enumerate(np.arange(1.0, length_m + 2.0, 3.7)):
        y_lo, y_hi = (-1.15, -0.7) if k % 2 == 0 else (0.7, 1.15)
        boxes.append(Box((float(x), y_lo, 0.0), (float(x) + 0.6 + 0.2 * (k % 3), y_hi, 0.6 + 0.25 * (k % 4))))
    spheres = tuple(Sphere((float(x), 0.0, 2.1), 0.25) for x in np.arange(5.0, length_m + 2.0, 11.0))
    return SyntheticScene(
        room_lo_m=(-2.0, -1.2, 0.0), room_hi_m=(length_m + 3.0, 1.2, 2.6), boxes=tuple(boxes), spheres=spheres
    )


def look_at(position_m: np.ndarray, forward: np.ndarray) -> np.ndarray:
    """Return T_world_camera of an optical camera at ``position_m`` looking along ``forward``
    (world frame, z up; the image's up stays as close to +z as it can)."""
    z_axis = np.asarray(forward, dtype=np.float64) / np.linalg.norm(forward)
    x_axis = np.cross(z_axis, [0.0, 0.0, 1.0])
    if np.linalg.norm(x_axis) < 1e-6:
        # Looking straight up or down: the image's up is taken along +y instead.
        x_axis = np.cross(z_axis, [0.0, 1.0, 0.0])
    x_axis /= np.linalg.norm(x_axis)
    y_axis = np.cross(z_axis, x_axis)
    T = np.eye(4)
    T[:3, :3] = np.column_stack([x_axis, y_axis, z_axis])
    T[:3, 3] = position_m
    return T


def room_trajectory(n_frames: int) -> np.ndarray:
    """(N, 4, 4) poses: one smooth loop of radius 1.2 m around the room's centre,
    looking outwards at the walls with a gentle sway in yaw, pitch and height."""
    _check_frames(n_frames)
    angles = np.linspace(0.0, 2 * np.pi, n_frames, endpoint=False)
    poses = np.empty((n_frames, 4, 4))
    for i, angle in enumerate(angles):
        position = np.array(
            [3.0 + 1.2 * math.cos(angle), 2.5 + 1.0 * math.sin(angle), 1.5 + 0.2 * math.sin(3 * angle)]
        )
        yaw = angle + 0.6 + 0.3 * math.sin(2 * angle)
        pitch = -0.25 + 0.1 * math.sin(5 * angle)
        forward = np.array(
            [math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), math.sin(pitch)]
        )
        poses[i] = look_at(position, forward)
    return poses


def corridor_trajectory(n_frames: int, speed_m_s: float = 1.5) -> np.ndarray:
    """(N, 4, 4) poses walking along the corridor at ``speed_m_s`` from x = 0, swaying
    0.3 m sideways and turning ±40° towards the walls."""
    _check_frames(n_frames)
    if not speed_m_s > 0:
        raise ValueError(f"invalid speed_m_s={speed_m_s}: it must be > 0")
    times_s = np.arange(n_frames) / FRAME_RATE_HZ
    poses = np.empty((n_frames, 4, 4))
    for i, t in enumerate(times_s):
        position = np.array([speed_m_s * t, 0.3 * math.sin(0.7 * t), 1.4 + 0.1 * math.sin(1.3 * t)])
        yaw = math.radians(40.0) * math.sin(0.5 * t)
        pitch = -0.15 + 0.05 * math.sin(0.9 * t)
        forward = np.array(
            [math.cos(yaw) * math.cos(pitch), math.sin(yaw) * math.cos(pitch), math.sin(pitch)]
        )
        poses[i] = look_at(position, forward)
    return poses


def _check_frames(n_frames: int) -> None:
    if n_frames < 1:
        raise ValueError(f"invalid n_frames={n_frames}: it must be >= 1")


def _image_rectangle(
    camera: PinholeCamera, T_world_camera: np.ndarray, lo: tuple[float, ...], hi: tuple[float, ...]
) -> tuple[float, float, float, float] | None:
    """Return (col0, col1, row0, row1) bounding the projection of a world box, the whole
    image when the box reaches behind the camera, or None when it lies wholly behind."""
    corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    corners_camera = (corners - T_world_camera[:3, 3]) @ T_world_camera[:3, :3]
    z = corners_camera[:, 2]
    if np.all(z <= 0):
        return None
    if np.any(z <= 1e-6):
        return (-np.inf, np.inf, -np.inf, np.inf)
    u, v, _ = camera.project(corners_camera)
    # One pixel of margin covers rounding at the rectangle's edges.
    return (float(u.min()) - 1, float(u.max()) + 1, float(v.min()) - 1, float(v.max()) + 1)


def _box_sdf(points: np.ndarray, lo: tuple[float, ...], hi: tuple[float, ...]) -> np.ndarray:
    """Signed distance (metres) to a solid box: negative inside."""
    centre = (np.asarray(lo) + np.asarray(hi)) / 2
    half = (np.asarray(hi) - np.asarray(lo)) / 2
    q = np.abs(points - centre) - half
    return np.linalg.norm(np.maximum(q, 0.0), axis=1) + np.minimum(q.max(axis=1), 0.0)


@numba.njit(cache=True)
def _render_kernel(
    origin: np.ndarray,
    R_world_camera: np.ndarray,
    intrinsics: np.ndarray,
    room: np.ndarray,
    boxes: np.ndarray,
    spheres: np.ndarray,
    n_boxes: int,
    max_depth_m: float,
    palette: np.ndarray,
    phases: np.ndarray,
    depth_out: np.ndarray,
    surface_out: np.ndarray,
    normal_out: np.ndarray,
    color_out: np.ndarray,
) -> None:
    """Cast one ray per pixel; write depth, surface id, normal and textured color.

    boxes rows: lo xyz, hi xyz, box index, then the pixel rectangle col0 col1 row0 row1
    outside which the box cannot be hit. Sphere rows: centre xyz, radius, sphere index,
    pixel rectangle.
    A per-pixel loop rather than numpy: numpy spent about 45 ms per 640×480 frame on the
    temporaries of the per-object slab tests.
    """
    fx, fy, cx, cy = intrinsics[0], intrinsics[1], intrinsics[2], intrinsics[3]
    first_sphere = 6 + 6 * n_boxes
    height, width = depth_out.shape
    direction = np.empty(3)
    for row in range(height):
        y_n = (row - cy) / fy
        for col in range(width):
            x_n = (col - cx) / fx
            # The ray's camera-frame direction is (x_n, y_n, 1), so its parameter is depth.
            for axis in range(3):
                direction[axis] = (
                    R_world_camera[axis, 0] * x_n + R_world_camera[axis, 1] * y_n + R_world_camera[axis, 2]
                )

            # The room from inside: the nearest exit plane.
            best = np.inf
            surface = -1
            normal_axis = -1
            sphere_hit = -1
            for axis in range(3):
                d = direction[axis]
                if d > 0:
                    t = (room[3 + axis] - origin[axis]) / d
                    side = 1
                elif d < 0:
                    t = (room[axis] - origin[axis]) / d
                    side = 0
                else:
                    continue
                if t < best:
                    best = t
                    surface = 2 * axis + side
                    normal_axis = axis

            # Boxes from outside: slab test; the entry axis names the face.
            for b in range(boxes.shape[0]):
                if col < boxes[b, 7] or col > boxes[b, 8] or row < boxes[b, 9] or row > boxes[b, 10]:
                    continue
                t_near = -np.inf
                t_far = np.inf
                near_axis = -1
                miss = False
                for axis in range(3):
                    d = direction[axis]
                    lo = boxes[b, axis]
                    hi = boxes[b, 3 + axis]
                    if d == 0.0:
                        if origin[axis] < lo or origin[axis] > hi:
                            miss = True
                            break
                        continue
                    t1 = (lo - origin[axis]) / d
                    t2 = (hi - origin[axis]) / d
                    if t1 > t2:
                        t1, t2 = t2, t1
                    if t1 > t_near:
                        t_near = t1
                        near_axis = axis
                    t_far = min(t_far, t2)
                    if t_near > t_far:
                        miss = True
                        break
                if miss or near_axis < 0 or t_near <= 0 or t_near >= best:
                    continue
                best = t_near
                surface = 6 + 6 * int(boxes[b, 6]) + 2 * near_axis + (1 if direction[near_axis] < 0 else 0)
                normal_axis = near_axis

            # Spheres: the nearer root of |o + t·d − c|² = r².
            square_norm = direction[0] ** 2 + direction[1] ** 2 + direction[2] ** 2
            for s in range(spheres.shape[0]):
                if col < spheres[s, 5] or col > spheres[s, 6] or row < spheres[s, 7] or row > spheres[s, 8]:
                    continue
                half_b = 0.0
                c = -(spheres[s, 3] ** 2)
                for axis in range(3):
                    offset = origin[axis] - spheres[s, axis]
                    half_b += direction[axis] * offset
                    c += offset * offset
                discriminant = half_b * half_b - square_norm * c
                if discriminant < 0:
                    continue
                t = (-half_b - np.sqrt(discriminant)) / square_norm
                if 0 < t < best:
                    best = t
                    surface = first_sphere + int(spheres[s, 4])
                    normal_axis = -1
                    sphere_hit = s

            if surface < 0 or best > max_depth_m:
                depth_out[row, col] = np.nan
                surface_out[row, col] = -1
                for axis in range(3):
                    normal_out[row, col, axis] = 0.0
                    color_out[row, col, axis] = 0
                continue

            # Normal facing the camera, and the solid texture at the hit point.
            x = origin[0] + best * direction[0]
            y = origin[1] + best * direction[1]
            z = origin[2] + best * direction[2]
            for axis in range(3):
                if normal_axis >= 0:
                    normal = 0.0
                    if axis == normal_axis:
                        normal = -1.0 if direction[axis] > 0 else 1.0
                else:
                    point = origin[axis] + best * direction[axis]
                    normal = (point - spheres[sphere_hit, axis]) / spheres[sphere_hit, 3]
                normal_out[row, col, axis] = normal
            cells = (
                np.floor((x + CHECKER_OFFSET_M) / CHECKER_CELL_M)
                + np.floor((y + CHECKER_OFFSET_M) / CHECKER_CELL_M)
                + np.floor((z + CHECKER_OFFSET_M) / CHECKER_CELL_M)
            )
            checker = cells - 2.0 * np.floor(cells / 2.0)
            # Triangle waves: smooth-looking bands at a fraction of the cost of sin().
            waves = (
                _triangle(0.37 * x + 0.18 * y + phases[surface, 0])
                * _triangle(0.27 * y + 0.46 * z + phases[surface, 1])
                * _triangle(0.21 * z + 0.3 * x + phases[surface, 2])
            )
            brightness = min(max(0.45 + 0.3 * checker + 0.25 * waves, 0.1), 1.2)
            for axis in range(3):
                color_out[row, col, axis] = np.uint8(min(palette[surface, axis] * brightness, 255.0))
            depth_out[row, col] = best
            surface_out[row, col] = surface


@numba.njit(cache=True, inline="always")
def _triangle(phase: float) -> float:
    """Return a triangle wave of period 1 between -1 and 1 at ``phase``."""
    return 4.0 * abs(phase - np.floor(phase) - 0.5) - 1.0
