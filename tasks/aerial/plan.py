"""Planning stage: camera paths for new places, written as Earth Studio projects.

Input: a place per scene (scene id, centre latitude/longitude in degrees WGS84, ground
altitude in metres, radius of interest in metres) and a named trajectory configuration
(:data:`TRAJECTORIES`, any setting overridable).  Output per scene, in ``<root>/plans/``:

* ``<scene>.esp`` - an Earth Studio project (see :mod:`tasks.aerial.esp`): import it
  with File > Import > Earth Studio Project, render the video (Cloud Rendering) and the
  3D camera tracking JSON (Coordinate Space: Global), put both in
  ``<root>/downloaded_data/`` as ``<scene>.mp4`` and ``<scene>.json``;
* ``<scene>.plan.json`` - the plain plan (this module reads and writes it): per camera
  its position (latitude, longitude, altitude), look-at point, rotation (pan, tilt,
  roll in the camera's local ENU frame, as Earth Studio's camera rotation), vertical
  field of view, and the same pose in the plan frame (ENU metres at the place centre
  on the ground: ``position_enu`` and the COLMAP camera-to-world ``cam2world_enu``).

A plan of ``frames`` frames has ``frames + 1`` cameras at times ``k / frames``, as an
Earth Studio render of that duration exports ``numFrames + 1`` camera entries.

Trajectory (all distances in metres; "x radius" settings are multiples of the radius of
interest):

* a descending spiral (``spiral_fraction`` of the path, ``spiral_turns`` turns from
  angle ``spiral_start_rad``): altitude above ground from ``spiral_altitudes[0]`` to
  ``[1]`` (geometric), horizontal distance from the centre from ``spiral_radii[0]`` to
  ``[1]`` x radius (linear), looking at the centre with a wobble of
  ``target_wobble`` x radius horizontally and ``target_height[0] +- target_height[1]`` m
  above ground.  Equal altitudes and radii make it an orbit.
* then a near-ground pass along a square street loop of half-size ``loop`` x radius
  around the centre (turned by ``loop_rotation_deg`` from the east/north axes), covering
  ``loop_coverage`` of it, altitude from ``pass_altitudes[0]`` to ``[1]``, looking ahead
  with a yaw wobble of ``pass_yaw_deg`` (``pass_yaw_cycles`` cycles) and a pitch from
  ``pass_pitch_deg[0]`` to ``[1]``.
* ``phases`` (radians) shift the look-at wobble and the start point on the loop.

The default, ``spiral+streets`` with radius 100 m, is the synthetic world's trajectory
(:mod:`tasks.aerial.synthetic_world` renders from a plan made here).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from tasks.aerial import esp, geometry
from tasks.aerial.layout import SceneLayout
from tasks.common import checks, trusted
from tasks.common.atomic import write_json_atomic
from tasks.common.config import NamedConfigs, UnknownSetting
from tasks.common.forms import setting

PLAN_VERSION = 1
MIN_CLEARANCE_M = 0.5  # a camera closer than this to the ground is refused


class PlanError(ValueError):
    """A place or trajectory that cannot be planned (names the scene, file and setting)."""


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Place:
    scene: str
    latitude: float
    longitude: float
    ground_altitude: float
    radius: float


#: A place's numbers: ``field: (low, high, bounds excluded, what it is)``. The radius of interest
#: is 1 m to 20 km: the trajectories scale with it (the default spiral flies at 2.6 radii), so a
#: radius of a micrometre or of a continent plans nothing Earth Studio can render usefully.
PLACE_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "latitude": (-90.0, 90.0, True, "degrees north, WGS84"),
    "longitude": (-180.0, 180.0, False, "degrees east, WGS84"),
    "ground_altitude": (-500.0, 9000.0, False, "metres, the ground's altitude at the centre as Earth Studio "
                                                "gives it"),
    "radius": (1.0, 20000.0, False, "metres, the radius of interest around the centre"),
}


def place_from_dict(d: Any, where: str) -> Place:
    """Validate one place (``scene``, ``latitude``, ``longitude``, ``ground_altitude``, ``radius``)."""
    if not isinstance(d, dict):
        raise PlanError(f"{where}: a place must be a mapping with scene, latitude, longitude, "
                        f"ground_altitude and radius, got {type(d).__name__}")
    scene = d.get("scene")
    if scene is None or not str(scene).strip():
        raise PlanError(f"{where}: no 'scene' id")
    scene = str(scene).strip()
    try:
        checks.plain_name(scene, "scene id", where=where)
    except checks.InputError as exc:
        raise PlanError(f"{exc} (the scene id names the plan's files)") from None
    where = f"{where} (scene {scene})"
    unknown = sorted(set(d) - {"scene", *PLACE_RANGES})
    if unknown:
        raise PlanError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}; a place has scene, "
                        f"{', '.join(PLACE_RANGES)} (render settings such as width or frame_rate are "
                        "trajectory_options)")
    values = {}
    for key, (lo, hi, lo_open, hint) in PLACE_RANGES.items():
        if d.get(key) is None:
            raise PlanError(f"{where}: no '{key}' ({hint}); a place needs its coordinates to be planned")
        try:
            values[key] = checks.number(d[key], f"'{key}'", where=where, lo=lo, hi=hi, lo_open=lo_open,
                                        hi_open=lo_open and key == "latitude")
        except checks.InputError as exc:
            raise PlanError(f"{exc} ({hint})") from None
    return Place(scene, values["latitude"], values["longitude"], values["ground_altitude"], values["radius"])


def load_places(path: str | Path, errors: list[tuple[str, str]] | None = None) -> list[Place]:
    """Places from a JSON or YAML file: a list of places, or one place.

    With ``errors`` given, a bad place is appended there as ``(scene or "place <i>", why)``
    and the others are still returned; otherwise the first bad place raises :class:`PlanError`."""
    path = Path(path)
    if path.suffix.lower() not in (".yaml", ".yml"):
        doc = checks.read_json(path, "places", PlanError)
    elif not path.is_file():
        raise PlanError(f"{path}: places file not found; check the path")
    else:
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise PlanError(f"{path}: cannot parse ({exc}); expected a YAML list of places") from None
    items = doc if isinstance(doc, list) else [doc]
    places: list[Place] = []
    seen: set[str] = set()
    for i, d in enumerate(items):
        try:
            p = place_from_dict(d, f"{path}: place {i}")
            if p.scene in seen:
                raise PlanError(f"{path}: place {i}: scene {p.scene} is planned twice")
        except PlanError as exc:
            if errors is None:
                raise
            label = str(d.get("scene")) if isinstance(d, dict) and d.get("scene") is not None else f"place {i}"
            errors.append((label, str(exc)))
            continue
        seen.add(p.scene)
        places.append(p)
    return places


# ----------------------------------------------------------------------------- trajectories


@dataclass(frozen=True)
class Trajectory:
    """A camera path around a place (the module's docstring draws it); distances in metres,
    "x radius" settings are multiples of the place's radius."""

    name: str = setting("spiral+streets", "the named trajectory these settings start from (TRAJECTORIES)")
    frames: int = setting(48, "rendered frames (the plan has one camera more: frames + 1); 1-10000")
    fov: float = setting(50.0, "vertical field of view of the camera, in degrees")
    frame_rate: float = setting(10.0, "frames per second of the Earth Studio render (up to 60)")
    width: int = setting(640, "render width in pixels, written into the Earth Studio project (16-3840)")
    height: int = setting(480, "render height in pixels (16-3840)")
    spiral_fraction: float = setting(0.5, "share of the path that is the descending spiral; the rest is the pass "
                                          "above the streets (1: spiral only, 0: streets only)")
    spiral_turns: float = setting(2.0, "turns of the spiral around the place")
    spiral_start_rad: float = setting(0.3, "angle around the place where the spiral starts, in radians")
    spiral_altitudes: tuple[float, float] = setting(
        (300.0, 40.0), "spiral altitude above the ground at its start and end, in metres (descends geometrically)")
    spiral_radii: tuple[float, float] = setting(
        (2.6, 1.5), "spiral distance from the centre at its start and end, x radius (changes linearly)")
    target_wobble: float = setting(0.25, "how far the point the camera looks at wanders around the centre "
                                         "during the spiral, x radius")
    target_height: tuple[float, float] = setting(
        (8.0, 6.0), "height above the ground of the point the camera looks at during the spiral: mean and "
                    "amplitude, in metres")
    loop: float = setting(0.2, "half-size of the square street loop of the low pass, x radius")
    loop_rotation_deg: float = setting(0.0, "rotation of the street loop from the east/north axes, in degrees")
    loop_coverage: float = setting(0.9, "share of the street loop flown (0-1)")
    pass_altitudes: tuple[float, float] = setting(
        (5.0, 2.5), "altitude above the ground of the low pass at its start and end, in metres (linear)")
    pass_yaw_deg: float = setting(25.0, "how far the camera turns left and right of the direction of flight "
                                        "during the low pass, in degrees")
    pass_yaw_cycles: float = setting(3.0, "left-right turns of the camera during the low pass")
    pass_pitch_deg: tuple[float, float] = setting(
        (-4.0, 2.0), "camera pitch during the low pass at its start and end, in degrees (negative: looking down)")
    phases: tuple[float, float, float] = setting(
        (0.0, 0.0, 0.0), "three angles in radians that shift the look-at wobble and the start point on the loop "
                         "(another path with the same shape)")

    def check(self) -> None:
        """Raise :class:`PlanError` for settings no camera path can fly (:func:`validate_trajectory`)."""
        validate_trajectory(self)


#: Bounds of a trajectory's render settings: ``field: (low, high, low excluded, unit)``. Earth
#: Studio renders at most 4K (3840 x 2160) and 60 fps; frames: at most 10 000 (16 min at 10 fps;
#: every frame is one rendered image, decoded and matched), so a typo cannot ask for 10^8.
TRAJECTORY_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "frames": (1, 10000, False, ""),
    "fov": (0.0, 179.0, True, "degrees"),
    "frame_rate": (0.0, 60.0, True, "fps"),
    "width": (16, 3840, False, "px"),
    "height": (16, 3840, False, "px"),
}

