"""Exact, numerically stable, mergeable per-channel statistics.

Per tile and channel, :class:`ChannelStats` gives the count of valid values, their mean,
the sum of squared deviations from the mean (M2), min and max (integers: exact sums; floats:
two passes in float64). A dataset's statistics add the tiles' up in :class:`ExactStats`:
exact sums in fixed point (Python integers, every float64 is an integer once scaled by
``2**FIXED_BITS``) of ``n_t * mean_t``, ``n_t * mean_t**2`` and ``M2_t``, from which
``mean = C / N`` and ``M2 = A + B - C**2 / N`` are rounded once, at the end. Addition of
integers is associative, so the statistics are the same bytes however the tiles were split
into partitions, over threads or Dask workers, and in whatever order parts merge; and as
the per-tile M2 is taken about the tile's own mean and the rest is exact, there is no
E[x^2]-E[x]^2 cancellation either.
"""

from __future__ import annotations

import json
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
            s1, s2 = _int_sums(x, valid, full, every)
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


def _int_sums(x: np.ndarray, valid: np.ndarray, full: np.ndarray, every: bool) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel sums of the valid values of integer ``x`` (C, P) and of their squares (int64)."""
    xi = x.astype(np.int64)
    if not every:
        part = ~full
        xi[part] = np.where(valid[part], x[part], 0)
    return xi.sum(axis=1), np.einsum("ij,ij->i", xi, xi)


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


#: fixed point of :class:`ExactStats`: a float64's smallest step is 2**-1074, so every float64
#: and every product of two (2**-2148) is an integer once multiplied by 2**FIXED_BITS
FIXED_BITS = 2200


def _fixed(v: float) -> int:
    """``v * 2**FIXED_BITS``, exactly (``v`` a finite float)."""
    num, den = float(v).as_integer_ratio()
    return num << (FIXED_BITS - den.bit_length() + 1)


def _fixed_square_times(v: float, k: int) -> int:
    """``k * v**2 * 2**FIXED_BITS``, exactly."""
    num, den = float(v).as_integer_ratio()
    return (num * num * k) << (FIXED_BITS - 2 * (den.bit_length() - 1))


def _int_text(v: int) -> str:
    """A fixed-point integer as short text (hexadecimal, trailing zero bits as a count)."""
    if v == 0:
        return "0"
    tz = (v & -v).bit_length() - 1
    return f"{v >> tz:x}.{tz}"


def _text_int(t: str) -> int:
    head, _, tz = t.partition(".")
    return int(head, 16) << int(tz or 0)


class ExactStats:
    """Per-channel statistics of any number of tiles, added up exactly (see the module doc):
    ``count`` (valid values), ``c`` = sum of n_t*mean_t, ``b`` = sum of n_t*mean_t**2 and
    ``a`` = sum of M2_t, each times ``2**FIXED_BITS`` (Python integers), ``min`` and ``max``."""

    __slots__ = ("a", "b", "c", "count", "max", "min")

    def __init__(self, count: list[int], c: list[int], b: list[int], a: list[int], mn: np.ndarray, mx: np.ndarray):
        self.count, self.c, self.b, self.a, self.min, self.max = count, c, b, a, mn, mx

    @classmethod
    def empty(cls, channels: int) -> ExactStats:
        zero = [0] * channels
        return cls(list(zero), list(zero), list(zero), list(zero), np.full(channels, np.inf), np.full(channels, -np.inf))

    @classmethod
    def of(cls, x: np.ndarray, valid: np.ndarray) -> ExactStats:
        """One tile's statistics of ``x`` (C, P) over ``valid`` (C, P). Integers: exact sums
        in 64-bit integers; floats: mean, then the squared deviations from it, in float64."""
        if np.count_nonzero(valid) == valid.size:  # the common case, counted in one fast pass
            n_int = np.full(len(x), x.shape[1])
        else:
            n_int = np.count_nonzero(valid, axis=1)
        count = n_int.tolist()
        full = n_int == x.shape[1]
        every = bool(full.all())
        if x.dtype.kind in "ui" and x.dtype.itemsize <= 4:
            info = np.iinfo(x.dtype)
            # 64-bit integer accumulators, the operands cast in small buffers (no full copy):
            # exact, as no sum of at most 2**32 squares of 32-bit values overflows them
            wide = np.uint64 if x.dtype.kind == "u" else np.int64
            xv = x if every else np.where(valid, x, 0).astype(x.dtype, copy=False)
            s1, s2 = xv.sum(axis=1, dtype=wide), np.einsum("ij,ij->i", xv, xv, dtype=wide)
            mn, mx = _min_max(x, valid, full, every, info.max, info.min)
            mn[n_int == 0], mx[n_int == 0] = np.inf, -np.inf
            c = [int(v) << FIXED_BITS for v in s1.tolist()]
            b = [int(v) << FIXED_BITS for v in s2.tolist()]
            return cls(count, c, b, [0] * len(c), mn, mx)
        xf = x.astype(np.float64)
        if not every:
            np.copyto(xf, 0.0, where=~valid)
        means = xf.sum(axis=1) / np.maximum(n_int, 1)
        xf -= means[:, None]
        if not every:
            np.copyto(xf, 0.0, where=~valid)
        m2s = np.einsum("ij,ij->i", xf, xf)
        mn, mx = _min_max(x, valid, full, every, np.inf, -np.inf)
        c, b, a = [], [], []
        for k, mean, m2 in zip(count, means.tolist(), m2s.tolist()):
            c.append(k * _fixed(mean) if k else 0)
            b.append(_fixed_square_times(mean, k) if k else 0)
            a.append(_fixed(m2) if k else 0)
        return cls(count, c, b, a, mn, mx)

    def add(self, other: ExactStats) -> None:
        """Add ``other``'s tiles to these (in place)."""
        self.count = [p + q for p, q in zip(self.count, other.count)]
        self.c = [p + q for p, q in zip(self.c, other.c)]
        self.b = [p + q for p, q in zip(self.b, other.b)]
        self.a = [p + q for p, q in zip(self.a, other.a)]
        self.min = np.minimum(self.min, other.min)
        self.max = np.maximum(self.max, other.max)

    def merge(self, other: ExactStats) -> ExactStats:
        out = ExactStats(list(self.count), list(self.c), list(self.b), list(self.a), self.min.copy(), self.max.copy())
        out.add(other)
        return out

    def mean_std(self) -> tuple[list[float], list[float]]:
        """Mean and population std per channel, each rounded once from the exact sums
        (0 where no value was seen)."""
        means, stds = [], []
        for n, c, b, a in zip(self.count, self.c, self.b, self.a):
            if not n:
                means.append(0.0)
                stds.append(0.0)
                continue
            means.append(c / (n << FIXED_BITS))  # int / int: correctly rounded
            # variance = M2 / n with M2 = (a + b - c**2 / (n * 2**F)) / 2**F
            num = ((a + b) * n << FIXED_BITS) - c * c
            stds.append(math.sqrt(max(num, 0) / (n * n << (2 * FIXED_BITS))))
        return means, stds

    def to_json(self) -> dict[str, list[float]]:
        """The band_stats entry (see :meth:`ChannelStats.to_json` for a channel without a
        valid value: :data:`EMPTY_CHANNEL` everywhere, never NaN)."""
        means, stds = self.mean_std()

        def fl(values) -> list[float]:
            return [float(v) if n else EMPTY_CHANNEL for v, n in zip(values, self.count)]

        return {"mean": fl(means), "std": fl(stds), "min": fl(self.min.tolist()), "max": fl(self.max.tolist())}

    def to_state(self) -> dict[str, list]:
        """JSON-able exact state (see :meth:`from_state`)."""
        return {"count": list(self.count), "c": [_int_text(v) for v in self.c], "b": [_int_text(v) for v in self.b],
                "a": [_int_text(v) for v in self.a], "min": self.min.tolist(), "max": self.max.tolist()}

    @classmethod
    def from_state(cls, state: dict[str, list]) -> ExactStats:
        return cls([int(k) for k in state["count"]], [_text_int(t) for t in state["c"]],
                   [_text_int(t) for t in state["b"]], [_text_int(t) for t in state["a"]],
                   np.asarray(state["min"], np.float64), np.asarray(state["max"], np.float64))


