"""A contact sheet of the multimodal h5: what is inside a tile, for a sample of tiles.

One row per sampled tile, four pictures each: Sentinel-2 true colour (B4, B3, B2),
Sentinel-1 backscatter (the first orbit/polarisation present), ASTER elevation and
ESA WorldCover land cover. Every no-data pixel (the value of ``schema.H5_BY_NAME[...].fill``)
is painted :data:`NO_DATA_RGB` (magenta), so a tile's gaps are seen, not guessed.
The report stage writes it as ``tiles_contact_sheet.png`` beside ``tiles_map.png``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from tasks.multimodal import schema

#: colour of no-data pixels on every panel
NO_DATA_RGB = (1.0, 0.0, 1.0)
#: ESA WorldCover v100 class colours (from its product user manual)
WORLDCOVER_COLOURS: dict[int, tuple[str, str]] = {
    10: ("#006400", "tree cover"), 20: ("#ffbb22", "shrubland"), 30: ("#ffff4c", "grassland"),
    40: ("#f096ff", "cropland"), 50: ("#fa0000", "built-up"), 60: ("#b4b4b4", "bare / sparse"),
    70: ("#f0f0f0", "snow and ice"), 80: ("#0064c8", "water"), 90: ("#0096a0", "herbaceous wetland"),
    95: ("#00cf75", "mangroves"), 100: ("#fae6a0", "moss and lichen"),
}
S1_CHANNELS = ("asc VV", "asc VH", "asc HH", "asc HV", "desc VV", "desc VH", "desc HH", "desc HV")
#: channel order tried for the S1 panel: co-polarised first, ascending first
S1_ORDER = (0, 4, 2, 6, 1, 5, 3, 7)
#: how many tiles are looked at to choose the sample (evenly spread over the rows)
CANDIDATES = 64


def _hex(c: str) -> tuple[float, float, float]:
    return tuple(int(c[i:i + 2], 16) / 255.0 for i in (1, 3, 5))  # type: ignore[return-value]


def _paint(rgb: np.ndarray, missing: np.ndarray) -> np.ndarray:
    rgb = rgb.copy()
    rgb[missing] = NO_DATA_RGB
    return rgb


def s2_rgb(s2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(13, S, S) uint16 -> (S, S, 3) true colour and the no-data mask (all of B2, B3, B4 are 0)."""
    fill = schema.H5_BY_NAME["sentinel2"].fill
    bands = s2[[3, 2, 1]].astype(np.float64)  # B4 B3 B2
    missing = (s2[[3, 2, 1]] == fill).all(axis=0)
    valid = ~missing
    rgb = np.zeros(bands.shape[1:] + (3,))
    if valid.any():  # one stretch for the three bands (true colour): their joint 1st-99th percentile
        lo, hi = np.percentile(bands[:, valid], [1, 99])
        # (a range of at least half the top, so a bright flat cloud stays white, not noise)
        span = max(hi - lo, 0.5 * hi, 1.0)
        rgb = np.clip((np.moveaxis(bands, 0, -1) - (hi - span)) / span, 0.0, 1.0)
    return _paint(rgb, missing), missing