#: Named trajectories (``trajectory``; ``--trajectory NAME``): each a dict of settings over the defaults.
TRAJECTORIES = NamedConfigs("trajectory", Trajectory, {
    "spiral+streets": {},
    "spiral": {"spiral_fraction": 1.0},
    "orbit": {"spiral_fraction": 1.0, "spiral_turns": 1.0, "spiral_altitudes": (150.0, 150.0),
              "spiral_radii": (2.0, 2.0), "target_wobble": 0.0, "target_height": (0.0, 0.0)},
    "streets": {"spiral_fraction": 0.0},
}, default="spiral+streets", name_field="name")


def get_trajectory(name: str = "spiral+streets", **overrides: Any) -> Trajectory:
    """A named trajectory with settings overridden; validated (:class:`PlanError`)."""
    defaults = Trajectory()
    for k, v in overrides.items():
        if isinstance(getattr(defaults, k, None), tuple):  # JSON/YAML lists: the tuples of the settings
            try:
                overrides[k] = tuple(float(x) for x in v)
            except (TypeError, ValueError):
                raise PlanError(f"trajectory {name!r}: setting {k} must be a list of numbers, got {v!r}") from None
    try:
        return TRAJECTORIES.build(name, **overrides)  # Trajectory.check: validate_trajectory
    except UnknownSetting as exc:
        raise PlanError(f"trajectory {name!r}: {exc}") from None


