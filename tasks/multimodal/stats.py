"""Exact, numerically stable, mergeable per-channel statistics.

Each partition of tiles keeps, per statistics key and channel, the count of
valid values, their mean, the sum of squared deviations from the mean (M2),
min and max. Partitions merge with Chan et al.'s pairwise update, so the
result does not depend on how tiles were split over Dask workers (up to
floating-point rounding) and never suffers from E[x^2]-E[x]^2 cancellation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tasks.multimodal.schema import H5_BY_NAME, STATS_KEYS

#: mean, std, min and max of a channel without a single valid value (see ChannelStats.to_json)
EMPTY_CHANNEL = 0.0


@dataclass
class ChannelStats:
    count: np.ndarray  # float64 (C,)
    mean: np.ndarray
    m2: np.ndarray
    min: np.ndarray
    max: np.ndarray

    @classmethod
    def empty(cls, channels: int) -> "ChannelStats":
        return cls(
            count=np.zeros(channels), mean=np.zeros(channels), m2=np.zeros(channels),
            min=np.full(channels, np.inf), max=np.full(channels, -np.inf),
        )

    @classmethod
    def of(cls, x: np.ndarray, valid: np.ndarray) -> "ChannelStats":
        """Statistics of ``x`` (C, P) over the entries where ``valid`` (C, P) is True.

        Integer data: exact sums in int64 and M2 = (n*S2 - S1^2)/n in Python
        integers, so there is no rounding at all before the final division.
        Float data: two passes (mean, then squared deviations) in float64.
        A channel whose every entry is valid skips the masking (plain casts and
        reductions: the same values, bit for bit, at a fraction of the cost).
        """
        n_int = valid.sum(axis=1)
        n = n_int.astype(np.float64)
        full = n_int == x.shape[1]
        every = bool(full.all())
        if x.dtype.kind in "ui" and x.dtype.itemsize <= 4:
            info = np.iinfo(x.dtype)
            xi = x.astype(np.int64)
            if not every:
                part = ~full
                xi[part] = np.where(valid[part], x[part], 0)
            s1 = xi.sum(axis=1)
            s2 = np.einsum("ij,ij->i", xi, xi)
            mean = np.zeros(len(n))
            m2 = np.zeros(len(n))
            for c in range(len(n)):
                k = int(n_int[c])
                if k:
                    a, b = int(s1[c]), int(s2[c])
                    mean[c] = a / k
                    m2[c] = (k * b - a * a) / k
            mn, mx = _min_max(x, valid, full, every, info.max, info.min)
            mn[n_int == 0], mx[n_int == 0] = np.inf, -np.inf
            return cls(count=n, mean=mean, m2=m2, min=mn, max=mx)
        xs = np.sum(x, axis=1, where=valid, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(n > 0, xs / np.maximum(n, 1), 0.0)
        d = x - mean[:, None]
        if not every:  # only the channels with invalid entries need the mask
            part = ~full
            d[part] = np.where(valid[part], d[part], 0.0)
        m2 = np.einsum("ij,ij->i", d, d)
        mn, mx = _min_max(x, valid, full, every, np.inf, -np.inf)
        return cls(count=n, mean=mean, m2=m2, min=mn, max=mx)

    def merge(self, other: "ChannelStats") -> "ChannelStats":
        n = self.count + other.count
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = other.mean - self.mean
            frac = np.where(n > 0, other.count / np.maximum(n, 1), 0.0)
            mean = self.mean + delta * frac
            m2 = self.m2 + other.m2 + delta * delta * self.count * frac
        return ChannelStats(
            count=n, mean=mean, m2=m2,
            min=np.minimum(self.min, other.min), max=np.maximum(self.max, other.max),
        )

    def to_json(self) -> dict[str, list[float]]:
        """The band_stats entry: population std; a channel where no valid value was seen
        gets :data:`EMPTY_CHANNEL` (0 for mean, std, min and max), never NaN: strict JSON
        parsers reject a bare ``NaN`` token, and a JSON ``null`` makes the readers' numpy
        normalisation fail (an object array), while with 0 their ``(x - mean) / std``
        and ``(x - min) / (max - min)`` give NaN or -inf on such a channel's no-data values,
        which they then treat as missing, as with the NaN of the original's release."""
        seen = self.count > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            std = np.sqrt(np.maximum(self.m2, 0.0) / self.count)

        def fl(a: np.ndarray) -> list[float]:
            return [float(v) if s else EMPTY_CHANNEL for v, s in zip(a, seen)]

        return {"mean": fl(self.mean), "std": fl(std), "min": fl(self.min), "max": fl(self.max)}

    def to_arrays(self) -> np.ndarray:
        return np.stack([self.count, self.mean, self.m2, self.min, self.max])

    @classmethod
    def from_arrays(cls, a: np.ndarray) -> "ChannelStats":
        return cls(*[np.asarray(r, dtype=np.float64) for r in a])


