"""PLY I/O of surfel maps: the one place where maps are written to and read from disk.

The file is binary little-endian PLY with one ``vertex`` element whose properties are
``x y z nx ny nz red green blue radius confidence``: float32 position (metres, world
frame), unit normal, uint8 RGB, float32 disc radius (metres) and float32 confidence.
Open3D, CloudCompare and MeshLab read the position, normal and color and ignore the
rest. Files are replaced atomically, so a reader never sees a half-written map and a
failed write leaves the previous file intact.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

import numpy as np

logger = logging.getLogger(__name__)

# Property name -> little-endian numpy type, in file order.
VERTEX_PROPERTIES: tuple[tuple[str, str], ...] = (
    ("x", "<f4"),
    ("y", "<f4"),
    ("z", "<f4"),
    ("nx", "<f4"),
    ("ny", "<f4"),
    ("nz", "<f4"),
    ("red", "u1"),
    ("green", "u1"),
    ("blue", "u1"),
    ("radius", "<f4"),
    ("confidence", "<f4"),
)
VERTEX_DTYPE = np.dtype(list(VERTEX_PROPERTIES))
_PLY_TYPE_NAMES = {"<f4": "float", "u1": "uchar"}
_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "<i2", "int16": "<i2", "ushort": "<u2", "uint16": "<u2",
    "int": "<i4", "int32": "<i4", "uint": "<u4", "uint32": "<u4",
    "float": "<f4", "float32": "<f4", "double": "<f8", "float64": "<f8",
}  # fmt: skip


class SurfelArrays(Protocol):
    """Anything with the five surfel arrays, such as mapper.SurfelCloud or PlyCloud."""

    position_m: np.ndarray
    normal: np.ndarray
    color_rgb: np.ndarray
    radius_m: np.ndarray
    confidence: np.ndarray


@dataclass
class PlyCloud:
    """The arrays of a surfel PLY file (world frame)."""

    position_m: np.ndarray  # (N, 3) float32, metres
    normal: np.ndarray  # (N, 3) float32, unit
    color_rgb: np.ndarray  # (N, 3) uint8
    radius_m: np.ndarray  # (N,) float32, metres
    confidence: np.ndarray  # (N,) float32

    def __len__(self) -> int:
        return int(self.position_m.shape[0])


def write_surfel_ply(
    path: str | Path,
    cloud: SurfelArrays | None = None,
    *,
    position_m: np.ndarray | None = None,
    normal: np.ndarray | None = None,
    color_rgb: np.ndarray | None = None,
    radius_m: np.ndarray | None = None,
    confidence: np.ndarray | None = None,
) -> Path:
    """Write a surfel map to a binary PLY file, atomically; return the path written.

    Pass either ``cloud`` (a mapper.SurfelCloud, a PlyCloud or any object with the five
    arrays) or the five arrays as keywords. An empty map (N = 0) gives a valid file with
    0 vertices.

    Args:
        path: the .ply file to create or replace; its folder must exist.
        cloud: object with position_m, normal, color_rgb, radius_m and confidence.
        position_m: (N, 3) positions in metres, world frame; finite.
        normal: (N, 3) unit normals; finite.
        color_rgb: (N, 3) uint8 RGB.
        radius_m: (N,) disc radii in metres.
        confidence: (N,) fused weights.

    Raises:
        ValueError: for missing, mis-shaped or non-finite arrays (nothing is written).
        OSError: when the file cannot be written (the message names the path); an
            existing file is left as it was.
    """
    path = Path(path)
    vertices = _vertex_array(cloud, position_m, normal, color_rgb, radius_m, confidence)

    header = _header(len(vertices))
    atomic_write(path, lambda stream: (stream.write(header), stream.write(vertices.tobytes())))
    logger.debug("wrote %d surfels to %s", len(vertices), path)
    return path


def read_surfel_ply(path: str | Path) -> PlyCloud:
    """Read a binary little-endian PLY file with surfel vertices.

    Properties missing from the file get defaults (normals 0, colors 0, radius 0,
    confidence 1), so point clouds written by other tools can be read too.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: when it is not a binary little-endian PLY with x, y, z vertices, or
            it is truncated (the message names the path).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"PLY file not found: {path}")
    data = path.read_bytes()

    count, dtype, body_offset = _parse_header(data, path)
    expected_bytes = count * dtype.itemsize
    if len(data) - body_offset < expected_bytes:
        raise ValueError(
            f"truncated PLY file {path}: the header announces {count} vertices "
            f"({expected_bytes} bytes) but only {len(data) - body_offset} bytes follow"
        )
    vertices = np.frombuffer(data, dtype=dtype, count=count, offset=body_offset)

    def columns(names: tuple[str, ...], out_dtype: type, default: float) -> np.ndarray:
        if all(name in dtype.names for name in names):
            return np.stack([vertices[name].astype(out_dtype) for name in names], axis=-1)
        return np.full((count, len(names)), default, dtype=out_dtype)

    return PlyCloud(
        position_m=columns(("x", "y", "z"), np.float32, 0.0),
        normal=columns(("nx", "ny", "nz"), np.float32, 0.0),
        color_rgb=columns(("red", "green", "blue"), np.uint8, 0),
        radius_m=columns(("radius",), np.float32, 0.0)[:, 0],
        confidence=columns(("confidence",), np.float32, 1.0)[:, 0],
    )


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], object]) -> None:
    """Create or replace ``path`` with what ``write(stream)`` writes, atomically.

    The data goes to a temporary file in the same folder, is flushed to disk (fsync)
    and then renamed over ``path``, so readers see either the old or the new file.

    Raises:
        OSError: naming ``path`` when any step fails; the temporary file is removed and
            an existing file at ``path`` is left intact.
    """
    path = Path(path)
    tmp_name: str | None = None
    try:
        with tempfile.NamedTemporaryFile(
            "wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        ) as stream:
            tmp_name = stream.name
            # Temporary files are private (0600); the result gets the usual permissions.
            os.fchmod(stream.fileno(), _file_mode(path))
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp_name, path)
        tmp_name = None
        _fsync_folder(path.parent)
    except OSError as error:
        raise OSError(
            error.errno,
            f"failed to write {path}: {error.strerror or error}; "
            "check that the folder exists and is writable",
            str(path),
        ) from error
    finally:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)


