"""The aerial pipeline on a small realistic world (tasks.aerial.synthetic_realistic: degraded
aerial model, photos of the full model under other light, distorted raw cameras, occluders,
distractors) with the learned configuration, every network access refused: the registered
share of the true photos, no false registration, no registered distractor, and the accuracy of
the registered photos, each against a limit near its measured figure."""

from __future__ import annotations

import time

import numpy as np
import pycolmap
import pytest

pytest.importorskip("torch", reason="the learned extra (pip install -e '.[learned]') is not installed")

from tasks.aerial.evaluate import pose_accuracy  # noqa: E402
from tests.test_aerial_learned import learned_scene, no_network  # noqa: E402,F401 - no_network: the fixture
from tests.test_aerial_pipeline import _sfm  # noqa: E402

#: The small realistic world: 24 Earth Studio frames (11 of them near the ground), 12 photos of
#: which 3 are distractors, photos up to 1600 px processed to 800 px, frames 640x480.
WORLD = {"world": "realistic", "n_aerial": 24, "n_ground": 12, "seed": 0}

#: The learned configuration with fewer pairs per image (CPU torch on the 2-core CI machine) and
#: one thread for the mapper, whose result with several threads varies from run to run.
SETTINGS = {"ref_pairs_num": 8, "retrieval_num": 10, "query_pairs_num": 5, "sfm": {"num_threads": 1}}

#: (measured, limit) on this world with SETTINGS (2026-12-07; the same figures in two runs: one
#: mapper thread makes it deterministic; 9.5 min wall on the loaded 2-core machine, 216 CPU s, about
#: 3.6 min when quiet). The share may lose one photo; the accuracy limits are 2x the measured
#: figures and the kept photos' median 2D-3D inliers half, as the demo's limits
#: (tests/test_aerial_pipeline.py). Checked once: with 256 keypoints instead of 1024 the share is
#: 3/9 (passes) but the median inliers 53 (fails). False registrations: none, never loosened.
LIMITS: dict[str, tuple[float, float]] = {
    "registered fraction": (4 / 9, 3 / 9 - 1e-9),
    "median inliers": (118.0, 59.0),
    "median rotation error deg": (1.30, 2.6),
    "median centre error / extent": (0.0084, 0.017),
}


@pytest.fixture(scope="module")
def realistic_small(tmp_path_factory):
    return learned_scene(tmp_path_factory.mktemp("aerial_realistic"), WORLD, SETTINGS)


@pytest.mark.timeout(1500)
def test_learned_pipeline_on_the_realistic_world(realistic_small, no_network):
    paths, cfg = realistic_small
    cpu = time.process_time()
    info, ref, loc = _sfm(paths, cfg)
    cpu = time.process_time() - cpu
    rec = pycolmap.Reconstruction(str(paths.localized))
    gt = pycolmap.Reconstruction(str(paths.ground_truth / "sparse"))
    acc = pose_accuracy(rec, gt, sorted(info["queries"]))
    kept = [v["inliers"] for v in loc.details.values() if v["status"] == "registered"]
    figures = {"registered fraction": acc["registered fraction"], "median inliers": float(np.median(kept)),
               "median rotation error deg": acc["median rotation error deg"],
               "median centre error / extent": acc["median centre error / extent"]}
    assert acc["distractors"] == 3 and acc["photos attempted"] == 9, acc
    # never loosened: a distractor or a wrong pose that gets past verification fails here
    assert acc["false registrations"] == 0, acc["false registration photos"]
    for key in ("registered fraction", "median inliers"):
        assert figures[key] >= LIMITS[key][1], (key, figures, loc.problems, loc.details)
    for key in ("median rotation error deg", "median centre error / extent"):
        assert figures[key] <= LIMITS[key][1], (key, figures, acc["per photo"])
    # every photo kept passed verification with its inliers; every rejected one says why
    for name, v in loc.details.items():
        assert v["status"] == "rejected" and v["reason"] or v["inliers"] >= cfg.sfm.accept_min_inliers, (name, v)
    print("realistic world:", figures, "sparse CPU s", round(cpu, 1))
    assert no_network == []
