"""Earth Studio ingest: video frames, aligned metadata and the empty reference model.

Inputs (per scene): ``<root>/downloaded_data/<scene>.mp4`` and
``<root>/downloaded_data/<scene>.json`` (3D Camera Tracking, Global).
Outputs:

* ``<root>/data/<scene>/footage/<scene>_<NNN>.jpeg`` - one per aligned frame;
* ``<root>/data/<scene>/<scene>.json`` - the aligned metadata: per frame its
  name, index, geodetic coordinate, ENU position, camera-to-world matrix and
  intrinsics, plus what was skipped and why;
* ``<root>/data/<scene>/sfm_output_localization/reference_empty/`` - the
  empty COLMAP reference model (cameras + posed images, no points) in the
  metric ENU frame of the first frame, written with pycolmap.

Frames and camera entries are aligned by index. Earth Studio writes
``numFrames + 1`` camera entries and videos may hold one frame more or fewer:
every index present in both is used, everything else is reported; a frame is
never paired with another index's pose. Entries with non-finite values are
skipped and reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
import cv2  # noqa: E402

from tasks.aerial import geometry  # noqa: E402
from tasks.common.atomic import atomic_path, write_json_atomic  # noqa: E402

log = logging.getLogger(__name__)
INGEST_VERSION = 1


class EarthStudioError(ValueError):
    """An Earth Studio export that cannot be ingested (names the file and field)."""


@dataclass
class CameraFrame:
    index: int
    latitude: float
    longitude: float
    altitude: float
    position_ecef: np.ndarray
    rotation_deg: np.ndarray
    fov_vertical: float


@dataclass
class CameraTrack:
    path: Path
    name: str
    width: int
    height: int
    num_frames: int
    frames: list[CameraFrame]
    skipped: dict[int, str] = field(default_factory=dict)  # entry index -> reason


def frame_name(scene: str, index: int, total: int) -> str:
    """``<scene>_<NNN>.jpeg``, zero-padded to 3 digits, more when needed."""
    width = max(3, len(str(max(total - 1, 0))))
    return f"{scene}_{index:0{width}d}.jpeg"


def _num(entry: dict[str, Any], key: str, sub: str | None, where: str) -> float:
    try:
        value = entry[key] if sub is None else entry[key][sub]
        return float(value)
    except (KeyError, TypeError, ValueError):
        raise EarthStudioError(f"{where}: missing or non-numeric {key}{'.' + sub if sub else ''}") from None


def load_camera_track(path: str | Path) -> CameraTrack:
    """Read and validate an Earth Studio 3D camera tracking JSON (Global coordinates)."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise EarthStudioError(f"{path}: camera tracking JSON not found; export it from Earth Studio "
                               "(Render > 3D Camera Tracking (JSON), Coordinate Space: Global)") from None
    except json.JSONDecodeError as exc:
        raise EarthStudioError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(doc, dict):
        raise EarthStudioError(f"{path}: expected a JSON object")
    frames_in = doc.get("cameraFrames")
    if not isinstance(frames_in, list) or not frames_in:
        raise EarthStudioError(f"{path}: no 'cameraFrames' list; re-export with 3D Camera Tracking (JSON) enabled")
    try:
        width, height = int(doc["width"]), int(doc["height"])
    except (KeyError, TypeError, ValueError):
        raise EarthStudioError(f"{path}: missing or invalid 'width'/'height'") from None
    num_frames = int(doc.get("numFrames") or len(frames_in) - 1)
    frames: list[CameraFrame] = []
    skipped: dict[int, str] = {}
    for i, entry in enumerate(frames_in):
        where = f"{path}: cameraFrames[{i}]"
        try:
            if not isinstance(entry, dict):
                raise EarthStudioError(f"{where}: not an object")
            pos = np.array([_num(entry, "position", a, where) for a in "xyz"])
            rot = np.array([_num(entry, "rotation", a, where) for a in "xyz"])
            lat = _num(entry, "coordinate", "latitude", where)
            lon = _num(entry, "coordinate", "longitude", where)
            alt = _num(entry, "coordinate", "altitude", where)
            fov = _num(entry, "fovVertical", None, where)
            values = np.concatenate([pos, rot, [lat, lon, alt, fov]])
            if not np.all(np.isfinite(values)):
                raise EarthStudioError(f"{where}: non-finite value (NaN/inf)")
            if not 0.0 < fov < 180.0:
                raise EarthStudioError(f"{where}: fovVertical {fov} outside (0, 180)")
        except EarthStudioError as exc:
            skipped[i] = str(exc)
            continue
        frames.append(CameraFrame(i, lat, lon, alt, pos, rot, fov))
    if not frames:
        raise EarthStudioError(f"{path}: no usable camera frame ({len(skipped)} skipped; first: {next(iter(skipped.values()))})")
    return CameraTrack(path, str(doc.get("name") or path.stem), width, height, num_frames, frames, skipped)


