"""Earth Studio ingest: video frames, the aligned metadata file and the empty reference model.

Inputs (per scene): ``<root>/downloaded_data/<scene>.mp4`` and
``<root>/downloaded_data/<scene>.json`` (3D Camera Tracking, Global).
Outputs:

* ``<root>/data/<scene>/footage/<scene>_<NNN>.jpeg`` - one per aligned frame;
* ``<root>/data/<scene>/<scene>.json`` - the Earth Studio export as the original's
  frame extraction leaves it (same keys: ``name``, ``width``, ``height``,
  ``numFrames``, ``cameraFrames``, ...), which the original's later steps and any
  script written for its layout read.  When the export and the video differ it is
  aligned to the frames actually extracted: ``cameraFrames`` is cut to the frames the
  video holds completely (entry ``i`` is frame ``<name>_<i>.jpeg``) and ``name`` is the
  scene id the frames are named after; the alignment is stated in the record;
* ``<root>/data/<scene>/ingest.json`` - the project's own record: signature of the
  inputs, ENU origin, per frame its name, index, geodetic coordinate, ENU position,
  camera-to-world matrix and intrinsics, what was skipped and why, the alignment, the
  video check and any mismatch with the plan;
* ``<root>/data/<scene>/sfm_output_localization/reference_empty/`` - the
  empty COLMAP reference model (cameras + posed images, no points) in the
  metric ENU frame of the first frame, written with pycolmap.

Frames and camera entries are aligned by index. Earth Studio writes
``numFrames + 1`` camera entries and videos may hold one frame more or fewer:
every index present in both is used, everything else is reported (the documented
last entry of a ``numFrames``-frame video is a note, not a problem); a frame is
never paired with another index's pose. Entries with non-finite values are
skipped and reported.  A video is checked against its own index (mp4 sample
table): a frame whose data the file does not hold completely is never kept
(a truncated download is reported once as "video ends after N of M frames").
"""

from __future__ import annotations

import copy
import json
import re
import sys
import tempfile
import threading
import shutil
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pycolmap

os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
import cv2  # noqa: E402

from tasks.aerial import geometry  # noqa: E402
from tasks.aerial import plan as planning  # noqa: E402
from tasks.aerial.layout import SceneLayout  # noqa: E402
from tasks.common import checks  # noqa: E402
from tasks.common.atomic import atomic_dir, atomic_path, remove_partials, write_json_atomic  # noqa: E402
from tasks.common.fingerprint import fingerprint  # noqa: E402

log = logging.getLogger(__name__)
INGEST_VERSION = 3  # 3: the documented numFrames + 1 camera entry is a note of the record, not a skip


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
    doc: dict[str, Any] = field(default_factory=dict, repr=False)  # the export as read


def frame_name(scene: str, index: int, total: int) -> str:
    """``<scene>_<NNN>.jpeg``, zero-padded to 3 digits, more when needed."""
    width = max(3, len(str(max(total - 1, 0))))
    return f"{scene}_{index:0{width}d}.jpeg"


#: Plausible ranges of a camera entry's geodetic coordinate (``coordinate.*``): Earth Studio's
#: camera goes from below sea level (the Dead Sea, -430 m) to space views; AerialMegaDepth's
#: scenes fly below a few km, so 100 km is a generous ceiling that still catches a unit mistake.
COORDINATE_RANGES: dict[str, tuple[float, float, str]] = {
    "latitude": (-90.0, 90.0, "degrees"), "longitude": (-180.0, 180.0, "degrees"),
    "altitude": (-500.0, 100_000.0, "m"),
}
MAX_RENDER_SIZE = 8192  # px: Earth Studio renders at most 4K; a larger width/height is a damaged file
MAX_CAMERA_FRAMES = 100_000  # numFrames: 55 min at 30 fps, 10x the trajectories' bound (tasks.aerial.plan)


