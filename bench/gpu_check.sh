#!/usr/bin/env bash
# The dense stage of the demo scene on the GPU beside the CPU method (bench/gpu_check.py has the
# details): time per image, coverage, AbsRel. Runs from the repository root with whatever python3
# is there (PYTHON=... to choose); needs no Prefect server and nothing installed beyond numpy,
# numba (+ numba-cuda on a GPU), OpenCV, h5py and pycolmap (a pycolmap wheel may be carried in
# bench/gpu_carry/, see bench/gpu_check.py). Prepare the scene once where the aerial flow ran:
#   python bench/gpu_check.py --prepare /path/to/aerial/root
# Exit status: 0 done; 2 no CUDA GPU here (everything before that point ran); 3 a library is
# missing; 4 no prepared scene (bench/gpu_carry/scene); 1 anything else.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

exec "$PYTHON" bench/gpu_check.py "$@"
