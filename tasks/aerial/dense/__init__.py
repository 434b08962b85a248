"""Dense depth for a registered scene (step 3 of the aerial pipeline; docs/benchmarks.md has the figures).

A package split by job; state (the :class:`Workspace`: model and an image cache) is made by the
caller and passed explicitly:

* :mod:`.config` ``DenseConfig`` (shared settings, one sub-configuration per method), :mod:`.io`
  the file formats (depth h5, COLMAP dense ``.bin`` arrays, PLY), :mod:`.workspace` COLMAP's
  undistorted workspace (``images/``, ``sparse/`` with pinhole cameras), :mod:`.views` camera
  helpers and source-view selection;
* :mod:`.backends`: the backend protocol (prepare, run a batch, fuse), one class per method, and
  ``select_backend``, the one place that decides which method runs;
* methods: :mod:`.patchmatch` (COLMAP's PatchMatch MVS compiled with numba, kernels in
  :mod:`.kernels` on the CPU, :mod:`.kernels_cuda` on a GPU), :mod:`.gpu` (COLMAP PatchMatch
  through pycolmap on CUDA), :mod:`.sgbm` (OpenCV SGBM on rectified pairs + plane sweep);
* :mod:`.fusion`: what the PatchMatch methods share: ``pycolmap.stereo_fusion`` into
  ``fused.ply`` and the export of the maps to ``depths/<stem>.h5``.

Geometry conventions: COLMAP's (``x_cam = R x_world + t``; camera x right, y down, z forward; the
centre of pixel ``(row i, column j)`` is at ``(j + 0.5, i + 0.5)``). Depth is the z coordinate in
the camera (metres in a metric model), 0 where unknown.
"""

from tasks.aerial.dense.config import CUDA_MESSAGE, ColmapConfig, DenseConfig, DenseError, PatchMatchConfig, SGBMConfig
from tasks.aerial.dense.fusion import export_colmap_depths, fuse, fuse_and_export
from tasks.aerial.dense.gpu import dense_gpu, patch_match_gpu, write_stereo_config
from tasks.aerial.dense.io import (depth_path, image_stem, read_colmap_array, read_colmap_header, read_depth_h5,
                                   read_ply_points, write_colmap_array, write_depth_h5, write_ply_points)
from tasks.aerial.dense.patchmatch import map_paths, patch_match_image, run_patch_match, working_size
from tasks.aerial.dense.sgbm import depth_cpu, fuse_depths, fused_point_cloud_cpu, run_dense
from tasks.aerial.dense.views import global_depth_range, select_sources
from tasks.aerial.dense.workspace import Workspace, open_workspace, prepare_workspace

__all__ = [
    "DenseConfig", "PatchMatchConfig", "SGBMConfig", "ColmapConfig", "DenseError", "patch_match_gpu", "CUDA_MESSAGE", "image_stem", "depth_path", "prepare_workspace", "Workspace",
    "open_workspace", "select_sources", "global_depth_range", "depth_cpu", "fuse_depths", "run_dense",
    "fused_point_cloud_cpu", "write_depth_h5", "read_depth_h5", "read_colmap_array", "read_colmap_header",
    "write_colmap_array", "write_ply_points", "read_ply_points", "write_stereo_config", "export_colmap_depths",
    "fuse", "fuse_and_export", "dense_gpu", "map_paths", "patch_match_image", "run_patch_match", "working_size",
]