def _num(entry: dict[str, Any], key: str, sub: str | None, where: str) -> float:
    try:
        value = entry[key] if sub is None else entry[key][sub]
    except (KeyError, TypeError):
        raise EarthStudioError(f"{where}: missing {key}{'.' + sub if sub else ''}") from None
    field = f"{key}{'.' + sub if sub else ''}"
    lo, hi, unit = COORDINATE_RANGES.get(sub, (None, None, "")) if key == "coordinate" else (None, None, "")
    try:
        return float(checks.number(value, field, where=where, lo=lo, hi=hi, unit=unit))
    except checks.InputError as exc:
        raise EarthStudioError(str(exc)) from None


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
        width, height = (checks.whole(doc[k], k, where=str(path), lo=1, hi=MAX_RENDER_SIZE, unit="px")
                         for k in ("width", "height"))
        num_frames = checks.whole(doc["numFrames"], "numFrames", where=str(path), lo=0, hi=MAX_CAMERA_FRAMES) \
            if doc.get("numFrames") is not None else 0
    except KeyError:
        raise EarthStudioError(f"{path}: missing 'width'/'height' (the render size); export the JSON again") from None
    except checks.InputError as exc:
        raise EarthStudioError(f"{exc}; export the JSON from Earth Studio again") from None
    num_frames = num_frames or len(frames_in) - 1
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
    return CameraTrack(path, str(doc.get("name") or path.stem), width, height, num_frames, frames, skipped, doc)


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
    record: Path | None = None
    video_problem: str | None = None  # "video ends after N of M frames ..." (damaged video), once
    video_complete: int | None = None  # frames the video holds completely (None: no index to check)
    plan_check: dict[str, Any] | None = None
    #: known properties of the format, said but not problems (the documented numFrames + 1 entry)
    notes: list[str] = field(default_factory=list)

    def problems(self) -> list[tuple[str, str]]:
        """(item, reason) to report: the damaged video once, not once per missing frame."""
        out = [("video", self.video_problem)] if self.video_problem else []
        for idx, reason in sorted(self.frames_skipped.items(), key=lambda kv: int(kv[0])):
            if self.video_problem and self.video_complete is not None and int(idx) >= self.video_complete:
                continue  # covered by the video problem
            out.append((f"frame {idx}", reason))
        return out


# ----------------------------------------------------------------------------- the mp4 index


@dataclass
class VideoIndex:
    """What an mp4's own sample table says about its video track."""

    samples: int  # frames the index announces
    complete: int  # leading frames (display order) whose data, and all data decoded before, is in the file
    file_size: int
    sync: tuple[int, ...] | None = None  # keyframes (stss, 0-based); None: every frame is one (no stss box)


def _boxes(buf: bytes, start: int = 0, end: int | None = None):
    end = len(buf) if end is None else end
    pos = start
    while pos + 8 <= end:
        size = int.from_bytes(buf[pos:pos + 4], "big")
        kind = buf[pos + 4:pos + 8].decode("latin-1")
        head = 8
        if size == 1:
            size = int.from_bytes(buf[pos + 8:pos + 16], "big")
            head = 16
        elif size == 0:
            size = end - pos
        if size < head:
            return
        yield kind, pos + head, min(pos + size, end)
        pos += size