@dataclass
class IngestResult:
    scene: str
    frames_written: int
    frames_skipped: dict[str, str]
    video_frames: int
    camera_entries: int
    metadata: Path
    reference_model: Path
    skipped_scene: bool = False


def _signature(*paths: Path) -> str:
    h = hashlib.sha256(str(INGEST_VERSION).encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def reference_poses(track: CameraTrack) -> tuple[tuple[float, float, float], dict[int, dict[str, Any]]]:
    """ENU origin (first usable frame) and, per entry index, position, cam2world and intrinsics."""
    first = track.frames[0]
    origin = (first.latitude, first.longitude, first.altitude)
    out: dict[int, dict[str, Any]] = {}
    for f in track.frames:
        # position from the geodetic coordinate (geodetic -> ENU), as the original
        enu = geometry.geodetic_to_enu(f.latitude, f.longitude, f.altitude, *origin)
        r = geometry.cam2world_rotation(f.rotation_deg, origin[0], origin[1])
        c2w = np.eye(4)
        c2w[:3, :3], c2w[:3, 3] = r, enu
        focal = geometry.focal_from_fov(track.height, f.fov_vertical)
        out[f.index] = {"cam2world": c2w, "focal": focal, "cx": track.width / 2.0, "cy": track.height / 2.0}
    return origin, out


def write_reference_model(track: CameraTrack, names: dict[int, str], poses: dict[int, dict[str, Any]],
                          out_dir: Path) -> Path:
    """Empty COLMAP model (SIMPLE_PINHOLE cameras, posed images, no points), text format."""
    import pycolmap

    rec = pycolmap.Reconstruction()
    cam_ids: dict[float, int] = {}
    for image_id, (idx, name) in enumerate(sorted(names.items()), start=1):
        p = poses[idx]
        key = round(p["focal"], 6)
        if key not in cam_ids:
            cam_ids[key] = len(cam_ids) + 1
            rec.add_camera_with_trivial_rig(pycolmap.Camera(
                model="SIMPLE_PINHOLE", width=track.width, height=track.height,
                params=[p["focal"], p["cx"], p["cy"]], camera_id=cam_ids[key]))
        c2w = p["cam2world"]
        r_w2c = c2w[:3, :3].T
        t_w2c = -r_w2c @ c2w[:3, 3]
        image = pycolmap.Image(name=name, camera_id=cam_ids[key], image_id=image_id)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(pycolmap.Rotation3d(r_w2c), t_w2c))
    tmp = out_dir.with_name(out_dir.name + ".partial")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    rec.write_text(str(tmp))
    if out_dir.exists():
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def ingest_scene(root: str | Path, scene: str, jpeg_quality: int = 95, force: bool = False) -> IngestResult:
    """Decode ``<scene>.mp4`` into frames aligned with ``<scene>.json``; write metadata and model."""
    root = Path(root)
    video = root / "downloaded_data" / f"{scene}.mp4"
    track_path = root / "downloaded_data" / f"{scene}.json"
    out = root / "data" / scene
    footage = out / "footage"
    meta_path = out / f"{scene}.json"
    model_dir = out / "sfm_output_localization" / "reference_empty"
    track = load_camera_track(track_path)
    if not video.exists():
        raise EarthStudioError(f"{video}: video not found; render the scene with Cloud Rendering (.mp4)")
    sig = _signature(video, track_path)
    if not force and meta_path.exists() and (model_dir / "images.txt").exists():
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("signature") == sig and all((footage / f["name"]).exists() for f in old.get("frames", [])):
            return IngestResult(scene, len(old["frames"]), old.get("skipped", {}), old.get("video_frames", 0),
                                old.get("camera_entries", 0), meta_path, model_dir, skipped_scene=True)

    origin, poses = reference_poses(track)
    cap = cv2.VideoCapture(str(video))
    if not cap.isOpened():
        raise EarthStudioError(f"{video}: cannot open the video (corrupt or unsupported codec)")
    n_entries = len(track.frames) + len(track.skipped)
    total = max(n_entries, track.num_frames)
    footage.mkdir(parents=True, exist_ok=True)
    names: dict[int, str] = {}
    skipped: dict[str, str] = {}
    index = 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if frame is None or frame.shape[1] != track.width or frame.shape[0] != track.height:
                shape = None if frame is None else frame.shape[1::-1]
                skipped[str(index)] = f"video frame {index} is {shape}, the JSON says {track.width}x{track.height}"
            elif index in poses:
                name = frame_name(scene, index, total)
                with atomic_path(footage / name, suffix=".jpeg") as tmp:
                    if not cv2.imwrite(str(tmp), frame, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]):
                        raise OSError(f"cannot write {footage / name}")
                names[index] = name
            elif index in track.skipped:
                skipped[str(index)] = track.skipped[index]
            else:
                skipped[str(index)] = f"video frame {index} has no cameraFrames entry (the JSON has {n_entries})"
            index += 1
    finally:
        cap.release()
    video_frames = index
    if video_frames == 0:
        raise EarthStudioError(f"{video}: no frame could be decoded (corrupt or empty video)")
    for i in range(video_frames, n_entries):
        skipped.setdefault(str(i), f"cameraFrames[{i}] has no video frame (the video has {video_frames})")
    if abs(video_frames - n_entries) > 1 or (video_frames != n_entries and video_frames != track.num_frames):
        log.warning("%s: %d video frames but %d camera entries (numFrames %d); aligned by index",
                    scene, video_frames, n_entries, track.num_frames)
    if not names:
        raise EarthStudioError(f"{video}: no video frame matches a usable camera entry")

    write_reference_model(track, names, poses, model_dir)
    frames_meta = []
    for idx, name in sorted(names.items()):
        p = poses[idx]
        f = next(fr for fr in track.frames if fr.index == idx)
        frames_meta.append({
            "name": name, "index": idx,
            "coordinate": {"latitude": f.latitude, "longitude": f.longitude, "altitude": f.altitude},
            "position_enu": p["cam2world"][:3, 3].tolist(), "cam2world": p["cam2world"].tolist(),
            "intrinsics": [[p["focal"], 0, p["cx"]], [0, p["focal"], p["cy"]], [0, 0, 1]],
            "fovVertical": f.fov_vertical,
        })
    write_json_atomic(meta_path, {
        "scene": scene, "signature": sig, "origin": {"latitude": origin[0], "longitude": origin[1], "altitude": origin[2]},
        "width": track.width, "height": track.height, "video_frames": video_frames, "camera_entries": n_entries,
        "numFrames": track.num_frames, "frames": frames_meta, "skipped": skipped,
    }, indent=1)
    return IngestResult(scene, len(names), skipped, video_frames, n_entries, meta_path, model_dir)
