"""The original's scene list (.npz holding a pickled dict) is read without running code."""

from __future__ import annotations

import os

import numpy as np
import pytest

from tasks.aerial import megadepth as md


class _Payload:
    """Unpickling this runs a command (it would create a file)."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_original_layout_loads(tmp_path):
    npz = tmp_path / "megadepth_image_list_v0.npz"
    np.savez(npz, data=np.array({("0001", "0"): ["a.jpg", "b.jpg"],
                                 (np.str_("0015"), np.str_("1")): np.array(["c.jpg", "d.jpg"])}, dtype=object))
    assert md.load_scene_list(npz) == [md.SceneEntry("0001", "0", ["a.jpg", "b.jpg"]),
                                       md.SceneEntry("0015", "1", ["c.jpg", "d.jpg"])]


@pytest.mark.parametrize("where", ["value", "key", "top"])
def test_a_crafted_npz_does_not_run_its_payload(tmp_path, where):
    marker = tmp_path / "PWNED"
    payload = _Payload(marker)
    data = {"value": {("0001", "0"): [payload]}, "key": {(payload, "0"): ["a.jpg"]}, "top": payload}[where]
    npz = tmp_path / "evil.npz"
    np.savez(npz, data=np.array(data, dtype=object) if where != "top" else np.array([data], dtype=object))
    with pytest.raises(ValueError, match=r"evil\.npz: refused: .*(posix|os)\.system.*could run code"):
        md.load_scene_list(npz)
    assert not marker.exists()
    # what np.load(allow_pickle=True), the former loader, does with the same file:
    with np.load(npz, allow_pickle=True) as z:
        z["data"]
    assert marker.exists()


def test_other_objects_are_refused(tmp_path):
    import collections

    npz = tmp_path / "odd.npz"
    np.savez(npz, data=np.array(collections.OrderedDict({("0001", "0"): ["a.jpg"]}), dtype=object))
    with pytest.raises(ValueError, match=r"odd\.npz: refused: .*collections\.OrderedDict"):
        md.load_scene_list(npz)
    np.savez(npz, data=np.array({("0001", 0.5): ["a.jpg"]}, dtype=object))
    with pytest.raises(ValueError, match=r"odd\.npz: entry .*key must be \(scene_id, subscene_id\)"):
        md.load_scene_list(npz)
    np.savez(npz, data=np.array({("0001", "0"): "a.jpg"}, dtype=object))
    with pytest.raises(ValueError, match=r"odd\.npz: entry .*expected a list of image names, got str"):
        md.load_scene_list(npz)
    np.savez(npz, other=np.arange(3))
    with pytest.raises(ValueError, match=r"odd\.npz: no 'data' array \(has \['other'\]\)"):
        md.load_scene_list(npz)


def test_text_named_npz_is_told_apart_from_a_corrupt_one(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, data=np.array({("0001", "0"): ["a.jpg"]}, dtype=object))
    raw = good.read_bytes()

    text = tmp_path / "list.npz"
    text.write_text('[{"scene": "0001", "subscene": "0", "images": ["a.jpg"]}]\n')
    with pytest.raises(ValueError, match=r"list\.npz: a text file, not an npz archive \(first line: .*scene.*"
                                         r"name it \.json or \.yaml"):
        md.load_scene_list(text)
    lfs = tmp_path / "lfs.npz"
    lfs.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    with pytest.raises(ValueError, match=r"lfs\.npz: a Git LFS pointer.*git lfs pull"):
        md.load_scene_list(lfs)

    cut = tmp_path / "cut.npz"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"cut\.npz: corrupt npz archive .*download .* again"):
        md.load_scene_list(cut)
    flipped = bytearray(raw)
    flipped[len(raw) // 3] ^= 0xFF
    bad = tmp_path / "bad.npz"
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"bad\.npz: corrupt"):
        md.load_scene_list(bad)
    noise = tmp_path / "noise.npz"
    noise.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"noise\.npz: not an npz archive and not text \(it starts with bytes "
                                         r"00 01 02"):
        md.load_scene_list(noise)
    npy = tmp_path / "single.npz"
    with open(npy, "wb") as fh:
        np.save(fh, np.arange(3))
    with pytest.raises(ValueError, match=r"single\.npz: a single \.npy array"):
        md.load_scene_list(npy)


def _npz_with_member(path, header_shape, dtype, payload_bytes, chunk=1 << 20):
    """An .npz whose data.npy has the header (shape, dtype) and ``payload_bytes`` zero bytes after
    it, deflated (zeros compress ~1000:1: a deflate bomb)."""
    import io
    import zipfile

    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                               "shape": header_shape})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("data.npy", "w", force_zip64=True) as fh:
            fh.write(head.getvalue())
            zeros = bytes(chunk)
            for _ in range(payload_bytes // chunk):
                fh.write(zeros)


def test_a_deflate_bomb_is_refused_before_it_is_expanded(tmp_path):
    """Issue 26 item 7: a 1 MB deflate-bombed scene list took 2.4 GB before its error. The zip's
    declared sizes are read first: nothing is decompressed (here 300 MB in a ~0.3 MB file)."""
    import tracemalloc

    npz = tmp_path / "bomb.npz"
    _npz_with_member(npz, (300 << 20,), "u1", 300 << 20)
    assert npz.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"bomb\.npz: data\.npy declares 314,572,9\d\d bytes uncompressed.*"
                                             r"refused before decompressing"):
            md.load_scene_list(npz)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MB allocated while refusing it"


def test_a_header_that_declares_more_than_the_member_holds_is_refused(tmp_path):
    npz = tmp_path / "liar.npz"
    _npz_with_member(npz, (1 << 40,), "<f8", 1 << 20)  # 8 TB announced, 1 MB there
    with pytest.raises(ValueError, match=r"liar\.npz: data\.npy: its header declares an array of shape "
                                         r"\(1099511627776,\)"):
        md.load_scene_list(npz)
