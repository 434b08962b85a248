"""The report pictures: the tiles map's coastlines and legend, the multimodal contact sheet
(no data visible), and the labels that say a dataset is synthetic."""

from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np
import pytest

from tasks.multimodal import schema

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")


def _png_rgb(png: bytes) -> np.ndarray:
    import matplotlib.image as mpimg

    return mpimg.imread(io.BytesIO(png), format="png")[..., :3]


def test_tiles_map_draws_shipped_coastlines_and_keeps_the_legend_off_the_data():
    import matplotlib.pyplot as plt

    from tasks.common.report import LAND_GEOJSON, land_polygons, tiles_map_figure, tiles_map_png

    assert LAND_GEOJSON.stat().st_size < 200_000  # shipped, small
    land = land_polygons()
    # Natural Earth 1:110m land: 127 polygons after dissolving; Africa+Eurasia spans -18..180 deg E
    assert len(land) > 100
    xs = np.concatenate([np.array(r[0])[:, 0] for r in land])
    assert xs.min() <= -179 and xs.max() >= 179
    # many labels in the lower left, where the old in-axes legend sat
    points = [(-170 + i, -80 + (i % 7), f"region {i % 12}") for i in range(60)]
    fig = tiles_map_figure(points, title="t")
    try:
        ax = fig.axes[0]
        coast = [c for c in ax.collections if c.get_gid() == "coastline"]
        assert len(coast) == 1 and len(coast[0].get_paths()) == len(land)
        fig.canvas.draw()
        legend = ax.get_legend().get_window_extent()
        assert legend.x0 >= ax.get_window_extent().x1, "the legend must sit outside the map"
    finally:
        plt.close(fig)
    # pixels: the Sahara (land colour) and the mid-Pacific (sea colour) differ on the PNG
    rgb = _png_rgb(tiles_map_png([(0.0, 0.0, "a")], title="t"))
    land_px = (np.abs(rgb - np.array([0xf4, 0xf1, 0xe8]) / 255).max(axis=-1) < 0.02).sum()
    sea_px = (np.abs(rgb - np.array([0xee, 0xf4, 0xfa]) / 255).max(axis=-1) < 0.02).sum()
    assert land_px > 0.1 * rgb.shape[0] * rgb.shape[1] * 0.3 and sea_px > land_px


