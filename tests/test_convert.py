"""Conversion of GeoTIFF stacks into the MMEarth h5, statistics and splits."""

import json
import logging
import math
import os
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from affine import Affine

from tasks.multimodal import convert, schema
from tasks.multimodal.sources.base import TileStack, write_stack
from tasks.multimodal.stats import StatsAccumulator, valid_mask
from tests.contract_rows import NO_DATA, assert_rows_equal, expected_rows

SIZE = 20  # stack pixels
IMG = 16  # image size in the h5


def make_stack(tile_id, s2_type="l2a", asc=("VV", "VH"), desc=None, seed=0, nan_rows=0, holes=False):
    """A stack as a source writes it; ``holes``: every band has its own NaN pixels
    inside the image crop (no-data in every modality)."""
    rng = np.random.default_rng(seed)
    bands = {
        "sentinel2": list(schema.S2_BANDS_L2A if s2_type == "l2a" else schema.S2_BANDS_L1C),
        "sentinel1_asc": list(asc) if asc else None,
        "sentinel1_desc": list(desc) if desc else None,
        "aster": ["elevation", "slope"],
        "dynamic_world": ["label"],
        "canopy_height_eth": ["height", "std"],
        "esa_worldcover": ["Map"],
    }
    names = schema.stack_band_descriptions(bands)
    data = np.zeros((len(names), SIZE, SIZE), np.float32)
    for i, n in enumerate(names):
        group, band = n.split("/")
        if group == "sentinel2":
            if band == "SCL":
                data[i] = rng.integers(0, 12, (SIZE, SIZE))
            elif band == "QA60":
                data[i] = rng.choice([0, 1024, 2048], (SIZE, SIZE))
            elif band == "MSK_CLDPRB":
                data[i] = rng.integers(0, 101, (SIZE, SIZE))
            else:
                data[i] = rng.uniform(1, 10000, (SIZE, SIZE))
        elif group.startswith("sentinel1"):
            data[i] = rng.uniform(-25, 0, (SIZE, SIZE))
        elif band == "elevation":
            data[i] = rng.uniform(0, 3000, (SIZE, SIZE))
        elif band == "slope":
            data[i] = rng.uniform(0, 60, (SIZE, SIZE))
        elif band == "label":
            data[i] = rng.integers(1, 10, (SIZE, SIZE))  # label + 1, as exported
        elif band in ("height", "std"):
            data[i] = rng.uniform(0, 40, (SIZE, SIZE))
        elif band == "Map":
            data[i] = rng.choice(schema.WORLDCOVER_CLASSES, (SIZE, SIZE))
    if nan_rows:
        data[: len(bands["sentinel2"]), :nan_rows + 2, :] = np.nan
    if holes:
        off = (SIZE - IMG) // 2
        for i in range(len(names)):
            data[i, off + i % IMG, off + (3 * i) % (IMG - 3):off + (3 * i) % (IMG - 3) + 3] = np.nan
    info = {
        "S2_DATE": "2019-03-15", "S2_type": s2_type, "CRS": "EPSG:32633", "lat": 45.0 + seed, "lon": 10.0 - seed,
        "biome": seed % 14, "eco_region": (seed * 37) % 846, "NO_DATA": False, "BANDS": bands,
        "era5": {"month1": [270.0, 260.0, 280.0, 0.05], "month2": [275.0, 265.0, 285.0, 0.04],
                 "year": [280.0, 250.0, 300.0, 0.9]},
        "SOURCE": "test",
    }
    return TileStack(tile_id, data, "EPSG:32633", Affine(10, 0, 500000, 0, -10, 5000000), info), data, names


@pytest.fixture
def tiles_dir(tmp_path):
    d = tmp_path / "tiles"
    d.mkdir()
    return d


def _write(tiles_dir, stacks):
    info = {}
    for st, _, _ in stacks:
        write_stack(tiles_dir / f"{st.tile_id}.tif", st)
        info[st.tile_id] = st.info
    return info


