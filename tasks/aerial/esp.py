"""Earth Studio projects (``.esp``): writer for a plan and reader.

An ``.esp`` is JSON without a public schema; the shape here is the one tools that
write projects use (modelVersion 18):

* top level ``modelVersion``, ``settings`` (``name``, ``frameRate``, ``dimensions``
  {``width``, ``height``}, ``duration`` in frames, ``timeFormat`` ``"frames"``),
  ``scenes``, ``playbackManager``;
* ``scenes[0].attributes`` holds a ``cameraGroup`` whose ``attributes`` are
  ``cameraPositionGroup`` (a ``position`` with ``longitude``, ``latitude``,
  ``altitude``), ``cameraTargetEffect`` (``enabled``, a ``poi`` with ``longitudePOI``,
  ``latitudePOI``, ``altitudePOI``, ``influence``), ``cameraRotationGroup``
  (``rotationX`` pan, ``rotationY`` tilt, ``rotationZ`` roll) and ``cameraLensGroup``
  (``fov``);
* every animated value is ``{"type", "value": {"relative", "minValueRange",
  "maxValueRange"}, "keyframes": [{"time": 0..1, "value": v}]}`` where a value is the
  position within the range: ``actual = min + v * (max - min)``.  Default ranges when a
  project gives none: longitude [-180, 180], latitude [-90, 90], altitude
  [-500, 65117481] m, pan [0, 360], tilt [0, 180], roll [-180, 180], fov [0, 180].

The writer keys every planned camera (keyframe time ``k / duration``) with position,
pan/tilt/roll (see :func:`tasks.aerial.geometry.rotation_from_pan_tilt_roll`) and field
of view; the target effect is written disabled with the place centre as its point of
interest.  The reader recovers the camera at every keyframe time (values between
keyframes of other projects are interpolated linearly, which Earth Studio does not do
exactly) and, when a project's target effect is enabled, aims the camera at the point
of interest instead of using the rotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tasks.aerial import geometry
from tasks.common import checks
from tasks.common.atomic import write_json_atomic

MODEL_VERSION = 18
RANGES = {
    "longitude": (-180.0, 180.0), "latitude": (-90.0, 90.0), "altitude": (-500.0, 65117481.0),
    "longitudePOI": (-180.0, 180.0), "latitudePOI": (-90.0, 90.0), "altitudePOI": (-500.0, 65117481.0),
    "rotationX": (0.0, 360.0), "rotationY": (0.0, 180.0), "rotationZ": (-180.0, 180.0), "fov": (0.0, 180.0),
}


class EspError(ValueError):
    """An Earth Studio project that cannot be read (names the file and attribute)."""


def _attr(kind: str, values: list[float] | None, times: list[float] | None, static: float | None = None,
          rng: tuple[float, float] | None = None) -> dict[str, Any]:
    lo, hi = rng or RANGES[kind]
    rel = lambda v: (v - lo) / (hi - lo)  # noqa: E731
    value: dict[str, Any] = {"minValueRange": lo, "maxValueRange": hi}
    if kind.startswith("altitude"):
        value["logarithmic"] = False
    first = static if static is not None else values[0]
    value["relative"] = rel(first)
    out: dict[str, Any] = {"type": kind, "value": value}
    if values is not None:
        out["keyframes"] = [{"time": t, "value": rel(v)} for t, v in zip(times, values)]
        out["inTimeline"] = True
    return out


def _unwrapped_range(deg: np.ndarray, period: float = 360.0) -> tuple[np.ndarray, tuple[float, float]]:
    """Pan unwrapped to a continuous curve (no spin between keyframes) and a range covering it."""
    un = np.degrees(np.unwrap(np.radians(deg)))
    lo = period * math.floor(un.min() / period)
    hi = max(lo + period, period * math.ceil(un.max() / period))
    return un, (lo, hi)


def esp_document(plan) -> dict[str, Any]:
    """The Earth Studio project of a :class:`tasks.aerial.plan.Plan`."""
    t = plan.trajectory
    cams = plan.cameras
    times = [c.time for c in cams]
    pan, pan_range = _unwrapped_range(np.array([c.pan for c in cams]))
    lat0, lon0, alt0 = plan.origin
    camera_group = [
        {"type": "cameraPositionGroup", "inTimeline": True, "attributes": [
            {"type": "position", "inTimeline": True, "attributes": [
                _attr("longitude", [c.longitude for c in cams], times),
                _attr("latitude", [c.latitude for c in cams], times),
                _attr("altitude", [c.altitude for c in cams], times)]}]},
        {"type": "cameraTargetEffect", "attributes": [
            {"type": "enabled", "value": {"relative": 0}},
            {"type": "poi", "attributes": [_attr("longitudePOI", None, None, lon0),
                                           _attr("latitudePOI", None, None, lat0),
                                           _attr("altitudePOI", None, None, alt0)]},
            {"type": "influence", "value": {"relative": 1}}]},
        {"type": "cameraRotationGroup", "inTimeline": True, "attributes": [
            _attr("rotationX", list(pan), times, rng=pan_range),
            _attr("rotationY", [c.tilt for c in cams], times),
            _attr("rotationZ", [c.roll for c in cams], times)]},
        {"type": "cameraLensGroup", "attributes": [_attr("fov", [c.fov_vertical for c in cams], times)]},
    ]
    return {
        "modelVersion": MODEL_VERSION,
        "settings": {"name": plan.scene, "frameRate": t.frame_rate,
                     "dimensions": {"width": int(t.width), "height": int(t.height)},
                     "duration": plan.num_frames, "timeFormat": "frames"},
        "scenes": [{"animationModel": {"roving": False, "logarithmic": False, "groupedPosition": True},
                    "duration": plan.num_frames,
                    "attributes": [{"type": "cameraGroup", "inTimeline": True, "attributes": camera_group}],
                    "cameraExport": {"logarithmic": False, "modelVersion": 2}}],
        "playbackManager": {"range": {"start": 0, "end": plan.num_frames}},
    }


def write_esp(plan, path: str | Path) -> Path:
    return write_json_atomic(path, esp_document(plan), indent=1)


# ----------------------------------------------------------------------------- reader


@dataclass
class EspCamera:
    frame: int
    time: float
    latitude: float
    longitude: float
    altitude: float
    pan: float
    tilt: float
    roll: float
    fov_vertical: float
    look_at: tuple[float, float, float] | None  # (lat, lon, alt) when the target effect is on

    def cam2world_local(self) -> np.ndarray:
        """COLMAP camera-to-world rotation in the local ENU frame at the camera."""
        if self.look_at is None:
            return geometry.rotation_from_pan_tilt_roll(self.pan, self.tilt, self.roll)
        target = geometry.geodetic_to_enu(*self.look_at, self.latitude, self.longitude, self.altitude)
        return geometry.look_at(np.zeros(3), target)


@dataclass
class EspProject:
    path: Path
    name: str
    frame_rate: float
    width: int
    height: int
    duration: int
    cameras: list[EspCamera]


def _find(items: Any, kind: str, where: str) -> dict[str, Any]:
    for a in items or []:
        if isinstance(a, dict) and a.get("type") == kind:
            return a
    raise EspError(f"{where}: no '{kind}' attribute")


class _Track:
    def __init__(self, attr: dict[str, Any], kind: str, where: str, default: float | None = None):
        value = attr.get("value") or {}
        lo = float(value.get("minValueRange", RANGES[kind][0]))
        hi = float(value.get("maxValueRange", RANGES[kind][1]))
        self.kind, self.where = kind, f"{where}.{kind}"
        if value.get("logarithmic"):
            raise EspError(f"{self.where}: logarithmic values are not supported; untick 'logarithmic' in Earth Studio")
        conv = lambda v: lo + float(v) * (hi - lo)  # noqa: E731
        kfs = attr.get("keyframes") or []
        try:
            pts = sorted((float(k["time"]), conv(k["value"])) for k in kfs)
            self.static = conv(value["relative"]) if "relative" in value else default
        except (KeyError, TypeError, ValueError):
            raise EspError(f"{self.where}: keyframes need numeric 'time' and 'value'") from None
        self.times = np.array([p[0] for p in pts])
        self.values = np.array([p[1] for p in pts])
        if not pts and self.static is None:
            raise EspError(f"{self.where}: neither keyframes nor a value")

    def at(self, t: float) -> float:
        if self.times.size == 0:
            return float(self.static)
        return float(np.interp(t, self.times, self.values))


def read_esp(path: str | Path) -> EspProject:
    """Read an Earth Studio project; one camera per keyframe time (:class:`EspError` when unreadable)."""
    path = Path(path)
    doc = checks.read_json(path, "Earth Studio project", EspError,
                           fix="a file that is not JSON is not an Earth Studio project (.esp): save it from Earth "
                               "Studio again")
    where = str(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("scenes"), list) or not doc["scenes"]:
        raise EspError(f"{where}: no 'scenes'; not an Earth Studio project")
    settings = doc.get("settings") or {}
    try:
        duration = int(settings.get("duration", doc["scenes"][0].get("duration")))
        dims = settings.get("dimensions") or {}
        width, height = int(dims.get("width", 0)), int(dims.get("height", 0))
        frame_rate = float(settings.get("frameRate", 30))
    except (TypeError, ValueError):
        raise EspError(f"{where}: settings need a numeric duration, frameRate and dimensions") from None
    if duration < 1:
        raise EspError(f"{where}: duration {duration} frames")
    cam = _find(doc["scenes"][0].get("attributes"), "cameraGroup", f"{where}: scenes[0]")["attributes"]
    w = f"{where}: cameraGroup"
    pos = _find(_find(cam, "cameraPositionGroup", w)["attributes"], "position", w)["attributes"]
    tracks = {k: _Track(_find(pos, k, w), k, w) for k in ("longitude", "latitude", "altitude")}
    rot = _find(cam, "cameraRotationGroup", w)["attributes"]
    tracks["rotationX"] = _Track(_find(rot, "rotationX", w), "rotationX", w)
    tracks["rotationY"] = _Track(_find(rot, "rotationY", w), "rotationY", w)
    try:
        tracks["rotationZ"] = _Track(_find(rot, "rotationZ", w), "rotationZ", w, default=0.0)
    except EspError:
        tracks["rotationZ"] = None
    try:
        lens = _find(cam, "cameraLensGroup", w)["attributes"]
        tracks["fov"] = _Track(_find(lens, "fov", w), "fov", w)
    except EspError:
        raise EspError(f"{w}: no cameraLensGroup fov; the field of view is needed for the intrinsics") from None
    poi = None
    try:
        eff = _find(cam, "cameraTargetEffect", w)["attributes"]
        enabled = float((_find(eff, "enabled", w).get("value") or {}).get("relative", 0) or 0) > 0.5
        if enabled:
            p = _find(eff, "poi", w)["attributes"]
            poi = {k: _Track(_find(p, k, w), k, w) for k in ("latitudePOI", "longitudePOI", "altitudePOI")}
    except EspError:
        poi = None
    times = sorted({round(float(t), 12) for tr in tracks.values() if tr is not None for t in tr.times} or {0.0})
    cams = []
    for t in times:
        look = None if poi is None else (poi["latitudePOI"].at(t), poi["longitudePOI"].at(t), poi["altitudePOI"].at(t))
        roll = tracks["rotationZ"].at(t) if tracks["rotationZ"] is not None else 0.0
        cams.append(EspCamera(int(round(t * duration)), t, tracks["latitude"].at(t), tracks["longitude"].at(t),
                              tracks["altitude"].at(t), tracks["rotationX"].at(t) % 360.0, tracks["rotationY"].at(t),
                              roll, tracks["fov"].at(t), look))
    return EspProject(path, str(settings.get("name") or path.stem), frame_rate, width, height, duration, cams)