def _small_h5(path: Path, n: int = 3, size: int = 16) -> None:
    with h5py.File(path, "w") as f:
        for d in schema.H5_DATASETS:
            shape = (n, d.channels, size, size) if d.spatial else (n, d.channels)
            f.create_dataset(d.name, shape=shape, dtype=d.dtype)
        meta = np.zeros(n, dtype=schema.METADATA_DTYPE)
        meta["tile_id"] = [f"t{i}".encode() for i in range(n)]
        meta["S2_type"] = b"l2a"
        f.create_dataset("metadata", data=meta)
        rng = np.random.default_rng(0)
        for i in range(n):
            f["sentinel2"][i] = rng.integers(200, 3000, (13, size, size))
            f["sentinel1"][i] = rng.uniform(-20, -5, (8, size, size))
            f["aster"][i] = rng.integers(100, 900, (2, size, size))
            f["esa_worldcover"][i] = 10
        s2 = f["sentinel2"][1]
        s2[:, :, : size // 2] = 0  # left half: the image's edge (no data)
        f["sentinel2"][1] = s2
        f["sentinel1"][2] = -np.inf  # no orbit at all
        a = f["aster"][0]
        a[0, :4] = schema.H5_BY_NAME["aster"].fill
        f["aster"][0] = a


def test_contact_sheet_shows_no_data_in_magenta(tmp_path):
    from tasks.multimodal import contact_sheet as cs

    h5 = tmp_path / "d.h5"
    _small_h5(h5)
    rgb, miss = cs.s2_rgb(h5py.File(h5)["sentinel2"][1])
    assert miss[:, :8].all() and not miss[:, 8:].any()
    assert np.allclose(rgb[miss], cs.NO_DATA_RGB)
    with h5py.File(h5) as f:
        assert cs.missing_pixels(f, 0) == 4 * 16 and cs.missing_pixels(f, 1) == 8 * 16
        assert cs.missing_pixels(f, 2) == 16 * 16
    png = cs.contact_sheet_png(h5, n_rows=3, title="t")
    img = _png_rgb(png)
    magenta = (img[..., 0] > 0.9) & (img[..., 1] < 0.1) & (img[..., 2] > 0.9)
    # half an S2 panel + a whole S1 panel + 4 rows of elevation, drawn at 1.6 in x 80 dpi per panel
    # (128 px for 16 tile pixels: 8x8 screen pixels a tile pixel), plus the legend's swatch
    assert magenta.sum() >= (8 * 16 + 16 * 16 + 4 * 16) * 64 * 0.8, magenta.sum()


def test_contact_sheet_picks_the_tiles_with_gaps(tmp_path):
    from tasks.multimodal import contact_sheet as cs

    h5 = tmp_path / "d.h5"
    _small_h5(h5, n=12)
    with h5py.File(h5) as f:
        rows = cs.choose_rows(f, 4)
    assert len(rows) == 4 and {1, 2} <= set(rows), rows


def test_source_is_named_synthetic_and_scan_message_is_honest():
    from tasks.multimodal.run import scan_message, source_about
    from tasks.multimodal.sources.synthetic import SyntheticSource

    about = source_about(SyntheticSource())
    assert about["synthetic"] is True and "SYNTHETIC" in about["note"] and about["name"] == "synthetic"
    index = Path("/x/stacks_index.jsonl")
    first = scan_message(256, 256, {"indexed": 0, "full checks": 256}, index)
    assert first == "256 of 256 tiles to fetch (0 already done)"
    again = scan_message(256, 0, {"indexed": 256, "full checks": 0}, index)
    assert again == "0 of 256 tiles to fetch (256 already done; 256 vouched for by stacks_index.jsonl)"
    mixed = scan_message(10, 2, {"indexed": 6, "full checks": 4}, index)
    assert mixed == "2 of 10 tiles to fetch (8 already done; 6 vouched for by stacks_index.jsonl; 4 checked in full)"


def test_overview_shows_the_median_photo_not_the_best():
    from tasks.aerial.report import typical_photo

    cov = {"a.jpg": 0.98, "b.jpg": 0.40, "c.jpg": 0.645, "d.jpg": 0.60, "e.jpg": 0.70}
    assert typical_photo(cov) == "c.jpg"  # the median, not a.jpg (the best)
    assert typical_photo({"x": 0.9, "y": 0.1}) == "y" and typical_photo({}) is None


def test_accuracy_table_puts_the_verdict_next_to_the_metric():
    from tasks.aerial.evaluate import summary_rows, summary_table

    acc = {"poses": {"photos registered": 15, "photos attempted": 16, "median rotation error deg": 0.1,
                     "median centre error m": 0.5, "median centre error / extent": 0.002, "scene extent m": 250.0,
                     "scale ratio median": 1.001, "scale ratio max deviation": 0.004},
           "depth": {"photos": {"images": 16, "pixels": 100, "coverage": 0.645, "absrel": 0.05, "within_1.25": 0.95}}}
    rows = summary_table(acc)
    # the UI's table shows columns in this order: "met" must not sit after the long texts
    assert all(list(r) == ["metric", "met", "value", "goal"] for r in rows)
    assert rows[0]["met"] == "NO: 1 not registered"
    assert summary_rows(acc)[0] == ("photos registered", "15/16", "all [MISSED: 1 not registered]")


def test_a_cancelled_future_stops_the_window_instead_of_becoming_problems():
    import concurrent.futures

    from tasks.common.window import RunCancelled, is_cancellation, run_each, run_windowed

    def cancelled_future(_item):
        f = concurrent.futures.Future()
        f.cancel()
        return f

    problems = []
    with pytest.raises(RunCancelled):
        run_each(cancelled_future, range(5), on_result=lambda i, v: None,
                 on_error=lambda i, e: problems.append((i, e)))
    assert problems == []  # none of the five became an item's problem

    def failing(exc):
        def submit(_item):
            f = concurrent.futures.Future()
            f.set_exception(exc)
            return f
        return submit

    from distributed.client import FutureCancelledError

    assert is_cancellation(FutureCancelledError("k", "client closed")) and not is_cancellation(ValueError())
    with pytest.raises(RunCancelled):  # Dask's cancellation as the future's exception
        run_each(failing(FutureCancelledError("k", "client closed")), range(3), lambda i, v: None,
                 lambda i, e: problems.append(i))
    run_each(failing(ValueError("bad")), range(3), lambda i, v: None, lambda i, e: problems.append(i))
    assert sorted(problems) == [0, 1, 2]  # real failures still are
    done = []
    run_windowed(_done, range(3), 2, lambda i, f: done.append(i))
    assert sorted(done) == [0, 1, 2]


def _done(v):
    import concurrent.futures

    f = concurrent.futures.Future()
    f.set_result(v)
    return f


def test_the_engines_running_state_at_a_runners_cancel_is_said_as_cancelled(caplog):
    import logging

    from tasks.common.runtime import quiet_shutdown_tracebacks

    quiet_shutdown_tracebacks()
    with caplog.at_level(logging.INFO, logger="prefect.flow_runs"):
        logging.getLogger("prefect.flow_runs").info("Finished in state Running()")
        logging.getLogger("prefect.flow_runs").info("Finished in state Completed()")
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs[0].startswith("Finished: cancelled") and msgs[1] == "Finished in state Completed()"


def test_aerial_synthetic_world_is_named(tmp_path, capsys):
    from flows.aerial import print_result, synthetic_note
    from tasks.aerial.synthetic_world import MARKER

    assert synthetic_note(tmp_path) == ""
    (tmp_path / MARKER).write_text("ok\n")
    note = synthetic_note(tmp_path)
    assert note.startswith("SYNTHETIC world")
    print_result({"root": str(tmp_path), "scenes": {"0001": {"counts": {}}}, "pipeline": "sift+mnn",
                  "dense_backend": "cpu", "synthetic": note})
    assert "SYNTHETIC world" in capsys.readouterr().out


def test_covisibility_picture_titles_are_not_cut_off(tmp_path):
    import matplotlib.pyplot as plt

    from tasks.aerial import covisibility as C
    from tasks.aerial.dense import depth_path, write_depth_h5
    from tasks.aerial.training_export import picture

    (tmp_path / "images").mkdir()
    (tmp_path / "depths").mkdir()
    # real photo names are long (Flickr ids): the titles that name them ran past the figure's edge
    names = ["0001_012.jpeg", "0001_030.jpeg", "9331431194_bf8d36c2f6_o.jpg", "4867966550_7d253e7050_o.jpg"]
    K = np.array([[500.0, 0, 320], [0, 500.0, 240], [0, 0, 1]])
    views = []
    for i, n in enumerate(names):
        plt.imsave(tmp_path / "images" / n, np.full((480, 640, 3), 0.6 + 0.1 * i))
        w2c = np.eye(4)
        w2c[0, 3] = 0.3 * i
        write_depth_h5(depth_path(tmp_path / "depths", n), np.full((480, 640), 10.0, np.float32))
        views.append(C.View(n, K, w2c, 640, 480, depth_path(tmp_path / "depths", n)))
    cov = np.array([[1, .8, .5, .4], [.8, 1, .45, .6], [.7, .5, 1, .9], [.3, .62, .9, 1]])
    png, shown = picture(views, cov, np.array([True, True, False, False]), np.minimum(cov, cov.T), tmp_path,
                         "0001", 0.1)
    assert shown["aerial"] == "0001_030.jpeg"
    img = _png_rgb(png)
    band = img[:40]  # the titles' rows: no text touches the left or right edge (cut off there)
    assert not (band[:, -3:] < 0.5).any() and not (band[:, :3] < 0.5).any()