def test_tile_rows_maps_every_band(tiles_dir):
    st, data, names = make_stack("a", "l2a", asc=("VV", "VH"), desc=("HH",), nan_rows=1)
    rows = convert.tile_rows(data, names, st.info, "a", IMG)
    off = (SIZE - IMG) // 2
    crop = data[:, off:off + IMG, off:off + IMG]
    idx = {n: i for i, n in enumerate(names)}
    for d in schema.H5_DATASETS:
        assert rows[d.name].dtype == d.dtype, d.name
        assert rows[d.name].shape == ((d.channels, IMG, IMG) if d.spatial else (d.channels,)), d.name
    b4 = crop[idx["sentinel2/B4"]]
    exp = np.where(np.isnan(b4), 0, np.rint(np.nan_to_num(b4))).astype(np.uint16)
    assert np.array_equal(rows["sentinel2"][3], exp)
    assert not rows["sentinel2"][10].any()  # L2A has no B10: zeros
    assert rows["sentinel2"][0, 0].max() == 0  # NaN row became no-data 0
    scl = crop[idx["sentinel2/SCL"]]
    assert np.array_equal(rows["sentinel2_scl"][0], np.where(np.isnan(scl), 255, np.nan_to_num(scl)).astype(np.uint8))
    # sentinel1: asc VV VH present, asc HH HV -inf, desc HH present, others -inf
    s1 = rows["sentinel1"]
    assert np.allclose(s1[0], crop[idx["sentinel1_asc/VV"]])
    assert np.all(np.isneginf(s1[2])) and np.all(np.isneginf(s1[3]))
    assert np.allclose(s1[6], crop[idx["sentinel1_desc/HH"]])
    assert np.all(np.isneginf(s1[4])) and np.all(np.isneginf(s1[5])) and np.all(np.isneginf(s1[7]))
    assert np.array_equal(rows["dynamic_world"][0], np.rint(crop[idx["dynamic_world/label"]]).astype(np.uint8))
    assert rows["dynamic_world"].min() >= 1
    assert np.array_equal(rows["esa_worldcover"][0], crop[idx["esa_worldcover/Map"]].astype(np.uint8))
    assert rows["era5"].tolist() == pytest.approx([270, 260, 280, 0.05, 275, 265, 285, 0.04, 280, 250, 300, 0.9])
    assert rows["lat"].tolist() == pytest.approx([math.sin(math.radians(45)), math.cos(math.radians(45))], rel=1e-6)
    assert rows["month"].tolist() == pytest.approx([math.sin(2 * math.pi * 3 / 12), math.cos(2 * math.pi * 3 / 12)], abs=1e-6)
    assert rows["biome"].sum() == 1 and rows["biome"][0] == 1
    assert rows["eco_region"].sum() == 1 and rows["eco_region"][0] == 1


@pytest.mark.parametrize("s2_type, asc, desc, seed", [
    ("l2a", ("VV", "VH"), ("HH",), 0), ("l1c", None, ("VV", "VH", "HH", "HV"), 1), ("l2a", None, None, 2),
    ("l1c", ("HH", "HV"), None, 3),
])
def test_tile_rows_match_the_contract_reference(s2_type, asc, desc, seed):
    """The converter against a plain re-implementation of the format, on stacks with
    missing pixels in every modality and missing orbits/polarisations."""
    st, data, names = make_stack("r", s2_type, asc=asc, desc=desc, seed=seed, holes=True)
    rows = convert.tile_rows(data, names, st.info, "r", IMG)
    exp = expected_rows(data, names, st.info, IMG)
    assert_rows_equal(rows, exp, "r")
    # the holes really are the no-data value of each modality
    off = (SIZE - IMG) // 2
    crop = data[:, off:off + IMG, off:off + IMG]
    seen = set()
    for i, name in enumerate(names):
        group, b = name.split("/")
        hole = np.isnan(crop[i])
        assert hole.sum() == 3
        if group == "sentinel2":
            if b in ("MSK_CLDPRB", "SCL", "QA60"):
                ds, ch = {"MSK_CLDPRB": "sentinel2_cloudprod", "SCL": "sentinel2_scl", "QA60": "sentinel2_cloudmask"}[b], 0
            else:
                ds, ch = "sentinel2", schema.S2_SPECTRAL.index(b)
        elif group.startswith("sentinel1"):
            ds, ch = "sentinel1", 4 * (group.endswith("desc")) + schema.S1_POLARISATIONS.index(b)
        else:
            ds = group
            ch = {"elevation": 0, "slope": 1, "height": 0, "std": 1}.get(b, 0)
        fill = NO_DATA[ds][1]
        got = rows[ds][ch][hole]
        assert (np.isneginf(got).all() if np.isinf(fill) else (got == fill).all()), (name, got, fill)
        seen.add(ds)
    absent = ({"sentinel2_cloudprod", "sentinel2_scl"} if s2_type == "l1c" else set()) | \
        (set() if asc or desc else {"sentinel1"})
    assert seen == set(NO_DATA) - absent
    if s2_type == "l2a":
        np.testing.assert_array_equal(rows["sentinel2_cloudprod"][0][~np.isnan(crop[names.index("sentinel2/MSK_CLDPRB")])],
                                      np.round(crop[names.index("sentinel2/MSK_CLDPRB")])[
                                          ~np.isnan(crop[names.index("sentinel2/MSK_CLDPRB")])])
    # a west longitude: sin negative
    assert rows["lon"][0] == pytest.approx(math.sin(math.radians(st.info["lon"])), abs=1e-7)


def test_the_reference_would_catch_a_wrong_converter():
    """The reference is not a copy of the converter: a converter that forgot one
    modality's no-data value (here canopy height written as 0) is told apart."""
    st, data, names = make_stack("w", "l2a", holes=True)
    rows = convert.tile_rows(data, names, st.info, "w", IMG)
    bad = dict(rows)
    bad["canopy_height_eth"] = np.where(rows["canopy_height_eth"] == -1, 0, rows["canopy_height_eth"]).astype(np.int8)
    with pytest.raises(AssertionError, match="canopy_height_eth"):
        assert_rows_equal(bad, expected_rows(data, names, st.info, IMG))
    bad = dict(rows)
    bad["aster"] = np.where(rows["aster"] == -32768, 0, rows["aster"]).astype(np.int16)
    with pytest.raises(AssertionError, match="aster"):
        assert_rows_equal(bad, expected_rows(data, names, st.info, IMG))