def validate_trajectory(t: Trajectory) -> None:
    """Refuse settings no camera path can fly."""
    def bad(setting: str, why: str) -> PlanError:
        return PlanError(f"trajectory {t.name!r}: {setting} {getattr(t, setting)!r} {why}")

    where = f"trajectory {t.name!r}"
    for f in fields(Trajectory):  # every number finite and of its type first (NaN, Infinity and true are refused)
        v = getattr(t, f.name)
        try:
            if f.name in TRAJECTORY_RANGES:
                lo, hi, lo_open, unit = TRAJECTORY_RANGES[f.name]
                checks.number(v, f.name, where=where, lo=lo, hi=hi, lo_open=lo_open, integer=f.type == "int",
                              unit=unit)
            elif f.name != "name":
                for x in (v if isinstance(v, tuple) else (v,)):
                    checks.number(x, f.name, where=where)
        except checks.InputError as exc:
            raise PlanError(f"{exc}{' (the plan has frames + 1 cameras)' if f.name == 'frames' else ''}") from None
    if not 0.0 <= t.spiral_fraction <= 1.0:
        raise bad("spiral_fraction", "must be in [0, 1]")
    for name in ("spiral_altitudes", "pass_altitudes", "spiral_radii", "target_height", "pass_pitch_deg"):
        v = getattr(t, name)
        if len(v) != 2 or not all(math.isfinite(x) for x in v):
            raise bad(name, "must be two finite numbers (start, end)")
    if len(t.phases) != 3:
        raise bad("phases", "must be three angles (radians)")
    if t.spiral_fraction > 0:
        if min(t.spiral_altitudes) < MIN_CLEARANCE_M:
            raise bad("spiral_altitudes", f"puts cameras below ground (altitudes are metres above the ground; "
                                          f">= {MIN_CLEARANCE_M} m)")
        if min(t.spiral_radii) < 0:
            raise bad("spiral_radii", "must be >= 0 (multiples of the radius of interest)")
        if t.target_height[0] - abs(t.target_height[1]) < 0:
            raise bad("target_height", "puts the look-at point below ground (mean - amplitude < 0)")
    if t.spiral_fraction < 1:
        if min(t.pass_altitudes) < MIN_CLEARANCE_M:
            raise bad("pass_altitudes", f"puts cameras below ground (altitudes are metres above the ground; "
                                        f">= {MIN_CLEARANCE_M} m)")
        if not t.loop > 0:
            raise bad("loop", "must be > 0 (half-size of the street loop, x radius)")
        if not 0.0 < t.loop_coverage <= 1.0:
            raise bad("loop_coverage", "must be in (0, 1]")
        if max(abs(x) for x in t.pass_pitch_deg) >= 89.0:
            raise bad("pass_pitch_deg", "must stay within (-89, 89) degrees: the pass looks ahead along the street")


