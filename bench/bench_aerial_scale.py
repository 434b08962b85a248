"""Benchmark: how each stage of the aerial flow grows with the number of images.

Runs ``python -m flows.aerial`` on the embedded synthetic world at several sizes
(``n_aerial`` Earth Studio frames + ``n_ground`` photos, passed as
``--set world_options=...``), each size in a fresh process and a fresh root, and
reports per stage (the stage names and wall times are the pipeline's own, from the
scene's ``report.json`` ``timings``):

* wall time (``report.json``),
* CPU time of the pipeline's processes (the flow process and its Dask workers; the
  local Prefect server is counted apart), user + system,
* peak memory: the highest sum of RSS over those processes while the stage ran, and
  the largest single process,
* output size: what the run's root grew by on disk during the stage (hard links
  counted once),

plus the pair counts of the run (reference, retrieval and photo pairs; covisibility
candidate pairs). Stage boundaries come from the pipeline's own
``RunReport.stage`` blocks (and the synthetic world's task), which this benchmark
wraps to take a CPU / disk snapshot at entry and exit; a sampler thread reads the
process tree's CPU and RSS every ``--period`` seconds. Then it fits, per stage, the
log-log slope between consecutive sizes (``t ~ N^slope``), compares it with the slope
of the pairs, and writes ``scale.json`` and ``scale.md`` into ``--out``.

Note: the MegaDepth preprocessing tasks are submitted before the ingest and run
beside it, so their CPU falls mostly in ``ingest``; ``megadepth`` is the wait after it.

    nice -n 15 python bench/bench_aerial_scale.py --out /tmp/scale --points 48x16 188x62 --size 480 360
    nice -n 15 python bench/bench_aerial_scale.py --out /tmp/scale --points 750x250 --size 480 360   # adds to scale.json
    python bench/bench_aerial_scale.py --out /tmp/scale --analyze       # refit and rewrite the tables only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil  # noqa: E402
from benchlib import BackgroundSampler  # noqa: E402

#: The pair counts of ``report.json`` (``counts``) whose sum is the pairs matched.
MATCH_PAIRS = ("reference pairs", "retrieval pairs", "photo pairs")
#: The pairs files of a scene (``tasks/aerial/layout.py``) and the ``report.json`` count each one is.
PAIRS_FILES = {"pairs-reference-poses.txt": "reference pairs", "pairs-query-retrieval.txt": "retrieval pairs",
               "pairs-query-poses.txt": "photo pairs"}
#: A stage whose CPU grows faster than this power of N over the pairs' own power is flagged.
SLOPE_MARGIN = 0.3


# --------------------------------------------------------------------------
# measuring one run (in the process that runs the flow)
# --------------------------------------------------------------------------
def tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root`` (each inode once: hard links are not counted twice)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    stack = [str(root)]
    while stack:
        try:
            it = os.scandir(stack.pop())
        except OSError:
            continue
        with it:
            for e in it:
                try:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        key = (st.st_dev, st.st_ino)
                        if key not in seen:
                            seen.add(key)
                            total += st.st_size
                except OSError:
                    continue
    return total


def pairs_in_files(root: Path) -> dict[str, int]:
    """The pair counts of :data:`PAIRS_FILES` read from the pairs files under ``root`` (one pair a line):
    the counts of a run stopped before its report was written."""
    out: dict[str, int] = {}
    for name, key in PAIRS_FILES.items():
        for f in Path(root).glob(f"data/*/**/{name}"):
            out[key] = out.get(key, 0) + sum(1 for line in f.read_text().splitlines() if line.strip()
                                              and not line.startswith("#"))
    return out


def process_kind(p: psutil.Process, me: int) -> str:
    """``main`` (the flow's process), ``prefect server``, or ``worker`` (Dask and anything else it started)."""
    if p.pid == me:
        return "main"
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "worker"
    return "prefect server" if "prefect" in cmd and "server" in cmd else "worker"


class Probe(BackgroundSampler):
    """CPU seconds and RSS of this process tree, sampled every ``period`` s, and per-stage
    snapshots (:meth:`segment`): CPU (pipeline = everything but the Prefect server), wall,
    peak RSS sum and largest process, and the bytes ``root`` grew by."""

    def __init__(self, root: Path, period: float = 0.25, on_stage=None) -> None:
        super().__init__(period)
        self.on_stage = on_stage  # called after each stage (a run stopped midway keeps its finished stages)
        self.root = Path(root)
        self.me = os.getpid()
        self._proc = psutil.Process(self.me)
        self._procs: dict[int, psutil.Process] = {}
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, CPU seconds last seen); dead ones stay
        self.peak_sum = self.peak_one = 0  # since the last reset (the current stage)
        self.run_peak_sum = self.run_peak_one = 0
        self.lock = threading.RLock()
        self.stages: list[dict[str, Any]] = []
        self.loads: list[float] = []  # the machine's 1-minute load average at each sample


    def sample(self) -> None:
        with self.lock:
            procs = [self._proc]
            with contextlib.suppress(psutil.Error):
                procs += self._proc.children(recursive=True)
            rss_sum = 0
            for p in procs:
                p = self._procs.setdefault(p.pid, p)  # the same object: psutil caches the cmdline
                try:
                    if p.pid == self.me:
                        r = resource.getrusage(resource.RUSAGE_SELF)
                        cpu = r.ru_utime + r.ru_stime
                    else:
                        t = p.cpu_times()
                        cpu = t.user + t.system
                    kind = self.cpu.get(p.pid, (None,))[0] or process_kind(p, self.me)
                    self.cpu[p.pid] = (kind, cpu)
                    if kind != "prefect server":
                        rss = p.memory_info().rss
                        rss_sum += rss
                        self.peak_one = max(self.peak_one, rss)
                except psutil.Error:
                    continue
            self.peak_sum = max(self.peak_sum, rss_sum)
            self.loads.append(os.getloadavg()[0])
            self.run_peak_sum = max(self.run_peak_sum, self.peak_sum)
            self.run_peak_one = max(self.run_peak_one, self.peak_one)

    def cpu_of(self, pipeline: bool = True) -> float:
        """CPU seconds so far of the pipeline's processes (``pipeline``) or of the Prefect server."""
        with self.lock:
            return sum(c for k, c in self.cpu.values() if (k != "prefect server") == pipeline)

    @contextlib.contextmanager
    def segment(self, name: str) -> Iterator[None]:
        """Record the block as stage ``name`` (a stage entered again adds to its row)."""
        self.sample()
        with self.lock:
            self.peak_sum = self.peak_one = 0
            cpu0, bytes0, t0 = self.cpu_of(), tree_bytes(self.root), time.monotonic()
        self.sample()
        stopped = False
        try:
            yield
        except (KeyboardInterrupt, SystemExit):  # the run was stopped: this stage did not finish
            stopped = True
            raise
        finally:
            self.sample()
            with self.lock:
                row = {"stage": name, "wall_s": time.monotonic() - t0, "cpu_s": self.cpu_of() - cpu0,
                       "peak_rss_sum": self.peak_sum, "peak_rss_one": self.peak_one,
                       "bytes": tree_bytes(self.root) - bytes0, **({"stopped": True} if stopped else {})}
                self.stages.append(row)
            if self.on_stage is not None:
                self.on_stage()