def test_l1c_has_no_cloudprod_or_scl():
    st, data, names = make_stack("b", "l1c", asc=None, desc=None)
    rows = convert.tile_rows(data, names, st.info, "b", IMG)
    assert np.all(rows["sentinel2_cloudprod"] == 65535)
    assert np.all(rows["sentinel2_scl"] == 255)
    assert rows["sentinel2"][10].any()  # B10 present in L1C
    assert np.all(np.isneginf(rows["sentinel1"]))


@pytest.mark.parametrize("break_it, message", [
    (lambda d, n, i: (d[:-1], n[:-1], i), "bands but tile_info BANDS declares"),
    (lambda d, n, i: (d, n[:3] + ["sentinel2/B99"] + n[4:], i), "B99"),
    (lambda d, n, i: (d[:, :8, :8], n, i), "smaller than the image size"),
    (lambda d, n, i: (d, n, {**i, "S2_type": "l3"}), "S2_type"),
    (lambda d, n, i: (d, n, {**i, "S2_DATE": "2019-13-01"}), "S2_DATE"),
])
def test_mismatch_raises_tile_problem(break_it, message):
    st, data, names = make_stack("c")
    d, n, i = break_it(data, list(names), st.info)
    with pytest.raises(convert.TileProblem, match=message):
        convert.tile_rows(d, n, i, "c", IMG)


def _build(tmp_path, tiles_dir, stacks, part_size=2, info_override=None):
    info = _write(tiles_dir, stacks)
    if info_override:
        info.update(info_override)
    ids = [s[0].tile_id for s in stacks]
    parts = [convert.pack_partition(spec, tiles_dir, info, tmp_path / "parts", IMG)
             for spec in convert.make_partitions(ids, part_size)]
    h5 = tmp_path / "data_t.h5"
    n = convert.assemble_h5(parts, h5, IMG)
    return parts, h5, n, info


def test_pack_and_assemble_exact_schema(tmp_path, tiles_dir):
    stacks = [make_stack(f"t{i}", "l2a" if i % 2 else "l1c", seed=i,
                         asc=("VV", "VH") if i % 3 else None, nan_rows=i % 2, holes=i % 2 == 0) for i in range(5)]
    parts, h5, n, info = _build(tmp_path, tiles_dir, stacks)
    assert n == 5
    with h5py.File(h5, "r") as f:
        assert set(f.keys()) == {d.name for d in schema.H5_DATASETS} | {"metadata"}
        for d in schema.H5_DATASETS:
            ds = f[d.name]
            assert ds.dtype == d.dtype
            assert ds.shape == ((5, d.channels, IMG, IMG) if d.spatial else (5, d.channels))
            assert ds.chunks == (1,) + ds.shape[1:]
            assert ds.compression == "gzip"
        meta = f["metadata"]
        assert meta.dtype == schema.METADATA_DTYPE and meta.chunks == (1,) and meta.compression == "gzip"
        for row, (st, data, names) in enumerate(stacks):
            assert meta[row]["tile_id"].decode() == st.tile_id
            assert meta[row]["S2_type"].decode() == st.info["S2_type"]
            # against the independent reference, not the product's own converter
            assert_rows_equal({d.name: f[d.name][row] for d in schema.H5_DATASETS},
                              expected_rows(data, names, st.info, IMG), f"row {row}")


def test_stats_match_numpy_over_h5(tmp_path, tiles_dir):
    stacks = [make_stack(f"s{i}", "l2a" if i < 3 else "l1c", seed=10 + i, nan_rows=1) for i in range(6)]
    parts, h5, n, info = _build(tmp_path, tiles_dir, stacks, part_size=4)
    js, empty = convert.merge_part_stats(parts).band_stats()
    assert set(js) == set(schema.STATS_KEYS)
    with h5py.File(h5, "r") as f:
        types = [m["S2_type"].decode() for m in f["metadata"][:]]
        for key, (ds, _) in schema.STATS_KEYS.items():
            arr = f[ds][:]
            if key.startswith("sentinel2_l"):
                arr = arr[[t == key[-3:] for t in types]]
            x = np.moveaxis(arr, 1, 0).reshape(arr.shape[1], -1).astype(np.float64)
            valid = valid_mask(key, x)
            for c in range(x.shape[0]):
                v = x[c][valid[c]]
                if v.size == 0:  # no valid value: the documented 0, never NaN
                    assert js[key]["mean"][c] == js[key]["std"][c] == 0.0
                    continue
                assert js[key]["mean"][c] == pytest.approx(v.mean(), rel=1e-9, abs=1e-9), (key, c)
                assert js[key]["std"][c] == pytest.approx(v.std(), rel=1e-7, abs=1e-9), (key, c)
                assert js[key]["min"][c] == v.min() and js[key]["max"][c] == v.max()


