"""The PatchMatch of one tiny scene on both kernel modules, for tests/test_aerial_patchmatch_cuda.py.

Run in a subprocess with ``NUMBA_ENABLE_CUDASIM=1`` (numba reads it at import, so it cannot be
turned on inside a test process that already imported numba): ``python -m tests.cuda_sim_patchmatch
OUT.npz``. Builds the analytic scene of tests/test_aerial_patchmatch.py (plane and box, exact depth)
and computes, at a 32x24 working size, the photometric pass of the middle view and of its
neighbours, then the geometric pass of the middle view, each once with the CPU kernels and once
with the CUDA kernels (the geometric passes both start from the CPU's photometric maps, so that they
compare one pass, not two). Writes every map and the exact depth to OUT.npz.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

#: tiny: 32x24 working size, 3x3 NCC samples over a 5x5 px window, 2 sources, 2 photometric and 1
#: geometric iteration, no coarse level (the simulator runs each CUDA thread in Python)
SETTINGS = dict(num_sources=2, patchmatch=dict(max_image_size=32, window_radius=2, window_step=2, num_sources=2,
                                               iterations=2, coarse_iterations=0, geom_iterations=1, speckle_size=0,
                                               region_min_share=0.0))


def main(out: Path) -> None:
    warnings.simplefilter("ignore", RuntimeWarning)  # the simulator's uint64 hash wraps around, as intended
    from tasks.aerial import dense
    from tasks.aerial.dense import kernels_cuda as KC
    from tasks.aerial.dense import patchmatch as PM
    from tests.test_aerial_patchmatch import build_scene

    from numba import config as nconfig
    if not nconfig.ENABLE_CUDASIM:
        raise SystemExit("run with NUMBA_ENABLE_CUDASIM=1")
    assert KC.available()
    with tempfile.TemporaryDirectory() as tmp:
        scene = build_scene(Path(tmp))
        ws = dense.open_workspace(scene["ws"])
        cfg = dense.DenseConfig(**SETTINGS)
        names = scene["names"]
        ref = names[2]
        res: dict[str, np.ndarray] = {}
        timing = {}
        for device in ("cpu", "cuda"):
            t0 = time.perf_counter()
            info: dict = {}
            d, n = PM.patch_match_image(ws, ref, cfg, "photometric", info, device)
            timing[device] = time.perf_counter() - t0
            res[f"{device}_photometric_depth"], res[f"{device}_photometric_normal"] = d, n
            res[f"{device}_sources"] = np.array(info["sources"])
        # the photometric maps the geometric pass reads (CPU: the reference and its sources), then the geometric pass
        r = dense.run_patch_match(ws, [ref, *(str(n) for n in res["cpu_sources"])], cfg, "photometric")
        assert not r["failures"], r["failures"]
        for device in ("cpu", "cuda"):
            info = {}
            d, n = PM.patch_match_image(ws, ref, cfg, "geometric", info, device)
            res[f"{device}_geometric_depth"], res[f"{device}_geometric_normal"] = d, n
            res[f"{device}_geometric_count"] = info["consistent views"]
            res[f"{device}_unfiltered"] = info["unfiltered depth"]
        gt = scene["truth"][ref][0]
        w, h = res["cpu_geometric_depth"].shape[1], res["cpu_geometric_depth"].shape[0]
        import cv2
        res["truth"] = cv2.resize(gt, (w, h), interpolation=cv2.INTER_NEAREST)
        res["seconds"] = np.array([timing["cpu"], timing["cuda"]])
        res["settings"] = np.array(repr(dataclasses.asdict(cfg)))
        np.savez(out, **res)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