def tile_stats(rows: dict[str, np.ndarray], s2_type: str) -> dict[str, ExactStats]:
    """One tile's statistics per key of band_stats, from its converted rows (dataset name ->
    array (C, ...)); Sentinel-2 counts under its product type only."""
    out = {}
    for key, (ds, _) in STATS_KEYS.items():
        if ds == "sentinel2" and key != f"sentinel2_{s2_type}":
            continue
        arr = rows[ds]
        x = arr.reshape(arr.shape[0], -1)
        out[key] = ExactStats.of(x, valid_mask(key, x))
    return out


class StatsAccumulator:
    """Per-key :class:`ExactStats` for a stream of converted rows: the same result, to the
    bit, whatever the order in which tiles and accumulators are added or merged."""

    def __init__(self) -> None:
        self.stats: dict[str, ExactStats] = {
            key: ExactStats.empty(H5_BY_NAME[ds].channels) for key, (ds, _) in STATS_KEYS.items()
        }

    def add_row(self, rows: dict[str, np.ndarray], s2_type: str) -> None:
        """Add one tile's converted rows (dataset name -> array (C, ...))."""
        self.add_tile(tile_stats(rows, s2_type))

    def add_tile(self, stats: dict[str, ExactStats]) -> None:
        """Add one tile's :func:`tile_stats`."""
        for key, st in stats.items():
            self.stats[key].add(st)

    def merge(self, other: StatsAccumulator) -> StatsAccumulator:
        out = StatsAccumulator()
        out.stats = {k: self.stats[k].merge(other.stats[k]) for k in self.stats}
        return out

    def to_state(self) -> dict[str, dict[str, list]]:
        """JSON-able exact state (a part's summary)."""
        return {k: v.to_state() for k, v in self.stats.items()}

    @classmethod
    def from_state(cls, state: dict[str, dict[str, list]]) -> StatsAccumulator:
        out = cls()
        out.stats = {k: ExactStats.from_state(state[k]) for k in STATS_KEYS}
        return out

    def to_npz_dict(self, prefix: str = "stats_") -> dict[str, np.ndarray]:
        return {prefix + k: np.array(json.dumps(v.to_state())) for k, v in self.stats.items()}

    @classmethod
    def from_npz(cls, npz, prefix: str = "stats_") -> StatsAccumulator:
        out = cls()
        out.stats = {k: ExactStats.from_state(json.loads(str(npz[prefix + k]))) for k in STATS_KEYS}
        return out

    def band_stats(self) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[int]]]:
        """The NAME_band_stats.json content, and per key the channels with no valid value
        (their statistics are :data:`EMPTY_CHANNEL`)."""
        empty = {k: [c for c, n in enumerate(s.count) if n == 0] for k, s in self.stats.items()}
        return {k: s.to_json() for k, s in self.stats.items()}, {k: v for k, v in empty.items() if v}