def test_mismatched_and_corrupt_tiles_are_reported_not_dropped(tmp_path, tiles_dir):
    stacks = [make_stack(f"m{i}", seed=i) for i in range(4)]
    info = _write(tiles_dir, stacks)
    # m1: tile_info declares one more S1 band than the file has
    info["m1"] = {**info["m1"], "BANDS": {**info["m1"]["BANDS"], "sentinel1_desc": ["VV"]}}
    # m2: truncated GeoTIFF
    p = tiles_dir / "m2.tif"
    p.write_bytes(p.read_bytes()[:2000])
    # m3: no tif at all
    (tiles_dir / "m3.tif").unlink()
    res = convert.pack_partition(convert.PartSpec(0, ["m0", "m1", "m2", "m3"]), tiles_dir, info, tmp_path / "p", IMG)
    assert res.n_rows == 1
    assert set(res.problems) == {"m1", "m2", "m3"}
    assert "declares" in res.problems["m1"]
    assert "m2.tif" in res.problems["m2"] and "m3.tif" in res.problems["m3"]


def test_part_reuse_and_staleness(tmp_path, tiles_dir):
    stacks = [make_stack(f"r{i}", seed=i) for i in range(3)]
    info = _write(tiles_dir, stacks)
    spec = convert.PartSpec(0, ["r0", "r1", "r2"])
    a = convert.pack_partition(spec, tiles_dir, info, tmp_path / "p", IMG)
    b = convert.pack_partition(spec, tiles_dir, info, tmp_path / "p", IMG)
    assert not a.reused and b.reused
    # a changed stack makes the part stale
    st, _, _ = make_stack("r1", seed=99)
    write_stack(tiles_dir / "r1.tif", st)
    c = convert.pack_partition(spec, tiles_dir, info, tmp_path / "p", IMG)
    assert not c.reused
    # other image size: stale too
    d = convert.pack_partition(spec, tiles_dir, info, tmp_path / "p", 8)
    assert not d.reused


def test_zlib_and_isal_both_readable(tmp_path, tiles_dir):
    stacks = [make_stack("z0", seed=3)]
    info = _write(tiles_dir, stacks)
    for codec in ("zlib", "isal"):
        comp = convert.Compression(codec, 1)
        res = convert.pack_partition(convert.PartSpec(0, ["z0"]), tiles_dir, info, tmp_path / codec, IMG, comp)
        h5 = tmp_path / f"data_{codec}.h5"
        convert.assemble_h5([res], h5, IMG, comp)
        with h5py.File(h5, "r") as f:
            rows = convert.tile_rows(stacks[0][1], stacks[0][2], info["z0"], "z0", IMG)
            np.testing.assert_array_equal(f["sentinel2"][0], rows["sentinel2"])


def test_splits_partition_rows_deterministically():
    s = convert.make_splits(103, (0.8, 0.1, 0.1), seed=5)
    assert len(s["train"]) == 82 and len(s["val"]) == 10 and len(s["test"]) == 11
    allrows = s["train"] + s["val"] + s["test"]
    assert sorted(allrows) == list(range(103))
    assert s == convert.make_splits(103, (0.8, 0.1, 0.1), seed=5)
    assert s != convert.make_splits(103, (0.8, 0.1, 0.1), seed=6)
    assert convert.make_splits(10, (1.0, 0.0, 0.0))["train"] == list(range(10))
    with pytest.raises(ValueError):
        convert.make_splits(10, (0.5, 0.1, 0.1))


