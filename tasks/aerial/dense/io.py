"""The file formats of the dense stage.

* depth ``<stem>.h5``: dataset ``depth`` (float32 HxW, metres along the camera z axis, 0 = unknown, gzip);
* COLMAP dense arrays (``stereo/depth_maps/*.bin``, ``normal_maps/*.bin``): ASCII
  ``width&height&channels&`` then little-endian float32 values, rows in order, the channels of a
  pixel next to each other (what pycolmap 4's ``DepthMap`` / ``NormalMap`` read and write; for one
  channel this is also the older planar layout);
* ``fused.ply``: binary little-endian PLY, ``x y z`` float and ``red green blue`` uchar vertices.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import h5py
import numpy as np

from tasks.common.atomic import atomic_path

# ----------------------------------------------------------------------------- names & files


def image_stem(name: str) -> str:
    """``name`` without its last suffix (``"0001_000.jpeg" -> "0001_000"``,
    ``"123_o.jpg.jpg" -> "123_o.jpg"``); folders in the name are kept."""
    p = PurePosixPath(name)
    return str(p.with_name(p.stem)) if p.suffix else str(p)


def depth_path(depth_dir: Path, name: str) -> Path:
    return Path(depth_dir) / f"{image_stem(name)}.h5"


def write_depth_h5(path: Path, depth: np.ndarray) -> Path:
    """Write ``depth`` (HxW, metres, 0 = unknown) as dataset ``depth``, float32, gzip, atomically."""
    path = Path(path)
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"{path}: depth must be 2-D, got shape {depth.shape}")
    with atomic_path(path, suffix=".h5") as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("depth", data=depth, compression="gzip", compression_opts=4)
    return path


def read_depth_h5(path: Path | str) -> np.ndarray:
    """The ``depth`` dataset of an HDF5 file as float32."""
    with h5py.File(path, "r") as f:
        return np.asarray(f["depth"][()], dtype=np.float32)


def read_colmap_header(path: Path | str) -> tuple[int, int, int]:
    """(width, height, channels) of a COLMAP dense ``.bin`` array, reading only its header."""
    with open(path, "rb") as fh:
        head = fh.read(64)
    parts = head.split(b"&")
    if len(parts) < 4:
        raise ValueError(f"{path}: not a COLMAP array (header {head[:20]!r})")
    try:
        return int(parts[0]), int(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(f"{path}: not a COLMAP array (header {head[:20]!r})") from None


def read_colmap_array(path: Path | str) -> np.ndarray:
    """Read a COLMAP dense ``.bin`` array (depth/normal map): ``HxW`` for one channel, else ``HxWxC``."""
    data = Path(path).read_bytes()
    pos, fields = 0, []
    for _ in range(3):
        amp = data.index(b"&", pos)
        fields.append(int(data[pos:amp].decode("ascii").strip()))
        pos = amp + 1
    width, height, channels = fields
    if width <= 0 or height <= 0 or channels <= 0:
        raise ValueError(f"{path}: bad COLMAP array header {fields}")
    n = width * height * channels
    arr = np.frombuffer(data, dtype="<f4", count=n, offset=pos) if len(data) - pos >= 4 * n else None
    if arr is None:
        raise ValueError(f"{path}: truncated COLMAP array ({len(data) - pos} bytes for {n} floats)")
    arr = arr.reshape((height, width, channels))  # row-major rows, channels interleaved
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    return arr[:, :, 0] if channels == 1 else arr


def write_colmap_array(path: Path | str, array: np.ndarray) -> Path:
    """Write ``HxW`` or ``HxWxC`` float32 data in COLMAP's dense ``.bin`` format (atomic)."""
    a = np.asarray(array, dtype=np.float32)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"array must be HxW or HxWxC, got {a.shape}")
    height, width, channels = a.shape
    header = f"{width}&{height}&{channels}&".encode("ascii")
    body = np.ascontiguousarray(a, dtype="<f4").tobytes()
    with atomic_path(path, suffix=".bin") as tmp:
        tmp.write_bytes(header + body)
    return Path(path)


def write_ply_points(path: Path | str, xyz: np.ndarray, rgb: np.ndarray | None = None) -> Path:
    """Binary little-endian PLY with ``x y z`` (float) and ``red green blue`` (uchar) vertices."""
    xyz = np.asarray(xyz, dtype=np.float32).reshape(-1, 3)
    rgb = np.full((len(xyz), 3), 255, np.uint8) if rgb is None else np.asarray(rgb, np.uint8).reshape(-1, 3)
    if len(rgb) != len(xyz):
        raise ValueError("xyz and rgb differ in length")
    vert = np.empty(len(xyz), dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"),
                                     ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    vert["x"], vert["y"], vert["z"] = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    vert["red"], vert["green"], vert["blue"] = rgb[:, 0], rgb[:, 1], rgb[:, 2]
    header = ("ply\nformat binary_little_endian 1.0\n"
              f"element vertex {len(vert)}\n"
              "property float x\nproperty float y\nproperty float z\n"
              "property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n").encode("ascii")
    with atomic_path(path, suffix=".ply") as tmp:
        with open(tmp, "wb") as fh:
            fh.write(header)
            fh.write(vert.tobytes())
    return Path(path)


def read_ply_points(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """(xyz float32 Nx3, rgb uint8 Nx3) of a binary little-endian PLY written by
    :func:`write_ply_points` (or COLMAP: extra float/uchar properties are skipped)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:end].decode("ascii").splitlines()
    if lines[0] != "ply" or "binary_little_endian" not in lines[1]:
        raise ValueError(f"{path}: not a binary little-endian PLY")
    n, props, in_vertex = 0, [], False
    types = {"float": "<f4", "float32": "<f4", "double": "<f8", "uchar": "u1", "uint8": "u1",
             "int": "<i4", "int32": "<i4", "uint": "<u4", "short": "<i2", "ushort": "<u2", "char": "i1"}
    for line in lines[2:]:
        parts = line.split()
        if parts[:1] == ["element"]:
            in_vertex = parts[1] == "vertex"
            if in_vertex:
                n = int(parts[2])
        elif parts[:1] == ["property"] and in_vertex:
            props.append((parts[2], types[parts[1]]))
    vert = np.frombuffer(data, dtype=np.dtype(props), count=n, offset=end)
    xyz = np.stack([vert["x"], vert["y"], vert["z"]], 1).astype(np.float32)
    rgb = np.stack([vert["red"], vert["green"], vert["blue"]], 1).astype(np.uint8)
    return xyz, rgb


