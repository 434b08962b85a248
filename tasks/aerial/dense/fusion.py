"""What both dense backends share after their maps: fusion and the export to ``depths/<stem>.h5``.

Input: COLMAP's dense workspace (``images/``, ``sparse/``, ``stereo/{depth,normal}_maps/
<name>.<kind>.bin``), written by the GPU backend (``pycolmap.patch_match_stereo``) or by the CPU
PatchMatch (:mod:`.patchmatch`). Output: ``fused.ply`` from ``pycolmap.stereo_fusion`` (CPU; its
``.vis`` file next to it) and, per image, the map resized to the image with nearest-neighbour
sampling as ``depths/<stem>.h5`` (0 where the backend's filter left no depth).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pycolmap

from tasks.aerial.dense.config import DenseConfig, DenseError
from tasks.aerial.dense.io import depth_path, read_colmap_array, read_depth_h5, write_depth_h5
from tasks.aerial.dense.views import _cam
from tasks.aerial.dense.workspace import Workspace, open_workspace
from tasks.common import trusted
from tasks.common.atomic import atomic_path, write_json_atomic
from tasks.common.fingerprint import fingerprint

log = logging.getLogger(__name__)


def export_colmap_depths(workspace: Path | Workspace, depth_dir: Path, image_names: list[str] | None = None,
                         kind: str = "geometric") -> dict:
    """Convert ``stereo/depth_maps/<name>.<kind>.bin`` to ``depth_dir/<stem>.h5`` (resized to the
    image size with nearest-neighbour sampling when PatchMatch ran at a smaller ``max_image_size``).
    An h5 that exists, is newer than its map and has the image's size is kept (resume). Returns
    ``{"stats": {name: {"valid_fraction", "seconds", "skipped"}}, "failures": {name: reason}}``."""
    ws = open_workspace(workspace)
    workspace, depth_dir = ws.path, Path(depth_dir)
    names = sorted(ws.by_name) if image_names is None else list(image_names)
    stats, failures = {}, {}
    for name in names:
        t0 = time.perf_counter()
        src = workspace / "stereo" / "depth_maps" / f"{name}.{kind}.bin"
        try:
            if name not in ws.by_name:
                raise DenseError(f"{name}: not in the workspace model")
            if not src.is_file():
                raise FileNotFoundError(f"{src}: no depth map (no source view, or PatchMatch failed)")
            d = read_colmap_array(src)
            if d.ndim != 2:
                raise DenseError(f"{src}: expected one channel, got {d.shape}")
            c = _cam(ws.rec, ws.by_name[name])
            out = depth_path(depth_dir, name)
            old = _current_h5(out, src, (c.height, c.width))
            if old is not None:
                stats[name] = {"valid_fraction": float((old > 0).mean()), "seconds": time.perf_counter() - t0,
                               "skipped": True}
                continue
            if d.shape != (c.height, c.width):
                d = cv2.resize(d, (c.width, c.height), interpolation=cv2.INTER_NEAREST)
            d = np.where(np.isfinite(d) & (d > 0), d, 0).astype(np.float32)
            write_depth_h5(out, d)
        except Exception as exc:  # noqa: BLE001 - one image never sinks the others
            failures[name] = f"{type(exc).__name__}: {exc}"
            continue
        stats[name] = {"valid_fraction": float((d > 0).mean()), "seconds": time.perf_counter() - t0,
                       "skipped": False}
    return {"stats": stats, "failures": failures}



def _current_h5(path: Path, source: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The depth of ``path`` when it is newer than ``source`` and of ``shape``, else None."""
    try:
        if path.stat().st_mtime_ns < source.stat().st_mtime_ns:
            return None
        d = read_depth_h5(path)
    except Exception:  # noqa: BLE001 - missing or unreadable: export again
        return None
    return d if d.shape == tuple(shape) else None