def test_dataset_jsons_are_named_for_the_glob(tmp_path):
    paths = convert.write_dataset_jsons(tmp_path, "data_x", {"a": {}}, StatsAccumulator().band_stats()[0],
                                        convert.make_splits(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "data_x_band_stats.json", "data_x_splits.json", "data_x_tile_info.json"]
    stats = json.loads(paths["band_stats"].read_text())
    assert set(stats) == set(schema.STATS_KEYS)


def test_empty_dataset_still_has_the_schema(tmp_path):
    h5 = tmp_path / "data_empty.h5"
    assert convert.assemble_h5([], h5, IMG) == 0
    with h5py.File(h5, "r") as f:
        assert f["sentinel2"].shape == (0, 13, IMG, IMG) and f["metadata"].shape == (0,)
        assert f["sentinel2"].compression == "gzip"


def _no_constants(name):
    raise ValueError(f"non-standard JSON constant {name}")


def test_band_stats_are_strict_json_and_the_readers_still_normalise(tmp_path, tiles_dir):
    """Only L2A tiles and no descending orbit: B10 (l2a), every l1c channel and sentinel1
    channels 2-7 have no valid value. band_stats parses with a strict parser (no NaN /
    Infinity tokens), and MMEarth's training reader and TorchGeo's normalisation still
    read every channel, the empty ones coming out missing (NaN) as with the original's NaN."""
    from tests.mmearth_reader import Reader, torchgeo_normalize

    stacks = [make_stack(f"r{i}", "l2a", asc=("VV", "VH"), seed=i) for i in range(3)]
    parts, h5, n, info = _build(tmp_path, tiles_dir, stacks)
    band_stats, empty = convert.merge_part_stats(parts).band_stats()
    assert empty["sentinel2_l2a"] == [10] and empty["sentinel1"] == [2, 3, 4, 5, 6, 7]
    assert len(empty["sentinel2_l1c"]) == 13
    tile_info = {t: dict(v, era5={"month1": [math.nan] * 4, "month2": None, "year": [1.0, 2.0, 3.0, 4.0]})
                 for t, v in info.items()}  # Earth Engine's missing ERA5 values
    paths = convert.write_dataset_jsons(tmp_path, "data_t", tile_info, band_stats, convert.make_splits(n, (1, 0, 0)))
    stats = json.loads(paths["band_stats"].read_text(), parse_constant=_no_constants)
    assert stats["sentinel2_l2a"]["std"][10] == 0.0 and stats["sentinel2_l2a"]["mean"][0] > 0
    written = json.loads(paths["tile_info"].read_text(), parse_constant=_no_constants)
    assert written["r0"]["era5"]["month1"] == [None] * 4

    with np.errstate(invalid="ignore", divide="ignore"):
        reader = Reader(tmp_path, "train")  # MMEarth-train's MMEarthDataset, every modality
        assert len(reader) == 3
        for i in range(3):
            item = reader[i]
            s2, s1 = item["sentinel2"], item["sentinel1"]
            assert np.isnan(s2[10]).all() and not np.isnan(s2[[0, 1, 2, 3, 11, 12]]).all()
            assert np.isnan(s1[2:]).all() and np.isfinite(s1[:2]).any()
        with h5py.File(h5, "r") as f:
            for row in range(3):
                ti = info[f["metadata"][row][0].decode()]
                for mode in ("z-score", "min-max"):  # TorchGeo's MMEarth with every band (its default)
                    s2 = torchgeo_normalize(f["sentinel2"][row], stats, "sentinel2", ti, mode)
                    assert np.isnan(s2[10]).all() and np.isfinite(s2[3]).any(), mode
                    desc = torchgeo_normalize(f["sentinel1"][row], stats, "sentinel1_desc", ti, mode)
                    assert np.isnan(desc).all(), mode


def test_tile_info_json_is_strict(tmp_path):
    from tasks.multimodal import stacks as stacks_mod
    from tasks.multimodal.layout import DatasetLayout

    folder = DatasetLayout(tmp_path).tile_info_dir
    folder.mkdir(parents=True)
    (folder / "a.json").write_text(json.dumps({"S2_type": "l2a", "era5": {"month1": [math.nan, 1.0, 2.0, 3.0]}}))
    out = tmp_path / "data_t_tile_info.json"
    stacks_mod.write_tile_info_json(out, ["a"], tmp_path)
    got = json.loads(out.read_text(), parse_constant=_no_constants)
    assert got["a"]["era5"]["month1"] == [None, 1.0, 2.0, 3.0]


def _torchgeo_opens(root, subset, idx=0):
    """What TorchGeo's ``MMEarth(root, subset)`` does with the files (its ``filenames``,
    ``_verify``, ``_load_indices``, ``_load_normalization_stats``, ``_load_tile_info`` and
    ``_retrieve_sample``'s h5 path and metadata lookup), with its literal release names."""
    import os

    filenames = {"MMEarth": "data_1M_v001", "MMEarth64": "data_1M_v001_64", "MMEarth100k": "data_100k_v001"}
    dataset_filename = f"{filenames[subset]}.h5"
    band_stats_filename = f"{filenames[subset]}_band_stats.json"
    splits_filename = f"{filenames[subset]}_splits.json"
    tile_info_filename = f"{filenames[subset]}_tile_info.json"
    data_dir = os.path.join(root, filenames[subset])
    exists = [os.path.exists(os.path.join(data_dir, f)) for f in
              [dataset_filename, band_stats_filename, splits_filename, tile_info_filename]]
    if not all(exists):
        raise FileNotFoundError(f"DatasetNotFoundError: {data_dir}")
    with open(os.path.join(root, filenames[subset], splits_filename)) as f:
        indices = json.load(f)["train"]
    with open(os.path.join(root, filenames[subset], band_stats_filename)) as f:
        band_stats = json.load(f)
    with open(os.path.join(root, filenames[subset], tile_info_filename)) as f:
        tile_info = json.load(f)
    with h5py.File(os.path.join(root, filenames[subset], dataset_filename), "r") as f:
        name = f["metadata"][indices[idx]][0].decode("utf-8")
        return name, tile_info[name], band_stats, f["sentinel2"][indices[idx]][:]


def test_torchgeo_view_of_a_dataset_named_otherwise(tmp_path, tiles_dir):
    """A dataset named data_mine: TorchGeo's path logic finds nothing under its release
    names; after ``python -m tasks.multimodal.torchgeo`` it reads the dataset through the
    links, and the training reader's glob still finds one data_*.h5 in the dataset folder."""
    from tasks.multimodal.torchgeo import TorchGeoViewError, main, torchgeo_view
    from tests.mmearth_reader import Reader, torchgeo_normalize

    out = tmp_path / "output"
    ds = out / "data_mine"
    ds.mkdir(parents=True)
    stacks = [make_stack(f"g{i}", "l2a" if i % 2 else "l1c", seed=i) for i in range(3)]
    info = _write(tiles_dir, stacks)
    parts = [convert.pack_partition(convert.PartSpec(0, list(info)), tiles_dir, info, tmp_path / "parts", IMG)]
    n = convert.assemble_h5(parts, ds / "data_mine.h5", IMG)
    convert.write_dataset_jsons(ds, "data_mine", info, convert.merge_part_stats(parts).band_stats()[0],
                                convert.make_splits(n, (1, 0, 0)))
    with pytest.raises(FileNotFoundError):
        _torchgeo_opens(out, "MMEarth")  # renaming by hand was the only way

    assert main([str(ds)]) == 0  # the one command (default subset: MMEarth, as the tiles are not 64 px)
    view = out / "torchgeo" / "data_1M_v001"
    assert sorted(p.name for p in view.iterdir()) == [
        "data_1M_v001.h5", "data_1M_v001_band_stats.json", "data_1M_v001_splits.json", "data_1M_v001_tile_info.json"]
    assert all(p.is_symlink() and not Path(os.readlink(p)).is_absolute() for p in view.iterdir())
    for idx in range(n):
        name, ti, stats, s2 = _torchgeo_opens(out / "torchgeo", "MMEarth", idx)
        assert name in info and ti["S2_type"] == info[name]["S2_type"]
        with np.errstate(invalid="ignore", divide="ignore"):
            assert np.isfinite(torchgeo_normalize(s2, stats, "sentinel2", ti)[3]).any()
    # another subset name, another root; rerunning is a no-op
    torchgeo_view(ds, "MMEarth100k", tmp_path / "tg")
    torchgeo_view(ds, "MMEarth100k", tmp_path / "tg")
    assert _torchgeo_opens(tmp_path / "tg", "MMEarth100k")[0] in info
    # the training reader still sees exactly one data_*.h5 in the dataset folder
    assert len(Reader(ds, "train")) == n
    # moved as a whole, the relative links still resolve
    moved = tmp_path / "moved"
    out.rename(moved)
    assert _torchgeo_opens(moved / "torchgeo", "MMEarth")[0] in info
    with pytest.raises(TorchGeoViewError, match="knows"):
        torchgeo_view(moved / "data_mine", "MMEarth1M")
    with pytest.raises(TorchGeoViewError, match="not a finished dataset"):
        torchgeo_view(tmp_path / "tiles")
@pytest.mark.parametrize("dtype,fill", [("uint16", 0), ("uint16", 65535), ("uint8", 255), ("int16", -32768),
                                        ("int8", -1), ("float32", -np.inf)])
@pytest.mark.parametrize("with_nan", [False, True])
def test_to_dtype_fast_path_equals_the_plain_formula(dtype, fill, with_nan):
    """The cast skips its NaN passes when a band has no NaN (issue 25, post-processing
    speed): the rows must stay exactly what the plain formula gives, with and without NaN,
    for rounding halves, values out of range and every dtype the h5 holds."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((IMG, IMG)) * 40000).astype(np.float32)
    x[0, :6] = [0.5, 1.5, -0.5, 2.5, 1e9, -1e9]
    if with_nan:
        x[3, 3:9] = np.nan
    dt = np.dtype(dtype)
    nan = np.isnan(x)
    if dt.kind == "f":
        want = x.astype(dt)
        want[nan] = fill
    else:
        info = np.iinfo(dt)
        with np.errstate(invalid="ignore"):
            want = np.clip(np.rint(np.where(nan, 0, x)), info.min, info.max).astype(dt)
        want[nan] = fill
    with np.errstate(invalid="ignore"):
        got = convert._to_dtype(x, dt, fill)
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes()


def test_local_threads_pack_the_same_parts_as_one_process(tmp_path, tiles_dir):
    """Post-processing alone packs in local threads up to LOCAL_PACK_MAX_TILES tiles: the parts
    (compressed rows, statistics, problems) are byte for byte those of pack_partition called
    one after another, and come back in the specs' order."""
    stacks = [make_stack(f"p{i}", "l2a" if i % 2 else "l1c", seed=i, asc=("VV", "VH") if i % 3 else None,
                         holes=i % 2 == 0) for i in range(7)]
    info = _write(tiles_dir, stacks)
    info["p3"] = {**info["p3"], "BANDS": {**info["p3"]["BANDS"], "sentinel1_desc": ["VV"]}}  # a problem tile
    specs = convert.make_partitions([s[0].tile_id for s in stacks], 2)
    serial = [convert.pack_partition(s, tiles_dir, info, tmp_path / "serial", IMG) for s in specs]
    local = convert.pack_partitions_local(specs, tiles_dir, info, tmp_path / "local", IMG, threads=3)
    assert [p.index for p in local] == [s.index for s in specs]
    assert "p3" in local[1].problems and local[1].n_rows == 1
    for a, b in zip(serial, local):
        assert (a.n_rows, a.problems, a.integrity) == (b.n_rows, b.problems, b.integrity)
        with np.load(a.path) as za, np.load(b.path) as zb:
            assert sorted(za.files) == sorted(zb.files)
            for k in za.files:
                assert za[k].tobytes() == zb[k].tobytes(), (k, za[k][:8], zb[k][:8])
    assert convert.packs_locally(convert.LOCAL_PACK_MAX_TILES)
    assert not convert.packs_locally(convert.LOCAL_PACK_MAX_TILES + 1)


# --------------------------------------------------------------------------
# Statistics independent of the partitioning; the writer beside the packing
# --------------------------------------------------------------------------
def _varied_stacks(prefix, n):
    return [make_stack(f"{prefix}{i}", "l2a" if i % 2 else "l1c", seed=20 + i, asc=("VV", "VH") if i % 3 else None,
                       desc=("VV",) if i % 4 == 1 else None, nan_rows=i % 2, holes=i % 3 == 0) for i in range(n)]


def test_statistics_are_the_same_bytes_for_any_partitioning_and_merge_order(tmp_path, tiles_dir):
    """Parts merge by exact sums: the band_stats JSON is the same bytes whether the tiles were
    packed one part per tile, in parts of 2 or 4, or all in one, whatever order the parts'
    summaries are merged in (Dask returns them in any order), and still matches numpy."""
    stacks = _varied_stacks("q", 9)
    info = _write(tiles_dir, stacks)
    ids = [s[0].tile_id for s in stacks]
    texts = set()
    for part_size in (1, 2, 4, 9):
        parts = [convert.pack_partition(spec, tiles_dir, info, tmp_path / f"p{part_size}", IMG)
                 for spec in convert.make_partitions(ids, part_size)]
        summaries = [convert.part_summary(p) for p in parts]
        for order in (summaries, summaries[::-1], summaries[1::2] + summaries[::2]):
            js, _ = convert.merge_stats(json.loads(json.dumps(order))).band_stats()  # as the manifest keeps them
            texts.add(json.dumps(js))
    assert len(texts) == 1
    js = json.loads(texts.pop())
    x = np.stack([convert.tile_rows(d, n, st.info, st.tile_id, IMG)["sentinel1"] for st, d, n in stacks])
    x = np.moveaxis(x, 1, 0).reshape(8, -1).astype(np.float64)
    valid = valid_mask("sentinel1", x)
    for c in range(8):
        v = x[c][valid[c]]
        if v.size:
            assert js["sentinel1"]["mean"][c] == pytest.approx(v.mean(), rel=1e-12)
            assert js["sentinel1"]["std"][c] == pytest.approx(v.std(), rel=1e-10)


def _h5_content(path):
    """Everything a reader sees in an h5, and every chunk's stored bytes."""
    out = {}
    with h5py.File(path, "r") as f:
        out["attrs"] = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in f.attrs.items()}
        out["names"] = list(f.keys())
        for name in f:
            ds = f[name]
            tail = (0,) * (ds.ndim - 1)
            out[name] = (str(ds.dtype), ds.shape, ds.chunks, ds.compression, ds.compression_opts,
                         ds.fillvalue.tobytes() if hasattr(ds.fillvalue, "tobytes") else ds.fillvalue,
                         [ds.id.read_direct_chunk((i,) + tail) for i in range(ds.shape[0])])
    return out