def s1_gray(s1: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """(8, S, S) float32 dB -> grey picture of the first channel with data, its no-data mask, its name."""
    for c in S1_ORDER:
        if np.isfinite(s1[c]).any():
            missing = ~np.isfinite(s1[c])
            g = np.clip((np.where(missing, -25.0, s1[c]) + 25.0) / 25.0, 0.0, 1.0)  # -25..0 dB
            return _paint(np.repeat(g[..., None], 3, axis=-1), missing), missing, S1_CHANNELS[c]
    missing = np.ones(s1.shape[1:], dtype=bool)
    return _paint(np.zeros(s1.shape[1:] + (3,)), missing), missing, "no orbit"


def elevation_rgb(aster: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    """(2, S, S) int16 -> terrain-coloured elevation, its no-data mask and its range in metres."""
    import matplotlib

    fill = schema.H5_BY_NAME["aster"].fill
    z = aster[0].astype(np.float64)
    missing = aster[0] == fill
    if missing.all():
        return _paint(np.zeros(z.shape + (3,)), missing), missing, "no data"
    lo, hi = z[~missing].min(), z[~missing].max()
    rgb = matplotlib.colormaps["terrain"](np.clip((z - lo) / max(hi - lo, 1.0), 0, 1) * 0.8 + 0.2)[..., :3]
    return _paint(rgb, missing), missing, f"{lo:.0f}-{hi:.0f} m"


def landcover_rgb(wc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(1, S, S) uint8 WorldCover codes -> class colours and the no-data mask (code 0 / unknown)."""
    codes = wc[0]
    rgb = np.zeros(codes.shape + (3,))
    known = np.zeros(codes.shape, dtype=bool)
    for code, (colour, _) in WORLDCOVER_COLOURS.items():
        m = codes == code
        rgb[m] = _hex(colour)
        known |= m
    return _paint(rgb, ~known), ~known


def missing_pixels(f, i: int) -> int:
    """How many no-data pixels row ``i`` shows on the sheet (the four panels together)."""
    return int(s2_rgb(f["sentinel2"][i])[1].sum() + s1_gray(f["sentinel1"][i])[1].sum()
               + (f["aster"][i, 0] == schema.H5_BY_NAME["aster"].fill).sum()
               + landcover_rgb(f["esa_worldcover"][i])[1].sum())


def choose_rows(f, n_rows: int) -> list[int]:
    """Up to ``n_rows`` rows: the two with the most no-data among :data:`CANDIDATES` evenly
    spread rows (so gaps show when there are any), the rest evenly spread."""
    n = f["sentinel2"].shape[0]
    if n <= n_rows:
        return list(range(n))
    cand = sorted({int(i) for i in np.linspace(0, n - 1, min(n, CANDIDATES))})
    gaps = {i: missing_pixels(f, i) for i in cand}
    worst = [i for i in sorted(cand, key=lambda i: -gaps[i]) if gaps[i] > 0][:2]
    rest = [i for i in (int(j) for j in np.linspace(0, n - 1, n_rows)) if i not in worst]
    return sorted(set(worst) | set(rest[: n_rows - len(worst)]))


def contact_sheet_png(h5_path: str | Path, n_rows: int = 8, title: str = "") -> bytes:
    """PNG of ``n_rows`` tiles of the h5 (see the module doc); an empty h5 gives a one-line picture."""
    import h5py
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    with h5py.File(h5_path, "r") as f:
        rows = choose_rows(f, n_rows) if f["sentinel2"].shape[0] else []
        tiles = [
            {"id": f["metadata"][i]["tile_id"].decode(), "s2_type": f["metadata"][i]["S2_type"].decode(),
             "s2": f["sentinel2"][i], "s1": f["sentinel1"][i], "aster": f["aster"][i],
             "wc": f["esa_worldcover"][i]}
            for i in rows
        ]
        n_total = f["sentinel2"].shape[0]
    cols = ("Sentinel-2 RGB", "Sentinel-1 (dB, -25..0)", "elevation (ASTER)", "land cover (WorldCover)")
    nr = max(len(tiles), 1)
    # panels of 1.6 in at 80 dpi: a 128-pixel tile is drawn one pixel for one
    top, bottom, row = 0.55, 0.65, 2.0
    height = top + bottom + row * nr
    fig, axes = plt.subplots(nr, 4, figsize=(8.2, height), dpi=80, squeeze=False)
    fig.subplots_adjust(left=0.05, right=0.99, top=1 - top / height, bottom=bottom / height,
                        wspace=0.08, hspace=0.25 * 1.6 / row + 0.1)
    try:
        for ax in axes.ravel():
            ax.set_xticks([])
            ax.set_yticks([])
        if not tiles:
            axes[0, 0].set_title("the h5 has no rows")
        for r, t in enumerate(tiles):
            rgb, m_s2 = s2_rgb(t["s2"])
            s1, m_s1, s1_name = s1_gray(t["s1"])
            el, m_el, el_range = elevation_rgb(t["aster"])
            lc, m_lc = landcover_rgb(t["wc"])
            panels = ((rgb, m_s2, t["s2_type"].upper()), (s1, m_s1, s1_name), (el, m_el, el_range), (lc, m_lc, ""))
            for c, (img, miss, what) in enumerate(panels):
                ax = axes[r, c]
                ax.imshow(img, interpolation="nearest")
                gap = f"no data {100.0 * miss.mean():.0f} %" if miss.any() else ""
                ax.set_xlabel(", ".join(s for s in (what, gap) if s), fontsize=7)
                if r == 0:
                    ax.set_title(cols[c], fontsize=8)
            axes[r, 0].set_ylabel(t["id"][:28], fontsize=7)
        handles = [Patch(color=NO_DATA_RGB, label="no data")] + [
            Patch(color=colour, label=name) for colour, name in WORLDCOVER_COLOURS.values()]
        fig.legend(handles=handles, loc="lower center", ncol=6, fontsize=7, frameon=False)
        fig.suptitle(title or f"{len(tiles)} of {n_total} tiles (no data in magenta)", fontsize=10,
                     y=1 - 0.12 / height)
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)