def fuse(workspace: Path | Workspace, kind: str, max_image_size: int, config: DenseConfig | None = None,
         image_names: list[str] | None = None, output: Path | None = None) -> dict:
    """``pycolmap.stereo_fusion`` of the ``<kind>`` maps (images with both a depth and a normal map;
    ``stereo/fusion.cfg`` lists them) into ``output`` (default ``workspace/fused.ply``), with the
    images scaled to ``max_image_size`` as the maps were. Returns ``{"fused points", "fused images",
    "seconds"}`` (``"skipped": True`` when kept); no map at all writes no file (``fused points`` 0).
    ``<output>.json`` records the inputs (maps, images, model, options) and the files written
    (:mod:`tasks.common.trusted`): a rerun with the same inputs and intact files keeps them.
    Fusion runs on one thread, so the same inputs give the same bytes."""
    cfg = config or DenseConfig()
    ws = open_workspace(workspace)
    output = Path(output) if output is not None else ws.path / "fused.ply"
    names = sorted(ws.by_name) if image_names is None else list(image_names)
    maps = ws.path / "stereo"
    done = [n for n in names if (maps / "depth_maps" / f"{n}.{kind}.bin").is_file()
            and (maps / "normal_maps" / f"{n}.{kind}.bin").is_file()]
    (maps / "depth_maps").mkdir(parents=True, exist_ok=True)
    with atomic_path(maps / "fusion.cfg", suffix=".cfg") as tmp:  # fusion reads every listed map
        tmp.write_text("".join(f"{n}\n" for n in done))
    t0 = time.perf_counter()
    if not done:
        return {"fused points": 0, "fused images": 0, "seconds": 0.0}
    fopts = pycolmap.StereoFusionOptions()
    fopts.max_image_size = int(max_image_size)
    fopts.min_num_pixels = int(min(cfg.fusion_min_num_pixels, len(done)))
    # one thread: COLMAP's threads race for the same pixels, so more threads give a different
    # cloud (even a different number of points) on every run; one thread gives the same bytes
    fopts.num_threads = 1
    vis_path = Path(str(output) + ".vis")
    record_path = Path(str(output) + ".json")
    key = fingerprint({"kind": kind, "options": fopts.todict(), "maps": done, "version": 1}, ws.path / "sparse",
                      *[maps / sub / f"{n}.{kind}.bin" for n in done for sub in ("depth_maps", "normal_maps")],
                      *[ws.path / "images" / n for n in done])
    old = _read_record(record_path)
    if old.get("inputs") == key and trusted.matches(output.parent, old.get("files")):
        return {"fused points": old["fused points"], "fused images": len(done), "seconds": 0.0, "skipped": True}
    record_path.unlink(missing_ok=True)  # the record goes first, the files follow
    with atomic_path(output, suffix=".ply") as tmp:
        fused = pycolmap.stereo_fusion(str(tmp), str(ws.path), input_type=kind, options=fopts, output_type="ply")
        vis = Path(str(tmp) + ".vis")
        if vis.is_file():
            vis.replace(vis_path)
    n = int(fused.num_points3D()) if fused is not None else 0
    files = [output] + ([vis_path] if vis_path.is_file() else [])
    write_json_atomic(record_path, {"inputs": key, "fused points": n, "files": trusted.record(output.parent, files)})
    return {"fused points": n, "fused images": len(done), "seconds": time.perf_counter() - t0}


def _read_record(path: Path) -> dict:
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return rec if isinstance(rec, dict) else {}


def fuse_and_export(workspace: Path | Workspace, depth_dir: Path, kind: str, max_image_size: int,
                    config: DenseConfig | None = None, image_names: list[str] | None = None) -> dict:
    """:func:`fuse`, then :func:`export_colmap_depths`: the common end of both backends."""
    ws = open_workspace(workspace)
    fused = fuse(ws, kind, max_image_size, config, image_names)
    out = export_colmap_depths(ws, depth_dir, image_names, kind=kind)
    out["fusion"] = fused
    return out


__all__ = ["export_colmap_depths", "fuse", "fuse_and_export"]