def video_index(path: str | Path) -> VideoIndex | None:
    """Sample table of the first video track of an mp4/mov (None when there is none to read:
    not an ISO media file, fragmented, or the index itself is missing)."""
    path = Path(path)
    size = path.stat().st_size
    moov = None
    with open(path, "rb") as fh:
        pos = 0
        while pos + 8 <= size:
            fh.seek(pos)
            hdr = fh.read(16)
            if len(hdr) < 8:
                break
            box = int.from_bytes(hdr[:4], "big")
            kind = hdr[4:8]
            if box == 1:
                box = int.from_bytes(hdr[8:16], "big")
            elif box == 0:
                box = size - pos
            if box < 8:
                return None
            if kind == b"moov":
                if pos + box > size:
                    return None  # the index itself is cut
                fh.seek(pos)
                moov = fh.read(box)
                break
            pos += box
    if moov is None:
        return None
    for kind, a, b in _boxes(moov, 8):
        if kind != "trak":
            continue
        tables: dict[str, tuple[int, int]] = {}
        handler = None

        def walk(lo, hi):
            nonlocal handler
            for k2, a2, b2 in _boxes(moov, lo, hi):
                if k2 in ("mdia", "minf", "stbl"):
                    walk(a2, b2)
                elif k2 == "hdlr":
                    handler = moov[a2 + 8:a2 + 12]
                elif k2 in ("stsz", "stco", "co64", "stsc", "stts", "ctts", "stss"):
                    tables[k2] = (a2, b2)
        walk(a, b)
        if handler != b"vide" or "stsz" not in tables or "stsc" not in tables:
            continue
        u32 = lambda o: int.from_bytes(moov[o:o + 4], "big")  # noqa: E731
        a2, _ = tables["stsz"]
        fixed, count = u32(a2 + 4), u32(a2 + 8)
        sizes = [fixed] * count if fixed else [u32(a2 + 12 + 4 * i) for i in range(count)]
        if "co64" in tables:
            a3, _ = tables["co64"]
            offsets = [int.from_bytes(moov[a3 + 8 + 8 * i:a3 + 16 + 8 * i], "big") for i in range(u32(a3 + 4))]
        elif "stco" in tables:
            a3, _ = tables["stco"]
            offsets = [u32(a3 + 8 + 4 * i) for i in range(u32(a3 + 4))]
        else:
            return None
        a4, _ = tables["stsc"]
        runs = [(u32(a4 + 8 + 12 * i), u32(a4 + 12 + 12 * i)) for i in range(u32(a4 + 4))]
        ends = []  # byte end of each sample, decode order
        n = 0
        for c, off in enumerate(offsets, start=1):
            per = next((spc for first, spc in reversed(runs) if first <= c), 0)
            for _ in range(per):
                if n >= count:
                    break
                off += sizes[n]
                ends.append(off)
                n += 1
        if count == 0 or len(ends) < count:
            return None  # fragmented (moof) or inconsistent: nothing to check against
        first_bad = next((i for i, e in enumerate(ends) if e > size), count)
        complete = first_bad
        if "ctts" in tables and first_bad < count:  # frames reordered for display (B-frames)
            a5, _ = tables["ctts"]
            offs = []
            for i in range(u32(a5 + 4)):
                cnt = u32(a5 + 8 + 8 * i)
                val = int.from_bytes(moov[a5 + 12 + 8 * i:a5 + 16 + 8 * i], "big", signed=True)
                offs += [val] * cnt
            deltas = []
            if "stts" in tables:
                a6, _ = tables["stts"]
                for i in range(u32(a6 + 4)):
                    deltas += [u32(a6 + 12 + 8 * i)] * u32(a6 + 8 + 8 * i)
            dts = np.concatenate([[0], np.cumsum(deltas[:count - 1])]) if deltas else np.arange(count)
            cts = np.asarray(dts[:count]) + np.asarray((offs + [0] * count)[:count])
            order = np.argsort(cts, kind="stable")  # decode index of each display position
            bad = np.nonzero(order >= first_bad)[0]
            complete = int(bad[0]) if bad.size else count
        sync = None
        if "stss" in tables:
            a7, _ = tables["stss"]
            sync = tuple(u32(a7 + 8 + 4 * i) - 1 for i in range(u32(a7 + 4)))
        return VideoIndex(count, complete, size, sync)
    return None


# ----------------------------------------------------------------------------- decoder errors

#: A frame is an outlier when it differs from both neighbours by more than OUTLIER_RATIO times
#: what the neighbours differ from each other, and by more than OUTLIER_MIN_GREY grey levels
#: (mean absolute difference of 64 x 48 grey thumbnails). Smooth camera motion gives a ratio
#: of about 0.5 (the neighbours are two steps apart); a cut in the path (the spiral's end, the
#: street pass's start) differs from one neighbour only.
OUTLIER_RATIO = 3.0
OUTLIER_MIN_GREY = 20.0


def _thumbnail(frame: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY) if frame.ndim == 3 else frame
    return cv2.resize(grey, (64, 48), interpolation=cv2.INTER_AREA).astype(np.float32)


def outlier_frames(thumbs: dict[int, np.ndarray]) -> dict[int, str]:
    """``{index: why}`` of the frames that differ grossly from both their neighbours while the
    neighbours agree (a damaged frame the decoder did not report); see :data:`OUTLIER_RATIO`."""
    out = {}
    for i, t in thumbs.items():
        a, b = thumbs.get(i - 1), thumbs.get(i + 1)
        if a is None or b is None:
            continue
        d_prev, d_next, d_nb = (float(np.abs(x - y).mean()) for x, y in ((t, a), (t, b), (a, b)))
        if min(d_prev, d_next) > max(OUTLIER_RATIO * d_nb, OUTLIER_MIN_GREY):
            out[i] = (f"differs grossly from its neighbours (mean difference {d_prev:.0f} and {d_next:.0f} grey "
                      f"levels, the neighbours {d_nb:.0f} from each other): damaged")
    return out

