import math

import numpy as np
import pytest

from tasks.multimodal.stats import ChannelStats, StatsAccumulator, valid_mask


def _reference(x, valid):
    out = []
    for c in range(x.shape[0]):
        v = x[c][valid[c]].astype(np.float64)
        out.append((v.size, v.mean(), v.std(), v.min(), v.max()))
    return out


@pytest.mark.parametrize("splits", [1, 2, 7])
def test_channel_stats_merge_matches_numpy(splits):
    rng = np.random.default_rng(0)
    x = rng.normal(1000.0, 250.0, size=(3, 5000))
    valid = rng.random((3, 5000)) > 0.2
    valid[2, :] = False
    valid[2, 17] = True  # one valid value: std 0
    parts = np.array_split(np.arange(x.shape[1]), splits)
    acc = ChannelStats.empty(3)
    for idx in parts:
        acc = acc.merge(ChannelStats.of(x[:, idx], valid[:, idx]))
    for c, (n, mean, std, mn, mx) in enumerate(_reference(x, valid)):
        assert acc.count[c] == n
        assert acc.mean[c] == pytest.approx(mean, rel=1e-12)
        assert math.sqrt(acc.m2[c] / acc.count[c]) == pytest.approx(std, rel=1e-9, abs=1e-12)
        assert acc.min[c] == mn and acc.max[c] == mx


def test_stable_for_large_offset():
    # E[x^2]-E[x]^2 loses all digits here; the merged M2 must not.
    rng = np.random.default_rng(1)
    x = (1e9 + rng.normal(0, 1.0, size=(1, 20000)))
    valid = np.ones_like(x, bool)
    acc = ChannelStats.empty(1)
    for idx in np.array_split(np.arange(x.shape[1]), 13):
        acc = acc.merge(ChannelStats.of(x[:, idx], valid[:, idx]))
    assert acc.to_json()["std"][0] == pytest.approx(x.std(), rel=1e-6)


def test_empty_channel_is_a_finite_documented_value():
    """No NaN in band_stats (strict JSON parsers reject it): EMPTY_CHANNEL (0) instead."""
    from tasks.multimodal.stats import EMPTY_CHANNEL

    acc = ChannelStats.empty(2)
    js = acc.to_json()
    assert EMPTY_CHANNEL == 0.0
    assert all(v == EMPTY_CHANNEL and math.isfinite(v) for v in js["mean"] + js["std"] + js["min"] + js["max"])


def test_valid_mask_nodata_rules():
    s1 = np.array([[-np.inf, -10.0, np.nan]], np.float32)
    assert valid_mask("sentinel1", s1).tolist() == [[False, True, False]]
    era = np.array([[np.nan, 280.0]], np.float32)
    assert valid_mask("era5", era).tolist() == [[False, True]]
    s2 = np.array([[0, 5, 10000]], np.uint16)
    assert valid_mask("sentinel2_l2a", s2).tolist() == [[False, True, True]]
    ch = np.array([[-1, 0, 30]], np.int8)
    assert valid_mask("canopy_height_eth", ch).tolist() == [[False, True, True]]


def test_accumulator_splits_sentinel2_by_type_and_roundtrips():
    from tasks.multimodal.schema import H5_BY_NAME

    rng = np.random.default_rng(2)

    def rows(val):
        r = {}
        for d in H5_BY_NAME.values():
            shape = (d.channels, 4, 4) if d.spatial else (d.channels,)
            r[d.name] = np.full(shape, val, d.dtype)
        return r

    a = StatsAccumulator()
    a.add_row(rows(5), "l2a")
    a.add_row(rows(7), "l1c")
    js, empty = a.band_stats()
    assert js["sentinel2_l2a"]["mean"][0] == 5 and js["sentinel2_l1c"]["mean"][0] == 7
    assert js["aster"]["mean"][0] == 6
    assert empty == {}
    b = StatsAccumulator.from_npz(a.to_npz_dict())
    assert b.band_stats()[0] == js
    del rng


@pytest.mark.parametrize("dtype", ["uint16", "uint8", "int16", "int8"])
def test_integer_path_is_exact(dtype):
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max, size=(4, 3000), endpoint=True).astype(dtype)
    valid = rng.random((4, 3000)) > 0.3
    valid[3] = False
    acc = ChannelStats.empty(4)
    for idx in np.array_split(np.arange(3000), 5):
        acc = acc.merge(ChannelStats.of(x[:, idx], valid[:, idx]))
    js = acc.to_json()
    for c in range(3):
        v = x[c][valid[c]].astype(np.float64)
        assert js["mean"][c] == pytest.approx(v.mean(), rel=1e-12)
        assert js["std"][c] == pytest.approx(v.std(), rel=1e-10)
        assert js["min"][c] == v.min() and js["max"][c] == v.max()
    assert js["mean"][3] == js["std"][3] == js["min"][3] == js["max"][3] == 0.0  # no valid value