def _ring_point(u: float, half: float) -> tuple[np.ndarray, np.ndarray]:
    """Point and unit travel direction on the square loop x, y = +-half, u in [0, 1)."""
    corners = [np.array(c, float) for c in ((half, -half), (half, half), (-half, half), (-half, -half))]
    side = int(u * 4) % 4
    t = u * 4 - int(u * 4)
    a, b = corners[side], corners[(side + 1) % 4]
    d = (b - a) / np.linalg.norm(b - a)
    return a + t * (b - a), d


def camera_path(t: Trajectory, radius: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """(position, look-at target) per camera in the plan frame (ENU metres, ground at z = 0)."""
    k = t.phases
    out = []
    for i in range(t.frames + 1):
        s = i / max(t.frames, 1)
        if t.spiral_fraction > 0 and s <= t.spiral_fraction:
            q = s / t.spiral_fraction
            a0, a1 = t.spiral_altitudes
            alt = a0 * (a1 / a0) ** q
            r0, r1 = t.spiral_radii[0] * radius, t.spiral_radii[1] * radius
            rad = r0 + (r1 - r0) * q
            ang = 2.0 * math.pi * t.spiral_turns * q + t.spiral_start_rad
            pos = np.array([rad * math.cos(ang), rad * math.sin(ang), alt])
            w = t.target_wobble * radius
            target = np.array([w * math.sin(3.1 * ang + k[0]), w * math.cos(2.3 * ang + k[1]),
                               t.target_height[0] + t.target_height[1] * math.sin(ang + k[2])])
        else:
            q = (s - t.spiral_fraction) / (1.0 - t.spiral_fraction)
            xy, d = _ring_point((t.loop_coverage * q + k[0] / (2 * math.pi)) % 1.0, t.loop * radius)
            if t.loop_rotation_deg:
                c, sn = math.cos(math.radians(t.loop_rotation_deg)), math.sin(math.radians(t.loop_rotation_deg))
                rot = np.array([[c, -sn], [sn, c]])
                xy, d = rot @ xy, rot @ d
            p0, p1 = t.pass_altitudes
            alt = p0 + (p1 - p0) * q
            yaw = math.radians(t.pass_yaw_deg * math.sin(2 * math.pi * t.pass_yaw_cycles * q + k[1]))
            d = np.array([d[0] * math.cos(yaw) - d[1] * math.sin(yaw), d[0] * math.sin(yaw) + d[1] * math.cos(yaw)])
            g0, g1 = t.pass_pitch_deg
            pitch = math.radians(g0 + (g1 - g0) * q)
            pos = np.array([xy[0], xy[1], alt])
            target = pos + np.array([d[0] * math.cos(pitch), d[1] * math.cos(pitch), math.sin(pitch)])
        out.append((pos, target))
    return out


# ----------------------------------------------------------------------------- the plan


@dataclass
class PlannedCamera:
    frame: int
    time: float  # k / frames, Earth Studio's keyframe time
    latitude: float
    longitude: float
    altitude: float
    look_at: dict[str, float]  # latitude, longitude, altitude
    pan: float  # degrees, Earth Studio camera rotation in the local ENU frame at the camera
    tilt: float
    roll: float
    fov_vertical: float
    position_enu: np.ndarray  # plan frame (ENU at the centre, ground altitude)
    cam2world_enu: np.ndarray  # COLMAP camera-to-world rotation in the plan frame


@dataclass
class Plan:
    scene: str
    place: Place
    trajectory: Trajectory
    cameras: list[PlannedCamera] = field(default_factory=list)

    @property
    def origin(self) -> tuple[float, float, float]:
        """Geodetic origin of the plan frame: the place centre on the ground."""
        return (self.place.latitude, self.place.longitude, self.place.ground_altitude)

    @property
    def num_frames(self) -> int:
        return self.trajectory.frames


def make_plan(place: Place, trajectory: Trajectory) -> Plan:
    """Plan the cameras of ``place`` with ``trajectory``; :class:`PlanError` when impossible."""
    validate_trajectory(trajectory)
    lat0, lon0, alt0 = place.latitude, place.longitude, place.ground_altitude
    cams = []
    for i, (pos, target) in enumerate(camera_path(trajectory, place.radius)):
        if pos[2] < MIN_CLEARANCE_M:
            raise PlanError(f"scene {place.scene}: trajectory {trajectory.name!r} puts camera {i} "
                            f"{pos[2]:.2f} m above the ground (below {MIN_CLEARANCE_M} m)")
        if np.linalg.norm(target - pos) < 1e-6:
            raise PlanError(f"scene {place.scene}: camera {i} sits on its look-at point; "
                            "change target_height or the altitudes")
        r = geometry.look_at(pos, target)
        lat, lon, alt = (float(v) for v in geometry.enu_to_geodetic(pos, lat0, lon0, alt0))
        tlat, tlon, talt = (float(v) for v in geometry.enu_to_geodetic(target, lat0, lon0, alt0))
        pan, tilt, roll = geometry.pan_tilt_roll_from_rotation(geometry.local_rotation(r, lat0, lon0, lat, lon))
        cams.append(PlannedCamera(i, i / trajectory.frames, lat, lon, alt,
                                  {"latitude": tlat, "longitude": tlon, "altitude": talt}, pan, tilt, roll,
                                  float(trajectory.fov), pos, r))
    return Plan(place.scene, place, trajectory, cams)


def plan_paths(root: str | Path, scene: str) -> tuple[Path, Path]:
    """(``<root>/plans/<scene>.plan.json``, ``<root>/plans/<scene>.esp``)."""
    layout = SceneLayout(Path(root), scene)
    return layout.plan_json, layout.plan_esp


def write_plan(plan: Plan, path: str | Path, esp_record: dict[str, Any] | None = None) -> Path:
    """``<scene>.plan.json``; ``esp_record``: the record (:mod:`tasks.common.trusted`) of the
    ``.esp`` beside it, checked before a rerun keeps that project."""
    cams = []
    for c in plan.cameras:
        cams.append({
            "frame": c.frame, "time": c.time, "latitude": c.latitude, "longitude": c.longitude,
            "altitude": c.altitude, "look_at": c.look_at,
            "rotation": {"pan": c.pan, "tilt": c.tilt, "roll": c.roll}, "fov_vertical": c.fov_vertical,
            "position_enu": [float(x) for x in c.position_enu],
            "cam2world_enu": [[float(x) for x in row] for row in c.cam2world_enu],
        })
    doc = {
        "plan_version": PLAN_VERSION, "scene": plan.scene, "place": asdict(plan.place),
        "trajectory": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(plan.trajectory).items()},
        "frame": "plan frame: ENU metres at (place.latitude, place.longitude, place.ground_altitude); "
                 "cam2world_enu is the COLMAP camera-to-world rotation (x right, y down, z forward); "
                 "rotation is Earth Studio's pan/tilt/roll in the camera's local ENU frame (degrees)",
        "num_frames": plan.num_frames, "cameras": cams,
    }
    if esp_record is not None:
        doc["esp"] = esp_record
    return write_json_atomic(path, doc, indent=1)