def _min_max(x: np.ndarray, valid: np.ndarray, full: np.ndarray, every: bool, hi, lo) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel min and max (float64) of ``x`` (C, P) over ``valid``, ``hi``/``lo`` where a
    channel has none; the channels in ``full`` (all valid; ``every``: all of them) reduce
    without the mask (the same values, several times faster)."""
    if every:
        return x.min(axis=1).astype(np.float64), x.max(axis=1).astype(np.float64)
    mn, mx = np.empty(len(x)), np.empty(len(x))
    part = ~full
    mn[part] = np.min(x[part], axis=1, where=valid[part], initial=hi)
    mx[part] = np.max(x[part], axis=1, where=valid[part], initial=lo)
    if full.any():
        mn[full], mx[full] = x[full].min(axis=1), x[full].max(axis=1)
    return mn, mx


def valid_mask(key: str, x: np.ndarray) -> np.ndarray:
    """Where ``x`` (values of the dataset behind ``key``) is not no-data."""
    _, nodata = STATS_KEYS[key]
    if isinstance(nodata, float) and math.isnan(nodata):
        return ~np.isnan(x)
    valid = x != nodata
    if x.dtype.kind == "f":
        valid &= np.isfinite(x)
    return valid


class StatsAccumulator:
    """Per-key :class:`ChannelStats` for a stream of converted rows."""

    def __init__(self) -> None:
        self.stats: dict[str, ChannelStats] = {
            key: ChannelStats.empty(H5_BY_NAME[ds].channels) for key, (ds, _) in STATS_KEYS.items()
        }

    def add_row(self, rows: dict[str, np.ndarray], s2_type: str) -> None:
        """Add one tile's converted rows (dataset name -> array (C, ...))."""
        for key, (ds, _) in STATS_KEYS.items():
            if ds == "sentinel2" and key != f"sentinel2_{s2_type}":
                continue
            arr = rows[ds]
            x = arr.reshape(arr.shape[0], -1)
            self.stats[key] = self.stats[key].merge(ChannelStats.of(x, valid_mask(key, x)))

    def merge(self, other: "StatsAccumulator") -> "StatsAccumulator":
        out = StatsAccumulator()
        out.stats = {k: self.stats[k].merge(other.stats[k]) for k in self.stats}
        return out

    def to_npz_dict(self, prefix: str = "stats_") -> dict[str, np.ndarray]:
        return {prefix + k: v.to_arrays() for k, v in self.stats.items()}

    @classmethod
    def from_npz(cls, npz, prefix: str = "stats_") -> "StatsAccumulator":
        out = cls()
        out.stats = {k: ChannelStats.from_arrays(npz[prefix + k]) for k in STATS_KEYS}
        return out

    def band_stats(self) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[int]]]:
        """The NAME_band_stats.json content, and per key the channels with no valid value
        (their statistics are :data:`EMPTY_CHANNEL`)."""
        empty = {k: [int(c) for c in np.flatnonzero(s.count == 0)] for k, s in self.stats.items()}
        return {k: s.to_json() for k, s in self.stats.items()}, {k: v for k, v in empty.items() if v}