def _assert_same_h5(a, b):
    """The same h5 (see _h5_content); a chunk that differs is named, with whether its pixels
    (decompressed) differ or only the compressed stream."""
    ca, cb = _h5_content(a), _h5_content(b)
    for name in ca.keys() | cb.keys():
        if name in ("attrs", "names") or name not in ca or name not in cb or ca[name][:-1] != cb[name][:-1]:
            assert ca.get(name) == cb.get(name), name
            continue
        for i, (x, y) in enumerate(zip(ca[name][-1], cb[name][-1])):
            if x != y:
                same = x[0] == y[0] and zlib.decompress(x[1]) == zlib.decompress(y[1])
                raise AssertionError(f"{name} row {i}: chunk bytes differ ({len(x[1])} vs {len(y[1])} bytes, "
                                     f"filter masks {x[0]}/{y[0]}); decompressed {'the same' if same else 'DIFFERENT'}")
    assert ca == cb


@pytest.mark.parametrize("workers,processes", [(1, False), (3, False), (2, True)])
def test_writer_beside_packing_writes_the_same_h5_as_parts_then_assemble(tmp_path, tiles_dir, workers, processes):
    """convert.pack_to_h5 (packing threads beside the single writer, no part files) gives the
    same h5 as pack_partition + assemble_h5 (datasets, layout, attributes, every chunk's bytes),
    the same statistics to the bit, and the same problems; a problem tile is left out."""
    stacks = _varied_stacks("w", 8)
    info = _write(tiles_dir, stacks)
    info["w5"] = {**info["w5"], "BANDS": {**info["w5"]["BANDS"], "sentinel1_desc": ["HH", "HV"]}}  # no such bands
    ids = [s[0].tile_id for s in stacks]
    parts = [convert.pack_partition(spec, tiles_dir, info, tmp_path / "parts", IMG)
             for spec in convert.make_partitions(ids, 3)]
    attrs = {"source": "test", "synthetic": True}
    convert.assemble_h5(parts, tmp_path / "parts.h5", IMG, attrs=attrs)
    res = convert.pack_to_h5(ids, tiles_dir, info, tmp_path / "writer.h5", IMG, workers=workers, attrs=attrs,
                             processes=processes)
    assert res.n_rows == 7 and res.tile_ids == [t for t in ids if t != "w5"]
    assert set(res.problems) == {"w5"} and res.problems == {k: v for p in parts for k, v in p.problems.items()}
    _assert_same_h5(tmp_path / "writer.h5", tmp_path / "parts.h5")
    assert json.dumps(res.stats.band_stats()) == json.dumps(convert.merge_part_stats(parts).band_stats())
    assert not list(tmp_path.glob("*.partial*"))