def _file_mode(path: Path) -> int:
    """Return the permission bits for ``path``: the existing file's, else 0666 minus the umask."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        pass
    umask = 0o022
    try:
        # Reading the umask from /proc avoids os.umask(), which changes it for all threads.
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                umask = int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o666 & ~umask


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable. Some file systems do not allow opening a folder, so
    # failures here are ignored.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _header(count: int) -> bytes:
    lines = ["ply", "format binary_little_endian 1.0", "comment surfel map from surfel_perception"]
    lines.append(f"element vertex {count}")
    lines += [f"property {_PLY_TYPE_NAMES[kind]} {name}" for name, kind in VERTEX_PROPERTIES]
    lines.append("end_header")
    return ("\n".join(lines) + "\n").encode("ascii")


def _vertex_array(
    cloud: SurfelArrays | None,
    position_m: np.ndarray | None,
    normal: np.ndarray | None,
    color_rgb: np.ndarray | None,
    radius_m: np.ndarray | None,
    confidence: np.ndarray | None,
) -> np.ndarray:
    keywords = {
        "position_m": position_m,
        "normal": normal,
        "color_rgb": color_rgb,
        "radius_m": radius_m,
        "confidence": confidence,
    }
    given_arrays = [name for name, value in keywords.items() if value is not None]
    if cloud is not None and given_arrays:
        raise ValueError(
            f"pass either a cloud or the arrays as keywords, not both (got cloud and {given_arrays[0]})"
        )
    if cloud is not None:
        missing = [name for name in keywords if not hasattr(cloud, name)]
        if missing:
            raise ValueError(
                f"invalid cloud of type {type(cloud).__name__}: it has no {missing[0]} "
                "(expected position_m, normal, color_rgb, radius_m, confidence)"
            )
        keywords = {name: getattr(cloud, name) for name in keywords}
    elif len(given_arrays) != len(keywords):
        missing = [name for name, value in keywords.items() if value is None]
        raise ValueError(f"missing surfel array {missing[0]}: pass all of {', '.join(keywords)} or a cloud")

    arrays = {name: np.asarray(value) for name, value in keywords.items()}
    count = arrays["position_m"].shape[0] if arrays["position_m"].ndim >= 1 else -1
    expected_shapes = {
        "position_m": (count, 3),
        "normal": (count, 3),
        "color_rgb": (count, 3),
        "radius_m": (count,),
        "confidence": (count,),
    }
    for name, shape in expected_shapes.items():
        if arrays[name].shape != shape:
            raise ValueError(
                f"invalid {name} shape {arrays[name].shape}: expected {shape} "
                f"for {max(count, 0)} surfels"
            )
    if arrays["color_rgb"].dtype != np.uint8:
        raise ValueError(f"invalid color_rgb dtype {arrays['color_rgb'].dtype}: expected uint8 (0-255)")
    for name in ("position_m", "normal", "radius_m", "confidence"):
        bad = ~np.isfinite(arrays[name].reshape(count, -1)).all(axis=1) if count else np.zeros(0, bool)
        if bad.any():
            raise ValueError(
                f"invalid {name}: {int(bad.sum())} of {count} surfels are NaN or infinite "
                f"(first at row {int(np.argmax(bad))}); drop them before saving"
            )

    vertices = np.empty(count, dtype=VERTEX_DTYPE)
    for axis in range(3):
        vertices["xyz"[axis]] = arrays["position_m"][:, axis]
        vertices[("nx", "ny", "nz")[axis]] = arrays["normal"][:, axis]
        vertices[("red", "green", "blue")[axis]] = arrays["color_rgb"][:, axis]
    vertices["radius"] = arrays["radius_m"]
    vertices["confidence"] = arrays["confidence"]
    return vertices


def _parse_header(data: bytes, path: Path) -> tuple[int, np.dtype, int]:
    """Return (vertex count, vertex dtype, byte offset of the vertex data)."""
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise ValueError(f"invalid PLY file {path}: it does not start with 'ply' or has no end_header")
    newline = data.find(b"\n", end)
    body_offset = len(data) if newline < 0 else newline + 1
    lines = data[:end].decode("ascii", errors="replace").splitlines()

    if "format binary_little_endian 1.0" not in (line.strip() for line in lines):
        formats = [line.strip() for line in lines if line.startswith("format")]
        raise ValueError(
            f"unsupported PLY format in {path}: {formats[0] if formats else 'none'}; "
            "only binary_little_endian 1.0 is read (convert it, e.g. with Open3D)"
        )
    count: int | None = None
    fields: list[tuple[str, str]] = []
    element: str | None = None
    for line in lines:
        if line.startswith("element") and len(line.split()) != 3:
            raise ValueError(f"invalid PLY header line {line!r} in {path}: expected 'element NAME COUNT'")
        words = line.split()
        if not words:
            continue
        if words[0] == "element":
            element = words[1]
            if element == "vertex":
                if not words[2].isdigit():
                    raise ValueError(f"invalid vertex count {words[2]!r} in PLY file {path}")
                count = int(words[2])
            elif count is None:
                raise ValueError(f"unsupported PLY file {path}: element {element!r} comes before vertex")
        elif words[0] == "property" and element == "vertex":
            if words[1] == "list" or words[1] not in _PLY_TYPES:
                raise ValueError(f"unsupported vertex property {' '.join(words[1:])!r} in {path}")
            fields.append((words[2], _PLY_TYPES[words[1]]))
    if count is None or not {"x", "y", "z"} <= {name for name, _ in fields}:
        raise ValueError(f"invalid PLY file {path}: it has no vertex element with x, y, z")
    return count, np.dtype(fields), body_offset