_DECODER_LINE = re.compile(r"^\[(?!mov,)[^\]@]+ @ 0x[0-9a-fA-F]+\] ")  # libavcodec's log, not the demuxer's
_STDERR_LOCK = threading.Lock()  # fd 2 is the process's: one decoding at a time listens to it


class DecoderLog:
    """What FFmpeg's decoders (inside OpenCV) write to fd 2 while a video is decoded: OpenCV
    returns a concealed picture for a damaged frame and says nothing, FFmpeg logs the error
    ("ac-tex damaged", "error while decoding MB ...") on stderr. The block redirects fd 2 to a
    temporary file; :meth:`new_errors` after each ``read()`` gives that frame's decoder errors
    and passes every other line on to the real stderr. One decoding per process at a time."""

    def __enter__(self) -> "DecoderLog":
        _STDERR_LOCK.acquire()
        try:
            sys.stderr.flush()
            self._tmp = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._tmp.fileno(), 2)
            self._pos = 0
        except BaseException:
            _STDERR_LOCK.release()
            raise
        return self

    def new_errors(self) -> list[str]:
        size = os.fstat(self._tmp.fileno()).st_size
        if size <= self._pos:
            return []
        self._tmp.seek(self._pos)
        text = self._tmp.read(size - self._pos).decode("utf-8", "replace")
        self._pos = size
        errors, other = [], []
        for line in text.splitlines(keepends=True):
            (errors if _DECODER_LINE.match(line) else other).append(line)
        if other:
            os.write(self._saved, "".join(other).encode())
        return [line.strip() for line in errors]

    def __exit__(self, *exc: Any) -> None:
        try:
            self.new_errors()
        finally:
            os.dup2(self._saved, 2)
            os.close(self._saved)
            self._tmp.close()
            _STDERR_LOCK.release()


# ----------------------------------------------------------------------------- the export format


def export_document(plan) -> dict[str, Any]:
    """The 3D camera tracking JSON (Global) Earth Studio exports for a rendered plan
    (:class:`tasks.aerial.plan.Plan`): ``numFrames + 1`` camera entries."""
    lat0, lon0, alt0 = plan.origin
    first = plan.cameras[0]
    # rotations via the ENU frame of the first camera (the reference frame), as the ingest reads them back
    a = geometry.r_ecef_to_enu(first.latitude, first.longitude) @ geometry.r_ecef_to_enu(lat0, lon0).T
    frames = []
    for c in plan.cameras:
        ecef = geometry.enu_to_ecef(np.asarray(c.position_enu, float), lat0, lon0, alt0)
        euler = geometry.euler_from_cam2world(a @ c.cam2world_enu, first.latitude, first.longitude)
        frames.append({
            "position": {"x": float(ecef[0]), "y": float(ecef[1]), "z": float(ecef[2])},
            "rotation": {"x": float(euler[0]), "y": float(euler[1]), "z": float(euler[2])},
            "coordinate": {"latitude": c.latitude, "longitude": c.longitude, "altitude": c.altitude},
            "fovVertical": c.fov_vertical,
        })
    t = plan.trajectory
    return {"name": plan.scene, "width": int(t.width), "height": int(t.height), "numFrames": plan.num_frames,
            "frameRate": t.frame_rate, "durationSeconds": plan.num_frames / t.frame_rate, "cameraFrames": frames}


def read_record(root: str | Path, scene: str) -> dict[str, Any] | None:
    """The project's ingest record of a scene (``data/<scene>/ingest.json``), None when absent."""
    path = SceneLayout(Path(root), scene).ingest_record
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


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
        w2c = geometry.invert_pose(p["cam2world"])
        image = pycolmap.Image(name=name, camera_id=cam_ids[key], image_id=image_id)
        rec.add_image_with_trivial_frame(image, pycolmap.Rigid3d(pycolmap.Rotation3d(w2c[:3, :3]), w2c[:3, 3]))
    with atomic_dir(out_dir) as tmp:
        rec.write_text(str(tmp))
    return out_dir