def instrument(probe: Probe) -> None:
    """Wrap the pipeline's own stage blocks (``RunReport.stage``) and the synthetic world's
    rendering (``ensure_world``, which the world task imports when it runs) with ``probe.segment``:
    the stage names are the pipeline's. Nothing the flow's globals hold is replaced: Prefect
    pickles the flow for every Dask task, and the probe (a thread, a lock) cannot be pickled."""
    from tasks.aerial import synthetic_world
    from tasks.common.report import RunReport

    original_stage = RunReport.stage

    @contextlib.contextmanager
    def stage(self, name, item, problem_stage=None):
        with probe.segment(name), original_stage(self, name, item, problem_stage):
            yield

    RunReport.stage = stage
    original_world = synthetic_world.ensure_world

    def ensure_world(*args, **kwargs):
        with probe.segment("world"):
            return original_world(*args, **kwargs)

    synthetic_world.ensure_world = ensure_world


#: What a synthetic world root holds before the flow has run (``--reuse-world`` copies these).
WORLD_ITEMS = ("downloaded_data", "megadepth", "ground_truth", "plans", "world_info.json", ".world_complete")


def run_point(n_aerial: int, n_ground: int, size: tuple[int, int], root: Path, record: Path, sets: list[str],
              period: float, world_from: Path | None = None) -> int:
    """One size: the flow on a fresh synthetic world in ``root``; the measures go to ``record`` (JSON).
    ``world_from``: a root holding that world already rendered (its world items are copied; the flow
    then finds the data and renders nothing: no ``world`` stage)."""
    import flows.aerial as flow_module

    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    if world_from is not None:
        for item in WORLD_ITEMS:
            src = Path(world_from) / item
            if src.is_dir():
                shutil.copytree(src, root / item, symlinks=True)
            elif src.exists():
                shutil.copy2(src, root / item)
    world = {"n_aerial": n_aerial, "n_ground": n_ground, "size": list(size)}
    argv = ["--root", str(root), "--synthetic", "--set", "world_options=" + json.dumps(world), *sum(
        (["--set", s] for s in sets), [])]
    t0 = time.monotonic()

    def write(code: int | None) -> None:
        """The record so far (``partial`` until the flow has returned ``code``)."""
        reports = sorted((root / "data").glob("*/report.json")) if code is not None else []
        report = json.loads(reports[0].read_text()) if reports else {}
        rec = {"n_aerial": n_aerial, "n_ground": n_ground, "n": n_aerial + n_ground, "size": list(size),
               "argv": ["python", "-m", "flows.aerial", *argv], "exit": code, "partial": code is None,
               "world_from": str(world_from) if world_from else None,
               "wall_s": time.monotonic() - t0, "cpu_s": probe.cpu_of(), "prefect_server_cpu_s": probe.cpu_of(False),
               "peak_rss_sum": probe.run_peak_sum, "peak_rss_one": probe.run_peak_one, "bytes": tree_bytes(root),
               "load_before": LOAD_BEFORE, "load_after": list(os.getloadavg()),
               "load_mean": sum(probe.loads) / max(1, len(probe.loads)), "cores": os.cpu_count(),
               "probe": probe.stages, "report": {k: report.get(k) for k in ("timings", "counts", "problems")},
               "pairs_files": pairs_in_files(root)}
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1))
        tmp.replace(record)

    probe = Probe(root, period, on_stage=lambda: write(None))
    instrument(probe)
    with probe:
        code = flow_module.main(argv)
    probe.sample()
    write(code)
    return code