def test_a_failing_tile_never_leaves_a_corrupt_dataset(tmp_path, tiles_dir, monkeypatch):
    """A stack that is not the one written, an unreadable one and a tile whose conversion fails
    unexpectedly are left out and reported; the h5 holds the other rows, complete. A failure of
    the writer itself leaves no h5 half written: the earlier one stays as it was."""
    stacks = _varied_stacks("f", 6)
    info = _write(tiles_dir, stacks)
    ids = [s[0].tile_id for s in stacks]
    raw = (tiles_dir / "f1.tif").read_bytes()
    info["f1"] = {**info["f1"], "STACK": {"blake2b": "0" * 32, "bytes": len(raw), "crs": "EPSG:32633",
                                          "transform": [10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0],
                                          "width": SIZE, "height": SIZE}}
    (tiles_dir / "f2.tif").write_bytes(b"not a tiff")
    real = convert.tile_rows

    def flaky(data, names, tile_info, tile_id, image_size):
        if tile_id == "f4":
            raise RuntimeError("boom")
        return real(data, names, tile_info, tile_id, image_size)

    monkeypatch.setattr(convert, "tile_rows", flaky)
    h5 = tmp_path / "data_f.h5"
    res = convert.pack_to_h5(ids, tiles_dir, info, h5, IMG, workers=2, processes=False)
    assert res.tile_ids == ["f0", "f3", "f5"]
    assert set(res.problems) == {"f1", "f2", "f4"} and set(res.integrity) == {"f1"}
    assert "BLAKE2b" in res.problems["f1"] and "RuntimeError: boom" in res.problems["f4"]
    with h5py.File(h5, "r") as f:
        assert [m["tile_id"].decode() for m in f["metadata"][:]] == ["f0", "f3", "f5"]
        for d in schema.H5_DATASETS:
            assert f[d.name].shape[0] == 3
            f[d.name][:]  # every chunk decodes
        for row, tid in enumerate(["f0", "f3", "f5"]):
            st, data, names = next(s for s in stacks if s[0].tile_id == tid)
            assert_rows_equal({d.name: f[d.name][row] for d in schema.H5_DATASETS},
                              expected_rows(data, names, st.info, IMG), tid)
    before = h5.read_bytes()

    calls = {"n": 0}
    real_add = convert.StatsAccumulator.add_tile

    def disk_full(self, stats):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_add(self, stats)

    monkeypatch.setattr(convert.StatsAccumulator, "add_tile", disk_full)
    with pytest.raises(OSError, match="No space left"):  # the writer fails while processes pack
        convert.pack_to_h5(ids, tiles_dir, info, h5, IMG, workers=2, processes=True)
    assert h5.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_f.h5", "tiles"]
    monkeypatch.setattr(convert.StatsAccumulator, "add_tile", real_add)
    res = convert.pack_to_h5(["f1", "f2", "f4"], tiles_dir, info, h5, IMG, workers=2, processes=False)  # no row at all
    assert res.n_rows == 0 and set(res.problems) == {"f1", "f2", "f4"}
    assert h5.read_bytes() == before  # a good dataset is never replaced by an empty one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data_f.h5", "tiles"]


