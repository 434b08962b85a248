"""The GPU PatchMatch without a GPU: the CUDA kernels (tasks/aerial/dense/kernels_cuda.py) under
numba's CUDA simulator against the CPU kernels on a tiny scene, and the choice of the GPU method
(tasks/aerial/dense/backends.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.aerial.dense import DenseConfig
from tasks.aerial.dense import backends as B

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """tests/cuda_sim_patchmatch.py in a subprocess with NUMBA_ENABLE_CUDASIM=1 (numba reads it at
    import); its maps. Measured: 60 s on the busy 2-core dev machine, most of it numba compiling the
    CPU kernels (cached afterwards: ~25 s)."""
    out = tmp_path_factory.mktemp("cuda_sim") / "maps.npz"
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "tests.cuda_sim_patchmatch", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return dict(np.load(out))


def _agree(a: np.ndarray, b: np.ndarray, rel: float = 1e-4) -> float:
    """Share of the pixels valid in either map where both are valid and within ``rel`` relative."""
    either = (a > 0) | (b > 0)
    both = (a > 0) & (b > 0)
    close = both & (np.abs(a - b) <= rel * np.maximum(a, b))
    return float(close.sum() / max(1, either.sum()))


@pytest.mark.parametrize("phase", ["photometric", "geometric"])
def test_cuda_kernels_match_the_cpu_kernels_under_the_simulator(sim, phase):
    """Tolerance: the depth within 1e-4 (relative) and the normal within 1e-3 on at least 99 % of the
    pixels that either map has, the same consistent-source count on 99 %. Why: the CUDA kernels run
    the CPU kernels' arithmetic on the same inputs and random counters, so they differ only by
    rounding (the CPU kernels use fastmath); where rounding flips the choice between two nearly equal
    costs a pixel may keep another hypothesis. Measured (32x24 px, 2 sources, 2 + 1 iterations):
    photometric 98.8 % of the pixels bit-identical, the rest within 1.3e-7; geometric (filtered)
    100 % identical, same counts. A real GPU (fused multiply-add) flips more comparisons:
    bench/gpu_check.sh compares coverage and accuracy on the demo there."""
    assert list(sim["cpu_sources"]) == list(sim["cuda_sources"]) and len(sim["cpu_sources"]) == 2
    a, b = sim[f"cpu_{phase}_depth"], sim[f"cuda_{phase}_depth"]
    assert a.shape == b.shape == (24, 32)
    assert (a > 0).mean() > 0.3  # a real map, not an empty one that trivially agrees
    assert _agree(a, b) >= 0.99
    na, nb = sim[f"cpu_{phase}_normal"], sim[f"cuda_{phase}_normal"]
    close_n = np.all(np.abs(na - nb) <= 1e-3, axis=-1) & (a > 0) & (b > 0)
    assert close_n.sum() >= 0.99 * ((a > 0) | (b > 0)).sum()
    if phase == "geometric":
        assert np.mean(sim["cpu_geometric_count"] == sim["cuda_geometric_count"]) >= 0.99
        # and the maps are depth: the filtered geometric map against the exact depth (measured AbsRel
        # 0.084 at this tiny size with a 5x5 px window, 49 % of the pixels kept)
        gt = sim["truth"]
        m = (b > 0) & (gt > 0)
        assert m.mean() > 0.3 and np.mean(np.abs(b[m] - gt[m]) / gt[m]) < 0.15


def test_gpu_method_is_chosen_in_one_place(monkeypatch):
    """auto: COLMAP's CUDA PatchMatch when pycolmap has CUDA, else numba's; an explicit method that
    cannot run, or no method at all, fails with what to install."""
    cfg = DenseConfig()
    for colmap, numba_ok, want in ((True, True, "colmap"), (True, False, "colmap"), (False, True, "patchmatch")):
        monkeypatch.setattr(B, "colmap_has_cuda", lambda v=colmap: v)
        monkeypatch.setattr(B, "numba_cuda_available", lambda v=numba_ok: v)
        assert B.gpu_method(cfg) == want
    monkeypatch.setattr(B, "colmap_has_cuda", lambda: True)
    monkeypatch.setattr(B, "numba_cuda_available", lambda: True)
    assert B.gpu_method(DenseConfig(gpu_method="patchmatch")) == "patchmatch"
    monkeypatch.setattr(B, "colmap_has_cuda", lambda: False)
    with pytest.raises(RuntimeError, match="pycolmap-cuda12"):
        B.gpu_method(DenseConfig(gpu_method="colmap"))
    monkeypatch.setattr(B, "numba_cuda_available", lambda: False)
    with pytest.raises(RuntimeError, match="pycolmap-cuda12.*numba-cuda"):
        B.gpu_method(cfg)
    with pytest.raises(RuntimeError, match="numba-cuda"):
        B.gpu_method(DenseConfig(gpu_method="patchmatch"))
    with pytest.raises(ValueError, match="gpu_method"):
        B.gpu_method(DenseConfig(gpu_method="opencl"))


def test_the_gpu_task_runs_the_chosen_method(monkeypatch, tmp_path):
    """tasks/aerial/pipeline.dense_depths_gpu (the GPU worker's dense stage) goes through
    select_backend: with only numba.cuda it runs the PatchMatch passes on device "cuda"."""
    from tasks.aerial import pipeline as PL

    calls = []
    monkeypatch.setattr(B, "colmap_has_cuda", lambda: False)
    monkeypatch.setattr(B, "numba_cuda_available", lambda: True)
    monkeypatch.setattr(B, "run_patch_match", lambda ws, names, cfg, phase, device="cpu", progress=None: calls.append(
        (phase, device, list(names))) or {"stats": {"a.jpg": {"seconds": 1.0, "valid_fraction": 0.5}},
                                          "failures": {}})
    monkeypatch.setattr(B, "fuse_and_export", lambda *a, **k: {
        "stats": {"a.jpg": {"seconds": 0.1, "valid_fraction": 0.4}}, "failures": {}, "fusion": {"fused points": 9}})
    cfg = PL.PIPELINES.build()
    out = PL.dense_depths_gpu(PL.scene_paths(tmp_path, "0001", tmp_path / "md", cfg), cfg, ["a.jpg"])
    assert calls == [("photometric", "cuda", ["a.jpg"]), ("geometric", "cuda", ["a.jpg"])]
    assert out["method"] == "patchmatch-cuda" and out["stats"]["a.jpg"]["seconds"] == pytest.approx(2.1)


def _check_scene(root: Path) -> Path:
    """The analytic scene of tests/test_aerial_patchmatch.py laid out as ``bench/gpu_check.py
    --prepare`` lays out the demo's (workspace, ground truth = the true model and depths, photos)."""
    import shutil

    from tasks.aerial.dense import write_depth_h5
    from tests.test_aerial_patchmatch import build_scene

    (root / "src").mkdir()
    s = build_scene(root / "src")
    scene = root / "scene"
    (scene / "dense").mkdir(parents=True)
    shutil.copytree(s["ws"] / "sparse", scene / "dense" / "sparse")
    shutil.copytree(s["ws"] / "images", scene / "dense" / "images")
    shutil.copytree(s["ws"] / "sparse", scene / "ground_truth" / "sparse")
    for name, (depth, _) in s["truth"].items():
        write_depth_h5(scene / "ground_truth" / "depths" / f"{Path(name).stem}.h5", depth)
    (scene / "scene.json").write_text('{"scene": "analytic", "queries": ["v0.png"]}')
    return scene


def test_gpu_check_on_a_cpu_machine(tmp_path):
    """bench/gpu_check.sh without a GPU: imports the library without Prefect/Dask, opens the scene,
    then stops where CUDA is needed with exit status 2 and says so; the CPU method's half runs and
    prints its figures (the pipeline's own depth accuracy; measured on the first 3 views: coverage
    0.72, AbsRel 0.011; limits 0.5 and 0.05)."""
    scene = _check_scene(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    env.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    cmd = [str(ROOT / "bench" / "gpu_check.sh"), "--scene", str(scene), "--work", str(tmp_path / "work")]
    gpu = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert gpu.returncode == 2, gpu.stdout + gpu.stderr
    assert "modules it did not need loaded: none" in gpu.stdout  # no Prefect, Dask, pymap3d
    assert "5 registered images" in gpu.stdout and "no CUDA GPU here" in gpu.stdout
    cpu = subprocess.run(cmd + ["--methods", "cpu", "--images", "3"], env=env, capture_output=True, text=True, timeout=300)
    assert cpu.returncode == 0, cpu.stdout + cpu.stderr
    rows = {line.split()[2]: line.split() for line in cpu.stdout.splitlines() if line.startswith("cpu ")}
    assert set(rows) == {"aerial", "photos", "all"}
    assert float(rows["all"][3]) > 0.5 and float(rows["all"][4]) < 0.05  # coverage, AbsRel
    missing = subprocess.run(cmd[:1] + ["--scene", str(tmp_path / "nothing")], env=env, capture_output=True,
                             text=True, timeout=300)
    assert missing.returncode == 4 and "no prepared scene" in missing.stdout


def test_cuda_kernels_compile_for_the_gpu_target(monkeypatch):
    """The simulator runs the kernels as Python; this types them and lowers them to LLVM IR with
    numba's real CUDA target (compute capability 9.0, an H100's) without a GPU, so that code the
    simulator accepts but the CUDA target cannot compile (e.g. ``max()`` of floats in a device
    function, which the simulator ran) fails here. Only the last step, NVVM's PTX, needs the CUDA
    toolkit. Uses numba internals: the device's compute capability is faked."""
    from numba import types
    from numba.cuda import dispatcher
    from numba.cuda.compiler import compile_cuda

    from tasks.aerial.dense import kernels_cuda as KC

    class _Device:
        compute_capability = (9, 0)

    monkeypatch.setattr(dispatcher, "get_current_device", lambda: _Device())
    f64, i64 = types.float64, types.int64

    def arr(nd, dt=types.float64):
        return types.Array(dt, nd, "C")

    P = [arr(2), arr(2), arr(3), arr(2), arr(3), arr(2), arr(3), arr(3), arr(3, types.float32), arr(2, i64),
         arr(3, types.float32), arr(3, types.float32), arr(2, types.float32), i64, i64, i64, types.boolean, f64, f64,
         arr(3, types.float32), arr(2, i64)]
    d, n, c = arr(2, types.float32), arr(3, types.float32), arr(2, types.float32)
    sigs = {KC._initialise: (d, n, c, *P, f64, f64, f64, i64),
            KC._sweep: (i64, i64, d, n, c, *P, f64, f64, f64, i64, f64),
            KC._consistency: (d, n, arr(2, types.int32), arr(2), *P[:15], P[16], P[18], P[19], P[20], f64, f64, f64,
                              i64, f64)}
    for kernel, sig in sigs.items():
        cres = compile_cuda(kernel.py_func, types.void, sig, cc=(9, 0))
        assert "define" in cres.library.get_llvm_str()


def test_gpu_check_unpacks_carried_packages(tmp_path, monkeypatch):
    """A package carried to the GPU machine as a wheel, or repacked by --pack-wheel as .tar.xz, is
    importable after unpack_carried_wheels when it is not installed there."""
    import importlib
    import zipfile

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        gc = importlib.import_module("gpu_check")
    finally:
        sys.path.remove(str(ROOT / "bench"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    src = tmp_path / "wheels"
    src.mkdir()
    for pkg in ("zzcarried_a", "zzcarried_b"):
        with zipfile.ZipFile(src / f"{pkg}-1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{pkg}/__init__.py", f"NAME = {pkg!r}\n")
    carry = tmp_path / "carry"
    carry.mkdir()
    (src / "zzcarried_a-1.0-py3-none-any.whl").rename(carry / "zzcarried_a-1.0-py3-none-any.whl")
    monkeypatch.setattr(gc, "CARRY", carry)
    assert gc.pack_wheel(src / "zzcarried_b-1.0-py3-none-any.whl", carry) == 0
    assert (carry / "zzcarried_b-1.0-py3-none-any.tar.xz").is_file()
    used = gc.unpack_carried_wheels(carry)
    assert used == ["zzcarried_a-1.0-py3-none-any.whl", "zzcarried_b-1.0-py3-none-any.tar.xz"]
    assert importlib.import_module("zzcarried_a").NAME == "zzcarried_a"
    assert importlib.import_module("zzcarried_b").NAME == "zzcarried_b"
    assert gc.unpack_carried_wheels(carry) == []  # importable now: nothing more to do
    for pkg in ("zzcarried_a", "zzcarried_b"):
        sys.modules.pop(pkg, None)