# --------------------------------------------------------------------------
# bookkeeping: per-stage rows, pairs, slopes, tables (no process needed)
# --------------------------------------------------------------------------
def stage_rows(rec: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per stage, in the order run: ``wall_s`` (report.json's timing when it has the stage, else
    the probe's), ``cpu_s``, ``peak_rss_sum``, ``peak_rss_one``, ``bytes`` (a stage run twice adds up)."""
    timings = (rec.get("report") or {}).get("timings") or {}
    rows: dict[str, dict[str, float]] = {}
    for seg in rec.get("probe", []):
        if seg.get("stopped"):  # a stage the stop cut short measures nothing
            continue
        row = rows.setdefault(seg["stage"], {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_sum": 0, "peak_rss_one": 0,
                                             "bytes": 0})
        row["wall_s"] += seg["wall_s"]
        row["cpu_s"] += seg["cpu_s"]
        row["bytes"] += seg["bytes"]
        row["peak_rss_sum"] = max(row["peak_rss_sum"], seg["peak_rss_sum"])
        row["peak_rss_one"] = max(row["peak_rss_one"], seg["peak_rss_one"])
    for name, seconds in timings.items():
        if name in rows:
            rows[name]["wall_s"] = float(seconds)  # the pipeline's own figure
        else:  # timed by the pipeline, missed by the probe (should not happen): wall only
            rows[name] = {"wall_s": float(seconds), "cpu_s": math.nan, "peak_rss_sum": math.nan,
                          "peak_rss_one": math.nan, "bytes": math.nan}
    return rows


def pair_counts(rec: dict[str, Any]) -> dict[str, int]:
    """The run's pair counts: each of :data:`MATCH_PAIRS`, their sum ``matched pairs``, and the
    covisibility counts ``report.json`` has (``covisibility ...``)."""
    counts = (rec.get("report") or {}).get("counts") or {}
    if not any(k in counts for k in MATCH_PAIRS):  # a stopped run: its pairs files
        counts = {**counts, **(rec.get("pairs_files") or {})}
    out = {k: int(counts[k]) for k in MATCH_PAIRS if k in counts}
    out["matched pairs"] = sum(out.values())
    out.update({k: v for k, v in counts.items() if k.startswith("covisibility") and isinstance(v, (int, float))})
    return out


def slope(n1: float, y1: float, n2: float, y2: float) -> float:
    """The exponent ``k`` of ``y ~ N^k`` through two points; NaN when a value is not positive."""
    if not (n1 > 0 and n2 > 0 and n1 != n2 and y1 > 0 and y2 > 0):
        return math.nan
    return math.log(y2 / y1) / math.log(n2 / n1)


def stage_pairs(stage: str) -> str:
    """The pair count a stage's work should follow."""
    if stage in ("covisibility", "training export"):
        return "covisibility candidate pairs"
    return "matched pairs"


def analyze(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Per stage and metric, the values at each N and the slopes between consecutive N; the
    pairs' slopes; stages whose CPU grows faster than their pairs (by :data:`SLOPE_MARGIN`)."""
    records = sorted(records, key=lambda r: r["n"])
    ns = [r["n"] for r in records]
    rows = [stage_rows(r) for r in records]
    pairs = [pair_counts(r) for r in records]
    stages: list[str] = []
    for r in rows:
        stages += [s for s in r if s not in stages]
    out: dict[str, Any] = {"n": ns, "stages": {}, "pairs": {}, "flagged": []}
    for name in sorted({k for p in pairs for k in p}):
        vals = [p.get(name, math.nan) for p in pairs]
        out["pairs"][name] = {"values": vals, "slopes": [slope(ns[i], vals[i], ns[i + 1], vals[i + 1])
                                                         for i in range(len(ns) - 1)]}
    for s in stages:
        st: dict[str, Any] = {}
        for metric in ("wall_s", "cpu_s", "peak_rss_sum", "bytes"):
            vals = [r.get(s, {}).get(metric, math.nan) for r in rows]
            st[metric] = {"values": vals, "slopes": [slope(ns[i], vals[i], ns[i + 1], vals[i + 1])
                                                     for i in range(len(ns) - 1)]}
        ref = out["pairs"].get(stage_pairs(s)) or out["pairs"].get("matched pairs")
        st["pairs"] = stage_pairs(s)
        for i, k in enumerate(st["cpu_s"]["slopes"]):
            kp = ref["slopes"][i] if ref else math.nan
            big = st["cpu_s"]["values"][i + 1] > 0.02 * records[i + 1]["cpu_s"]  # only stages worth 2 % of a run
            if k == k and kp == kp and k > max(1.0, kp) + SLOPE_MARGIN and big:
                out["flagged"].append({"stage": s, "between": [ns[i], ns[i + 1]], "cpu_slope": k, "pairs_slope": kp})
        out["stages"][s] = st
    out["partial"] = any(r.get("partial") for r in records)
    out["totals"] = {m: [r.get(m) for r in records] for m in ("wall_s", "cpu_s", "peak_rss_sum", "bytes",
                                                              "prefect_server_cpu_s")}
    return out


def extrapolate(fit: dict[str, Any], n_target: float) -> dict[str, float]:
    """CPU seconds per stage at ``n_target`` images from the last two points' slope (an extrapolation)."""
    n = fit["n"]
    out = {}
    for s, st in fit["stages"].items():
        vals = st["cpu_s"]["values"]
        k = st["cpu_s"]["slopes"][-1] if st["cpu_s"]["slopes"] else math.nan
        y = vals[-1]
        if not (y == y):
            continue
        out[s] = y * (n_target / n[-1]) ** (k if k == k else 1.0)
    return out


def _fmt(v: float, unit: str = "") -> str:
    if v is None or v != v:
        return "-"
    if unit == "MB":
        return f"{v / 1e6:.1f}"
    return f"{v:.1f}" if abs(v) >= 1 or v == 0 else f"{v:.2f}"


def markdown(records: list[dict[str, Any]], fit: dict[str, Any], extra: list[str] | None = None) -> str:
    """The per-stage table at each N, the slopes, the pairs and the flagged stages."""
    records = sorted(records, key=lambda r: r["n"])
    ns = fit["n"]
    lines = ["# Aerial flow: per-stage cost against the number of images", ""]
    for r in records:
        lines.append(f"- N = {r['n']} ({r['n_aerial']} frames + {r['n_ground']} photos, {r['size'][0]}x{r['size'][1]}):"
                     f" {'STOPPED MIDWAY (partial: the stages it finished)' if r.get('partial') else 'exit %s' % r['exit']}, wall {r['wall_s']:.0f} s, CPU {r['cpu_s']:.0f} s (Prefect server "
                     f"{r.get('prefect_server_cpu_s', 0):.0f} s more), peak RSS {r['peak_rss_sum'] / 1e9:.2f} GB, "
                     f"{r['bytes'] / 1e6:.0f} MB on disk, load (1 min) {_fmt((r.get('load_before') or [math.nan])[0])} -> "
                     f"{_fmt((r.get('load_after') or [math.nan])[0])}, mean {_fmt(r.get('load_mean', math.nan))} "
                     f"on {r.get('cores', '?')} cores")
    head = "| stage | " + " | ".join(f"wall s N={n} | CPU s N={n} | peak RSS GB N={n} | MB N={n}" for n in ns)
    head += " | " + " | ".join(f"CPU slope {a}->{b}" for a, b in zip(ns, ns[1:])) + " | pairs slope |"
    lines += ["", head, "|" + "---|" * (1 + 4 * len(ns) + len(ns) - 1 + 1)]
    for s, st in fit["stages"].items():
        cells = []
        for i in range(len(ns)):
            cells += [_fmt(st["wall_s"]["values"][i]), _fmt(st["cpu_s"]["values"][i]),
                      _fmt(st["peak_rss_sum"]["values"][i] / 1e9 if st["peak_rss_sum"]["values"][i] == st[
                          "peak_rss_sum"]["values"][i] else math.nan), _fmt(st["bytes"]["values"][i], "MB")]
        cells += [f"{k:.2f}" if k == k else "-" for k in st["cpu_s"]["slopes"]]
        ps = fit["pairs"].get(st["pairs"], {}).get("slopes", [])
        cells.append(", ".join(f"{k:.2f}" if k == k else "-" for k in ps) + f" ({st['pairs']})")
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    lines += ["", "| pairs | " + " | ".join(f"N={n}" for n in ns) + " | slopes |", "|---|" + "---|" * (len(ns) + 1)]
    for name, p in fit["pairs"].items():
        lines.append(f"| {name} | " + " | ".join(str(v) for v in p["values"]) + " | "
                     + ", ".join(f"{k:.2f}" if k == k else "-" for k in p["slopes"]) + " |")
    lines.append("")
    if fit["flagged"]:
        lines.append("Stages whose CPU grows faster than their pairs:")
        lines += [f"- {f['stage']}: N {f['between'][0]} -> {f['between'][1]}: CPU slope {f['cpu_slope']:.2f}, pairs "
                  f"{f['pairs_slope']:.2f}" for f in fit["flagged"]]
    else:
        lines.append("No stage's CPU grows faster than its pairs (margin %.1f in the exponent)." % SLOPE_MARGIN)
    lines += extra or []
    return "\n".join(lines) + "\n"


def paper_projection(fit: dict[str, Any], n_paper: int = 900, cores: int = 2) -> list[str]:
    """EXTRAPOLATED CPU per stage at 1000 images and at a paper-sized scene, and its wall time on ``cores``."""
    if len(fit["n"]) < 2:
        return []
    e1000 = extrapolate(fit, 1000)
    ep = extrapolate(fit, n_paper)
    tot1000, totp = sum(e1000.values()), sum(ep.values())
    top = max(ep, key=ep.get)
    lines = ["", f"EXTRAPOLATION (from the slopes between N={fit['n'][-2]} and N={fit['n'][-1]}, not measured):",
             f"- 1000 images: {tot1000:.0f} CPU s = {tot1000 / 3600:.2f} CPU hours per 1000 images",
             f"- paper-sized scene, {n_paper} images: {totp / 3600:.2f} CPU hours, at best {totp / 3600 / cores:.2f} h "
             f"wall on {cores} cores; dominant stage {top} ({ep[top] / totp:.0%})",
             *(["- ONLY the stages listed below: a run was stopped midway, the later stages are not in this sum"]
               if fit.get("partial") else []),
             "", "| stage | CPU s at 1000 (extrapolated) |", "|---|---|"]
    lines += [f"| {s} | {v:.0f} |" for s, v in sorted(e1000.items(), key=lambda kv: -kv[1])]
    return lines


def write_outputs(out: Path, records: list[dict[str, Any]]) -> dict[str, Any]:
    fit = analyze(records)
    (out / "scale.json").write_text(json.dumps({"records": records, "fit": fit}, indent=1, default=str))
    (out / "scale.md").write_text(markdown(records, fit, paper_projection(fit)))
    return fit


def load_records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("point-*.json"))]


LOAD_BEFORE = list(os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for point-<N>.json, scale.json, scale.md")
    ap.add_argument("--points", nargs="*", default=["48x16", "188x62"],
                    help="sizes as AERIALxPHOTOS (default 48x16 188x62; the paper-sized point is 750x250)")
    ap.add_argument("--size", type=int, nargs=2, default=[640, 480], help="image width height of every view")
    ap.add_argument("--set", action="append", default=[], dest="sets", help="more --set KEY=VALUE for the flow")
    ap.add_argument("--work", type=Path, default=None, help="where the roots go (default OUT/roots)")
    ap.add_argument("--keep", action="store_true", help="keep each run's root")
    ap.add_argument("--period", type=float, default=0.25, help="sampling period in seconds")
    ap.add_argument("--analyze", action="store_true", help="only refit the point-*.json in OUT")
    ap.add_argument("--reuse-world", type=Path, default=None,
                    help="folder holding n<N>/ roots of an earlier run with the same sizes: copy their rendered "
                         "world instead of rendering it again (no world stage then)")
    ap.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)  # internal: run one point here
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or args.out / "roots"
    if args.one:
        a, g = args.one
        root = work / f"n{a + g}"
        code = run_point(a, g, tuple(args.size), root, args.out / f"point-{a + g:05d}.json", args.sets, args.period,
                         args.reuse_world / f"n{a + g}" if args.reuse_world else None)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        return code
    if not args.analyze:
        for p in args.points:
            a, g = (int(x) for x in p.lower().split("x"))
            cmd = [sys.executable, str(Path(__file__).resolve()), "--out", str(args.out), "--one", str(a), str(g),
                   "--size", *map(str, args.size), "--work", str(work), "--period", str(args.period),
                   *sum((["--set", s] for s in args.sets), []), *(["--keep"] if args.keep else []),
                   *(["--reuse-world", str(args.reuse_world)] if args.reuse_world else [])]
            print(f"[{time.strftime('%H:%M:%S')}] N={a + g}: {' '.join(cmd)}", flush=True)
            with open(args.out / f"point-{a + g:05d}.log", "w") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1]
                                    ).returncode
            print(f"[{time.strftime('%H:%M:%S')}] N={a + g}: exit {rc}", flush=True)
    records = load_records(args.out)
    if not records:
        print(f"no point-*.json in {args.out}", file=sys.stderr)
        return 1
    fit = write_outputs(args.out, records)
    print((args.out / "scale.md").read_text())
    return 1 if fit["flagged"] else 0


if __name__ == "__main__":
    sys.exit(main())