def aligned_export(track: CameraTrack, scene: str, video_frames: int, total: int) -> tuple[dict[str, Any], list[str]]:
    """The export as the original's extraction leaves it, aligned to the extracted frames:
    (document, what was changed and why)."""
    doc = copy.deepcopy(track.doc)
    entries = doc["cameraFrames"]
    notes = []
    if len(entries) > video_frames:
        notes.append(f"cameraFrames cut from {len(entries)} to {video_frames} entries: the video holds "
                     f"{video_frames} complete frames; entry i is frame {scene}_<i>.jpeg")
        doc["cameraFrames"] = entries[:video_frames]
    elif len(entries) < video_frames:
        notes.append(f"video frames {len(entries)}..{video_frames - 1} have no camera entry and were not extracted")
    if doc.get("name") != scene:
        notes.append(f"name {doc.get('name')!r} set to {scene!r}: the frames are named after the scene id")
        doc["name"] = scene
    for idx, reason in sorted(track.skipped.items()):
        if idx < len(doc["cameraFrames"]):
            notes.append(f"cameraFrames[{idx}] kept as exported but not used ({reason}); it has no footage frame")
    if frame_name(scene, 0, total) != f"{scene}_000.jpeg":
        notes.append(f"{total} frames: names have {len(frame_name(scene, 0, total)) - len(scene) - 6} digits, "
                     "the original's tools name them with at least 3 ('{name}_{i:03d}.jpeg') and differ below 1000")
    return doc, notes