class _KillsItsPacker(dict):
    """tile_info whose lookup of one tile ends the packing process that makes it (never the
    process that made this object): a library crashing on one stack."""

    def __init__(self, info: dict, tile: str):
        super().__init__(info)
        self.tile, self.parent = tile, os.getpid()

    def get(self, key, default=None):
        if key == self.tile and os.getpid() != self.parent:
            os._exit(3)
        return super().get(key, default)


def test_a_packing_process_that_dies_loses_no_tile(tmp_path, tiles_dir, caplog):
    """pack_to_h5 packs in processes; when one dies (a crash in a library on some stack), the
    tiles it had not returned and those not yet started are packed in threads of the writer's
    process: the h5 is the same as packing in threads from the start, and the log says so."""
    stacks = _varied_stacks("k", 2 * convert.PACK_CHUNK + 3)
    info = _write(tiles_dir, stacks)
    ids = [s[0].tile_id for s in stacks]
    want = convert.pack_to_h5(ids, tiles_dir, info, tmp_path / "threads.h5", IMG, workers=2, processes=False)
    with caplog.at_level(logging.WARNING, logger=convert.__name__):
        got = convert.pack_to_h5(ids, tiles_dir, _KillsItsPacker(info, ids[convert.PACK_CHUNK + 1]),
                                 tmp_path / "processes.h5", IMG, workers=2, processes=True)
    assert got.tile_ids == want.tile_ids == ids and not got.problems
    assert "a packing process died" in caplog.text
    _assert_same_h5(tmp_path / "processes.h5", tmp_path / "threads.h5")
    assert json.dumps(got.stats.band_stats()) == json.dumps(want.stats.band_stats())