@pytest.mark.parametrize("dtype", ["uint16", "int16", "int8", "float32"])
def test_fully_valid_channels_give_the_masked_result_bit_for_bit(dtype):
    """Channels whose every entry is valid skip the masking (stats._min_max and the plain casts):
    every statistic is the same float, bit for bit, as with the mask, whether all channels,
    some or none are fully valid."""
    rng = np.random.default_rng(7)
    if dtype == "float32":
        x = rng.normal(300, 80, (6, 4096)).astype(np.float32)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, (6, 4096), endpoint=True).astype(dtype)

    def masked(x, valid):  # the formula with the mask on every channel
        n_int = valid.sum(axis=1)
        if x.dtype.kind in "ui":
            xi = np.where(valid, x, 0).astype(np.int64)
            s1, s2 = xi.sum(axis=1), np.einsum("ij,ij->i", xi, xi)
            mean = np.array([int(a) / int(k) if k else 0.0 for a, k in zip(s1, n_int)])
            m2 = np.array([(int(k) * int(b) - int(a) ** 2) / int(k) if k else 0.0 for a, b, k in zip(s1, s2, n_int)])
            hi, lo = np.iinfo(x.dtype).max, np.iinfo(x.dtype).min
        else:
            n = n_int.astype(np.float64)
            mean = np.where(n > 0, np.sum(x, axis=1, where=valid, dtype=np.float64) / np.maximum(n, 1), 0.0)
            d = np.where(valid, x - mean[:, None], 0.0)
            m2 = np.einsum("ij,ij->i", d, d)
            hi, lo = np.inf, -np.inf
        mn = np.min(x, axis=1, where=valid, initial=hi).astype(np.float64)
        mx = np.max(x, axis=1, where=valid, initial=lo).astype(np.float64)
        mn[n_int == 0], mx[n_int == 0] = np.inf, -np.inf
        return [n_int.astype(np.float64), mean, m2, mn, mx]

    every = np.ones(x.shape, bool)
    some = every.copy()
    some[1] = rng.random(x.shape[1]) < 0.7
    some[4] = False
    none = rng.random(x.shape) < 0.9
    for valid in (every, some, none):
        got = ChannelStats.of(x, valid)
        for name, want in zip(("count", "mean", "m2", "min", "max"), masked(x, valid)):
            assert getattr(got, name).tobytes() == want.tobytes(), (dtype, name)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int16", "uint16"])
def test_exact_stats_same_bytes_for_any_grouping_and_order_and_no_cancellation(dtype):
    """ExactStats adds tiles up exactly: the same tiles grouped into parts of any size, added in
    any order or merged in any tree (and through the JSON state a part summary keeps) give the
    same floats to the bit; integers even for any split of the pixels into tiles. With a large
    offset (where E[x^2]-E[x]^2 loses every digit) the std is still right."""
    from tasks.multimodal.stats import ExactStats

    rng = np.random.default_rng(11)
    if dtype.startswith("float"):
        x = (1e6 + rng.normal(0, 1.0, size=(2, 6000))).astype(dtype)
    else:
        info = np.iinfo(dtype)
        x = rng.integers(info.max - 50, info.max, size=(2, 6000), endpoint=True).astype(dtype)
    valid = rng.random(x.shape) > 0.1

    def total(parts):
        acc = ExactStats.empty(2)
        for p in parts:
            acc.add(p)
        return acc

    results = set()
    for n_tiles in ((17,) if dtype.startswith("float") else (1, 5, 17)):
        tiles = [ExactStats.of(x[:, i], valid[:, i]) for i in np.array_split(np.arange(x.shape[1]), n_tiles)]
        for size in (1, 3, n_tiles):
            parts = [ExactStats.from_state(total(tiles[k:k + size]).to_state()) for k in range(0, n_tiles, size)]
            results.add(repr(total(parts).to_json()))
            results.add(repr(total(parts[::-1]).to_json()))
            results.add(repr(total(parts[1::2]).merge(total(parts[::2])).to_json()))
    assert len(results) == 1
    js = eval(results.pop())  # our own repr of floats
    for c in range(2):
        v = x[c][valid[c]].astype(np.float64)
        assert js["mean"][c] == pytest.approx(v.mean(), rel=1e-15)
        assert js["std"][c] == pytest.approx(v.std(), rel=1e-9)