def ingest_scene(root: str | Path, scene: str, jpeg_quality: int = 95, force: bool = False) -> IngestResult:
    """Decode ``<scene>.mp4`` into frames aligned with ``<scene>.json``; write metadata, record and model."""
    root = Path(root)
    layout = SceneLayout(root, scene)
    video, track_path, plan_path = layout.video, layout.camera_export, layout.plan_json
    footage, meta_path, record_path, model_dir = layout.footage, layout.metadata, layout.ingest_record, \
        layout.reference_empty
    remove_partials(footage)
    remove_partials(layout.work, model_dir.name)
    track = load_camera_track(track_path)
    if not video.exists():
        raise EarthStudioError(f"{video}: video not found; render the scene with Cloud Rendering (.mp4)")
    sig = fingerprint(INGEST_VERSION, video, track_path, *([plan_path] if plan_path.exists() else []), length=24)
    old = read_record(root, scene)
    if not force and old and meta_path.exists() and (model_dir / "images.txt").exists():
        if old.get("signature") == sig and all((footage / f["name"]).exists() for f in old.get("frames", [])):
            return IngestResult(scene, len(old["frames"]), old.get("skipped", {}), old.get("video_frames", 0),
                                old.get("camera_entries", 0), meta_path, model_dir, skipped_scene=True,
                                record=record_path, video_problem=old.get("video_problem"),
                                video_complete=old.get("video", {}).get("complete"), plan_check=old.get("plan_check"),
                                notes=old.get("notes", []))
    if old is not None:  # inputs changed: no record may vouch for what is rewritten now
        record_path.unlink(missing_ok=True)

    origin, poses = reference_poses(track)
    index = video_index(video)
    # one decoding thread, so that a decoder error is reported with the frame it belongs to
    cap = cv2.VideoCapture(str(video), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    if not cap.isOpened():
        raise EarthStudioError(f"{video}: cannot open the video (corrupt, cut before its index, or unsupported codec)")
    n_entries = len(track.frames) + len(track.skipped)
    total = max(n_entries, track.num_frames)
    footage.mkdir(parents=True, exist_ok=True)
    names: dict[int, str] = {}
    skipped: dict[str, str] = {}
    limit = index.complete if index is not None else None
    index_i = 0
    sync = set(index.sync) if index is not None and index.sync is not None else None
    damaged_at: int | None = None  # the last frame the decoder reported damaged, while its damage lasts
    damaged_why = ""
    thumbs: dict[int, np.ndarray] = {}  # small grey copies of the written frames, to compare neighbours
    try:
        with DecoderLog() as decoder:
            while limit is None or index_i < limit:  # never decode a frame the file does not hold completely
                ok, frame = cap.read()
                if not ok:
                    break
                errors = decoder.new_errors()
                if errors:
                    damaged_at = index_i
                    damaged_why = errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")
                elif damaged_at is not None and (sync is None or index_i in sync):
                    damaged_at = None  # a keyframe (no keyframe table: every frame is one) ends the damage
                if damaged_at is not None:  # reported and dropped, never ingested as a picture
                    skipped[str(index_i)] = (
                        f"video frame {index_i} is damaged: the decoder reports {damaged_why!r}; dropped"
                        if damaged_at == index_i else
                        f"video frame {index_i} is damaged: it is predicted from damaged frame {damaged_at} "
                        "(until the next keyframe); dropped")
                elif frame is None or frame.shape[1] != track.width or frame.shape[0] != track.height:
                    shape = None if frame is None else frame.shape[1::-1]
                    skipped[str(index_i)] = (f"video frame {index_i} is {shape}, the JSON says "
                                             f"{track.width}x{track.height}")
                elif index_i in poses:
                    name = frame_name(scene, index_i, total)
                    with atomic_path(footage / name, suffix=".jpeg") as tmp:
                        if not cv2.imwrite(str(tmp), frame, [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality]):
                            raise OSError(f"cannot write {footage / name}")
                    names[index_i] = name
                    thumbs[index_i] = _thumbnail(frame)
                elif index_i in track.skipped:
                    skipped[str(index_i)] = track.skipped[index_i]
                else:
                    skipped[str(index_i)] = (f"video frame {index_i} has no cameraFrames entry "
                                             f"(the JSON has {n_entries})")
                index_i += 1
    finally:
        cap.release()
    for i, why in outlier_frames(thumbs).items():  # damage the decoder did not report
        (footage / names.pop(i)).unlink(missing_ok=True)
        skipped[str(i)] = f"video frame {i} {why}; dropped"
    video_frames = index_i
    video_problem = None
    if index is not None and video_frames < index.samples:
        cut = (f"the file ({index.file_size} bytes) is cut short: frame {index.complete} is incomplete"
               if index.complete < index.samples else f"frame {video_frames} does not decode")
        video_problem = (f"{video}: video ends after {video_frames} of {index.samples} frames ({cut}); only the "
                         f"{video_frames} complete frames are used: download or render the video again")
        log.warning("%s", video_problem)
    if video_frames == 0:
        raise EarthStudioError(video_problem or f"{video}: no frame could be decoded (corrupt or empty video)")
    notes: list[str] = []
    for i in range(video_frames, n_entries):
        if not video_problem and i == track.num_frames == video_frames and n_entries == track.num_frames + 1:
            notes.append(f"cameraFrames[{i}] has no video frame, as Earth Studio exports always are: numFrames "
                         f"({track.num_frames}) video frames and numFrames + 1 camera entries; the last is not used")
            continue
        skipped.setdefault(str(i), f"cameraFrames[{i}] has no video frame (the video has {video_frames})")
    if not video_problem and (abs(video_frames - n_entries) > 1
                              or (video_frames != n_entries and video_frames != track.num_frames)):
        log.warning("%s: %d video frames but %d camera entries (numFrames %d); aligned by index",
                    scene, video_frames, n_entries, track.num_frames)
    if not names:
        raise EarthStudioError(f"{video}: no video frame matches a usable camera entry")
    for stale in footage.glob(f"{scene}_*.jpeg"):  # frames of an earlier export of this scene
        if stale.name not in names.values():
            stale.unlink()

    write_reference_model(track, names, poses, model_dir)
    doc, alignment = aligned_export(track, scene, video_frames, total)
    if alignment:
        write_json_atomic(meta_path, doc, indent=2)
    else:  # nothing to align: the export's own bytes, as the original copies it
        with atomic_path(meta_path) as tmp:
            shutil.copyfile(track_path, tmp)
    plan_check = None
    if plan_path.exists():
        try:
            plan_check = planning.compare_with_export(planning.read_plan(plan_path), track)
        except planning.PlanError as exc:
            plan_check = {"error": str(exc)}
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
    write_json_atomic(record_path, {
        "scene": scene, "signature": sig, "metadata_file": meta_path.name,
        "origin": {"latitude": origin[0], "longitude": origin[1], "altitude": origin[2]},
        "width": track.width, "height": track.height, "video_frames": video_frames, "camera_entries": n_entries,
        "numFrames": track.num_frames, "alignment": alignment,
        "video": {"index frames": index.samples if index else None, "complete": index.complete if index else None,
                  "decoded": video_frames},
        "video_problem": video_problem, "plan_check": plan_check,
        "frames": frames_meta, "skipped": skipped, "notes": notes,
    }, indent=1)
    return IngestResult(scene, len(names), skipped, video_frames, n_entries, meta_path, model_dir,
                        record=record_path, video_problem=video_problem,
                        video_complete=index.complete if index is not None else None, plan_check=plan_check,
                        notes=notes)