def read_plan(path: str | Path) -> Plan:
    path = Path(path)
    doc = checks.read_json(path, "plan", PlanError)
    try:
        place = place_from_dict(doc["place"], f"{path}: place")
        tr = dict(doc["trajectory"])
        traj = Trajectory(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in tr.items()})
        cams = [PlannedCamera(int(c["frame"]), float(c["time"]), float(c["latitude"]), float(c["longitude"]),
                              float(c["altitude"]), {k: float(v) for k, v in c["look_at"].items()},
                              float(c["rotation"]["pan"]), float(c["rotation"]["tilt"]), float(c["rotation"]["roll"]),
                              float(c["fov_vertical"]), np.asarray(c["position_enu"], float),
                              np.asarray(c["cam2world_enu"], float)) for c in doc["cameras"]]
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, PlanError):
            raise
        raise PlanError(f"{path}: not a plan file ({type(exc).__name__}: {exc})") from None
    return Plan(str(doc["scene"]), place, traj, cams)


@dataclass
class PlanResult:
    scene: str
    plan: Path
    esp: Path
    cameras: int
    skipped: bool = False
    #: why the files of an earlier run were not kept (an invalid .esp), or None
    invalid: str | None = None


def _esp_problems(plan_path: Path, esp_path: Path) -> list[str]:
    """What is wrong with the ``.esp`` beside a plan file, against the plan's record of it
    (a plan file without a record, written before records existed: the project must parse)."""
    try:
        rec = json.loads(plan_path.read_text()).get("esp")
    except (OSError, ValueError, AttributeError):
        rec = None
    if isinstance(rec, dict) and rec:
        return trusted.problems(esp_path.parent, rec)
    try:
        esp.read_esp(esp_path)
    except Exception as exc:  # noqa: BLE001 - any failure to parse: not a valid project
        return [f"{esp_path}: not a valid Earth Studio project ({type(exc).__name__}: {exc})"]
    return []


