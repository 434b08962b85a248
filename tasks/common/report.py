"""Run reports: a counts table, a list of problems, a PNG map, Prefect artifacts.

The report is written to the output folder as JSON (``report.json``), so
it is there for local runs and for users without the UI, and published as
Prefect artifacts (table + markdown with the map) when running in a flow.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tasks.common.atomic import write_bytes_atomic, write_json_atomic

# Prefect is imported inside the functions that talk to it: tasks/aerial/report.py, a library module, builds on RunReport; importing
# prefect takes 5 s, httpx 0.6 s on the shared 2-core machine (python -X importtime), and
# tests/test_import_hygiene.py keeps the library Prefect-free.
# matplotlib likewise, only when a picture is drawn (matplotlib.pyplot: 2.5 s).

log = logging.getLogger(__name__)


class StageFailed(RuntimeError):
    """A stage failed for a whole item (its problem is in the report): skip its later stages."""


class RunFailed(RuntimeError):
    """The run produced nothing it was asked for (every tile failed, no row at all) or hit a
    full disk: raised after the report is written, so the run exits non-zero; the message
    says why and where the report is."""


@dataclass
class RunReport:
    title: str
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[dict[str, str]] = field(default_factory=list)  # {"item", "stage", "reason"}
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    extra: dict[str, Any] = field(default_factory=dict)  # further JSON sections (e.g. accuracy)
    #: streaming mode (large runs): every problem is appended to this JSON-lines file,
    #: only the first ``keep_problems`` stay in memory (and in report.json), and
    #: ``problems_by_reason`` counts all of them
    problems_file: Path | None = None
    keep_problems: int | None = None
    problems_by_reason: dict[str, int] = field(default_factory=dict)
    n_problems: int = 0
    _fh: Any = field(default=None, repr=False)

    def __post_init__(self) -> None:
        # a report's problems file holds this run's problems only: it starts empty (a run
        # without problems leaves an empty file, never the last run's lines)
        if self.problems_file is not None:
            self.problems_file = Path(self.problems_file)
            self.problems_file.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.problems_file, "w", encoding="utf-8")

    def problem(self, item: str, stage: str, reason: str) -> None:
        row = {"item": item, "stage": stage, "reason": reason}
        self.n_problems += 1
        if self.keep_problems is None or len(self.problems) < self.keep_problems:
            self.problems.append(row)
        if self.problems_file is not None:
            kind = f"{stage}: " + re.sub(r"\S*/\S*|\d+", "#", reason)[:100]
            self.problems_by_reason[kind] = self.problems_by_reason.get(kind, 0) + 1
            if self._fh is None:  # closed by write(): later problems are added to this run's file
                self._fh = open(self.problems_file, "a", encoding="utf-8")
            self._fh.write(json.dumps(row) + "\n")

    @contextlib.contextmanager
    def stage(self, name: str, item: str, problem_stage: str | None = None) -> Iterator[None]:
        """Time the block as stage ``name`` (``timings[name]``: this item's own seconds); an
        exception in it becomes the problem ``(item, problem_stage or name, "Type: message")`` and
        :class:`StageFailed`, so the caller stops this item's later stages and nothing else."""
        t0 = time.monotonic()
        try:
            yield
        except StageFailed:
            raise
        except Exception as exc:  # noqa: BLE001 - the item's problem; the run goes on
            self.problem(item, problem_stage or name, f"{type(exc).__name__}: {exc}")
            raise StageFailed(f"{item}: {problem_stage or name}: {type(exc).__name__}: {exc}") from exc
        finally:
            self.timings[name] = time.monotonic() - t0

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def to_dict(self) -> dict[str, Any]:
        d = {"title": self.title, "counts": self.counts, "problems": self.problems,
             "notes": self.notes, "outputs": self.outputs, "timings": self.timings, **self.extra}
        if self.problems_file is not None:
            d.update(problems_total=self.n_problems, problems_by_reason=self.problems_by_reason)
            if self.n_problems:  # named only when written: a run without problems writes none
                d["problems_file"] = str(self.problems_file)
        return d

    def table_rows(self) -> list[dict[str, Any]]:
        return [{"what": k, "count": v} for k, v in self.counts.items()]

    def markdown(self, map_png: bytes | None = None, max_problems: int = 200) -> str:
        lines = [f"# {self.title}", "", "| what | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self.counts.items()]
        if self.timings:
            lines += ["", "| stage | seconds |", "|---|---|"] + [f"| {k} | {v:.1f} |" for k, v in self.timings.items()]
        if self.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in self.notes]
        if self.problems:
            total = max(self.n_problems, len(self.problems))
            if self.problems_by_reason:
                lines += ["", "## Problems by reason", "", "| stage: reason | tiles |", "|---|---|"]
                lines += [f"| {k.replace('|', '/')} | {v} |" for k, v in
                          sorted(self.problems_by_reason.items(), key=lambda kv: -kv[1])[:50]]
            lines += ["", f"## Problems ({total})", "", "| item | stage | reason |", "|---|---|---|"]
            for p in self.problems[:max_problems]:
                reason = p["reason"].replace("|", "\\|").replace("\n", " ")
                lines.append(f"| {p['item']} | {p['stage']} | {reason} |")
            if total > max_problems:
                where = self.problems_file.name if self.problems_file is not None else "report.json"
                lines.append(f"| ... | | {total - max_problems} more in {where} |")
        if self.outputs:
            lines += ["", "## Outputs", ""] + [f"- {k}: `{v}`" for k, v in self.outputs.items()]
        if map_png:
            b64 = base64.b64encode(map_png).decode()
            lines += ["", "## Map", "", f"![map of the tiles](data:image/png;base64,{b64})"]
        return "\n".join(lines)

    def write(self, folder: Path, map_png: bytes | None = None, png_name: str = "tiles_map.png") -> Path:
        self.close()
        folder.mkdir(parents=True, exist_ok=True)
        if self.problems_file is not None and not self.n_problems:
            self.problems_file.unlink(missing_ok=True)  # an earlier run's: not this run's problems
        if map_png:
            write_bytes_atomic(folder / png_name, map_png)
            self.outputs.setdefault("picture", str(folder / png_name))
        self.outputs["report"] = str(folder / "report.json")
        write_json_atomic(folder / "report.json", self.to_dict(), indent=1)
        return folder / "report.json"

    def publish(self, key: str, map_png: bytes | None = None) -> None:
        """Create the Prefect artifacts (no-op outside a flow run)."""
        from prefect.artifacts import create_markdown_artifact, create_table_artifact
        from prefect.context import FlowRunContext

        if FlowRunContext.get() is None:
            return
        create_table_artifact(self.table_rows(), key=f"{key}-counts", description=self.title)
        if self.problems:
            create_table_artifact(self.problems[:1000], key=f"{key}-problems",
                                  description=f"{max(self.n_problems, len(self.problems))} problem(s)")
        create_markdown_artifact(self.markdown(map_png), key=f"{key}-report", description=self.title)


#: Natural Earth 1:110m land (public domain), shipped with the project: see data/README.md
LAND_GEOJSON = Path(__file__).parent / "data" / "ne_110m_land.geojson"


def land_polygons(path: Path = LAND_GEOJSON) -> list[list[list[tuple[float, float]]]]:
    """The basemap's land as polygons, each a list of rings [(lon, lat), ...] (exterior first)."""
    with open(path, encoding="utf-8") as fh:
        doc = json.load(fh)
    polys = []
    for feat in doc["features"]:
        geom = feat["geometry"]
        coords = geom["coordinates"] if geom["type"] == "MultiPolygon" else [geom["coordinates"]]
        polys += [[[(x, y) for x, y in ring] for ring in poly] for poly in coords]
    return polys


def counts_table(counts: dict[str, Any], indent: str = "  ", width: int = 100) -> list[str]:
    """``counts`` as a short aligned table for the terminal: ``name value`` cells, as many to a
    line as fit in ``width`` characters (the whole list stays in report.json)."""
    if not counts:
        return []
    cells = [(str(k), f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in counts.items()]
    kw = min(max(len(k) for k, _ in cells), 34)
    vw = min(max(len(v) for _, v in cells), 14)
    cell_w = kw + 1 + vw
    per_line = max(1, (width - len(indent) + 3) // (cell_w + 3))
    texts = [f"{k[:kw]:<{kw}} {v:>{vw}}" for k, v in cells]
    return [indent + "   ".join(texts[i:i + per_line]).rstrip() for i in range(0, len(texts), per_line)]


def tiles_map_png(
    points: Sequence[tuple[float, float, str]],
    regions: Iterable[Any] = (),
    title: str = "",
) -> bytes:
    """PNG of tile centres (lon, lat, label) over the coastlines (:data:`LAND_GEOJSON`) and
    the region outlines (shapely geometries); the legend sits outside the map."""
    return _savefig(tiles_map_figure(points, regions, title))


def tiles_map_figure(points: Sequence[tuple[float, float, str]], regions: Iterable[Any] = (), title: str = ""):
    """The matplotlib figure behind :func:`tiles_map_png` (the caller closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection

    labels = sorted({p[2] for p in points})
    fig, ax = plt.subplots(figsize=(12 if labels else 10, 5.2), dpi=100)
    ax.set_facecolor("#eef4fa")  # sea
    land = land_polygons()
    # one collection for the land, one for its holes (lakes, seas inside land): cheap to draw
    ax.add_collection(PolyCollection([rings[0] for rings in land], facecolors="#f4f1e8", edgecolors="#5b6b7a",
                                     linewidths=0.5, zorder=1, gid="coastline"))
    ax.add_collection(PolyCollection([h for rings in land for h in rings[1:]], facecolors="#eef4fa",
                                     edgecolors="#5b6b7a", linewidths=0.5, zorder=1, gid="coastline-holes"))
    for geom in regions:
        for p in getattr(geom, "geoms", [geom]):
            x, y = p.exterior.xy
            ax.fill(x, y, facecolor="#c9c9c9", alpha=0.45, edgecolor="#777777", linewidth=0.6, zorder=2)
    cmap = plt.get_cmap("tab20", max(len(labels), 1))
    for i, lab in enumerate(labels):
        xs = [p[0] for p in points if p[2] == lab]
        ys = [p[1] for p in points if p[2] == lab]
        ax.scatter(xs, ys, s=9, color=cmap(i), label=f"{lab} ({len(xs)})", zorder=3)
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.grid(True, linewidth=0.3, zorder=0)
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(title or f"{len(points)} tiles")
    if labels:
        # outside the axes, so no region's dots hide under it
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                  framealpha=0.9, ncol=1 if len(labels) <= 30 else 2, title="region (tiles)", title_fontsize=7)
    fig.text(0.01, 0.005, "coastlines: Natural Earth 1:110m (public domain)", fontsize=6, color="#666666")
    return fig


def _savefig(fig) -> bytes:
    import matplotlib.pyplot as plt

    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()
    finally:
        plt.close(fig)
