"""The dense stage's backend is chosen in one place (tasks/aerial/dense/backends.select_backend),
from the configuration and the workers of the cluster, and no other module decides it again."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tasks.aerial.dense import DenseConfig
from tasks.aerial.dense import backends as B

ROOT = Path(__file__).resolve().parents[1]
GPU_WORKERS = ["tcp://10.0.0.7:4321"]


def _never_asked():
    raise AssertionError("a GPU worker was asked what it can run although no GPU method can be chosen")


def test_select_backend_from_the_configuration_and_the_workers():
    colmap = lambda: B.GpuCapabilities(colmap=True, numba_cuda=True)  # noqa: E731
    numba_only = lambda: B.GpuCapabilities(colmap=False, numba_cuda=True)  # noqa: E731
    cases = [
        (DenseConfig(), [], _never_asked, B.PatchMatchBackend),  # the default: CPU PatchMatch
        (DenseConfig(cpu_method="sgbm"), [], _never_asked, B.SGBMBackend),
        (DenseConfig(backend="gpu"), [], _never_asked, B.PatchMatchBackend),  # no GPU worker: the CPU method
        (DenseConfig(backend="cpu", cpu_method="sgbm"), GPU_WORKERS, _never_asked, B.SGBMBackend),
        (DenseConfig(), GPU_WORKERS, colmap, B.ColmapCudaBackend),
        (DenseConfig(cpu_method="sgbm"), GPU_WORKERS, numba_only, B.PatchMatchCudaBackend),
        (DenseConfig(gpu_method="patchmatch"), GPU_WORKERS, colmap, B.PatchMatchCudaBackend),
    ]
    for cfg, workers, capabilities, want in cases:
        chosen = B.select_backend(cfg, workers, capabilities=capabilities)
        assert type(chosen.backend) is want, (cfg, workers, chosen)
        assert chosen.backend.config is cfg and want.name in chosen.why
    gpu = B.select_backend(DenseConfig(), GPU_WORKERS, capabilities=colmap)
    assert "declare GPU" in gpu.why and gpu.backend.resources == {"GPU": 1}
    with pytest.raises(RuntimeError, match="pycolmap-cuda12"):
        B.select_backend(DenseConfig(gpu_method="colmap"), GPU_WORKERS, capabilities=numba_only)


def test_backends_steps_and_batches():
    """The choices that follow from the method are the backend's: PatchMatch's passes (the geometric
    one only when it has iterations), batches of ``batch`` images on the CPU, one task per step on a GPU."""
    names = [f"{i}.jpg" for i in range(10)]
    cpu = B.PatchMatchBackend(DenseConfig(batch=4))
    assert cpu.steps() == ("photometric", "geometric") and cpu.resources == {}
    assert [len(b) for b in cpu.batches(names)] == [4, 4, 2] and sum(cpu.batches(names), []) == names
    assert B.PatchMatchBackend(DenseConfig(patchmatch={"geom_iterations": 0})).steps() == ("photometric",)
    assert B.SGBMBackend(DenseConfig(batch=3)).steps() == ("depth",)
    for gpu in (B.PatchMatchCudaBackend(DenseConfig(batch=4)), B.ColmapCudaBackend(DenseConfig(batch=4))):
        assert gpu.batches(names) == [names] and gpu.resources == {"GPU": 1} and gpu.device == "gpu"


#: the spellings of the methods; a comparison with one of them is a decision of which method runs
METHOD_NAMES = {"sgbm", "patchmatch", "colmap", "patchmatch-cuda", "numba"}
#: the settings that say which method runs (or whether PatchMatch's geometric pass does)
DECIDING = {"cpu_method", "gpu_method", "geom_iterations", "geom_consistency"}


def _strings(node: ast.AST) -> set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def second_decisions(path: Path) -> list[str]:
    """Where ``path`` compares something with a method name, or reads a setting that chooses the
    method (``.cpu_method``, ``.gpu_method``; outside the dense package also the geometric pass)."""
    tree = ast.parse(path.read_text(), str(path))
    in_dense = "dense" in path.relative_to(ROOT).parts
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(_strings(x) & METHOD_NAMES for x in [node.left, *node.comparators]):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: compares with a method name")
        if isinstance(node, ast.Attribute) and node.attr in DECIDING:
            if node.attr in ("cpu_method", "gpu_method") or not in_dense:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: reads .{node.attr}")
    return found


def test_no_other_module_decides_the_dense_method():
    """Only tasks/aerial/dense/backends.py decides which dense method runs; the PatchMatch module
    itself reads its geometric pass setting (it runs the pass it is asked for)."""
    owner = ROOT / "tasks" / "aerial" / "dense" / "backends.py"
    assert second_decisions(owner), "the check finds nothing even in the module that decides"
    found = [hit for folder in ("tasks", "flows") for path in sorted((ROOT / folder).rglob("*.py"))
             if path != owner for hit in second_decisions(path)]
    # the settings' owner checks their spelling; the algorithm runs the passes it is given
    allowed = {"tasks/aerial/dense/config.py", "tasks/aerial/dense/patchmatch.py"}
    found = [hit for hit in found if hit.split(":")[0] not in allowed or "method name" in hit]
    assert not found, "the dense method is decided outside tasks/aerial/dense/backends.py:\n" + "\n".join(found)