def plan_scene(root: str | Path, place: Place, trajectory: Trajectory, force: bool = False) -> PlanResult:
    """The planning stage for one scene: ``plans/<scene>.plan.json`` and ``plans/<scene>.esp``.

    Skipped when both exist and were made from the same place and settings."""
    plan_path, esp_path = plan_paths(root, place.scene)
    invalid = None
    if not force and plan_path.exists() and esp_path.exists():
        try:
            old = read_plan(plan_path)
            if old.place == place and old.trajectory == trajectory and len(old.cameras) == trajectory.frames + 1:
                bad = _esp_problems(plan_path, esp_path)
                if not bad:
                    return PlanResult(place.scene, plan_path, esp_path, len(old.cameras), skipped=True)
                invalid = "; ".join(bad)
        except PlanError:
            pass
    plan = make_plan(place, trajectory)
    esp.write_esp(plan, esp_path)
    # last: a plan file means the project beside it is complete, as recorded
    write_plan(plan, plan_path, trusted.record(esp_path.parent, [esp_path]))
    return PlanResult(place.scene, plan_path, esp_path, len(plan.cameras), invalid=invalid)


def compare_with_export(plan: Plan, track) -> dict[str, Any]:
    """How far an Earth Studio export (:class:`tasks.aerial.earthstudio.CameraTrack`) lies
    from its plan: worst position (m) and rotation (deg) differences over the cameras both have."""
    lat0, lon0, alt0 = plan.origin
    by_index = {f.index: f for f in track.frames}
    dpos, drot, dfov = [], [], []
    for c in plan.cameras:
        f = by_index.get(c.frame)
        if f is None:
            continue
        enu = geometry.geodetic_to_enu(f.latitude, f.longitude, f.altitude, lat0, lon0, alt0)
        dpos.append(float(np.linalg.norm(enu - c.position_enu)))
        r = geometry.cam2world_rotation(f.rotation_deg, lat0, lon0)
        drot.append(math.degrees(geometry.Rotation.from_matrix(r.T @ c.cam2world_enu).magnitude()))
        dfov.append(abs(f.fov_vertical - c.fov_vertical))
    return {"cameras compared": len(dpos), "planned cameras": len(plan.cameras),
            "max position difference m": max(dpos, default=float("nan")),
            "max rotation difference deg": max(drot, default=float("nan")),
            "max fov difference deg": max(dfov, default=float("nan"))}
